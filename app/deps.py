"""What routes declare they need, as `Annotated` aliases (tests override one dependency)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth.ratelimit import get_limiter
from app.auth.service import Principal, authenticate
from app.db import in_request_session, request_session
from app.errors import APIError
from app.settings import Settings, get_settings
from app.storage import Storage, get_storage

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="`Authorization: Bearer <API key>`; keys come from `grait-service keys create`.",
)


def _storage(settings: Annotated[Settings, Depends(get_settings)]) -> Storage:
    return get_storage(settings)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(_storage)]


async def _principal(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The tenant behind the bearer key (401 otherwise), within its key's rate limit (429).

    The key lookup uses a session of its own, closed before the route runs, so an upload
    holds no connection while its body streams in.
    """
    if credentials is None or not credentials.credentials:
        raise APIError(
            401,
            "missing_api_key",
            "Send your API key as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = credentials.credentials
    principal = await in_request_session(
        settings, lambda session: authenticate(session=session, key=key)
    )
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


async def _session(settings: SettingsDep, _: PrincipalDep) -> AsyncIterator[Session]:
    """The route's session, opened only after authentication (see `app.db.request_session`).

    Depending on the principal orders the two: a request never waits for a second database
    slot while it holds one.
    """
    async with request_session(settings) as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]
