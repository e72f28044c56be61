"""A stored object as an HTTP download, whichever store holds it.

A local store's file is served as it is (`FileResponse`: ranges, ETag, Last-Modified, as
before object storage existed). An object store's is either streamed through the API (one
GET, its chunks passed on as they arrive, never the whole file in memory) or, with
`GRAIT_STORAGE_PRESIGN_DOWNLOADS`, answered with 307 to a presigned URL so the bytes skip the
API. Both check the object first: a missing one raises `ObjectNotFound` before any status
line, and each route answers it with its own 404.
"""

from __future__ import annotations

from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from app.storage import LocalStorage, S3Storage, Storage, content_disposition

# For a download route's OpenAPI entry (its 200 is the file).
DOWNLOAD_RESPONSES: dict[int | str, dict[str, str]] = {
    307: {"description": "To a presigned object-store URL (GRAIT_STORAGE_PRESIGN_DOWNLOADS)."}
}


def stored_file_response(storage: Storage, *, key: str, filename: str, media_type: str) -> Response:
    """Blocking (a HEAD or GET to the store): call it from a sync route or a thread."""
    if isinstance(storage, LocalStorage):
        return FileResponse(storage.fetch(key), media_type=media_type, filename=filename)
    if isinstance(storage, S3Storage) and (url := storage.presigned_url(key)):
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    info, chunks = storage.stream(key)
    headers = {
        "Content-Length": str(info.size),
        "Content-Disposition": content_disposition(filename),
    }
    if info.etag:
        headers["ETag"] = info.etag
    return StreamingResponse(chunks, media_type=media_type, headers=headers)
