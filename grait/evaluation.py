"""Evaluation: greedy answers scored as correct / wrong / refused, and THS against the base.

grait.md, "Evaluation": the tuned model answers with the refusal-allowed (RAIT) prompt; the
base model's plain-prompt rates (P_c0, P_w0) are the THS reference (Init-Basic).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grait.data import QARecord
from grait.generation import generate
from grait.prompts import question_message, render_prompt
from grait.scoring import Outcome, Rates, bootstrap_ci, refusal_split, score_response, ths


@dataclass(frozen=True)
class EvalRun:
    """One model's answers on one eval set."""

    responses: list[str]
    outcomes: list[Outcome]

    @property
    def rates(self) -> Rates:
        return Rates.from_outcomes(self.outcomes)


def answer_and_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[QARecord],
    *,
    allow_refusal: bool,
    refusal: str,
    max_new_tokens: int,
    batch_size: int,
    token_budget: int | None = None,
    first_step_bias: tuple[int, float] | None = None,
    tick: Callable[[int], None] | None = None,
) -> EvalRun:
    """Greedy answers scored; `first_step_bias` = (refusal's first token, refusal bias)."""
    prompts = [
        render_prompt(tokenizer, question_message(r, allow_refusal=allow_refusal, refusal=refusal))
        for r in records
    ]
    responses = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        token_budget=token_budget,
        first_step_bias=first_step_bias,
        tick=tick,
    )
    return EvalRun(responses, [score_response(r, text) for r, text in zip(records, responses)])


def model_entry(
    name: str, run: EvalRun, base: EvalRun, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, object]:
    """A report row: rates, THS against the base model, and bootstrap 95% intervals.

    The intervals resample questions, pairing each with the base model's answer to the same
    question, so THS's interval carries the base rates' own noise too. The refusal split
    (`scoring.refusal_split`) says whether the refusals land on what the base got wrong:
    over-refusal is the failure RAIT most often ships with, and P_r alone hides it.
    """
    r = run.rates
    ci: dict[str, object] = {
        key: bootstrap_ci(
            run.outcomes, lambda rates, k=key: getattr(rates, k), n_boot=n_boot, seed=seed
        )
        for key in ("correct", "wrong", "refused")
    }
    ci["ths"] = bootstrap_ci(run.outcomes, ths, base=base.outcomes, n_boot=n_boot, seed=seed)
    split = refusal_split(run.outcomes, base.outcomes)
    return {
        "name": name,
        "n": r.n,
        "correct": r.correct,
        "wrong": r.wrong,
        "refused": r.refused,
        "ths": ths(r, base.rates),
        "over_refusal": split.over_refusal,
        "unknown_refusal": split.unknown_refusal,
        "separability": split.separability,
        "ci": {k: None if v is None else [float(v[0]), float(v[1])] for k, v in ci.items()},
    }
