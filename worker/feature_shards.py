"""Stage 2b over every free worker of a job's class: the job's worker coordinates, others help.

When Stage 2b is due (the warm-up is done and checkpointed to the object store), the job's
own attempt writes the shard plan into `feature_shards` rows and invites the class's workers
(`app.queue.invite_shard_workers`). Every worker that takes an invitation, and the job's own
worker alongside them, claims shards one at a time: it computes the shard from the stored
warm-up, stores the shard's file and marks it done. Once all are done the job's worker
merges them into the stage the unsharded run would have written (identical rows: shards
are whole batches of the same order, `grait.feature_shards`), checkpoints it, and the
pipeline goes on from there.

What keeps this safe with at-most-once delivery and workers that die: the rows, not the
messages, say what is left. A shard whose worker stopped renewing its lease is claimed
again; a shard finished by an earlier attempt of the job is kept; the job's own worker
computes whatever nobody else takes, so the stage never waits on an absent worker.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.db import short_session
from app.jobs import feature_shards as board
from app.models import Job
from app.queue import invite_shard_workers
from app.settings import Settings
from app.storage import Storage, get_storage
from grait.config import JobConfig
from grait.events import Cancelled, PipelineEvent, ProgressCallback

log = logging.getLogger(__name__)
SHARDS_DIR = "feature_shards"  # inside a run folder, beside the stages
POLL_SECONDS = 0.5


def shard_key(job_id: str, shard: int) -> str:
    return f"{shard_prefix(job_id)}/{shard}.tar"


def shard_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/feature_shards"


def sharding_enabled(settings: Settings, config: JobConfig) -> bool:
    """Other workers can help only if they can read the warm-up from the storage."""
    return (
        settings.feature_shard_min_rows > 0
        and settings.checkpoints_in_storage
        and config.uses_features
    )


class _ShardLease:
    """The progress callback of a shard's computation: renews its lease now and then; once a
    renewal fails (the job stopped, or another worker took the shard) the shard stops."""

    def __init__(self, settings: Settings, job_id: str, shard: int, worker: str):
        self.settings, self.job_id, self.shard, self.worker = settings, job_id, shard, worker
        self.every = settings.feature_shard_lease_seconds / 4
        self.renewed = time.monotonic()
        self.lost = False

    def __call__(self, event: PipelineEvent) -> None:
        if self.lost or time.monotonic() - self.renewed < self.every:
            return
        if board.renew(self.settings, self.job_id, self.shard, self.worker):
            self.renewed = time.monotonic()
        else:
            self.lost = True


def compute_and_store(
    job_id: str,
    claimed: board.Claimed,
    compute: Callable[..., Any],
    run_dir: Path,
    *,
    settings: Settings,
    storage: Storage,
    worker: str,
    should_cancel: Callable[[], bool],
) -> bool:
    """Compute a claimed shard (`compute`: `grait.pipeline.feature_shard_computer`) into
    `run_dir/feature_shards/<i>`, store it, mark it done.

    False when the shard was no longer this worker's to finish (job stopped, lease lost).
    """
    from grait.feature_shards import FeatureShard

    shard = FeatureShard.from_json(claimed.spec)
    lease = _ShardLease(settings, job_id, shard.index, worker)
    out = run_dir / SHARDS_DIR / str(shard.index)
    started = time.monotonic()
    try:
        compute(shard, out, progress=lease, should_cancel=lambda: lease.lost or should_cancel())
    except Cancelled:
        if lease.lost:
            log.info("job %s shard %s: no longer ours; dropped", job_id, shard.index)
            return False
        board.release(settings, job_id, shard.index, worker)
        raise
    except BaseException:
        board.release(settings, job_id, shard.index, worker)
        raise
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        archive = Path(tmp) / "shard.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(out, arcname=str(shard.index))
        storage.put_file(shard_key(job_id, shard.index), archive, move=True)
    seconds = round(time.monotonic() - started, 2)
    board.complete(settings, job_id, shard.index, worker, seconds)
    log.info("job %s: feature shard %s done in %.1f s", job_id, shard.index, seconds)
    return True


def coordinate(
    job_id: str,
    config: JobConfig,
    run_dir: Path,
    *,
    settings: Settings,
    storage: Storage,
    worker: str,
    progress: ProgressCallback,
    should_cancel: Callable[[], bool],
) -> bool:
    """The job's own attempt, when Stage 2b is due (`run_pipeline(elsewhere=...)`): the
    stage in shards, merged into the run folder. False (nothing done) when sharding is off
    or the job is too small: the stage then runs in the attempt as usual."""
    from grait.feature_shards import read_shard_meta
    from grait.pipeline import (
        feature_shard_computer,
        feature_shard_plan,
        merge_feature_shards,
    )

    if not sharding_enabled(settings, config):
        return False
    shards, rows = feature_shard_plan(config, run_dir, settings.feature_shard_rows)
    if len(shards) < 2 or rows < settings.feature_shard_min_rows:
        return False
    left = board.prepare(settings, job_id, [s.to_json() for s in shards])
    with short_session(settings) as session:
        queue = session.scalar(select(Job.queue).where(Job.id == job_id))
    invited = invite_shard_workers(job_id, left, queue or settings.worker_queue, settings)
    progress(
        PipelineEvent(
            "stage_started",
            "gradient_features",
            message=f"{rows} feature rows in {len(shards)} shards ({len(shards) - left} "
            f"already stored); {invited} workers of the class invited",
        )
    )
    started = time.monotonic()
    reported = -1
    with ExitStack() as opened:
        compute = None  # opened at this worker's first shard: it may compute none
        while True:
            if should_cancel():
                raise Cancelled("cancelled during gradient_features")
            claimed = board.claim(
                settings, job_id, worker, pending_for=settings.feature_shard_wait_seconds
            )
            if claimed is not None:
                if compute is None:
                    compute = opened.enter_context(feature_shard_computer(config, run_dir))
                compute_and_store(
                    job_id,
                    claimed,
                    compute,
                    run_dir,
                    settings=settings,
                    storage=storage,
                    worker=worker,
                    should_cancel=should_cancel,
                )
                continue
            rows_now = board.states(settings, job_id)
            done = sum(1 for r in rows_now if r.state == board.DONE)
            if done != reported:
                progress(
                    PipelineEvent("progress", "gradient_features", done=done, total=len(shards))
                )
                reported = done
            if done == len(shards):
                break
            time.sleep(POLL_SECONDS)
    folders = []
    for shard in shards:
        folder = run_dir / SHARDS_DIR / str(shard.index)
        if read_shard_meta(folder) is None:  # computed elsewhere
            shutil.rmtree(folder, ignore_errors=True)
            with tarfile.open(storage.fetch(shard_key(job_id, shard.index))) as tar:
                tar.extractall(run_dir / SHARDS_DIR, filter="data")
        folders.append(folder)
    workers = sorted({r.worker for r in rows_now if r.worker})
    merge_feature_shards(
        config,
        run_dir,
        folders,
        shards,
        seconds=round(time.monotonic() - started, 2),
        progress=progress,  # its stage_completed stores the merged stage's checkpoint
        workers=workers,
        shard_seconds=[r.seconds for r in rows_now],
        shard_workers=[r.worker for r in rows_now],  # who computed each (a takeover shows)
    )
    shutil.rmtree(run_dir / SHARDS_DIR, ignore_errors=True)
    storage.delete_prefix(shard_prefix(job_id))
    board.clear(settings, job_id)
    return True


def help_with_shards(job_id: str, *, worker: str, settings: Settings) -> int:
    """An invitation taken: claim and compute this job's shards until none is free.

    The run folder up to the warm-up comes from the stored checkpoints, once per turn.
    Returns how many shards this worker computed.
    """
    from grait.pipeline import adopt_run_dir, feature_shard_computer
    from worker.checkpoints import restore
    from worker.job_config import load_config

    storage = get_storage(settings)
    folder = settings.runs_dir / job_id / "feature-shard-helper"
    compute = None
    computed = 0
    try:
        with ExitStack() as opened:
            while (claimed := board.claim(settings, job_id, worker)) is not None:
                if compute is None:
                    try:
                        config = load_config(job_id, settings=settings, storage=storage)
                        shutil.rmtree(folder, ignore_errors=True)
                        if "warmup" not in restore(job_id, folder, storage):
                            raise RuntimeError("the job's warm-up checkpoint is not in the store")
                        adopt_run_dir(folder, config)
                        compute = opened.enter_context(feature_shard_computer(config, folder))
                    except BaseException:
                        board.release(settings, job_id, claimed.shard, worker)
                        raise
                if compute_and_store(
                    job_id,
                    claimed,
                    compute,
                    folder,
                    settings=settings,
                    storage=storage,
                    worker=worker,
                    should_cancel=lambda: False,  # the lease says when to stop
                ):
                    computed += 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return computed
