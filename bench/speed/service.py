"""The service's overhead: a job through the API and the queue vs the same pipeline called
directly, and GET /v1/jobs/{id} latency under 100 concurrent pollers on loopback.

Runs the embedded mode (`python -m app serve`: SQLite, local queue and worker) in a scratch
folder, so it needs no Postgres or Redis. The direct run is a fresh Python process calling
`run_pipeline` on the same spec, so both sides pay interpreter start, imports and model load.
The pollers are aiohttp clients spread over a few processes: one Python process of 100 httpx
clients saturates its own core at about 100 requests/s and would measure itself, not the API.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "cancelled"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BENCH_KEY = "gk_bench-speed-service-key-0000000000000000"
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}


class EmbeddedServer:
    """`python -m app serve` in its own process group, stopped by that group's id."""

    def __init__(self, folder: Path, *, worker: bool = True):
        self.folder = folder
        self.worker = worker
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRAIT_")}
        env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        # A known key for the bench clients; the per-key rate limit (20/s by default) is off so
        # the poller figures measure the API, not the limiter answering 429.
        env.update(GRAIT_BOOTSTRAP_API_KEY=BENCH_KEY, GRAIT_RATE_LIMIT_PER_SECOND="0")
        if not self.worker:
            env.update(GRAIT_EMBEDDED_WORKER="false")
        log = (self.folder / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(self.port)],
            cwd=self.folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited: {(self.folder / 'server.log').read_text()[-2000:]}"
                )
            try:
                ready = httpx.get(self.url + "/readyz", timeout=2)
                checks = ready.json().get("checks", {})
                if ready.status_code == 200 and (not self.worker or checks.get("worker") == "ok"):
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError("server not ready after 120 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _direct(config: dict[str, Any], run_dir: Path) -> float:
    code = (
        "import json,sys,time; t=time.perf_counter(); "
        "from grait.config import JobConfig; from grait.pipeline import run_pipeline; "
        f"run_pipeline(JobConfig.model_validate(json.loads({json.dumps(json.dumps(config))})), {str(run_dir)!r}); "
        "print(time.perf_counter()-t)"
    )
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    return time.perf_counter() - started


async def _poll(
    url: str, path: str, *, clients: int, start_at: float, seconds: float
) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        url, connector=connector, headers=AUTH, timeout=timeout
    ) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = start_at + seconds

        async def poll() -> None:
            while time.time() < deadline:
                t = time.perf_counter()
                try:
                    async with client.get(path) as r:
                        await r.read()
                    if r.status != 200:
                        errors[str(r.status)] = errors.get(str(r.status), 0) + 1
                    else:
                        latencies.append(time.perf_counter() - t)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        await asyncio.gather(*(poll() for _ in range(clients)))
    return {"latencies": latencies, "errors": errors}


def _poll_process(url: str, path: str, clients: int, start_at: float, seconds: float) -> dict:
    return asyncio.run(_poll(url, path, clients=clients, start_at=start_at, seconds=seconds))


def _pollers(url: str, path: str, *, clients: int, seconds: float, processes: int) -> dict:
    """`clients` concurrent keep-alive pollers over `processes` processes, started together."""
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    start_at = time.time() + 3.0  # after every process has imported and connected
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(
            pool.map(_poll_process, *zip(*[(url, path, n, start_at, seconds) for n in shares]))
        )
    latencies = [x for part in parts for x in part["latencies"]]
    errors: dict[str, int] = {}
    for part in parts:
        for kind, count in part["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "clients": clients,
        "processes": processes,
        "seconds": seconds,
        "requests_ok": len(latencies),
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(np.max(lat)),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def _queued_job_path(client: httpx.Client, train: Path) -> str:
    """Upload `train` and submit a job on it; with no worker it stays queued. Its URL path."""
    from grait.config import DEFAULT_BASE_MODEL

    with train.open("rb") as fh:
        r = client.post("/v1/datasets", files={"file": (train.name, fh)})
    r.raise_for_status()
    job = client.post(
        "/v1/jobs",
        json={"method": "van", "base_model": DEFAULT_BASE_MODEL, "train_dataset": r.json()["id"]},
    )
    job.raise_for_status()
    return f"/v1/jobs/{job.json()['id']}"


def bench_pollers(
    scratch: Path,
    *,
    train: Path,
    pollers: list[int],
    seconds: float,
    processes: int,
    log: Any,
) -> list[dict[str, Any]]:
    """GET /v1/jobs/{id} on a queued job (no worker: the row stays put while it is polled)."""

    folder = scratch / f"pollers-{int(time.time())}"
    with (
        EmbeddedServer(folder, worker=False) as server,
        httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client,
    ):
        path = _queued_job_path(client, train)
        results = []
        for count in pollers:
            log(f"pollers: {count} for {seconds:.0f}s over {processes} processes")
            results.append(
                _pollers(server.url, path, clients=count, seconds=seconds, processes=processes)
            )
            log(
                f"pollers: {count}: {results[-1]['requests_per_s']:.0f} req/s, "
                f"p50 {results[-1]['p50_ms']:.0f} ms, p99 {results[-1]['p99_ms']:.0f} ms, "
                f"errors {results[-1]['errors']}"
            )
    return results


async def _reads_during_uploads(
    url: str, path: str, body: bytes, *, uploads: int, baseline_seconds: float
) -> dict[str, Any]:
    """GET `path` every 50 ms: first alone, then while `uploads` copies of `body` go up at once."""
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as client:

        async def read_until(stop: asyncio.Event) -> tuple[list[float], int]:
            latencies, failed = [], 0
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    r = await client.get(path, timeout=30)
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t)
                    else:
                        failed += 1
                except httpx.HTTPError:
                    failed += 1
                await asyncio.sleep(0.05)
            return latencies, failed

        stop = asyncio.Event()
        reader = asyncio.create_task(read_until(stop))
        await asyncio.sleep(baseline_seconds)
        stop.set()
        alone, _ = await reader

        async def upload() -> tuple[float, int]:
            t = time.perf_counter()
            r = await client.post("/v1/datasets", files={"file": ("big.jsonl", body)})
            return time.perf_counter() - t, r.status_code

        stop = asyncio.Event()
        reader = asyncio.create_task(read_until(stop))
        started = time.perf_counter()
        done = await asyncio.gather(*(upload() for _ in range(uploads)))
        wall = time.perf_counter() - started
        stop.set()
        during, failed = await reader

    def ms(xs: list[float], q: float) -> float:
        return float(np.percentile(np.array(xs) * 1000, q)) if xs else float("nan")

    seconds = [d for d, _ in done]
    return {
        "uploads": uploads,
        "upload_mb": len(body) / 1e6,
        "upload_status": sorted({code for _, code in done}),
        "uploads_wall_s": wall,
        "upload_p50_s": float(np.median(seconds)),
        "upload_max_s": float(np.max(seconds)),
        "reads_alone": len(alone),
        "read_alone_p50_ms": ms(alone, 50),
        "reads_during": len(during),
        "read_failed_during": failed,
        "read_during_p50_ms": ms(during, 50),
        "read_during_p99_ms": ms(during, 99),
        "read_during_max_ms": float(np.max(during) * 1000) if during else float("nan"),
    }


def bench_uploads(
    scratch: Path, *, train: Path, uploads: int, rows: int, log: Any
) -> dict[str, Any]:
    """Job reads while many large uploads are read and validated (issue 12: parsing holds no
    database slot, so reads keep their pace). Embedded server, no worker, loopback."""

    records = [
        {
            "id": f"q{i}",
            "question": f"Question number {i}?",
            "options": ["a", "b", "c", "d"],
            "answer": "ABCD"[i % 4],
        }
        for i in range(rows)
    ]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    folder = scratch / f"uploads-{int(time.time())}"
    with (
        EmbeddedServer(folder, worker=False) as server,
        httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client,
    ):
        path = _queued_job_path(client, train)
        log(f"uploads: {uploads} x {len(body) / 1e6:.1f} MB while reading the job")
        result = asyncio.run(
            _reads_during_uploads(
                server.url,
                path,
                body,
                uploads=uploads,
                baseline_seconds=3.0,
            )
        )
    log(
        f"uploads: reads p50 {result['read_alone_p50_ms']:.0f} ms alone, "
        f"{result['read_during_p50_ms']:.0f} ms (max {result['read_during_max_ms']:.0f}) during "
        f"uploads of p50 {result['upload_p50_s']:.1f} s"
    )
    return result


def bench_service(
    scratch: Path,
    *,
    base_model: str,
    train: Path,
    evals: list[Path],
    hyper: dict[str, Any],
    method: str,
    log: Any,
) -> dict[str, Any]:
    folder = scratch / f"service-{int(time.time())}"
    config = {
        "method": method,
        "base_model": base_model,
        "train": {"path": str(train)},
        "evals": [{"path": str(p), "name": f"eval{i}"} for i, p in enumerate(evals)],
        "seed": 0,
        **hyper,
    }
    log("service: direct pipeline run (fresh process)")
    direct = _direct(config, folder / "direct")
    log(f"service: direct {direct:.1f}s; starting the embedded server")
    with (
        EmbeddedServer(folder / "server") as server,
        httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client,
    ):
        ids = []
        for path in [train, *evals]:
            with path.open("rb") as fh:
                r = client.post("/v1/datasets", files={"file": (path.name, fh)})
            r.raise_for_status()
            ids.append(r.json()["id"])
        body = {
            "method": method,
            "base_model": base_model,
            "train_dataset": ids[0],
            "eval_datasets": [{"id": i, "name": f"eval{n}"} for n, i in enumerate(ids[1:])],
            "hyperparameters": hyper,
            "seed": 0,
        }
        started = time.perf_counter()
        r = client.post("/v1/jobs", json=body)
        r.raise_for_status()
        job_id = r.json()["id"]
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in TERMINAL:
                break
            time.sleep(0.25)
        through_api = time.perf_counter() - started
        if job["status"] != "succeeded":
            raise RuntimeError(f"service job ended {job['status']}: {job.get('error')}")
    return {
        "direct_seconds": direct,
        "api_seconds": through_api,
        "overhead_seconds": through_api - direct,
        "overhead_ratio": through_api / direct,
    }
