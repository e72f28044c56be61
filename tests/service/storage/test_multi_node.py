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
    settings_for,
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


def _start_cluster(
    env: dict[str, str], root: Path, logs_dir: Path, tag: str, workers: tuple[str, ...]
) -> dict[str, Any]:
    """An API and workers as separate processes on their own queue and Redis keys, so no
    session worker takes their jobs and what a killed worker holds stays out of the session's
    unacked count."""
    shared = {
        **env,
        "GRAIT_QUEUE": f"{tag}-{uuid.uuid4().hex[:8]}",
        "GRAIT_BROKER_KEY_PREFIX": f"grait-{tag}-{uuid.uuid4().hex[:8]}:",
    }
    api, url = start_api(_node(shared, root, "api"), logs_dir, name=f"api-{tag}")
    nodes = {
        name: Worker(
            _node(shared, root, name), logs_dir, log_name=f"worker-{name}", name=f"{name}@%h"
        )
        for name in workers
    }
    key = make_key(shared, tag)
    return {"url": url, "key": key, "workers": nodes, "root": root, "env": shared, "api": api}


def _stop_cluster(cluster: dict[str, Any]) -> None:
    for worker in cluster["workers"].values():
        worker.stop()
    cluster["api"].stop()


@pytest.fixture(scope="module")
def cluster(
    service_env: dict[str, str],
    s3_endpoint: str,
    s3_bucket: str,
    logs_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("machines")
    env = {**service_env, **s3_settings(s3_endpoint, s3_bucket, root / "unused")}
    started = _start_cluster(env, root, logs_dir, "nodes", ("a", "b"))
    yield started
    _stop_cluster(started)


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
    env = {
        **service_env,
        **s3_settings(s3_endpoint, s3_bucket, root / "unused"),
        "GRAIT_FEATURE_SHARD_MIN_ROWS": "1",
        "GRAIT_FEATURE_SHARD_ROWS": "8",
        "GRAIT_FEATURE_SHARD_WAIT_SECONDS": "600",
        "GRAIT_FEATURE_SHARD_LEASE_SECONDS": "5",
    }
    started = _start_cluster(env, root, logs_dir, "shards", ("c", "d"))
    yield started
    _stop_cluster(started)


def _selection(client: httpx.Client, job_id: str) -> list[tuple[str, bool, float | None]]:
    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    selection = next(x for x in artifacts if x["kind"] == "selection")
    text = client.get(f"/v1/jobs/{job_id}/artifacts/{selection['id']}/content").text
    rows = [json.loads(line) for line in text.splitlines()]
    return [(r["id"], r["selected"], r["weight"]) for r in rows]


@pytest.fixture(scope="module")
def one_worker_selection(
    tiny_model: Path, api_url: str, api_key: str, datasets: dict[str, str], worker_control: Worker
) -> list[tuple[str, bool, float | None]]:
    """The job's selection on one worker, no shards: the session's own service (local storage)."""
    worker_control.ensure_running()
    with httpx.Client(base_url=api_url, headers=bearer(api_key), timeout=30) as client:
        single = client.post("/v1/jobs", json=tiny_job(tiny_model, datasets)).json()
        wait_for_status(client, single["id"], {"succeeded"}, timeout=240)
        return _selection(client, single["id"])


def _submit(c: httpx.Client, tiny_model: Path, data_dir: Path) -> str:
    mmlu = upload(c, data_dir / "mmlu_excerpt.csv").json()["id"]
    arc = upload(c, data_dir / "arc_excerpt.jsonl").json()["id"]
    return c.post("/v1/jobs", json=tiny_job(tiny_model, {"mmlu": mmlu, "arc": arc})).json()["id"]


def _owner(events: list[dict[str, Any]]) -> str:
    return next(e["data"]["worker"] for e in events if (e["data"] or {}).get("worker"))


def _features_metrics(events: list[dict[str, Any]]) -> dict[str, Any]:
    return next(
        e["data"] for e in events if e["type"] == "metrics" and e["stage"] == "gradient_features"
    )


def test_stage_2b_sharded_over_two_workers_selects_what_one_worker_selects(
    shard_cluster: dict[str, Any],
    tiny_model: Path,
    data_dir: Path,
    one_worker_selection: list[tuple[str, bool, float | None]],
) -> None:
    for name in ("c", "d"):
        shard_cluster["workers"][name].ensure_running()
    with httpx.Client(
        base_url=shard_cluster["url"], headers=bearer(shard_cluster["key"]), timeout=30
    ) as c:
        job_id = _submit(c, tiny_model, data_dir)
        wait_for_status(c, job_id, {"succeeded"}, timeout=300)
        events = all_events(c, job_id)
        metrics = _features_metrics(events)
        # 32 questions and their kept known ones, 8 rows per shard: several shards, all of them
        # computed by the worker that did not run the job.
        assert metrics["shards"] >= 4
        assert metrics["refusal_rows"] == 32
        assert len(metrics["workers"]) == 1 and metrics["workers"][0] != _owner(events)
        assert len(metrics["shard_seconds"]) == len(metrics["shard_workers"]) == metrics["shards"]
        sharded = _selection(c, job_id)
    expected = one_worker_selection
    assert [(i, s) for i, s, _ in sharded] == [(i, s) for i, s, _ in expected]
    assert [w for *_, w in sharded] == pytest.approx([w for *_, w in expected], abs=1e-6)
    assert any(s for _, s, _ in sharded)


def test_a_shard_whose_worker_is_killed_is_taken_over_by_another(
    shard_cluster: dict[str, Any],
    tiny_model: Path,
    data_dir: Path,
    logs_dir: Path,
    one_worker_selection: list[tuple[str, bool, float | None]],
) -> None:
    from app.jobs import feature_shards as board

    settings = settings_for(shard_cluster["env"])
    workers = shard_cluster["workers"]
    for name in ("c", "d"):
        workers[name].ensure_running()
    late = Worker(
        _node(shard_cluster["env"], shard_cluster["root"], "e"),
        logs_dir,
        log_name="worker-e",
        name="e@%h",
    )
    try:
        with httpx.Client(
            base_url=shard_cluster["url"], headers=bearer(shard_cluster["key"]), timeout=30
        ) as c:
            job_id = _submit(c, tiny_model, data_dir)
            wait_for(
                lambda: any(r.state == "running" for r in board.states(settings, job_id)),
                timeout=180,
                what="a worker to hold a feature shard",
            )
            held = next(r for r in board.states(settings, job_id) if r.state == "running")
            holder = held.worker
            owner = _owner(all_events(c, job_id))
            assert holder != owner  # the job's worker leaves the shards to others (wait 600 s)
            victim = workers[holder.split("@")[0]]
            victim.process.kill9()  # mid-shard: its claim stays, its lease runs out in 5 s

            late.ensure_running()  # takes the invitations left, then the lapsed shard
            wait_for_status(c, job_id, {"succeeded"}, timeout=300)
            metrics = _features_metrics(all_events(c, job_id))
            # Every shard was computed by someone. Which one finished the held shard is a race
            # (a tiny shard can complete between the read and the kill), so it is not asserted.
            assert None not in metrics["shard_workers"]
            assert len(metrics["shard_workers"]) == metrics["shards"]
            assert any(w.startswith("e@") for w in metrics["workers"])
            assert board.states(settings, job_id) == []  # merged: the shard rows are gone
            sharded = _selection(c, job_id)
    finally:
        late.stop()
    assert [(i, s) for i, s, _ in sharded] == [(i, s) for i, s, _ in one_worker_selection]
