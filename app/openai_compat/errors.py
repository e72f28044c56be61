"""OpenAI's error envelope for the OpenAI-compatible routes only.

`{"error": {"message", "type", "param", "code"}}` with the status codes the official client
maps to its exception classes. The service layer keeps raising `APIError`; this route class
renders what it raises. Our 422 (an invalid request) is OpenAI's 400, so the client raises
`openai.BadRequestError` where OpenAI's own API would; 4xx answers say `x-should-retry: false`
because the client otherwise retries a 409 (e.g. a file in use) as if it were a lock timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    DATABASE_DOWN_RETRY_AFTER,
    APIError,
    database_outage_message,
    describe_validation_errors,
    internal_error_message,
    is_database_outage,
    loc_to_param,
)
from app.request_ids import HEADER, request_id_of

log = logging.getLogger(__name__)

OPENAI_KNOBS = ("n_epochs", "batch_size", "learning_rate_multiplier")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request; `param` names the field (OpenAI's names), the message says why."),
        (401, "Missing, unknown or revoked API key (`openai.AuthenticationError`)."),
        (404, "Unknown id (another tenant's id is unknown too)."),
        (409, "Conflicts with the resource's state (a file in use, an Idempotency-Key reused)."),
        (413, "Request or upload too large."),
        (415, "Not multipart/form-data where a file is expected."),
        (429, "Rate limit or queued-jobs limit reached; see `Retry-After`."),
        (503, "The database is unreachable; retry after `Retry-After` seconds."),
    )
}


def openai_error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    status = 400 if status == 422 else status
    headers = dict(headers or {})
    if 400 <= status < 500 and status != 429:
        headers["x-should-retry"] = "false"
    return JSONResponse(
        status_code=status,
        content={
            "error": {
                "message": message,
                "type": _TYPES.get(status, "server_error" if status >= 500 else "api_error"),
                "param": param,
                "code": code,
            }
        },
        headers=headers or None,
    )


def describe_openai_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic errors in words a client can act on: an unknown hyperparameter is named as one."""
    message, param = describe_validation_errors(errors)
    first = errors[0] if errors else {}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "extra_forbidden" and loc:
        name = loc[-1]
        parent = loc_to_param(loc[:-1], skip_source=False)
        if len(loc) >= 2 and loc[-2] == "hyperparameters":
            from app.jobs.schemas import HYPERPARAMETER_GROUPS

            allowed = list(OPENAI_KNOBS) + (HYPERPARAMETER_GROUPS if "method" in loc else [])
            message = (
                f"{param}: unknown hyperparameter {name!r}; expected one of {', '.join(allowed)}"
            )
        else:
            message = f"{param}: unknown field {name!r}" + (f" in {parent}" if parent else "")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return message, param


class OpenAIRoute(APIRoute):
    """Renders every failure of its endpoint in OpenAI's envelope."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def openai_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as exc:
                return openai_error(
                    exc.status, exc.message, code=exc.code, param=exc.param, headers=exc.headers
                )
            except RequestValidationError as exc:
                message, param = describe_openai_validation(list(exc.errors()))
                return openai_error(400, message, code="invalid_request", param=param)
            except ValidationError as exc:
                message, param = describe_validation_errors(list(exc.errors()), skip_source=False)
                return openai_error(400, message, code="invalid_request", param=param)
            except StarletteHTTPException as exc:
                detail = exc.detail if isinstance(exc.detail, str) else "request failed"
                return openai_error(exc.status_code, detail)
            except Exception as exc:
                rid = request_id_of(request.scope)
                if is_database_outage(exc):
                    log.warning("database unavailable [%s]: %s", rid, exc)
                    return openai_error(
                        503,
                        database_outage_message(exc),
                        code="database_unavailable",
                        headers={"Retry-After": str(DATABASE_DOWN_RETRY_AFTER), HEADER: rid},
                    )
                log.error("unhandled error [%s] on %s", rid, request.url.path, exc_info=exc)
                return openai_error(
                    500, internal_error_message(rid), code="internal_error", headers={HEADER: rid}
                )

        return openai_handler
