"""Engine and sessions. The schema itself comes only from Alembic (`migrations/`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.settings import Settings, get_settings


def make_engine(database_url: str, *, one_shot: bool = False) -> Engine:
    """`one_shot`: no pooling (migrations, start-up checks), so nothing lingers afterwards."""
    pooling: dict = {"poolclass": NullPool} if one_shot else {}
    if database_url.startswith("sqlite"):
        # API readers and a worker writer share the file: WAL lets readers proceed during a
        # write, and the busy timeout turns short lock waits into waits rather than errors.
        engine = create_engine(
            database_url, connect_args={"timeout": 5, "check_same_thread": False}, **pooling
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if one_shot:
        return create_engine(database_url, **pooling)
    return create_engine(database_url, pool_pre_ping=True, pool_size=5, max_overflow=10)


@lru_cache
def _factory_for(database_url: str) -> sessionmaker[Session]:
    return sessionmaker(make_engine(database_url), expire_on_commit=False)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    return _factory_for((settings or get_settings()).database_url)


@contextmanager
def short_session(settings: Settings | None = None) -> Iterator[Session]:
    """A session for one unit of work, committed on success; workers never hold one open."""
    with session_factory(settings)() as session, session.begin():
        yield session
