"""The request body limit (`max_request_bytes`) of every request but the two uploads.

Uploads (`POST /v1/datasets`, `POST /v1/files`) are limited by `max_upload_bytes` in their own
streaming parser (`app.datasets.upload`), which answers 413 `payload_too_large`. Elsewhere a
declared Content-Length over the limit is refused before the body is read, and a chunked body
is cut off as soon as it passes the limit: 413 `request_too_large`.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body
from app.openai_compat.errors import openai_error
from app.settings import Settings

UPLOAD_PATHS = ("/v1/datasets", "/v1/files")
OPENAI_PREFIXES = ("/v1/files", "/v1/fine_tuning", "/v1/chat")


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


class BodyLimit:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or (
            scope["method"] == "POST" and path.rstrip("/") in UPLOAD_PATHS
        ):
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_request_bytes
        message = f"The request body exceeds the limit of {limit} bytes (GRAIT_MAX_REQUEST_BYTES)."
        declared = next(
            (value for name, value in scope["headers"] if name == b"content-length"), None
        )
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                await self._refuse(scope, receive, send, path, message)
                return
            await self.app(scope, receive, send)  # the server stops at Content-Length
            return
        # No declared length (chunked): read it here, at most `limit` bytes, then replay it.
        # These bodies are small JSON requests, so holding them is cheap.
        buffered: list[Message] = []
        received = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                buffered.append(msg)
                break
            received += len(msg.get("body", b""))
            if received > limit:
                await self._refuse(scope, receive, send, path, message)
                return
            buffered.append(msg)
            if not msg.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, path: str, message: str
    ) -> None:
        if is_openai_path(path):
            response = openai_error(413, message, code="request_too_large")
        else:
            response = JSONResponse(
                status_code=413, content=error_body("request_too_large", message)
            )
        response.headers["connection"] = "close"
        await response(scope, receive, send)


class RejectNul:
    """A URL holding a NUL character (`%00`) is refused with a 400 before any route runs.

    Ids and cursors go into SQL; Postgres text cannot hold NUL, so such a request would
    otherwise end as a database error (500) instead of a clear client error.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b"")
        ):
            message = "NUL characters (%00) are not allowed in URLs."
            if is_openai_path(scope.get("path", "")):
                response = openai_error(400, message, code="invalid_request")
            else:
                response = JSONResponse(
                    status_code=400, content=error_body("invalid_request", message)
                )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
