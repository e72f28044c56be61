"""A request id on every response (`X-Request-ID`), and in every 500/503 body and log line.

Server errors answer with the id and nothing internal (no exception text, SQL, hosts or
paths): the details go to the log under the same id, so a user quoting it can be helped
without the API telling anyone how it is built.
"""

from __future__ import annotations

import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
# A caller's own id is kept when it is short and plain (it may be echoed in logs and headers).
_CALLER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


def request_id_of(scope: Scope) -> str:
    """The id of this request, set by RequestIds (or made now, for errors raised outside it)."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        state["request_id"] = new_request_id()
    return str(state["request_id"])


class RequestIds:
    """Pure ASGI: sets the id before anything else runs, adds the header to the response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == HEADER.encode()), b"").decode(
            "latin-1"
        )
        state = scope.setdefault("state", {})
        state["request_id"] = given if _CALLER_ID.match(given) else new_request_id()

        async def with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != HEADER.encode()]
                headers.append((HEADER.encode(), state["request_id"].encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_header)
