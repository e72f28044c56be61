"""The webhook outbox: a delivery row written in the transaction that ends a job.

Whoever ends a job (the API's cancel, the worker's finish, the sweeper) calls this inside its
own transaction, so no terminal state goes unannounced; `app.webhooks.service` sends them.
No web framework here: the worker imports it.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Job, WebhookDelivery, new_id, utcnow


def enqueue_terminal(
    session: Session, *, job_id: str, status: str, error: tuple[str, str] | None = None
) -> None:
    """Within the transaction that ends the job: the delivery announcing it, if it has a URL."""
    row = session.execute(
        select(Job.webhook_url, Job.user_metadata, Job.suffix).where(Job.id == job_id)
    ).first()
    if row is None or not row.webhook_url:
        return
    event_type = f"job.{status}"
    now = utcnow()
    session.add(
        WebhookDelivery(
            id=new_id("msg"),
            job_id=job_id,
            event_type=event_type,
            url=row.webhook_url,
            payload={
                "type": event_type,
                "timestamp": now.isoformat(),
                "data": {
                    "id": job_id,
                    "object": "grait.job",
                    "status": status,
                    "error": {"code": error[0], "message": error[1]} if error else None,
                    "suffix": row.suffix,
                    "metadata": row.user_metadata,
                },
            },
            status="pending",
            attempts=0,
            next_attempt_at=now,
        )
    )
