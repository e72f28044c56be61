"""Faults with real processes on loopback: Postgres cut, Redis restarted, a job out of memory.

The machine's shared Redis and Postgres are never touched: Redis faults use a private
`redis-server` on a free port, Postgres faults a TCP proxy (in this process) that the test
cuts and restores between the API and the real server.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import make_url

from .conftest import (
    TERMINAL,
    Worker,
    all_events,
    bearer,
    free_port,
    start_api,
    start_long_job_and_wait_until_training,
    tiny_job,
    unavailable,
    wait_for,
    wait_for_status,
)

# ---- Postgres: a cuttable TCP proxy ------------------------------------------------------------


class TcpProxy:
    """127.0.0.1:<port> -> target, in a background event loop; `cut()` drops everything."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        self.server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def _cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        self.server = None

    def start(self) -> TcpProxy:
        self._call(self._start())
        return self

    def cut(self) -> None:
        self._call(self._cut())

    def close(self) -> None:
        if self.server is not None:
            self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.timeout(90)
def test_api_answers_503_with_a_reason_while_postgres_is_cut_and_recovers_by_itself(
    service_env: dict[str, str], logs_dir: Path, api_key: str, datasets: dict[str, str]
) -> None:
    url = make_url(service_env["GRAIT_DATABASE_URL"])
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    env = {
        **service_env,
        "GRAIT_DATABASE_URL": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False
        ),
    }
    api, base = start_api(env, logs_dir, name="api-pg-proxy")
    try:
        with httpx.Client(base_url=base, headers=bearer(api_key), timeout=15) as client:
            path = f"/v1/datasets/{datasets['mmlu']}"
            assert client.get(path).status_code == 200

            proxy.cut()
            cut_at = time.monotonic()
            down = client.get(path)
            seconds_to_503 = time.monotonic() - cut_at
            assert down.status_code == 503, down.text
            error = down.json()["error"]
            assert error["code"] == "database_unavailable" and "database" in error["message"]
            assert down.headers["retry-after"] == "5"
            oai = client.get("/v1/fine_tuning/jobs")
            assert oai.status_code == 503 and oai.json()["error"]["type"] == "server_error"
            ready = client.get("/readyz")
            assert (
                ready.status_code == 503
                and "database unreachable" in ready.json()["error"]["message"]
            )
            assert client.get("/healthz").status_code == 200  # the process itself is fine

            proxy.start()
            restored_at = time.monotonic()
            wait_for(
                lambda: client.get(path).status_code == 200,
                timeout=30,
                interval=0.2,
                what="the API to recover",
            )
            seconds_to_recover = time.monotonic() - restored_at
            assert client.get("/readyz").status_code == 200
        print(
            f"\npostgres cut: 503 after {seconds_to_503:.2f}s; recovered {seconds_to_recover:.2f}s after restore"
        )
    finally:
        api.stop()
        proxy.close()


@pytest.mark.timeout(300)
def test_an_attempt_cut_off_from_the_database_stops_itself_and_the_next_one_finishes(
    service_env: dict[str, str],
    logs_dir: Path,
    client: httpx.Client,
    datasets: dict[str, str],
    tiny_model: Path,
    worker_control: Worker,
) -> None:
    """Worker A reaches Postgres through a proxy that is cut mid-job for longer than the stale
    window; worker B's sweeper re-queues the job and B runs it. A must stop on its own (its
    lease runs out at half the stale window), never finish, and leave B's artifacts alone."""
    worker_control.stop()
    url = make_url(service_env["GRAIT_DATABASE_URL"])
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    env_a = {
        **service_env,
        "GRAIT_DATABASE_URL": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False
        ),
    }
    a = Worker(env_a, logs_dir, log_name="worker-a-cut", name="a-worker@%h").ensure_running()
    b = Worker(service_env, logs_dir, log_name="worker-b", name="b-worker@%h")
    try:
        job = start_long_job_and_wait_until_training(client, tiny_model, datasets)
        proxy.cut()
        b.ensure_running()
        done = wait_for_status(client, job["id"], TERMINAL, timeout=200)
        wait_for(
            lambda: "stopping quietly" in a.process.log() or "lost its lease" in a.process.log(),
            timeout=30,
            what="worker A to give the job up",
        )
        log_a = a.process.log()
        artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        adapter = next(x for x in artifacts if x["kind"] == "adapter")
        tarball = client.get(adapter["download_url"])
    finally:
        proxy.close()
        a.stop()
        b.stop()
    assert done["status"] == "succeeded" and done["attempts"] >= 2, done
    assert "giving the job up" in log_a
    assert "'succeeded'" not in log_a  # the task's return value: A never finished the job
    events = all_events(client, job["id"])
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses.count("succeeded") == 1, statuses
    with tarfile.open(fileobj=io.BytesIO(tarball.content), mode="r:gz") as tar:
        assert any(m.name.endswith("adapter_config.json") for m in tar.getmembers())
    storage = Path(service_env["GRAIT_STORAGE_DIR"]) / "jobs" / job["id"]
    assert sorted(p.name for p in storage.iterdir()) == [f"attempt-{done['attempts']}"]


# ---- Redis: a private server, restarted ----------------------------------------------------------


class PrivateRedis:
    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        log = (self.log_dir / f"redis-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def up() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
            except redis.RedisError:
                return False

        wait_for(up, timeout=15, what="the private redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # no persistence configured: everything queued is lost
            self.proc.wait(timeout=15)


@pytest.fixture()
def private_redis(logs_dir: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server (to restart a private Redis)", FileNotFoundError("redis-server"))
    server = PrivateRedis(logs_dir)
    server.start()
    yield server
    server.stop()


@pytest.mark.timeout(240)
def test_redis_restart_loses_neither_the_running_nor_the_queued_job(
    service_env: dict[str, str],
    logs_dir: Path,
    api_key: str,
    datasets: dict[str, str],
    tiny_model: Path,
    private_redis: PrivateRedis,
    worker_control: Worker,
) -> None:
    import redis

    worker_control.stop()  # one worker on this machine at a time (2 cores)
    env = {
        **service_env,
        "GRAIT_BROKER_URL": private_redis.url,
        "GRAIT_QUEUE": service_env["GRAIT_QUEUE"] + "-redis",
        "GRAIT_SWEEP_INTERVAL_SECONDS": "1",
    }
    api, base = start_api(env, logs_dir, name="api-private-redis")
    worker = Worker(env, logs_dir, log_name="worker-private-redis").ensure_running()
    try:
        with httpx.Client(base_url=base, headers=bearer(api_key), timeout=30) as client:
            running = client.post("/v1/jobs", json=tiny_job(tiny_model, datasets)).json()
            wait_for_status(client, running["id"], {"running"}, timeout=60)
            queued = client.post(
                "/v1/jobs", json=tiny_job(tiny_model, datasets, method="van", eval_datasets=[])
            ).json()
            broker = redis.Redis.from_url(private_redis.url)
            assert broker.llen(env["GRAIT_BROKER_KEY_PREFIX"] + env["GRAIT_QUEUE"] + ".cpu") == 1
            assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"

            private_redis.stop()
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 503  # names the broker
            private_redis.start()  # empty: the queued message is gone
            restarted_at = time.monotonic()
            # (Not asserted empty here: the 1 s sweeper may already have republished it.)

            first = wait_for_status(client, running["id"], TERMINAL, timeout=150)
            second = wait_for_status(client, queued["id"], TERMINAL, timeout=120)
            elapsed = time.monotonic() - restarted_at
        assert first["status"] == "succeeded" and first["attempts"] == 1, first
        assert second["status"] == "succeeded" and second["attempts"] == 1, second
        assert "republishing" in worker.process.log()
        print(
            f"\nredis restart: running job succeeded (1 attempt), queued job republished and "
            f"succeeded; both done {elapsed:.1f}s after the restart"
        )
    finally:
        worker.stop()
        api.stop()


# ---- out of memory ------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_job_out_of_memory_fails_with_out_of_memory_and_the_worker_runs_the_next_job(
    client: httpx.Client,
    service_env: dict[str, str],
    logs_dir: Path,
    datasets: dict[str, str],
    tiny_model: Path,
    worker_control: Worker,
) -> None:
    worker_control.stop()
    # The worker's address space is capped (RLIMIT_AS, GRAIT_WORKER_MEMORY_LIMIT_BYTES), so the
    # job's dense projection (896 LoRA params x 2^22 dims x 4 bytes = 15 GB) fails to allocate
    # for real instead of inviting the kernel's OOM killer. (The planner lets it through: 15 GB
    # is within the `cpu` class's memory; this worker's cap is lower.)
    env = {**service_env, "GRAIT_WORKER_MEMORY_LIMIT_BYTES": str(8 * 1024**3)}
    capped = Worker(env, logs_dir, log_name="worker-capped").ensure_running()
    try:
        spec = tiny_job(tiny_model, datasets)
        spec["hyperparameters"]["features"].update(projection="dense", dim=2**22)
        greedy = client.post("/v1/jobs", json=spec).json()
        failed = wait_for_status(client, greedy["id"], TERMINAL, timeout=90)

        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "out_of_memory", failed["error"]
        assert "batch_size" in failed["error"]["message"]  # says what to lower
        last = all_events(client, greedy["id"])[-1]
        assert (last["level"], last["data"]["error_code"]) == ("error", "out_of_memory")

        pid = capped.process.proc.pid  # type: ignore[union-attr]
        after = client.post(
            "/v1/jobs", json=tiny_job(tiny_model, datasets, method="van", eval_datasets=[])
        ).json()
        done = wait_for_status(client, after["id"], TERMINAL, timeout=90)
        assert done["status"] == "succeeded", done
        assert capped.process.running and capped.process.proc.pid == pid  # type: ignore[union-attr]
        print(f"\nout of memory: {failed['error']['message'][:160]}")
    finally:
        capped.stop()
