import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from grait.config import KnowledgeConfig
from grait.data import QARecord, mcqa
from grait.generation import generate
from grait.knowledge import (
    KnowledgeResult,
    certainty_from_distribution,
    choose_scorer,
    query_mcqa,
    query_oeqa,
    score_options_cloze,
    score_options_letter,
    split_known_unknown,
)
from grait.models import load_tokenizer
from grait.prompts import (
    cloze_message,
    collate,
    encode,
    end_of_answer,
    per_sample_answer_loss,
    render_prompt,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, load_tokenizer(str(tiny_model_dir))


RECORDS = [
    mcqa("a", "What colour is the sky on a clear day?", ["green", "blue", "red"], "B"),
    mcqa("b", "How many legs does a spider have?", ["six", "eight", "ten", "four", "two"], "B"),
]


def test_certainty_is_one_for_one_hot_and_zero_for_uniform():
    assert certainty_from_distribution(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0, abs=1e-6)
    assert certainty_from_distribution(np.full(4, 0.25)) == pytest.approx(0.0, abs=1e-9)
    assert 0 < certainty_from_distribution(np.array([0.7, 0.2, 0.1])) < 1


def test_auto_scorer_uses_cloze_for_small_models():
    assert choose_scorer("auto", 135_000_000) == "cloze"
    assert choose_scorer("auto", 8_000_000_000) == "letter"
    assert choose_scorer("letter", 135_000_000) == "letter"


def test_cloze_scores_are_the_softmax_of_mean_option_log_likelihoods(tiny):
    model, tok = tiny
    dists = score_options_cloze(model, tok, RECORDS, batch_size=3)
    rec = RECORDS[1]
    prompt = render_prompt(tok, cloze_message(rec))
    enc = [encode(tok, prompt, o + end_of_answer(tok), max_length=512) for o in rec.options]
    with torch.no_grad():
        lls = []
        for e in enc:  # one at a time: no padding can leak into the score
            b = collate([e], tok.pad_token_id)
            lls.append(
                -per_sample_answer_loss(model(input_ids=b.input_ids).logits, b.labels).item()
            )
    expected = np.exp(lls) / np.exp(lls).sum()
    assert dists[1] == pytest.approx(expected, abs=1e-4)
    assert [len(d) for d in dists] == [3, 5]


def test_a_small_token_budget_gives_the_same_results_as_fixed_batches(tiny):
    model, tok = tiny
    records = RECORDS + [
        mcqa("c", "Which is a fruit?", ["apple", "chair"], "A"),
        mcqa("d", "What do bees make, stored in combs in their hive?", ["wax", "honey"], "B"),
    ]
    fixed = score_options_cloze(model, tok, records, batch_size=16)
    # Room for about two option sequences per forward: 12 options become several batches.
    budgeted = score_options_cloze(model, tok, records, batch_size=16, token_budget=150)
    for a, b in zip(fixed, budgeted):
        assert b == pytest.approx(a, abs=1e-5)
    letter = score_options_letter(model, tok, records, batch_size=16, refusal="I don't know.")
    letter_budgeted = score_options_letter(
        model, tok, records, batch_size=16, token_budget=150, refusal="I don't know."
    )
    for a, b in zip(letter, letter_budgeted):
        assert b == pytest.approx(a, abs=1e-5)
    prompts = ["Hi", "Tell me a long story about the sea and the ships on it", "2 + 2 =", "Why?"]
    greedy = generate(model, tok, prompts, max_new_tokens=5, batch_size=16)
    greedy_budgeted = generate(
        model, tok, prompts, max_new_tokens=5, batch_size=16, token_budget=16
    )
    assert greedy_budgeted == greedy


def test_mcqa_query_marks_known_by_tau(tiny):
    model, tok = tiny
    for scorer in ("cloze", "letter"):
        results = query_mcqa(
            model, tok, RECORDS, KnowledgeConfig(tau=0.0), scorer=scorer, refusal="I don't know."
        )
        assert all(r.known for r in results)
        results = query_mcqa(
            model, tok, RECORDS, KnowledgeConfig(tau=1.0), scorer=scorer, refusal="I don't know."
        )
        assert not any(r.known for r in results)
        assert all(0 <= r.correctness <= 1 and 0 <= r.certainty <= 1 for r in results)


def test_oeqa_query_samples_k_answers(tiny):
    model, tok = tiny
    recs = [QARecord("q", "Capital of France?", aliases=("Paris",))]
    cfg = KnowledgeConfig(k_samples=3, max_new_tokens=3, batch_size=4)
    [result] = query_oeqa(model, tok, recs, cfg, refusal="I don't know.", seed=0)
    # 4 answers (greedy + 3 samples): correctness and agreement are multiples of 1/4.
    assert result.correctness * 4 == pytest.approx(round(result.correctness * 4))
    assert (
        result.certainty * 4 == pytest.approx(round(result.certainty * 4))
        and result.certainty >= 0.25
    )


def _k(c: float, cert: float = 0.5) -> KnowledgeResult:
    return KnowledgeResult("x", c, cert, "A", c >= 0.5)


def test_split_keeps_the_most_correct_known_and_budgets_unknowns_four_to_one():
    results = [
        _k(0.9),
        _k(0.6),
        _k(0.2),
        _k(0.95),
        _k(0.1),
        _k(0.3),
        _k(0.7),
        _k(0.0),
        _k(0.8),
        _k(0.55),
    ]
    split = split_known_unknown(results, KnowledgeConfig())
    assert split.ik_all == [0, 1, 3, 6, 8, 9]
    assert split.idk_all == [2, 4, 5, 7]
    assert split.n_idk_budget == 2  # round(6 / 4)
    narrow = split_known_unknown(results, KnowledgeConfig(n_ik=2, n_idk=3))
    assert narrow.ik_kept == [0, 3]
    assert narrow.n_idk_budget == 3


def test_split_with_nothing_known_refuses_every_unknown():
    split = split_known_unknown([_k(0.1), _k(0.2)], KnowledgeConfig())
    assert split.ik_kept == [] and split.n_idk_budget == 2
