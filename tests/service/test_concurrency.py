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

from .conftest import bearer, start_embedded_api

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
