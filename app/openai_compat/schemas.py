"""OpenAI's shapes for our objects: requests in, `file` / `fine_tuning.job` / events out.

Ids are shared with the native API (a fine-tune file is a dataset `ds-…`, a result file is a
job artifact `file-…`, a job is `job-…`), so nothing maps ids and both faces see one record.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from app.jobs.schemas import HYPERPARAMETER_GROUPS, DatasetInput, Text
from app.models import Artifact, Dataset, Job, JobEvent
from grait.config import JobConfig, TrainingConfig
from grait.events import STAGES
from grait.methods import METHOD_NAMES as GRAIT_METHODS
from grait.methods import method_spec

DEFAULT_LEARNING_RATE: float = TrainingConfig.model_fields["learning_rate"].default

# OpenAI method types -> grait methods: every method of the library's table under its own
# name, and OpenAI's `supervised` for vanilla tuning (grait's `van`).
METHOD_TYPES: dict[str, str] = {**{name: name for name in GRAIT_METHODS}, "supervised": "van"}
METHOD_NAMES = {"van": "supervised"}  # grait method -> the type we report
DEFAULT_METHOD = "random-idk"  # = grait.config's default
MethodType = Literal[tuple(METHOD_TYPES)]  # type: ignore[valid-type]
Auto = Literal["auto"]


# ---- requests ------------------------------------------------------------------------------


class OpenAIHyperparameters(BaseModel):
    """OpenAI's three knobs; `auto` (or absent) = grait's default."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto | None = Field(
        None, description="-> training.epochs (default auto: 3, more for small sets)."
    )
    batch_size: int | Auto | None = Field(None, description="-> training.batch_size (default 16).")
    learning_rate_multiplier: float | Auto | None = Field(
        None,
        description=f"Multiplies training.learning_rate (default {DEFAULT_LEARNING_RATE}).",
    )


MethodHyperparameters = create_model(  # type: ignore[call-overload]
    "MethodHyperparameters",
    __base__=OpenAIHyperparameters,
    __doc__="OpenAI's three knobs plus every grait.config group (knowledge, lora, ... evaluation).",
    **{
        name: (JobConfig.model_fields[name].annotation | None, None)
        for name in HYPERPARAMETER_GROUPS
    },
)


class MethodSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: MethodHyperparameters = Field(default_factory=MethodHyperparameters)  # type: ignore[valid-type]
    eval_files: list[DatasetInput] = Field(
        default_factory=list,
        max_length=15,
        description="Out-of-distribution eval file ids (or {id, limit, offset, shuffle, name}).",
    )


class _MethodBase(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: MethodType

    @model_validator(mode="after")
    def _only_the_chosen_block(self) -> Method:
        for name, field in type(self).model_fields.items():
            key = field.alias or name
            if key not in ("type", self.type) and getattr(self, name) is not None:
                raise ValueError(f"method.{key} is given but method.type is {self.type!r}")
        return self

    @property
    def settings(self) -> MethodSettings:
        return getattr(self, self.type.replace("-", "_")) or MethodSettings()


# One optional settings block per method type, named as the type (`random-idk` -> field
# `random_idk` with that alias), so the blocks follow METHOD_TYPES.
Method = create_model(  # type: ignore[call-overload]
    "Method",
    __base__=_MethodBase,
    __doc__='`{"type": "grait", "grait": {"hyperparameters": {...}, "eval_files": [...]}}`.',
    **{
        name.replace("-", "_"): (
            MethodSettings | None,
            Field(None, alias=name) if "-" in name else None,
        )
        for name in METHOD_TYPES
    },
)


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Base model: alias from GET /v1/models, local HF dir or hub id.")
    training_file: Text
    validation_file: Text | None = Field(None, description="The in-distribution eval set.")
    suffix: Text | None = None
    seed: int | None = Field(None, description="Default 0 (grait runs are seeded).")
    metadata: dict[str, str] | None = None
    hyperparameters: OpenAIHyperparameters | None = None
    method: Method | None = Field(  # type: ignore[valid-type]
        None, description=f'Absent = `{{"type": "{DEFAULT_METHOD}"}}` with grait\'s defaults.'
    )
    integrations: list[Any] | None = Field(None, max_length=0, description="Not supported.")


# ---- responses -----------------------------------------------------------------------------


class FileObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune", "fine-tune-results"]
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def of_dataset(cls, row: Dataset) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=int(row.created_at.timestamp()),
            filename=row.filename,
            purpose="fine-tune",
            format=row.format,
            kind=row.kind,
            rows=row.rows,
        )

    @classmethod
    def of_artifact(cls, row: Artifact) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=int(row.created_at.timestamp()),
            filename=row.filename,
            purpose="fine-tune-results",
            job_id=row.job_id,
            kind=row.kind,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class JobErrorObject(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None = Field(
        description="`<base>:ft-grait:<suffix>:<job id>` once succeeded; the adapter is in result_files."
    )
    organization_id: str = "local"
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    error: JobErrorObject | None
    training_file: str | None
    validation_file: str | None
    result_files: list[str] = Field(
        description="report JSON, report Markdown, plot, adapter archive, selected training set."
    )
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    trained_tokens: int | None
    estimated_finish: int | None
    integrations: list[Any] = Field(default_factory=list)

    @classmethod
    def of(
        cls, job: Job, *, artifacts: list[Artifact], training_metrics: dict[str, Any] | None
    ) -> FineTuningJobObject:
        train = next((link.dataset_id for link in job.datasets if link.role == "train"), None)
        evals = [link.dataset_id for link in job.datasets if link.role == "eval"]
        knobs = openai_knobs(job.hyperparameters, training_metrics)
        method_type = METHOD_NAMES.get(job.method, job.method)
        estimated = None
        if job.status == "running" and job.eta_seconds is not None:
            estimated = int(time.time() + job.eta_seconds)
        trained = (training_metrics or {}).get("trained_tokens")
        return cls(
            id=job.id,
            created_at=_ts(job.created_at),  # type: ignore[arg-type]
            finished_at=_ts(job.finished_at),
            model=job.base_model,
            fine_tuned_model=fine_tuned_model_name(job) if job.status == "succeeded" else None,
            status="validating_files" if job.status == "validating" else job.status,  # type: ignore[arg-type]
            error=JobErrorObject(code=job.error_code, message=job.error_message or "")
            if job.status == "failed" and job.error_code
            else None,
            training_file=train,
            validation_file=evals[0] if evals else None,
            result_files=[row.id for row in sorted(artifacts, key=_artifact_order)],
            hyperparameters=knobs,
            method={
                "type": method_type,
                method_type: {
                    "hyperparameters": {**knobs, **job.hyperparameters},
                    "eval_files": evals[1:],
                },
            },
            seed=job.seed,
            suffix=job.suffix,
            metadata=job.user_metadata,
            trained_tokens=int(trained) if trained is not None else None,
            estimated_finish=estimated,
        )


RESULT_ORDER = (
    "report_json",
    "report_md",
    "report_plot",
    "adapter",
    "train_set",
    "selection",
    "operating_point",
    "operating_point_plot",
    "answers",
)


def _artifact_order(row: Artifact) -> tuple[int, str]:
    kind = RESULT_ORDER.index(row.kind) if row.kind in RESULT_ORDER else len(RESULT_ORDER)
    return kind, row.id


def openai_knobs(
    hyperparameters: dict[str, Any], training_metrics: dict[str, Any] | None = None
) -> dict[str, Any]:
    """OpenAI's three knobs, read back from a job's full grait hyperparameters.

    `n_epochs: auto` reads back as the number the training stage chose once it has run, as
    OpenAI's jobs do; before that it stays `auto`.
    """
    training = hyperparameters.get("training", {})
    epochs = training.get("epochs")
    if epochs == "auto" and (training_metrics or {}).get("epochs") is not None:
        epochs = float(training_metrics["epochs"])  # type: ignore[index]
    return {
        "n_epochs": int(epochs) if isinstance(epochs, float) and epochs.is_integer() else epochs,
        "batch_size": training.get("batch_size"),
        "learning_rate_multiplier": round(
            training.get("learning_rate", DEFAULT_LEARNING_RATE) / DEFAULT_LEARNING_RATE, 8
        ),
    }


def fine_tuned_model_name(job: Job) -> str:
    base = job.base_model
    if base.startswith(("/", ".", "~")):  # a local directory: its name, not the path
        base = Path(base).name
    return f"{base}:ft-grait:{job.suffix or ''}:{job.id}"


def _ts(value: Any) -> int | None:
    return None if value is None else int(value.timestamp())


class FineTuningJobEventObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None

    @classmethod
    def of(cls, row: JobEvent) -> FineTuningJobEventObject:
        from app.jobs.schemas import EVENT_PREFIX

        return cls(
            id=f"{EVENT_PREFIX}{row.id}",
            created_at=int(row.created_at.timestamp()),
            level="warn" if row.level == "warning" else row.level,  # type: ignore[arg-type]
            message=row.message,
            type="metrics" if row.type == "metrics" else "message",
            data=row.data,
            stage=row.stage,
            grait_type=row.type,
        )


CHECKPOINT_PREFIX = "ckpt-"


def _step_number(method: str, stage: str) -> int:
    """Position among the stages the job's method runs (a stage added for another method,
    such as CRaFT's rehearsal, does not renumber a grait job's checkpoints)."""
    try:
        stages = method_spec(method).stages
    except ValueError:
        stages = STAGES
    return stages.index(stage) + 1 if stage in stages else 0


class FineTuningJobCheckpointObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int = Field(description="1-based position of the stage among the job's stages.")

    @classmethod
    def of(cls, row: JobEvent, job: Job) -> FineTuningJobCheckpointObject:
        stage = row.stage or ""
        metrics = dict((row.data or {}).get("metrics") or {})
        if stage == "training" and metrics.get("final_loss") is not None:
            metrics.setdefault("train_loss", metrics["final_loss"])
        return cls(
            id=f"{CHECKPOINT_PREFIX}{row.id}",
            created_at=int(row.created_at.timestamp()),
            fine_tuned_model_checkpoint=f"{fine_tuned_model_name(job)}:{stage}",
            fine_tuning_job_id=job.id,
            metrics=metrics,
            step_number=_step_number(job.method, stage),
            stage=stage,
        )
