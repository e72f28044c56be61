"""What routes declare they need, as `Annotated` aliases (tests override one dependency)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth.ratelimit import get_limiter
from app.auth.service import Principal, authenticate
from app.db import session_factory
from app.errors import APIError
from app.settings import Settings, get_settings
from app.storage import Storage, get_storage

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="`Authorization: Bearer <API key>`; keys come from `grait-service keys create`.",
)


def _session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    session = session_factory(settings)()
    try:
        yield session
    finally:
        try:
            session.close()
        except Exception:  # noqa: BLE001 - a connection that died mid-request is discarded
            session.invalidate()


def _storage(settings: Annotated[Settings, Depends(get_settings)]) -> Storage:
    return get_storage(settings)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(_session)]
StorageDep = Annotated[Storage, Depends(_storage)]


def _principal(
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The tenant behind the bearer key (401 otherwise), within its key's rate limit (429)."""
    if credentials is None or not credentials.credentials:
        raise APIError(
            401,
            "missing_api_key",
            "Send your API key as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = authenticate(session=session, key=credentials.credentials)
    if principal is None:
        raise APIError(
            401,
            "invalid_api_key",
            "The API key is unknown or revoked.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    wait = get_limiter(settings).take(principal.key_id)
    if wait > 0:
        retry_after = max(1, math.ceil(wait))
        raise APIError(
            429,
            "rate_limited",
            f"Too many requests for this API key (limit {settings.rate_limit_per_second:g}/s, "
            f"burst {settings.rate_limit_burst}); retry in {retry_after}s.",
            headers={"Retry-After": str(retry_after)},
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(_principal)]
# Routers add this so no route under them is reachable without a key.
REQUIRE_KEY = Depends(_principal)
