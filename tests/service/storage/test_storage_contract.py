"""One contract, both stores: `LocalStorage` and `S3Storage` on a real S3-protocol server."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Config,
    S3Storage,
    Storage,
    StorageError,
)

from .conftest import S3_ACCESS

pytestmark = pytest.mark.timeout(60)

PART = 5 * 1024 * 1024  # S3's smallest part


def s3_store(endpoint: str, bucket: str, root: Path, **overrides: object) -> S3Storage:
    config = {
        "bucket": bucket,
        "root": root,
        "endpoint_url": endpoint,
        "prefix": f"contract-{uuid.uuid4().hex[:8]}",
        "region": S3_ACCESS["region"],
        "access_key_id": S3_ACCESS["key"],
        "secret_access_key": S3_ACCESS["secret"],
        "part_bytes": PART,
        **overrides,
    }
    return S3Storage(S3Config(**config))  # type: ignore[arg-type]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "storage")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return s3_store(endpoint, bucket, tmp_path / "s3-machine")


def random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_larger_than_a_part_is_stored_in_parts_and_fetched_whole(
    store: Storage, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    digest = random_file(source, 2 * PART + 12345)

    assert store.put_file("datasets/ds-1/big.bin", source) == source.stat().st_size
    fetched = store.fetch("datasets/ds-1/big.bin")

    assert source.exists()  # copied, not moved
    assert fetched.name == "big.bin" and sha256_of(fetched) == digest
    info = store.stat("datasets/ds-1/big.bin")
    assert info.size == source.stat().st_size
    if isinstance(store, S3Storage):
        assert info.etag and info.etag.strip('"').endswith("-3"), info  # a 3-part upload
        # The second fetch reuses this machine's copy: same ETag, same size.
        before = fetched.stat().st_ino
        assert store.fetch("datasets/ds-1/big.bin") == fetched
        assert fetched.stat().st_ino == before


def test_put_with_move_takes_the_staged_file(store: Storage) -> None:
    staged = store.staging_path(".jsonl")
    staged.write_text('{"q": 1}\n')

    store.put_file("datasets/ds-2/train.jsonl", staged, move=True)

    assert not staged.exists()
    assert store.fetch("datasets/ds-2/train.jsonl").read_text() == '{"q": 1}\n'


def test_stream_yields_the_object_in_chunks_with_its_size(store: Storage, tmp_path: Path) -> None:
    source = tmp_path / "adapter.tar.gz"
    digest = random_file(source, 3 * 1024 * 1024 + 7)
    store.put_file("jobs/job-1/attempt-1/adapter.tar.gz", source, content_type="application/gzip")

    info, chunks = store.stream("jobs/job-1/attempt-1/adapter.tar.gz")

    hasher, parts = hashlib.sha256(), 0
    for chunk in chunks:
        hasher.update(chunk)
        parts += 1
    assert info.size == source.stat().st_size and hasher.hexdigest() == digest
    assert parts > 1


def test_exists_and_delete(store: Storage, tmp_path: Path) -> None:
    source = tmp_path / "report.json"
    source.write_text("{}")
    store.put_file("jobs/job-2/attempt-1/report.json", source)
    store.fetch("jobs/job-2/attempt-1/report.json")  # cached on an object store's machine

    assert store.exists("jobs/job-2/attempt-1/report.json")
    store.delete("jobs/job-2/attempt-1/report.json")
    store.delete("jobs/job-2/attempt-1/report.json")  # a second delete is no error

    assert not store.exists("jobs/job-2/attempt-1/report.json")
    with pytest.raises(ObjectNotFound):
        store.fetch("jobs/job-2/attempt-1/report.json")


def test_delete_prefix_removes_that_folder_only(store: Storage, tmp_path: Path) -> None:
    source = tmp_path / "x.txt"
    source.write_text("x")
    keys = ["jobs/job-3/attempt-1/a.txt", "jobs/job-3/attempt-1/sub/b.txt"]
    kept = ["jobs/job-3/attempt-10/c.txt", "jobs/job-3/attempt-2/d.txt"]
    for key in keys + kept:
        store.put_file(key, source)
    fetched = store.fetch(keys[0])

    store.delete_prefix("jobs/job-3/attempt-1")

    assert [store.exists(k) for k in keys] == [False, False]
    assert [store.exists(k) for k in kept] == [True, True]  # `attempt-1` spares `attempt-10`
    assert not fetched.exists()  # an object store's machine drops its copy too
    store.delete_prefix("jobs/job-3/never-was")


def test_a_missing_key_is_object_not_found_naming_only_the_key(
    store: Storage, tmp_path: Path
) -> None:
    key = "datasets/ds-404/gone.csv"
    calls: list[Callable[[], object]] = [
        lambda: store.fetch(key),
        lambda: store.stream(key),
        lambda: store.stat(key),
    ]
    for call in calls:
        with pytest.raises(ObjectNotFound) as caught:
            call()
        assert caught.value.key == key
        assert str(caught.value) == f"no stored object {key!r}"  # no root, bucket or URL
    assert not store.exists(key)
    store.delete(key)


def test_a_key_may_not_leave_its_store(store: Storage, tmp_path: Path) -> None:
    source = tmp_path / "x.txt"
    source.write_text("x")
    for key in ("../outside.txt", "datasets/../../outside.txt"):
        with pytest.raises(ValueError):
            store.put_file(key, source)


# ---- object-store specifics -------------------------------------------------------------------


def test_a_changed_object_is_fetched_again(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store = s3_store(s3_endpoint, s3_bucket, tmp_path / "machine")
    source = tmp_path / "train.jsonl"
    source.write_text("first\n")
    store.put_file("datasets/ds-5/train.jsonl", source)
    assert store.fetch("datasets/ds-5/train.jsonl").read_text() == "first\n"

    source.write_text("second\n")
    store.put_file("datasets/ds-5/train.jsonl", source)

    assert store.fetch("datasets/ds-5/train.jsonl").read_text() == "second\n"


def test_each_machine_has_its_own_cache(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    """An API node's upload is fetched by a worker node from the bucket, not a shared disk."""
    prefix = f"nodes-{uuid.uuid4().hex[:8]}"
    api = s3_store(s3_endpoint, s3_bucket, tmp_path / "api", prefix=prefix)
    worker = s3_store(s3_endpoint, s3_bucket, tmp_path / "worker", prefix=prefix)
    staged = api.staging_path(".csv")
    staged.write_text("id,question\n")

    api.put_file("datasets/ds-6/mmlu.csv", staged, move=True)
    on_worker = worker.fetch("datasets/ds-6/mmlu.csv")

    assert on_worker.is_relative_to(tmp_path / "worker") and on_worker.name == "mmlu.csv"
    assert on_worker.read_text() == "id,question\n"


def test_presigned_url_serves_the_object_with_its_type_and_name(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store = s3_store(s3_endpoint, s3_bucket, tmp_path / "m", presign_expires_seconds=60)
    source = tmp_path / "report.md"
    source.write_text("# report\n")
    store.put_file("jobs/job-7/attempt-1/job-7-report.md", source, content_type="text/markdown")

    url = store.presigned_url("jobs/job-7/attempt-1/job-7-report.md")
    assert url is not None and "X-Amz-Signature=" in url
    response = httpx.get(url)

    assert response.status_code == 200 and response.text == "# report\n"
    assert response.headers["content-type"] == "text/markdown"
    assert response.headers["content-disposition"] == 'attachment; filename="job-7-report.md"'
    with pytest.raises(ObjectNotFound):
        store.presigned_url("jobs/job-7/attempt-1/gone.md")
    unsigned = s3_store(s3_endpoint, s3_bucket, tmp_path / "n")
    assert unsigned.presigned_url("jobs/job-7/attempt-1/job-7-report.md") is None


def test_an_unreachable_store_fails_naming_the_key_not_the_endpoint(
    s3_bucket: str, tmp_path: Path
) -> None:
    from tests.service.conftest import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = s3_store(endpoint, s3_bucket, tmp_path / "m")

    with pytest.raises(StorageError) as caught:
        store.fetch("datasets/ds-8/train.jsonl")

    assert str(caught.value) == "object store: head 'datasets/ds-8/train.jsonl' failed"
    assert endpoint not in str(caught.value) and s3_bucket not in str(caught.value)


def test_the_fetch_cache_is_trimmed_least_recently_used_first(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store = s3_store(s3_endpoint, s3_bucket, tmp_path / "machine", cache_max_bytes=2500)
    for k in range(3):
        source = tmp_path / f"f{k}.bin"
        source.write_bytes(bytes(1000))
        store.put_file(f"datasets/ds-{k}/f.bin", source)
    old, used, new = (store.fetch(f"datasets/ds-{k}/f.bin") for k in range(3))
    assert old.exists() and used.exists() and new.exists()  # all used just now: none trimmed
    past = time.time() - 3600
    for path in (old, used):
        os.utime(path, (past, past))
    store.fetch("datasets/ds-1/f.bin")  # a hit: `used` is the most recent again
    assert store.trim_cache() == 1000
    assert not old.exists() and used.exists() and new.exists()
    assert store.fetch("datasets/ds-0/f.bin").read_bytes() == bytes(1000)  # fetched again
