"""The API process never loads ML code: importing app/ (and the worker's Celery app) is torch-free."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import PYTHON, ROOT

pytestmark = pytest.mark.timeout(60)


def test_api_and_worker_entry_modules_import_no_torch() -> None:
    code = (
        "import sys, app.main, app.cli, app.client, app.migrate, worker.celery_app\n"
        "app.main.create_app()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_worker_imports_no_web_framework() -> None:
    """`worker/` glues the library to the job table; FastAPI is the API's business."""
    code = (
        "import sys, worker.celery_app, worker.runner, worker.sweeper, worker.tasks, worker.serving\n"
        "web = sorted(m for m in ('fastapi', 'starlette', 'uvicorn') if m in sys.modules)\n"
        "assert not web, web\n"
    )
    result = subprocess.run(
        [PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
