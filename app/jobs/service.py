"""Jobs: validate at submit, commit, then publish; cancel; read events and artifacts.

A spec is checked by building the same `grait.config.JobConfig` the worker will run, so an
invalid job fails here with a 422 and never reaches a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from app.errors import APIError, loc_to_param, not_found
from app.idempotency import Idempotency, run_idempotent
from app.jobs import lifecycle
from app.jobs.config import build_job_config
from app.jobs.lifecycle import WAITING_STATUSES, JobStatus
from app.jobs.schemas import EVENT_PREFIX, DatasetRef, JobCreate, PlanRequest
from app.models import Artifact, Dataset, Job, JobDataset, JobEvent, Tenant, new_id
from app.queue import publish_job
from app.settings import Settings
from app.storage import LocalStorage, ObjectNotFound, Storage
from app.webhooks.service import check_webhook_url
from grait.config import JobConfig
from grait.data import DataError
from grait.planning import Plan, PlanError, compute_classes, load_compute_class, plan_config
from grait.registry import KNOWN_MODELS


def _check_base_model(base_model: str) -> None:
    if base_model in KNOWN_MODELS:
        return
    looks_like_path = base_model.startswith(("/", ".", "~"))
    if looks_like_path:
        path = Path(base_model).expanduser()
        if not (path / "config.json").is_file():
            raise APIError(
                422,
                "invalid_request",
                f"base_model {base_model!r} is not a Hugging Face model directory (no config.json there).",
                param="base_model",
            )
        return
    if base_model.count("/") != 1:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise APIError(
            422,
            "invalid_request",
            f"base_model {base_model!r} is neither a known alias ({known}), a local directory, nor a hub id 'org/name'.",
            param="base_model",
        )


def _event(
    job_id: str,
    type: str,
    message: str,
    *,
    level: str = "info",
    stage: str | None = None,
    data: dict | None = None,
) -> JobEvent:
    return JobEvent(job_id=job_id, type=type, level=level, stage=stage, message=message, data=data)


def _dataset_file(storage: Storage, dataset: Dataset, *, param: str) -> str:
    """This machine's copy of the dataset, which the config check and the planner read (an
    object store downloads it once into the local cache)."""
    try:
        return str(storage.fetch(dataset.storage_key))
    except ObjectNotFound:
        raise APIError(
            422,
            "dataset_not_found",
            f"Dataset {dataset.id!r} has lost its stored file; upload it again.",
            param=param,
        ) from None


def _prefetch_datasets(
    *, session: Session, storage: Storage, tenant_id: str, request: JobCreate
) -> None:
    """Download the request's datasets into this machine's cache before the submit's
    transaction locks them: a large download would otherwise hold the share locks (and the
    connection, idle in transaction) for as long as it takes. Called first in a request, so
    the rollback that ends this read-only transaction drops nothing."""
    if isinstance(storage, LocalStorage):  # `fetch` is the file itself: nothing to download
        return
    ids = {request.train_dataset.id, *(ref.id for ref in request.eval_datasets)}
    keys = session.scalars(
        select(Dataset.storage_key).where(Dataset.id.in_(ids), Dataset.tenant_id == tenant_id)
    ).all()
    session.rollback()
    for key in keys:
        try:
            storage.fetch(key)
        except ObjectNotFound:  # reported, with its parameter, by the validation
            pass


def _validated(
    *, session: Session, storage: Storage, settings: Settings, tenant_id: str, request: JobCreate
) -> tuple[list[tuple[str, DatasetRef]], dict[str, Dataset], JobConfig]:
    """The request's datasets (this tenant's, locked against deletion) and its library config."""
    refs: list[tuple[str, DatasetRef]] = [("train_dataset", request.train_dataset)]
    refs += [(f"eval_datasets[{i}]", ref) for i, ref in enumerate(request.eval_datasets)]
    ids = {ref.id for _, ref in refs}
    # FOR SHARE: a concurrent DELETE of one of these datasets waits for this job to commit.
    found = {
        row.id: row
        for row in session.scalars(
            select(Dataset)
            .where(Dataset.id.in_(ids), Dataset.tenant_id == tenant_id)
            .with_for_update(read=True)
        )
    }
    for param, ref in refs:
        if ref.id not in found:
            raise APIError(422, "dataset_not_found", f"No dataset with id {ref.id!r}.", param=param)
    _check_base_model(request.base_model)
    limit = request.time_limit_seconds
    if limit is not None and limit > settings.max_job_seconds:
        raise APIError(
            422,
            "invalid_request",
            f"time_limit_seconds: at most {settings.max_job_seconds} on this server",
            param="time_limit_seconds",
        )
    if request.webhook_url:
        check_webhook_url(request.webhook_url, settings=settings)

    hyper = request.hyperparameters.model_dump(mode="json")
    specs = [
        (
            _dataset_file(storage, found[ref.id], param=param),
            found[ref.id].format,
            _options(ref, found[ref.id]),
        )
        for param, ref in refs
    ]
    try:
        config = build_job_config(
            method=request.method,
            base_model=request.base_model,
            seed=request.seed,
            hyperparameters=hyper,
            datasets=specs,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _config_param(first["loc"])
        raise APIError(422, "invalid_request", f"{param}: {first['msg']}", param=param) from None
    return refs, found, config


def _plan(config: JobConfig, compute_class: str, known_share: float = 0.5) -> Plan:
    try:
        return plan_config(config, compute_class, known_share=known_share)
    except PlanError as exc:
        raise APIError(422, "cannot_plan", str(exc), param="base_model") from None
    except DataError as exc:  # validated at upload; a file changed since cannot be read now
        raise APIError(422, "invalid_dataset", str(exc), param="train_dataset") from None


def _refuse_if_too_big(plan: Plan) -> None:
    if plan.quantization != "none" and load_compute_class(plan.compute_class).device != "cuda":
        raise APIError(
            422,
            "invalid_request",
            f"hyperparameters.loading.quantization: {plan.quantization} needs a CUDA GPU "
            f"(bitsandbytes), and compute class {plan.compute_class!r} has none.",
            param="hyperparameters.loading.quantization",
        )
    if plan.fits:
        return
    worst = max(plan.stages, key=lambda s: s.peak_memory_bytes)
    raise APIError(
        422,
        "job_does_not_fit",
        f"Predicted peak memory {worst.peak_memory_bytes / 1e9:.1f} GB (in {worst.stage}) exceeds "
        f"the {plan.memory_limit_bytes / 1e9:.1f} GB usable on compute class "
        f"{plan.compute_class!r}. Load the base model in 4 bit (loading.quantization), turn on "
        "gradient checkpointing, lower the batch sizes, or pick a larger class.",
        plan=plan.to_json(),
    )


def plan_job(
    *, session: Session, storage: Storage, settings: Settings, tenant_id: str, request: PlanRequest
) -> dict[str, Any]:
    """A job's predicted cost per stage on a compute class; 422 with the plan if it won't fit."""
    compute_class = request.compute_class or settings.compute_class
    if compute_class not in compute_classes():
        raise APIError(
            422,
            "invalid_request",
            f"compute_class: unknown {compute_class!r}; known: {', '.join(compute_classes())}",
            param="compute_class",
        )
    _prefetch_datasets(session=session, storage=storage, tenant_id=tenant_id, request=request)
    _, _, config = _validated(
        session=session, storage=storage, settings=settings, tenant_id=tenant_id, request=request
    )
    plan = _plan(config, compute_class, request.known_share)
    _refuse_if_too_big(plan)
    return plan.to_json()


def create_job(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant_id: str,
    request: JobCreate,
    idempotency: Idempotency | None = None,
) -> Job:
    refs, found, config = _validated(
        session=session, storage=storage, settings=settings, tenant_id=tenant_id, request=request
    )
    hyper = request.hyperparameters.model_dump(mode="json")
    compute_class = request.compute_class or settings.compute_class
    if compute_class not in settings.offered_classes:
        raise APIError(
            422,
            "compute_class_unavailable",
            f"compute_class: no workers of class {compute_class!r} here; this deployment offers "
            f"{', '.join(settings.offered_classes)} (GET /v1/compute_classes).",
            param="compute_class",
        )
    # Plan against the workers' class: a job that cannot fit is refused before it queues. A
    # model whose shape is not readable here (a hub id, an alias not yet prepared) goes unplanned.
    try:
        plan: Plan | None = plan_config(config, compute_class)
    except (PlanError, DataError):  # the worker reports a bad file with its line, as before
        plan = None
    if plan is not None:
        _refuse_if_too_big(plan)
    _check_queue_room(session=session, settings=settings, tenant_id=tenant_id)
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        webhook_url=request.webhook_url,
        time_limit_seconds=request.time_limit_seconds,
        status=JobStatus.VALIDATING,
        method=request.method,
        base_model=request.base_model,
        seed=request.seed,
        suffix=request.suffix,
        hyperparameters=hyper,
        plan=plan.to_json() if plan else None,
        compute_class=compute_class,
        queue=settings.queue_for(compute_class),
        user_metadata=request.metadata,
        percent=0.0,
        cancel_requested=False,
        attempts=0,
    )
    for position, (_, ref) in enumerate(refs):
        job.datasets.append(
            JobDataset(
                position=position,
                dataset_id=ref.id,
                role="train" if position == 0 else "eval",
                options=_options(ref, found[ref.id]),
            )
        )
    session.add(job)
    session.flush()
    lifecycle.queue(session, job)
    if idempotency is not None:
        session.add(idempotency.record(job.id))
    session.commit()
    return job


QUEUE_FULL_RETRY_AFTER = 30


def _check_queue_room(*, session: Session, settings: Settings, tenant_id: str) -> None:
    """429 when the tenant already has `max_queued_jobs_per_tenant` jobs waiting.

    The tenant row is locked first, so two concurrent submits cannot both take the last place.
    """
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    waiting = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status.in_(WAITING_STATUSES))
    )
    if waiting is not None and waiting >= settings.max_queued_jobs_per_tenant:
        raise APIError(
            429,
            "too_many_queued_jobs",
            f"{waiting} jobs are already waiting; the limit is "
            f"{settings.max_queued_jobs_per_tenant} queued jobs per tenant "
            "(GRAIT_MAX_QUEUED_JOBS_PER_TENANT). Retry when one has started, or cancel one.",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)},
            limit=settings.max_queued_jobs_per_tenant,
        )


def _options(ref: DatasetRef, dataset: Dataset) -> dict[str, Any]:
    return {
        "name": ref.name or dataset.name,
        "limit": ref.limit,
        "offset": ref.offset,
        "shuffle": ref.shuffle,
    }


def _config_param(loc: tuple[Any, ...]) -> str:
    """Map a JobConfig error location back onto the request's field names."""
    if not loc:
        return "hyperparameters"
    head, rest = loc[0], tuple(loc[1:])
    if head == "train":
        return loc_to_param(("train_dataset", *rest), skip_source=False) or "train_dataset"
    if head == "evals":
        index = rest[0] if rest else 0
        return (
            loc_to_param(("eval_datasets", index, *rest[1:]), skip_source=False) or "eval_datasets"
        )
    if head in ("method", "base_model", "seed"):
        return str(head)
    return loc_to_param(("hyperparameters", *loc), skip_source=False) or "hyperparameters"


def submit_job(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant_id: str,
    request: JobCreate,
    idempotency: Idempotency | None = None,
) -> tuple[Job, bool]:
    """Create the job, then publish it (only after its row is committed): what every face calls.

    Returns (job, replayed): a retry with a known `idempotency` key gets the original job.
    """

    _prefetch_datasets(session=session, storage=storage, tenant_id=tenant_id, request=request)

    def create() -> Job:
        job = create_job(
            session=session,
            storage=storage,
            settings=settings,
            tenant_id=tenant_id,
            request=request,
            idempotency=idempotency,
        )
        if publish_job(job.id, settings, job.queue):
            mark_published(session=session, job_id=job.id)
        session.expire_all()
        return get_job(session=session, tenant_id=tenant_id, job_id=job.id)

    def load(job_id: str) -> Job:
        return get_job(session=session, tenant_id=tenant_id, job_id=job_id)

    return run_idempotent(idempotency, session=session, settings=settings, create=create, load=load)


def mark_published(*, session: Session, job_id: str) -> None:
    lifecycle.mark_published(session, job_id)
    session.commit()


def get_job(*, session: Session, tenant_id: str, job_id: str) -> Job:
    """The tenant's job; another tenant's id is as unknown as a made-up one."""
    job = session.scalar(
        select(Job)
        .where(Job.id == job_id, Job.tenant_id == tenant_id)
        .options(selectinload(Job.datasets))
    )
    if job is None:
        raise not_found("job", job_id)
    return job


def list_jobs(
    *,
    session: Session,
    tenant_id: str,
    after: str | None,
    limit: int,
    status: str | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Job]:
    """Newest first; `metadata` keeps jobs whose metadata has every given key = value."""
    query = (
        select(Job)
        .where(Job.tenant_id == tenant_id)
        .options(selectinload(Job.datasets))
        .order_by(Job.id.desc())
        .limit(limit + 1)
    )
    if after:
        query = query.where(Job.id < after)
    if status:
        query = query.where(Job.status == status)
    for key, value in (metadata or {}).items():
        query = query.where(Job.user_metadata[key].as_string() == value)
    return list(session.scalars(query))


def cancel_job(*, session: Session, tenant_id: str, job_id: str) -> Job:
    """Queued: cancelled now. Running: flagged; the worker stops at the next step boundary
    (`lifecycle.request_cancel`). Finished: 409."""
    get_job(session=session, tenant_id=tenant_id, job_id=job_id)  # 404 for unknown / other
    outcome = lifecycle.request_cancel(session, job_id)
    if outcome in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        session.rollback()
        raise APIError(409, "job_not_cancellable", f"Job {job_id} already {outcome}.", param="id")
    session.commit()
    session.expire_all()
    return get_job(session=session, tenant_id=tenant_id, job_id=job_id)


def list_events(
    *,
    session: Session,
    tenant_id: str,
    job_id: str,
    after: str | None,
    limit: int,
    order: str = "asc",
    types: tuple[str, ...] | None = None,
) -> list[JobEvent]:
    """Oldest first (`order="desc"`: newest first); `after` is the previous page's last event id."""
    get_job(session=session, tenant_id=tenant_id, job_id=job_id)
    oldest_first = order == "asc"
    query = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id)
        .order_by(JobEvent.id if oldest_first else JobEvent.id.desc())
        .limit(limit + 1)
    )
    if types:
        query = query.where(JobEvent.type.in_(types))
    if after:
        number = after.removeprefix(EVENT_PREFIX)
        if not number.isdigit():
            raise APIError(
                422,
                "invalid_request",
                f"after must be an event id like '{EVENT_PREFIX}12'.",
                param="after",
            )
        query = query.where(
            JobEvent.id > int(number) if oldest_first else JobEvent.id < int(number)
        )
    return list(session.scalars(query))


def stage_summaries(
    *, session: Session, job_ids: list[str], stage: str
) -> dict[str, dict[str, Any]]:
    """{job id: metrics of its completed `stage`}, from the stage_completed events the worker writes."""
    if not job_ids:
        return {}
    rows = session.scalars(
        select(JobEvent)
        .where(
            JobEvent.job_id.in_(job_ids),
            JobEvent.type == "stage_completed",
            JobEvent.stage == stage,
        )
        .order_by(JobEvent.id)
    )
    return {row.job_id: (row.data or {}).get("metrics") or {} for row in rows}


def list_artifacts(*, session: Session, tenant_id: str, job_id: str) -> list[Artifact]:
    get_job(session=session, tenant_id=tenant_id, job_id=job_id)
    return list(
        session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id))
    )


def get_artifact(
    *, session: Session, tenant_id: str, job_id: str | None, artifact_id: str
) -> Artifact:
    """One of the tenant's artifacts; with `job_id`, only if it belongs to that job."""
    row = session.scalar(
        select(Artifact)
        .join(Job, Job.id == Artifact.job_id)
        .where(Artifact.id == artifact_id, Job.tenant_id == tenant_id)
    )
    if row is None or (job_id is not None and row.job_id != job_id):
        raise not_found("artifact", artifact_id)
    return row


def list_artifacts_of_jobs(*, session: Session, job_ids: list[str]) -> dict[str, list[Artifact]]:
    out: dict[str, list[Artifact]] = {job_id: [] for job_id in job_ids}
    if job_ids:
        for row in session.scalars(
            select(Artifact).where(Artifact.job_id.in_(job_ids)).order_by(Artifact.id)
        ):
            out[row.job_id].append(row)
    return out


def list_all_artifacts(
    *, session: Session, tenant_id: str, after: str | None, limit: int, order: str = "desc"
) -> list[Artifact]:
    """The tenant's artifacts, newest first (or `order="asc"`); `after` is an artifact id."""
    newest_first = order == "desc"
    query = (
        select(Artifact)
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant_id == tenant_id)
        .order_by(Artifact.id.desc() if newest_first else Artifact.id)
        .limit(limit + 1)
    )
    if after:
        query = query.where(Artifact.id < after if newest_first else Artifact.id > after)
    return list(session.scalars(query))


def delete_artifact(
    *, session: Session, storage: Storage, tenant_id: str, artifact_id: str
) -> None:
    row = get_artifact(session=session, tenant_id=tenant_id, job_id=None, artifact_id=artifact_id)
    session.delete(row)
    session.commit()
    storage.delete(row.storage_key)


def count_by_status(*, session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())  # type: ignore[arg-type]
