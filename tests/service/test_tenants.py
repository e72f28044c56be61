"""API keys and tenants: no key, no access; another tenant's ids are unknown ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .conftest import Worker, bearer, settings_for, upload

pytestmark = pytest.mark.timeout(60)

NATIVE_ROUTES = [
    ("GET", "/v1/datasets"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/datasets/ds-x"),
    ("DELETE", "/v1/datasets/ds-x"),
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("POST", "/v1/jobs/plan"),
    ("GET", "/v1/jobs/job-x"),
    ("POST", "/v1/jobs/job-x/cancel"),
    ("GET", "/v1/jobs/job-x/events/stream"),
    ("GET", "/v1/jobs/job-x/events"),
    ("GET", "/v1/jobs/job-x/artifacts"),
    ("GET", "/v1/jobs/job-x/artifacts/file-x/content"),
    ("GET", "/v1/jobs/job-x/webhook_deliveries"),
    ("GET", "/v1/webhook_secret"),
    ("GET", "/v1/models"),
    ("GET", "/v1/compute_classes"),
]
OPENAI_ROUTES = [
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/ds-x"),
    ("GET", "/v1/files/ds-x/content"),
    ("DELETE", "/v1/files/ds-x"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/job-x"),
    ("POST", "/v1/fine_tuning/jobs/job-x/cancel"),
    ("GET", "/v1/fine_tuning/jobs/job-x/events"),
    ("GET", "/v1/fine_tuning/jobs/job-x/checkpoints"),
    ("POST", "/v1/chat/completions"),
]


def test_every_v1_route_is_in_the_openapi_lists_above(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    documented = {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        if path.startswith("/v1")
        for method in ops
    }
    normalise = {
        "ds-x": "{dataset_id}",
        "job-x": "{job_id}",
        "file-x": "{artifact_id}",
    }

    def template(method: str, path: str) -> tuple[str, str]:
        parts = path.split("/")
        if path.startswith(("/v1/files/",)):
            parts = [("{file_id}" if p == "ds-x" else p) for p in parts]
        return method, "/".join(normalise.get(p, p) for p in parts)

    listed = {template(m, p) for m, p in NATIVE_ROUTES + OPENAI_ROUTES}
    assert documented == listed
    assert spec["components"]["securitySchemes"]["APIKey"]["scheme"] == "bearer"


@pytest.mark.parametrize("key", [None, "gk_not-a-real-key", "not even the shape"])
def test_native_routes_need_a_valid_key(api_url: str, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    for method, path in NATIVE_ROUTES:
        response = httpx.request(method, api_url + path, headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        error = response.json()["error"]
        assert error["code"] in ("missing_api_key", "invalid_api_key") and error["message"]
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_openai_routes_answer_401_in_openai_shape_and_the_client_raises(api_url: str) -> None:
    for method, path in OPENAI_ROUTES:
        response = httpx.request(method, api_url + path, headers={"Authorization": "Bearer gk_no"})
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["type"] == "authentication_error"
    oai = openai.OpenAI(base_url=f"{api_url}/v1", api_key="gk_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        oai.fine_tuning.jobs.list()
    with pytest.raises(openai.AuthenticationError):
        oai.files.list()


def test_health_stays_open_and_metrics_need_their_token(
    api_url: str, service_env: dict[str, str]
) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert httpx.get(api_url + path).status_code == 200, path
    refused = httpx.get(api_url + "/metrics")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_metrics_token"
    token = bearer(service_env["GRAIT_METRICS_TOKEN"])
    assert httpx.get(api_url + "/metrics", headers=token).status_code == 200


@pytest.fixture(scope="module")
def alpha_objects(
    api_url: str,
    api_key: str,
    datasets: dict[str, str],
    service_env: dict[str, str],
    worker_control: Worker,
) -> dict[str, Any]:
    """Tenant alpha's dataset, a finished job with one artifact (file on disk) and its events."""
    from app.db import short_session
    from app.models import Artifact, new_id
    from app.storage import get_storage

    worker_control.stop()
    client = httpx.Client(base_url=api_url, headers=bearer(api_key), timeout=30)
    job = client.post(
        "/v1/jobs", json={"train_dataset": datasets["mmlu"], "eval_datasets": [datasets["arc"]]}
    ).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    settings = settings_for(service_env)
    artifact_id = new_id("file")
    key = f"jobs/{job['id']}/report.json"
    source = Path(service_env["GRAIT_STORAGE_DIR"]) / "staging" / "alpha-report.json"
    source.write_text('{"secret": "alpha"}')
    get_storage(settings).put_file(key, source)
    with short_session(settings) as session:
        session.add(
            Artifact(
                id=artifact_id,
                job_id=job["id"],
                kind="report_json",
                filename="report.json",
                content_type="application/json",
                bytes=19,
                storage_key=key,
            )
        )
    assert client.get(f"/v1/jobs/{job['id']}/artifacts/{artifact_id}/content").status_code == 200
    client.close()
    return {"dataset": datasets["arc"], "job": job["id"], "artifact": artifact_id}


def test_another_tenants_ids_answer_404_like_unknown_ids_on_every_route(
    client: httpx.Client, other_client: httpx.Client, alpha_objects: dict[str, Any]
) -> None:
    ds, job, art = alpha_objects["dataset"], alpha_objects["job"], alpha_objects["artifact"]
    routes = [
        ("GET", f"/v1/datasets/{ds}"),
        ("DELETE", f"/v1/datasets/{ds}"),
        ("GET", f"/v1/jobs/{job}"),
        ("POST", f"/v1/jobs/{job}/cancel"),
        ("GET", f"/v1/jobs/{job}/events"),
        ("GET", f"/v1/jobs/{job}/artifacts"),
        ("GET", f"/v1/jobs/{job}/artifacts/{art}/content"),
        ("GET", f"/v1/jobs/{job}/webhook_deliveries"),
        ("GET", f"/v1/files/{ds}"),
        ("GET", f"/v1/files/{ds}/content"),
        ("DELETE", f"/v1/files/{ds}"),
        ("GET", f"/v1/files/{art}"),
        ("GET", f"/v1/files/{art}/content"),
        ("DELETE", f"/v1/files/{art}"),
        ("GET", f"/v1/fine_tuning/jobs/{job}"),
        ("POST", f"/v1/fine_tuning/jobs/{job}/cancel"),
        ("GET", f"/v1/fine_tuning/jobs/{job}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job}/checkpoints"),
    ]
    for method, path in routes:
        foreign = other_client.request(method, path)
        unknown = other_client.request(method, _unknown(path, alpha_objects))
        assert foreign.status_code == unknown.status_code == 404, (path, foreign.text)
        # Same body apart from the id itself: nothing tells "exists elsewhere" from "unknown".
        assert _without_ids(foreign.json(), alpha_objects) == _without_ids(
            unknown.json(), alpha_objects
        ), path
    # ... and the owner still has everything (the deletes above did nothing).
    assert client.get(f"/v1/datasets/{ds}").status_code == 200
    assert client.get(f"/v1/jobs/{job}/artifacts/{art}/content").json() == {"secret": "alpha"}


def _unknown(path: str, objects: dict[str, Any]) -> str:
    for value in objects.values():
        prefix = value.split("-", 1)[0]
        path = path.replace(value, f"{prefix}-00000000000000000000")
    return path


def _without_ids(body: Any, objects: dict[str, Any]) -> str:
    text = str(body)
    for value in objects.values():
        text = text.replace(value, "<id>")
    return (
        text.replace(f"{'ds'}-00000000000000000000", "<id>")
        .replace("job-00000000000000000000", "<id>")
        .replace("file-00000000000000000000", "<id>")
    )


def test_lists_show_only_the_tenants_own_objects(
    client: httpx.Client, other_client: httpx.Client, alpha_objects: dict[str, Any], data_dir: Path
) -> None:
    own = upload(other_client, data_dir / "arc_excerpt.jsonl").json()["id"]
    for path in ("/v1/datasets", "/v1/jobs", "/v1/files", "/v1/fine_tuning/jobs"):
        theirs = {o["id"] for o in other_client.get(path, params={"limit": 100}).json()["data"]}
        ours = {o["id"] for o in client.get(path, params={"limit": 100}).json()["data"]}
        assert not theirs & ours, path
        assert set(alpha_objects.values()).isdisjoint(theirs), path
    assert own in {o["id"] for o in other_client.get("/v1/datasets").json()["data"]}
    other_client.delete(f"/v1/datasets/{own}")


def test_a_job_cannot_train_on_another_tenants_dataset(
    other_client: httpx.Client, alpha_objects: dict[str, Any]
) -> None:
    response = other_client.post("/v1/jobs", json={"train_dataset": alpha_objects["dataset"]})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "dataset_not_found"
    assert response.json()["error"]["param"] == "train_dataset"
    oai = other_client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "smollm2-135m-instruct", "training_file": alpha_objects["dataset"]},
    )
    assert oai.status_code == 400 and oai.json()["error"]["param"] == "training_file"


def test_webhook_secrets_differ_per_tenant(
    client: httpx.Client, other_client: httpx.Client
) -> None:
    mine = client.get("/v1/webhook_secret").json()["secret"]
    theirs = other_client.get("/v1/webhook_secret").json()["secret"]
    assert mine.startswith("whsec_") and theirs.startswith("whsec_") and mine != theirs
