"""What routes declare they need, as `Annotated` aliases (tests override one dependency)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from app.db import session_factory
from app.settings import Settings, get_settings
from app.storage import Storage, get_storage


def _session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with session_factory(settings)() as session:
        yield session


def _storage(settings: Annotated[Settings, Depends(get_settings)]) -> Storage:
    return get_storage(settings)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(_session)]
StorageDep = Annotated[Storage, Depends(_storage)]
