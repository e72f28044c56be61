"""`epochs: auto` and the training-fit check, on hand-built inputs and the tiny model."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from grait.config import FitCheckConfig, JobConfig, TrainingConfig
from grait.pipeline import config_hash, resolved_epochs, run_pipeline
from grait.testing import tiny_hyperparameters
from grait.training import auto_epochs


def test_auto_epochs_gives_small_sets_enough_steps_and_large_sets_the_base_epochs():
    # 60 examples at batch 16 = 4 steps an epoch: 3 epochs would be 12 steps.
    assert auto_epochs(60, 16, epochs=3, min_steps=48, max_epochs=25) == 12
    assert auto_epochs(60, 8, epochs=3, min_steps=48, max_epochs=25) == 6  # 8 steps an epoch
    assert auto_epochs(60, 8, 2, epochs=3, min_steps=48, max_epochs=25) == 12  # accumulation
    assert auto_epochs(5000, 16, epochs=3, min_steps=48, max_epochs=25) == 3
    assert auto_epochs(10, 16, epochs=3, min_steps=48, max_epochs=25) == 25  # the ceiling
    # Whole passes: 100 examples = 7 steps an epoch; 48 steps need 7 epochs (49 steps).
    assert auto_epochs(100, 16, epochs=3, min_steps=48, max_epochs=25) == 7


def test_epochs_is_auto_by_default_and_a_bad_value_names_the_field():
    assert TrainingConfig().epochs == "auto"
    assert TrainingConfig(epochs=2).epochs == 2.0
    for bad in (0, -1, 1001, "many", True):
        with pytest.raises(ValidationError) as info:
            TrainingConfig(epochs=bad)
        assert [e["loc"] for e in info.value.errors()] == [("epochs",)], bad


def test_resolved_epochs_follows_the_spec():
    spec = {"train": {"path": "/x.jsonl"}}
    auto = JobConfig.model_validate({**spec, "training": {"auto": {"min_steps": 20}}})
    assert resolved_epochs(auto, 40) == 7  # 3 steps an epoch at batch 16 -> 7 epochs = 21 steps
    fixed = JobConfig.model_validate({**spec, "training": {"epochs": 2}})
    assert resolved_epochs(fixed, 40) == 2


def test_unused_new_groups_keep_an_old_specs_run_directory_hash():
    spec = {"train": {"path": "/x.jsonl"}, "training": {"epochs": 3}}
    base = config_hash(JobConfig.model_validate(spec))
    tweaked_auto = {**spec, "training": {"epochs": 3, "auto": {"min_steps": 7}}}
    assert config_hash(JobConfig.model_validate(tweaked_auto)) == base  # auto unused
    tweaked_fit = {**spec, "training": {"epochs": 3, "fit_check": {"min_refusal_learned": 0.9}}}
    assert config_hash(JobConfig.model_validate(tweaked_fit)) != base


def _config(model_dir: Path, data: Path, fit: dict, **training) -> JobConfig:
    hp = tiny_hyperparameters()
    hp["knowledge"]["tau"] = 0.3  # a random model's cloze probabilities sit near 1/4
    hp["training"] = {**hp["training"], **training, "fit_check": fit}
    return JobConfig.model_validate(
        {
            "method": "rtuning",
            "base_model": str(model_dir),
            "train": {"path": str(data / "arc_easy" / "dev.jsonl"), "limit": 24},
            "evals": [{"path": str(data / "arc_easy" / "test.jsonl"), "limit": 4, "name": "arc"}],
            **hp,
        }
    )


def test_a_job_that_did_not_learn_to_refuse_says_so_everywhere(
    tiny_model_dir, shared_data, tmp_path
):
    # A random tiny model trained for one epoch cannot emit the refusal on every row.
    cfg = _config(tiny_model_dir, shared_data, {"min_refusal_learned": 1.0, "max_rows": 16})
    events: list = []
    result = run_pipeline(cfg, tmp_path / "run", progress=events.append)

    warned = [e for e in events if e.kind == "warning"]
    assert [e.data["code"] for e in warned] == ["refusal_not_learned"]
    assert warned[0].stage == "training" and "threshold 100%" in warned[0].message
    assert [w["code"] for w in result.warnings] == ["refusal_not_learned"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    metrics = manifest["stages"]["training"]["metrics"]
    fit = metrics["fit"]
    n_idk = metrics["refusal_examples"]
    assert fit["n_refusal"] == min(16, n_idk) and fit["refusal_learned"] < 1.0
    assert metrics["epochs"] == 1.0 and metrics["optimizer_steps"] == -(-24 // 8)
    report = json.loads(result.artifacts["report_json"].read_text())
    assert [w["code"] for w in report["warnings"]] == ["refusal_not_learned"]
    assert report["training"]["fit"] == fit
    md = result.artifacts["report_md"].read_text()
    assert "## Warnings" in md and "refusal_not_learned" in md and "## Training" in md
    # A resumed run reads the warning back from the finished stage.
    again = run_pipeline(cfg, tmp_path / "run")
    assert again.warnings == result.warnings


def test_thresholds_that_are_met_give_no_warning_and_auto_epochs_are_recorded(
    tiny_model_dir, shared_data, tmp_path
):
    cfg = _config(
        tiny_model_dir,
        shared_data,
        {"min_refusal_learned": 0.0, "min_answers_kept": 0.0},
        epochs="auto",
        auto={"min_steps": 6, "epochs": 1, "max_epochs": 10},
    )
    events: list = []
    result = run_pipeline(cfg, tmp_path / "run", progress=events.append)
    assert result.warnings == [] and not [e for e in events if e.kind == "warning"]
    metrics = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["training"][
        "metrics"
    ]
    # 24 rows at batch 8 = 3 steps an epoch; 6 steps need 2 epochs.
    assert metrics["epochs"] == 2.0 and metrics["optimizer_steps"] == 6
    trained = [e for e in events if e.kind == "progress" and e.stage == "training"]
    assert trained[-1].done == trained[-1].total == 6
    said = [e.message for e in events if e.kind == "metrics" and e.stage == "training"]
    assert any("epochs auto: 2 epochs = 6 optimizer steps for 24 examples" in m for m in said)


def test_the_fit_check_can_be_turned_off(tiny_model_dir, shared_data, tmp_path):
    cfg = _config(tiny_model_dir, shared_data, {"enabled": False, "min_refusal_learned": 1.0})
    result = run_pipeline(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["training"][
        "metrics"
    ]
    assert "fit" not in metrics and result.warnings == []
    assert FitCheckConfig().enabled  # on by default


def test_fixed_steps_hash_as_before_auto_epochs_existed():
    """With max_steps, epochs are moot: `auto` hashes as the old default (3), so fixed-step run
    directories from before `auto` still resume."""
    spec = {"train": {"path": "/x.jsonl"}}
    auto = JobConfig.model_validate({**spec, "training": {"max_steps": 16}})
    three = JobConfig.model_validate({**spec, "training": {"max_steps": 16, "epochs": 3}})
    assert auto.training.epochs == "auto" and config_hash(auto) == config_hash(three)
    free = JobConfig.model_validate(spec)  # auto epochs without fixed steps: a different spec
    assert config_hash(free) != config_hash(
        JobConfig.model_validate({**spec, "training": {"epochs": 3}})
    )


def test_a_token_budget_leaves_the_fit_check_as_it_was(tiny_model_dir):
    from grait.fit_check import check_fit
    from grait.models import load_base_model, pick_runtime
    from grait.prompts import encode

    model, tok = load_base_model(str(tiny_model_dir), pick_runtime("cpu", "float32"))
    examples = [
        (
            "idk" if i % 2 else "ik",
            encode(
                tok,
                f"Q{i}: " + "word " * (3 * i),
                "I don't know." if i % 2 else "Paris",
                max_length=128,
            ),
        )
        for i in (5, 2, 7, 0, 3, 6, 1, 4)
    ]
    cfg = FitCheckConfig(min_refusal_learned=0.0, min_answers_kept=0.0)
    plain = check_fit(model, examples, cfg, pad_id=tok.pad_token_id, batch_size=4)
    budget = max(len(e.ids) for _, e in examples)
    budgeted = check_fit(
        model, examples, cfg, pad_id=tok.pad_token_id, batch_size=4, token_budget=budget
    )
    assert budgeted == plain and plain.n_refusal == plain.n_answer == 4


def test_loading_and_token_budgets_at_their_defaults_keep_earlier_run_directory_hashes():
    """Pinned from the code before `loading` and `token_budget` existed: run folders resume."""
    old = {"train": {"path": "/x.jsonl"}, "method": "grait", "training": {"epochs": 3}}
    assert config_hash(JobConfig.model_validate(old)) == "1f8e33f7f722cb9e"
    assert config_hash(JobConfig.model_validate({"train": {"path": "/x.jsonl"}})) == (
        "479b26b3ec420936"
    )
    four_bit = {**old, "loading": {"quantization": "4bit"}}
    budget = {**old, "evaluation": {"token_budget": 4096}}
    assert config_hash(JobConfig.model_validate(four_bit)) != "1f8e33f7f722cb9e"
    assert config_hash(JobConfig.model_validate(budget)) != "1f8e33f7f722cb9e"
