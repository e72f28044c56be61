"""The README's one-command mode: `python -m app` with SQLite, the embedded queue and worker."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from .conftest import (
    TERMINAL,
    all_events,
    bearer,
    printed_api_key,
    start_embedded_api,
    start_long_job_and_wait_until_training,
    tiny_job,
    upload,
    wait_for,
    wait_for_status,
)

pytestmark = pytest.mark.timeout(240)


def processes_in(folder: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == folder:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_embedded_mode_serves_a_job_with_sqlite_and_no_servers(
    tmp_path: Path, data_dir: Path, tiny_model: Path, logs_dir: Path
) -> None:
    api, base = start_embedded_api(
        tmp_path, logs_dir, name="embedded", GRAIT_BROKER_POLLING_INTERVAL="0.1"
    )
    try:
        assert "http://127.0.0.1:" in api.log()
        assert (tmp_path / "var" / "grait.db").is_file()
        key = printed_api_key(api.log())  # first start: a key for tenant `default`, shown once
        assert httpx.get(base + "/v1/jobs").status_code == 401
        with httpx.Client(base_url=base, timeout=30, headers=bearer(key)) as client:
            ready = client.get("/readyz").json()
            assert ready["checks"] == {
                "database": "ok",
                "broker": "ok",
                "storage": "ok",
                "worker": "ok",
            }
            datasets = {
                key: upload(client, data_dir / name).json()["id"]
                for key, name in (("mmlu", "mmlu_excerpt.csv"), ("arc", "arc_excerpt.jsonl"))
            }
            job = client.post("/v1/jobs", json=tiny_job(tiny_model, datasets)).json()

            done = wait_for_status(client, job["id"], TERMINAL, timeout=180)

            assert done["status"] == "succeeded", done
            assert [
                e["stage"] for e in all_events(client, job["id"]) if e["type"] == "stage_started"
            ][-1] == "evaluation"
            kinds = {
                a["kind"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
            }
            assert {"adapter", "report_json", "report_md", "report_plot", "train_set"} <= kinds
        assert len(processes_in(tmp_path)) == 2  # the API and its worker
    finally:
        api.kill9()  # no clean shutdown: the worker must follow its parent (PR_SET_PDEATHSIG)
    wait_for(
        lambda: not processes_in(tmp_path),
        timeout=30,
        what="the embedded worker to exit with the API",
    )


def test_kill9_of_the_api_mid_job_leaves_no_orphan_and_the_job_resumes_once(
    tmp_path: Path, data_dir: Path, tiny_model: Path, logs_dir: Path
) -> None:
    settings = {"GRAIT_BROKER_POLLING_INTERVAL": "0.1"}
    api, base = start_embedded_api(tmp_path, logs_dir, name="embedded-kill9", **settings)
    key = printed_api_key(api.log())
    try:
        with httpx.Client(base_url=base, timeout=30, headers=bearer(key)) as client:
            datasets = {
                key: upload(client, data_dir / name).json()["id"]
                for key, name in (("mmlu", "mmlu_excerpt.csv"), ("arc", "arc_excerpt.jsonl"))
            }
            job = start_long_job_and_wait_until_training(client, tiny_model, datasets)
    finally:
        api.kill9()
    # The old worker dies with its API at once (SIGKILL), not after finishing the job.
    wait_for(lambda: not processes_in(tmp_path), timeout=5, what="the old tree to be gone")

    api, base = start_embedded_api(tmp_path, logs_dir, name="embedded-kill9-again", **settings)
    try:
        with httpx.Client(base_url=base, timeout=30, headers=bearer(key)) as client:
            done = wait_for_status(client, job["id"], TERMINAL, timeout=200)
            events = all_events(client, job["id"])
            artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    finally:
        api.kill9()
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    completed = [e["stage"] for e in events if e["type"] == "stage_completed"]
    assert len(completed) == len(set(completed)), completed  # each stage completed once
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses.count("succeeded") == 1 and statuses[-1] == "succeeded", statuses
    kinds = [a["kind"] for a in artifacts]
    assert len(kinds) == len(set(kinds)) and "adapter" in kinds
