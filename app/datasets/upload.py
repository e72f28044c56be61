"""Stream one multipart upload straight to a staging file, counting bytes as they arrive.

Starlette's `request.form()` would spool the whole body to a temp file before we could
check its size; parsing the stream ourselves lets a too-large upload stop at the limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
from anyio.lowlevel import RunVar
from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session

from app.datasets import service
from app.db import in_request_session
from app.errors import APIError
from app.idempotency import Idempotency, run_idempotent
from app.models import Dataset, new_id
from app.settings import Settings
from app.storage import Storage, StorageError

MAX_FIELD_BYTES = 4096
MULTIPART_FRAMING_SLACK = 64 * 1024


class UploadTooLarge(Exception):
    pass


@dataclass
class ReceivedUpload:
    path: Path | None = None
    filename: str | None = None
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)


PARSE_SLOTS = 2
_parse_limiter: RunVar[anyio.CapacityLimiter] = RunVar("grait_upload_parse_limiter")


def parse_limiter() -> anyio.CapacityLimiter:
    """Uploads validating at once, per event loop (tests run several loops in one process)."""
    try:
        return _parse_limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(PARSE_SLOTS)
        _parse_limiter.set(limiter)
        return limiter


async def receive_upload(
    request: Request, staging: Path, *, max_bytes: int, file_field: str = "file"
) -> ReceivedUpload:
    """Write the `file_field` part to `staging`; collect small text fields. Raise on misuse."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise APIError(
            415,
            "unsupported_media_type",
            "Upload a file as multipart/form-data with a 'file' part.",
            param="file",
        )

    result = ReceivedUpload()
    digest = hashlib.sha256()
    state: dict[str, object] = {
        "headers": {},
        "header_field": b"",
        "header_value": b"",
        "name": None,
        "buf": None,
    }
    out = None
    too_large = False

    def on_part_begin() -> None:
        state["headers"] = {}
        state["name"] = None
        state["buf"] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] = state["header_field"] + data[start:end]  # type: ignore[operator]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] = state["header_value"] + data[start:end]  # type: ignore[operator]

    def on_header_end() -> None:
        headers = state["headers"]
        headers[bytes(state["header_field"]).lower()] = bytes(state["header_value"])  # type: ignore[index]
        state["header_field"] = b""
        state["header_value"] = b""

    def on_headers_finished() -> None:
        nonlocal out
        _disposition, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))  # type: ignore[union-attr]
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if name == file_field and b"filename" in opts:
            if out is not None:
                raise APIError(
                    400, "invalid_request", "Send exactly one 'file' part.", param="file"
                )
            result.filename = opts[b"filename"].decode("utf-8", "replace")
            result.path = staging
            out = staging.open("wb")
        else:
            state["buf"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal too_large
        chunk = data[start:end]
        if state["name"] == file_field and state["buf"] is None:
            result.size += len(chunk)
            if result.size > max_bytes:
                too_large = True
                raise UploadTooLarge
            digest.update(chunk)
            out.write(chunk)  # type: ignore[union-attr]
        else:
            buf = state["buf"]
            buf.extend(chunk)  # type: ignore[union-attr]
            if len(buf) > MAX_FIELD_BYTES:  # type: ignore[arg-type]
                raise APIError(
                    400,
                    "invalid_request",
                    f"Form field {state['name']!r} is too long.",
                    param=str(state["name"]),
                )

    def on_part_end() -> None:
        if state["buf"] is not None and state["name"]:
            result.fields[str(state["name"])] = bytes(state["buf"]).decode("utf-8", "replace")  # type: ignore[arg-type]

    parser = MultipartParser(
        boundary,
        callbacks={
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if too_large:
                if received > 2 * max_bytes + (1 << 20):
                    break  # stop draining a huge body; the connection closes instead
                continue  # drain the body so the client reads our 413 rather than a reset
            try:
                parser.write(chunk)
            except UploadTooLarge:
                pass
        parser.finalize()
    except BaseException:
        if out is not None:
            out.close()
        staging.unlink(missing_ok=True)
        raise
    if out is not None:
        out.close()
    if too_large:
        staging.unlink(missing_ok=True)
        raise APIError(
            413,
            "payload_too_large",
            f"The file exceeds the upload limit of {max_bytes} bytes.",
            param="file",
        )
    if result.path is None:
        raise APIError(400, "invalid_request", "The form has no 'file' part.", param="file")
    result.sha256 = digest.hexdigest()
    return result


async def accept_dataset_upload(
    request: Request,
    *,
    settings: Settings,
    storage: Storage,
    tenant_id: str,
    idempotency_key: str | None = None,
    check_fields: Callable[[dict[str, str]], None] | None = None,
) -> tuple[Dataset, bool]:
    """The one way a dataset file enters the service (`/v1/datasets` and `/v1/files`).

    Size-limited streaming, then `check_fields` on the small form fields (a face's own fields,
    e.g. `purpose`), then grait's validation; the staged file is removed on any failure.
    Returns (dataset, replayed): with an `Idempotency-Key` seen before for the same file and
    fields, the earlier dataset (a multipart body differs on every try by its boundary, so the
    request is identified by the file's sha256, its name and the form fields).
    The database session opens only once the body is in: a slow upload holds no connection.
    """
    declared = request.headers.get("content-length")
    if (
        declared
        and declared.isdigit()
        and int(declared) > settings.max_upload_bytes + MULTIPART_FRAMING_SLACK
    ):
        raise APIError(
            413,
            "payload_too_large",
            f"The upload exceeds the limit of {settings.max_upload_bytes} bytes.",
            param="file",
        )
    staging = storage.staging_path()
    upload = await receive_upload(request, staging, max_bytes=settings.max_upload_bytes)
    assert upload.path is not None
    try:
        if check_fields is not None:
            check_fields(upload.fields)
        idempotency = Idempotency.of(
            idempotency_key,
            tenant_id=tenant_id,
            scope=f"POST {request.url.path}",
            payload={"sha256": upload.sha256, "filename": upload.filename, **upload.fields},
        )
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    # The readers sniff MMLU by the .csv suffix, so the staged file keeps the client's one.
    suffix = "".join(
        c for c in Path(upload.filename or "").suffix.lower() if c.isalnum() or c == "."
    )
    suffix = suffix if len(suffix) > 1 else ""

    staged = upload.path.rename(upload.path.with_suffix(suffix)) if suffix else upload.path
    fmt = upload.fields.get("format", "auto").strip() or "auto"
    display = service.safe_filename(upload.filename or "dataset")
    dataset_id = new_id("ds")
    stored_key = service.dataset_key(dataset_id, display)
    try:
        # Parsed here, before the database gate: a large file holds no database slot. At
        # most PARSE_SLOTS parse at once: parsing is GIL-bound Python, and every extra
        # parsing thread takes GIL turns from the event loop and the threads serving reads
        # (16 concurrent parses slowed job reads from 13 ms to 1.6 s; bench.speed uploads).
        inspected = await anyio.to_thread.run_sync(
            partial(
                service.inspect_file,
                staged,
                format=fmt,
                display_name=display,
                max_rows=settings.max_dataset_rows,
            ),
            limiter=parse_limiter(),
        )
        # Stored before the gate too: an object store's multipart upload takes a while.
        await anyio.to_thread.run_sync(partial(storage.put_file, stored_key, staged, move=True))
    except BaseException:
        staged.unlink(missing_ok=True)
        raise

    def accept(session: Session) -> tuple[Dataset, bool]:
        def store() -> Dataset:
            return service.record_dataset(
                session=session,
                tenant_id=tenant_id,
                dataset_id=dataset_id,
                stored_key=stored_key,
                display_name=display,
                name=upload.fields.get("name"),
                inspected=inspected,
                size=upload.size,
                sha256=upload.sha256,
                idempotency=idempotency,
            )

        def load(earlier_id: str) -> Dataset:
            return service.get_dataset(session=session, tenant_id=tenant_id, dataset_id=earlier_id)

        return run_idempotent(
            idempotency, session=session, settings=settings, create=store, load=load
        )

    kept = False
    try:
        dataset, replayed = await in_request_session(settings, accept)
        kept = dataset.id == dataset_id
        return dataset, replayed
    finally:
        staged.unlink(missing_ok=True)  # moved into storage, unless storing failed
        if not kept:  # a replay, a conflict or a failed commit: the copy just stored goes
            with anyio.CancelScope(shield=True), suppress(StorageError):
                await anyio.to_thread.run_sync(
                    storage.delete_prefix, service.dataset_folder(stored_key)
                )
