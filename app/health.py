"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import text

from app.db import request_gate, session_factory
from app.errors import ErrorResponse, error_body
from app.jobs.lifecycle import JOB_STATUSES
from app.jobs.service import count_by_status
from app.settings import Settings, get_settings

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

REDIS_PRIORITY_SEP = "\x06\x16"


def check_database(settings: Settings) -> None:
    with session_factory(settings)() as session:
        session.execute(text("SELECT 1"))


def _redis_client(settings: Settings) -> Any:
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)


def check_storage(settings: Settings) -> None:
    """The store answers: a HEAD for a key that need not exist (an object store), or the
    storage folder (or, before the first upload, the folder it will be made in) is writable."""
    from app.storage import get_storage

    if settings.storage_backend == "local":
        folder = settings.storage_dir.resolve()
        while not folder.exists():
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            raise RuntimeError(f"storage folder {settings.storage_dir} is not writable")
        return
    get_storage(settings).exists("readyz-probe")  # 404 is an answer; an error raises


def check_broker(settings: Settings) -> None:
    if settings.embedded_broker:
        folder = settings.broker_dir / "queue"
        if not folder.is_dir():
            raise RuntimeError(f"embedded queue folder {folder} is missing")
        return
    if settings.broker_url.startswith(("redis://", "rediss://")):
        client = _redis_client(settings)
        try:
            client.ping()
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(settings.broker_url, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1)


def queue_depth(settings: Settings, queue: str) -> int | None:
    """Messages waiting in one job queue, or None when the broker cannot say."""
    if settings.embedded_broker:
        folder = settings.broker_dir / "queue"
        return sum(1 for p in folder.glob(f"*.{queue}.msg")) if folder.is_dir() else 0
    if settings.broker_url.startswith(("redis://", "rediss://")):
        client = _redis_client(settings)
        try:
            base = settings.broker_key_prefix + queue
            keys = [base] + [f"{base}{REDIS_PRIORITY_SEP}{p}" for p in (3, 6, 9)]
            return sum(int(client.llen(k)) for k in keys)
        finally:
            client.close()
    return None


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependency checks)."""
    return {"status": "ok"}


def metrics_token_ok(request: Request, settings: Settings) -> bool:
    """The caller sent `Authorization: Bearer <GRAIT_METRICS_TOKEN>` (and one is set)."""
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if not token:
        return False
    presented = request.headers.get("authorization", "")
    return hmac.compare_digest(presented.encode(), f"Bearer {token}".encode())


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Database, broker and storage reachable (and the embedded worker alive); 503 naming
    what is not.

    Anyone may ask; why a check failed (driver text, hosts, ports) is only told to a caller
    with the metrics token, and always logged.
    """
    settings = get_settings()
    checks: dict[str, str] = {}
    details: dict[str, str] = {}
    for name, check in (
        ("database", check_database),
        ("broker", check_broker),
        ("storage", check_storage),
    ):
        try:
            if name == "database":
                async with request_gate():
                    await run_in_threadpool(check, settings)
            else:
                await run_in_threadpool(check, settings)
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks[name] = "unreachable"
            details[name] = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("readyz: %s unreachable: %s", name, details[name])
    embedded = getattr(request.app.state, "embedded_worker", None)
    if embedded is not None:
        alive = embedded.proc is not None and embedded.proc.poll() is None
        checks["worker"] = "ok" if alive else "down"
        if not alive:
            details["worker"] = "embedded worker not running (restarting)"
    extra = {"details": details} if details and metrics_token_ok(request, settings) else {}
    failing = [name for name, state in checks.items() if state != "ok"]
    if failing:
        reason = "not ready: " + ", ".join(f"{name} {checks[name]}" for name in failing)
        return JSONResponse(
            status_code=503,
            content={**error_body("not_ready", reason), "checks": checks, **extra},
        )
    return JSONResponse({"status": "ready", "checks": checks})


class _StateCollector:
    """Jobs by status and queue depth, read at scrape time (every API replica agrees)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("grait_jobs", "Jobs by status.", labels=["status"])
        try:
            with session_factory(self.settings)() as session:
                counts = count_by_status(session=session)
            for status in JOB_STATUSES:
                jobs.add_metric([status], counts.get(status, 0))
        except Exception:  # a scrape must not fail because the DB blinked
            log.warning("metrics: could not count jobs", exc_info=True)
        yield jobs
        depth = GaugeMetricFamily(
            "grait_queue_depth", "Messages waiting in the job queue.", labels=["queue"]
        )
        try:
            for compute_class in self.settings.offered_classes:
                queue = self.settings.queue_for(compute_class)
                value = queue_depth(self.settings, queue)
                if value is not None:
                    depth.add_metric([queue], value)
        except Exception:
            log.warning("metrics: could not read the queue depth", exc_info=True)
        yield depth


def install_metrics(app: FastAPI, settings: Settings) -> None:
    registry = CollectorRegistry()
    latency = Histogram(
        "grait_http_request_duration_seconds",
        "HTTP request latency.",
        ["method", "route", "status"],
        registry=registry,
    )
    registry.register(_StateCollector(settings))  # type: ignore[arg-type]

    @app.middleware("http")
    async def _time_requests(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        latency.labels(request.method, path, str(response.status_code)).observe(
            time.perf_counter() - start
        )
        return response

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        responses={401: {"model": ErrorResponse, "description": "GRAIT_METRICS_TOKEN is set."}},
    )
    async def metrics(request: Request) -> Response:
        """Prometheus text (every tenant's job counts): behind `Authorization: Bearer
        <GRAIT_METRICS_TOKEN>`; open without one only in embedded (one-machine) mode."""
        if settings.metrics_token and not metrics_token_ok(request, settings):
            return JSONResponse(
                status_code=401,
                content=error_body("invalid_metrics_token", "Send the metrics token as Bearer."),
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not settings.metrics_token and not settings.embedded_broker:
            return JSONResponse(
                status_code=401,
                content=error_body(
                    "metrics_token_required",
                    "Set GRAIT_METRICS_TOKEN to expose /metrics outside embedded mode.",
                ),
                headers={"WWW-Authenticate": "Bearer"},
            )
        async with request_gate():  # the state collector reads the database
            body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
