"""The API on an object store: uploads go to the bucket, the planner fetches from it, and
downloads stream through the API or redirect (307) to a presigned URL; a missing object is
the same 404 as an unknown id, and a failing store a 500 that names nothing of it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.storage import S3Config, S3Storage
from tests.service.conftest import bearer, free_port, start_api, upload

from .conftest import s3_settings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def s3_env(
    service_env: dict[str, str],
    s3_endpoint: str,
    s3_bucket: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    # A queue of its own: no test worker picks up these jobs (their datasets are in the bucket).
    return {
        **service_env,
        **s3_settings(s3_endpoint, s3_bucket, tmp_path_factory.mktemp("api-machine")),
        "GRAIT_QUEUE": f"s3-{uuid.uuid4().hex[:8]}",
    }


@pytest.fixture(scope="module")
def apis(
    s3_env: dict[str, str], logs_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Three API processes on one bucket: streaming, presigning (on a machine of its own),
    and one whose store is gone."""
    streaming, streaming_url = start_api(s3_env, logs_dir, name="api-s3")
    second_machine = tmp_path_factory.mktemp("api-machine-2")
    presigning, presigning_url = start_api(
        {
            **s3_env,
            "GRAIT_STORAGE_PRESIGN_DOWNLOADS": "true",
            "GRAIT_STORAGE_DIR": str(second_machine),
        },
        logs_dir,
        name="api-s3-presign",
    )
    broken, broken_url = start_api(
        {**s3_env, "GRAIT_STORAGE_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
        logs_dir,
        name="api-s3-broken",
    )
    yield {
        "streaming": streaming_url,
        "presigning": presigning_url,
        "broken": broken_url,
        "second_machine": str(second_machine),
    }
    for proc in (streaming, presigning, broken):
        proc.stop()


@pytest.fixture(scope="module")
def stored(apis: dict[str, str], s3_env: dict[str, str], data_dir: Path) -> dict[str, Any]:
    """A dataset uploaded through the API, a job planned from it, and one artifact of the job."""
    from sqlalchemy.orm import Session

    from app.db import make_engine
    from app.models import Artifact, new_id

    source = data_dir / "arc_excerpt.jsonl"
    with client_of(apis["streaming"], s3_env) as c:
        dataset = upload(c, source)
        assert dataset.status_code == 201, dataset.text
    # Submitted on the other machine: its planner fetches the dataset from the bucket.
    with client_of(apis["presigning"], s3_env) as c:
        job = c.post("/v1/jobs", json={"train_dataset": dataset.json()["id"]})
        assert job.status_code == 201, job.text
        c.post(f"/v1/jobs/{job.json()['id']}/cancel")
    job_id = job.json()["id"]
    report = data_dir / "s3-report.json"
    report.write_text('{"evals": []}')
    key = f"jobs/{job_id}/attempt-1/{job_id}-report.json"
    bucket_of(s3_env).put_file(key, report, content_type="application/json")
    artifact_id = new_id("file")
    engine = make_engine(s3_env["GRAIT_DATABASE_URL"], one_shot=True)
    with Session(engine) as session, session.begin():
        session.add(
            Artifact(
                id=artifact_id,
                job_id=job_id,
                kind="report_json",
                filename=f"{job_id}-report.json",
                content_type="application/json",
                bytes=report.stat().st_size,
                storage_key=key,
            )
        )
    engine.dispose()
    return {
        "dataset": dataset.json(),
        "dataset_bytes": source.read_bytes(),
        "job": job_id,
        "artifact": artifact_id,
        "artifact_key": key,
        "artifact_bytes": report.read_bytes(),
    }


def bucket_of(env: dict[str, str]) -> S3Storage:
    """The API's bucket and prefix, seen from this test (its own machine folder)."""
    return S3Storage(
        S3Config(
            bucket=env["GRAIT_STORAGE_BUCKET"],
            root=Path(env["GRAIT_STORAGE_DIR"]).with_name("test-machine"),
            endpoint_url=env["GRAIT_STORAGE_ENDPOINT_URL"],
            prefix=env["GRAIT_STORAGE_PREFIX"],
            region=env["GRAIT_STORAGE_REGION"],
            access_key_id=env["GRAIT_STORAGE_ACCESS_KEY_ID"],
            secret_access_key=env["GRAIT_STORAGE_SECRET_ACCESS_KEY"],
        )
    )


def client_of(base: str, env: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=base, headers=bearer(env["GRAIT_API_KEY"]), timeout=30)


def test_an_upload_goes_to_the_bucket_not_the_api_machine(
    stored: dict[str, Any], s3_env: dict[str, str]
) -> None:
    key = f"datasets/{stored['dataset']['id']}/arc_excerpt.jsonl"

    assert bucket_of(s3_env).stat(key).size == len(stored["dataset_bytes"])
    machine = Path(s3_env["GRAIT_STORAGE_DIR"])
    assert not (machine / "datasets").exists()  # only staging/ and cache/ live there
    assert sorted(p.name for p in machine.iterdir()) == ["cache", "staging"]
    assert not any((machine / "staging").iterdir())


def test_a_job_is_planned_from_the_bucket_on_another_machine(
    apis: dict[str, str], stored: dict[str, Any]
) -> None:
    cached = list(
        (Path(apis["second_machine"]) / "cache" / "datasets" / stored["dataset"]["id"]).glob(
            "*/arc_excerpt.jsonl"
        )
    )
    assert [p.read_bytes() for p in cached] == [stored["dataset_bytes"]]


def test_downloads_stream_through_the_api(
    apis: dict[str, str], stored: dict[str, Any], s3_env: dict[str, str]
) -> None:
    with client_of(apis["streaming"], s3_env) as c:
        dataset = c.get(f"/v1/files/{stored['dataset']['id']}/content")
        artifact = c.get(f"/v1/jobs/{stored['job']}/artifacts/{stored['artifact']}/content")

    assert dataset.status_code == 200 and dataset.content == stored["dataset_bytes"]
    assert dataset.headers["content-length"] == str(len(stored["dataset_bytes"]))
    assert dataset.headers["content-disposition"] == 'attachment; filename="arc_excerpt.jsonl"'
    assert artifact.status_code == 200 and artifact.content == stored["artifact_bytes"]
    assert artifact.headers["content-type"] == "application/json"
    assert artifact.headers["content-disposition"].endswith(
        f'filename="{stored["job"]}-report.json"'
    )


def test_downloads_redirect_to_a_presigned_url_when_set(
    apis: dict[str, str], stored: dict[str, Any], s3_env: dict[str, str], s3_endpoint: str
) -> None:
    with client_of(apis["presigning"], s3_env) as c:
        dataset = c.get(f"/v1/files/{stored['dataset']['id']}/content")
        artifact = c.get(f"/v1/jobs/{stored['job']}/artifacts/{stored['artifact']}/content")

    for response, body in ((dataset, "dataset_bytes"), (artifact, "artifact_bytes")):
        assert response.status_code == 307, response.text
        assert response.headers["cache-control"] == "no-store"
        location = response.headers["location"]
        assert location.startswith(s3_endpoint) and "X-Amz-Signature=" in location
        followed = httpx.get(location)  # no API key: the signature is the permission
        assert followed.status_code == 200 and followed.content == stored[body]
    assert httpx.get(artifact.headers["location"]).headers["content-type"] == "application/json"


def test_the_dashboard_reads_and_serves_artifacts_from_the_bucket(
    apis: dict[str, str], stored: dict[str, Any], s3_env: dict[str, str]
) -> None:
    with httpx.Client(base_url=apis["streaming"], timeout=30) as browser:
        signed_in = browser.post("/ui/login", data={"api_key": s3_env["GRAIT_API_KEY"]})
        assert signed_in.status_code == 303
        page = browser.get(f"/ui/jobs/{stored['job']}")  # renders the report it fetched
        download = browser.get(f"/ui/jobs/{stored['job']}/artifacts/{stored['artifact']}")

    assert page.status_code == 200, page.text[-500:]
    assert download.status_code == 200 and download.content == stored["artifact_bytes"]


def test_a_missing_object_is_the_same_404_as_an_unknown_id(
    apis: dict[str, str], stored: dict[str, Any], s3_env: dict[str, str]
) -> None:
    route = f"/v1/jobs/{stored['job']}/artifacts/{{}}/content"
    with client_of(apis["streaming"], s3_env) as c:
        unknown = c.get(route.format("file-unknown"))
    bucket_of(s3_env).delete(stored["artifact_key"])  # behind the service's back

    for api in ("streaming", "presigning"):
        with client_of(apis[api], s3_env) as c:
            gone = c.get(route.format(stored["artifact"]))
        assert (unknown.status_code, gone.status_code) == (404, 404)
        assert gone.json() == {
            "error": {
                "code": unknown.json()["error"]["code"],
                "message": f"No artifact with id {stored['artifact']!r}.",
                "param": "id",
            }
        }


def test_a_failing_store_is_a_500_that_names_nothing_of_it(
    apis: dict[str, str], stored: dict[str, Any], s3_env: dict[str, str], s3_bucket: str
) -> None:
    with client_of(apis["broken"], s3_env) as c:
        response = c.get(f"/v1/files/{stored['dataset']['id']}/content")

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    for secret in (s3_bucket, "127.0.0.1", s3_env["GRAIT_STORAGE_DIR"], "amazonaws"):
        assert secret not in response.text


def test_readyz_checks_the_object_store(apis: dict[str, str]) -> None:
    healthy = httpx.get(apis["streaming"] + "/readyz", timeout=30)
    broken = httpx.get(apis["broken"] + "/readyz", timeout=30)

    assert healthy.status_code == 200 and healthy.json()["checks"]["storage"] == "ok"
    assert broken.status_code == 503
    assert broken.json()["checks"]["storage"] == "unreachable"
    assert "storage" in broken.json()["error"]["message"]


def test_the_worker_reads_the_job_datasets_from_the_bucket(
    stored: dict[str, Any], s3_env: dict[str, str], tmp_path: Path
) -> None:
    """A worker machine shares nothing with the API but the database and the bucket."""
    from app.settings import Settings
    from worker.job_config import load_config

    worker_machine = S3Storage(
        S3Config(**{**bucket_of(s3_env).config.__dict__, "root": tmp_path / "worker-machine"})
    )
    settings = Settings(database_url=s3_env["GRAIT_DATABASE_URL"])

    config = load_config(stored["job"], settings=settings, storage=worker_machine)

    train = Path(config.train.path)
    assert train.is_relative_to(tmp_path / "worker-machine") and train.name == "arc_excerpt.jsonl"
    assert train.read_bytes() == stored["dataset_bytes"]
