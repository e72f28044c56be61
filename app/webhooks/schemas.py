from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.models import WebhookAttempt, WebhookDelivery


class WebhookAttemptObject(BaseModel):
    attempt: int
    started_at: float
    duration_ms: float
    response_status: int | None = Field(description="The receiver's HTTP status; null if none.")
    error: str | None = Field(description="Why the try failed; null for a 2xx answer.")

    @classmethod
    def of(cls, row: WebhookAttempt) -> WebhookAttemptObject:
        return cls(
            attempt=row.attempt,
            started_at=round(row.started_at.timestamp(), 3),
            duration_ms=row.duration_ms,
            response_status=row.response_status,
            error=row.error,
        )


class WebhookDeliveryObject(BaseModel):
    id: str = Field(description="The `webhook-id` header of every try.")
    object: Literal["grait.webhook_delivery"] = "grait.webhook_delivery"
    job_id: str
    event_type: str = Field(description="job.succeeded | job.failed | job.cancelled")
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: list[WebhookAttemptObject]
    next_attempt_at: float | None
    created_at: float
    finished_at: float | None

    @classmethod
    def of(cls, row: WebhookDelivery) -> WebhookDeliveryObject:
        return cls(
            id=row.id,
            job_id=row.job_id,
            event_type=row.event_type,
            url=row.url,
            status=row.status,  # type: ignore[arg-type]
            attempts=[WebhookAttemptObject.of(t) for t in row.tries],
            next_attempt_at=row.next_attempt_at.timestamp() if row.next_attempt_at else None,
            created_at=round(row.created_at.timestamp(), 3),
            finished_at=row.finished_at.timestamp() if row.finished_at else None,
        )


class WebhookSecretObject(BaseModel):
    object: Literal["grait.webhook_secret"] = "grait.webhook_secret"
    secret: str = Field(description="`whsec_<base64>`: verify `webhook-signature` with it.")
