"""Celery workers: run GRAIT jobs from the queue against the service's database and storage."""
