"""Many machines: an API and two workers that share only Postgres, Redis and the object store.

Each process has a scratch folder of its own (`GRAIT_STORAGE_DIR` is only its download
cache, `GRAIT_RUNS_DIR` its run folders). A job starts on worker A, A is killed with
`kill -9` mid-training, and worker B, which has never seen the job's files, resumes it from
the last completed stage the store holds; the artifacts then download through the API.
"""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def shard_cluster(
    service_env: dict[str, str],
    s3_endpoint: str,
    s3_bucket: str,
    logs_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """Two workers that shard every job's Stage 2b in shards of one feature batch (8 rows).

    The job's own worker leaves each shard to the other worker for 10 minutes, so every
    shard crosses machines and the test can say which worker computed what.
    """
    root = tmp_path_factory.mktemp("shard-machines")
    shared = {
        **service_env,
        **s3_settings(s3_endpoint, s3_bucket, root / "unused"),
        "GRAIT_QUEUE": f"shards-{uuid.uuid4().hex[:8]}",
        "GRAIT_BROKER_KEY_PREFIX": f"grait-shards-{uuid.uuid4().hex[:8]}:",
        "GRAIT_FEATURE_SHARD_MIN_ROWS": "1",
        "GRAIT_FEATURE_SHARD_ROWS": "8",
        "GRAIT_FEATURE_SHARD_WAIT_SECONDS": "600",
    }
    api, url = start_api(_node(shared, root, "api"), logs_dir, name="api-shards")
    workers = {
        name: Worker(
            _node(shared, root, name), logs_dir, log_name=f"worker-{name}", name=f"{name}@%h"
        )
        for name in ("c", "d")
    }
    key = make_key(shared, "shards")
    yield {"url": url, "key": key, "workers": workers, "root": root}
    for worker in workers.values():
        worker.stop()
    api.stop()


def _selection(client: httpx.Client, job_id: str) -> list[tuple[str, bool, float | None]]:
    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    selection = next(x for x in artifacts if x["kind"] == "selection")
    text = client.get(f"/v1/jobs/{job_id}/artifacts/{selection['id']}/content").text
    rows = [json.loads(line) for line in text.splitlines()]
    return [(r["id"], r["selected"], r["weight"]) for r in rows]


def test_stage_2b_sharded_over_two_workers_selects_what_one_worker_selects(
    shard_cluster: dict[str, Any],
    tiny_model: Path,
    data_dir: Path,
    client: httpx.Client,
    datasets: dict[str, str],
    worker: Worker,
) -> None:
    # One worker, no shards: the session's own service (local storage).
    single = client.post("/v1/jobs", json=tiny_job(tiny_model, datasets)).json()
    wait_for_status(client, single["id"], {"succeeded"}, timeout=240)
    expected = _selection(client, single["id"])

    for name in ("c", "d"):
        shard_cluster["workers"][name].ensure_running()
    with httpx.Client(
        base_url=shard_cluster["url"], headers=bearer(shard_cluster["key"]), timeout=30
    ) as c:
        mmlu = upload(c, data_dir / "mmlu_excerpt.csv").json()["id"]
        arc = upload(c, data_dir / "arc_excerpt.jsonl").json()["id"]
        job = c.post("/v1/jobs", json=tiny_job(tiny_model, {"mmlu": mmlu, "arc": arc})).json()
        wait_for_status(c, job["id"], {"succeeded"}, timeout=300)
        events = all_events(c, job["id"])
        owner = next(e["data"]["worker"] for e in events if (e["data"] or {}).get("worker"))
        metrics = next(
            e["data"]
            for e in events
            if e["type"] == "metrics" and e["stage"] == "gradient_features"
        )
        # 32 questions and their kept known ones, 8 rows per shard: several shards, all of them
        # computed by the worker that did not run the job.
        assert metrics["shards"] >= 4
        assert metrics["refusal_rows"] == 32
        assert len(metrics["workers"]) == 1 and metrics["workers"][0] != owner
        assert len(metrics["shard_seconds"]) == metrics["shards"]
        sharded = _selection(c, job["id"])
    assert [(i, s) for i, s, _ in sharded] == [(i, s) for i, s, _ in expected]
    assert [w for *_, w in sharded] == pytest.approx([w for *_, w in expected], abs=1e-6)
    assert any(s for _, s, _ in sharded)
