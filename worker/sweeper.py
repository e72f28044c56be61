"""No job stays `running` forever: find attempts whose worker died and re-queue or fail them.

Runs once when a worker starts (jobs this very worker name held are dead now, whatever their
heartbeat says) and then every `sweep_interval_seconds` in a background thread (jobs whose
heartbeat is older than `stale_after_seconds` on the database's clock). The transitions are
`app.jobs.lifecycle`'s: conditional UPDATEs on (status, attempts), so several workers
sweeping at once do each transition exactly once.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import select

from app.db import short_session
from app.jobs.lifecycle import (
    JobStatus,
    lost_attempts,
    mark_published,
    requeue_or_fail,
    unpublished_jobs,
)
from app.models import Job
from app.queue import broker_lost_messages, publish_job
from app.settings import Settings

log = logging.getLogger(__name__)

UNPUBLISHED_GRACE = timedelta(seconds=10)


def sweep(
    settings: Settings, *, dead_worker: str | None = None, dead_before: datetime | None = None
) -> dict[str, list[str]]:
    """`dead_worker`/`dead_before`: attempts of that worker name last heard of before this
    process started belong to a previous life of the worker, so they are lost."""
    outcome: dict[str, list[str]] = {
        "requeued": [],
        "failed": [],
        "cancelled": [],
        "republished": [],
    }
    key = {JobStatus.QUEUED: "requeued", JobStatus.FAILED: "failed"}
    for lost in lost_attempts(settings, dead_worker=dead_worker, dead_before=dead_before):
        status = requeue_or_fail(settings, lost)
        if status is not None:
            outcome[key.get(status, "cancelled")].append(lost.job_id)

    # Queued jobs whose message never went out (broker down at submit, or just re-queued
    # above) and, when the broker lost its data (a Redis restart without persistence), every
    # queued job: their messages are gone. A duplicate message is harmless (claims are
    # conditional), a lost one would leave the job queued forever.
    # And queued jobs sent long ago but never claimed: a message can vanish between its
    # delivery and the claim's commit (the embedded transport removes it on delivery; a Redis
    # consumer killed there waits out the visibility timeout). Sending again at most once per
    # `republish_after_seconds` bounds the duplicates.
    lost_messages = broker_lost_messages(settings)
    unpublished = unpublished_jobs(
        settings,
        requeued=outcome["requeued"],
        grace=UNPUBLISHED_GRACE,
        lost_messages=lost_messages,
    )
    if lost_messages and unpublished:
        log.warning(
            "the broker lost its queue (restarted empty); republishing %d queued job(s)",
            len(unpublished),
        )
    queues: dict[str, str | None] = {}
    if unpublished:  # each to its own queue (its class's workers), whoever sweeps
        with short_session(settings) as session:
            rows = session.execute(select(Job.id, Job.queue).where(Job.id.in_(unpublished)))
            queues = {job_id: queue for job_id, queue in rows}
    for job_id in unpublished:
        if publish_job(job_id, settings, queues.get(job_id)):
            with short_session(settings) as session:
                mark_published(session, job_id)
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
