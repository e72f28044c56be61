"""No job stays `running` forever: find attempts whose worker died and re-queue or fail them.

Runs once when a worker starts (jobs this very worker name held are dead now, whatever their
heartbeat says) and then every `sweep_interval_seconds` in a background thread (jobs whose
heartbeat is older than `stale_after_seconds`). Every transition is a conditional UPDATE on
(status, attempts), so several workers sweeping at once do each transition exactly once.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update

from app.db import short_session
from app.models import Job, JobEvent, utcnow
from app.queue import broker_lost_messages, publish_job
from app.settings import Settings
from app.webhooks.outbox import enqueue_terminal

log = logging.getLogger(__name__)

UNPUBLISHED_GRACE = timedelta(seconds=10)


def sweep(
    settings: Settings, *, dead_worker: str | None = None, dead_before: datetime | None = None
) -> dict[str, list[str]]:
    """`dead_worker`/`dead_before`: attempts of that worker name last heard of before this
    process started belong to a previous life of the worker, so they are lost."""
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.stale_after_seconds)
    outcome: dict[str, list[str]] = {
        "requeued": [],
        "failed": [],
        "cancelled": [],
        "republished": [],
    }
    with short_session(settings) as session:
        lost_when = [Job.heartbeat_at < stale_before, Job.heartbeat_at.is_(None)]
        if dead_worker and dead_before:
            lost_when.append((Job.worker == dead_worker) & (Job.heartbeat_at < dead_before))
        candidates = session.execute(
            select(Job.id, Job.attempts, Job.cancel_requested, Job.worker).where(
                Job.status == "running", or_(*lost_when)
            )
        ).all()
    for job_id, attempts, cancel_requested, worker in candidates:
        if cancel_requested:
            status, values, message, key = (
                "cancelled",
                {
                    "error_code": "cancelled",
                    "error_message": "Cancelled; its worker stopped before confirming.",
                    "finished_at": now,
                },
                "Worker lost while a cancel was pending; job cancelled.",
                "cancelled",
            )
        elif attempts >= settings.max_attempts:
            status, values, message, key = (
                "failed",
                {
                    "error_code": "worker_lost",
                    "error_message": f"The worker running this job stopped responding {attempts} time(s); giving up.",
                    "finished_at": now,
                },
                f"Worker {worker} lost; attempt {attempts} of {settings.max_attempts} was the last.",
                "failed",
            )
        else:
            status, values, message, key = (
                "queued",
                {"worker": None, "enqueued_at": None},
                (
                    f"Worker {worker} lost during attempt {attempts}; re-queued to resume from the last completed stage."
                ),
                "requeued",
            )
        with short_session(settings) as session:
            changed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "running", Job.attempts == attempts)
                .values(status=status, eta_seconds=None, **values)
            ).rowcount
            if changed:
                if status != "queued":
                    enqueue_terminal(
                        session,
                        job_id=job_id,
                        status=status,
                        error=(values["error_code"], values["error_message"]),
                    )
                session.add(
                    JobEvent(
                        job_id=job_id,
                        type="status",
                        level="error" if status == "failed" else "warning",
                        stage=None,
                        message=message,
                        data={
                            "status": status,
                            "attempt": attempts,
                            **(
                                {"error_code": values["error_code"]}
                                if "error_code" in values
                                else {}
                            ),
                        },
                    )
                )
        if changed:
            outcome[key].append(job_id)
            log.warning("job %s: %s", job_id, message)

    # Queued jobs whose message never went out (broker down at submit, or just re-queued
    # above) and, when the broker lost its data (a Redis restart without persistence), every
    # queued job: their messages are gone. A duplicate message is harmless (claims are
    # conditional), a lost one would leave the job queued forever.
    # And queued jobs sent long ago but never claimed: a message can vanish between its
    # delivery and the claim's commit (the embedded transport removes it on delivery; a Redis
    # consumer killed there waits out the visibility timeout). Sending again at most once per
    # `republish_after_seconds` bounds the duplicates.
    lost_messages = broker_lost_messages(settings)
    unclaimed_before = now - timedelta(seconds=settings.republish_after_seconds)
    with short_session(settings) as session:
        never_sent = Job.enqueued_at.is_(None) & or_(
            Job.created_at < now - UNPUBLISHED_GRACE, Job.id.in_(outcome["requeued"])
        )
        sent = Job.enqueued_at.is_not(None)
        unclaimed = sent if lost_messages else sent & (Job.enqueued_at < unclaimed_before)
        unpublished = list(
            session.scalars(
                select(Job.id).where(Job.status == "queued", or_(never_sent, unclaimed))
            )
        )
        if lost_messages and unpublished:
            log.warning(
                "the broker lost its queue (restarted empty); republishing %d queued job(s)",
                len(unpublished),
            )
    for job_id in unpublished:
        if publish_job(job_id, settings):
            with short_session(settings) as session:
                session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))
            outcome["republished"].append(job_id)
    return outcome


_stop = threading.Event()


def start_background(
    settings: Settings, *, worker_name: str, process_started: datetime
) -> threading.Thread:
    """Sweep now for jobs `worker_name` held before a restart, then periodically for stale ones."""
    _stop.clear()

    def loop() -> None:
        first = True
        while True:
            try:
                result = sweep(
                    settings,
                    dead_worker=worker_name if first else None,
                    dead_before=process_started,
                )
                if any(result.values()):
                    log.warning("sweep: %s", result)
            except Exception:
                log.exception("sweep failed")
            first = False
            if _stop.wait(settings.sweep_interval_seconds):
                return

    thread = threading.Thread(target=loop, name="job-sweeper", daemon=True)
    thread.start()
    return thread


def stop_background() -> None:
    _stop.set()
