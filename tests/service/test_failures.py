"""Failed jobs carry an error code a program can act on."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from grait.data import DataError
from worker.runner import classify_failure

from .conftest import Worker, all_events, tiny_job, upload, wait_for_status


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "out_of_memory",
        ),
        (MemoryError(), "out_of_memory"),
        (DataError("train.jsonl", "missing", line=3, field="question"), "invalid_dataset"),
        (RuntimeError("boom"), "internal_error"),
    ],
)
def test_failures_map_to_actionable_error_codes(exc: BaseException, code: str) -> None:
    assert classify_failure(exc)[0] == code


def test_failure_messages_name_files_not_where_the_server_keeps_them() -> None:
    exc = FileNotFoundError(2, "No such file or directory", "/var/grait/storage/ds-1/train.jsonl")
    code, message = classify_failure(exc)
    assert code == "internal_error" and "/var/grait" not in message and "train.jsonl" in message
    data = DataError("/srv/runs/job-1/data/train.csv", "unreadable CSV", line=3)
    assert "/srv" not in classify_failure(data)[1] and "train.csv" in classify_failure(data)[1]
    assert classify_failure(RuntimeError("ratio 1/2 at https://x.org/a/b"))[1].endswith(
        "ratio 1/2 at https://x.org/a/b"
    )


@pytest.mark.timeout(120)
def test_job_whose_dataset_file_vanished_fails_with_invalid_dataset(
    client: httpx.Client,
    data_dir: Path,
    datasets: dict[str, str],
    tiny_model: Path,
    service_env: dict[str, str],
    worker_control: Worker,
) -> None:
    own = upload(client, data_dir / "mmlu_excerpt.csv").json()["id"]
    worker_control.stop()  # the file goes after the submit, before a worker reads it
    job = client.post("/v1/jobs", json=tiny_job(tiny_model, datasets, train_dataset=own)).json()
    for file in (Path(service_env["GRAIT_STORAGE_DIR"]) / "datasets" / own).iterdir():
        file.unlink()  # storage lost the file behind the service's back
    worker_control.ensure_running()

    done = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=90)

    assert done["status"] == "failed"
    assert done["error"]["code"] == "invalid_dataset" and "no such file" in done["error"]["message"]
    assert service_env["GRAIT_STORAGE_DIR"] not in done["error"]["message"]
    assert "/" not in done["error"]["message"].split("no such file")[0], done["error"]
    last = all_events(client, job["id"])[-1]
    assert (last["level"], last["data"]["error_code"]) == ("error", "invalid_dataset")


def test_a_submit_naming_a_dataset_whose_file_vanished_is_refused(
    client: httpx.Client,
    data_dir: Path,
    datasets: dict[str, str],
    tiny_model: Path,
    service_env: dict[str, str],
) -> None:
    own = upload(client, data_dir / "mmlu_excerpt.csv").json()["id"]
    for file in (Path(service_env["GRAIT_STORAGE_DIR"]) / "datasets" / own).iterdir():
        file.unlink()

    response = client.post("/v1/jobs", json=tiny_job(tiny_model, datasets, train_dataset=own))

    assert response.status_code == 422
    assert response.json()["error"] == {
        "code": "dataset_not_found",
        "message": f"Dataset {own!r} has lost its stored file; upload it again.",
        "param": "train_dataset",
    }


@pytest.mark.timeout(120)
def test_a_job_over_its_time_limit_fails_with_its_own_code(
    client: httpx.Client, datasets: dict[str, str], tiny_model: Path, worker: Worker
) -> None:
    job = client.post(
        "/v1/jobs", json={**tiny_job(tiny_model, datasets), "time_limit_seconds": 1}
    ).json()
    assert job["time_limit_seconds"] == 1

    done = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=90)

    assert done["status"] == "failed", done
    assert done["error"]["code"] == "time_limit_exceeded" and "1 s" in done["error"]["message"]
    last = all_events(client, job["id"])[-1]
    assert (last["level"], last["data"]["error_code"]) == ("error", "time_limit_exceeded")


def test_a_time_limit_over_the_servers_is_422_naming_the_field(
    client: httpx.Client, datasets: dict[str, str], tiny_model: Path
) -> None:
    before = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    for value, wanted in ((10**9, "at most 86400"), (0, "greater than or equal to 1")):
        response = client.post(
            "/v1/jobs", json={**tiny_job(tiny_model, datasets), "time_limit_seconds": value}
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "time_limit_seconds" and wanted in error["message"], error
    assert client.get("/v1/jobs", params={"limit": 100}).json()["data"] == before
