"""Every change of a job's status, in one place: queue, claim, lease, finish, requeue-or-fail,
cancel — each with the event row (and, at the end, the webhook outbox row) it owes.

Used by the API (queue, cancel), the worker (claim, lease, finish) and the sweeper
(requeue-or-fail), so the rules live once:

- Every transition is one conditional UPDATE on the state it leaves (status, and the attempt
  number for a running job). Whoever loses a race changes nothing; nobody reads, decides and
  writes in separate steps.
- A running attempt owns the job by its lease: each write it lands renews `heartbeat_at`,
  stamped with the **database's** clock (workers on other hosts may be off by minutes), and
  the sweeper compares with the same clock. An attempt that cannot renew stops itself
  (`Fenced.expired`) before the sweeper may judge it dead.

No FastAPI and no torch here: the worker imports this module.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import case, delete, func, or_, select, update
from sqlalchemy.orm import Session

from app.db import short_session
from app.models import Artifact, Job, JobEvent
from app.settings import Settings
from app.webhooks.outbox import enqueue_terminal

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)
WAITING_STATUSES = (JobStatus.VALIDATING, JobStatus.QUEUED)
ACTIVE_STATUSES = (*WAITING_STATUSES, JobStatus.RUNNING)
TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def db_now(session: Session) -> datetime:
    """The database's clock (UTC): the one clock every host agrees on for leases.

    SQLite's CURRENT_TIMESTAMP has whole seconds, which would date a fresh heartbeat up to a
    second into the past; `strftime('%f')` gives milliseconds.
    """
    if session.get_bind().dialect.name == "sqlite":
        query = select(func.strftime("%Y-%m-%d %H:%M:%f", "now"))
    else:
        query = select(func.now())
    value = session.execute(query).scalar_one()
    if isinstance(value, str):  # a driver that hands the timestamp back as text
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def status_event(
    job_id: str,
    message: str,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    return JobEvent(
        job_id=job_id, type="status", level=level, stage=None, message=message, data=data
    )


# ---- API side -------------------------------------------------------------------------------


def queue(session: Session, job: Job) -> None:
    """validating -> queued, once the spec and its datasets checked out (same transaction)."""
    job.status = JobStatus.QUEUED
    session.add(
        status_event(job.id, "Job validated and queued.", data={"status": JobStatus.QUEUED})
    )


def mark_published(session: Session, job_id: str) -> None:
    """The queue message went out: the sweeper republishes only if no claim follows in time."""
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=db_now(session)))


CancelOutcome = Literal["cancelled", "flagged", "unchanged", "succeeded", "failed"]


def request_cancel(session: Session, job_id: str) -> CancelOutcome:
    """Waiting: cancelled now. Running: flagged; its worker stops at the next step boundary.

    One conditional UPDATE does whichever applies to the status at that instant, so a worker
    claiming (or the sweeper re-queuing) the job at the same moment cannot make the cancel miss
    both cases. `succeeded`/`failed`: too late (the caller answers 409); `unchanged`: already
    cancelled, or running and already flagged. The caller commits.
    """
    waiting = Job.status.in_(WAITING_STATUSES)

    def when_waiting(value: Any, otherwise: Any) -> Any:
        return case((waiting, value), else_=otherwise)

    message = "Cancelled before it started."
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_(ACTIVE_STATUSES),
            ~((Job.status == JobStatus.RUNNING) & Job.cancel_requested.is_(True)),
        )
        .values(
            cancel_requested=True,
            status=when_waiting(JobStatus.CANCELLED, Job.status),
            error_code=when_waiting("cancelled", Job.error_code),
            error_message=when_waiting(message, Job.error_message),
            finished_at=when_waiting(db_now(session), Job.finished_at),
            stage=when_waiting(None, Job.stage),
            eta_seconds=when_waiting(None, Job.eta_seconds),
        )
        .returning(Job.status)
    ).first()
    if row is not None and row.status == JobStatus.CANCELLED:
        session.add(
            status_event(
                job_id, "Job cancelled before it started.", data={"status": JobStatus.CANCELLED}
            )
        )
        enqueue_terminal(
            session, job_id=job_id, status=JobStatus.CANCELLED, error=("cancelled", message)
        )
        return "cancelled"
    if row is not None:
        session.add(
            status_event(
                job_id,
                "Cancel requested; the job stops at the next step boundary.",
                data={"status": JobStatus.RUNNING, "cancel_requested": True},
            )
        )
        return "flagged"
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        return JobStatus(status).value  # type: ignore[return-value]
    return "unchanged"


# ---- worker side ----------------------------------------------------------------------------


def claim(job_id: str, *, worker_name: str, settings: Settings) -> int | None:
    """queued -> running for this worker; the new attempt number, or None if not ours to run."""
    with short_session(settings) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.QUEUED:
            return None
        now = db_now(session)
        attempt = job.attempts + 1
        won = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.attempts == job.attempts)
            .values(
                status=JobStatus.RUNNING,
                attempts=attempt,
                worker=worker_name,
                heartbeat_at=now,
                started_at=job.started_at or now,
                eta_seconds=None,
            )
        ).rowcount
        if not won:
            return None
        resumed = " (resuming from the last completed stage)" if attempt > 1 else ""
        session.add(
            status_event(
                job_id,
                f"Started on {worker_name}, attempt {attempt} of {settings.max_attempts}{resumed}.",
                data={"status": JobStatus.RUNNING, "attempt": attempt, "worker": worker_name},
            )
        )
        return attempt


def fair_order(session: Session, queue: str) -> list[str]:
    """The head (oldest queued job) of each tenant waiting on one queue, in turn order.

    The tenant with the fewest running jobs goes first; among equals, the one whose last job
    started longest ago (never: first); then the one waiting longest. So a tenant with 100
    queued jobs gets one start, then every other waiting tenant gets one, and so on. One job
    per tenant suffices: each claim starts one job, and the next claim looks again.
    """
    # Rows from before queues were recorded have none: any worker may take them.
    waiting = (Job.status == JobStatus.QUEUED) & or_(Job.queue == queue, Job.queue.is_(None))
    oldest = dict(
        session.execute(
            select(Job.tenant_id, func.min(Job.created_at)).where(waiting).group_by(Job.tenant_id)
        ).all()
    )
    if not oldest:
        return []
    tenants = list(oldest)
    running = dict(
        session.execute(
            select(Job.tenant_id, func.count())
            .where(Job.status == JobStatus.RUNNING, Job.tenant_id.in_(tenants))
            .group_by(Job.tenant_id)
        ).all()
    )
    last_start = dict(
        session.execute(
            select(Job.tenant_id, func.max(Job.started_at))
            .where(Job.tenant_id.in_(tenants), Job.started_at.is_not(None))
            .group_by(Job.tenant_id)
        ).all()
    )
    never = datetime.min.replace(tzinfo=UTC)

    def aware(at: datetime | None) -> datetime:
        return never if at is None else at if at.tzinfo else at.replace(tzinfo=UTC)

    turns = sorted(
        tenants,
        key=lambda t: (running.get(t, 0), aware(last_start.get(t)), aware(oldest[t]), t),
    )
    heads = []
    for tenant in turns:
        head = session.scalar(
            select(Job.id)
            .where(waiting, Job.tenant_id == tenant)
            .order_by(Job.created_at, Job.id)
            .limit(1)
        )
        if head is not None:
            heads.append(head)
    return heads


def claim_next(hint: str, *, worker_name: str, settings: Settings) -> tuple[str, int] | None:
    """Claim the queued job whose turn it is for this worker's class: (job id, attempt).

    A queue message is a turn, not an assignment (`hint` is the job it was sent for, taken
    when it is next in line). Every queued job has sent one message, so each message that
    starts a job leaves one for every job still waiting; a message that finds nothing queued
    is a duplicate and does nothing.
    """
    with short_session(settings) as session:
        order = fair_order(session, settings.worker_queue)
    if order and order[0] != hint:
        log.info("message for job %s: job %s is next in line", hint, order[0])
    for job_id in order:
        attempt = claim(job_id, worker_name=worker_name, settings=settings)
        if attempt is not None:
            return job_id, attempt
    return None


class Fenced:
    """The claim of one attempt on a job: which job, which attempt, and its lease.

    Every fenced write that lands renews the lease. When none has landed for the stale
    window less two heartbeats (the database unreachable, say), the lease expires: the
    attempt stops by itself at its next step, around when the sweeper may judge it dead and
    start another attempt, instead of computing on beside it. (Each attempt has its own run
    folder and artifact keys and every write is fenced, so a step of overlap changes nothing
    a user sees.) The lease's length is measured on this host's monotonic clock; its stamp
    (`heartbeat_at`) is the database's.
    """

    def __init__(self, job_id: str, attempt: int, settings: Settings):
        self.job_id = job_id
        self.attempt = attempt
        self.settings = settings
        self.lost = threading.Event()
        self.lease_seconds = max(
            settings.stale_after_seconds - 2 * settings.heartbeat_seconds,
            settings.stale_after_seconds / 2,
        )
        self.renewed = time.monotonic()

    def expired(self) -> bool:
        """True once the lease ran out (and from then on: `lost` is set)."""
        if not self.lost.is_set() and time.monotonic() - self.renewed > self.lease_seconds:
            log.error(
                "job %s attempt %s: no write landed for %.0f s; giving the job up (the "
                "sweeper may re-queue it elsewhere)",
                self.job_id,
                self.attempt,
                self.lease_seconds,
            )
            self.lost.set()
        return self.lost.is_set()

    def update_job(self, session: Session, **values: Any) -> bool:
        """One write fenced on (running, this attempt) that also renews the lease."""
        result = session.execute(
            update(Job)
            .where(
                Job.id == self.job_id,
                Job.status == JobStatus.RUNNING,
                Job.attempts == self.attempt,
            )
            .values(heartbeat_at=db_now(session), **values)
        )
        if result.rowcount == 0:
            self.lost.set()
            return False
        self.renewed = time.monotonic()
        return True

    def write(
        self, *, job_values: dict[str, Any] | None = None, events: list[JobEvent] | None = None
    ) -> bool:
        if self.lost.is_set():
            return False
        with short_session(self.settings) as session:
            ok = self.update_job(session, **(job_values or {}))
            if ok and events:
                session.add_all(events)
            return ok


def finish(
    fence: Fenced,
    *,
    status: JobStatus,
    error: tuple[str, str] | None = None,
    artifacts: list[Artifact] | None = None,
    data: dict[str, Any] | None = None,
    warnings: list[dict[str, Any]] | None = None,
) -> bool:
    """running -> succeeded / failed / cancelled for this attempt only; artifacts become current.

    False when the attempt had lost the job (re-queued, cancelled): then nothing changes.
    """
    values: dict[str, Any] = {"status": status, "eta_seconds": None}
    if status == JobStatus.SUCCEEDED:
        values.update(percent=100.0, stage=None)
    if error:
        values.update(error_code=error[0], error_message=error[1])
    if warnings is not None:
        values["warnings"] = warnings
    codes = sorted({w["code"] for w in warnings or []})
    if status == JobStatus.SUCCEEDED:
        message = f"Job succeeded with warnings: {', '.join(codes)}." if codes else "Job succeeded."
    elif status == JobStatus.CANCELLED:
        message = "Job cancelled at a step boundary."
    else:
        message = f"Job failed: {error[1] if error else 'unknown error'}"
    with short_session(fence.settings) as session:
        if not fence.update_job(session, finished_at=db_now(session), **values):
            return False
        if artifacts is not None:
            session.execute(delete(Artifact).where(Artifact.job_id == fence.job_id))
            session.add_all(artifacts)
        enqueue_terminal(session, job_id=fence.job_id, status=status, error=error)
        session.add(
            status_event(
                fence.job_id,
                message,
                level="error" if status == JobStatus.FAILED else "info",
                data={
                    "status": status,
                    **({"error_code": error[0]} if error else {}),
                    **(data or {}),
                },
            )
        )
    return True


# ---- sweeper side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LostAttempt:
    job_id: str
    attempts: int
    cancel_requested: bool
    worker: str | None


def lost_attempts(
    settings: Settings, *, dead_worker: str | None = None, dead_before: datetime | None = None
) -> list[LostAttempt]:
    """Running attempts whose lease ran out on the database's clock, or that `dead_worker`
    held before `dead_before` (a previous life of a restarted worker)."""
    with short_session(settings) as session:
        stale_before = db_now(session) - timedelta(seconds=settings.stale_after_seconds)
        lost_when = [Job.heartbeat_at < stale_before, Job.heartbeat_at.is_(None)]
        if dead_worker and dead_before:
            lost_when.append((Job.worker == dead_worker) & (Job.heartbeat_at < dead_before))
        rows = session.execute(
            select(Job.id, Job.attempts, Job.cancel_requested, Job.worker).where(
                Job.status == JobStatus.RUNNING, or_(*lost_when)
            )
        ).all()
    return [LostAttempt(r.id, r.attempts, bool(r.cancel_requested), r.worker) for r in rows]


def requeue_or_fail(settings: Settings, lost: LostAttempt) -> JobStatus | None:
    """A lost attempt's job: cancelled (a cancel was pending), failed (no attempts left) or
    queued again to resume. None when the attempt was not lost after all (it wrote since)."""
    if lost.cancel_requested:
        status = JobStatus.CANCELLED
        error: tuple[str, str] | None = (
            "cancelled",
            "Cancelled; its worker stopped before confirming.",
        )
        message = "Worker lost while a cancel was pending; job cancelled."
    elif lost.attempts >= settings.max_attempts:
        status = JobStatus.FAILED
        error = (
            "worker_lost",
            f"The worker running this job stopped responding {lost.attempts} time(s); giving up.",
        )
        message = (
            f"Worker {lost.worker} lost; attempt {lost.attempts} of {settings.max_attempts} "
            "was the last."
        )
    else:
        status, error = JobStatus.QUEUED, None
        message = (
            f"Worker {lost.worker} lost during attempt {lost.attempts}; re-queued to resume "
            "from the last completed stage."
        )
    with short_session(settings) as session:
        values: dict[str, Any] = {"status": status, "eta_seconds": None}
        if error:
            values.update(error_code=error[0], error_message=error[1], finished_at=db_now(session))
        else:
            values.update(worker=None, enqueued_at=None)
        changed = session.execute(
            update(Job)
            .where(
                Job.id == lost.job_id,
                Job.status == JobStatus.RUNNING,
                Job.attempts == lost.attempts,
            )
            .values(**values)
        ).rowcount
        if not changed:
            return None
        if error:
            enqueue_terminal(session, job_id=lost.job_id, status=status, error=error)
        session.add(
            status_event(
                lost.job_id,
                message,
                level="error" if status == JobStatus.FAILED else "warning",
                data={
                    "status": status,
                    "attempt": lost.attempts,
                    **({"error_code": error[0]} if error else {}),
                },
            )
        )
    log.warning("job %s: %s", lost.job_id, message)
    return status


def unpublished_jobs(
    settings: Settings, *, requeued: list[str], grace: timedelta, lost_messages: bool
) -> list[str]:
    """Queued jobs whose message may be gone: never sent (after `grace`, or just re-queued),
    sent but unclaimed for `republish_after_seconds`, or every sent one when the broker lost
    its data."""
    with short_session(settings) as session:
        now = db_now(session)
        never_sent = Job.enqueued_at.is_(None) & or_(
            Job.created_at < now - grace, Job.id.in_(requeued)
        )
        sent = Job.enqueued_at.is_not(None)
        unclaimed_before = now - timedelta(seconds=settings.republish_after_seconds)
        unclaimed = sent if lost_messages else sent & (Job.enqueued_at < unclaimed_before)
        return list(
            session.scalars(
                select(Job.id).where(Job.status == JobStatus.QUEUED, or_(never_sent, unclaimed))
            )
        )
