"""The service's overhead: a job through the API and the queue vs the same pipeline called
directly, and GET /v1/jobs/{id} latency under 100 concurrent pollers on loopback.

Runs the embedded mode (`python -m app serve`: SQLite, local queue and worker) in a scratch
folder, so it needs no Postgres or Redis. The direct run is a fresh Python process calling
`run_pipeline` on the same spec, so both sides pay interpreter start, imports and model load.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
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

    def __init__(self, folder: Path):
        self.folder = folder
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
                ready = httpx.get(self.url + "/readyz", timeout=2).json()
                if ready.get("checks", {}).get("worker") == "ok":
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


async def _pollers(url: str, job_id: str, *, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits, headers=AUTH) as client:
        deadline = time.monotonic() + seconds

        async def poll() -> None:
            while time.monotonic() < deadline:
                t = time.perf_counter()
                try:
                    r = await client.get(f"/v1/jobs/{job_id}")
                    if r.status_code != 200:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    else:
                        latencies.append(time.perf_counter() - t)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        await asyncio.wait_for(
            asyncio.gather(*(poll() for _ in range(clients))), timeout=seconds + 30
        )
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "clients": clients,
        "seconds": seconds,
        "requests_ok": len(latencies),
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(np.max(lat)),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def bench_service(
    scratch: Path,
    *,
    base_model: str,
    train: Path,
    evals: list[Path],
    hyper: dict[str, Any],
    method: str,
    pollers: list[int],
    poll_seconds: float,
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
        polled = []
        for count in pollers:
            log(f"service: {count} pollers for {poll_seconds:.0f}s")
            polled.append(
                asyncio.run(_pollers(server.url, job_id, clients=count, seconds=poll_seconds))
            )
    return {
        "direct_seconds": direct,
        "api_seconds": through_api,
        "overhead_seconds": through_api - direct,
        "overhead_ratio": through_api / direct,
        "pollers": polled,
    }
