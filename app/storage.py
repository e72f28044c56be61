"""Where uploaded datasets and job artifacts live, behind one small interface.

Two stores, chosen by `GRAIT_STORAGE_BACKEND`:
- `LocalStorage` (`local`, the embedded default): a directory, shared by the API and the
  workers (one machine, or a volume).
- `S3Storage` (`s3`): a bucket of an S3-compatible object store (S3, MinIO, R2, GCS's XML
  API), which is how several machines share datasets and artifacts.

Keys are relative slash paths (`datasets/<id>/<file name>`, `jobs/<id>/attempt-<n>/<file
name>`); their last part is the name a download gets. Code that needs a file on disk (the
worker reading a dataset, the planner, the serving process unpacking an adapter) asks
`fetch(key)`: a local store answers with its own file; an object store downloads the object
once into this machine's cache (`<storage_dir>/cache`, renamed into place when complete) and
reuses it while the object's ETag is the same. HTTP downloads go through
`app.downloads.stored_file_response`, which streams or redirects to a presigned URL.

Errors name the key only: `ObjectNotFound` for a missing object, `StorageError` for a store
that failed (the client's own error, with its URLs and bucket, stays its `__cause__`, for
the logs), so neither a 500 nor a job's error message shows server paths or bucket internals.

The S3 client is obstore (the Rust `object_store` crate): measured against boto3 and s3fs
(`python -m bench.storage`, numbers and reasons in docs/service.md).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from app.settings import Settings, get_settings

if TYPE_CHECKING:
    from obstore.store import S3Store

CHUNK_BYTES = 1024 * 1024
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class ObjectNotFound(FileNotFoundError):
    """No object under this key (its message names the key, never a path or a bucket)."""

    def __init__(self, key: str):
        super().__init__(f"no stored object {key!r}")
        self.key = key


class StorageError(RuntimeError):
    """The object store failed an operation; the message names the operation and the key."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str | None


class Storage(Protocol):
    def staging_path(self, suffix: str = "") -> Path:
        """A fresh local file name for an upload in progress (`put_file(move=True)` takes it)."""
        ...

    def put_file(
        self, key: str, source: Path, *, move: bool = False, content_type: str | None = None
    ) -> int:
        """Store `source` under `key` (streamed, never read whole into memory); its size."""
        ...

    def fetch(self, key: str) -> Path:
        """A local file with the object's bytes, to read (never to write); `ObjectNotFound`."""
        ...

    def stream(self, key: str) -> tuple[ObjectInfo, Iterable[bytes]]:
        """The object's size and ETag and its bytes in chunks; `ObjectNotFound` before any."""
        ...

    def stat(self, key: str) -> ObjectInfo: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None:
        """Every object under the folder `prefix` (whole path segments: `a/b` spares `a/bc`)."""
        ...


def content_disposition(filename: str) -> str:
    """`attachment` with the file name, RFC 6266 style (as Starlette's FileResponse writes it)."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


def _checked(key: str) -> str:
    """A key is a relative slash path without `.`/`..` or empty segments."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key: {key!r}")
    return key


class LocalStorage:
    def __init__(self, root: Path):
        self.root = root.resolve()
        (self.root / "staging").mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    def staging_path(self, suffix: str = "") -> Path:
        """A fresh file name on the same filesystem, so `put_file(move=True)` is a rename."""
        return self.root / "staging" / f"{uuid.uuid4().hex}{suffix}"

    def put_file(
        self, key: str, source: Path, *, move: bool = False, content_type: str | None = None
    ) -> int:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        size = source.stat().st_size
        if move:
            os.replace(source, target)
        else:
            tmp = target.with_name(target.name + ".partial")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        return size

    def fetch(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path

    def stream(self, key: str) -> tuple[ObjectInfo, Iterable[bytes]]:
        try:
            handle = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(CHUNK_BYTES):
                    yield chunk

        return ObjectInfo(size=os.fstat(handle.fileno()).st_size, etag=None), chunks()

    def stat(self, key: str) -> ObjectInfo:
        return ObjectInfo(size=self.fetch(key).stat().st_size, etag=None)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class S3Config:
    bucket: str
    root: Path  # this machine's staging and cache
    endpoint_url: str | None = None
    public_endpoint_url: str | None = None
    prefix: str = ""
    region: str = "us-east-1"
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    presign_expires_seconds: int | None = None  # None: downloads stream through the API
    part_bytes: int = 8 * 1024 * 1024
    cache_max_bytes: int = 20 * 1024**3
    # Parts in flight per upload: memory stays near concurrency x part_bytes whatever the size.
    upload_concurrency: int = 4

    @classmethod
    def of(cls, settings: Settings) -> S3Config:
        assert settings.storage_bucket
        secret = settings.storage_secret_access_key
        key_id = settings.storage_access_key_id
        return cls(
            bucket=settings.storage_bucket,
            root=settings.storage_dir.resolve(),
            endpoint_url=settings.storage_endpoint_url,
            public_endpoint_url=settings.storage_public_endpoint_url,
            prefix=settings.storage_prefix.strip("/"),
            region=settings.storage_region,
            access_key_id=key_id.get_secret_value() if key_id else None,
            secret_access_key=secret.get_secret_value() if secret else None,
            presign_expires_seconds=(
                settings.storage_presign_expires_seconds
                if settings.storage_presign_downloads
                else None
            ),
            part_bytes=settings.storage_part_bytes,
            cache_max_bytes=settings.storage_cache_max_bytes,
        )


_ETAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
CACHE_RECENT_SECONDS = 600.0


class S3Storage:
    """A bucket (under an optional key prefix), with a local staging folder and fetch cache."""

    def __init__(self, config: S3Config):
        self.config = config
        self._store = self._client(config.endpoint_url)
        # Signing is offline, but the URL's host is signed too: sign for the name clients use.
        self._signer = (
            self._client(config.public_endpoint_url) if config.public_endpoint_url else self._store
        )
        self.staging = config.root / "staging"
        self.cache = config.root / "cache"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)

    def _client(self, endpoint: str | None) -> S3Store:
        from obstore.store import S3Store

        c = self.config
        options: dict[str, Any] = {"region": c.region}
        if endpoint:
            # MinIO and most S3-compatible stores want path-style requests; AWS takes both.
            options.update(endpoint=endpoint, virtual_hosted_style_request=False)
        if c.access_key_id:
            options.update(access_key_id=c.access_key_id, secret_access_key=c.secret_access_key)
        return S3Store(
            c.bucket,
            prefix=c.prefix or None,
            config=options,  # type: ignore[arg-type]
            client_options={
                "allow_http": bool(endpoint and endpoint.startswith("http://")),
                "connect_timeout": "10s",
                # The client's default (30 s) bounds a whole request, body included: a large
                # dataset on a slow link would be cut off mid-download.
                "timeout": "3600s",
            },
            # Few and short retries: a request waits on them, and an outage should show.
            retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=20)},
        )

    @contextmanager
    def _errors(self, operation: str, key: str) -> Iterator[None]:
        """The client's errors as ours: they name the key, not the endpoint or the bucket."""
        from obstore.exceptions import BaseError, NotFoundError

        try:
            yield
        except (FileNotFoundError, NotFoundError):
            raise ObjectNotFound(key) from None
        except (BaseError, OSError) as exc:
            raise StorageError(f"object store: {operation} {key!r} failed") from exc

    def staging_path(self, suffix: str = "") -> Path:
        return self.staging / f"{uuid.uuid4().hex}{suffix}"

    def put_file(
        self, key: str, source: Path, *, move: bool = False, content_type: str | None = None
    ) -> int:
        """A multipart upload of `source` (parts of `part_bytes`) when it is larger than a part.

        The object carries its type and download name, so a presigned URL serves it as the
        API would. With `move`, the file becomes this machine's cached copy.
        """
        import obstore

        _checked(key)
        size = source.stat().st_size
        with self._errors("put", key):
            result = obstore.put(
                self._store,
                key,
                source,
                attributes={
                    "Content-Type": content_type or DEFAULT_CONTENT_TYPE,
                    "Content-Disposition": content_disposition(key.rsplit("/", 1)[-1]),
                },
                chunk_size=self.config.part_bytes,
                max_concurrency=self.config.upload_concurrency,
            )
        if move:
            cached = self._cached(key, result.get("e_tag"))
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, cached)  # same filesystem: staging and cache share the root
            self.trim_cache()
        return size

    def _cached(self, key: str, etag: str | None) -> Path:
        """This machine's copy of one version of `key`: cache/<folder>/<etag>/<file name>.

        The file keeps its name (a dataset's name labels its eval set in the report).
        """
        folder, _, name = _checked(key).rpartition("/")
        version = _ETAG_UNSAFE.sub("", etag or "") or "no-etag"
        return self.cache / folder / version / name

    def fetch(self, key: str) -> Path:
        import obstore

        info = self.stat(key)
        cached = self._cached(key, info.etag)
        if cached.is_file() and cached.stat().st_size == info.size:
            os.utime(cached)  # used now: the last to be trimmed
            return cached
        with self._errors("fetch", key):
            result = obstore.get(self._store, key)
            chunks = iter(result.stream(min_chunk_size=CHUNK_BYTES))
        # Named after what this GET returned, should the object have changed since the HEAD.
        got = ObjectInfo(size=result.meta["size"], etag=result.meta["e_tag"])
        cached = self._cached(key, got.etag)
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.partial")
        try:
            written = 0
            with partial.open("wb") as out:
                while True:
                    with self._errors("fetch", key):
                        chunk = next(chunks, None)
                    if chunk is None:
                        break
                    out.write(chunk)
                    written += len(chunk)
            if written != got.size:
                raise StorageError(f"object store: fetch {key!r} got {written} of {got.size} bytes")
            # Atomic: a concurrent reader sees the whole file or none, and racing fetches of
            # the same version write identical bytes.
            os.replace(partial, cached)
        finally:
            partial.unlink(missing_ok=True)
        self.trim_cache()
        return cached

    def trim_cache(self, *, recent_seconds: float = CACHE_RECENT_SECONDS) -> int:
        """Delete cached copies, least recently used first, until the cache fits its cap.

        Copies used within `recent_seconds` stay: a job may be about to open the path
        `fetch` just gave it. (A file already open stays readable after its unlink.)
        Returns the bytes freed.
        """
        files = []
        for path in self.cache.rglob("*"):
            if path.name.endswith(".partial"):
                continue  # a fetch in progress
            try:
                stat = path.stat()
            except FileNotFoundError:  # trimmed or deleted meanwhile
                continue
            if path.is_file():
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        limit = self.config.cache_max_bytes
        if total <= limit:
            return 0
        freed = 0
        horizon = time.time() - recent_seconds
        for mtime, size, path in sorted(files):
            if total - freed <= limit or mtime > horizon:
                break
            path.unlink(missing_ok=True)
            freed += size
        return freed

    def stream(self, key: str) -> tuple[ObjectInfo, Iterable[bytes]]:
        """One GET: a missing object fails here, before the caller sends a status line.

        The chunks are obstore's stream, iterable both ways; an ASGI response reads it with
        `async for` on the event loop, without a thread per chunk.
        """
        import obstore

        with self._errors("get", _checked(key)):
            result = obstore.get(self._store, key)
        info = ObjectInfo(size=result.meta["size"], etag=result.meta["e_tag"])
        return info, result.stream(min_chunk_size=CHUNK_BYTES)

    def presigned_url(self, key: str) -> str | None:
        """A URL that serves the object without the API for `presign_expires_seconds`, when
        downloads are presigned (None otherwise); checks first that the object exists."""
        import obstore

        expires = self.config.presign_expires_seconds
        if expires is None:
            return None
        self.stat(key)
        with self._errors("sign", key):
            return obstore.sign(self._signer, "GET", key, timedelta(seconds=expires))

    def stat(self, key: str) -> ObjectInfo:
        import obstore

        with self._errors("head", _checked(key)):
            meta = obstore.head(self._store, key)
        return ObjectInfo(size=meta["size"], etag=meta["e_tag"])

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        import obstore

        with self._errors("delete", _checked(key)):
            obstore.delete(self._store, key)
        folder, _, name = key.rpartition("/")
        versions = self.cache / folder
        if versions.is_dir():
            for version in versions.iterdir():
                (version / name).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        import obstore

        prefix = _checked(prefix.strip("/"))
        with self._errors("delete_prefix", prefix):
            # object_store matches whole segments, so `a/b` lists `a/b/...` but not `a/bc`.
            keys = [meta["path"] for batch in obstore.list(self._store, prefix) for meta in batch]
            if keys:
                obstore.delete(self._store, keys)  # DeleteObjects, 1000 keys a request
        shutil.rmtree(self.cache / prefix, ignore_errors=True)


@lru_cache(maxsize=8)
def _s3_storage(config: S3Config) -> S3Storage:
    """One client per configuration and process: it pools its connections."""
    return S3Storage(config)


def get_storage(settings: Settings | None = None) -> Storage:
    settings = settings or get_settings()
    if settings.storage_backend == "s3":
        return _s3_storage(S3Config.of(settings))
    return LocalStorage(settings.storage_dir)
