"""Which weights answer a chat model name, for one tenant.

A tuned model's name is its job's `fine_tuned_model` (`<base>:ft-grait:<suffix>:<job id>`):
the job must be the caller's, have succeeded and still have its adapter. A base model is an
alias that GET /v1/models lists. Anything else, another tenant's job included, is OpenAI's
404 `model_not_found`, worded the same for both so an id's existence does not leak.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import APIError
from app.jobs import service as jobs_service
from app.jobs.lifecycle import JobStatus
from app.models import Artifact, Job
from app.openai_compat.schemas import fine_tuned_model_name
from grait.registry import KNOWN_MODELS


@dataclass(frozen=True)
class ServedModel:
    """What the serving process loads: a base model and, for a tuned one, its adapter."""

    name: str
    base_model: str
    adapter_id: str | None = None
    # The adapter archive's storage key: the serving process fetches it from the same storage
    # (it may run on another machine, so a path here would mean nothing there).
    adapter_key: str | None = None


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        "model_not_found",
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
    )


def _adapter_of(session: Session, job: Job) -> ServedModel | None:
    if job.status != JobStatus.SUCCEEDED:
        return None
    row = session.scalar(
        select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == "adapter")
    )
    if row is None:  # the adapter file was deleted
        return None
    return ServedModel(
        name=fine_tuned_model_name(job),
        base_model=job.base_model,
        adapter_id=job.id,
        adapter_key=row.storage_key,
    )


def resolve_model(*, session: Session, tenant_id: str, model: str) -> ServedModel:
    """The tenant's model of that name (see the module's docstring), else 404."""
    if model in KNOWN_MODELS:
        return ServedModel(name=model, base_model=model)
    job_id = model.rsplit(":", 1)[-1]
    if ":ft-grait:" in model and job_id.startswith("job-"):
        try:
            job = jobs_service.get_job(session=session, tenant_id=tenant_id, job_id=job_id)
        except APIError:
            raise model_not_found(model) from None
        served = _adapter_of(session, job)
        if served is not None and served.name == model:
            return served
    raise model_not_found(model)


def job_model(*, session: Session, tenant_id: str, job_id: str) -> ServedModel:
    """The tuned model of one of the tenant's jobs (the dashboard's try-it box)."""
    job = jobs_service.get_job(session=session, tenant_id=tenant_id, job_id=job_id)
    served = _adapter_of(session, job)
    if served is None:
        raise APIError(
            409, "model_not_ready", f"Job {job_id} has no tuned model (it has not succeeded)."
        )
    return served
