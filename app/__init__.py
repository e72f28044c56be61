"""The GRAIT job service: HTTP API over datasets, tuning jobs and their artifacts.

Torch-free by design: the API process validates specs with `grait.config` and hands work to
Celery workers (`worker/`), which are the only processes that load models.
"""
