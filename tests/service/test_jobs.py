"""Job API behaviour that needs no worker: validation, queued-job cancel, in-use datasets."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import Worker

pytestmark = pytest.mark.timeout(90)


def spec(datasets: dict[str, str], **overrides: Any) -> dict[str, Any]:
    return {
        "method": "grait",
        "train_dataset": datasets["mmlu"],
        "eval_datasets": [datasets["arc"]],
        **overrides,
    }


@pytest.mark.parametrize(
    ("overrides", "param", "code"),
    [
        (
            {"hyperparameters": {"training": {"epochs": 0}}},
            "hyperparameters.training.epochs",
            "invalid_request",
        ),
        ({"hyperparameters": {"trainin": {}}}, "hyperparameters.trainin", "invalid_request"),
        (
            {"hyperparameters": {"weighting": {"w_min": 3, "w_max": 1}}},
            "hyperparameters.weighting",
            "invalid_request",
        ),
        ({"hyperparameters": {"lora": {"r": "big"}}}, "hyperparameters.lora.r", "invalid_request"),
        (
            {"hyperparameters": {"training": {"max_length": 10**6}}},
            "hyperparameters.training.max_length",
            "invalid_request",
        ),
        (
            {"hyperparameters": {"evaluation": {"max_new_tokens": 10**6}}},
            "hyperparameters.evaluation.max_new_tokens",
            "invalid_request",
        ),
        (
            {"hyperparameters": {"features": {"dim": 10**8}}},
            "hyperparameters.features.dim",
            "invalid_request",
        ),
        (
            {"hyperparameters": {"training": {"epochs": 5000}}},
            "hyperparameters.training.epochs",
            "invalid_request",
        ),
        ({"method": "sft"}, "method", "invalid_request"),
        ({"train_dataset": "ds-missing"}, "train_dataset", "dataset_not_found"),
        ({"eval_datasets": ["ds-missing"]}, "eval_datasets[0]", "dataset_not_found"),
        ({"eval_datasets": [{"id": "x", "limit": 0}]}, "eval_datasets[0].limit", "invalid_request"),
        ({"base_model": "not a model"}, "base_model", "invalid_request"),
        ({"base_model": "/nowhere/model"}, "base_model", "invalid_request"),
        ({"suffix": "has space"}, "suffix", "invalid_request"),
        ({"unknown": 1}, "unknown", "invalid_request"),
    ],
)
def test_invalid_job_spec_is_422_naming_the_param(
    client: httpx.Client, datasets: dict[str, str], overrides: dict[str, Any], param: str, code: str
) -> None:
    before = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    response = client.post("/v1/jobs", json=spec(datasets, **overrides))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert error["message"]
    assert client.get("/v1/jobs", params={"limit": 100}).json()["data"] == before


@pytest.mark.parametrize(
    ("method", "hyperparameters"),
    [
        ("grait", {"knowledge": {"n_idk": "auto", "auto": {"max_over_refusal": 0.1}}}),
        ("stratified-random", {}),
        ("stratified-random", {"knowledge": {"n_idk": "auto"}}),
        ("craft-nocert", {"craft": {"rehearsal_epochs": 2}}),
    ],
)
def test_auto_budget_stratified_random_and_craft_jobs_are_accepted(
    client: httpx.Client,
    datasets: dict[str, str],
    no_worker: Worker,
    method: str,
    hyperparameters: dict[str, Any],
) -> None:
    response = client.post(
        "/v1/jobs", json=spec(datasets, method=method, hyperparameters=hyperparameters)
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert (job["method"], job["status"]) == (method, "queued")
    knowledge = job["hyperparameters"]["knowledge"]
    wanted = hyperparameters.get("knowledge", {})
    assert knowledge["n_idk"] == wanted.get("n_idk")
    assert knowledge["auto"]["max_over_refusal"] == wanted.get("auto", {}).get(
        "max_over_refusal", 0.05
    )
    if "craft" in hyperparameters:
        assert job["hyperparameters"]["craft"]["rehearsal_epochs"] == 2
    client.post(f"/v1/jobs/{job['id']}/cancel")


@pytest.mark.parametrize(
    ("overrides", "param", "words"),
    [
        (
            {"method": "rtuning", "hyperparameters": {"knowledge": {"n_idk": "auto"}}},
            "hyperparameters.knowledge.n_idk",
            "no budget to pick",
        ),
        (
            {"method": "van", "hyperparameters": {"knowledge": {"n_idk": "auto"}}},
            "hyperparameters.knowledge.n_idk",
            "stratified-random",
        ),
        (
            {"hyperparameters": {"knowledge": {"auto": {"max_over_refusal": 2}}}},
            "hyperparameters.knowledge.auto.max_over_refusal",
            "less than or equal to 1",
        ),
        (
            {"hyperparameters": {"knowledge": {"n_idk": "lots"}}},
            "hyperparameters.knowledge.n_idk",
            "'auto'",
        ),
        (
            {"hyperparameters": {"decoding": {"refusal_bias": "auto"}}},
            "hyperparameters.decoding.refusal_bias",
            "knowledge.n_idk to auto",
        ),
        (
            {"hyperparameters": {"decoding": {"refusal_bias": 99}}},
            "hyperparameters.decoding.refusal_bias",
            "in [-30, 30] or 'auto'",
        ),
    ],
)
def test_auto_budget_errors_are_422_naming_the_field(
    client: httpx.Client,
    datasets: dict[str, str],
    overrides: dict[str, Any],
    param: str,
    words: str,
) -> None:
    response = client.post("/v1/jobs", json=spec(datasets, **overrides))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_request"), error
    assert words in error["message"], error


def test_job_fills_documented_defaults_and_keeps_metadata(
    client: httpx.Client, datasets: dict[str, str], no_worker: Worker
) -> None:
    response = client.post(
        "/v1/jobs",
        json=spec(
            datasets,
            hyperparameters={"training": {"epochs": 2}},
            seed=7,
            suffix="exp-1",
            metadata={"team": "qa"},
            eval_datasets=[{"id": datasets["arc"], "limit": 5, "name": "arc-ood"}],
        ),
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["object"] == "grait.job" and job["status"] == "queued"
    assert job["hyperparameters"]["training"]["epochs"] == 2
    assert job["hyperparameters"]["knowledge"]["tau"] == 0.5  # a default from grait.config
    assert (job["seed"], job["suffix"], job["metadata"]) == (7, "exp-1", {"team": "qa"})
    assert (job["train_dataset"], job["eval_datasets"]) == (datasets["mmlu"], [datasets["arc"]])
    assert (job["percent"], job["error"], job["attempts"]) == (0.0, None, 0)
    client.post(f"/v1/jobs/{job['id']}/cancel")


def test_cancel_of_queued_job_is_immediate(
    client: httpx.Client, datasets: dict[str, str], no_worker: Worker
) -> None:
    job = client.post("/v1/jobs", json=spec(datasets)).json()
    assert job["status"] == "queued"

    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")

    assert cancelled.status_code == 200
    body = cancelled.json()
    assert body["status"] == "cancelled" and body["finished_at"] is not None
    assert body["error"]["code"] == "cancelled"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["data"]["status"] for e in events] == ["queued", "cancelled"]


def test_delete_dataset_in_use_is_409_until_the_job_ends(
    client: httpx.Client, datasets: dict[str, str], data_dir: Any, no_worker: Worker
) -> None:
    from .conftest import upload

    own = upload(client, data_dir / "arc_excerpt.jsonl").json()["id"]
    job = client.post("/v1/jobs", json=spec(datasets, eval_datasets=[datasets["arc"], own])).json()

    refused = client.delete(f"/v1/datasets/{own}")

    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "dataset_in_use" and job["id"] in error["message"]
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/datasets/{own}").status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}").json()["eval_datasets"] == [datasets["arc"], None]


def test_jobs_list_paginates_and_filters_by_status(
    client: httpx.Client, datasets: dict[str, str], no_worker: Worker
) -> None:
    ids = [client.post("/v1/jobs", json=spec(datasets)).json()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]] and page["has_more"]
    rest = client.get("/v1/jobs", params={"limit": 2, "after": page["last_id"]}).json()
    assert rest["data"][0]["id"] == ids[0]
    queued = client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()["data"]
    assert {ids[1], ids[2]} <= {j["id"] for j in queued} and ids[0] not in {j["id"] for j in queued}
    assert all(j["status"] == "queued" for j in queued)
    assert client.get("/v1/jobs", params={"status": "bogus"}).json()["error"]["param"] == "status"
    for job_id in ids[1:]:
        client.post(f"/v1/jobs/{job_id}/cancel")


def test_events_are_cursor_paginated_oldest_first(
    client: httpx.Client, datasets: dict[str, str], no_worker: Worker
) -> None:
    job = client.post("/v1/jobs", json=spec(datasets)).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    first = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1}).json()
    assert first["has_more"] and first["data"][0]["data"]["status"] == "queued"
    second = client.get(
        f"/v1/jobs/{job['id']}/events", params={"limit": 1, "after": first["last_id"]}
    ).json()
    assert not second["has_more"] and second["data"][0]["data"]["status"] == "cancelled"
    assert (
        client.get(f"/v1/jobs/{job['id']}/events", params={"after": "garbage"}).json()["error"][
            "param"
        ]
        == "after"
    )


def test_unknown_job_is_404_everywhere(client: httpx.Client) -> None:
    for method, path in [
        ("GET", "/v1/jobs/job-x"),
        ("POST", "/v1/jobs/job-x/cancel"),
        ("GET", "/v1/jobs/job-x/events"),
        ("GET", "/v1/jobs/job-x/artifacts"),
        ("GET", "/v1/jobs/job-x/artifacts/file-x/content"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "path",
    ["/v1/jobs/job-%00x", "/v1/datasets/ds-%00", "/v1/fine_tuning/jobs/x%00y", "/v1/files/f%00"],
)
def test_nul_in_an_id_is_a_4xx_not_a_database_error(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code in (400, 404, 422), (path, response.text)
    assert response.json()["error"]["message"]


def test_nul_in_a_submitted_id_or_label_is_422_naming_the_field(
    client: httpx.Client, datasets: dict[str, str]
) -> None:
    for body, param in (
        ({"train_dataset": "ds-\x00"}, "train_dataset.id"),
        ({"train_dataset": datasets["mmlu"], "metadata": {"k": "v\x00"}}, "metadata.k"),
    ):
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == param
    openai_face = client.post(
        "/v1/fine_tuning/jobs", json={"model": "smollm2-135m-instruct", "training_file": "f\x00"}
    )
    assert openai_face.status_code == 400, openai_face.text
    assert openai_face.json()["error"]["param"] == "training_file"


@pytest.mark.timeout(120)
def test_a_cancel_is_never_lost_while_the_job_flips_between_queued_and_running(
    client: httpx.Client, datasets: dict[str, str], service_env: dict[str, str], no_worker: Any
) -> None:
    """A claim/sweeper storm flips the job's status while cancels arrive: every cancel call
    returns a job that is cancelled or flagged, whatever moment it landed in."""
    import threading

    from sqlalchemy import update

    from app.db import session_factory, short_session
    from app.jobs.service import cancel_job
    from app.models import Job

    from .conftest import settings_for

    settings = settings_for(service_env)
    tenant = None
    outcomes: list[tuple[str, bool]] = []
    for _ in range(15):
        job = client.post("/v1/jobs", json={"train_dataset": datasets["mmlu"]}).json()
        with short_session(settings) as session:
            row = session.get(Job, job["id"])
            tenant = row.tenant_id
            session.execute(update(Job).where(Job.id == job["id"]).values(status="running"))
        stop = threading.Event()

        def storm(job_id: str = job["id"], stop: threading.Event = stop) -> None:
            flip = ("queued", "running")
            i = 0
            while not stop.is_set():
                with short_session(settings) as s:
                    s.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.status.in_(flip))
                        .values(status=flip[i % 2])
                    )
                i += 1

        thread = threading.Thread(target=storm, daemon=True)
        thread.start()
        try:
            with session_factory(settings)() as session:
                done = cancel_job(session=session, tenant_id=tenant, job_id=job["id"])
                outcomes.append((done.status, done.cancel_requested))
        finally:
            stop.set()
            thread.join(timeout=10)
    assert all(status == "cancelled" or flagged for status, flagged in outcomes), outcomes
