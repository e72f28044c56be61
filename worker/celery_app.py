"""`celery -A worker.celery_app worker -Q gpu --pool solo` (or `python -m app worker`).

Importing this module loads no torch; the task imports the pipeline on first use.
"""

from __future__ import annotations

from celery.signals import worker_init, worker_ready, worker_shutdown

from app.models import utcnow
from app.queue import make_celery
from app.settings import get_settings
from worker import sweeper
from worker.tasks import register_tasks

PROCESS_STARTED = utcnow()  # before this process can claim anything
settings = get_settings()
celery_app = make_celery(settings)
register_tasks(celery_app)


@worker_init.connect
def _prepare_folders(**_kwargs) -> None:
    settings.ensure_dirs()  # the embedded queue folder must exist before the consumer starts
    if settings.worker_memory_limit_bytes:
        # A job that needs more than this fails with MemoryError (-> out_of_memory) inside
        # the job, instead of the kernel's OOM killer taking the worker (or the machine).
        import resource

        limit = settings.worker_memory_limit_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@worker_ready.connect
def _start_sweeper(sender, **_kwargs) -> None:
    sweeper.start_background(settings, worker_name=sender.hostname, process_started=PROCESS_STARTED)


@worker_shutdown.connect
def _stop_sweeper(**_kwargs) -> None:
    sweeper.stop_background()
