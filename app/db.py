"""Engine and sessions. The schema itself comes only from Alembic (`migrations/`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache
from typing import TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.settings import Settings, get_settings

T = TypeVar("T")

# Connections per process: the API's requests, the embedded worker's bookkeeping and the
# webhook sender share them.
POOL_SIZE = 5
MAX_OVERFLOW = 10
# Requests allowed to hold a session at once. Kept under the pool and far under AnyIO's 40
# worker threads, so a request that holds a connection always finds a thread to finish on.
REQUEST_SLOTS = POOL_SIZE + MAX_OVERFLOW - 2


def make_engine(database_url: str, *, one_shot: bool = False) -> Engine:
    """`one_shot`: no pooling (migrations, start-up checks), so nothing lingers afterwards."""
    pooling: dict = (
        {"poolclass": NullPool}
        if one_shot
        else {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW}
    )
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
    return create_engine(database_url, pool_pre_ping=True, **pooling)


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


# One gate per event loop (tests run several loops in one process).
_gate: RunVar[anyio.Semaphore] = RunVar("grait_db_request_gate")


def request_gate() -> anyio.Semaphore:
    """Admission to database work from the event loop; see `request_session` for why.

    Anything a request does that checks out a connection on a worker thread goes through it.
    """
    try:
        return _gate.get()
    except LookupError:
        gate = anyio.Semaphore(REQUEST_SLOTS)
        _gate.set(gate)
        return gate


@asynccontextmanager
async def request_session(settings: Settings) -> AsyncIterator[Session]:
    """A session for one request's database work, admitted through the request gate.

    Why the gate: a sync route hops between worker threads (dependency, handler, response
    validation) while its session holds a pooled connection. With more requests in flight
    than connections, every worker thread could end up blocked in the pool's checkout while
    the connections' holders wait for a thread to finish on, and nothing moves (this is
    what 100 concurrent pollers did). Waiting here, on the event loop, costs no thread.
    """
    async with request_gate():
        session = session_factory(settings)()
        try:
            yield session
        finally:
            # Shielded: a client that hangs up must not leak the connection. Its own limiter:
            # closing never queues behind requests waiting for a worker thread.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_close, session, limiter=anyio.CapacityLimiter(1))


async def in_request_session(settings: Settings, work: Callable[[Session], T]) -> T:
    """Run `work(session)` on a worker thread within a gated session, opened and closed here."""
    async with request_session(settings) as session:
        return await anyio.to_thread.run_sync(work, session)


def _close(session: Session) -> None:
    try:
        session.close()
    except Exception:  # noqa: BLE001 - a connection that died mid-request is discarded
        session.invalidate()


def is_database_outage(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, TimeoutError

    if isinstance(exc, (OperationalError, InterfaceError, TimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
