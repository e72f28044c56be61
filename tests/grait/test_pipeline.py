"""The runner on a tiny random model: every stage, resume, cancel, determinism, baselines."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grait.config import ALL_LINEAR, DecodingConfig, JobConfig
from grait.events import Cancelled
from grait.pipeline import RunDirConflict, completed_stages, run_pipeline, stages_for
from grait.refusal_bias import DECODING_FILE
from grait.testing import tiny_hyperparameters


def _config(model_dir: Path, data: Path, method: str = "grait", **over) -> JobConfig:
    hp = tiny_hyperparameters()
    hp["knowledge"]["tau"] = 0.3  # a random model's cloze probabilities sit near 1/4
    spec = {
        "method": method,
        "base_model": str(model_dir),
        "train": {"path": str(data / "arc_easy" / "dev.jsonl"), "limit": 24},
        "evals": [
            {"path": str(data / "arc_easy" / "test.jsonl"), "limit": 8, "name": "arc"},
            {"path": str(data / "nq" / "dev_part1.jsonl"), "limit": 4, "name": "nq"},
        ],
        **hp,
    }
    spec.update(over)
    return JobConfig.model_validate(spec)


def _events(sink: list):
    return lambda e: sink.append(e)


def test_grait_runs_every_stage_and_writes_its_outputs(tiny_model_dir, shared_data, tmp_path):
    events: list = []
    result = run_pipeline(
        _config(tiny_model_dir, shared_data),
        tmp_path / "run",
        progress=_events(events),
        compute_class="cpu",
    )
    started = [e.stage for e in events if e.kind == "stage_started"]
    assert started == list(stages_for("grait"))
    assert (result.adapter_dir / "adapter_config.json").exists()
    for key in ("report_json", "report_md", "report_plot", "train_set", "selection"):
        assert result.artifacts[key].exists(), key
    report = json.loads(result.artifacts["report_json"].read_text())
    assert [e["name"] for e in report["evals"]] == ["arc", "nq"]
    for ev in report["evals"]:
        names = [m["name"] for m in ev["models"]]
        assert names == ["base", "base+refuse-prompt", "grait"]
        base = ev["models"][0]
        assert base["correct"] + base["wrong"] + base["refused"] == pytest.approx(1.0)
        if base["wrong"] > 0:
            assert base["ths"] == pytest.approx(0.0)
    assert set(report["timings"]) == set(stages_for("grait"))
    # Selection audit: every idk candidate listed with its score terms; weights only on picks.
    rows = [json.loads(line) for line in result.artifacts["selection"].read_text().splitlines()]
    picked = [r for r in rows if r["selected"]]
    assert picked and all(r["weight"] is not None and r["i_idk"] is not None for r in picked)
    assert all(r["weight"] is None for r in rows if not r["selected"])
    train = [json.loads(line) for line in result.artifacts["train_set"].read_text().splitlines()]
    assert sum(1 for t in train if t["kind"] == "idk") == len(picked)
    assert all(t["target"] == "I don't know." for t in train if t["kind"] == "idk")
    progress = [e for e in events if e.kind == "progress"]
    assert progress and all(0 <= e.done <= e.total for e in progress if e.total)
    # The plan beside what happened: every stage predicted and measured (time, peak memory).
    predicted = {s["stage"]: s for s in report["plan"]["predicted"]["stages"]}
    measured = report["plan"]["measured"]
    assert set(predicted) == set(measured) == set(stages_for("grait"))
    assert all(m["seconds"] >= 0 and m["peak_memory_bytes"] > 0 for m in measured.values())
    assert "## Plan against what happened" in result.artifacts["report_md"].read_text()


def test_rerun_skips_completed_stages(tiny_model_dir, shared_data, tmp_path):
    cfg = _config(tiny_model_dir, shared_data, method="rtuning")
    run_pipeline(cfg, tmp_path / "run")
    before = (
        (tmp_path / "run" / "training" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    )
    events: list = []
    run_pipeline(cfg, tmp_path / "run", progress=_events(events))
    assert not [e for e in events if e.kind == "stage_started"]
    assert (
        tmp_path / "run" / "training" / "adapter" / "adapter_model.safetensors"
    ).stat().st_mtime_ns == before
    assert [s["stage"] for s in completed_stages(tmp_path / "run")] == list(stages_for("rtuning"))


def test_cancel_stops_between_steps_and_the_run_resumes(tiny_model_dir, shared_data, tmp_path):
    cfg = _config(tiny_model_dir, shared_data)
    seen: list = []

    def cancel_after_warmup() -> bool:
        return any(e.kind == "stage_completed" and e.stage == "warmup" for e in seen)

    with pytest.raises(Cancelled):
        run_pipeline(
            cfg, tmp_path / "run", progress=_events(seen), should_cancel=cancel_after_warmup
        )
    assert [s["stage"] for s in completed_stages(tmp_path / "run")] == ["knowledge_query", "warmup"]
    events: list = []
    run_pipeline(cfg, tmp_path / "run", progress=_events(events))
    assert [e.stage for e in events if e.kind == "stage_started"] == [
        "gradient_features",
        "selection",
        "training",
        "evaluation",
    ]


def test_same_seed_gives_the_same_selection_and_adapter(tiny_model_dir, shared_data, tmp_path):
    cfg = _config(tiny_model_dir, shared_data, evals=[])
    a = run_pipeline(cfg, tmp_path / "a")
    b = run_pipeline(cfg, tmp_path / "b")
    wa = load_file(a.adapter_dir / "adapter_model.safetensors")
    wb = load_file(b.adapter_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    if not torch.cuda.is_available():  # CPU kernels are deterministic: bit for bit
        assert a.artifacts["selection"].read_text() == b.artifacts["selection"].read_text()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        return
    # CUDA reductions are not bitwise reproducible (measured on an H100: scores differ in the
    # 5th digit); the selection itself, its order and the adapter must still agree.
    rows_a, rows_b = (
        [json.loads(line) for line in r.artifacts["selection"].read_text().splitlines()]
        for r in (a, b)
    )
    assert [(r["id"], r["selected"], r.get("rank")) for r in rows_a] == [
        (r["id"], r["selected"], r.get("rank")) for r in rows_b
    ]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["score"] == pytest.approx(rb["score"], rel=1e-3, abs=1e-4)
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-2, atol=1e-4) for k in wa)


def test_a_different_spec_in_the_same_run_dir_is_refused(tiny_model_dir, shared_data, tmp_path):
    run_pipeline(_config(tiny_model_dir, shared_data, method="van", evals=[]), tmp_path / "run")
    with pytest.raises(RunDirConflict):
        run_pipeline(
            _config(tiny_model_dir, shared_data, method="van", evals=[], seed=1), tmp_path / "run"
        )


@pytest.mark.parametrize("method", ["van", "rtuning", "random-idk"])
def test_baselines_build_their_own_training_sets(method, tiny_model_dir, shared_data, tmp_path):
    result = run_pipeline(
        _config(tiny_model_dir, shared_data, method=method, evals=[]), tmp_path / "run"
    )
    train = [json.loads(line) for line in result.artifacts["train_set"].read_text().splitlines()]
    assert not (tmp_path / "run" / "gradient_features").exists()
    if method == "van":
        assert len(train) == 24 and all(t["target"] != "I don't know." for t in train)
        return
    knowledge = [
        json.loads(line)
        for line in (tmp_path / "run" / "knowledge_query" / "knowledge.jsonl")
        .read_text()
        .splitlines()
    ]
    unknown = {k["id"] for k in knowledge if not k["known"]}
    refused = {t["id"] for t in train if t["kind"] == "idk"}
    if method == "rtuning":
        assert refused == unknown
    else:
        assert (
            refused <= unknown
            and len(refused)
            == json.loads((tmp_path / "run" / "knowledge_query" / "split.json").read_text())[
                "n_idk_budget"
            ]
        )


def test_model_that_always_refuses_has_refusal_rate_one(tiny_model_dir, shared_data, tmp_path):
    """R-Tuning with tau = 1 marks everything unknown; trained hard, the model only refuses."""
    hp = tiny_hyperparameters()
    cfg = _config(
        tiny_model_dir,
        shared_data,
        method="rtuning",
        train={"path": str(shared_data / "arc_easy" / "dev.jsonl"), "limit": 8},
        knowledge={**hp["knowledge"], "tau": 1.0},
        lora={
            "r": 8,
            "alpha": 16,
            "dropout": 0.0,
            "target_modules": list(ALL_LINEAR),
        },
        training={
            "epochs": 30,
            "batch_size": 8,
            "learning_rate": 2e-2,
            "max_length": 256,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
        },
        evaluation={"max_new_tokens": 6, "batch_size": 8, "eval_base_refuse_prompt": False},
        # The claim is about refusal accounting, not bf16 numerics: on an H100 in bf16 this
        # width-32 model refused every ARC question but garbled NQ ones ("I donowed...").
        dtype="float32",
    )
    result = run_pipeline(cfg, tmp_path / "run")
    for ev in result.report["evals"]:
        tuned = ev["models"][-1]
        assert tuned["refused"] == pytest.approx(1.0), ev
        assert tuned["ths"] in (None, pytest.approx(0.0))
        # The bias curve's teacher-forced "current" point agrees with generation.
        current = ev["refusal_bias"]["points"][0]
        assert current["level"] is None and current["bias"] == 0.0
        assert current["refused"] == pytest.approx(1.0)
    assert "Refusal bias" in result.artifacts["report_md"].read_text()

    # The same adapter decoding with a strong negative refusal bias refuses nothing, and the
    # adapter carries the bias it was evaluated with (serving reads it from there).
    unbiased = cfg.model_copy(update={"decoding": DecodingConfig(refusal_bias=-30.0)})
    biased = run_pipeline(unbiased, tmp_path / "biased")
    stored = json.loads((biased.adapter_dir / DECODING_FILE).read_text())
    assert stored["refusal_bias"] == -30.0 and stored["refusal"] == cfg.refusal
    for ev in biased.report["evals"]:
        assert ev["models"][-1]["refused"] == 0.0, ev
        assert ev["refusal_bias"]["points"][0]["bias"] == -30.0
        assert ev["refusal_bias"]["points"][0]["refused"] == 0.0


def test_until_stops_after_a_stage_and_budgets_come_from_the_spec(
    tiny_model_dir, shared_data, tmp_path
):
    """Stages 1-2 once, then runs that differ only in budget share them (as bench.quality does)."""
    from bench.quality.runner import link_stages

    shared = tmp_path / "shared"
    run_pipeline(_config(tiny_model_dir, shared_data), shared, until="gradient_features")
    assert [s["stage"] for s in completed_stages(shared)] == [
        "knowledge_query",
        "warmup",
        "gradient_features",
    ]
    split = json.loads((shared / "knowledge_query" / "split.json").read_text())
    n_idk = len(split["idk_all"])
    assert n_idk >= 3
    picks = {}
    for budget in (1, 3):
        cfg = _config(
            tiny_model_dir,
            shared_data,
            evals=[],
            knowledge={**tiny_hyperparameters()["knowledge"], "tau": 0.3, "n_idk": budget},
        )
        run = tmp_path / f"b{budget}"
        link_stages(shared, run, cfg, ("knowledge_query", "warmup", "gradient_features"))
        run_pipeline(cfg, run)
        picks[budget] = json.loads((run / "selection" / "selected.json").read_text())["rows"]
    assert len(picks[1]) == 1 and len(picks[3]) == 3
    assert picks[3][:1] == picks[1]  # budgets are prefixes of one ranking
    with pytest.raises(ValueError, match="until"):
        run_pipeline(_config(tiny_model_dir, shared_data), shared, until="nope")


def test_fixed_steps_train_the_same_number_of_steps_at_any_set_size(
    tiny_model_dir, shared_data, tmp_path
):
    steps = {}
    for method in ("rtuning", "van"):
        cfg = _config(
            tiny_model_dir,
            shared_data,
            method=method,
            evals=[],
            training={**tiny_hyperparameters()["training"], "max_steps": 3, "epochs": 5},
        )
        events: list = []
        run_pipeline(cfg, tmp_path / method, progress=_events(events))
        done = [e for e in events if e.kind == "progress" and e.stage == "training"]
        steps[method] = (done[-1].done, done[-1].total)
    assert steps == {"rtuning": (3, 3), "van": (3, 3)}


def test_first_token_features_differ_from_whole_target_ones_and_stay_unit_norm(
    tiny_model_dir, shared_data, tmp_path
):
    """`features.target_tokens: first` takes each refusal's gradient at its first token only."""
    import numpy as np

    from grait.pipeline import config_hash
    from grait.prompts import Encoded, first_target_token

    assert first_target_token(Encoded([1, 2, 3, 4, 5], 2)) == Encoded([1, 2, 3], 2)
    whole = _config(tiny_model_dir, shared_data)
    first = _config(
        tiny_model_dir,
        shared_data,
        features={**tiny_hyperparameters()["features"], "target_tokens": "first"},
    )
    assert config_hash(first) != config_hash(whole)
    feats = {}
    for name, cfg in (("all", whole), ("first", first)):
        run_pipeline(cfg, tmp_path / name, until="gradient_features")
        feats[name] = np.load(tmp_path / name / "gradient_features" / "idk_raw.npy").astype(
            np.float32
        )
    norms = np.linalg.norm(feats["first"], axis=1)
    assert np.allclose(norms, 1.0, atol=2e-2)
    cosines = (feats["all"] * feats["first"]).sum(axis=1)
    assert cosines.mean() < 0.999  # a different loss, so different gradients


def test_groups_added_later_leave_earlier_specs_hashing_as_before():
    """Run folders of earlier releases keep resuming: pinned hashes of two plain specs, taken
    before `decoding` and `evaluation.bias_curve` existed; setting them changes the hash."""
    from grait.pipeline import config_hash

    spec = {
        "method": "random-idk",
        "base_model": "tiny",
        "train": {"path": "/x/train.jsonl"},
        "evals": [{"path": "/x/e.jsonl"}],
    }
    plain = JobConfig.model_validate(spec)
    auto = JobConfig.model_validate({**spec, "method": "grait", "knowledge": {"n_idk": "auto"}})
    assert config_hash(plain) == "9b5918089d3afd7b"
    assert config_hash(auto) == "81422f91c3126357"
    biased = JobConfig.model_validate({**spec, "decoding": {"refusal_bias": -2.0}})
    no_curve = JobConfig.model_validate({**spec, "evaluation": {"bias_curve": False}})
    assert len({config_hash(plain), config_hash(biased), config_hash(no_curve)}) == 3
