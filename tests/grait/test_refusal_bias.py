"""The refusal bias: the probe's first-step margin predicts biased generation exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from grait.data import QARecord
from grait.generation import FirstStepBias
from grait.models import load_base_model, pick_runtime
from grait.prompts import encode, question_message, render_prompt
from grait.refusal_bias import (
    FirstStep,
    choose_bias,
    outcomes_at,
    refused_at,
)
from grait.refusal_score import probe_first_step, probe_refusals

REFUSAL = "I don't know."


def _records(n: int) -> list[QARecord]:
    return [
        QARecord(id=f"q{i}", question=f"Who made thing {i}?", aliases=("Ada",)) for i in range(n)
    ]


def _first_token(model, tok, prompt_ids: list[int], bias: float, token: int) -> int:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList([FirstStepBias(token, bias, len(prompt_ids))]),
        )
    return int(out[0, len(prompt_ids)])


def test_margin_is_where_biased_generation_starts_the_refusal(tiny_model_dir: Path):
    model, tok = load_base_model(str(tiny_model_dir), pick_runtime("cpu", "float32"))
    records = _records(4)
    probes = probe_first_step(model, tok, records, refusal=REFUSAL, batch_size=3)
    for record, probe in zip(records, probes):
        prompt = render_prompt(tok, question_message(record, allow_refusal=True, refusal=REFUSAL))
        item = encode(tok, prompt, REFUSAL, max_length=512)
        prompt_ids, r1 = item.ids[: item.n_prompt], item.ids[item.n_prompt]
        # Just above the threshold −margin the refusal's first token wins; just below it loses.
        assert _first_token(model, tok, prompt_ids, -probe.margin + 1e-2, r1) == r1
        assert _first_token(model, tok, prompt_ids, -probe.margin - 1e-2, r1) != r1
        assert (_first_token(model, tok, prompt_ids, 0.0, r1) == r1) == (probe.margin > 0)


def test_bias_zero_reproduces_the_refusal_probe(tiny_model_dir: Path):
    model, tok = load_base_model(str(tiny_model_dir), pick_runtime("cpu", "float32"))
    records = _records(6)
    first = probe_first_step(model, tok, records, refusal=REFUSAL, batch_size=4)
    assert outcomes_at(first, 0.0) == probe_refusals(model, tok, records, refusal=REFUSAL).outcomes
    # Batching does not change the margins.
    single = probe_first_step(model, tok, records, refusal=REFUSAL, batch_size=1)
    assert [round(p.margin, 4) for p in single] == [round(p.margin, 4) for p in first]


def test_outcome_follows_the_first_step_and_what_comes_after():
    answers = FirstStep(margin=-1.0, refusal_rest=True, answer_start="top_other", answer_rest=True)
    assert answers.outcome(0.0) == "correct"
    assert answers.outcome(0.5) == "correct"
    assert answers.outcome(1.5) == "refused"  # the bias tips the first step
    broken = FirstStep(margin=2.0, refusal_rest=False, answer_start="top_other", answer_rest=True)
    assert broken.outcome(0.0) == "wrong"  # starts the refusal but does not finish it
    assert broken.outcome(-3.0) == "correct"
    shared = FirstStep(
        margin=1.0, refusal_rest=False, answer_start="refusal_token", answer_rest=True
    )
    assert shared.outcome(0.0) == "correct"  # gold starts with the refusal's token
    assert shared.outcome(-2.0) == "wrong"
    assert FirstStep(-1.0, True, "not_top", True).outcome(0.0) == "wrong"


def _probes(margins: list[float], rest: list[bool] | None = None) -> list[FirstStep]:
    rest = rest or [True] * len(margins)
    return [FirstStep(m, r, "top_other", True) for m, r in zip(margins, rest)]


def test_choose_bias_refuses_as_many_unknowns_as_the_target_allows():
    # Known questions lean to answering (negative margins), unknown ones less so.
    known_m = [-5.0, -4.0, -3.0, -2.0, -1.0, -6.0, -7.0, -8.0, -9.0, -10.0]
    unknown_m = [-2.5, -1.5, -0.5, 0.5, -3.5]
    probes = _probes(known_m + unknown_m)
    known = [True] * 10 + [False] * 5
    b = choose_bias(probes, known, target=0.1)  # one known refusal allowed
    refused = refused_at(probes, [b])[0]
    assert refused[:10].sum() == 1 and refused[4]  # the known question closest to refusing
    assert refused[10:].tolist() == [False, False, True, True, False]
    assert 1.0 < b < 2.0  # halfway between thresholds 1 (margin −1) and 2 (margin −2)
    # Nothing allowed: no known question refused, the unknowns above every known one still are.
    b0 = choose_bias(probes, known, target=0.0)
    assert refused_at(probes, [b0])[0][:10].sum() == 0
    assert refused_at(probes, [b0])[0][13]


def test_choose_bias_ignores_known_questions_that_cannot_be_refused():
    probes = _probes([-1.0, -2.0, -3.0], rest=[False, True, True])
    b = choose_bias(probes, [True, True, True], target=0.34)  # one of three allowed
    assert refused_at(probes, [b])[0].tolist() == [False, True, False]
    # Every refusable known question within the target: refuse wherever the model can.
    wide = choose_bias(probes, [True, True, True], target=1.0)
    assert refused_at(probes, [wide])[0].tolist() == [False, True, True]


def test_choose_bias_checks_its_inputs():
    with pytest.raises(ValueError, match="one known flag"):
        choose_bias(_probes([0.0, 1.0]), [True], target=0.1)


def test_refused_at_is_monotone_in_the_bias():
    rng = np.random.default_rng(0)
    probes = _probes(list(rng.normal(size=30)), rest=list(rng.random(30) < 0.8))
    counts = refused_at(probes, np.linspace(-3, 3, 13)).sum(axis=1)
    assert (np.diff(counts) >= 0).all() and counts[0] < counts[-1]
