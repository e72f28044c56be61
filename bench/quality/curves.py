"""Refusal trade-off curves and their uncertainty (seeds, then questions).

A method tuned at budgets b_1 < b_2 < ... gives points (over-refusal on known facts,
refusal of unknown facts). Its *trade-off area up to a cap c* is the mean over x in [0, c]
of the best unknown-refusal rate any of its budgets reaches with over-refusal <= x (the
origin counts as a point: refusing nothing). It is what a user who may accept at most x
over-refusal gets from the method, averaged over the tolerances up to c; 1 is perfect.

Its *separability* d′ = z(unknown refused) − z(known refused) does not depend on where on
the curve a budget lands: on a binormal ROC every point has the same d′ (AUROC =
Φ(d′/√2)). The area asks which operating points a method reaches, d′ whether it separates
unknown from known facts better at all (post hoc, added after six rankings failed to beat
random by area: see `../results/LEDGER.md`).

Intervals come from a hierarchical bootstrap: resample seeds with replacement, then, within
each drawn seed, its known and its unknown eval questions with replacement; every method of
a seed sees the same draw (paired), so differences between methods keep their pairing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from grait import scoring

CAP = 0.30  # over-refusal up to which the area is taken (fixed before looking at results)


def tradeoff_area(over: Sequence[float], recall: Sequence[float], cap: float = CAP) -> float:
    """Mean over x in [0, cap] of max{recall_b : over_b <= x}, with the origin included."""
    xs = np.append(np.asarray(over, dtype=float), 0.0)
    ys = np.append(np.asarray(recall, dtype=float), 0.0)
    edges = np.unique(np.clip(np.append(xs[xs <= cap], [0.0, cap]), 0.0, cap))
    area = 0.0
    for left, right in itertools.pairwise(edges):
        area += (right - left) * ys[xs <= left].max()
    return float(area / cap)


@dataclass
class SeedCurves:
    """One seed's eval outcomes: `refused[m]` and `correct[m]` are [budgets, questions] bools."""

    known: np.ndarray  # [questions] bool (taught facts)
    refused: dict[str, np.ndarray]
    correct: dict[str, np.ndarray]
    base_correct: np.ndarray  # [questions] bool, base model, plain prompt (THS reference)
    base_wrong: np.ndarray


def rates(refused: np.ndarray, known: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(over-refusal, unknown refusal) per budget over the questions `idx`."""
    r = refused[:, idx]
    k = known[idx]
    return r[:, k].mean(axis=1), r[:, ~k].mean(axis=1)


def ths_per_budget(seed: SeedCurves, method: str, idx: np.ndarray) -> np.ndarray:
    """THS = P_c − P_w·P_c0/P_w0 at every budget, on questions `idx` (base on the same ones)."""
    c = seed.correct[method][:, idx].mean(axis=1)
    r = seed.refused[method][:, idx].mean(axis=1)
    w = 1.0 - c - r
    c0, w0 = seed.base_correct[idx].mean(), seed.base_wrong[idx].mean()
    return c - w * (c0 / w0) if w0 > 0 else np.full(len(c), np.nan)


def _draw(seed: SeedCurves, rng: np.random.Generator) -> np.ndarray:
    """Question indices resampled within the known and the unknown facts separately."""
    k = np.flatnonzero(seed.known)
    u = np.flatnonzero(~seed.known)
    return np.concatenate([rng.choice(k, len(k)), rng.choice(u, len(u))])


def hierarchical_ci(
    seeds: Sequence[SeedCurves],
    statistic: Callable[[SeedCurves, np.ndarray], float],
    *,
    n_boot: int = 1000,
    rng_seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """Mean over seeds of `statistic(seed, question idx)`, with a 95% seeds-then-questions CI."""
    full = [np.arange(len(s.known)) for s in seeds]
    point = float(np.mean([statistic(s, i) for s, i in zip(seeds, full)]))
    rng = np.random.default_rng(rng_seed)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        picked = rng.integers(len(seeds), size=len(seeds))
        draws[b] = np.mean([statistic(seeds[j], _draw(seeds[j], rng)) for j in picked])
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return point, (float(lo), float(hi))


def area_of(method: str, cap: float = CAP) -> Callable[[SeedCurves, np.ndarray], float]:
    def stat(seed: SeedCurves, idx: np.ndarray) -> float:
        over, recall = rates(seed.refused[method], seed.known, idx)
        return tradeoff_area(over, recall, cap)

    return stat


def area_difference(a: str, b: str, cap: float = CAP) -> Callable[[SeedCurves, np.ndarray], float]:
    fa, fb = area_of(a, cap), area_of(b, cap)
    return lambda seed, idx: fa(seed, idx) - fb(seed, idx)


def separability(refused: np.ndarray, known: np.ndarray) -> float:
    """Binormal d′ of one tuned model's refusals over the given questions (`grait.scoring`)."""
    k, u = refused[known], refused[~known]
    return scoring.separability(int(u.sum()), len(u), int(k.sum()), len(k))


def separability_of(method: str) -> Callable[[SeedCurves, np.ndarray], float]:
    """Mean d′ over the method's own budgets (a ranked method's last row, "all", is R-Tuning's)."""

    def stat(seed: SeedCurves, idx: np.ndarray) -> float:
        rows = seed.refused[method][:, idx]
        own = rows if method == "rtuning" or len(rows) == 1 else rows[:-1]
        return float(np.mean([separability(r, seed.known[idx]) for r in own]))

    return stat


def separability_difference(a: str, b: str) -> Callable[[SeedCurves, np.ndarray], float]:
    fa, fb = separability_of(a), separability_of(b)
    return lambda seed, idx: fa(seed, idx) - fb(seed, idx)
