"""`celery -A worker.celery_app worker -Q gpu --pool solo` (or `python -m app worker`).

Importing this module loads no torch; the task imports the pipeline on first use.
"""

from __future__ import annotations

import logging

from celery.signals import worker_init, worker_ready, worker_shutdown
from sqlalchemy.exc import SQLAlchemyError

from app.db import short_session
from app.jobs.lifecycle import db_now
from app.models import utcnow
from app.queue import make_celery
from app.settings import get_settings
from worker import sweeper
from worker.tasks import register_tasks

log = logging.getLogger(__name__)
# Before this process can claim anything; restamped on the database's clock (the clock the
# heartbeats it is compared with use) when the worker starts.
PROCESS_STARTED = utcnow()
settings = get_settings()
celery_app = make_celery(settings)
register_tasks(celery_app)


@worker_init.connect
def _prepare_folders(**_kwargs) -> None:
    global PROCESS_STARTED
    settings.ensure_dirs()  # the embedded queue folder must exist before the consumer starts
    try:
        with short_session(settings) as session:
            PROCESS_STARTED = db_now(session)
    except SQLAlchemyError:  # the sweeper copes with an unreachable database; so does this
        log.warning("could not read the database clock at start; using this host's")
    if settings.worker_memory_limit_bytes:
        # A job that needs more than this fails with MemoryError (-> out_of_memory) inside
        # the job, instead of the kernel's OOM killer taking the worker (or the machine).
        import resource

        import torch

        if torch.cuda.is_available():
            # CUDA maps far more virtual address space than it uses: an address-space cap
            # breaks its initialisation. GPU memory errors are caught as out_of_memory anyway.
            log.warning("GRAIT_WORKER_MEMORY_LIMIT_BYTES ignored: a GPU is visible")
            return
        limit = settings.worker_memory_limit_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@worker_ready.connect
def _start_sweeper(sender, **_kwargs) -> None:
    sweeper.start_background(settings, worker_name=sender.hostname, process_started=PROCESS_STARTED)


@worker_shutdown.connect
def _stop_sweeper(**_kwargs) -> None:
    sweeper.stop_background()
