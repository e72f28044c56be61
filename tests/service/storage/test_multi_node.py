"""Many machines: an API and two workers that share only Postgres, Redis and the object store.

Each process has a scratch folder of its own (`GRAIT_STORAGE_DIR` is only its download
cache, `GRAIT_RUNS_DIR` its run folders). A job starts on worker A, A is killed with
`kill -9` mid-training, and worker B, which has never seen the job's files, resumes it from
the last completed stage the store holds; the artifacts then download through the API.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import (
    Worker,
    all_events,
    bearer,
    make_key,
    start_api,
    tiny_job,
    upload,
    wait_for,
    wait_for_status,
)

from .conftest import s3_settings

pytestmark = pytest.mark.timeout(420)


def _node(env: dict[str, str], root: Path, name: str) -> dict[str, str]:
    """One machine's settings: its own cache and run folders under `root/name`."""
    home = root / name
    return {**env, "GRAIT_STORAGE_DIR": str(home / "cache"), "GRAIT_RUNS_DIR": str(home / "runs")}


@pytest.fixture(scope="module")
def cluster(
    service_env: dict[str, str],
    s3_endpoint: str,
    s3_bucket: str,
    logs_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("machines")
    shared = {
        **service_env,
        **s3_settings(s3_endpoint, s3_bucket, root / "unused"),
        # Their own queue and Redis keys: no session worker takes these jobs, and the message
        # worker A holds when it is killed stays out of the session's unacked count.
        "GRAIT_QUEUE": f"nodes-{uuid.uuid4().hex[:8]}",
        "GRAIT_BROKER_KEY_PREFIX": f"grait-nodes-{uuid.uuid4().hex[:8]}:",
    }
    api, url = start_api(_node(shared, root, "api"), logs_dir, name="api-nodes")
    workers = {
        name: Worker(
            _node(shared, root, name), logs_dir, log_name=f"worker-{name}", name=f"{name}@%h"
        )
        for name in ("a", "b")
    }
    key = make_key(shared, "nodes")
    yield {"url": url, "key": key, "workers": workers, "root": root}
    for worker in workers.values():
        worker.stop()
    api.stop()


def test_a_job_killed_on_one_worker_resumes_on_another_from_its_last_stage(
    cluster: dict[str, Any], tiny_model: Path, data_dir: Path
) -> None:
    a, b = cluster["workers"]["a"], cluster["workers"]["b"]
    with httpx.Client(base_url=cluster["url"], headers=bearer(cluster["key"]), timeout=30) as c:
        mmlu = upload(c, data_dir / "mmlu_excerpt.csv").json()["id"]
        spec = tiny_job(tiny_model, {"mmlu": mmlu, "arc": mmlu})
        spec["hyperparameters"]["training"]["epochs"] = 25  # long enough to be cut off
        a.ensure_running()
        job = c.post("/v1/jobs", json=spec).json()
        wait_for(
            lambda: any(
                e["type"] == "progress" and e["stage"] == "training"
                for e in all_events(c, job["id"])
            ),
            timeout=180,
            what="the job to be training on worker A",
        )
        assert c.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 1
        a.process.kill9()  # no shutdown, no message: the machine is gone

        b.ensure_running()  # B's sweeper finds A's job stale and re-queues it; B claims it
        done = wait_for_status(c, job["id"], {"succeeded"}, timeout=240)

        assert done["attempts"] == 2
        events = all_events(c, job["id"])
        second = [e for e in events if e["type"] == "stage_skipped" and "earlier" in e["message"]]
        # Every stage before training came from the store: B's own disk never had them.
        assert {e["stage"] for e in second} == {
            "knowledge_query",
            "warmup",
            "gradient_features",
            "selection",
        }
        assert not (cluster["root"] / "b" / "runs" / job["id"] / "attempt-1").exists()
        artifacts = c.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        adapter = next(x for x in artifacts if x["kind"] == "adapter")
        download = c.get(f"/v1/jobs/{job['id']}/artifacts/{adapter['id']}/content")
        assert download.status_code == 200 and download.content[:2] == b"\x1f\x8b"  # gzip


def test_the_stored_manifest_is_the_one_the_pipeline_writes() -> None:
    from grait.pipeline import MANIFEST as PIPELINE_MANIFEST
    from worker.checkpoints import MANIFEST

    assert MANIFEST == PIPELINE_MANIFEST
