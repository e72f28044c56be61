"""`GET /v1/jobs/{id}/events/stream`: a job's events as Server-Sent Events, live.

Each event is sent once with its id (`id: evt-12`), so a client that reconnects with
`Last-Event-ID` (browsers' EventSource does) continues after the last event it saw. The
stream polls the event table through the request gate (no connection is held between
polls), sends a comment line as a keep-alive, and closes once the job has ended and its
last event is out.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from functools import partial

import anyio
from sqlalchemy.orm import Session

from app.db import in_request_session
from app.jobs import service
from app.jobs.lifecycle import TERMINAL_STATUSES
from app.jobs.schemas import EventObject
from app.settings import Settings

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
PAGE = 500


def sse_message(event: EventObject) -> str:
    body = json.dumps(event.model_dump(mode="json"), separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {body}\n\n"


def _page(
    session: Session, *, tenant_id: str, job_id: str, after: str | None
) -> tuple[list[EventObject], str]:
    """The job's status, then the next events after `after`.

    Status first: the terminal status event commits with the terminal status, so a status
    read as terminal guarantees the events read after it include the last one.
    """
    status = service.get_job(session=session, tenant_id=tenant_id, job_id=job_id).status
    rows = service.list_events(
        session=session, tenant_id=tenant_id, job_id=job_id, after=after, limit=PAGE
    )
    return [EventObject.of(r) for r in rows[:PAGE]], status


async def event_stream(
    settings: Settings, *, tenant_id: str, job_id: str, after: str | None
) -> AsyncIterator[str]:
    """Yields SSE messages until the job is terminal and every event has been sent."""
    last_sent = time.monotonic()
    yield "retry: 2000\n\n"  # how long an EventSource waits before reconnecting
    while True:
        read = partial(_page, tenant_id=tenant_id, job_id=job_id, after=after)
        events, status = await in_request_session(settings, read)
        for event in events:
            yield sse_message(event)
            after = event.id
        if events:
            last_sent = time.monotonic()
        if len(events) == PAGE:
            continue  # more are waiting
        if status in TERMINAL_STATUSES:
            return  # read after the terminal status: this page held the last event
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await anyio.sleep(POLL_SECONDS)
