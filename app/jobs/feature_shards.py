"""Who computes which shard of a job's Stage 2b: claims and leases in the `feature_shards` table.

The same rules as the job's own claim (`lifecycle`): every change is one conditional UPDATE
on the state it leaves, stamped with the database's clock. A shard is `pending` until a
worker claims it (`running`, with a lease it renews while it computes), then `done` once its
file is in the object store. A shard whose lease ran out (its worker died) can be claimed
again, so a lost worker costs that shard's time only. Shards are claimed only while their
job is running.

No torch here: a shard's spec is plain JSON (`grait.feature_shards.FeatureShard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from app.db import short_session
from app.jobs.lifecycle import JobStatus, db_now
from app.models import FeatureShard, Job
from app.settings import Settings

PENDING, RUNNING, DONE = "pending", "running", "done"


@dataclass(frozen=True)
class Claimed:
    shard: int
    spec: dict[str, Any]


def _job_running(session: Session, job_id: str) -> bool:
    """Shards are claimed and renewed only while their job runs (not queued, not stopped)."""
    return (
        session.scalar(select(Job.id).where(Job.id == job_id, Job.status == JobStatus.RUNNING))
        is not None
    )


def prepare(settings: Settings, job_id: str, specs: list[dict[str, Any]]) -> int:
    """Rows for this plan, keeping the shards an earlier attempt finished; how many are left.

    A different plan (the settings changed between attempts) starts over: its shards cut
    the batches elsewhere, so the stored ones do not fit.
    """
    with short_session(settings) as session:
        rows = session.scalars(
            select(FeatureShard).where(FeatureShard.job_id == job_id).order_by(FeatureShard.shard)
        ).all()
        if [row.spec for row in rows] != specs:
            session.execute(delete(FeatureShard).where(FeatureShard.job_id == job_id))
            now = db_now(session)
            session.add_all(
                FeatureShard(
                    job_id=job_id, shard=i, spec=spec, state=PENDING, attempts=0, created_at=now
                )
                for i, spec in enumerate(specs)
            )
            return len(specs)
        return sum(1 for row in rows if row.state != DONE)


def claim(
    settings: Settings, job_id: str, worker: str, *, pending_for: float = 0.0
) -> Claimed | None:
    """Take the first shard nobody holds: pending (for at least `pending_for` seconds since
    the plan was made) or running on a lease that ran out."""
    with short_session(settings) as session:
        if not _job_running(session, job_id):
            return None
        now = db_now(session)
        free = or_(
            and_(
                FeatureShard.state == PENDING,
                FeatureShard.created_at <= now - timedelta(seconds=pending_for),
            ),
            and_(FeatureShard.state == RUNNING, FeatureShard.lease_expires_at < now),
        )
        candidates = session.scalars(
            select(FeatureShard.shard)
            .where(FeatureShard.job_id == job_id, free)
            .order_by(FeatureShard.shard)
        ).all()
        for shard in candidates:
            won = session.execute(
                update(FeatureShard)
                .where(FeatureShard.job_id == job_id, FeatureShard.shard == shard, free)
                .values(
                    state=RUNNING,
                    worker=worker,
                    attempts=FeatureShard.attempts + 1,
                    lease_expires_at=now + timedelta(seconds=settings.feature_shard_lease_seconds),
                )
            ).rowcount
            if won:
                spec = session.scalar(
                    select(FeatureShard.spec).where(
                        FeatureShard.job_id == job_id, FeatureShard.shard == shard
                    )
                )
                return Claimed(shard, spec or {})
        return None


def _held(job_id: str, shard: int, worker: str) -> tuple[Any, ...]:
    """The row of a shard this worker holds now (its renewal and its release)."""
    return (
        FeatureShard.job_id == job_id,
        FeatureShard.shard == shard,
        FeatureShard.state == RUNNING,
        FeatureShard.worker == worker,
    )


def renew(settings: Settings, job_id: str, shard: int, worker: str) -> bool:
    """Extend this worker's lease; False when the shard or its job is no longer its to compute
    (the job stopped, or the lease ran out and another worker took the shard)."""
    with short_session(settings) as session:
        if not _job_running(session, job_id):
            return False
        now = db_now(session)
        return bool(
            session.execute(
                update(FeatureShard)
                .where(*_held(job_id, shard, worker))
                .values(
                    lease_expires_at=now + timedelta(seconds=settings.feature_shard_lease_seconds)
                )
            ).rowcount
        )


def complete(settings: Settings, job_id: str, shard: int, worker: str, seconds: float) -> bool:
    """Its file is stored: done. Whoever finishes first marks it; a slower twin (a worker
    whose lease ran out while it still computed) stored the same rows under the same key."""
    with short_session(settings) as session:
        return bool(
            session.execute(
                update(FeatureShard)
                .where(
                    FeatureShard.job_id == job_id,
                    FeatureShard.shard == shard,
                    FeatureShard.state != DONE,
                )
                .values(state=DONE, worker=worker, lease_expires_at=None, seconds=seconds)
            ).rowcount
        )


def release(settings: Settings, job_id: str, shard: int, worker: str) -> None:
    """Give a claimed shard back at once (this worker cannot compute it)."""
    with short_session(settings) as session:
        session.execute(
            update(FeatureShard)
            .where(*_held(job_id, shard, worker))
            .values(state=PENDING, worker=None, lease_expires_at=None)
        )


def states(settings: Settings, job_id: str) -> list[FeatureShard]:
    with short_session(settings) as session:
        rows = session.scalars(
            select(FeatureShard).where(FeatureShard.job_id == job_id).order_by(FeatureShard.shard)
        ).all()
        session.expunge_all()
        return list(rows)


def clear(settings: Settings, job_id: str) -> None:
    """The merged stage is checkpointed: its shards are history."""
    with short_session(settings) as session:
        session.execute(delete(FeatureShard).where(FeatureShard.job_id == job_id))
