"""CRaFT: certainty and knowledge-flow data construction, and the method end to end (tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from grait.config import CraftConfig, JobConfig, SelectionConfig
from grait.craft import KnowledgeSignals, known_by_certainty, refusal_order, rehearsal_rows
from grait.data import read_jsonl
from grait.methods import method_spec
from grait.pipeline import config_hash, run_pipeline
from grait.ranking import rank_candidates
from grait.testing import tiny_hyperparameters


def test_rehearsal_takes_the_surest_knowns_above_the_threshold_capped():
    correctness = [1.0, 0.995, 0.999, 0.6, 0.2, 0.9999]
    certainty = [0.5, 0.9, 0.1, 0.9, 0.9, 0.3]
    known = [0, 1, 2, 3, 5]
    cfg = CraftConfig(rehearsal_min_samples=1, rehearsal_max_samples=3)
    # Above 0.99: rows 0, 5, 2, 1 (by correctness); capped at 3, returned sorted.
    assert rehearsal_rows(correctness, certainty, known, cfg) == [0, 2, 5]
    assert 4 not in rehearsal_rows(correctness, certainty, [0, 1, 2, 3, 4, 5], cfg)


def test_rehearsal_falls_back_to_the_surest_knowns_when_too_few_clear_the_threshold():
    correctness = [0.7, 0.9, 0.8, 0.6]
    certainty = [0.1, 0.2, 0.3, 0.4]
    cfg = CraftConfig(rehearsal_min_samples=2)
    assert rehearsal_rows(correctness, certainty, [0, 1, 2, 3], cfg) == [1, 2]


def test_refusal_order_drops_what_the_rehearsal_made_answerable_and_sorts_by_certainty():
    signals = KnowledgeSignals(
        correctness=np.array([0.1, 0.3, 0.2, 0.0, 0.4]),
        certainty=np.array([0.9, 0.2, 0.5, 0.7, 0.1]),
        delta=np.array([0.0, -0.1, 0.2, 0.0, -0.3]),
    )
    candidates = [0, 1, 2, 3, 4]
    # Row 2 gained correctness: never a refusal. The rest: least certain first.
    assert refusal_order("certainty", candidates, signals) == [4, 1, 3, 0]
    # The no-certainty ablation: least correct first.
    assert refusal_order("correctness", candidates, signals) == [3, 0, 1, 4]
    # Positions, not rows: candidates [4, 2] -> positions 0 (row 4) only.
    assert refusal_order("certainty", [4, 2], signals) == [0]
    no_flow = KnowledgeSignals(signals.correctness, signals.certainty, None)
    assert refusal_order("certainty", candidates, no_flow) == [4, 1, 2, 3, 0]
    strict = KnowledgeSignals(signals.correctness, signals.certainty, signals.delta, -0.05)
    assert refusal_order("certainty", candidates, strict) == [4, 1]  # the paper's Δ < 0


def test_known_cut_keeps_the_most_certain():
    correctness = [0.9, 0.8, 0.7, 0.95]
    certainty = [0.2, 0.9, 0.9, 0.5]
    assert known_by_certainty([0, 1, 2, 3], correctness, certainty, 2) == [1, 2]
    assert known_by_certainty([0, 1, 2, 3], correctness, certainty, None) == [0, 1, 2, 3]


def test_craft_ranking_records_its_terms_and_needs_signals():
    signals = KnowledgeSignals(
        np.array([0.1, 0.2, 0.3]), np.array([0.3, 0.1, 0.2]), np.array([0.0, 0.5, -0.1])
    )
    r = rank_candidates(
        "certainty",
        idk_rows=[0, 1, 2],
        ik_rows=[],
        features=None,
        cfg=SelectionConfig(),
        seed=0,
        signals=signals,
    )
    assert r.order == [2, 0]
    assert r.terms["delta"].tolist() == [0.0, 0.5, -0.1]
    with pytest.raises(ValueError, match="knowledge signals"):
        rank_candidates(
            "certainty", idk_rows=[0], ik_rows=[], features=None, cfg=SelectionConfig(), seed=0
        )


def test_methods_table_and_hash():
    assert "rehearsal" in method_spec("craft").stages
    assert "rehearsal" not in method_spec("craft-noflow").stages
    assert "gradient_features" not in method_spec("craft").stages
    base = {"train": {"path": "x.jsonl"}, "method": "random-idk"}
    # The craft group counts only for craft methods, so older specs hash as before.
    a = JobConfig.model_validate(base)
    b = JobConfig.model_validate({**base, "craft": {"rehearsal_epochs": 3}})
    assert config_hash(a) == config_hash(b)
    c = JobConfig.model_validate({**base, "method": "craft"})
    d = JobConfig.model_validate({**base, "method": "craft", "craft": {"rehearsal_epochs": 3}})
    assert config_hash(c) != config_hash(d)


def _config(model_dir: Path, data: Path, method: str, **over) -> JobConfig:
    hp = tiny_hyperparameters()
    # A random model's cloze probabilities sit near 1/4: this tau makes about half known.
    hp["knowledge"]["tau"] = 0.248
    return JobConfig.model_validate(
        {
            "method": method,
            "base_model": str(model_dir),
            "train": {"path": str(data / "arc_easy" / "dev.jsonl"), "limit": 24},
            **hp,
            "craft": {"rehearsal_min_samples": 4, "rehearsal_learning_rate": 1e-2},
            **over,
        }
    )


def test_craft_runs_the_rehearsal_and_refuses_only_eligible_unknowns(
    tiny_model_dir, shared_data, tmp_path
):
    cfg = _config(
        tiny_model_dir,
        shared_data,
        "craft",
        knowledge={**tiny_hyperparameters()["knowledge"], "tau": 0.248, "n_idk": 1000},
    )
    result = run_pipeline(cfg, tmp_path / "run")
    run = tmp_path / "run"
    flow = read_jsonl(run / "rehearsal" / "flow.jsonl")
    split = json.loads((run / "knowledge_query" / "split.json").read_text())
    assert [f["row"] for f in flow] == split["idk_all"]  # every unknown asked again
    assert all(f["eligible"] == (f["delta"] <= 0.0) for f in flow)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["rehearsal"]["metrics"]["rehearsed"] >= 4
    assert "gradient_features" not in manifest["stages"]
    train = read_jsonl(result.artifacts["train_set"])
    refused = {t["id"] for t in train if t["kind"] == "idk"}
    # A budget above the eligible count takes exactly the eligible unknowns.
    assert refused == {f["id"] for f in flow if f["eligible"]}
    knowledge = read_jsonl(run / "knowledge_query" / "knowledge.jsonl")
    certainty = {k["id"]: k["certainty"] for k in knowledge}
    picked = read_jsonl(run / "selection" / "selection.jsonl")
    order = sorted((p for p in picked if p["rank"] is not None), key=lambda p: p["rank"])
    assert [certainty[p["id"]] for p in order] == sorted(certainty[p["id"]] for p in order)
