"""Did the tuning take? The share of its own training targets the tuned model now gives.

A LoRA trained for too few steps, or at too low a learning rate, barely differs from the base
model; the job still "succeeds" and its report looks normal. One teacher-forced pass over a
sample of the training set tells: for each example, would greedy decoding emit its training
target (the refusal for an unknown, the answer for a known)? Below a threshold the job
carries a warning, so a user learns it taught nothing before reading evaluation tables.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import PreTrainedModel

from grait.config import FitCheckConfig
from grait.prompts import Encoded
from grait.refusal_score import score_encoded

REFUSAL_KINDS = frozenset({"idk"})  # training rows whose target is the refusal


@dataclass(frozen=True)
class FitWarning:
    code: str
    message: str


@dataclass(frozen=True)
class FitCheck:
    """Shares of probed training examples whose target greedy decoding would emit."""

    refusal_learned: float | None
    answers_kept: float | None
    n_refusal: int
    n_answer: int
    warnings: list[FitWarning] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sample(items: list[Encoded], k: int, rng: random.Random) -> list[Encoded]:
    return items if len(items) <= k else rng.sample(items, k)


def check_fit(
    model: PreTrainedModel,
    examples: Sequence[tuple[str, Encoded]],
    cfg: FitCheckConfig,
    *,
    pad_id: int,
    batch_size: int,
    token_budget: int | None = None,
    seed: int = 0,
) -> FitCheck:
    """`examples` are (kind, encoded prompt + training target); kind `idk` = a refusal."""
    rng = random.Random(seed)
    refusals = _sample([e for k, e in examples if k in REFUSAL_KINDS], cfg.max_rows, rng)
    answers = _sample([e for k, e in examples if k not in REFUSAL_KINDS], cfg.max_rows, rng)
    model.eval()
    scores = score_encoded(
        model,
        refusals + answers,
        pad_id=pad_id,
        batch_size=batch_size,
        token_budget=token_budget,
    )
    hits = [s.greedy for s in scores]
    refusal_hits, answer_hits = hits[: len(refusals)], hits[len(refusals) :]
    learned = sum(refusal_hits) / len(refusals) if refusals else None
    kept = sum(answer_hits) / len(answers) if answers else None
    warnings = []
    if learned is not None and learned < cfg.min_refusal_learned:
        warnings.append(
            FitWarning(
                "refusal_not_learned",
                f"the tuned model gives its training refusal for {learned:.0%} of "
                f"{len(refusals)} probed refusal examples (threshold "
                f"{cfg.min_refusal_learned:.0%}): it has barely learned to refuse. Train longer "
                "(training.epochs, training.max_steps) or at a higher training.learning_rate.",
            )
        )
    if kept is not None and kept < cfg.min_answers_kept:
        warnings.append(
            FitWarning(
                "answers_not_kept",
                f"the tuned model gives the training answer for {kept:.0%} of {len(answers)} "
                f"probed answer examples (threshold {cfg.min_answers_kept:.0%}): the adapter "
                "has not fitted the known answers (too little training) or has drifted.",
            )
        )
    return FitCheck(learned, kept, len(refusals), len(answers), warnings)
