"""Trade-off areas and the seeds-then-questions bootstrap on hand-built outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from bench.quality.curves import (
    SeedCurves,
    area_difference,
    area_of,
    hierarchical_ci,
    rates,
    separability,
    separability_difference,
    separability_of,
    ths_per_budget,
    tradeoff_area,
)


def test_area_of_a_perfect_method_is_one_and_of_refusing_nothing_zero():
    assert tradeoff_area([0.0], [1.0], cap=0.3) == pytest.approx(1.0)
    assert tradeoff_area([0.0, 0.0], [0.0, 0.0], cap=0.3) == 0.0


def test_area_is_the_staircase_of_the_best_point_within_each_tolerance():
    # Point A: 10% over-refusal, 40% of unknowns refused; B: 20% and 70%; C: 50% and 100%.
    area = tradeoff_area([0.1, 0.2, 0.5], [0.4, 0.7, 1.0], cap=0.3)
    assert area == pytest.approx((0.1 * 0 + 0.1 * 0.4 + 0.1 * 0.7) / 0.3)
    # A dominated point changes nothing; points past the cap count for nothing.
    assert tradeoff_area([0.1, 0.2, 0.25, 0.5], [0.4, 0.7, 0.5, 1.0], cap=0.3) == pytest.approx(
        area
    )


def _seed(rng: np.random.Generator, strength: float) -> SeedCurves:
    known = np.array([True] * 20 + [False] * 20)
    budgets = 3
    refused = {}
    for name, s in (("good", strength), ("random", 0.0)):
        p_unknown = np.linspace(0.2, 0.8, budgets)[:, None] + s
        p_known = np.linspace(0.05, 0.4, budgets)[:, None] - s / 2
        p = np.where(known[None, :], p_known, p_unknown).clip(0, 1)
        refused[name] = rng.random((budgets, len(known))) < p
    correct = {k: ~v & known[None, :] for k, v in refused.items()}
    base_correct = known.copy()
    return SeedCurves(known, refused, correct, base_correct, ~base_correct)


def test_hierarchical_interval_covers_the_point_and_sees_a_real_difference():
    rng = np.random.default_rng(0)
    seeds = [_seed(rng, 0.2) for _ in range(5)]
    point, (lo, hi) = hierarchical_ci(seeds, area_of("good"), n_boot=300)
    assert lo <= point <= hi
    diff, (dlo, _dhi) = hierarchical_ci(seeds, area_difference("good", "random"), n_boot=300)
    assert diff > 0 and dlo > 0
    _same, (slo, shi) = hierarchical_ci(
        [_seed(rng, 0.0) for _ in range(5)], area_difference("good", "random"), n_boot=300
    )
    assert slo < 0 < shi


def test_rates_and_ths_per_budget():
    known = np.array([True, True, False, False])
    refused = np.array([[False, False, True, False], [True, False, True, True]])
    over, recall = rates(refused, known, np.arange(4))
    assert over.tolist() == [0.0, 0.5] and recall.tolist() == [0.5, 1.0]
    seed = SeedCurves(
        known,
        {"m": refused},
        {"m": np.array([[True, True, False, False], [False, True, False, False]])},
        np.array([True, True, False, False]),
        np.array([False, False, True, True]),
    )
    ths = ths_per_budget(seed, "m", np.arange(4))
    # Base: P_c0 = P_w0 = 0.5. Budget 0: P_c 0.5, P_w 0.25 -> 0.25; budget 1: P_c 0.25, P_w 0.
    assert ths.tolist() == pytest.approx([0.25, 0.25])


def test_separability_is_the_same_anywhere_on_one_binormal_roc():
    # d′ = 1: at 10% over-refusal the ROC refuses Φ(1 − 1.2816) = 39% of unknowns, at 30%
    # Φ(1 − 0.5244) = 68%. Two budgets landing at either point separate equally well.
    known = np.array([True] * 100 + [False] * 100)

    def refusals(over: int, unknown: int) -> np.ndarray:
        return np.array([i < over for i in range(100)] + [i < unknown for i in range(100)])

    low, high = separability(refusals(10, 39), known), separability(refusals(30, 68), known)
    assert low == pytest.approx(1.0, abs=0.05) and high == pytest.approx(1.0, abs=0.05)
    # Refusing known facts more than unknown ones is negative d′; refusing none stays finite.
    assert separability(refusals(39, 10), known) == pytest.approx(-low)
    assert np.isfinite(separability(refusals(0, 0), known))


def test_separability_of_a_ranked_method_leaves_out_the_shared_all_row():
    known = np.array([True, True, False, False])
    good = np.array([False, False, True, True])  # refuses exactly the unknown facts
    bad = np.array([True, True, False, False])
    seed = SeedCurves(
        known,
        refused={"grait": np.stack([good, good, bad]), "rtuning": np.stack([bad])},
        correct={},
        base_correct=known,
        base_wrong=~known,
    )
    idx = np.arange(4)
    assert separability_of("grait")(seed, idx) == pytest.approx(separability(good, known))
    assert separability_of("rtuning")(seed, idx) == pytest.approx(separability(bad, known))
    assert separability_difference("grait", "rtuning")(seed, idx) > 0
