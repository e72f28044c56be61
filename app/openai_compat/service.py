"""The OpenAI face's own logic: translate its requests into the native service's, and back.

No validation lives here that the native service also does: a create request becomes a native
`JobCreate` handed to `app.jobs.service.submit_job`; what that rejects comes back with the
field renamed to the one the OpenAI client sent (`train_dataset` -> `training_file`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.datasets import service as datasets_service
from app.errors import APIError, describe_validation_errors, not_found
from app.idempotency import Idempotency
from app.jobs import service as jobs_service
from app.jobs.schemas import JobCreate
from app.models import Artifact, Dataset, Job
from app.openai_compat.schemas import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_METHOD,
    METHOD_TYPES,
    FineTuningJobCreate,
    FineTuningJobObject,
    MethodSettings,
)
from app.settings import Settings
from app.storage import Storage

# OpenAI knob -> (grait group, key)
KNOB_TARGETS = {"n_epochs": ("training", "epochs"), "batch_size": ("training", "batch_size")}


@dataclass
class Translation:
    """A native job request and how to name its fields back in OpenAI's terms."""

    request: JobCreate
    method_type: str
    hyper_prefix: str
    renamed: dict[str, str] = field(default_factory=dict)  # native param -> OpenAI param

    def openai_param(self, param: str | None) -> str | None:
        if not param:
            return param
        for native, ours in sorted(self.renamed.items(), key=lambda kv: -len(kv[0])):
            if param == native or param.startswith((native + ".", native + "[")):
                return ours + param[len(native) :]
        return to_openai_param(param, method_type=self.method_type, hyper_prefix=self.hyper_prefix)

    def openai_error(self, exc: APIError) -> APIError:
        """The service's error with OpenAI's field names in `param` and the message."""
        param = self.openai_param(exc.param)
        message = exc.message
        if exc.param and param != exc.param and message.startswith(exc.param):
            message = param + message[len(exc.param) :]
        elif param and not message.startswith(param):
            message = f"{param}: {message}"
        message = message.replace("No dataset with id", "No fine-tune file with id")
        return APIError(exc.status, exc.code, message, param=param)


def to_openai_param(param: str, *, method_type: str, hyper_prefix: str) -> str:
    match = re.match(r"^eval_datasets\[(\d+)\](.*)$", param)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if index == 0:
            return "validation_file" + rest
        return f"method.{method_type}.eval_files[{index - 1}]{rest}"
    for native, ours in (
        ("train_dataset", "training_file"),
        ("eval_datasets", f"method.{method_type}.eval_files"),
        ("base_model", "model"),
        ("method", "method.type"),
        ("hyperparameters", hyper_prefix),
    ):
        if param == native or param.startswith((native + ".", native + "[")):
            return ours + param[len(native) :]
    return param


def _knobs_given(knobs: Any) -> dict[str, Any]:
    if knobs is None:
        return {}
    return {
        k: v
        for k, v in knobs.model_dump(include={*KNOB_TARGETS, "learning_rate_multiplier"}).items()
        if v is not None
    }


def translate_create(body: FineTuningJobCreate) -> Translation:
    """OpenAI's job request -> the native `JobCreate` (not yet validated by the service)."""
    method_type = body.method.type if body.method else DEFAULT_METHOD
    settings: MethodSettings = body.method.settings if body.method else MethodSettings()
    inner = settings.hyperparameters
    inner_given = inner.model_fields_set
    top_given = body.hyperparameters.model_fields_set if body.hyperparameters else set()
    if inner_given and top_given:
        raise APIError(
            400,
            "invalid_request",
            f"hyperparameters: give them either at the top level or under "
            f"method.{method_type}.hyperparameters, not both",
            param="hyperparameters",
        )
    hyper_prefix = f"method.{method_type}.hyperparameters" if inner_given else "hyperparameters"
    knobs = _knobs_given(inner if inner_given else body.hyperparameters)
    groups: dict[str, Any] = {
        name: value
        for name, value in inner.model_dump(
            mode="json", exclude_unset=True, exclude={*KNOB_TARGETS, "learning_rate_multiplier"}
        ).items()
        if value is not None
    }
    renamed: dict[str, str] = {}
    training = groups.setdefault("training", {})
    for knob, (group, key) in KNOB_TARGETS.items():
        value = knobs.get(knob)
        if value is None or value == "auto":
            continue
        if key in groups.get(group, {}):
            raise APIError(
                400,
                "invalid_request",
                f"{hyper_prefix}.{knob}: also given as {hyper_prefix}.{group}.{key}; give one",
                param=f"{hyper_prefix}.{knob}",
            )
        groups.setdefault(group, {})[key] = value
        renamed[f"hyperparameters.{group}.{key}"] = f"{hyper_prefix}.{knob}"
    multiplier = knobs.get("learning_rate_multiplier")
    if multiplier is not None and multiplier != "auto":
        # A multiplier <= 0 gives a learning rate JobConfig refuses; the error is renamed back.
        base = training.get("learning_rate", DEFAULT_LEARNING_RATE)
        training["learning_rate"] = base * multiplier
        renamed["hyperparameters.training.learning_rate"] = (
            f"{hyper_prefix}.learning_rate_multiplier"
        )
    if not training:
        groups.pop("training")

    if settings.eval_files and not body.validation_file:
        raise APIError(
            400,
            "invalid_request",
            f"method.{method_type}.eval_files: give a validation_file (the in-distribution "
            "eval set) before out-of-distribution eval files",
            param=f"method.{method_type}.eval_files",
        )
    evals: list[Any] = [body.validation_file] if body.validation_file else []
    evals += [ref.model_dump() for ref in settings.eval_files]
    native = {
        "method": METHOD_TYPES[method_type],
        "base_model": body.model,
        "train_dataset": body.training_file,
        "eval_datasets": evals,
        "hyperparameters": groups,
        "seed": 0 if body.seed is None else body.seed,
        "suffix": body.suffix,
        "metadata": body.metadata,
    }
    translation = Translation(
        request=JobCreate.model_construct(),
        method_type=method_type,
        hyper_prefix=hyper_prefix,
        renamed=renamed,
    )
    try:
        translation.request = JobCreate.model_validate(native)
    except ValidationError as exc:
        message, param = describe_validation_errors(list(exc.errors()), skip_source=False)
        raise translation.openai_error(
            APIError(422, "invalid_request", message, param=param)
        ) from None
    return translation


def create_job(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant_id: str,
    body: FineTuningJobCreate,
    idempotency: Idempotency | None = None,
) -> tuple[Job, bool]:
    """(job, replayed): the native submit, with its errors named in OpenAI's terms."""
    translation = translate_create(body)
    try:
        return jobs_service.submit_job(
            session=session,
            storage=storage,
            settings=settings,
            tenant_id=tenant_id,
            request=translation.request,
            idempotency=idempotency,
        )
    except APIError as exc:
        if exc.param == "Idempotency-Key" or exc.status == 429:
            raise
        raise translation.openai_error(exc) from None


def job_objects(*, session: Session, jobs: list[Job]) -> list[FineTuningJobObject]:
    """OpenAI job objects for `jobs`, with their result files and trained tokens (two queries)."""
    ids = [job.id for job in jobs]
    artifacts = jobs_service.list_artifacts_of_jobs(session=session, job_ids=ids)
    training = jobs_service.stage_summaries(session=session, job_ids=ids, stage="training")
    return [
        FineTuningJobObject.of(
            job, artifacts=artifacts[job.id], training_metrics=training.get(job.id)
        )
        for job in jobs
    ]


# ---- files = datasets (purpose fine-tune) + job artifacts (purpose fine-tune-results) ----------

DATASET_PREFIX = "ds-"
ARTIFACT_PREFIX = "file-"


def _sort_key(row: Dataset | Artifact) -> str:
    """Both kinds of id are `<prefix>-<ms hex><random hex>`: the part after the prefix orders them."""
    return row.id.split("-", 1)[1]


def list_files(
    *,
    session: Session,
    tenant_id: str,
    purpose: str | None,
    after: str | None,
    limit: int,
    order: str,
) -> list[Dataset | Artifact]:
    """Datasets and result files merged into one id-ordered list (fetched with limit + 1 rows)."""
    key = after.split("-", 1)[1] if after and "-" in after else None
    rows: list[Dataset | Artifact] = []
    if purpose in (None, "fine-tune"):
        rows += datasets_service.list_datasets(
            session=session,
            tenant_id=tenant_id,
            after=key and DATASET_PREFIX + key,
            limit=limit,
            order=order,
        )
    if purpose in (None, "fine-tune-results"):
        rows += jobs_service.list_all_artifacts(
            session=session,
            tenant_id=tenant_id,
            after=key and ARTIFACT_PREFIX + key,
            limit=limit,
            order=order,
        )
    rows.sort(key=_sort_key, reverse=order == "desc")
    return rows[: limit + 1]


def get_file(*, session: Session, tenant_id: str, file_id: str) -> Dataset | Artifact:
    if file_id.startswith(DATASET_PREFIX):
        return datasets_service.get_dataset(
            session=session, tenant_id=tenant_id, dataset_id=file_id
        )
    if file_id.startswith(ARTIFACT_PREFIX):
        return jobs_service.get_artifact(
            session=session, tenant_id=tenant_id, job_id=None, artifact_id=file_id
        )
    raise not_found("file", file_id)


def delete_file(*, session: Session, storage: Storage, tenant_id: str, file_id: str) -> None:
    row = get_file(session=session, tenant_id=tenant_id, file_id=file_id)
    if isinstance(row, Dataset):
        datasets_service.delete_dataset(
            session=session, storage=storage, tenant_id=tenant_id, dataset_id=row.id
        )
    else:
        jobs_service.delete_artifact(
            session=session, storage=storage, tenant_id=tenant_id, artifact_id=row.id
        )
