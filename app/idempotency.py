"""`Idempotency-Key` on create requests: a retry gets the original object, not a second one.

The record (tenant, scope, key) -> (digest of the request, id of what it created) is written
in the same transaction as the object itself, so there is no half state: either both exist or
neither does. Two concurrent requests with one key race on the record's primary key; the loser
rolls back (no second object) and answers with the winner's object. The same key with another
request is a 409. Records expire after `idempotency_ttl_seconds`.

Replays answer with the object as it is now (a job's status may have moved on), with the
status code of the original answer and the header `Idempotent-Replayed: true`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Header
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import APIError
from app.models import IdempotencyRecord, utcnow
from app.settings import Settings

T = TypeVar("T")
REPLAYED_HEADER = "Idempotent-Replayed"

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Any unique string (up to 255 characters, e.g. a UUID). A retry with the "
        "same key and the same request returns the original object; with another request, 409.",
    ),
]


def request_digest(payload: Any) -> str:
    return hashlib.sha256(
        json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


@dataclass
class Idempotency:
    tenant_id: str
    scope: str  # "POST /v1/jobs": a key is per tenant and per route
    key: str
    request_hash: str

    @classmethod
    def of(cls, key: str | None, *, tenant_id: str, scope: str, payload: Any) -> Idempotency | None:
        if key is None:
            return None
        if not key or len(key) > 255 or not key.isprintable():
            raise APIError(
                400,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1-255 printable characters.",
                param="Idempotency-Key",
            )
        return cls(tenant_id, scope, key, request_digest(payload))

    def record(self, resource_id: str) -> IdempotencyRecord:
        """The row to add in the transaction that creates `resource_id`."""
        return IdempotencyRecord(
            tenant_id=self.tenant_id,
            scope=self.scope,
            key=self.key,
            request_hash=self.request_hash,
            resource_id=resource_id,
        )

    def existing(self, *, session: Session, settings: Settings) -> str | None:
        """The id an earlier request with this key created (None: go ahead); 409 on mismatch."""
        row = session.get(IdempotencyRecord, (self.tenant_id, self.scope, self.key))
        if row is None:
            return None
        if row.created_at < utcnow() - timedelta(seconds=settings.idempotency_ttl_seconds):
            session.delete(row)
            session.commit()
            return None
        if row.request_hash != self.request_hash:
            raise APIError(
                409,
                "idempotency_key_reused",
                f"Idempotency-Key {self.key!r} was used for a different {self.scope} request "
                f"(which created {row.resource_id}); use a new key for a new request.",
                param="Idempotency-Key",
            )
        return row.resource_id


def run_idempotent(
    idempotency: Idempotency | None,
    *,
    session: Session,
    settings: Settings,
    create: Callable[[], T],
    load: Callable[[str], T],
) -> tuple[T, bool]:
    """(object, replayed): `load` the earlier request's object, or `create` a new one."""
    if idempotency is None:
        return create(), False
    earlier = idempotency.existing(session=session, settings=settings)
    if earlier is not None:
        return load(earlier), True
    try:
        return create(), False
    except IntegrityError:
        session.rollback()
        earlier = idempotency.existing(session=session, settings=settings)
        if earlier is None:
            raise
        return load(earlier), True
