"""Compute classes and fair turns: jobs wait for their class's workers, and a tenant with
many queued jobs does not keep another tenant waiting behind all of them.

The jobs here are for `gpu-l4-24g`, a class only the worker this module starts serves, so
whatever else the session leaves queued for `cpu` cannot change their order.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import Worker, tiny_job, upload, wait_for_status

CLASS = "gpu-l4-24g"


@pytest.fixture()
def l4_worker(service_env: dict[str, str], logs_dir: Path) -> Iterator[Worker]:
    worker = Worker(
        {**service_env, "GRAIT_COMPUTE_CLASS": CLASS},
        logs_dir,
        log_name="worker-l4",
        name="test-worker-l4@%h",
    )
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def other_datasets(other_client: httpx.Client, data_dir: Path) -> dict[str, str]:
    response = upload(other_client, data_dir / "mmlu_excerpt.csv")
    assert response.status_code == 201, response.text
    return {"mmlu": response.json()["id"], "arc": response.json()["id"]}


def _quick(tiny_model: Path, datasets: dict[str, str]) -> dict:
    """A few seconds on the tiny model: vanilla SFT, no evaluation."""
    job = tiny_job(tiny_model, datasets, method="van", eval_datasets=[], compute_class=CLASS)
    job["train_dataset"] = {"id": datasets["mmlu"], "limit": 8}
    return job


def test_a_tenant_with_many_queued_jobs_lets_another_tenant_in_after_one(
    client: httpx.Client,
    other_client: httpx.Client,
    tiny_model: Path,
    datasets: dict[str, str],
    other_datasets: dict[str, str],
    l4_worker: Worker,
) -> None:
    many = [client.post("/v1/jobs", json=_quick(tiny_model, datasets)).json() for _ in range(4)]
    one = other_client.post("/v1/jobs", json=_quick(tiny_model, other_datasets)).json()
    assert all(j["status"] == "queued" and j["compute_class"] == CLASS for j in [*many, one])

    l4_worker.ensure_running()
    wait_for_status(other_client, one["id"], {"succeeded"}, timeout=240)

    started = sorted(
        (job["started_at"], job["id"])
        for job in [client.get(f"/v1/jobs/{j['id']}").json() for j in many]
        if job["started_at"] is not None
    )
    b_start = other_client.get(f"/v1/jobs/{one['id']}").json()["started_at"]
    # B's single job starts within one job of A's first, not after all four (B may even go
    # first: A's jobs from earlier tests make A the tenant that started most recently).
    assert sum(1 for at, _ in started if at < b_start) <= 1
    for job in many:
        client.post(f"/v1/jobs/{job['id']}/cancel")


def test_a_job_waits_for_its_own_class_and_an_unoffered_class_is_refused(
    client: httpx.Client, tiny_model: Path, datasets: dict[str, str], worker: Worker
) -> None:
    waiting = client.post("/v1/jobs", json=_quick(tiny_model, datasets)).json()
    ours = client.post(
        "/v1/jobs", json=tiny_job(tiny_model, datasets, method="van", eval_datasets=[])
    ).json()
    refused = client.post(
        "/v1/jobs", json={**_quick(tiny_model, datasets), "compute_class": "gpu-h100-80g"}
    )

    # The session's worker serves `cpu`: it runs its own job and leaves the L4 one queued.
    assert ours["compute_class"] == "cpu"
    wait_for_status(client, ours["id"], {"succeeded"}, timeout=180)
    assert client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "compute_class_unavailable" and error["param"] == "compute_class"
    assert "cpu, gpu-l4-24g" in error["message"]
    client.post(f"/v1/jobs/{waiting['id']}/cancel")
    offered = {c["id"] for c in client.get("/v1/compute_classes").json()["data"] if c["offered"]}
    assert offered == {"cpu", "gpu-l4-24g"}


def test_a_tenant_behind_hundreds_of_older_jobs_is_next_in_line(
    service_env: dict[str, str],
) -> None:
    """The order itself, on Postgres: 300 of A's jobs queued before B's one."""
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from app.db import make_engine
    from app.jobs.lifecycle import JobStatus, fair_order
    from app.models import Job, Tenant, new_id, utcnow

    queue = f"order-{uuid.uuid4().hex[:8]}"
    engine = make_engine(service_env["GRAIT_DATABASE_URL"], one_shot=True)
    with Session(engine) as session:
        tenants = []
        for name in ("a", "b"):
            tenant = Tenant(id=new_id("ten"), name=f"{queue}-{name}", webhook_secret="x")
            session.add(tenant)
            tenants.append(tenant.id)
        session.flush()
        start = utcnow()

        def job(tenant: str, minutes: int) -> Job:
            return Job(
                id=new_id("job"),
                tenant_id=tenant,
                status=JobStatus.QUEUED,
                method="van",
                base_model="x",
                seed=0,
                hyperparameters={},
                queue=queue,
                created_at=start + timedelta(minutes=minutes),
            )

        a_jobs = [job(tenants[0], k) for k in range(300)]
        b_job = job(tenants[1], 301)
        session.add_all([*a_jobs, b_job])
        session.flush()
        first = fair_order(session, queue)
        a_jobs[0].status, a_jobs[0].started_at = JobStatus.SUCCEEDED, start + timedelta(hours=6)
        session.flush()
        after_one = fair_order(session, queue)
        session.rollback()  # leave nothing behind
    engine.dispose()

    assert first == [a_jobs[0].id, b_job.id]  # neither started yet: the longest waiting first
    assert after_one[0] == b_job.id  # A just had a turn: B's only job goes next
