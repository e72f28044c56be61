"""Pipeline events -> job rows and job events, in short sessions, throttled.

Every write is fenced on (status='running', attempts=N): if a sweeper re-queued this job
because it looked dead, the old attempt's late writes change nothing and it stops itself.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Self

from sqlalchemy import select

from app.db import short_session
from app.jobs.lifecycle import Fenced, JobStatus
from app.models import Job, JobEvent
from grait.events import PipelineEvent

log = logging.getLogger(__name__)


class ProgressReporter:
    """The pipeline's `progress` callback: stage changes and metrics always, progress throttled."""

    def __init__(self, fence: Fenced, stages: tuple[str, ...]):
        self.fence = fence
        self.stages = stages
        self.started = time.monotonic()
        self.start_fraction: float | None = None
        self.last_progress_write = 0.0
        self.last_step_metrics_write = 0.0
        # A stage's summary metrics, kept for its stage_completed event: the checkpoints and
        # trained_tokens of a job are read from those few events, not from every metrics row.
        self.stage_metrics: dict[str, dict[str, Any]] = {}
        self.warnings: list[dict[str, Any]] = []

    def fraction(
        self, stage: str, done: int, total: int, *, completed: bool = False
    ) -> float | None:
        if stage not in self.stages:
            return None
        index = self.stages.index(stage)
        inner = 1.0 if completed else (min(done / total, 1.0) if total > 0 else 0.0)
        return (index + inner) / len(self.stages)

    def _progress_values(self, fraction: float | None) -> dict[str, Any]:
        if fraction is None:
            return {}
        if self.start_fraction is None:
            self.start_fraction = fraction
        values: dict[str, Any] = {"percent": round(100 * fraction, 2)}
        gained = fraction - self.start_fraction
        elapsed = time.monotonic() - self.started
        if gained > 0.005 and elapsed > 1:
            values["eta_seconds"] = elapsed / gained * (1 - fraction)
        return values

    def event(
        self,
        type: str,
        stage: str | None,
        message: str,
        *,
        level: str = "info",
        data: dict | None = None,
    ) -> JobEvent:
        return JobEvent(
            job_id=self.fence.job_id,
            type=type,
            level=level,
            stage=stage,
            message=message,
            data=data,
        )

    def __call__(self, ev: PipelineEvent) -> None:
        try:
            self._handle(ev)
        except Exception:  # progress reporting must never kill a training run
            log.exception("could not record event %s for job %s", ev.kind, self.fence.job_id)

    def _handle(self, ev: PipelineEvent) -> None:
        if ev.kind == "progress":
            now = time.monotonic()
            finished = ev.total > 0 and ev.done >= ev.total
            if (
                not finished
                and now - self.last_progress_write < self.fence.settings.progress_write_seconds
            ):
                return
            self.last_progress_write = now
            values = self._progress_values(self.fraction(ev.stage, ev.done, ev.total))
            message = f"{ev.stage}: {ev.done}/{ev.total}" + (
                f" - {ev.message}" if ev.message else ""
            )
            self.fence.write(
                job_values={"stage": ev.stage, **values},
                events=[
                    self.event(
                        "progress",
                        ev.stage,
                        message,
                        data={"done": ev.done, "total": ev.total, **ev.data},
                    )
                ],
            )
        elif ev.kind == "stage_started":
            values = self._progress_values(self.fraction(ev.stage, 0, 1))
            self.fence.write(
                job_values={"stage": ev.stage, **values},
                events=[self.event("stage_started", ev.stage, ev.message or f"{ev.stage} started")],
            )
        elif ev.kind in ("stage_completed", "stage_skipped"):
            values = self._progress_values(self.fraction(ev.stage, 1, 1, completed=True))
            data = dict(ev.data)
            if ev.kind == "stage_completed" and ev.stage in self.stage_metrics:
                data["metrics"] = self.stage_metrics.pop(ev.stage)
            self.fence.write(
                job_values=values,
                events=[
                    self.event(
                        ev.kind,
                        ev.stage,
                        ev.message or f"{ev.stage} {ev.kind.split('_')[1]}",
                        data=data or None,
                    )
                ],
            )
        elif ev.kind == "metrics":
            # Per-step metrics (a training loss per step) are thinned like progress; a stage's
            # summary metrics (no "step") are always kept.
            if "step" in ev.data:
                now = time.monotonic()
                if now - self.last_step_metrics_write < self.fence.settings.progress_write_seconds:
                    return
                self.last_step_metrics_write = now
            else:
                self.stage_metrics[ev.stage] = dict(ev.data)
            self.fence.write(
                events=[
                    self.event(
                        "metrics", ev.stage, ev.message or f"{ev.stage} metrics", data=ev.data
                    )
                ]
            )
        elif ev.kind == "warning":
            job_values = {}
            code = ev.data.get("code")
            if code:  # a coded warning also shows on the job object while the job runs
                message = ev.message.removeprefix(f"{code}: ")
                self.warnings.append({"code": code, "message": message, "stage": ev.stage})
                job_values["warnings"] = list(self.warnings)
            self.fence.write(
                job_values=job_values,
                events=[
                    self.event(
                        "warning", ev.stage, ev.message, level="warning", data=ev.data or None
                    )
                ],
            )
        else:
            self.fence.write(
                events=[self.event(ev.kind, ev.stage, ev.message, data=ev.data or None)]
            )


class CancelFlag:
    """The pipeline's `should_cancel`: the job's cancel flag (read at most once a second), or
    the attempt's wall-clock deadline passing (`timed_out` tells the two apart)."""

    def __init__(self, fence: Fenced, *, deadline: float | None = None):
        self.fence = fence
        self.deadline = deadline  # time.monotonic() value
        self.last_read = 0.0
        self.cancelled = False
        self.timed_out = False

    def __call__(self) -> bool:
        if self.cancelled or self.timed_out or self.fence.expired():
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
            return True
        now = time.monotonic()
        if now - self.last_read < self.fence.settings.cancel_check_seconds:
            return False
        self.last_read = now
        try:
            with short_session(self.fence.settings) as session:
                row = session.execute(
                    select(Job.cancel_requested, Job.status, Job.attempts).where(
                        Job.id == self.fence.job_id
                    )
                ).one_or_none()
        except Exception:  # a DB blip is not a cancel
            log.exception("could not read the cancel flag of job %s", self.fence.job_id)
            return False
        if row is None or row.status != JobStatus.RUNNING or row.attempts != self.fence.attempt:
            self.fence.lost.set()
            return True
        self.cancelled = bool(row.cancel_requested)
        return self.cancelled


class Heartbeat:
    """Proves the attempt alive every `heartbeat_seconds`, even inside one long step."""

    def __init__(self, fence: Fenced):
        self.fence = fence
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{fence.job_id}", daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.fence.settings.heartbeat_seconds):
            try:
                if not self.fence.write():
                    return
            except Exception:
                log.exception("heartbeat of job %s failed", self.fence.job_id)
            if self.fence.expired():
                return
