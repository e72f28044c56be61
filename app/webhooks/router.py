from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from app.deps import REQUIRE_KEY, PrincipalDep, SessionDep
from app.errors import ERROR_RESPONSES
from app.jobs import service as jobs_service
from app.models import Tenant, WebhookDelivery
from app.pagination import ListPage, page_of
from app.webhooks.schemas import WebhookDeliveryObject, WebhookSecretObject

router = APIRouter(
    prefix="/v1", tags=["webhooks"], responses=ERROR_RESPONSES, dependencies=[REQUIRE_KEY]
)


@router.get("/jobs/{job_id}/webhook_deliveries", response_model=ListPage[WebhookDeliveryObject])
def list_webhook_deliveries(job_id: str, principal: PrincipalDep, session: SessionDep) -> dict:
    """The job's terminal-state deliveries, each with every try (status, error, duration)."""
    jobs_service.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)
    rows = list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .options(selectinload(WebhookDelivery.tries))
            .order_by(WebhookDelivery.id)
        )
    )
    return page_of(rows, limit=len(rows) or 1, to_schema=WebhookDeliveryObject.of)


@router.get("/webhook_secret", response_model=WebhookSecretObject)
def get_webhook_secret(principal: PrincipalDep, session: SessionDep) -> WebhookSecretObject:
    """The secret your tenant's webhooks are signed with."""
    tenant = session.get(Tenant, principal.tenant_id)
    assert tenant is not None
    return WebhookSecretObject(secret=tenant.webhook_secret)
