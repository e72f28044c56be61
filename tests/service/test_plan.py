"""POST /v1/jobs/plan and planning at submit, over real HTTP against Postgres.

The 8B model here is a folder with Llama-3-8B's config.json and a tokenizer, no weights:
the planner reads shapes only, which is what lets the API size a job without a GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from grait.config import ALL_LINEAR
from grait.methods import method_spec
from grait.planning.architecture import LLAMA3_8B

from .conftest import Worker, tiny_job


@pytest.fixture(scope="module")
def llama_8b_shape(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama-3-8b-shape")
    for name in tiny_model.iterdir():
        if name.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(name, folder / name.name)
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return folder


def _big_job(model: Path, datasets: dict[str, str], **loading: Any) -> dict[str, Any]:
    return {
        "method": "grait",
        "base_model": str(model),
        "train_dataset": datasets["mmlu"],
        "eval_datasets": [{"id": datasets["arc"], "limit": 6}],
        "hyperparameters": {
            "loading": loading,
            "lora": {"r": 64, "alpha": 128, "target_modules": list(ALL_LINEAR)},
            "training": {"batch_size": 16, "max_length": 512},
        },
    }


def test_a_plan_lists_every_stage_the_method_runs_with_time_and_memory(
    client: httpx.Client, tiny_model: Path, datasets: dict[str, str]
) -> None:
    response = client.post("/v1/jobs/plan", json=tiny_job(tiny_model, datasets))

    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["object"] == "grait.plan" and plan["fits"] is True
    assert tuple(s["stage"] for s in plan["stages"]) == method_spec("grait").stages
    for stage in plan["stages"]:
        assert stage["seconds"] >= 0 and stage["peak_memory_bytes"] >= plan["weights_bytes"]
    training = next(s for s in plan["stages"] if s["stage"] == "training")
    assert training["tokens"] > 0 and training["flops"] > 0
    assert plan["seconds"] == pytest.approx(sum(s["seconds"] for s in plan["stages"]), abs=0.5)
    assert plan["compute_class"] == "cpu"  # the deployment's class when none is named


def test_an_8b_job_that_cannot_fit_is_a_422_with_the_numbers_and_4_bit_fits(
    client: httpx.Client, llama_8b_shape: Path, datasets: dict[str, str]
) -> None:
    too_big = client.post(
        "/v1/jobs/plan",
        json={**_big_job(llama_8b_shape, datasets), "compute_class": "gpu-l4-24g"},
    )
    fits = client.post(
        "/v1/jobs/plan",
        json={
            **_big_job(llama_8b_shape, datasets, quantization="4bit"),
            "compute_class": "gpu-h100-80g",
        },
    )

    assert too_big.status_code == 422, too_big.text
    error = too_big.json()["error"]
    assert error["code"] == "job_does_not_fit" and "gpu-l4-24g" in error["message"]
    assert error["plan"]["fits"] is False
    assert error["plan"]["peak_memory_bytes"] > error["plan"]["memory_limit_bytes"]
    assert error["plan"]["params"] > 7.5e9  # Llama-3-8B's shape, counted from its config
    assert fits.status_code == 200, fits.text
    plan = fits.json()
    assert plan["quantization"] == "4bit" and plan["weights_bytes"] < 7e9
    assert plan["lora_params"] == pytest.approx(167.8e6, rel=0.01)  # r=64 on all linears


def test_unknown_class_and_another_tenants_dataset_are_precise_422s(
    client: httpx.Client,
    other_client: httpx.Client,
    tiny_model: Path,
    datasets: dict[str, str],
) -> None:
    unknown = client.post(
        "/v1/jobs/plan", json={**tiny_job(tiny_model, datasets), "compute_class": "tpu-v9"}
    )
    foreign = other_client.post("/v1/jobs/plan", json=tiny_job(tiny_model, datasets))

    assert unknown.status_code == 422
    assert unknown.json()["error"]["param"] == "compute_class"
    assert foreign.status_code == 422
    assert foreign.json()["error"]["code"] == "dataset_not_found"


def test_submit_stores_the_plan_and_refuses_a_job_too_big_for_the_workers(
    client: httpx.Client,
    tiny_model: Path,
    llama_8b_shape: Path,
    datasets: dict[str, str],
    no_worker: Worker,
) -> None:
    refused = client.post("/v1/jobs", json=_big_job(llama_8b_shape, datasets))
    created = client.post("/v1/jobs", json=tiny_job(tiny_model, datasets))

    four_bit = client.post("/v1/jobs", json=_big_job(llama_8b_shape, datasets, quantization="4bit"))

    # The deployment's class is `cpu`: an 8B model in float32 is ~32 GB before any batch.
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "job_does_not_fit"
    # ... and 4 bit needs CUDA, which a CPU worker cannot give: refused before it queues.
    assert four_bit.status_code == 422
    assert four_bit.json()["error"]["param"] == "hyperparameters.loading.quantization"
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["plan"]["compute_class"] == "cpu" and job["plan"]["stages"]
    assert client.get(f"/v1/jobs/{job['id']}").json()["plan"] == job["plan"]
    client.post(f"/v1/jobs/{job['id']}/cancel")


def test_compute_classes_list_the_deployed_one(client: httpx.Client) -> None:
    body = client.get("/v1/compute_classes").json()

    ids = {c["id"]: c for c in body["data"]}
    assert {"cpu", "gpu-h100-80g", "gpu-h200-141g"} <= set(ids)
    assert [c["id"] for c in body["data"] if c["deployed"]] == ["cpu"]
    assert ids["gpu-h100-80g"]["peak_flops"]["bfloat16"] > 9e14
