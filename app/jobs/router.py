from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse, StreamingResponse

from app.db import in_request_session
from app.deps import REQUIRE_KEY, PrincipalDep, SessionDep, SettingsDep, StorageDep
from app.downloads import DOWNLOAD_RESPONSES, stored_file_response
from app.errors import ERROR_RESPONSES, not_found
from app.idempotency import REPLAYED_HEADER, Idempotency, IdempotencyKeyHeader
from app.jobs import service
from app.jobs.schemas import (
    ArtifactObject,
    EventObject,
    JobCreate,
    JobObject,
    PlanObject,
    PlanRequest,
    StatusName,
)
from app.jobs.stream import event_stream
from app.pagination import AfterQuery, LimitQuery, ListPage, page_of
from app.storage import ObjectNotFound

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES, dependencies=[REQUIRE_KEY]
)


@router.post("", status_code=201, response_model=JobObject)
def create_job(
    body: JobCreate,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobObject:
    """Validate the spec, store the job, then put it on the queue (only after the commit)."""
    idempotency = Idempotency.of(
        idempotency_key,
        tenant_id=principal.tenant_id,
        scope="POST /v1/jobs",
        payload=body.model_dump(mode="json"),
    )
    job, replayed = service.submit_job(
        session=session,
        storage=storage,
        settings=settings,
        tenant_id=principal.tenant_id,
        request=body,
        idempotency=idempotency,
    )
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return JobObject.of(job)


@router.post("/plan", response_model=PlanObject)
def plan_job(
    body: PlanRequest,
    principal: PrincipalDep,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> PlanObject:
    """Predicted time and peak memory per stage before launch; 422 `job_does_not_fit` (with
    the plan in the error) when the peak exceeds the class's memory. Stores nothing."""
    plan = service.plan_job(
        session=session,
        storage=storage,
        settings=settings,
        tenant_id=principal.tenant_id,
        request=body,
    )
    session.rollback()  # release the datasets' share locks: a plan creates nothing
    return PlanObject.of(plan)


@router.get("", response_model=ListPage[JobObject])
def list_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    after: AfterQuery = None,
    limit: LimitQuery = 20,
    status: Annotated[StatusName | None, Query(description="Only jobs in this status.")] = None,
) -> dict:
    jobs = service.list_jobs(
        session=session, tenant_id=principal.tenant_id, after=after, limit=limit, status=status
    )
    return page_of(jobs, limit=limit, to_schema=JobObject.of)


@router.get("/{job_id}", response_model=JobObject)
def get_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> JobObject:
    return JobObject.of(
        service.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)
    )


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> JobObject:
    """A queued job is cancelled at once; a running one gets `cancel_requested` and stops at
    the next step boundary (watch `status`)."""
    return JobObject.of(
        service.cancel_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)
    )


@router.get("/{job_id}/events", response_model=ListPage[EventObject])
def list_events(
    job_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    after: AfterQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    """Oldest first. Poll with `after=<last_id>` to follow a running job."""
    events = service.list_events(
        session=session, tenant_id=principal.tenant_id, job_id=job_id, after=after, limit=limit
    )
    return page_of(events, limit=limit, to_schema=EventObject.of)


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def stream_events(
    job_id: str,
    principal: PrincipalDep,
    settings: SettingsDep,
    after: AfterQuery = None,
    last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> StreamingResponse:
    """The job's events live as Server-Sent Events (`id:` = the event id, `event:` = its type,
    `data:` = the event object). Resumes after `Last-Event-ID` (or `after`); closes when the
    job has ended and its last event was sent."""
    after = last_event_id or after

    def check(session: Any) -> None:  # 404 / 422 now, not as a broken stream later
        service.list_events(
            session=session, tenant_id=principal.tenant_id, job_id=job_id, after=after, limit=1
        )

    await in_request_session(settings, check)
    return StreamingResponse(
        event_stream(settings, tenant_id=principal.tenant_id, job_id=job_id, after=after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{job_id}/artifacts", response_model=ListPage[ArtifactObject])
def list_artifacts(job_id: str, principal: PrincipalDep, session: SessionDep) -> dict:
    rows = service.list_artifacts(session=session, tenant_id=principal.tenant_id, job_id=job_id)
    return page_of(rows, limit=len(rows) or 1, to_schema=ArtifactObject.of)


@router.get(
    "/{job_id}/artifacts/{artifact_id}/content",
    response_class=FileResponse,
    responses=DOWNLOAD_RESPONSES,
)
def download_artifact(
    job_id: str,
    artifact_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    storage: StorageDep,
) -> Response:
    row = service.get_artifact(
        session=session, tenant_id=principal.tenant_id, job_id=job_id, artifact_id=artifact_id
    )
    try:
        return stored_file_response(
            storage, key=row.storage_key, filename=row.filename, media_type=row.content_type
        )
    except ObjectNotFound:
        raise not_found("artifact", artifact_id) from None
