from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
)

from app.jobs.lifecycle import JobStatus
from app.models import Artifact, Job, JobEvent
from grait.config import DEFAULT_BASE_MODEL, JobConfig
from grait.methods import METHOD_NAMES

# The library's table of methods, so a method it adds is accepted here without an edit.
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]

# The names from the lifecycle module, as a plain Literal for the OpenAPI schema.
StatusName = Literal[tuple(s.value for s in JobStatus)]  # type: ignore[valid-type]
ErrorCode = Literal[
    "out_of_memory", "invalid_dataset", "worker_lost", "internal_error", "cancelled"
]

# Everything in JobConfig except what the job request names at top level or fills from datasets.
_TOP_LEVEL = {"method", "base_model", "seed", "train", "evals"}
HYPERPARAMETER_GROUPS = [name for name in JobConfig.model_fields if name not in _TOP_LEVEL]

Hyperparameters = create_model(  # type: ignore[call-overload]
    "Hyperparameters",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Every pipeline knob, grouped by stage; omitted keys take the documented defaults.",
    **{
        name: (JobConfig.model_fields[name].annotation, JobConfig.model_fields[name])
        for name in HYPERPARAMETER_GROUPS
    },
)


def _no_nul(value: str) -> str:
    """Postgres text cannot hold NUL: refuse it here (422) rather than fail in SQL (500)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\x00) characters")
    return value


# Text that ends up in the database.
Text = Annotated[str, AfterValidator(_no_nul)]


class DatasetRef(BaseModel):
    """A stored dataset, optionally cut down (shuffled with the job seed, then offset/limit)."""

    model_config = ConfigDict(extra="forbid")
    id: Text = Field(min_length=1, max_length=255)
    name: Text | None = Field(None, max_length=255)
    limit: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    shuffle: bool = True


def _id_to_ref(value: Any) -> Any:
    return {"id": value} if isinstance(value, str) else value


# A plain id string is shorthand for {"id": ...}; one model keeps error locations clean.
DatasetInput = Annotated[
    DatasetRef,
    BeforeValidator(_id_to_ref),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "description": "dataset id"},
                {"$ref": "#/components/schemas/DatasetRef"},
            ]
        }
    ),
]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: MethodName = Field(
        JobConfig.model_fields["method"].default,
        description="Default `random-idk`: on our trade-off study no ranking beat random "
        "refusals at equal budget (README, Quality), and it needs no gradient stage. `grait` "
        "and every baseline the library offers are a name away. With "
        '`hyperparameters.knowledge.n_idk: "auto"` a ranked method (grait, grait-noweight, '
        "random-idk, stratified-random, craft and its ablations) picks its refusal budget by "
        "`knowledge.auto.max_over_refusal`.",
    )
    base_model: Text = Field(
        DEFAULT_BASE_MODEL,
        min_length=1,
        max_length=512,
        description="Alias from GET /v1/models, a local HF directory, or a hub id.",
    )
    train_dataset: DatasetInput
    eval_datasets: list[DatasetInput] = Field(
        default_factory=list,
        max_length=16,
        description="First = in-distribution, the rest out-of-distribution.",
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)  # type: ignore[valid-type]
    seed: int = 0
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    metadata: dict[Text, Text] | None = Field(None, max_length=16)
    webhook_url: Text | None = Field(
        None,
        max_length=2048,
        description="POSTed (signed, Standard Webhooks style) when the job succeeds, fails or "
        "is cancelled. Must resolve to a public address unless the operator allows others.",
    )
    time_limit_seconds: int | None = Field(
        None,
        ge=1,
        description="Wall-clock limit of one attempt, at most the server's "
        "GRAIT_MAX_JOB_SECONDS (the default). Over it the job fails with time_limit_exceeded.",
    )
    compute_class: str | None = Field(
        None,
        max_length=64,
        description="Which workers run it (GET /v1/compute_classes, those `offered`); null = "
        "this deployment's default class. Planned against that class at submit.",
    )


class PlanRequest(JobCreate):
    """A job spec to plan, plus the hardware to plan it on (any known class, offered or not)."""

    known_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Share of training questions the base model is assumed to know: Stage 1 "
        "decides the real split, which sets how many refusals are trained.",
    )


class StagePlanObject(BaseModel):
    stage: str
    tokens: int = Field(description="Tokens the stage processes (padded batches, all passes).")
    flops: float = Field(description="Matmul FLOPs of the stage.")
    seconds: float
    peak_memory_bytes: int
    bound: Literal["compute", "bandwidth", "overhead"] = Field(
        description="What the predicted time is mostly made of."
    )
    detail: str


class PlanObject(BaseModel):
    object: Literal["grait.plan"] = "grait.plan"
    compute_class: str
    calibration: str | None = Field(
        description="Where the efficiencies were measured; null = defaults."
    )
    fits: bool
    seconds: float = Field(description="Predicted wall time of all stages.")
    peak_memory_bytes: int
    memory_limit_bytes: int = Field(description="The class's memory less a safety margin.")
    dtype: str
    quantization: str
    params: int
    lora_params: int
    weights_bytes: int
    assumptions: list[str]
    stages: list[StagePlanObject]

    @classmethod
    def of(cls, plan: dict[str, Any]) -> PlanObject:
        keys = set(cls.model_fields) - {"object"}
        return cls(**{k: v for k, v in plan.items() if k in keys})


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobWarning(BaseModel):
    code: str = Field(description="e.g. refusal_not_learned, answers_not_kept")
    message: str
    stage: str | None = None


class JobObject(BaseModel):
    id: str
    object: Literal["grait.job"] = "grait.job"
    status: StatusName
    method: str
    base_model: str
    train_dataset: str | None
    eval_datasets: list[str | None]
    hyperparameters: dict[str, Any]
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    webhook_url: str | None = None
    time_limit_seconds: int | None = Field(description="Null: the server's limit.")
    stage: str | None = Field(description="Current pipeline stage while running.")
    percent: float = Field(description="0-100, over all stages.")
    eta_seconds: float | None
    cancel_requested: bool
    error: JobError | None
    warnings: list[JobWarning] = Field(
        default_factory=list,
        description="The job ran but its result needs a look (e.g. the refusal was not learned).",
    )
    compute_class: str | None = Field(description="The class of workers that run it.")
    plan: PlanObject | None = Field(
        None, description="Predicted time and peak memory per stage at submit, when plannable."
    )
    attempts: int
    created_at: int
    started_at: int | None
    finished_at: int | None

    @classmethod
    def of(cls, job: Job) -> JobObject:
        train = next((link.dataset_id for link in job.datasets if link.role == "train"), None)
        evals = [link.dataset_id for link in job.datasets if link.role == "eval"]
        return cls(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]
            method=job.method,
            base_model=job.base_model,
            train_dataset=train,
            eval_datasets=evals,
            hyperparameters=job.hyperparameters,
            seed=job.seed,
            suffix=job.suffix,
            metadata=job.user_metadata,
            webhook_url=job.webhook_url,
            time_limit_seconds=job.time_limit_seconds,
            stage=job.stage,
            percent=round(job.percent or 0.0, 2),
            eta_seconds=None if job.eta_seconds is None else round(job.eta_seconds, 1),
            cancel_requested=job.cancel_requested,
            error=JobError(code=job.error_code, message=job.error_message or "")
            if job.error_code
            else None,
            warnings=[JobWarning(**w) for w in job.warnings or []],
            compute_class=job.compute_class,
            plan=PlanObject.of(job.plan) if job.plan else None,
            attempts=job.attempts,
            created_at=_ts(job.created_at),  # type: ignore[arg-type]
            started_at=_ts(job.started_at),
            finished_at=_ts(job.finished_at),
        )


def _ts(value: Any) -> int | None:
    return None if value is None else int(value.timestamp())


EVENT_PREFIX = "event-"


class EventObject(BaseModel):
    id: str
    object: Literal["grait.job.event"] = "grait.job.event"
    created_at: float
    level: Literal["info", "warning", "error"]
    type: str = Field(
        description="status | stage_started | stage_completed | stage_skipped | progress | metrics | warning | error"
    )
    stage: str | None
    message: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, row: JobEvent) -> EventObject:
        return cls(
            id=f"{EVENT_PREFIX}{row.id}",
            created_at=round(row.created_at.timestamp(), 3),
            level=row.level,  # type: ignore[arg-type]
            type=row.type,
            stage=row.stage,
            message=row.message,
            data=row.data,
        )


class ArtifactObject(BaseModel):
    id: str
    object: Literal["grait.job.artifact"] = "grait.job.artifact"
    job_id: str
    kind: str = Field(
        description="adapter | report_json | report_md | report_plot | train_set | selection | "
        "answers (per question, base and tuned, with eval sets) | operating_point | "
        "operating_point_plot (the last two with knowledge.n_idk = auto)"
    )
    filename: str
    content_type: str
    bytes: int
    created_at: int
    download_url: str

    @classmethod
    def of(cls, row: Artifact) -> ArtifactObject:
        return cls(
            id=row.id,
            job_id=row.job_id,
            kind=row.kind,
            filename=row.filename,
            content_type=row.content_type,
            bytes=row.bytes,
            created_at=int(row.created_at.timestamp()),
            download_url=f"/v1/jobs/{row.job_id}/artifacts/{row.id}/content",
        )
