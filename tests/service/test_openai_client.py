"""The official `openai` client against the real server (uvicorn, Celery worker, Postgres, Redis).

Only the client's own calls drive the OpenAI face; httpx is used to look at the native face,
which must show the same files and jobs.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .conftest import SHARED_DATA, TERMINAL, Worker, wait_for

ARC_TEST = SHARED_DATA / "arc_easy" / "test.jsonl"
NQ_DEV = SHARED_DATA / "nq" / "dev_part1.jsonl"
STAGES = ["knowledge_query", "warmup", "gradient_features", "selection", "training", "evaluation"]


def chat_lines(start: int, count: int) -> str:
    """NQ questions in OpenAI's chat fine-tuning format (a system line, a question, an answer)."""
    rows = [json.loads(line) for line in NQ_DEV.read_text(encoding="utf-8").splitlines()]
    return "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Answer with a few words."},
                    {"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": row["answers"][0]},
                ]
            }
        )
        + "\n"
        for row in rows[start : start + count]
    )


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ARC-Easy training excerpt, a small ARC validation set, NQ as chat, and broken files."""
    out = tmp_path_factory.mktemp("openai-files")
    arc = ARC_TEST.read_text(encoding="utf-8").splitlines()
    (out / "arc_train.jsonl").write_text("\n".join(arc[:30]) + "\n", encoding="utf-8")
    (out / "arc_valid.jsonl").write_text("\n".join(arc[30:36]) + "\n", encoding="utf-8")
    (out / "nq_chat.jsonl").write_text(chat_lines(0, 4), encoding="utf-8")
    (out / "broken_arc.jsonl").write_text(
        "\n".join(arc[:2]) + '\n{"id": "x", "question": {"stem": "?"}}\n', encoding="utf-8"
    )
    multi_turn = {
        "messages": [
            {"role": "user", "content": "a?"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c?"},
            {"role": "assistant", "content": "d"},
        ]
    }
    (out / "multi_turn_chat.jsonl").write_text(
        chat_lines(0, 1) + json.dumps(multi_turn) + "\n", encoding="utf-8"
    )
    return out


@pytest.fixture(scope="module")
def oai(api_url: str, api_key: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{api_url}/v1", api_key=api_key)
    yield client
    client.close()


@pytest.fixture(scope="module")
def uploaded(oai: openai.OpenAI, files_dir: Path) -> dict[str, str]:
    """File ids of the training, validation and chat eval files (uploaded once)."""
    out = {}
    for key in ("arc_train", "arc_valid", "nq_chat"):
        with (files_dir / f"{key}.jsonl").open("rb") as fh:
            out[key] = oai.files.create(file=fh, purpose="fine-tune").id
    return out


def tiny_grait_method(uploaded: dict[str, str]) -> dict[str, Any]:
    """`grait` on the tiny model, with OpenAI's knobs standing in for three grait ones."""
    from grait.testing import tiny_hyperparameters

    hyper = tiny_hyperparameters()
    training = hyper["training"]
    epochs, batch_size = training.pop("epochs"), training.pop("batch_size")
    lr_multiplier = training.pop("learning_rate") / 2e-4  # grait's default learning rate
    hyper["evaluation"]["eval_base_refuse_prompt"] = False
    return {
        "type": "grait",
        "grait": {
            "hyperparameters": {
                "n_epochs": epochs,
                "batch_size": batch_size,
                "learning_rate_multiplier": lr_multiplier,
                **hyper,
            },
            "eval_files": [uploaded["nq_chat"]],
        },
    }


# ---- files -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_fine_tune_file_is_a_dataset_seen_through_both_faces(
    oai: openai.OpenAI, client: httpx.Client, files_dir: Path, uploaded: dict[str, str]
) -> None:
    path = files_dir / "arc_train.jsonl"
    with path.open("rb") as fh:
        created = oai.files.create(file=fh, purpose="fine-tune")

    assert (created.object, created.purpose, created.status) == ("file", "fine-tune", "processed")
    assert (created.filename, created.bytes) == ("arc_train.jsonl", path.stat().st_size)
    native = client.get(f"/v1/datasets/{created.id}").json()
    assert (native["format"], native["kind"], native["rows"]) == ("arc", "mcqa", 30)
    assert oai.files.retrieve(created.id).id == created.id
    assert oai.files.content(created.id).content == path.read_bytes()
    listed = [f.id for f in oai.files.list(purpose="fine-tune", limit=1)]  # auto-paginates
    assert created.id in listed and uploaded["arc_train"] in listed
    assert listed.index(created.id) < listed.index(uploaded["arc_train"])  # newest first

    deleted = oai.files.delete(created.id)

    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(created.id)
    assert client.get(f"/v1/datasets/{created.id}").status_code == 404


@pytest.mark.timeout(60)
def test_chat_file_is_read_as_open_ended_questions(
    client: httpx.Client, uploaded: dict[str, str]
) -> None:
    native = client.get(f"/v1/datasets/{uploaded['nq_chat']}").json()
    assert (native["format"], native["kind"], native["rows"]) == ("openai_chat", "oeqa", 4)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("broken_arc.jsonl", "line 3, field 'question.choices'"),
        ("multi_turn_chat.jsonl", "line 2, field 'messages[2]': multi-turn"),
    ],
)
def test_invalid_file_raises_bad_request_naming_the_line(
    oai: openai.OpenAI, client: httpx.Client, files_dir: Path, name: str, words: str
) -> None:
    before = client.get("/v1/datasets", params={"limit": 100}).json()["data"]
    with (files_dir / name).open("rb") as fh, pytest.raises(openai.BadRequestError) as info:
        oai.files.create(file=fh, purpose="fine-tune")

    assert words in info.value.message, info.value.message
    assert (info.value.param, info.value.code, info.value.type) == (
        "file",
        "invalid_dataset",
        "invalid_request_error",
    )
    assert client.get("/v1/datasets", params={"limit": 100}).json()["data"] == before


@pytest.mark.timeout(60)
def test_upload_with_another_purpose_is_refused(oai: openai.OpenAI, files_dir: Path) -> None:
    with (
        (files_dir / "arc_valid.jsonl").open("rb") as fh,
        pytest.raises(openai.BadRequestError) as info,
    ):
        oai.files.create(file=fh, purpose="assistants")
    assert info.value.param == "purpose" and "fine-tune" in info.value.message


# ---- job requests the service refuses --------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("overrides", "param", "words"),
    [
        ({"hyperparameters": {"n_epoch": 2}}, "hyperparameters.n_epoch", "unknown hyperparameter"),
        (
            {"method": {"type": "grait", "grait": {"hyperparameters": {"trainin": {}}}}},
            "method.grait.hyperparameters.trainin",
            "unknown hyperparameter 'trainin'",
        ),
        ({"model": "gpt-4o-mini"}, "model", "model 'gpt-4o-mini' is neither a known alias"),
        ({"training_file": "ds-missing"}, "training_file", "No fine-tune file with id"),
        ({"validation_file": "ds-missing"}, "validation_file", "No fine-tune file with id"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "a number in (0, 1000]"),
        (
            {"hyperparameters": {"learning_rate_multiplier": -1}},
            "hyperparameters.learning_rate_multiplier",
            "greater than 0",
        ),
        (
            {"method": {"type": "rtuning", "rtuning": {"hyperparameters": {"lora": {"r": 0}}}}},
            "method.rtuning.hyperparameters.lora.r",
            "greater than or equal to 1",
        ),
        ({"method": {"type": "dpo"}}, "method.type", "'grait'"),
        (
            {"method": {"type": "grait", "supervised": {}}},
            "method",
            "method.supervised is given but method.type is 'grait'",
        ),
        (
            {
                "hyperparameters": {"n_epochs": 1},
                "method": {"type": "grait", "grait": {"hyperparameters": {"n_epochs": 2}}},
            },
            "hyperparameters",
            "not both",
        ),
        (
            {"validation_file": None, "method": {"type": "grait", "grait": {"eval_files": ["x"]}}},
            "method.grait.eval_files",
            "validation_file",
        ),
        ({"suffix": "has space"}, "suffix", "suffix"),
    ],
)
def test_invalid_job_raises_bad_request_saying_what_is_wrong(
    oai: openai.OpenAI,
    client: httpx.Client,
    uploaded: dict[str, str],
    overrides: dict[str, Any],
    param: str,
    words: str,
) -> None:
    before = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    request = {
        "model": "smollm2-135m-instruct",
        "training_file": uploaded["arc_train"],
        "validation_file": uploaded["arc_valid"],
        **overrides,
    }

    with pytest.raises(openai.BadRequestError) as info:
        oai.fine_tuning.jobs.create(**request)

    assert info.value.param == param, info.value.body
    assert words in info.value.message, info.value.message
    assert info.value.type == "invalid_request_error"
    assert client.get("/v1/jobs", params={"limit": 100}).json()["data"] == before


@pytest.mark.timeout(60)
def test_unknown_ids_raise_not_found(oai: openai.OpenAI) -> None:
    for call in (
        lambda: oai.fine_tuning.jobs.retrieve("job-unknown"),
        lambda: oai.fine_tuning.jobs.cancel("job-unknown"),
        lambda: oai.fine_tuning.jobs.list_events("job-unknown"),
        lambda: oai.fine_tuning.jobs.checkpoints.list("job-unknown"),
        lambda: oai.files.retrieve("file-unknown"),
        lambda: oai.files.content("ds-unknown"),
        lambda: oai.files.delete("nothing-like-an-id"),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert "unknown" in info.value.message or "nothing" in info.value.message
        assert info.value.type == "invalid_request_error"


# ---- jobs ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cancel_of_a_queued_job_and_its_file_in_use(
    oai: openai.OpenAI, client: httpx.Client, uploaded: dict[str, str], no_worker: Worker
) -> None:
    job = oai.fine_tuning.jobs.create(
        model="smollm2-135m-instruct",
        training_file=uploaded["arc_valid"],
        metadata={"purpose": "cancel-test"},
    )
    assert job.status == "queued" and job.method.type == "random-idk"  # the documented default
    assert (
        job.hyperparameters.n_epochs == "auto" and job.hyperparameters.learning_rate_multiplier == 1
    )
    started = time.monotonic()
    with pytest.raises(openai.ConflictError) as info:
        oai.files.delete(uploaded["arc_valid"])
    assert job.id in info.value.message
    assert time.monotonic() - started < 5  # answered once: the client is told not to retry

    cancelled = oai.fine_tuning.jobs.cancel(job.id)

    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert cancelled.error is None and cancelled.fine_tuned_model is None
    assert client.get(f"/v1/jobs/{job.id}").json()["status"] == "cancelled"
    events = list(oai.fine_tuning.jobs.list_events(job.id))
    assert [e.data["status"] for e in events] == ["cancelled", "queued"]  # newest first
    assert all(e.object == "fine_tuning.job.event" and e.type == "message" for e in events)
    found = list(oai.fine_tuning.jobs.list(metadata={"purpose": "cancel-test"}))
    assert [j.id for j in found] == [job.id]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "method",
    [
        {
            "type": "grait",
            "grait": {
                "hyperparameters": {
                    "knowledge": {"n_idk": "auto", "auto": {"max_over_refusal": 0.1}}
                }
            },
        },
        {"type": "stratified-random"},
        {
            "type": "stratified-random",
            "stratified-random": {"hyperparameters": {"knowledge": {"n_idk": "auto"}}},
        },
        {
            "type": "craft",
            "craft": {
                "hyperparameters": {"knowledge": {"n_idk": "auto"}, "craft": {"max_delta": -0.05}}
            },
        },
    ],
)
def test_auto_budget_stratified_random_and_craft_jobs_are_accepted_through_the_openai_client(
    oai: openai.OpenAI,
    client: httpx.Client,
    uploaded: dict[str, str],
    no_worker: Worker,
    method: dict[str, Any],
) -> None:
    job = oai.fine_tuning.jobs.create(
        model="smollm2-135m-instruct",
        training_file=uploaded["arc_train"],
        validation_file=uploaded["arc_valid"],
        method=method,  # type: ignore[arg-type]
    )

    assert job.status == "queued" and job.method.type == method["type"]
    native = client.get(f"/v1/jobs/{job.id}").json()
    assert native["method"] == method["type"]
    given = (method.get(method["type"]) or {}).get("hyperparameters", {}).get("knowledge", {})
    assert native["hyperparameters"]["knowledge"]["n_idk"] == given.get("n_idk")
    if "auto" in given:
        assert native["hyperparameters"]["knowledge"]["auto"]["max_over_refusal"] == 0.1
        inner = getattr(job.method, method["type"])["hyperparameters"]
        assert inner["knowledge"]["n_idk"] == "auto"
    oai.fine_tuning.jobs.cancel(job.id)


@pytest.mark.timeout(60)
def test_auto_budget_for_a_method_without_one_is_a_bad_request_naming_the_field(
    oai: openai.OpenAI, client: httpx.Client, uploaded: dict[str, str]
) -> None:
    before = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    with pytest.raises(openai.BadRequestError) as info:
        oai.fine_tuning.jobs.create(
            model="smollm2-135m-instruct",
            training_file=uploaded["arc_train"],
            method={  # type: ignore[arg-type]
                "type": "rtuning",
                "rtuning": {"hyperparameters": {"knowledge": {"n_idk": "auto"}}},
            },
        )

    assert info.value.param == "method.rtuning.hyperparameters.knowledge.n_idk", info.value.body
    assert "no budget to pick" in info.value.message
    assert client.get("/v1/jobs", params={"limit": 100}).json()["data"] == before


@pytest.mark.timeout(300)
def test_grait_job_through_the_openai_client(
    oai: openai.OpenAI,
    client: httpx.Client,
    uploaded: dict[str, str],
    tiny_model: Path,
    worker: Worker,
    tmp_path: Path,
) -> None:
    method = tiny_grait_method(uploaded)
    # A bar no one-epoch tiny model clears: the job succeeds and warns (OpenAI's "warn" level).
    method["grait"]["hyperparameters"]["training"]["fit_check"] = {"min_refusal_learned": 1.0}
    job = oai.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=uploaded["arc_train"],
        validation_file=uploaded["arc_valid"],
        method=method,  # type: ignore[arg-type]
        suffix="oai",
        seed=3,
        metadata={"suite": "openai-e2e"},
    )
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (1, 8)
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(5.0)
    assert (job.training_file, job.validation_file, job.seed) == (
        uploaded["arc_train"],
        uploaded["arc_valid"],
        3,
    )
    native = client.get(f"/v1/jobs/{job.id}").json()  # one job, two faces
    assert native["hyperparameters"]["training"]["learning_rate"] == pytest.approx(1e-3)
    assert native["eval_datasets"] == [uploaded["arc_valid"], uploaded["nq_chat"]]

    def finished() -> Any:
        current = oai.fine_tuning.jobs.retrieve(job.id)
        return current if current.status in TERMINAL else None

    done = wait_for(finished, timeout=240, interval=1.0, what=f"job {job.id} to finish")

    assert done.status == "succeeded", (done.error, client.get(f"/v1/jobs/{job.id}").json())
    assert done.fine_tuned_model == f"{tiny_model.name}:ft-grait:oai:{job.id}"
    assert done.finished_at and done.estimated_finish is None and done.error is None
    assert done.trained_tokens and done.trained_tokens > 0
    assert done.method.type == "grait" and done.method.grait["eval_files"] == [uploaded["nq_chat"]]
    assert job.id in [j.id for j in oai.fine_tuning.jobs.list(limit=1)]  # auto-pagination
    assert [j.id for j in oai.fine_tuning.jobs.list(metadata={"suite": "openai-e2e"})] == [job.id]

    events = list(oai.fine_tuning.jobs.list_events(job.id, limit=25))
    assert events[0].data["status"] == "succeeded" and events[-1].data["status"] == "queued"
    metrics = [e for e in events if e.type == "metrics"]
    assert any("train_loss" in e.data for e in metrics)
    warned = [e for e in events if e.level == "warn"]
    assert [e.data["code"] for e in warned] == ["refusal_not_learned"], warned
    assert "refusal_not_learned" in events[0].message
    assert any(e.data.get("n_ik", -1) + e.data.get("n_idk", 0) == 30 for e in metrics)

    checkpoints = list(oai.fine_tuning.jobs.checkpoints.list(job.id, limit=2))
    assert [c.stage for c in checkpoints] == STAGES[::-1]  # newest first
    training = next(c for c in checkpoints if c.stage == "training")
    assert training.step_number == 5 and training.fine_tuning_job_id == job.id
    assert training.metrics.train_loss is not None
    assert training.metrics.trained_tokens == done.trained_tokens
    assert training.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:training"

    results = {oai.files.retrieve(file_id).kind: file_id for file_id in done.result_files}
    assert list(results)[:5] == ["report_json", "report_md", "report_plot", "adapter", "train_set"]
    assert all(oai.files.retrieve(i).purpose == "fine-tune-results" for i in results.values())
    report = json.loads(oai.files.content(results["report_json"]).content)
    assert report["method"] == "grait"
    assert [e["name"] for e in report["evals"]] == ["arc_valid", "nq_chat"]
    assert oai.files.content(results["report_plot"]).content[:4] == b"\x89PNG"
    weighted = oai.files.content(results["train_set"]).text.splitlines()
    assert weighted and all("weight" in json.loads(row) for row in weighted)

    adapter = oai.files.content(results["adapter"]).content
    with tarfile.open(fileobj=io.BytesIO(adapter), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    adapter_dir = next(p.parent for p in tmp_path.rglob("adapter_config.json"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter_dir)
    assert tuned.peft_config["default"].r == 4

    with pytest.raises(openai.ConflictError):
        oai.fine_tuning.jobs.cancel(job.id)


# ---- chat with the tuned model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned_model(
    oai: openai.OpenAI, uploaded: dict[str, str], tiny_model: Path, worker_control: Worker
) -> str:
    """The `fine_tuned_model` of the grait job above (trained once; made here if run alone)."""
    done = list(oai.fine_tuning.jobs.list(metadata={"suite": "openai-e2e"}))
    if not done:
        worker_control.ensure_running()
        job = oai.fine_tuning.jobs.create(
            model=str(tiny_model),
            training_file=uploaded["arc_train"],
            validation_file=uploaded["arc_valid"],
            method=tiny_grait_method(uploaded),  # type: ignore[arg-type]
            suffix="oai",
            metadata={"suite": "openai-e2e"},
        )
        done = [
            wait_for(
                lambda: (j := oai.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j,
                timeout=240,
                interval=1.0,
                what=f"job {job.id} to finish",
            )
        ]
    assert done[0].status == "succeeded" and done[0].fine_tuned_model, done[0]
    return done[0].fine_tuned_model


@pytest.mark.timeout(180)
def test_chat_with_the_fine_tuned_model_answers_and_streams_the_same_answer(
    oai: openai.OpenAI, tuned_model: str
) -> None:
    messages = [{"role": "user", "content": "Which gas do plants take in from the air?"}]
    started = time.monotonic()
    answer = oai.chat.completions.create(
        model=tuned_model,
        messages=messages,
        max_tokens=6,
        temperature=0,  # type: ignore[arg-type]
    )
    first = time.monotonic() - started

    assert (answer.object, answer.model) == ("chat.completion", tuned_model)
    assert answer.id.startswith("chatcmpl-") and len(answer.choices) == 1
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert answer.usage and answer.usage.prompt_tokens > 10
    assert 1 <= answer.usage.completion_tokens <= 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    started = time.monotonic()
    chunks = list(
        oai.chat.completions.create(
            model=tuned_model,
            messages=messages,  # type: ignore[arg-type]
            max_completion_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    warm = time.monotonic() - started
    print(f"\nchat on the tuned tiny model: first {first:.2f}s (serving start), warm {warm:.2f}s")

    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == choice.message.content  # greedy: the same answer, streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage == answer.usage  # include_usage: a last chunk with no choices


@pytest.mark.timeout(120)
def test_chat_with_a_base_model_answers_a_known_fact(oai: openai.OpenAI) -> None:
    # `raw`: the turn as written, without the refusal-allowed training prompt around it.
    answer = oai.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
        extra_body={"prompt_format": "raw"},
    )
    assert "paris" in (answer.choices[0].message.content or "").lower(), answer


@pytest.mark.timeout(60)
def test_chat_with_an_unknown_or_another_tenants_model_raises_not_found(
    oai: openai.OpenAI, api_url: str, service_env: dict[str, str], tuned_model: str
) -> None:
    from .conftest import make_key

    job_id = tuned_model.rsplit(":", 1)[1]
    other = openai.OpenAI(base_url=f"{api_url}/v1", api_key=make_key(service_env, "beta"))
    messages = [{"role": "user", "content": "Hello?"}]
    for client, model in (
        (oai, "gpt-4o-mini"),
        (oai, tuned_model.replace(job_id, "job-000000000000deadbeef")),
        (oai, tuned_model.replace(":ft-grait:oai:", ":ft-grait:other:")),  # the name must match
        (other, tuned_model),  # another tenant's model is as unknown as a made-up one
    ):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
        assert info.value.code == "model_not_found" and info.value.param == "model"
        assert info.value.body["message"] == (  # type: ignore[index]
            f"The model `{model}` does not exist or you do not have access to it."
        )
    other.close()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{api_url}/v1", api_key="gk_wrong", max_retries=0
        ).chat.completions.create(
            model=tuned_model,
            messages=messages,  # type: ignore[arg-type]
        )
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model=tuned_model,
            messages=messages,
            tools=[{"type": "function", "function": {"name": "f"}}],
        )  # type: ignore[arg-type]
    assert info.value.param == "tools"
