"""The client commands drive a running service over HTTP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import PYTHON, ROOT, Worker

pytestmark = pytest.mark.timeout(90)


def cli(api_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "app", *args, "--url", api_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_client_commands_upload_submit_list_cancel(
    api_url: str, data_dir: Path, no_worker: Worker
) -> None:
    uploaded = cli(
        api_url, "datasets", "upload", str(data_dir / "mmlu_excerpt.csv"), "--name", "cli-mmlu"
    )
    assert uploaded.returncode == 0, uploaded.stderr
    dataset = json.loads(uploaded.stdout)
    assert dataset["name"] == "cli-mmlu"

    created = cli(
        api_url,
        "jobs",
        "create",
        "--train",
        dataset["id"],
        "--hyperparameters",
        '{"training": {"epochs": 1}}',
    )
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    assert job["status"] == "queued" and job["hyperparameters"]["training"]["epochs"] == 1

    listed = json.loads(cli(api_url, "jobs", "list", "--status", "queued").stdout)
    assert job["id"] in [j["id"] for j in listed]
    assert json.loads(cli(api_url, "jobs", "cancel", job["id"]).stdout)["status"] == "cancelled"
    events = json.loads(cli(api_url, "jobs", "events", job["id"]).stdout)
    assert [e["data"]["status"] for e in events] == ["queued", "cancelled"]


def test_client_reports_service_errors_with_code_and_param(api_url: str) -> None:
    missing = cli(api_url, "jobs", "get", "job-nope")
    assert missing.returncode == 1
    assert "404 not_found [id]" in missing.stderr
    bad = cli(api_url, "jobs", "create", "--train", "ds-nope")
    assert bad.returncode == 1 and "dataset_not_found [train_dataset]" in bad.stderr
