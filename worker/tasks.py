from __future__ import annotations

from celery import Celery

from app.queue import FEATURE_SHARDS_TASK, RUN_JOB_TASK
from app.settings import get_settings

RETRY_CLAIM_SECONDS = 5


def register_tasks(celery: Celery) -> None:
    @celery.task(name=RUN_JOB_TASK, bind=True, acks_late=True, ignore_result=True)
    def run_job(self, job_id: str) -> str:
        from app.db import is_database_outage
        from worker.runner import run_job as run

        try:
            return run(
                job_id, worker_name=self.request.hostname or "worker", settings=get_settings()
            )
        except Exception as exc:
            # This worker cannot reach the database to claim the job: the message must not be
            # used up here. Sent again in a few seconds (any worker may take it; a duplicate
            # is a no-op for the claim).
            if is_database_outage(exc):
                raise self.retry(countdown=RETRY_CLAIM_SECONDS, max_retries=None) from exc
            raise

    @celery.task(name=FEATURE_SHARDS_TASK, bind=True, acks_late=True, ignore_result=True)
    def feature_shards(self, job_id: str) -> int:
        """An invitation to compute shards of a running job's Stage 2b (worker.feature_shards)."""
        from worker.feature_shards import help_with_shards

        return help_with_shards(
            job_id, worker=self.request.hostname or "worker", settings=get_settings()
        )
