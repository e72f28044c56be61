from __future__ import annotations

from celery import Celery

from app.queue import RUN_JOB_TASK
from app.settings import get_settings


def register_tasks(celery: Celery) -> None:
    @celery.task(name=RUN_JOB_TASK, bind=True, acks_late=True, ignore_result=True)
    def run_job(self, job_id: str) -> str:
        from worker.runner import run_job as run

        return run(job_id, worker_name=self.request.hostname or "worker", settings=get_settings())
