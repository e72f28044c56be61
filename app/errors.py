"""One error shape for every 4xx/5xx: `{"error": {"code", "message", "param"}}`.

Programs branch on `code`; `param` names the request field at fault (dotted path), so a
client can point at the exact input to fix.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import is_database_outage
from app.request_ids import HEADER, request_id_of

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Malformed request (e.g. a bad Idempotency-Key or multipart form)."),
        (401, "Missing, unknown or revoked API key."),
        (404, "Unknown id or route (another tenant's id is unknown too)."),
        (409, "Conflicts with the resource's state (dataset in use, Idempotency-Key reused)."),
        (413, "Request or upload too large."),
        (415, "Not multipart/form-data where a file is expected."),
        (422, "Invalid request; `param` names the field, e.g. `hyperparameters.training.epochs`."),
        (429, "Rate limit or queued-jobs limit reached; see `Retry-After`."),
        (503, "The database is unreachable; retry after `Retry-After` seconds."),
    )
}

# Connection-level database failures: the request was fine, the database was not there.
DATABASE_DOWN_RETRY_AFTER = 5


def database_outage_message(exc: BaseException) -> str:
    """What a caller may know of an outage: that it is one (the driver's text names hosts)."""
    return "The database is unavailable; retry shortly."


def internal_error_message(request_id: str) -> str:
    return f"Internal server error. Quote request id {request_id} when reporting it."


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers
        self.extra = extra


def not_found(kind: str, id: str) -> APIError:
    return APIError(404, "not_found", f"No {kind} with id {id!r}.", param="id")


def error_body(code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param, **extra}}


def loc_to_param(loc: tuple[Any, ...] | list[Any], *, skip_source: bool = True) -> str | None:
    """('body', 'hyperparameters', 'training', 'epochs') -> 'hyperparameters.training.epochs'."""
    parts = list(loc)
    if skip_source and parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def describe_validation_errors(
    errors: list[dict[str, Any]], *, prefix: str = "", skip_source: bool = True
) -> tuple[str, str | None]:
    """(message, param) for a list of Pydantic errors: the first one, and how many more."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = loc_to_param(first.get("loc", ()), skip_source=skip_source)
    if prefix:
        param = f"{prefix}.{param}" if param else prefix
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return message, param


def validation_error_response(
    errors: list[dict[str, Any]], *, prefix: str = "", skip_source: bool = True
) -> JSONResponse:
    message, param = describe_validation_errors(errors, prefix=prefix, skip_source=skip_source)
    return JSONResponse(status_code=422, content=error_body("invalid_request", message, param))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status,
            content=error_body(exc.code, exc.message, exc.param, **exc.extra),
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _model_validation(_request: Request, exc: ValidationError) -> JSONResponse:
        return validation_error_response(list(exc.errors()), skip_source=False)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            400: "invalid_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
        }
        code = codes.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "No such route."
        return JSONResponse(
            status_code=exc.status_code,
            content=error_body(code, message),
            headers=getattr(exc, "headers", None),
        )

    async def _database_error(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id_of(request.scope)
        if is_database_outage(exc):
            log.warning("database unavailable [%s]: %s", rid, exc)
            return JSONResponse(
                status_code=503,
                content=error_body(
                    "database_unavailable", database_outage_message(exc), request_id=rid
                ),
                headers={"Retry-After": str(DATABASE_DOWN_RETRY_AFTER), HEADER: rid},
            )
        log.error("database error [%s] on %s", rid, request.url.path, exc_info=exc)
        return _internal_error(rid)

    # Registered by class so they are answered inside the app, like APIError, not by the
    # outermost server-error layer (which also re-raises and may drop the connection).
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeout, _database_error)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        if is_database_outage(exc):
            return await _database_error(request, exc)
        rid = request_id_of(request.scope)
        log.error("unhandled error [%s] on %s", rid, request.url.path, exc_info=exc)
        return _internal_error(rid)


def _internal_error(rid: str) -> JSONResponse:
    return JSONResponse(
        status_code=500,
        content=error_body("internal_error", internal_error_message(rid), request_id=rid),
        headers={HEADER: rid},
    )
