"""CRaFT's data construction (Zhu et al., AAAI 2025, arXiv 2410.06913) from Stage 1 outputs.

Two signals beside correctness decide which unknowns become refusals:
- **certainty** (Stage 1's `certainty`: 1 − normalised entropy over MCQA options, agreement
  of the sampled OEQA answers). An unknown the model answers with a confident wrong answer
  is where a refusal teaches the most; a known answered with certainty is safe to keep.
- **knowledge flow**: the change in correctness after a short rehearsal LoRA on the surest
  knowns. An unknown that the rehearsal makes more answerable is one the model could come to
  know; teaching it a refusal contradicts that, so it is dropped (neither refusal nor answer).

Torch-free: the rehearsal itself is a pipeline stage; this module only chooses rows and orders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from grait.config import CraftConfig


@dataclass(frozen=True)
class KnowledgeSignals:
    """Per training row: Stage 1's correctness and certainty, and the rehearsal's change."""

    correctness: np.ndarray
    certainty: np.ndarray
    delta: np.ndarray | None = None  # None: no rehearsal (craft-noflow)
    max_delta: float = 0.0

    def restricted(self, rows: Sequence[int]) -> KnowledgeSignals:
        """The same signals for a subset of rows, in that order (the `auto` hold-out)."""
        idx = np.asarray(rows, dtype=np.int64)
        return KnowledgeSignals(
            self.correctness[idx],
            self.certainty[idx],
            None if self.delta is None else self.delta[idx],
            self.max_delta,
        )


def rehearsal_rows(
    correctness: Sequence[float], certainty: Sequence[float], known: Sequence[int], cfg: CraftConfig
) -> list[int]:
    """The knowns to rehearse on: correctness above the threshold, surest first, capped.

    With fewer than `rehearsal_min_samples` above the threshold, the surest
    `rehearsal_min_samples` knowns (a small model is rarely > 0.99 sure of anything).
    """
    ranked = sorted(known, key=lambda i: (-correctness[i], -certainty[i], i))
    sure = [i for i in ranked if correctness[i] > cfg.rehearsal_min_correctness]
    if len(sure) < cfg.rehearsal_min_samples:
        sure = ranked[: cfg.rehearsal_min_samples]
    return sorted(sure[: cfg.rehearsal_max_samples])


def refusal_order(kind: str, candidates: Sequence[int], signals: KnowledgeSignals) -> list[int]:
    """Positions in `candidates` that may become refusals, in pick order.

    Candidates the rehearsal made more answerable (delta > max_delta) are left out, so a
    budget above the eligible count takes the eligible ones only. `certainty`: least certain
    first; `correctness` (the no-certainty ablation): least correct first. Ties by position.
    """
    rows = np.asarray(candidates, dtype=np.int64)
    eligible = [
        pos
        for pos, row in enumerate(rows)
        if signals.delta is None or signals.delta[row] <= signals.max_delta
    ]
    key = signals.certainty if kind == "certainty" else signals.correctness
    if kind not in ("certainty", "correctness"):
        raise ValueError(f"unknown ranking {kind!r}")
    return sorted(eligible, key=lambda pos: (float(key[rows[pos]]), pos))


def known_by_certainty(
    known: Sequence[int], correctness: Sequence[float], certainty: Sequence[float], n: int | None
) -> list[int]:
    """The `n` most certain knowns (ties: more correct first), sorted; all when n is None."""
    ranked = sorted(known, key=lambda i: (-certainty[i], -correctness[i], i))
    return sorted(ranked if n is None else ranked[:n])
