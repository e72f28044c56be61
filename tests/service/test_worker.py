"""Jobs through a real Celery worker: success, cancel while running, kill -9, sweeper."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis

from .conftest import Worker, all_events, settings_for, tiny_job, wait_for, wait_for_status
from .test_webhooks import Receiver

STAGE_ORDER = [
    "knowledge_query",
    "warmup",
    "gradient_features",
    "selection",
    "training",
    "evaluation",
]


@pytest.mark.timeout(240)
def test_grait_job_runs_end_to_end_and_its_adapter_loads_with_peft(
    client: httpx.Client,
    datasets: dict[str, str],
    tiny_model: Path,
    worker_control: Worker,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    from app.queue import publish_job

    worker_control.stop()
    spec = tiny_job(tiny_model, datasets, suffix="e2e")
    # A bar no one-epoch tiny model clears: the job succeeds and says it did not learn.
    spec["hyperparameters"]["training"]["fit_check"] = {"min_refusal_learned": 1.0}
    job = client.post("/v1/jobs", json=spec).json()
    assert job["status"] == "queued" and job["warnings"] == []
    publish_job(job["id"], settings_for(service_env))  # a duplicate message must not run it twice
    started = time.monotonic()
    worker_control.ensure_running()

    done = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=180)
    elapsed = time.monotonic() - started

    assert done["status"] == "succeeded", done
    assert (done["percent"], done["attempts"], done["error"], done["eta_seconds"]) == (
        100.0,
        1,
        None,
        None,
    )
    print(f"\nend-to-end job (worker start to succeeded): {elapsed:.1f}s")

    events = all_events(client, job["id"])
    started_stages = [e["stage"] for e in events if e["type"] == "stage_started"]
    assert started_stages == STAGE_ORDER
    knowledge = next(
        e for e in events if e["type"] == "metrics" and e["stage"] == "knowledge_query"
    )["data"]
    assert knowledge["n_ik"] + knowledge["n_idk"] == 32
    assert any(e["type"] == "metrics" and "train_loss" in (e["data"] or {}) for e in events)
    assert any(e["type"] == "progress" for e in events)
    assert [e["data"]["status"] for e in events if e["type"] == "status"] == [
        "queued",
        "running",
        "succeeded",
    ]
    assert [w["code"] for w in done["warnings"]] == ["refusal_not_learned"]
    assert (
        done["warnings"][0]["stage"] == "training"
        and "threshold 100%" in done["warnings"][0]["message"]
    )
    warned = [e for e in events if e["type"] == "warning"]
    assert [(e["level"], e["data"]["code"]) for e in warned] == [("warning", "refusal_not_learned")]
    assert events[-1]["message"] == "Job succeeded with warnings: refusal_not_learned."

    artifacts = {a["kind"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
    assert {"adapter", "report_json", "report_md", "report_plot", "train_set"} <= set(artifacts)

    adapter = client.get(artifacts["adapter"]["download_url"])
    assert adapter.status_code == 200 and adapter.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(adapter.content), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    adapter_dir = next(p.parent for p in tmp_path.rglob("adapter_config.json"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter_dir)
    assert tuned.peft_config["default"].r == 4
    # What vLLM's LoRA support reads (docs/serving.md): a LoRA config with rank, alpha and
    # target modules, and only lora_A/lora_B tensors in adapter_model.safetensors (vLLM
    # rejects adapters carrying full module copies such as modules_to_save).
    from safetensors import safe_open

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert adapter_config["lora_alpha"] and adapter_config["target_modules"]
    assert not adapter_config.get("modules_to_save")
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as tensors:
        names = list(tensors.keys())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)

    report = client.get(artifacts["report_json"]["download_url"]).json()
    assert report["method"] == "grait" and [e["name"] for e in report["evals"]] == [
        "mmlu-id",
        "arc_excerpt",
    ]
    assert client.get(artifacts["report_md"]["download_url"]).text.strip()
    assert client.get(artifacts["report_plot"]["download_url"]).content[:4] == b"\x89PNG"
    rows = [
        json.loads(line)
        for line in client.get(artifacts["train_set"]["download_url"]).text.splitlines()
    ]
    assert rows and all("weight" in row for row in rows)


@pytest.mark.timeout(180)
def test_cancel_of_running_job_stops_at_a_step_boundary(
    client: httpx.Client, datasets: dict[str, str], tiny_model: Path, worker: Worker
) -> None:
    job = client.post("/v1/jobs", json=tiny_job(tiny_model, datasets)).json()
    wait_for(
        lambda: any(e["type"] == "stage_started" for e in all_events(client, job["id"])),
        timeout=90,
        what="the job to start a stage",
    )

    response = client.post(f"/v1/jobs/{job['id']}/cancel").json()

    assert response["cancel_requested"] is True
    assert response["status"] in ("running", "cancelled")
    done = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=60)
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
    messages = [e["message"] for e in all_events(client, job["id"])]
    assert any("stops at the next step boundary" in m for m in messages)
    assert client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"] == []


@pytest.mark.timeout(240)
def test_worker_killed_mid_job_is_resumed_from_the_last_completed_stage(
    client: httpx.Client,
    datasets: dict[str, str],
    tiny_model: Path,
    worker: Worker,
    service_env: dict[str, str],
) -> None:
    receiver = Receiver([])
    job = client.post(
        "/v1/jobs", json=tiny_job(tiny_model, datasets, webhook_url=receiver.url)
    ).json()
    wait_for(
        lambda: any(
            e["type"] == "stage_completed" and e["stage"] == "knowledge_query"
            for e in all_events(client, job["id"])
        ),
        timeout=120,
        what="knowledge_query to complete",
    )

    worker.process.kill9()
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    # Measured: with acks_late the killed worker's message stays unacknowledged in Redis and
    # would only come back after the visibility timeout; the start-up sweep resumes the job.
    broker = redis.Redis.from_url(service_env["GRAIT_BROKER_URL"])
    assert broker.hlen(service_env["GRAIT_BROKER_KEY_PREFIX"] + "unacked") == 1
    worker.ensure_running()  # its start-up sweep finds the attempt its previous life held

    done = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=180)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    events = all_events(client, job["id"])
    assert any(
        e["type"] == "status" and e["data"]["status"] == "queued" and "lost" in e["message"]
        for e in events
    )
    assert any(
        e["type"] == "stage_skipped"
        and e["stage"] == "knowledge_query"
        and "earlier attempt" in e["message"]
        for e in events
    )
    assert [e["stage"] for e in events if e["type"] == "stage_started"].count(
        "knowledge_query"
    ) == 1
    # No duplicates from the dead attempt: each stage completed once, one terminal status,
    # one artifact per kind (and no stray files), one webhook for the one terminal state.
    completed = Counter(e["stage"] for e in events if e["type"] == "stage_completed")
    assert set(completed) == set(STAGE_ORDER) and set(completed.values()) == {1}, completed
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses.count("succeeded") == 1 and statuses[-1] == "succeeded"
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    kinds = [a["kind"] for a in artifacts]
    assert len(kinds) == len(set(kinds)) and "adapter" in kinds
    stored = Path(service_env["GRAIT_STORAGE_DIR"]) / "jobs" / job["id"]
    assert [p.name for p in stored.iterdir()] == ["attempt-2"]  # the dead attempt's: gone
    files = sorted(p.name for p in (stored / "attempt-2").iterdir())
    assert files == sorted(a["filename"] for a in artifacts)
    runs = Path(service_env["GRAIT_RUNS_DIR"]) / job["id"]
    assert [p.name for p in runs.iterdir()] == ["attempt-2"]
    wait_for(lambda: receiver.received, timeout=15, what="the job.succeeded webhook")
    deliveries = client.get(f"/v1/jobs/{job['id']}/webhook_deliveries").json()["data"]
    assert [(d["event_type"], d["status"]) for d in deliveries] == [("job.succeeded", "delivered")]
    assert len(receiver.received) == 1
    receiver.close()


@pytest.mark.timeout(60)
def test_sweeper_fails_a_stale_job_with_worker_lost_after_max_attempts(
    client: httpx.Client, datasets: dict[str, str], service_env: dict[str, str], no_worker: Worker
) -> None:
    from sqlalchemy import update

    from app.db import short_session
    from app.models import Job, utcnow
    from worker.sweeper import sweep

    settings = settings_for(service_env)
    stale = utcnow() - timedelta(seconds=settings.stale_after_seconds + 5)
    requeue, give_up, was_cancelling = (
        client.post("/v1/jobs", json={"train_dataset": datasets["mmlu"]}).json()["id"]
        for _ in range(3)
    )
    with short_session(settings) as session:
        for job_id, attempts, cancel in (
            (requeue, 1, False),
            (give_up, settings.max_attempts, False),
            (was_cancelling, 1, True),
        ):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    status="running",
                    attempts=attempts,
                    worker="gone@host",
                    heartbeat_at=stale,
                    cancel_requested=cancel,
                )
            )

    outcome = sweep(settings)

    assert requeue in outcome["requeued"] and requeue in outcome["republished"]
    assert give_up in outcome["failed"] and outcome["cancelled"] == [was_cancelling]
    assert client.get(f"/v1/jobs/{was_cancelling}").json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{requeue}").json()["status"] == "queued"
    failed = client.get(f"/v1/jobs/{give_up}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert sweep(settings)["failed"] == []  # each transition happens once
    client.post(f"/v1/jobs/{requeue}/cancel")


@pytest.mark.timeout(180)
def test_a_job_whose_message_was_lost_after_delivery_still_runs(
    client: httpx.Client,
    datasets: dict[str, str],
    tiny_model: Path,
    no_worker: Worker,
    service_env: dict[str, str],
) -> None:
    """The message left the broker but no claim committed (a consumer killed in between)."""
    from sqlalchemy import update

    from app.db import short_session
    from app.models import Job, utcnow

    job = client.post(
        "/v1/jobs", json=tiny_job(tiny_model, datasets, method="van", eval_datasets=[])
    ).json()
    broker = redis.Redis.from_url(service_env["GRAIT_BROKER_URL"])
    queue = service_env["GRAIT_BROKER_KEY_PREFIX"] + service_env["GRAIT_QUEUE"] + ".cpu"
    assert broker.llen(queue) >= 1
    broker.delete(queue)  # gone, as a delivered-but-unclaimed message is
    settings = settings_for(service_env)
    with short_session(settings) as session:  # sent longer ago than the republish bound
        session.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(enqueued_at=utcnow() - timedelta(seconds=settings.republish_after_seconds + 1))
        )

    no_worker.ensure_running()
    done = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120)

    assert done["status"] == "succeeded" and done["attempts"] == 1, done
