"""A refusal bias at decoding time: move the operating point without retraining.

The training budget moves a tuned model's operating point (unknowns refused against knowns
refused) along one curve and costs a training run per point. This module adds one scalar
instead: b is added to the logit of the refusal's first token at the first generated
position, and decoding is greedy otherwise (b = 0 is plain greedy decoding). Raising b
refuses more, lowering it less. How well it trades depends on how well the first-step margin
separates known from unknown questions; measured in `bench/results/refusal-bias-topic/`.

`grait.refusal_score.probe_first_step` reads, from the same two teacher-forced passes as
`probe_refusals` (the refusal and the gold answer as targets), what greedy decoding would do
at every b; `outcomes_at(probes, b)` then costs no model pass, so a whole bias curve and a
choice of b for an over-refusal target (`choose_bias`) come from one probe. Torch-free. `grait.generation.generate(first_step_bias=...)` (or `FirstStepBias` in any
`transformers` generation) decodes with it, and `decoding.json` beside an adapter says which.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from grait.scoring import Outcome, Rates, ths

# Where the gold answer's first token stands at the (unbiased) first step.
AnswerStart = Literal["top_other", "refusal_token", "not_top"]


@dataclass(frozen=True)
class FirstStep:
    """What the first generated step decides for one question, and what follows it.

    `margin`: logit of the refusal's first token minus the largest other logit at the first
    step; greedy decoding starts the refusal iff margin + b > 0. `refusal_rest` / `answer_rest`:
    whether the later tokens of the refusal / the gold answer are greedy once it has started.
    """

    margin: float
    refusal_rest: bool
    answer_start: AnswerStart
    answer_rest: bool

    def outcome(self, bias: float = 0.0) -> Outcome:
        """Greedy decoding's outcome with `bias` on the refusal's first token (exact refusal or
        exact gold answer; anything else is wrong, as in `probe_refusals`)."""
        starts_refusal = self.margin + bias > 0
        if starts_refusal:
            if self.refusal_rest:
                return "refused"
            return (
                "correct" if self.answer_start == "refusal_token" and self.answer_rest else "wrong"
            )
        return "correct" if self.answer_start == "top_other" and self.answer_rest else "wrong"


def refusal_first_token(tokenizer: Any, refusal: str) -> int:
    """The token the refusal starts with (targets are tokenised apart from the prompt)."""
    ids = tokenizer(refusal, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"refusal {refusal!r} encodes to no tokens")
    return int(ids[0])


def outcomes_at(probes: Sequence[FirstStep], bias: float) -> list[Outcome]:
    return [p.outcome(bias) for p in probes]


def refused_at(probes: Sequence[FirstStep], biases: Sequence[float]) -> np.ndarray:
    """[len(biases), len(probes)] bool: refused at each bias."""
    margin = np.array([p.margin for p in probes])
    rest = np.array([p.refusal_rest for p in probes])
    b = np.asarray(biases, dtype=float)[:, None]
    return (margin[None, :] + b > 0) & rest[None, :]


def choose_bias(probes: Sequence[FirstStep], known: Sequence[bool], target: float) -> float:
    """The most refusing b whose over-refusal on these questions stays within `target`.

    A known question is refused once b passes −margin (if the refusal would then finish);
    with k = ⌊target · n_known⌋ allowed, b sits halfway between the k-th and the (k+1)-th
    such threshold, so exactly k known questions here are refused and the b chosen is not on
    a threshold of its own. With fewer than k+1 refusable known questions, b sits one logit
    above every question's threshold: refuse wherever the model can.
    """
    known_arr = np.asarray(known, dtype=bool)
    if len(known_arr) != len(probes):
        raise ValueError("one known flag per probe")
    margin = np.array([p.margin for p in probes])
    rest = np.array([p.refusal_rest for p in probes])
    allowed = int(np.floor(target * int(known_arr.sum()) + 1e-9))
    thresholds = np.sort(-margin[known_arr & rest])
    if allowed < len(thresholds):
        upper = thresholds[allowed]
        lower = thresholds[allowed - 1] if allowed > 0 else upper - 2.0
        return float((lower + upper) / 2)
    return float(np.max(-margin) + 1.0) if len(margin) else 0.0


# ---- reporting and storing a bias ---------------------------------------------------------

DECODING_FILE = "decoding.json"  # beside adapter_config.json: how the adapter decodes
CURVE_LEVELS = (0.0, 0.05, 0.1, 0.2, 0.3)  # over-refusal levels the report's table shows


def write_decoding(adapter_dir: Path, *, refusal: str, token_id: int, bias: float) -> Path:
    """Record the refusal bias with an adapter, so serving decodes as the report measured."""
    path = Path(adapter_dir) / DECODING_FILE
    body = {"refusal": refusal, "refusal_first_token": token_id, "refusal_bias": bias}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def read_decoding(adapter_dir: Path) -> tuple[int, float] | None:
    """(token, bias) an adapter asks to decode with; None when it asks for plain greedy."""
    path = Path(adapter_dir) / DECODING_FILE
    if not path.exists():
        return None
    body = json.loads(path.read_text())
    bias = float(body.get("refusal_bias", 0.0))
    return (int(body["refusal_first_token"]), bias) if bias != 0.0 else None


def _point(
    probes: Sequence[FirstStep], known: np.ndarray, base: Sequence[Outcome], bias: float
) -> dict[str, Any]:
    """Rates at one bias: over-refusal, unknown refusal, P_c / P_w / P_r and THS."""
    outcomes = outcomes_at(probes, bias)
    rates = Rates.from_outcomes(outcomes)
    refused = np.array([o == "refused" for o in outcomes])
    return {
        "bias": round(bias, 4),
        "over_refusal": float(refused[known].mean()) if known.any() else None,
        "unknown_refusal": float(refused[~known].mean()) if (~known).any() else None,
        "correct": rates.correct,
        "wrong": rates.wrong,
        "refused": rates.refused,
        "ths": ths(rates, Rates.from_outcomes(base)),
    }


def bias_curve(
    probes: Sequence[FirstStep],
    base: Sequence[Outcome],
    *,
    current: float,
    levels: Sequence[float] = CURVE_LEVELS,
) -> dict[str, Any]:
    """What the tuned model does at the bias it decodes with and at the bias meeting each
    over-refusal level, on one eval set. Known = the base model answers correctly (plain
    prompt). The levels' biases are fitted to these very questions: the table shows the
    trade-off a bias offers, not a held-out estimate of it."""
    known = np.array([o == "correct" for o in base])
    points = [{"level": None, **_point(probes, known, base, current)}]
    for level in levels:
        bias = choose_bias(probes, known, level) if known.any() else current
        points.append({"level": level, **_point(probes, known, base, bias)})
    return {
        "current_bias": current,
        "n_known": int(known.sum()),
        "n_unknown": int((~known).sum()),
        "points": points,
    }
