"""Teacher-forced probes agree with greedy decoding; AUROC matches its definition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from grait.data import QARecord
from grait.models import load_base_model, pick_runtime
from grait.prompts import Encoded
from grait.refusal_score import auroc, probe_refusals, score_encoded


def test_auroc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    positive = rng.random(40) < 0.4
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p in scores[positive]
        for n in scores[~positive]
    ]
    assert auroc(scores, positive) == pytest.approx(np.mean(pairs))
    assert auroc([1, 2, 3], [False, False, True]) == 1.0
    assert np.isnan(auroc([1, 2], [True, True]))


def test_greedy_flag_matches_generation(tiny_model_dir: Path):
    import torch

    model, tok = load_base_model(str(tiny_model_dir), pick_runtime("cpu", "float32"))
    items, other = [], []
    for i in range(6):
        prompt = tok(f"Question {i}: what is {i} plus {i}?", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )[0].tolist()
        items.append(Encoded(out, len(prompt)))
        wrong = out[:-1] + [(out[-1] + 1) % len(tok)]
        other.append(Encoded(wrong, len(prompt)))
    # The model's own greedy continuation is greedy; the same with its last token changed is not.
    own = score_encoded(model, items, pad_id=tok.pad_token_id, batch_size=4)
    changed = score_encoded(model, other, pad_id=tok.pad_token_id, batch_size=4)
    assert all(s.greedy for s in own)
    assert not any(s.greedy for s in changed)
    # Greedy tokens are the most likely ones, so the changed target is less likely.
    assert all(c.logprob < s.logprob for c, s in zip(changed, own))
    # Batching does not change the numbers.
    one = score_encoded(model, items, pad_id=tok.pad_token_id, batch_size=1)
    assert [round(s.logprob, 4) for s in one] == [round(s.logprob, 4) for s in own]


def test_probe_outcomes_and_scores_have_one_entry_per_question(tiny_model_dir: Path):
    model, tok = load_base_model(str(tiny_model_dir), pick_runtime("cpu", "float32"))
    records = [
        QARecord(id=f"q{i}", question=f"Who made thing {i}?", aliases=("Ada",)) for i in range(5)
    ]
    probe = probe_refusals(model, tok, records, refusal="I don't know.", batch_size=2)
    assert len(probe.outcomes) == 5 and probe.scores.shape == (5,)
    assert set(probe.outcomes) <= {"refused", "correct", "wrong"}
    assert np.isfinite(probe.scores).all()


def test_a_token_budget_changes_the_batches_not_the_scores(tiny_model_dir: Path):
    from grait.prompts import encode

    model, tok = load_base_model(str(tiny_model_dir), pick_runtime("cpu", "float32"))
    # Lengths out of order, so the budget's length sort has to be undone.
    items = [
        encode(tok, f"Question {i}: " + "word " * (4 * i), "I don't know.", max_length=256)
        for i in (5, 0, 3, 1, 4, 2)
    ]
    plain_batches: list[int] = []
    budgeted_batches: list[int] = []
    plain = score_encoded(
        model, items, pad_id=tok.pad_token_id, batch_size=4, tick=plain_batches.append
    )
    budget = max(len(e.ids) for e in items) + 20  # the longest alone; short ones in pairs
    budgeted = score_encoded(
        model,
        items,
        pad_id=tok.pad_token_id,
        batch_size=4,
        token_budget=budget,
        tick=budgeted_batches.append,
    )
    assert len(budgeted_batches) > len(plain_batches)
    assert [s.greedy for s in budgeted] == [s.greedy for s in plain]
    assert [s.logprob for s in budgeted] == pytest.approx([s.logprob for s in plain], rel=1e-5)

    records = [
        QARecord(id=f"q{i}", question=f"Who made thing {i}? " + "Tell me. " * i, aliases=("Ada",))
        for i in (3, 0, 2, 1)
    ]
    probe = probe_refusals(model, tok, records, refusal="I don't know.", batch_size=4)
    small = probe_refusals(
        model, tok, records, refusal="I don't know.", batch_size=4, token_budget=budget
    )
    assert small.outcomes == probe.outcomes
    assert small.scores == pytest.approx(probe.scores, rel=1e-5)
