"""OpenAI-compatible routes: `/v1/files` and `/v1/fine_tuning/jobs`, in OpenAI's shapes.

A second face over the same service layer: uploads go through the datasets upload, jobs
through `app.jobs.service`; nothing here stores or validates on its own.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from app.datasets.upload import accept_dataset_upload
from app.deps import REQUIRE_KEY, PrincipalDep, SessionDep, SettingsDep, StorageDep
from app.downloads import DOWNLOAD_RESPONSES, stored_file_response
from app.errors import APIError, not_found
from app.idempotency import REPLAYED_HEADER, Idempotency, IdempotencyKeyHeader
from app.jobs import service as jobs_service
from app.jobs.schemas import EVENT_PREFIX
from app.models import Dataset
from app.openai_compat import service
from app.openai_compat.errors import OPENAI_ERROR_RESPONSES, OpenAIRoute
from app.openai_compat.schemas import (
    CHECKPOINT_PREFIX,
    FileDeleted,
    FileObject,
    FineTuningJobCheckpointObject,
    FineTuningJobCreate,
    FineTuningJobEventObject,
    FineTuningJobObject,
)
from app.pagination import AfterQuery, ListPage, page_of
from app.storage import ObjectNotFound

router = APIRouter(
    prefix="/v1",
    route_class=OpenAIRoute,
    responses=OPENAI_ERROR_RESPONSES,
    dependencies=[REQUIRE_KEY],
)

FINE_TUNE = "fine-tune"
Limit = Annotated[int, Query(ge=1, le=100, description="Items per page (1-100).")]
Order = Annotated[Literal["asc", "desc"], Query(description="By creation time.")]

_FILE_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "Any format POST /v1/datasets takes, or OpenAI chat JSONL.",
                        },
                        "purpose": {"type": "string", "enum": [FINE_TUNE]},
                    },
                }
            }
        },
    }
}


def _file_object(row: object) -> FileObject:
    return FileObject.of_dataset(row) if isinstance(row, Dataset) else FileObject.of_artifact(row)  # type: ignore[arg-type]


def _require_fine_tune_purpose(fields: dict[str, str]) -> None:
    purpose = fields.get("purpose", "").strip()
    if purpose != FINE_TUNE:
        raise APIError(
            400,
            "invalid_request",
            f"purpose must be '{FINE_TUNE}' (got {purpose!r}): this service only keeps training "
            "and eval files",
            param="purpose",
        )


# ---- files -----------------------------------------------------------------------------------


@router.post(
    "/files",
    tags=["openai: files"],
    response_model=FileObject,
    openapi_extra=_FILE_UPLOAD_BODY,
)
async def create_file(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    settings: SettingsDep,
    storage: StorageDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FileObject:
    """A `fine-tune` file is a dataset: same validation, storage and record as /v1/datasets."""
    row, replayed = await accept_dataset_upload(
        request,
        settings=settings,
        storage=storage,
        tenant_id=principal.tenant_id,
        idempotency_key=idempotency_key,
        check_fields=_require_fine_tune_purpose,
    )
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return FileObject.of_dataset(row)


@router.get("/files", tags=["openai: files"], response_model=ListPage[FileObject])
def list_files(
    principal: PrincipalDep,
    session: SessionDep,
    after: AfterQuery = None,
    limit: Limit = 20,
    order: Order = "desc",
    purpose: str | None = None,
) -> dict:
    """Uploaded files (`fine-tune`) and job results (`fine-tune-results`), newest first."""
    rows = service.list_files(
        session=session,
        tenant_id=principal.tenant_id,
        purpose=purpose,
        after=after,
        limit=limit,
        order=order,
    )
    return page_of(rows, limit=limit, to_schema=_file_object)


@router.get("/files/{file_id}", tags=["openai: files"], response_model=FileObject)
def retrieve_file(file_id: str, principal: PrincipalDep, session: SessionDep) -> FileObject:
    return _file_object(
        service.get_file(session=session, tenant_id=principal.tenant_id, file_id=file_id)
    )


@router.get(
    "/files/{file_id}/content",
    tags=["openai: files"],
    response_class=FileResponse,
    responses=DOWNLOAD_RESPONSES,
)
def file_content(
    file_id: str, principal: PrincipalDep, session: SessionDep, storage: StorageDep
) -> Response:
    row = service.get_file(session=session, tenant_id=principal.tenant_id, file_id=file_id)
    media_type = getattr(row, "content_type", None) or "application/octet-stream"
    try:
        return stored_file_response(
            storage, key=row.storage_key, filename=row.filename, media_type=media_type
        )
    except ObjectNotFound:
        raise not_found("file", file_id) from None


@router.delete("/files/{file_id}", tags=["openai: files"], response_model=FileDeleted)
def delete_file(
    file_id: str, principal: PrincipalDep, session: SessionDep, storage: StorageDep
) -> FileDeleted:
    """409 while an active job uses the file; a result file can be deleted any time."""
    service.delete_file(
        session=session, storage=storage, tenant_id=principal.tenant_id, file_id=file_id
    )
    return FileDeleted(id=file_id)


# ---- fine-tuning jobs ------------------------------------------------------------------------


@router.post("/fine_tuning/jobs", tags=["openai: fine-tuning"], response_model=FineTuningJobObject)
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FineTuningJobObject:
    """Without `method`, a `grait` job with grait's defaults (see docs/service.md)."""
    idempotency = Idempotency.of(
        idempotency_key,
        tenant_id=principal.tenant_id,
        scope="POST /v1/fine_tuning/jobs",
        payload=body.model_dump(mode="json", exclude_unset=True),
    )
    job, replayed = service.create_job(
        session=session,
        storage=storage,
        settings=settings,
        tenant_id=principal.tenant_id,
        body=body,
        idempotency=idempotency,
    )
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return service.job_objects(session=session, jobs=[job])[0]


_METADATA_KEY = re.compile(r"^metadata\[(.+)\]$")


@router.get(
    "/fine_tuning/jobs", tags=["openai: fine-tuning"], response_model=ListPage[FineTuningJobObject]
)
def list_fine_tuning_jobs(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    after: AfterQuery = None,
    limit: Limit = 20,
) -> dict:
    """Newest first; filter with `metadata[key]=value` (every pair must match)."""
    metadata = {
        match.group(1): value
        for key, value in request.query_params.multi_items()
        if (match := _METADATA_KEY.match(key))
    }
    jobs = jobs_service.list_jobs(
        session=session,
        tenant_id=principal.tenant_id,
        after=after,
        limit=limit,
        metadata=metadata,
    )
    objects = service.job_objects(session=session, jobs=jobs)
    return page_of(objects, limit=limit, to_schema=lambda obj: obj)


@router.get(
    "/fine_tuning/jobs/{job_id}", tags=["openai: fine-tuning"], response_model=FineTuningJobObject
)
def retrieve_fine_tuning_job(
    job_id: str, principal: PrincipalDep, session: SessionDep
) -> FineTuningJobObject:
    job = jobs_service.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)
    return service.job_objects(session=session, jobs=[job])[0]


@router.post(
    "/fine_tuning/jobs/{job_id}/cancel",
    tags=["openai: fine-tuning"],
    response_model=FineTuningJobObject,
)
def cancel_fine_tuning_job(
    job_id: str, principal: PrincipalDep, session: SessionDep
) -> FineTuningJobObject:
    """Queued: cancelled at once. Running: stops at the next step boundary (`status` follows)."""
    job = jobs_service.cancel_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)
    return service.job_objects(session=session, jobs=[job])[0]


@router.get(
    "/fine_tuning/jobs/{job_id}/events",
    tags=["openai: fine-tuning"],
    response_model=ListPage[FineTuningJobEventObject],
)
def list_fine_tuning_events(
    job_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    after: AfterQuery = None,
    limit: Limit = 20,
) -> dict:
    """Newest first, like OpenAI's; `after` pages towards older events."""
    rows = jobs_service.list_events(
        session=session,
        tenant_id=principal.tenant_id,
        job_id=job_id,
        after=after,
        limit=limit,
        order="desc",
    )
    return page_of(rows, limit=limit, to_schema=FineTuningJobEventObject.of)


@router.get(
    "/fine_tuning/jobs/{job_id}/checkpoints",
    tags=["openai: fine-tuning"],
    response_model=ListPage[FineTuningJobCheckpointObject],
)
def list_fine_tuning_checkpoints(
    job_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    after: AfterQuery = None,
    limit: Limit = 10,
) -> dict:
    """The pipeline stages the job completed, newest first, each with its metrics."""
    job = jobs_service.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)
    cursor = None
    if after:
        if not after.startswith(CHECKPOINT_PREFIX):
            raise APIError(
                400,
                "invalid_request",
                f"after must be a checkpoint id like '{CHECKPOINT_PREFIX}12'",
                param="after",
            )
        cursor = EVENT_PREFIX + after.removeprefix(CHECKPOINT_PREFIX)
    rows = jobs_service.list_events(
        session=session,
        tenant_id=principal.tenant_id,
        job_id=job_id,
        after=cursor,
        limit=limit,
        order="desc",
        types=("stage_completed",),
    )
    return page_of(
        rows, limit=limit, to_schema=lambda row: FineTuningJobCheckpointObject.of(row, job)
    )
