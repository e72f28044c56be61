"""`GET /v1/jobs/{id}/events/stream`: live Server-Sent Events over real HTTP, resumable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Worker, all_events, tiny_job

pytestmark = pytest.mark.timeout(180)


def read_sse(client: httpx.Client, path: str, **headers: str) -> list[dict[str, Any]]:
    """Every message until the server closes the stream: [{id, event, data}]."""
    messages, current = [], {}
    with client.stream("GET", path, headers=headers, timeout=150) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    messages.append(current)
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return messages


def test_a_running_job_streams_its_events_live_and_the_stream_resumes(
    client: httpx.Client, datasets: dict[str, str], tiny_model: Path, worker: Worker
) -> None:
    job = client.post(
        "/v1/jobs", json=tiny_job(tiny_model, datasets, method="van", eval_datasets=[])
    ).json()

    streamed = read_sse(client, f"/v1/jobs/{job['id']}/events/stream")  # closes at the end

    listed = all_events(client, job["id"])
    assert [m["id"] for m in streamed] == [e["id"] for e in listed]
    assert [m["data"] for m in streamed] == listed
    assert all(m["event"] == m["data"]["type"] for m in streamed)
    statuses = [m["data"]["data"]["status"] for m in streamed if m["event"] == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded"

    cut = streamed[2]["id"]
    resumed = read_sse(client, f"/v1/jobs/{job['id']}/events/stream", **{"Last-Event-ID": cut})
    assert [m["id"] for m in resumed] == [m["id"] for m in streamed[3:]]


def test_the_stream_of_an_unknown_or_foreign_job_is_a_json_404(
    client: httpx.Client, other_client: httpx.Client, datasets: dict[str, str], no_worker: Worker
) -> None:
    job = client.post("/v1/jobs", json={"train_dataset": datasets["mmlu"]}).json()
    try:
        for who, path in (
            (client, "/v1/jobs/job-unknown/events/stream"),
            (other_client, f"/v1/jobs/{job['id']}/events/stream"),
        ):
            response = who.get(path)
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        bad = client.get(
            f"/v1/jobs/{job['id']}/events/stream", headers={"Last-Event-ID": "nonsense"}
        )
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "after"
    finally:
        client.post(f"/v1/jobs/{job['id']}/cancel")
