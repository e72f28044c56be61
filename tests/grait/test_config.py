import pytest
from pydantic import ValidationError

from grait.config import JobConfig


def test_defaults_follow_grait_md():
    cfg = JobConfig.model_validate({"train": {"path": "x.jsonl"}})
    assert cfg.method == "random-idk"  # no ranking beat random (bench/results/tradeoff*)
    assert (cfg.knowledge.tau, cfg.knowledge.k_samples, cfg.knowledge.ik_idk_ratio) == (
        0.5,
        10,
        4.0,
    )
    assert (cfg.selection.lam, cfg.selection.mu, cfg.selection.rho) == (1.0, 1.0, 0.0)
    assert (cfg.weighting.temperature, cfg.weighting.w_min, cfg.weighting.w_max) == (0.05, 0.1, 5.0)
    assert cfg.warmup.fraction == 0.05 and cfg.features.dim == 8192
    assert (
        cfg.training.learning_rate == 2e-4
        and cfg.training.epochs == "auto"
        and cfg.training.auto.epochs == 3  # the release's 3 epochs once a set is large enough
        and cfg.training.warmup_ratio == 0.03
    )
    assert cfg.refusal == "I don't know."


@pytest.mark.parametrize(
    "patch, where",
    [
        ({"method": "dpo"}, "method"),
        ({"knowledge": {"tau": 1.5}}, "knowledge.tau"),
        ({"weighting": {"w_min": 3, "w_max": 1}}, "weighting"),
        ({"training": {"epochs": 0}}, "training.epochs"),
        ({"selection": {"lamda": 1}}, "selection.lamda"),
    ],
)
def test_invalid_specs_name_the_field(patch, where):
    with pytest.raises(ValidationError) as err:
        JobConfig.model_validate({"train": {"path": "x.jsonl"}, **patch})
    assert where in str(err.value).replace("\n", " ").replace(" ", "") or where.split(".")[
        0
    ] in str(err.value)


def test_yaml_paths_resolve_against_the_spec_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    spec = tmp_path / "sub" / "job.yaml"
    spec.write_text("train:\n  path: data/train.jsonl\nevals:\n  - path: /abs/eval.jsonl\n")
    cfg = JobConfig.from_yaml(spec)
    assert cfg.train.path == str(tmp_path / "sub" / "data" / "train.jsonl")
    assert cfg.evals[0].path == "/abs/eval.jsonl"


@pytest.mark.parametrize(
    ("group", "knob", "too_big"),
    [
        ("training", "max_length", 1_000_000),
        ("training", "max_steps", 10**9),
        ("training", "batch_size", 100_000),
        ("evaluation", "max_new_tokens", 100_000),
        ("knowledge", "max_new_tokens", 100_000),
        ("knowledge", "k_samples", 1000),
        ("features", "dim", 10**8),
        ("lora", "r", 100_000),
        ("warmup", "epochs", 10_000),
    ],
)
def test_resource_knobs_have_upper_bounds(group, knob, too_big):
    """No spec can hold a worker for ever through one huge knob."""
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate({"train": {"path": "x.jsonl"}, group: {knob: too_big}})
    assert [e["loc"] for e in info.value.errors()] == [(group, knob)]
