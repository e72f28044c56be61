"""Real components only: a fresh Postgres database, Redis, uvicorn and Celery subprocesses.

With CI=true a missing Postgres or Redis fails the run; elsewhere those tests are skipped.
Override the servers with GRAIT_TEST_POSTGRES / GRAIT_TEST_REDIS.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, make_url, text

from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
IN_CI = os.environ.get("CI", "").lower() == "true"
# scripts/test.sh (= .ci/run) sets GRAIT_REQUIRE_SERVICES=1: the full suite never skips a
# service test; a bare `pytest` on a laptop without Postgres/Redis may.
SERVICES_REQUIRED = IN_CI or os.environ.get("GRAIT_REQUIRE_SERVICES") == "1"
TERMINAL = {"succeeded", "failed", "cancelled"}


def unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable: {type(exc).__name__}: {exc}"
    if SERVICES_REQUIRED:
        pytest.fail(message + " (required by CI=true / GRAIT_REQUIRE_SERVICES=1, not skipped)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- data excerpts ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small excerpts of the public sets, written for this run (never committed)."""
    out = tmp_path_factory.mktemp("data")
    arc = (SHARED_DATA / "arc_easy" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "arc_excerpt.jsonl").write_text("\n".join(arc[:30]) + "\n", encoding="utf-8")
    mmlu = (
        (SHARED_DATA / "mmlu" / "test" / "anatomy_test.csv")
        .read_text(encoding="utf-8")
        .splitlines()
    )
    (out / "mmlu_excerpt.csv").write_text("\n".join(mmlu[:33]) + "\n", encoding="utf-8")
    return out


# ---- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    admin_url = os.environ.get(
        "GRAIT_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    try:
        admin = create_engine(
            admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
        )
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        unavailable("Postgres", exc)
    name = f"grait_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    import redis

    url = os.environ.get("GRAIT_TEST_REDIS", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001
        unavailable("Redis", exc)
    yield url


@pytest.fixture(scope="session")
def service_env(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str
) -> Iterator[dict[str, str]]:
    """GRAIT_* settings shared by the API, the worker and in-process checks; schema migrated."""
    import redis

    var = tmp_path_factory.mktemp("var")
    token = uuid.uuid4().hex[:8]
    prefix = f"grait-test-{token}:"
    env = {
        **os.environ,
        "GRAIT_DATABASE_URL": postgres_url,
        "GRAIT_BROKER_URL": redis_url,
        "GRAIT_QUEUE": f"gpu-{token}",
        # The session's worker serves `cpu`; `gpu-l4-24g` is offered too, so a test can queue
        # jobs for a class whose worker it starts itself (test_fair_turns.py).
        "GRAIT_COMPUTE_CLASS": "cpu",
        "GRAIT_COMPUTE_CLASSES": '["cpu", "gpu-l4-24g"]',
        "GRAIT_BROKER_KEY_PREFIX": prefix,
        "GRAIT_STORAGE_DIR": str(var / "storage"),
        "GRAIT_RUNS_DIR": str(var / "runs"),
        "GRAIT_MAX_UPLOAD_BYTES": str(256 * 1024),
        "GRAIT_EMBEDDED_WORKER": "false",
        "GRAIT_HEARTBEAT_SECONDS": "1",
        "GRAIT_STALE_AFTER_SECONDS": "8",
        "GRAIT_SWEEP_INTERVAL_SECONDS": "2",
        "GRAIT_PROGRESS_WRITE_SECONDS": "0.5",
        "GRAIT_CANCEL_CHECK_SECONDS": "0.2",
        # The webhook tests' receiver listens on loopback; fast retries keep them short.
        "GRAIT_WEBHOOK_ALLOW_PRIVATE": "true",
        "GRAIT_WEBHOOK_RETRY_BASE_SECONDS": "0.3",
        "GRAIT_WEBHOOK_POLL_SECONDS": "0.2",
        # Limits get their own API process (test_limits.py); here they stay out of the way.
        "GRAIT_RATE_LIMIT_PER_SECOND": "1000",
        "GRAIT_RATE_LIMIT_BURST": "10000",
        "GRAIT_METRICS_TOKEN": f"metrics-{token}",
        "PYTHONUNBUFFERED": "1",
    }
    subprocess.run(
        [PYTHON, "-m", "app", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    # The session's own tenant; its key is also what client commands (GRAIT_API_KEY) send.
    env["GRAIT_API_KEY"] = make_key(env, "alpha")
    yield env
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


class Process:
    """A subprocess in its own process group, logging to a file, stopped group-wide."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path, cwd: Path = ROOT
    ):
        self.name, self.cmd, self.env, self.cwd = name, cmd, env, cwd
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20) -> None:
        if not self.running:
            return
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def start_api(
    env: dict[str, str],
    log_dir: Path,
    *,
    name: str = "api",
    cmd: list[str] | None = None,
    cwd: Path = ROOT,
    timeout: float = 40,
) -> tuple[Process, str]:
    port = free_port()
    cmd = cmd or [
        PYTHON,
        "-m",
        "uvicorn",
        "app.main:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--timeout-keep-alive",  # as deployed (compose), see Settings.keep_alive_seconds
        "65",
    ]
    proc = Process(
        name,
        [c.replace("{port}", str(port)) for c in cmd],
        {**env, "GRAIT_PORT": str(port)},
        log_dir,
        cwd,
    ).start()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.running:
            raise AssertionError(f"{name} exited early:\n{proc.log()[-3000:]}")
        try:
            return httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=timeout, what=f"{name} to answer /healthz")
    return proc, base


def start_embedded_api(
    folder: Path, log_dir: Path, *, name: str, **settings: str
) -> tuple[Process, str]:
    """`python -m app serve` in `folder` with no GRAIT_* from outside but `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAIT_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **settings)
    return start_api(
        env,
        log_dir,
        name=name,
        cmd=[PYTHON, "-m", "app", "serve", "--port", "{port}"],
        cwd=folder,
        timeout=60,
    )


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def api_url(service_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    proc, base = start_api(service_env, logs_dir)
    yield base
    proc.stop()


def make_key(env: dict[str, str], tenant: str) -> str:
    """A new API key for `tenant` (created if new), straight in the database."""
    from sqlalchemy.orm import Session

    from app.auth.service import create_key
    from app.db import make_engine

    engine = make_engine(env["GRAIT_DATABASE_URL"], one_shot=True)
    try:
        with Session(engine) as session:
            return create_key(session=session, tenant_name=tenant)[1]
    finally:
        engine.dispose()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def api_key(service_env: dict[str, str]) -> str:
    return service_env["GRAIT_API_KEY"]


@pytest.fixture()
def client(api_url: str, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=30, headers=bearer(api_key)) as c:
        yield c


@pytest.fixture(scope="session")
def other_client(api_url: str, service_env: dict[str, str]) -> Iterator[httpx.Client]:
    """A second tenant's client: it must see none of `client`'s objects."""
    key = make_key(service_env, "beta")
    with httpx.Client(base_url=api_url, timeout=30, headers=bearer(key)) as c:
        yield c


class Worker:
    """The test session's Celery worker; tests that need jobs to stay queued stop it first."""

    NAME = "test-worker@%h"

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        *,
        log_name: str = "worker",
        name: str | None = None,
    ):
        cmd = [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "--pool",
            "solo",
            "-Q",
            f"{env['GRAIT_QUEUE']}.{env.get('GRAIT_COMPUTE_CLASS', 'cpu')}",
            "-n",
            name or self.NAME,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "INFO",
        ]
        self.process = Process(log_name, cmd, env, log_dir)
        self.starts = 0

    def ensure_running(self) -> Worker:
        if not self.process.running:
            offset = len(self.process.log())
            self.process.start()
            self.starts += 1

            def ready() -> bool:
                if not self.process.running:
                    raise AssertionError(f"worker exited:\n{self.process.log()[-3000:]}")
                return " ready." in self.process.log()[offset:]

            wait_for(ready, timeout=60, what="the Celery worker to be ready")
        return self

    def stop(self) -> None:
        self.process.stop(timeout=60)


@pytest.fixture(scope="session")
def worker_control(service_env: dict[str, str], logs_dir: Path) -> Iterator[Worker]:
    control = Worker(service_env, logs_dir)
    yield control
    control.stop()


@pytest.fixture()
def worker(worker_control: Worker) -> Worker:
    return worker_control.ensure_running()


@pytest.fixture()
def no_worker(worker_control: Worker) -> Worker:
    worker_control.stop()
    return worker_control


# ---- API helpers -----------------------------------------------------------------------------


def upload(client: httpx.Client, path: Path, **fields: str) -> httpx.Response:
    with path.open("rb") as fh:
        return client.post("/v1/datasets", files={"file": (path.name, fh)}, data=fields)


@pytest.fixture(scope="session")
def datasets(api_url: str, api_key: str, data_dir: Path) -> dict[str, str]:
    """An MMLU and an ARC excerpt uploaded once for the job tests: {"mmlu": id, "arc": id}."""
    with httpx.Client(base_url=api_url, timeout=30, headers=bearer(api_key)) as c:
        out = {}
        for key, file in (("mmlu", "mmlu_excerpt.csv"), ("arc", "arc_excerpt.jsonl")):
            response = upload(c, data_dir / file)
            assert response.status_code == 201, response.text
            out[key] = response.json()["id"]
        return out


def wait_for_status(
    client: httpx.Client, job_id: str, statuses: set[str], *, timeout: float
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    try:
        return wait_for(
            reached, timeout=timeout, interval=0.3, what=f"job {job_id} to reach {statuses}"
        )
    except AssertionError:
        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        tail = json.dumps([(e["type"], e["stage"], e["message"]) for e in events[-15:]], indent=1)
        raise AssertionError(
            f"job {job_id} never reached {statuses}: {client.get(f'/v1/jobs/{job_id}').json()}\n{tail}"
        )


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def printed_api_key(log: str) -> str:
    """The key `serve` prints on its first start (the one-command mode)."""
    import re

    match = re.search(r"GRAIT_API_KEY=(gk_[A-Za-z0-9_-]+)", log)
    assert match, f"no API key printed:\n{log[-2000:]}"
    return match.group(1)


def settings_for(env: dict[str, str]) -> Any:
    """The same Settings the subprocesses build from these GRAIT_* variables."""
    from app.settings import Settings

    return Settings(
        **{k.removeprefix("GRAIT_").lower(): v for k, v in env.items() if k.startswith("GRAIT_")}
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grait.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def tiny_job(tiny_model: Path, datasets: dict[str, str], **overrides: Any) -> dict[str, Any]:
    """A real `grait` job on the tiny model: 32 MMLU questions, two 6-question evals."""
    from grait.testing import tiny_hyperparameters

    hyper = tiny_hyperparameters()
    hyper.setdefault("evaluation", {})["eval_base_refuse_prompt"] = False
    return {
        "method": "grait",
        "base_model": str(tiny_model),
        "train_dataset": datasets["mmlu"],
        "eval_datasets": [
            {"id": datasets["mmlu"], "limit": 6, "name": "mmlu-id"},
            {"id": datasets["arc"], "limit": 6},
        ],
        "hyperparameters": hyper,
        "seed": 0,
        **overrides,
    }


def start_long_job_and_wait_until_training(
    client: httpx.Client, tiny_model: Path, datasets: dict[str, str]
) -> dict[str, Any]:
    """A tiny grait job with enough epochs to be cut off mid-training; returned once training."""
    spec = tiny_job(tiny_model, datasets)
    spec["hyperparameters"]["training"]["epochs"] = 25
    job = client.post("/v1/jobs", json=spec).json()
    wait_for(
        lambda: any(
            e["type"] == "progress" and e["stage"] == "training"
            for e in all_events(client, job["id"])
        ),
        timeout=150,
        what=f"job {job['id']} to be training",
    )
    return job
