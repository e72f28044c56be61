"""The FastAPI application: routers by domain, one error shape, metrics, body limits,
the webhook dispatcher and (embedded mode) the worker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import health
from app.chat.router import router as chat_router
from app.chat.serving import ModelServer
from app.compute.router import router as compute_router
from app.dashboard import router as dashboard
from app.datasets.router import router as datasets_router
from app.embedded import EmbeddedWorker
from app.errors import install_error_handlers
from app.jobs.router import router as jobs_router
from app.limits import BodyLimit, RejectNul
from app.models_api.router import router as models_router
from app.openai_compat.router import router as openai_router
from app.request_ids import RequestIds
from app.settings import get_settings
from app.webhooks.router import router as webhooks_router
from app.webhooks.service import Dispatcher

log = logging.getLogger(__name__)


def create_app() -> FastAPI:
    settings = get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        worker = EmbeddedWorker(settings) if settings.starts_embedded_worker else None
        app.state.embedded_worker = worker
        if worker:
            worker.start()
        dispatcher = Dispatcher(settings)
        dispatcher.start()
        # Chat's model-serving process: its URL, or (unset) one of ours, started on first use.
        app.state.model_server = ModelServer(settings)
        try:
            yield
        finally:
            await app.state.model_server.close()
            dispatcher.stop()
            if worker:
                worker.stop()

    app = FastAPI(
        title="GRAIT service",
        version="0.1.0",
        description="Refusal-aware instruction tuning (GRAIT) jobs over HTTP.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    health.install_metrics(app, settings)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(RejectNul)
    app.add_middleware(RequestIds)  # added last = runs first: every response gets an id
    app.include_router(health.router)
    app.include_router(datasets_router)
    app.include_router(jobs_router)
    app.include_router(models_router)
    app.include_router(compute_router)
    app.include_router(webhooks_router)
    # The OpenAI-compatible face (/v1/files, /v1/fine_tuning/jobs) over the same services.
    app.include_router(openai_router)
    app.include_router(chat_router)  # /v1/chat/completions, answered by worker.serving
    # The web dashboard (/ui): pages over the same services, signed in by a cookie.
    dashboard.install(app)
    return app
