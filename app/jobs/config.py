"""A job row's spec as the library's `JobConfig`: what the API validates at submit and the
worker runs. Kept apart from the job service so the worker imports it without FastAPI."""

from __future__ import annotations

from typing import Any, get_args

from grait.config import DataFormat, DatasetSpec, JobConfig


def build_job_config(
    *,
    method: str,
    base_model: str,
    seed: int,
    hyperparameters: dict[str, Any],
    datasets: list[tuple[str, str, dict[str, Any]]],
) -> JobConfig:
    """The library's config from a job: `datasets` = [(local path, format, options)], train first."""
    specs = [
        DatasetSpec(path=path, format=_spec_format(fmt), **options)  # type: ignore[arg-type]
        for path, fmt, options in datasets
    ]
    return JobConfig(
        method=method,
        base_model=base_model,
        seed=seed,
        train=specs[0],
        evals=specs[1:],
        **hyperparameters,
    )  # type: ignore[arg-type]


def _spec_format(stored: str) -> str:
    """A stored dataset's format as `DatasetSpec` takes it.

    `grait.config.DataFormat` does not list every reader `grait.data` has (`openai_chat`);
    such a file was validated at upload, and auto-detection names its format again.
    """
    return stored if stored in get_args(DataFormat) else "auto"
