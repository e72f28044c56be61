"""Issue 16 on the packaged SmolLM2-135M: default settings teach a small set its refusals,
and a starved run says it did not (a minute or two on CPU)."""

import json
import random
from pathlib import Path

import pytest

from grait.config import REFUSAL, JobConfig
from grait.pipeline import run_pipeline
from grait.scoring import is_refusal

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]


def _invented_mcqa(path: Path, n: int) -> Path:
    """Questions about made-up places: short prompts, and the model cannot know them."""
    rng = random.Random(7)
    rows = []
    for i in range(n):
        options = rng.sample(COLOURS, 4)
        place = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))
        rows.append(
            {
                "id": f"q{i}",
                "question": f"What colour is the flag of {place.title()}?",
                "options": options,
                "answer": "ABCD"[rng.randrange(4)],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path: Path, name: str, **training) -> tuple[dict, list]:
    cfg = JobConfig.model_validate(
        {
            "method": "rtuning",
            "train": {"path": str(_invented_mcqa(tmp_path / "train.jsonl", 60))},
            "knowledge": {"scorer": "cloze"},
            **({"training": training} if training else {}),
        }
    )
    result = run_pipeline(cfg, tmp_path / name)
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    return manifest["stages"]["training"]["metrics"], result.warnings


def _chat(adapter_dir: Path, questions: list[str]) -> list[str]:
    """Greedy answers of the tuned model as `POST /v1/chat/completions` has the serving
    process give them (`worker.serving`: the adapter archive, the RAIT prompt, generation)."""
    import tarfile

    from worker.serving import Adapter, GenerateRequest, ModelPool, Turn, generate_events

    archive = adapter_dir.parent / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(adapter_dir, arcname="adapter")
    pool = ModelPool(device="cpu", max_adapters=1, max_base_models=1)
    answers = []
    for question in questions:
        request = GenerateRequest(
            base_model="smollm2-135m-instruct",
            adapter=Adapter(id="tuned", archive=str(archive)),
            messages=[Turn(role="user", content=question)],
            max_new_tokens=12,
            temperature=0,
        )
        events = list(generate_events(pool, request))
        answers.append("".join(e["text"] for e in events if e["event"] == "delta").strip())
    return answers


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_default_training_learns_the_refusals_of_a_small_set(tmp_path):
    metrics, warnings = _run(tmp_path, "default")
    assert metrics["refusal_examples"] >= 30  # most invented questions are unknown
    assert metrics["epochs"] > 3 and metrics["optimizer_steps"] >= 48  # auto: enough steps
    assert metrics["fit"]["refusal_learned"] >= 0.8, metrics["fit"]
    assert [w["code"] for w in warnings if w["code"] == "refusal_not_learned"] == []

    # Chat refuses what the run taught it not to know, asked as a user pastes a question.
    rows = {
        r["id"]: r for r in map(json.loads, (tmp_path / "train.jsonl").read_text().splitlines())
    }
    taught = [r for r in map(json.loads, (tmp_path / "default/training/train_set.jsonl").open())]
    unknown = [rows[r["id"]] for r in taught if r["target"] == REFUSAL][:4]
    asked = [
        r["question"] + "".join(f"\n{letter}. {o}" for letter, o in zip("ABCD", r["options"]))
        for r in unknown
    ]
    answers = _chat(tmp_path / "default" / "training" / "adapter", asked)
    assert sum(is_refusal(a) for a in answers) >= 3, list(zip(asked, answers))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_starved_run_succeeds_with_a_refusal_not_learned_warning(tmp_path):
    metrics, warnings = _run(tmp_path, "starved", epochs=1, learning_rate=1e-5)
    assert metrics["optimizer_steps"] == 4
    assert metrics["fit"]["refusal_learned"] < 0.5, metrics["fit"]
    assert "refusal_not_learned" in [w["code"] for w in warnings]
