"""`knowledge.n_idk: auto`: config rules, the pure budget choice, the search with fakes, the
report section, `grait run --budget`, and one tiny end-to-end run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from grait.cli import parse_budget
from grait.config import JobConfig
from grait.events import Cancelled, PipelineEvent
from grait.methods import METHODS
from grait.operating_point import (
    Choice,
    TriedBudget,
    choose,
    explain,
    find_operating_point,
    measure,
    scale_budget,
    search,
    tried_budgets,
    validation_slice,
)
from grait.report import ReportError, render_markdown, validate_report, write_report
from grait.testing import tiny_hyperparameters

RANKED = [name for name, spec in METHODS.items() if spec.refusals == "ranked"]


def _spec(**over: Any) -> dict[str, Any]:
    return {"train": {"path": "x.jsonl"}, **over}


def _error(spec: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(spec)
    first = info.value.errors()[0]
    return ".".join(str(p) for p in first["loc"]), first["msg"]


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", RANKED)
def test_auto_is_accepted_for_ranked_methods(method: str) -> None:
    cfg = JobConfig.model_validate(
        _spec(method=method, knowledge={"n_idk": "auto", "auto": {"max_over_refusal": 0.1}})
    )
    assert cfg.knowledge.n_idk == "auto"
    assert cfg.knowledge.auto.max_over_refusal == 0.1
    assert cfg.knowledge.auto.fractions == sorted(cfg.knowledge.auto.fractions)  # default


@pytest.mark.parametrize("method", ["rtuning", "van"])
def test_auto_is_rejected_for_methods_without_a_budget(method: str) -> None:
    where, message = _error(_spec(method=method, knowledge={"n_idk": "auto"}))
    assert where == "knowledge.n_idk"
    assert f"method {method!r}" in message and "stratified-random" in message
    assert "no budget to pick" in message


@pytest.mark.parametrize(
    ("knowledge", "where"),
    [
        ({"auto": {"max_over_refusal": -0.01}}, "knowledge.auto.max_over_refusal"),
        ({"auto": {"max_over_refusal": 1.5}}, "knowledge.auto.max_over_refusal"),
        ({"auto": {"max_over_refusal": "low"}}, "knowledge.auto.max_over_refusal"),
        ({"auto": {"validation_fraction": 0}}, "knowledge.auto.validation_fraction"),
        ({"auto": {"validation_fraction": 0.9}}, "knowledge.auto.validation_fraction"),
        ({"auto": {"fractions": []}}, "knowledge.auto.fractions"),
        ({"auto": {"fractions": [0.1, 0.0]}}, "knowledge.auto.fractions.1"),
        ({"auto": {"fractions": [1.5]}}, "knowledge.auto.fractions.0"),
        ({"auto": {"min_validation_known": 0}}, "knowledge.auto.min_validation_known"),
        ({"auto": {"target": 0.1}}, "knowledge.auto.target"),
        ({"n_idk": "many"}, "knowledge.n_idk"),
        ({"n_idk": -1}, "knowledge.n_idk"),
        ({"n_idk": True}, "knowledge.n_idk"),
    ],
)
def test_bad_auto_settings_name_the_field(knowledge: dict[str, Any], where: str) -> None:
    assert _error(_spec(knowledge=knowledge))[0] == where


def test_n_idk_still_takes_a_count_or_nothing() -> None:
    assert JobConfig.model_validate(_spec(knowledge={"n_idk": 12})).knowledge.n_idk == 12
    assert JobConfig.model_validate(_spec()).knowledge.n_idk is None


def test_config_hash_ignores_the_auto_group_unless_it_is_used() -> None:
    from grait.pipeline import config_hash

    plain = JobConfig.model_validate(_spec(knowledge={"n_idk": 3}))
    tuned = JobConfig.model_validate(_spec(knowledge={"n_idk": 3, "auto": {"fractions": [1.0]}}))
    assert config_hash(plain) == config_hash(tuned)  # earlier run dirs keep resuming
    auto_a = JobConfig.model_validate(_spec(knowledge={"n_idk": "auto"}))
    auto_b = JobConfig.model_validate(
        _spec(knowledge={"n_idk": "auto", "auto": {"max_over_refusal": 0.1}})
    )
    assert config_hash(auto_a) != config_hash(auto_b)


# ---- pure choice ----------------------------------------------------------------------------


def _point(budget: int, over: float, unknown: float | None = 0.5, *, full: int | None = None):
    return TriedBudget(
        budget=budget,
        budget_full=budget if full is None else full,
        over_refusal=over,
        unknown_refusal=unknown,
        known_refused=round(over * 24),
        unknown_refused=0,
        n_known=24,
        n_unknown=12,
        within_target=over <= 0.05,
    )


def test_the_largest_budget_within_the_target_is_chosen() -> None:
    points = [_point(3, 0.0), _point(6, 0.02), _point(12, 0.05), _point(21, 0.08)]
    choice = choose(points, 0.05)
    assert choice.met and choice.point.budget == 12  # exactly on the target counts as within
    assert choice.over is not None and choice.over.budget == 21


def test_when_every_budget_is_within_the_largest_is_chosen() -> None:
    choice = choose([_point(6, 0.0), _point(3, 0.0), _point(12, 0.04)], 0.05)
    assert choice.met and choice.point.budget == 12 and choice.over is None


def test_when_no_budget_meets_the_target_the_smallest_is_chosen() -> None:
    choice = choose([_point(6, 0.2), _point(3, 0.1)], 0.05)
    assert not choice.met and choice.point.budget == 3
    assert "no tried budget kept" in explain(choice, target=0.05, n_all=3, n_remaining=3)


def test_the_search_stops_at_the_first_budget_over_the_target() -> None:
    over = {3: 0.0, 6: 0.04, 12: 0.09, 21: 0.01, 30: 0.2}
    evaluated: list[int] = []

    def evaluate(b: int) -> TriedBudget:
        evaluated.append(b)
        return _point(b, over[b])

    points = search([30, 3, 12, 6, 21], evaluate, target=0.05, should_cancel=lambda: False)
    assert evaluated == [3, 6, 12]  # ascending, and nothing after the first over the target
    assert choose(points, 0.05).point.budget == 6


def test_the_search_honours_cancellation_between_budgets() -> None:
    evaluated: list[int] = []

    def evaluate(b: int) -> TriedBudget:
        evaluated.append(b)
        return _point(b, 0.0)

    with pytest.raises(Cancelled):
        search([1, 2, 3], evaluate, target=0.05, should_cancel=lambda: bool(evaluated))
    assert evaluated == [1]


def test_budgets_are_ascending_deduplicated_and_at_least_one() -> None:
    assert tried_budgets([0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0], 60) == [3, 6, 12, 21, 30, 45, 60]
    assert tried_budgets([1.0, 0.01, 0.02, 0.5], 10) == [1, 5, 10]
    assert tried_budgets([0.5], 0) == []


def test_a_budget_scales_to_the_full_candidate_set() -> None:
    assert scale_budget(12, 60, 48) == 15  # 25% of the ranked unknowns = 25% of all
    assert scale_budget(48, 60, 48) == 60
    assert scale_budget(1, 5, 100) == 1  # never scaled down to zero refusals
    assert scale_budget(1, 100, 3) == 33


def test_rates_come_from_the_slice_known_questions_first() -> None:
    outcomes = ["refused", "correct", "wrong", "correct", "refused", "refused", "wrong"]
    p = measure(5, outcomes, 4, target=0.25, budget_full=6)  # type: ignore[arg-type]
    assert (p.known_refused, p.n_known, p.over_refusal) == (1, 4, 0.25)
    assert (p.unknown_refused, p.n_unknown) == (2, 3) and p.unknown_refusal == pytest.approx(2 / 3)
    assert p.within_target and p.budget_full == 6


def test_the_reason_says_which_budget_and_why() -> None:
    chosen = _point(18, 1 / 24, full=18)
    reason = explain(Choice(chosen, True, _point(30, 0.125)), target=0.05, n_all=60, n_remaining=60)
    assert reason.startswith(
        "budget 18 of 60 unknowns: the largest tried whose over-refusal on 24 held-out known "
        "questions (4.2%) stays within 5%"
    )
    scaled = explain(
        Choice(_point(15, 0.0, full=19), True, None), target=0.05, n_all=60, n_remaining=48
    )
    assert "budget 19 of 60 unknowns (15 of the 48 left after the hold-out, scaled)" in scaled


def test_the_validation_slice_is_stratified_and_seeded() -> None:
    known, unknown = list(range(40)), list(range(40, 70))
    a = validation_slice(known, unknown, 0.25, seed=3)
    assert a == validation_slice(known, unknown, 0.25, seed=3)
    assert a != validation_slice(known, unknown, 0.25, seed=4)
    assert len(a[0]) == 10 and set(a[0]) <= set(known)
    assert len(a[1]) == round(0.25 * 30) and set(a[1]) <= set(unknown)


# ---- the search on a run, with fake training and probing -----------------------------------


class FakeRun:
    """Trains nothing: the 'model' is the refusal count; known over-refusal = refusals // 4."""

    def __init__(self, split: dict[str, Any]):
        self.known = set(split["ik_all"])
        self.trained: list[tuple[list[int], list[tuple[int, float]]]] = []

    @contextmanager
    def train(self, known: list[int], refusals: list[tuple[int, float]]) -> Iterator[int]:
        self.trained.append((known, refusals))
        yield len(refusals)

    def probe(self, n_refusals: int, rows: list[int]) -> list[str]:
        known = [r for r in rows if r in self.known]
        out = []
        for i, row in enumerate(rows):
            if row in self.known:
                out.append("refused" if i < n_refusals // 4 else "correct")
            else:
                out.append("refused" if (i - len(known)) < n_refusals else "wrong")
        return out


def _split() -> dict[str, Any]:
    return {"ik_all": list(range(40)), "ik_kept": list(range(40)), "idk_all": list(range(40, 70))}


def _auto_config(**auto: Any) -> JobConfig:
    settings = {
        "validation_fraction": 0.25,
        "min_validation_known": 5,
        "fractions": [0.1, 0.25, 0.5, 1.0],
        "max_over_refusal": 0.1,
        **auto,
    }
    return JobConfig.model_validate(
        _spec(method="random-idk", knowledge={"n_idk": "auto", "auto": settings})
    )


def _find(cfg: JobConfig, fake: FakeRun, events: list, **kw: Any):
    return find_operating_point(
        cfg,
        _split(),
        None,
        train=fake.train,
        probe=fake.probe,  # type: ignore[arg-type]
        fallback_budget=kw.pop("fallback", 10),
        emit=events.append,
        should_cancel=kw.pop("should_cancel", lambda: False),
    )


def test_find_trains_without_the_slice_and_chooses_within_the_target() -> None:
    split, fake, events = _split(), FakeRun(_split()), []
    op = _find(_auto_config(), fake, events)
    held = set(op.validation_known) | set(op.validation_unknown)
    assert len(op.validation_known) == 10 and op.n_remaining == 30 - len(op.validation_unknown)
    for known, refusals in fake.trained:  # the slice never reaches a trial training
        assert not held & set(known) and not held & {r for r, _ in refusals}
        assert set(known) == set(split["ik_kept"]) - held
    budgets = tried_budgets([0.1, 0.25, 0.5, 1.0], op.n_remaining)
    # over-refusal = (b // 4) / 10: within 10% up to b = 7, so the search stops after the first
    # budget of 8 or more.
    within = [b for b in budgets if (b // 4) / 10 <= 0.1]
    stop = budgets.index(within[-1]) + 1
    assert [p.budget for p in op.points] == budgets[: stop + 1]
    assert op.chosen is not None and op.chosen.budget == within[-1] and op.met_target
    assert op.budget == scale_budget(within[-1], 30, op.n_remaining) == op.chosen.budget_full
    assert op.rule == "auto" and op.reason.startswith(f"budget {op.budget} of 30 unknowns")
    progress = [e for e in events if e.kind == "progress"]
    assert [e.done for e in progress] == list(range(len(op.points) + 1))
    why = [e for e in events if e.kind == "metrics"]
    assert len(why) == 1 and why[0].message == op.reason
    assert why[0].data["auto_budget"] == op.budget
    assert not [e for e in events if e.kind == "warning"]
    doc = op.to_json()
    assert json.loads(json.dumps(doc)) == doc and doc["chosen"]["budget"] == within[-1]


def test_find_warns_and_takes_the_smallest_when_nothing_meets_the_target() -> None:
    events: list[PipelineEvent] = []
    op = _find(_auto_config(max_over_refusal=0.0, fractions=[0.5, 1.0]), FakeRun(_split()), events)
    assert len(op.points) == 1 and op.chosen is op.points[0] and op.met_target is False
    warnings = [e for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "missed its target" in warnings[0].message


def test_find_falls_back_to_the_ratio_rule_on_a_small_slice() -> None:
    fake, events = FakeRun(_split()), []
    op = _find(_auto_config(min_validation_known=11), fake, events, fallback=7)
    assert (op.rule, op.budget, op.points, fake.trained) == ("ratio", 7, [], [])
    warnings = [e for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "min_validation_known = 11" in warnings[0].message
    assert "ik:idk ratio" in op.reason


def test_find_honours_cancellation_between_budgets() -> None:
    fake = FakeRun(_split())
    with pytest.raises(Cancelled):
        _find(_auto_config(), fake, [], should_cancel=lambda: bool(fake.trained))
    assert len(fake.trained) == 1


def test_find_with_a_refusal_bias_tries_every_budget_and_biases_each_within_target() -> None:
    from grait.refusal_bias import FirstStep

    fake = FakeRun(_split())

    def margins(n_refusals: int, rows: list[int]) -> list[FirstStep]:
        """More refusals trained: every question leans further to refusing; knowns less so."""
        out = []
        for i, row in enumerate(rows):
            if row in fake.known:
                out.append(FirstStep(-3.0 - i + n_refusals / 10, True, "top_other", True))
            else:
                out.append(FirstStep(-1.0 - (i % 7) * 0.5 + n_refusals / 5, True, "not_top", True))
        return out

    events: list[PipelineEvent] = []
    op = find_operating_point(
        _auto_config(),
        _split(),
        None,
        train=fake.train,
        probe=fake.probe,  # type: ignore[arg-type]
        margins=margins,  # type: ignore[arg-type]
        fallback_budget=10,
        emit=events.append,
        should_cancel=lambda: False,
    )
    budgets = tried_budgets([0.1, 0.25, 0.5, 1.0], op.n_remaining)
    assert [p.budget for p in op.points] == budgets  # no early stop: a bias can pull one back
    for p in op.points:
        assert p.refusal_bias is not None and p.biased_over_refusal is not None
        assert p.biased_over_refusal <= 0.1 + 1e-9
    best = max(p.biased_unknown_refusal or 0.0 for p in op.points)
    assert op.chosen is not None and op.chosen.biased_unknown_refusal == best
    assert op.refusal_bias == op.chosen.refusal_bias and op.met_target
    assert f"with refusal bias {op.refusal_bias:+.2f}" in op.reason
    assert op.to_json()["refusal_bias"] == op.refusal_bias
    trials = [e for e in events if e.kind == "progress" and "auto_point" in e.data]
    assert all("with refusal bias" in e.message for e in trials)


def test_an_auto_bias_needs_the_auto_budget() -> None:
    where, message = _error(_spec(decoding={"refusal_bias": "auto"}))
    assert where == "decoding.refusal_bias" and "knowledge.n_idk" in message
    cfg = JobConfig.model_validate(
        _spec(knowledge={"n_idk": "auto"}, decoding={"refusal_bias": "auto"})
    )
    assert cfg.decoding.refusal_bias == "auto"


# ---- report and CLI -------------------------------------------------------------------------


def _report(op: dict[str, Any]) -> dict[str, Any]:
    model = {"name": "base", "n": 4, "correct": 0.25, "wrong": 0.75, "refused": 0.0, "ths": 0.0}
    return {
        "method": "grait",
        "base_model": "m",
        "evals": [{"name": "arc", "kind": "mcqa", "models": [model]}],
        "operating_point": op,
    }


def test_the_report_shows_the_tried_points_and_plots_them(tmp_path: Path) -> None:
    op = _find(_auto_config(), FakeRun(_split()), []).to_json()
    paths = write_report(tmp_path, _report(op))
    markdown = (tmp_path / "report.md").read_text()
    assert "## Refusal budget" in markdown and op["reason"] in markdown
    assert markdown.count("**chosen**") == 1 and "over target" in markdown
    assert paths["operating_point_png"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "report.json").read_text())["operating_point"] == op
    fallback = {**op, "points": [], "chosen": None, "rule": "ratio"}
    assert "## Refusal budget" in render_markdown(_report(fallback))


def test_a_bad_operating_point_in_a_report_names_the_key() -> None:
    op = _find(_auto_config(), FakeRun(_split()), []).to_json()
    op["points"][0]["over_refusal"] = 1.5
    with pytest.raises(ReportError, match=r"\['points'\]\[0\]\['over_refusal'\]"):
        validate_report(_report(op))


@pytest.mark.parametrize(
    ("text", "knowledge"),
    [
        ("auto", {"n_idk": "auto"}),
        ("12", {"n_idk": 12}),
        ("ratio:4", {"n_idk": None, "ik_idk_ratio": 4.0}),
        ("ratio:2.5", {"n_idk": None, "ik_idk_ratio": 2.5}),
    ],
)
def test_cli_budget_takes_a_count_auto_or_a_ratio(text: str, knowledge: dict[str, Any]) -> None:
    assert parse_budget(text) == knowledge


@pytest.mark.parametrize("text", ["-3", "ratio:0", "ratio:x", "half"])
def test_cli_budget_rejects_anything_else(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_budget(text)


def test_grait_run_budget_auto_is_validated_like_the_spec(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "t.jsonl").write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "grait.cli", "run", "--train", "t.jsonl", "--method", "rtuning"]
        + ["--budget", "auto"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "knowledge.n_idk" in out.stderr and "no budget to pick" in out.stderr


# ---- end to end on the tiny model -----------------------------------------------------------


def test_a_tiny_run_with_an_auto_budget(tiny_model_dir: Path, shared_data: Path, tmp_path: Path):
    from grait.pipeline import run_pipeline

    hp = tiny_hyperparameters()
    # The random model's cloze probabilities sit around 1/4: tau = 0.25 makes about a third
    # of the questions "known", so the held-out slice has known questions to over-refuse.
    hp["knowledge"].update(
        tau=0.25,
        n_idk="auto",
        auto={"validation_fraction": 0.5, "min_validation_known": 1, "fractions": [0.25, 1.0]},
    )
    hp["evaluation"]["eval_base_refuse_prompt"] = False
    cfg = JobConfig.model_validate(
        {
            "method": "grait",
            "base_model": str(tiny_model_dir),
            "train": {"path": str(shared_data / "arc_easy" / "dev.jsonl"), "limit": 24},
            "evals": [{"path": str(shared_data / "arc_easy" / "test.jsonl"), "limit": 4}],
            **hp,
        }
    )
    events: list[PipelineEvent] = []
    result = run_pipeline(cfg, tmp_path / "run", progress=events.append)

    op = json.loads(result.artifacts["operating_point"].read_text())
    assert op["rule"] == "auto" and 1 <= len(op["points"]) <= 2
    assert [p["budget"] for p in op["points"]] == sorted(p["budget"] for p in op["points"])
    assert op["chosen"]["budget_full"] == op["budget"]
    assert op["validation"]["known"] >= 1
    selected = json.loads((tmp_path / "run" / "selection" / "selected.json").read_text())
    assert len(selected["rows"]) == op["budget"]
    train = [json.loads(x) for x in result.artifacts["train_set"].read_text().splitlines()]
    assert sum(1 for t in train if t["kind"] == "idk") == op["budget"]
    why = [e for e in events if e.kind == "metrics" and e.message == op["reason"]]
    assert len(why) == 1 and why[0].stage == "selection"
    trials = [e for e in events if e.kind == "progress" and "auto_point" in e.data]
    assert len(trials) == len(op["points"])
    assert result.report["operating_point"] == op
    assert result.artifacts["operating_point_plot"].read_bytes()[:4] == b"\x89PNG"
    assert "## Refusal budget" in result.artifacts["report_md"].read_text()


def test_a_tiny_run_with_an_auto_budget_and_bias(
    tiny_model_dir: Path, shared_data: Path, tmp_path: Path
):
    """`decoding.refusal_bias: auto`: the bias chosen with the budget is the adapter's."""
    from grait.pipeline import run_pipeline
    from grait.refusal_bias import DECODING_FILE

    hp = tiny_hyperparameters()
    hp["knowledge"].update(
        tau=0.25,
        n_idk="auto",
        auto={"validation_fraction": 0.5, "min_validation_known": 1, "fractions": [0.25, 1.0]},
    )
    hp["evaluation"]["eval_base_refuse_prompt"] = False
    cfg = JobConfig.model_validate(
        {
            "method": "random-idk",
            "base_model": str(tiny_model_dir),
            "train": {"path": str(shared_data / "arc_easy" / "dev.jsonl"), "limit": 24},
            "evals": [{"path": str(shared_data / "arc_easy" / "test.jsonl"), "limit": 4}],
            "decoding": {"refusal_bias": "auto"},
            **hp,
        }
    )
    result = run_pipeline(cfg, tmp_path / "run")
    op = json.loads(result.artifacts["operating_point"].read_text())
    assert len(op["points"]) == 2  # both budgets tried
    assert op["refusal_bias"] is not None and op["refusal_bias"] == op["chosen"]["refusal_bias"]
    decoding = json.loads((result.adapter_dir / DECODING_FILE).read_text())
    assert decoding["refusal_bias"] == op["refusal_bias"]
    (ev,) = result.report["evals"]
    assert ev["refusal_bias"]["current_bias"] == op["refusal_bias"]
    md = result.artifacts["report_md"].read_text()
    assert "unknown refused, biased" in md and "with refusal bias" in md


def test_grait_run_refusal_bias_auto_is_validated_like_the_spec(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "t.jsonl").write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "grait.cli", "run", "--train", "t.jsonl", "--refusal-bias", "auto"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "decoding.refusal_bias" in out.stderr and "knowledge.n_idk to auto" in out.stderr
