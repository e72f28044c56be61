from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.datasets import service
from app.datasets.schemas import DatasetDeleted, DatasetObject
from app.datasets.upload import accept_dataset_upload
from app.deps import REQUIRE_KEY, PrincipalDep, SessionDep, SettingsDep, StorageDep
from app.errors import ERROR_RESPONSES
from app.idempotency import REPLAYED_HEADER, IdempotencyKeyHeader
from app.pagination import AfterQuery, LimitQuery, ListPage, page_of

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    responses=ERROR_RESPONSES,
    dependencies=[REQUIRE_KEY],
)

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
    request: Request,
    response: Response,
    principal: PrincipalDep,
    settings: SettingsDep,
    storage: StorageDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> DatasetObject:
    """Upload a QA file; it is stored only if every record reads cleanly."""
    row, replayed = await accept_dataset_upload(
        request,
        settings=settings,
        storage=storage,
        tenant_id=principal.tenant_id,
        idempotency_key=idempotency_key,
    )
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return DatasetObject.of(row)


@router.get("", response_model=ListPage[DatasetObject])
def list_datasets(
    principal: PrincipalDep, session: SessionDep, after: AfterQuery = None, limit: LimitQuery = 20
) -> dict:
    rows = service.list_datasets(
        session=session, tenant_id=principal.tenant_id, after=after, limit=limit
    )
    return page_of(rows, limit=limit, to_schema=DatasetObject.of)


@router.get("/{dataset_id}", response_model=DatasetObject)
def get_dataset(dataset_id: str, principal: PrincipalDep, session: SessionDep) -> DatasetObject:
    return DatasetObject.of(
        service.get_dataset(session=session, tenant_id=principal.tenant_id, dataset_id=dataset_id)
    )


@router.delete("/{dataset_id}", response_model=DatasetDeleted)
def delete_dataset(
    dataset_id: str, principal: PrincipalDep, session: SessionDep, storage: StorageDep
) -> DatasetDeleted:
    service.delete_dataset(
        session=session, storage=storage, tenant_id=principal.tenant_id, dataset_id=dataset_id
    )
    return DatasetDeleted(id=dataset_id)
