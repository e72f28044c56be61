"""Tenants and API keys: create, list, revoke, and resolve a presented key to its tenant.

A key is `gk_` + 43 url-safe characters (256 random bits); only its sha256 is stored, so a
lookup by hash is exact and a leaked table reveals no usable key. The first characters are
kept as `prefix` so people can tell their keys apart in `keys list`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import ApiKey, Tenant, new_id, utcnow

KEY_PREFIX = "gk_"
SHOWN_PREFIX_CHARS = 11  # "gk_" + 8 characters
DEFAULT_TENANT_NAME = "default"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    tenant_id: str
    key_id: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    """Standard Webhooks form: `whsec_` + base64 of 32 random bytes (the HMAC key)."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def get_or_create_tenant(*, session: Session, name: str) -> tuple[Tenant, bool]:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant, False
    tenant = Tenant(id=new_id("ten"), name=name, webhook_secret=new_webhook_secret())
    session.add(tenant)
    session.flush()
    return tenant, True


def create_key(
    *, session: Session, tenant_name: str, name: str | None = None, key: str | None = None
) -> tuple[ApiKey, str, Tenant, bool]:
    """(row, the key in clear — shown once, its tenant, whether the tenant was created)."""
    tenant, created = get_or_create_tenant(session=session, name=tenant_name)
    key = key or generate_key()
    row = ApiKey(
        id=new_id("key"),
        tenant_id=tenant.id,
        name=name,
        prefix=key[:SHOWN_PREFIX_CHARS],
        key_hash=hash_key(key),
    )
    session.add(row)
    session.commit()
    return row, key, tenant, created


def list_keys(*, session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, Tenant]]:
    query = select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.id)
    if tenant_name:
        query = query.where(Tenant.name == tenant_name)
    return [(key, tenant) for key, tenant in session.execute(query).all()]


def revoke_key(*, session: Session, key: str) -> ApiKey | None:
    """Revoke by id (`key-…`) or by the shown prefix (when it names exactly one key)."""
    rows = list(session.scalars(select(ApiKey).where((ApiKey.id == key) | (ApiKey.prefix == key))))
    if len(rows) != 1:
        return None
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.commit()
    return row


def authenticate(*, session: Session, key: str) -> Principal | None:
    if not key.startswith(KEY_PREFIX):
        return None
    row = session.execute(
        select(ApiKey.id, ApiKey.tenant_id).where(
            ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
        )
    ).first()
    return Principal(tenant_id=row.tenant_id, key_id=row.id) if row else None


def bootstrap_key(*, session: Session, key: str | None) -> str | None:
    """With no API key at all, register `key` (or a fresh one) for tenant `default`.

    Returns the key when it was generated here (the caller prints it, once), else None.
    """
    if session.scalar(select(func.count()).select_from(ApiKey)):
        return None
    _row, plain, _tenant, _ = create_key(
        session=session, tenant_name=DEFAULT_TENANT_NAME, name="bootstrap", key=key
    )
    return None if key else plain
