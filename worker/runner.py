"""Run one job attempt: claim it, run the pipeline in its run directory, record the outcome.

The claim is a conditional UPDATE (queued -> running, attempts + 1), so a duplicate message
(Redis redelivery, a sweeper re-queue) finds nothing to claim and returns. A re-queued job
runs in the same `runs_dir/<job id>`, where the pipeline skips stages already completed.
"""

from __future__ import annotations

import logging
import re
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.db import short_session
from app.jobs.lifecycle import Fenced, JobStatus, claim_next, finish
from app.models import Artifact, Job, new_id
from app.settings import Settings
from app.storage import Storage, get_storage
from grait.data import DataError
from grait.events import Cancelled
from worker.job_config import load_config
from worker.progress import CancelFlag, Heartbeat, ProgressReporter

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    "adapter": "application/gzip",
    "report_json": "application/json",
    "report_md": "text/markdown; charset=utf-8",
    "report_plot": "image/png",
    "train_set": "application/x-ndjson",
    "selection": "application/x-ndjson",
    "answers": "application/x-ndjson",
    "operating_point": "application/json",
    "operating_point_plot": "image/png",
}


def time_limit(job_id: str, settings: Settings) -> int:
    """Seconds this attempt may run: the job's own limit within the server's."""
    with short_session(settings) as session:
        own = session.scalar(select(Job.time_limit_seconds).where(Job.id == job_id))
    return min(own or settings.max_job_seconds, settings.max_job_seconds)


# An absolute path (two or more segments) in an error message: the server's layout.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"():,/]+/)+([^\s'\"():,/]*)")


def scrub_paths(message: str) -> str:
    """Keep a path's last part (`train.jsonl`) and drop where it lives on the server."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "<dir>", message)


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """(error code, message) a client can act on; no server paths in the message."""
    code, message = _classify(exc)
    return code, scrub_paths(message)


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, DataError):
        return "invalid_dataset", str(exc)
    name = type(exc).__name__
    text = str(exc).lower()
    if (
        isinstance(exc, MemoryError)
        or name == "OutOfMemoryError"
        or "out of memory" in text
        # torch's CPU allocator: "DefaultCPUAllocator: can't allocate memory: you tried to ..."
        or "can't allocate memory" in text
        or "not enough memory" in text
        or "cannot allocate memory" in text
    ):
        return (
            "out_of_memory",
            f"{name}: {exc}. Lower training.batch_size / knowledge.batch_size or use a smaller model.",
        )
    return "internal_error", f"{name}: {exc}"


def attempt_prefix(job_id: str, attempt: int) -> str:
    """Where one attempt's artifacts go: a lost attempt's files never overwrite the current."""
    return f"jobs/{job_id}/attempt-{attempt}"


def store_artifacts(
    job_id: str, suffix: str | None, result: Any, *, storage: Storage, attempt: int
) -> list[Artifact]:
    rows = []
    stem = f"{job_id}-{suffix}" if suffix else job_id
    for kind, path in result.artifacts.items():
        path = Path(path)
        if not path.exists():
            continue
        if path.is_dir():
            archive = path.parent / f"{path.name}.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(path, arcname=f"{stem}-{path.name}")
            path, filename = archive, f"{stem}-{kind}.tar.gz"
        else:
            filename = f"{stem}-{path.name}"
        key = f"{attempt_prefix(job_id, attempt)}/{filename}"
        content_type = CONTENT_TYPES.get(kind, "application/octet-stream")
        size = storage.put_file(key, path, content_type=content_type)
        rows.append(
            Artifact(
                id=new_id("file"),
                job_id=job_id,
                kind=kind,
                filename=filename,
                content_type=content_type,
                bytes=size,
                storage_key=key,
            )
        )
    return rows


def attempt_run_dir(
    runs_dir: Path, job_id: str, attempt: int, *, storage: Storage | None = None
) -> tuple[Path, bool]:
    """This attempt's own run folder, seeded with the completed stages of the latest earlier
    attempt (hard links), so it resumes there without sharing a folder with an attempt that
    may still be running somewhere. With no earlier folder on this disk, `storage`'s stage
    checkpoints (an attempt that ran on another machine) seed it instead; the flag says so."""
    from grait.pipeline import copy_completed_stages
    from worker.checkpoints import restore

    root = runs_dir / job_id
    run_dir = root / f"attempt-{attempt}"
    # The job's folder itself: run folders from before attempts had their own.
    earlier = [root / f"attempt-{k}" for k in range(attempt - 1, 0, -1)] + [root]
    for source in earlier:
        if copy_completed_stages(source, run_dir):
            return run_dir, False
    shutil.rmtree(run_dir, ignore_errors=True)
    restored = restore(job_id, run_dir, storage) if storage is not None and attempt > 1 else []
    if restored:
        log.info("job %s: restored %s from the stored checkpoints", job_id, ", ".join(restored))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, bool(restored)


def _drop_other_attempts(
    job_id: str, attempt: int, *, settings: Settings, storage: Storage
) -> None:
    """After this attempt's fenced finish: earlier attempts' folders and files are garbage."""
    for k in range(1, attempt):
        storage.delete_prefix(attempt_prefix(job_id, k))
        shutil.rmtree(settings.runs_dir / job_id / f"attempt-{k}", ignore_errors=True)


def run_job(message_job_id: str, *, worker_name: str, settings: Settings) -> str:
    """Run the queued job whose turn it is (the message's own job, or a fairer one)."""
    claimed = claim_next(message_job_id, worker_name=worker_name, settings=settings)
    if claimed is None:
        log.info(
            "nothing queued for class %s; skipping (a duplicate message)", settings.compute_class
        )
        return "skipped"
    job_id, attempt = claimed
    fence = Fenced(job_id, attempt, settings)
    storage = get_storage(settings)
    limit = time_limit(job_id, settings)
    flag = CancelFlag(fence, deadline=time.monotonic() + limit)
    try:
        # The heartbeat (and with it the lease) covers everything from here: the first
        # import of torch in a cold worker (seconds, more on a busy CPU) as much as storing
        # the artifacts and the finish.
        with Heartbeat(fence):
            from grait.pipeline import RunDirConflict, adopt_run_dir, run_pipeline, stages_for
            from worker.checkpoints import CheckpointUploader, fan_out
            from worker.feature_shards import coordinate

            shared = storage if settings.checkpoints_in_storage else None
            run_dir, from_store = attempt_run_dir(
                settings.runs_dir, job_id, attempt, storage=shared
            )
            config = load_config(job_id, settings=settings, storage=storage)
            if from_store:  # another machine's stages of this job: its dataset paths differ
                adopt_run_dir(run_dir, config)
            stages = tuple(
                s for s in stages_for(config.method) if s != "evaluation" or config.evals
            )
            reporter: Any = ProgressReporter(fence, stages)
            if shared is not None:
                reporter = fan_out(reporter, CheckpointUploader(job_id, run_dir, shared, fence))

            def in_shards() -> bool:
                """Stage 2b over the class's free workers, when the job is large enough."""
                return coordinate(
                    job_id,
                    config,
                    run_dir,
                    settings=settings,
                    storage=storage,
                    worker=worker_name,
                    progress=reporter,
                    should_cancel=flag,
                )

            def run_all() -> Any:
                return run_pipeline(
                    config,
                    run_dir,
                    progress=reporter,
                    should_cancel=flag,
                    compute_class=settings.compute_class,
                    elsewhere={"gradient_features": in_shards},
                )

            try:
                result = run_all()
            except RunDirConflict:
                # The folder holds another spec's stages (e.g. storage moved): start clean.
                shutil.rmtree(run_dir, ignore_errors=True)
                result = run_all()
            if fence.expired():
                raise Cancelled("the attempt lost its lease")
            with short_session(settings) as session:
                suffix = session.scalar(select(Job.suffix).where(Job.id == job_id))
            artifacts = store_artifacts(job_id, suffix, result, storage=storage, attempt=attempt)
            finished = finish(
                fence,
                status=JobStatus.SUCCEEDED,
                artifacts=artifacts,
                data={"timings": result.timings},
                warnings=result.warnings,
            )
        if not finished:
            storage.delete_prefix(attempt_prefix(job_id, attempt))
            log.warning("job %s attempt %s lost its claim before finishing", job_id, attempt)
            return "lost"
        _drop_other_attempts(job_id, attempt, settings=settings, storage=storage)
        if settings.checkpoints_in_storage:
            from worker.checkpoints import checkpoint_prefix

            storage.delete_prefix(checkpoint_prefix(job_id))
        return "succeeded"
    except Cancelled:
        if fence.lost.is_set():
            log.warning("job %s attempt %s lost its claim; stopping quietly", job_id, attempt)
            return "lost"
        if flag.timed_out:
            message = (
                f"The job ran past its time limit of {limit} s "
                "(time_limit_seconds, at most GRAIT_MAX_JOB_SECONDS) and was stopped."
            )
            finish(fence, status=JobStatus.FAILED, error=("time_limit_exceeded", message))
            return "failed"
        finish(
            fence,
            status=JobStatus.CANCELLED,
            error=("cancelled", "Cancelled by request at a step boundary."),
        )
        return "cancelled"
    except Exception as exc:
        if fence.expired():  # e.g. the database went away: not this job's failure
            log.warning("job %s attempt %s lost its lease (%s); stopping", job_id, attempt, exc)
            return "lost"
        log.exception("job %s failed", job_id)
        finish(fence, status=JobStatus.FAILED, error=classify_failure(exc))
        return "failed"
