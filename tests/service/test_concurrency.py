"""Many requests at once: more than the API's worker threads (40) and pooled connections (15).

A sync route holds its session's connection across thread hops (dependencies, handler,
response validation). Before the request gate in `app.db`, 100 concurrent pollers left every
worker thread waiting in the pool's checkout while the connections' holders waited for a
thread: no answers at all until the pool's 30 s timeout turned them into 500s.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import bearer, start_api, start_embedded_api

pytestmark = pytest.mark.timeout(180)

CONCURRENT = 150
ROUNDS = 3
EMBEDDED_KEY = "gk_concurrency-test-key-000000000000000000"


async def _storm(base: str, key: str, upload_file: Path) -> Counter[str]:
    """CONCURRENT clients, each polling ROUNDS times; a few upload meanwhile. Outcome counts."""
    outcomes: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=CONCURRENT + 10)
    async with httpx.AsyncClient(
        base_url=base, headers=bearer(key), timeout=60, limits=limits
    ) as client:

        async def poll(i: int) -> None:
            for _ in range(ROUNDS):
                path = "/readyz" if i % 25 == 0 else "/v1/jobs?limit=1"
                try:
                    outcomes[str((await client.get(path)).status_code)] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1

        async def send_file() -> None:
            files = {"file": (upload_file.name, upload_file.read_bytes())}
            try:
                r = await client.post("/v1/datasets", files=files)
                outcomes[f"upload {r.status_code}"] += 1
            except httpx.HTTPError as exc:
                outcomes[f"upload {type(exc).__name__}"] += 1

        await asyncio.gather(
            *(poll(i) for i in range(CONCURRENT)), *(send_file() for _ in range(5))
        )
    return outcomes


@pytest.fixture(params=["postgres", "embedded-sqlite"])
def live_api(
    request: pytest.FixtureRequest, tmp_path: Path, logs_dir: Path
) -> Iterator[tuple[str, str]]:
    if request.param == "postgres":
        yield request.getfixturevalue("api_url"), request.getfixturevalue("api_key")
        return
    api, base = start_embedded_api(
        tmp_path,
        logs_dir,
        name="embedded-concurrency",
        GRAIT_BOOTSTRAP_API_KEY=EMBEDDED_KEY,
        GRAIT_RATE_LIMIT_PER_SECOND="0",
        GRAIT_EMBEDDED_WORKER="false",
    )
    try:
        yield base, EMBEDDED_KEY
    finally:
        api.stop()


def test_150_concurrent_clients_all_get_answers(live_api: tuple[str, str], data_dir: Path) -> None:
    base, key = live_api
    outcomes = asyncio.run(_storm(base, key, data_dir / "arc_excerpt.jsonl"))
    assert outcomes == Counter({"200": CONCURRENT * ROUNDS, "upload 201": 5}), outcomes


def test_concurrent_large_uploads_do_not_stall_job_reads(
    service_env: dict[str, str], logs_dir: Path, tmp_path: Path, api_key: str
) -> None:
    """More uploads than database slots (13), each slow to parse: a job read still answers
    before the first upload does, because parsing holds no slot."""
    import json

    rows = [
        {
            "id": f"q{i}",
            "question": f"Question number {i}?",
            "options": ["a", "b", "c", "d"],
            "answer": "ABCD"[i % 4],
        }
        for i in range(40_000)
    ]
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {
        **service_env,
        "GRAIT_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
        "GRAIT_RATE_LIMIT_PER_SECOND": "0",
    }
    api, base = start_api(env, logs_dir, name="api-big-uploads")
    try:
        with httpx.Client(base_url=base, headers=bearer(api_key), timeout=120) as sync:
            job_id = sync.get("/v1/jobs", params={"limit": 1}).json()["data"]
            path = f"/v1/jobs/{job_id[0]['id']}" if job_id else "/v1/jobs?limit=1"

        async def race() -> tuple[float, list[float], list[int]]:
            async with httpx.AsyncClient(
                base_url=base, headers=bearer(api_key), timeout=300
            ) as client:
                loop = asyncio.get_running_loop()
                done: list[float] = []
                statuses: list[int] = []

                async def upload() -> None:
                    files = {"file": ("big.jsonl", big.read_bytes())}
                    r = await client.post("/v1/datasets", files=files)
                    statuses.append(r.status_code)
                    done.append(loop.time())

                async def read() -> float:
                    await asyncio.sleep(2.0)  # the uploads are in and parsing
                    assert (await client.get(path)).status_code == 200
                    return loop.time()

                uploads = [asyncio.create_task(upload()) for _ in range(16)]
                answered = await read()
                await asyncio.gather(*uploads)
                return answered, done, statuses

        answered, finished, statuses = asyncio.run(race())
    finally:
        api.stop()
    assert statuses == [201] * 16
    assert answered < min(finished), (answered, sorted(finished)[:3])
