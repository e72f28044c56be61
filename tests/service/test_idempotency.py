"""Idempotency-Key on the four create routes: a retry returns the original, never a second one."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .conftest import Worker

pytestmark = pytest.mark.timeout(60)


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def count(client: httpx.Client, path: str) -> int:
    return len(client.get(path, params={"limit": 100}).json()["data"])


def test_job_retry_with_the_same_key_returns_the_original_job(
    client: httpx.Client, datasets: dict[str, str], no_worker: Worker
) -> None:
    headers = key()
    body = {"train_dataset": datasets["mmlu"], "seed": 1}
    before = count(client, "/v1/jobs")
    first = client.post("/v1/jobs", json=body, headers=headers)
    again = client.post("/v1/jobs", json=dict(reversed(body.items())), headers=headers)

    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert (
        again.headers["idempotent-replayed"] == "true"
        and "idempotent-replayed" not in first.headers
    )
    assert count(client, "/v1/jobs") == before + 1

    different = client.post("/v1/jobs", json={**body, "seed": 2}, headers=headers)
    assert different.status_code == 409
    error = different.json()["error"]
    assert (error["code"], error["param"]) == ("idempotency_key_reused", "Idempotency-Key")
    assert first.json()["id"] in error["message"]
    assert count(client, "/v1/jobs") == before + 1
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")


def test_concurrent_retries_create_one_job(
    client: httpx.Client, datasets: dict[str, str], no_worker: Worker
) -> None:
    headers = key()
    before = count(client, "/v1/jobs")
    with ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(
                lambda _: client.post(
                    "/v1/jobs", json={"train_dataset": datasets["mmlu"]}, headers=headers
                ),
                range(6),
            )
        )
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert count(client, "/v1/jobs") == before + 1
    client.post(f"/v1/jobs/{responses[0].json()['id']}/cancel")


def test_keys_are_per_tenant_and_a_failed_request_does_not_use_up_its_key(
    client: httpx.Client, other_client: httpx.Client, datasets: dict[str, str], no_worker: Worker
) -> None:
    headers = key()
    bad = client.post("/v1/jobs", json={"train_dataset": "ds-missing"}, headers=headers)
    assert bad.status_code == 422
    good = client.post("/v1/jobs", json={"train_dataset": datasets["mmlu"]}, headers=headers)
    assert good.status_code == 201
    # The other tenant's identical key is its own: no 409, no access to alpha's job.
    theirs = other_client.post(
        "/v1/jobs", json={"train_dataset": datasets["mmlu"]}, headers=headers
    )
    assert theirs.status_code == 422 and theirs.json()["error"]["code"] == "dataset_not_found"
    client.post(f"/v1/jobs/{good.json()['id']}/cancel")
    too_long = client.post(
        "/v1/jobs", json={"train_dataset": datasets["mmlu"]}, headers={"Idempotency-Key": "k" * 256}
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "invalid_idempotency_key"


def test_dataset_upload_retry_returns_the_original_dataset(
    client: httpx.Client, data_dir: Path
) -> None:
    headers = key()
    path = data_dir / "arc_excerpt.jsonl"
    before = count(client, "/v1/datasets")

    def send(name: str = "arc") -> httpx.Response:
        with path.open("rb") as fh:  # a new multipart boundary each time
            return client.post(
                "/v1/datasets",
                files={"file": (path.name, fh)},
                data={"name": name},
                headers=headers,
            )

    first, again = send(), send()
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert count(client, "/v1/datasets") == before + 1
    other = send(name="renamed")
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert count(client, "/v1/datasets") == before + 1
    client.delete(f"/v1/datasets/{first.json()['id']}")


def test_openai_file_and_fine_tuning_job_retries_return_the_originals(
    client: httpx.Client, data_dir: Path, datasets: dict[str, str], no_worker: Worker
) -> None:
    path = data_dir / "arc_excerpt.jsonl"
    file_headers = key()

    def upload() -> httpx.Response:
        with path.open("rb") as fh:
            return client.post(
                "/v1/files",
                files={"file": (path.name, fh)},
                data={"purpose": "fine-tune"},
                headers=file_headers,
            )

    first_file, again_file = upload(), upload()
    assert first_file.status_code == again_file.status_code == 200
    assert again_file.json()["id"] == first_file.json()["id"]

    job_headers = key()
    body = {"model": "smollm2-135m-instruct", "training_file": first_file.json()["id"]}
    before = count(client, "/v1/fine_tuning/jobs")
    first = client.post("/v1/fine_tuning/jobs", json=body, headers=job_headers)
    again = client.post("/v1/fine_tuning/jobs", json=body, headers=job_headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert count(client, "/v1/fine_tuning/jobs") == before + 1
    conflict = client.post(
        "/v1/fine_tuning/jobs", json={**body, "suffix": "other"}, headers=job_headers
    )
    assert conflict.status_code == 409
    assert conflict.json()["error"]["type"] == "invalid_request_error"
    assert conflict.json()["error"]["code"] == "idempotency_key_reused"
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")
