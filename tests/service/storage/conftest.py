"""A real S3-protocol server for the storage tests: moto's, in a subprocess on a free port.

MinIO's server binary cannot be downloaded on these machines; moto (`moto[server]`, a dev
dependency from PyPI) speaks the same S3 REST protocol: SigV4, multipart uploads with S3's
5 MiB part minimum and `-N` ETags, ranged and streamed GETs, presigned URLs, DeleteObjects.
A subprocess rather than moto's in-thread server: the tests' own client and the server do not
share one interpreter's GIL, and it is started and stopped like the API processes. No client
is mocked: every test talks HTTP to it. Under GRAIT_REQUIRE_SERVICES=1 (or CI=true) a server
that cannot start fails the run instead of skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import PYTHON, Process, free_port, unavailable, wait_for

S3_ACCESS = {"key": "grait-test", "secret": "grait-test-secret", "region": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        unavailable("moto's S3 server (pip install 'moto[server]')", exc)
    port = free_port()
    # Its own environment: AWS_* variables of the machine must not reach the server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    server = Process(
        "s3-server",
        [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env,
        tmp_path_factory.mktemp("s3-logs"),
    ).start()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not server.running:
            raise AssertionError(f"the S3 server exited:\n{server.log()[-2000:]}")
        try:
            return httpx.get(url + "/moto-api/", timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=30, what="the S3 server to answer")
    except AssertionError as exc:
        server.stop()
        unavailable("moto's S3 server", exc)
    yield url
    server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket (the service expects its bucket to exist, as `minio/mc mb` makes it)."""
    name = f"grait-test-{uuid.uuid4().hex[:8]}"
    # moto checks no signature by default: a plain PUT creates the bucket.
    response = httpx.put(f"{s3_endpoint}/{name}", timeout=10)
    assert response.status_code == 200, response.text
    return name


def s3_settings(endpoint: str, bucket: str, cache_dir: Path, **extra: str) -> dict[str, str]:
    """GRAIT_* variables of a service on this bucket, under a key prefix of its own."""
    return {
        "GRAIT_STORAGE_BACKEND": "s3",
        "GRAIT_STORAGE_ENDPOINT_URL": endpoint,
        "GRAIT_STORAGE_BUCKET": bucket,
        "GRAIT_STORAGE_PREFIX": f"svc-{uuid.uuid4().hex[:8]}",
        "GRAIT_STORAGE_REGION": S3_ACCESS["region"],
        "GRAIT_STORAGE_ACCESS_KEY_ID": S3_ACCESS["key"],
        "GRAIT_STORAGE_SECRET_ACCESS_KEY": S3_ACCESS["secret"],
        "GRAIT_STORAGE_DIR": str(cache_dir),
        **extra,
    }
