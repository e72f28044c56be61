from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from app.datasets import service
from app.datasets.schemas import DatasetDeleted, DatasetObject
from app.datasets.upload import receive_upload
from app.deps import SessionDep, SettingsDep, StorageDep
from app.errors import ERROR_RESPONSES, APIError
from app.pagination import AfterQuery, LimitQuery, ListPage, page_of

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)

MULTIPART_FRAMING_SLACK = 64 * 1024

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL (canonical, ARC, NQ) or MMLU CSV.",
                        },
                        "format": {
                            "type": "string",
                            "enum": list(service.UPLOAD_FORMATS),
                            "default": "auto",
                        },
                        "name": {"type": "string", "description": "Label shown in reports."},
                    },
                }
            }
        },
    }
}


@router.post("", status_code=201, response_model=DatasetObject, openapi_extra=_UPLOAD_BODY)
async def upload_dataset(
    request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> DatasetObject:
    """Upload a QA file; it is stored only if every record reads cleanly."""
    declared = request.headers.get("content-length")
    if (
        declared
        and declared.isdigit()
        and int(declared) > settings.max_upload_bytes + MULTIPART_FRAMING_SLACK
    ):
        raise APIError(
            413,
            "payload_too_large",
            f"The upload exceeds the limit of {settings.max_upload_bytes} bytes.",
            param="file",
        )
    staging = storage.staging_path()
    upload = await receive_upload(request, staging, max_bytes=settings.max_upload_bytes)
    assert upload.path is not None
    # The readers sniff MMLU by the .csv suffix, so the staged file keeps the client's one.
    suffix = "".join(
        c for c in Path(upload.filename or "").suffix.lower() if c.isalnum() or c == "."
    )
    staged = upload.path.rename(upload.path.with_suffix(suffix)) if suffix else upload.path
    row = await run_in_threadpool(
        service.store_dataset,
        session=session,
        storage=storage,
        staged=staged,
        filename=upload.filename or "dataset",
        name=upload.fields.get("name"),
        format=upload.fields.get("format", "auto").strip() or "auto",
        size=upload.size,
        sha256=upload.sha256,
    )
    return DatasetObject.of(row)


@router.get("", response_model=ListPage[DatasetObject])
def list_datasets(session: SessionDep, after: AfterQuery = None, limit: LimitQuery = 20) -> dict:
    rows = service.list_datasets(session=session, after=after, limit=limit)
    return page_of(rows, limit=limit, to_schema=DatasetObject.of)


@router.get("/{dataset_id}", response_model=DatasetObject)
def get_dataset(dataset_id: str, session: SessionDep) -> DatasetObject:
    return DatasetObject.of(service.get_dataset(session=session, dataset_id=dataset_id))


@router.delete("/{dataset_id}", response_model=DatasetDeleted)
def delete_dataset(dataset_id: str, session: SessionDep, storage: StorageDep) -> DatasetDeleted:
    service.delete_dataset(session=session, storage=storage, dataset_id=dataset_id)
    return DatasetDeleted(id=dataset_id)
