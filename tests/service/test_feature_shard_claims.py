"""Claims on a job's feature shards, on Postgres: one holder at a time, a lapsed lease is
taken over, finished shards survive a new attempt, nothing is claimed for a stopped job."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import update

from app.db import short_session
from app.jobs import feature_shards as board
from app.jobs.lifecycle import JobStatus
from app.models import Job, Tenant, new_id

from .conftest import settings_for

SPECS = [{"index": i, "refusals": [i, i + 1], "answers": [0, 0]} for i in range(3)]


@pytest.fixture()
def shard_job(service_env: dict[str, str]) -> Iterator[tuple[object, str]]:
    settings = settings_for({**service_env, "GRAIT_FEATURE_SHARD_LEASE_SECONDS": "5"})
    job_id = new_id("job")
    with short_session(settings) as session:
        tenant = Tenant(id=new_id("ten"), name=f"shards-{uuid.uuid4().hex[:8]}", webhook_secret="x")
        session.add(tenant)
        session.flush()
        session.add(
            Job(
                id=job_id,
                tenant_id=tenant.id,
                status=JobStatus.RUNNING,
                method="grait",
                base_model="x",
                seed=0,
                hyperparameters={},
            )
        )
    yield settings, job_id
    with short_session(settings) as session:
        session.delete(session.get(Job, job_id))  # its shards go with it (ON DELETE CASCADE)


def test_each_shard_has_one_holder_and_done_is_final(shard_job) -> None:
    settings, job_id = shard_job
    assert board.prepare(settings, job_id, SPECS) == 3
    a = board.claim(settings, job_id, "a")
    b = board.claim(settings, job_id, "b")
    assert a is not None and b is not None and {a.shard, b.shard} == {0, 1}
    assert a.spec == SPECS[a.shard]
    assert board.renew(settings, job_id, a.shard, "a")
    assert not board.renew(settings, job_id, a.shard, "b")  # not b's
    assert board.complete(settings, job_id, a.shard, "a", 1.5)
    assert not board.complete(settings, job_id, a.shard, "b", 9.0)  # done stays done
    board.release(settings, job_id, b.shard, "b")  # b cannot compute it: free again at once
    assert board.claim(settings, job_id, "c").shard == b.shard
    rows = {r.shard: r for r in board.states(settings, job_id)}
    assert rows[a.shard].state == "done" and rows[a.shard].seconds == 1.5
    assert rows[a.shard].worker == "a" and rows[b.shard].worker == "c"


def test_a_lapsed_lease_is_taken_over_and_its_holder_learns_it(shard_job) -> None:
    settings, job_id = shard_job
    board.prepare(settings, job_id, SPECS[:1])
    first = board.claim(settings, job_id, "dead")
    assert first is not None and board.claim(settings, job_id, "b") is None
    time.sleep(settings.feature_shard_lease_seconds + 0.5)  # "dead" renews nothing
    second = board.claim(settings, job_id, "b")
    assert second is not None and second.shard == first.shard
    assert not board.renew(settings, job_id, first.shard, "dead")
    assert board.states(settings, job_id)[0].attempts == 2


def test_a_new_attempt_keeps_finished_shards_unless_the_plan_changed(shard_job) -> None:
    settings, job_id = shard_job
    board.prepare(settings, job_id, SPECS)
    claimed = board.claim(settings, job_id, "a")
    board.complete(settings, job_id, claimed.shard, "a", 1.0)
    assert board.prepare(settings, job_id, SPECS) == 2  # the same plan: one already stored
    assert board.prepare(settings, job_id, SPECS[:2]) == 2  # another plan: start over
    assert all(r.state == "pending" for r in board.states(settings, job_id))


def test_the_job_worker_may_leave_fresh_shards_to_others_for_a_while(shard_job) -> None:
    settings, job_id = shard_job
    board.prepare(settings, job_id, SPECS)
    assert board.claim(settings, job_id, "owner", pending_for=60) is None
    assert board.claim(settings, job_id, "helper") is not None


def test_nothing_is_claimed_or_renewed_once_the_job_stopped(shard_job) -> None:
    settings, job_id = shard_job
    board.prepare(settings, job_id, SPECS)
    held = board.claim(settings, job_id, "a")
    with short_session(settings) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.CANCELLED))
    assert board.claim(settings, job_id, "b") is None
    assert not board.renew(settings, job_id, held.shard, "a")
