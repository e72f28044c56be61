"""The client commands drive a running service over HTTP."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from .conftest import PYTHON, ROOT, Worker

pytestmark = pytest.mark.timeout(90)


def cli(api_url: str, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "app", *args, "--url", api_url, *(["--api-key", key] if key else [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_client_commands_upload_submit_list_cancel(
    api_url: str, api_key: str, data_dir: Path, no_worker: Worker
) -> None:
    run = functools.partial(cli, key=api_key)
    uploaded = run(
        api_url, "datasets", "upload", str(data_dir / "mmlu_excerpt.csv"), "--name", "cli-mmlu"
    )
    assert uploaded.returncode == 0, uploaded.stderr
    dataset = json.loads(uploaded.stdout)
    assert dataset["name"] == "cli-mmlu"

    created = run(
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

    listed = json.loads(run(api_url, "jobs", "list", "--status", "queued").stdout)
    assert job["id"] in [j["id"] for j in listed]
    assert json.loads(run(api_url, "jobs", "cancel", job["id"]).stdout)["status"] == "cancelled"
    events = json.loads(run(api_url, "jobs", "events", job["id"]).stdout)
    assert [e["data"]["status"] for e in events] == ["queued", "cancelled"]


def test_client_reports_service_errors_with_code_and_param(api_url: str, api_key: str) -> None:
    missing = cli(api_url, "jobs", "get", "job-nope", key=api_key)
    assert missing.returncode == 1
    assert "404 not_found [id]" in missing.stderr
    bad = cli(api_url, "jobs", "create", "--train", "ds-nope", key=api_key)
    assert bad.returncode == 1 and "dataset_not_found [train_dataset]" in bad.stderr
    unauthenticated = cli(api_url, "jobs", "list")
    assert unauthenticated.returncode == 1 and "401 missing_api_key" in unauthenticated.stderr


def test_keys_create_list_revoke_and_only_a_hash_is_stored(
    api_url: str, service_env: dict[str, str]
) -> None:
    from sqlalchemy import create_engine, text

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in service_env.items() if k != "GRAIT_API_KEY"}
        return subprocess.run(
            [PYTHON, "-m", "app", "keys", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    created = json.loads(keys("create", "--tenant", "cli-team", "--name", "ci", "--json").stdout)
    assert created["key"].startswith("gk_") and created["webhook_secret"].startswith("whsec_")
    assert created["key"].startswith(created["prefix"]) and len(created["key"]) > 40
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert httpx.get(f"{api_url}/v1/jobs", headers=headers).status_code == 200

    listed = json.loads(keys("list", "--tenant", "cli-team", "--json").stdout)
    assert [(k["id"], k["prefix"], k["revoked_at"]) for k in listed] == [
        (created["id"], created["prefix"], None)
    ]
    assert created["key"] not in keys("list").stdout
    engine = create_engine(service_env["GRAIT_DATABASE_URL"])
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT key_hash FROM api_keys WHERE id = :id"), {"id": created["id"]}
        ).scalar_one()
    engine.dispose()
    assert stored == hashlib.sha256(created["key"].encode()).hexdigest()

    assert keys("revoke", created["prefix"]).returncode == 0
    refused = httpx.get(f"{api_url}/v1/jobs", headers=headers)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert json.loads(keys("list", "--tenant", "cli-team", "--json").stdout)[0]["revoked_at"]
    assert keys("revoke", "key-unknown").returncode == 1
