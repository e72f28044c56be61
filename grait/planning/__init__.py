"""Plan a job before launch: per stage, the predicted time and peak memory on a compute class.

Torch-free (model shape from `config.json`, tokens from `tokenizer.json`), so the API can
refuse a job that will not fit before it waits in a queue for a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grait.config import DatasetSpec, JobConfig
from grait.data import load_records, take
from grait.planning.architecture import Architecture
from grait.planning.estimate import Plan, StagePlan, plan_job
from grait.planning.hardware import ComputeClass, compute_classes, load_compute_class
from grait.planning.render import render_plan
from grait.planning.workload import DatasetTokens, TokenCounter, count_tokens
from grait.registry import KNOWN_MODELS, converted_path

__all__ = [
    "Architecture",
    "ComputeClass",
    "DatasetTokens",
    "JobInputs",
    "Plan",
    "PlanError",
    "StagePlan",
    "TokenCounter",
    "compute_classes",
    "count_tokens",
    "job_inputs",
    "load_compute_class",
    "model_dir",
    "plan_config",
    "plan_job",
    "render_plan",
]


class PlanError(ValueError):
    """The job cannot be planned (its model's shape or tokenizer is not readable here)."""


def model_dir(base_model: str) -> Path:
    """Where the base model's config.json and tokenizer.json are, without loading it."""
    path = converted_path(base_model) if base_model in KNOWN_MODELS else Path(base_model)
    if not (path / "config.json").exists():
        hint = (
            "run `grait models prepare` (or the setup script) on this machine"
            if base_model in KNOWN_MODELS
            else "the plan reads a local model folder; a hub id must be downloaded first"
        )
        raise PlanError(f"cannot read the shape of base model {base_model!r}: {hint}")
    return path


@dataclass(frozen=True)
class JobInputs:
    """What a plan reads from disk: the model's shape and the data's token counts."""

    arch: Architecture
    train: DatasetTokens
    evals: list[tuple[str, DatasetTokens]]


def job_inputs(config: JobConfig) -> JobInputs:
    """Read once, plan many times (the calibration's search, several classes)."""
    folder = model_dir(config.base_model)
    try:
        arch = Architecture.from_dir(folder)
        counter = TokenCounter.for_model_dir(folder)
    except (ValueError, OSError) as exc:  # an unreadable config.json or tokenizer.json
        raise PlanError(f"cannot read base model {config.base_model!r}: {exc}") from exc

    def tokens(spec: DatasetSpec) -> DatasetTokens:
        records = take(
            load_records(spec.path, spec.format),
            seed=config.seed,
            shuffle=spec.shuffle,
            offset=spec.offset,
            limit=spec.limit,
        )
        return count_tokens(records, counter, refusal=config.refusal)

    evals = [(spec.label, tokens(spec)) for spec in config.evals]
    return JobInputs(arch, tokens(config.train), evals)


def plan_config(
    config: JobConfig,
    compute_class: str | ComputeClass,
    *,
    known_share: float = 0.5,
    inputs: JobInputs | None = None,
) -> Plan:
    """Plan a job whose dataset paths are readable here (the CLI, the API's stored files)."""
    inputs = inputs or job_inputs(config)
    cls = (
        compute_class
        if isinstance(compute_class, ComputeClass)
        else load_compute_class(compute_class)
    )
    return plan_job(config, inputs.arch, inputs.train, inputs.evals, cls, known_share=known_share)
