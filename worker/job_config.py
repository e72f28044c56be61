"""A job row as the library's `JobConfig`, with its datasets fetched to this machine.

Shared by the job's own attempt (`worker.runner`) and the workers that help with its feature
shards (`worker.feature_shards`): both must build the same spec from the same row.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from app.db import short_session
from app.jobs.config import build_job_config
from app.models import Dataset, Job
from app.settings import Settings
from app.storage import ObjectNotFound, Storage
from grait.config import JobConfig
from grait.data import DataError


def load_config(job_id: str, *, settings: Settings, storage: Storage) -> JobConfig:
    with short_session(settings) as session:
        job = session.scalar(
            select(Job).where(Job.id == job_id).options(selectinload(Job.datasets))
        )
        assert job is not None
        stored = []
        for link in job.datasets:
            dataset = session.get(Dataset, link.dataset_id) if link.dataset_id else None
            if dataset is None:
                raise DataError(f"dataset #{link.position}", "the dataset was deleted")
            stored.append((dataset.storage_key, dataset.filename, dataset.format, link.options))
        method, base_model, seed = job.method, job.base_model, job.seed
        hyperparameters = job.hyperparameters
    # Outside the session: an object store's download may take a while.
    specs = []
    for key, filename, fmt, options in stored:
        try:
            path = storage.fetch(key)
        except ObjectNotFound:  # lost behind the service's back
            raise DataError(filename, "no such file or folder") from None
        specs.append((str(path), fmt, options))
    return build_job_config(
        method=method,
        base_model=base_model,
        seed=seed,
        hyperparameters=hyperparameters,
        datasets=specs,
    )
