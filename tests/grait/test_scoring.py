import pytest

from grait.config import REFUSAL
from grait.data import QARecord, mcqa
from grait.scoring import (
    Rates,
    bootstrap_ci,
    is_refusal,
    mcqa_choice,
    normalize_answer,
    oeqa_correct,
    score_response,
    ths,
)

CAPITAL = mcqa("q1", "Capital of France?", ["Berlin", "Paris", "Rome", "Madrid"], "B")
NQ = QARecord("n1", "Who wrote Hamlet?", aliases=("William Shakespeare", "Shakespeare"))


def test_normalize_answer_drops_case_punctuation_articles_and_spacing():
    assert normalize_answer("  The  Beatles!! ") == "beatles"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("Theatre") == "theatre"


@pytest.mark.parametrize(
    "response",
    [
        REFUSAL,
        "i don't know",
        "I don\u2019t know.",
        "I dont know",
        "I do not know the answer.",
        "I'm not sure.",
        "I am not sure about this.",
        "I cannot answer that.",
        "I can't answer this question.",
        "I\u2019m unable to answer.",
        "Honestly, I have no idea.",
        "A. I don't know what else",
    ],
)
def test_refusal_variants_are_refusals(response):
    assert is_refusal(response)


@pytest.mark.parametrize(
    "response",
    ["B. Paris", "The answer is unknown to most people: Paris", "I know it: Paris", "Nobody knows"],
)
def test_answers_are_not_refusals(response):
    assert not is_refusal(response)


def test_custom_refusal_patterns_replace_the_defaults():
    assert is_refusal("No comment.", patterns=[r"no comment"])
    assert not is_refusal("I don't know.", patterns=[r"no comment"])


@pytest.mark.parametrize(
    "response, letter",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("Answer: B", "B"),
        ("The answer is C. Rome", "C"),
        ("I think it is D", "D"),
        ("I'm fairly confident: A", "A"),
        ("B) Paris, not C", "B"),
    ],
)
def test_first_valid_standalone_letter_is_the_choice(response, letter):
    assert mcqa_choice(CAPITAL, response) == letter


def test_letters_outside_the_record_or_inside_words_are_ignored():
    # E is not an option of a 4-option item; "Bob" and "OK" are words, not letters.
    assert mcqa_choice(CAPITAL, "E") is None
    assert mcqa_choice(CAPITAL, "Bob says OK") is None


def test_option_text_is_the_fallback_when_no_letter_is_given():
    assert mcqa_choice(CAPITAL, "it is paris") == "B"


def test_option_text_fallback_refuses_ambiguous_matches():
    assert mcqa_choice(CAPITAL, "either paris or rome") is None


def test_option_text_fallback_prefers_the_longer_option_containing_another():
    rec = mcqa("q2", "Which city?", ["paris", "paris texas", "dallas"], "B")
    assert mcqa_choice(rec, "paris, texas") == "B"
    assert mcqa_choice(rec, "paris") == "A"


def test_option_text_must_match_whole_words():
    rec = mcqa("q3", "Which?", ["art", "music"], "A")
    assert mcqa_choice(rec, "start") is None


def test_oeqa_matches_any_alias_exactly_or_contained():
    assert oeqa_correct(NQ, "Shakespeare")
    assert oeqa_correct(NQ, "It was written by William Shakespeare.")
    assert not oeqa_correct(NQ, "Christopher Marlowe")


def test_oeqa_alias_empty_after_normalisation_never_matches():
    rec = QARecord("n2", "Article?", aliases=("The",))
    assert not oeqa_correct(rec, "the")
    assert not oeqa_correct(rec, "")


def test_score_response_checks_refusal_first():
    assert score_response(CAPITAL, "B. Paris") == "correct"
    assert score_response(CAPITAL, "A. Berlin") == "wrong"
    assert score_response(CAPITAL, "B. Paris? I'm not sure.") == "refused"
    assert score_response(CAPITAL, "no idea which") == "wrong"  # picks nothing
    assert score_response(NQ, "shakespeare") == "correct"
    assert score_response(NQ, REFUSAL) == "refused"


def test_rates_fractions_sum_to_one():
    rates = Rates.from_outcomes(["correct", "wrong", "refused", "correct"])
    assert rates.n == 4
    assert (rates.correct, rates.wrong, rates.refused) == (0.5, 0.25, 0.25)
    thirds = Rates.from_outcomes(["correct", "wrong", "refused"])
    assert thirds.correct + thirds.wrong + thirds.refused == pytest.approx(1.0)


def test_rates_reject_empty_and_unknown_outcomes():
    with pytest.raises(ValueError):
        Rates.from_outcomes([])
    with pytest.raises(ValueError, match="maybe"):
        Rates.from_outcomes(["correct", "maybe"])


BASE = Rates(n=10, correct=0.6, wrong=0.4, refused=0.0)


def test_ths_of_base_against_itself_is_zero():
    assert ths(BASE, BASE) == pytest.approx(0.0)


def test_ths_of_refusing_everything_is_zero_and_all_correct_is_one():
    assert ths(Rates(10, 0.0, 0.0, 1.0), BASE) == pytest.approx(0.0)
    assert ths(Rates(10, 1.0, 0.0, 0.0), BASE) == pytest.approx(1.0)


def test_ths_rewards_trading_wrong_answers_for_refusals():
    assert ths(Rates(10, 0.6, 0.2, 0.2), BASE) == pytest.approx(0.6 - 0.2 * 1.5)
    assert ths(Rates(10, 0.6, 0.2, 0.2), BASE) > 0


def test_ths_is_undefined_when_base_is_never_wrong():
    assert ths(Rates(10, 0.5, 0.5, 0.0), Rates(10, 0.8, 0.0, 0.2)) is None


def _outcomes(n: int) -> list[str]:
    pattern = ["correct"] * 5 + ["wrong"] * 3 + ["refused"] * 2
    return (pattern * (n // 10 + 1))[:n]


def test_bootstrap_interval_contains_point_and_narrows_with_more_questions():
    small, large = _outcomes(40), _outcomes(2000)
    lo_s, hi_s = bootstrap_ci(small, lambda r: r.correct)
    lo_l, hi_l = bootstrap_ci(large, lambda r: r.correct)
    assert lo_s <= 0.5 <= hi_s
    assert lo_l <= 0.5 <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3


def test_bootstrap_is_reproducible_with_a_seed():
    data = _outcomes(100)
    assert bootstrap_ci(data, lambda r: r.wrong, seed=3) == bootstrap_ci(
        data, lambda r: r.wrong, seed=3
    )


def test_bootstrap_ths_with_fixed_and_paired_base():
    model = _outcomes(300)
    base = (["correct"] * 5 + ["wrong"] * 5) * 30
    point = ths(Rates.from_outcomes(model), Rates.from_outcomes(base))
    fixed = bootstrap_ci(model, ths, base=Rates.from_outcomes(base))
    paired = bootstrap_ci(model, ths, base=base)
    assert fixed[0] <= point <= fixed[1]
    assert paired[0] <= point <= paired[1]


def test_bootstrap_of_undefined_metric_is_none():
    never_wrong = ["correct"] * 20
    assert bootstrap_ci(_outcomes(20), ths, base=never_wrong) is None


def test_bootstrap_paired_base_must_cover_the_same_questions():
    with pytest.raises(ValueError, match="paired"):
        bootstrap_ci(_outcomes(20), ths, base=_outcomes(10))
