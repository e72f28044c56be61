"""Completed stages in the object store, so an attempt on another machine resumes from them.

A run folder lives on the worker's own disk (`GRAIT_RUNS_DIR`). When workers share only the
database, the broker and an object store, each completed stage is uploaded too: a tar of its
folder, then the run's manifest, which lists the completed stages and so goes last (a stage
in the manifest always has its tar). An attempt that finds no earlier run folder on its own
disk restores the stages from there and the pipeline skips them as usual.

Only the attempt that holds the job's lease uploads, so a lost attempt still computing
somewhere cannot overwrite what the current one restores.
"""

from __future__ import annotations

import json
import logging
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from app.jobs.lifecycle import Fenced
from app.storage import ObjectNotFound, Storage
from grait.events import STAGES, PipelineEvent

# grait.pipeline's manifest file (not imported from there: that module loads torch)
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints"


class CheckpointUploader:
    """A progress callback: on each `stage_completed`, the stage's folder and the manifest."""

    def __init__(self, job_id: str, run_dir: Path, storage: Storage, fence: Fenced):
        self.prefix = checkpoint_prefix(job_id)
        self.run_dir = run_dir
        self.storage = storage
        self.fence = fence

    def __call__(self, event: PipelineEvent) -> None:
        # The evaluation is the last stage: its outputs are published as artifacts instead.
        if event.kind != "stage_completed" or event.stage in (None, "evaluation"):
            return
        if self.fence.expired():
            return
        folder = self.run_dir / event.stage
        with tempfile.TemporaryDirectory(dir=self.run_dir) as tmp:
            archive = Path(tmp) / f"{event.stage}.tar"
            with tarfile.open(archive, "w") as tar:  # features are float16: gzip gains little
                if folder.is_dir():
                    tar.add(folder, arcname=event.stage)
            self.storage.put_file(f"{self.prefix}/{event.stage}.tar", archive, move=True)
        self.storage.put_file(f"{self.prefix}/{MANIFEST}", self.run_dir / MANIFEST)
        log.info("checkpoint of %s stored", event.stage)


def restore(job_id: str, run_dir: Path, storage: Storage) -> list[str]:
    """Rebuild `run_dir` from the stored checkpoints; the stages restored (none: start clean)."""
    prefix = checkpoint_prefix(job_id)
    try:
        manifest = json.loads(storage.fetch(f"{prefix}/{MANIFEST}").read_text())
    except ObjectNotFound:
        return []
    run_dir.mkdir(parents=True, exist_ok=True)
    done = [stage for stage in STAGES if stage in manifest.get("stages", {})]
    for stage in done:
        archive = storage.fetch(f"{prefix}/{stage}.tar")
        with tarfile.open(archive) as tar:
            tar.extractall(run_dir, filter="data")  # refuses links and paths out of run_dir
    tmp = run_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(run_dir / MANIFEST)  # last: the stages above are complete before it claims them
    return done


def fan_out(*callbacks: Callable[[PipelineEvent], None]) -> Callable[[PipelineEvent], None]:
    def call(event: PipelineEvent) -> None:
        for callback in callbacks:
            callback(event)

    return call
