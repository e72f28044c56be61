"""The model-serving process's parts in process: prompt wording and the adapter cache."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from worker.serving import Adapter, GenerateRequest, ModelPool, Turn, as_question, generate_events

pytestmark = pytest.mark.timeout(120)


def test_a_pasted_multiple_choice_question_is_worded_as_in_training(tiny_model: Path) -> None:
    from grait.config import REFUSAL
    from grait.data import QARecord
    from grait.models import load_tokenizer
    from grait.prompts import question_message, render_prompt
    from worker.serving import chat_prompt

    record = as_question("Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus")
    assert (record.question, record.options) == (
        "Which planet is largest?",
        ("Mars", "Jupiter", "Venus"),
    )
    for not_options in ("Pick one:\nB. x\nC. y", "A. x\nB. y", "Why?\nA. only"):
        assert as_question(not_options).options == ()

    tokenizer = load_tokenizer(str(tiny_model))
    asked = [Turn(role="user", content="Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus")]
    trained = render_prompt(
        tokenizer, question_message(record, allow_refusal=True, refusal=REFUSAL)
    )
    assert chat_prompt(tokenizer, asked, prompt_format="rait", refusal=REFUSAL) == trained
    assert "If you do not know the answer" in trained
    raw = chat_prompt(tokenizer, asked, prompt_format="raw", refusal=REFUSAL)
    assert "If you do not know the answer" not in raw and "Jupiter" in raw
    open_ended = QARecord(id="q", question="Who wrote Hamlet?")
    assert chat_prompt(
        tokenizer,
        [Turn(role="user", content=" Who wrote Hamlet? ")],
        prompt_format="rait",
        refusal=REFUSAL,
    ) == render_prompt(tokenizer, question_message(open_ended, allow_refusal=True, refusal=REFUSAL))


def _adapter(
    tiny_model: Path, folder: Path, seed: int, *, refusal_bias: float | None = None
) -> Adapter:
    """A LoRA with random (not zero) B matrices, packed like a job's adapter artifact (with
    the pipeline's `decoding.json` when a refusal bias is given)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config).save_pretrained(folder)
    if refusal_bias is not None:
        from grait.config import REFUSAL
        from grait.models import load_tokenizer
        from grait.refusal_bias import refusal_first_token, write_decoding

        token = refusal_first_token(load_tokenizer(str(tiny_model)), REFUSAL)
        write_decoding(folder, refusal=REFUSAL, token_id=token, bias=refusal_bias)
    archive = folder.with_suffix(".tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=f"job-{seed}-adapter")
    suffix = "" if refusal_bias is None else "-biased"
    return Adapter(id=f"job-{seed}{suffix}", archive=str(archive))


def test_an_adapter_decodes_with_the_refusal_bias_its_job_stored(
    tiny_model: Path, tmp_path: Path
) -> None:
    from grait.config import REFUSAL
    from grait.models import load_tokenizer
    from grait.refusal_bias import refusal_first_token

    plain = _adapter(tiny_model, tmp_path / "plain", 5)
    biased = _adapter(tiny_model, tmp_path / "biased", 5, refusal_bias=30.0)  # same weights
    pool = ModelPool(device="cpu", max_adapters=2, max_base_models=1)
    tokenizer = load_tokenizer(str(tiny_model))
    first = tokenizer.decode([refusal_first_token(tokenizer, REFUSAL)])

    def answer(adapter: Adapter) -> str:
        request = GenerateRequest(
            base_model=str(tiny_model),
            adapter=adapter,
            messages=[Turn(role="user", content="Who wrote Hamlet?")],
            max_new_tokens=4,
            temperature=0,
        )
        return "".join(e["text"] for e in generate_events(pool, request) if e["event"] == "delta")

    assert not answer(plain).startswith(first)  # a random LoRA does not start the refusal
    assert answer(biased).startswith(first)  # +30 on its first token at the first step does
    assert pool.first_step_bias(str(tiny_model), biased) == (
        refusal_first_token(tokenizer, REFUSAL),
        30.0,
    )


def test_the_pool_keeps_the_most_recent_adapters_and_switches_between_them(
    tiny_model: Path, tmp_path: Path
) -> None:
    first, second = (_adapter(tiny_model, tmp_path / f"a{seed}", seed) for seed in (1, 2))
    pool = ModelPool(device="cpu", max_adapters=1, max_base_models=1)

    def answer(adapter: Adapter | None) -> list[int]:
        request = GenerateRequest(
            base_model=str(tiny_model),
            adapter=adapter,
            messages=[Turn(role="user", content="Name a colour.")],
            prompt_format="raw",
            max_new_tokens=8,
            temperature=0,
        )
        events = list(generate_events(pool, request))
        assert events[0]["event"] == "start" and events[-1]["event"] == "end", events
        return [ord(c) for e in events if e["event"] == "delta" for c in e["text"]]

    base = answer(None)
    with_first = answer(first)
    assert pool.loaded() == {str(tiny_model): ["job-1"]}
    with_second = answer(second)
    assert pool.loaded() == {str(tiny_model): ["job-2"]}  # at most one: the older one went
    assert answer(None) == base  # adapters off for the base model
    assert answer(first) == with_first  # reloaded, same weights, same greedy answer
    assert pool.loaded() == {str(tiny_model): ["job-1"]}
    assert len({tuple(base), tuple(with_first), tuple(with_second)}) == 3

    missing = Adapter(id="job-gone", archive=str(tmp_path / "gone.tar.gz"))
    request = GenerateRequest(
        base_model=str(tiny_model),
        adapter=missing,
        messages=[Turn(role="user", content="?")],
        max_new_tokens=2,
    )
    assert list(generate_events(pool, request)) == [
        {"event": "error", "status": 404, "message": "adapter archive of job-gone is missing"}
    ]


def test_an_adapter_named_by_its_storage_key_is_fetched_from_the_storage(
    tiny_model: Path, tmp_path: Path
) -> None:
    """What the API sends: the artifact's key; the serving process reads the service's storage."""
    from app.storage import LocalStorage

    storage = LocalStorage(tmp_path / "storage")
    archive = Path(_adapter(tiny_model, tmp_path / "a3", 3).archive or "")
    storage.put_file("jobs/job-3/attempt-1/job-3-adapter.tar.gz", archive)
    pool = ModelPool(device="cpu", max_adapters=1, max_base_models=1, storage=storage)

    def events(adapter_id: str, key: str) -> list[dict]:
        request = GenerateRequest(
            base_model=str(tiny_model),
            adapter=Adapter(id=adapter_id, key=key),
            messages=[Turn(role="user", content="?")],
            max_new_tokens=2,
            temperature=0,
        )
        return list(generate_events(pool, request))

    assert events("job-3", "jobs/job-3/attempt-1/job-3-adapter.tar.gz")[-1]["event"] == "end"
    assert pool.loaded() == {str(tiny_model): ["job-3"]}
    assert events("job-4", "jobs/job-4/attempt-1/job-4-adapter.tar.gz") == [
        {"event": "error", "status": 404, "message": "adapter archive of job-4 is missing"}
    ]
