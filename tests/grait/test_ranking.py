"""Rankings of the unknown candidates: coverage, stratified, random; budgets are prefixes."""

from __future__ import annotations

import numpy as np
import pytest

from grait.config import SelectionConfig, WeightingConfig
from grait.ranking import Features, Ranking, rank_candidates, refusal_weights
from grait.selection import (
    centre_features,
    facility_location_order,
    normalise_rows,
    share_apportioned_order,
    share_weighted_order,
    spherical_kmeans,
    stratified_random_order,
    unknown_share,
)


def _clusters(rng: np.random.Generator, sizes: list[int], d: int = 32, noise: float = 0.1):
    """Unit rows around orthogonal cluster directions; returns rows and their cluster ids."""
    rows, ids = [], []
    for c, n in enumerate(sizes):
        centre = np.eye(d)[c]
        rows.append(centre + noise * rng.normal(size=(n, d)))
        ids += [c] * n
    return normalise_rows(np.concatenate(rows).astype(np.float32)), np.array(ids)


def test_facility_location_spreads_picks_over_clusters_instead_of_stacking_one():
    rng = np.random.default_rng(0)
    unknown, cluster = _clusters(rng, [10, 10, 10])
    result = facility_location_order(unknown, unknown, np.zeros((0, 32)), lam=1.0)
    assert sorted(result.order) == list(range(30))  # a full order of every candidate
    assert set(cluster[result.order[:3]]) == {0, 1, 2}
    assert result.gain[0] >= result.gain[1] >= result.gain[2] > result.gain[3]


def test_facility_location_leaves_the_cluster_the_knowns_share_for_last():
    rng = np.random.default_rng(1)
    unknown, cluster = _clusters(rng, [8, 8, 8])
    known, _ = _clusters(rng, [0, 0, 12])  # the known facts sit in cluster 2
    order = facility_location_order(unknown, unknown, known, lam=1.0).order
    assert set(cluster[order[:2]]) == {0, 1}
    first_from_2 = next(i for i, c in enumerate(order) if cluster[c] == 2)
    assert first_from_2 > 2
    # Without the over-refusal term cluster 2 is as good as any other.
    plain = facility_location_order(unknown, unknown, known, lam=0.0).order
    assert set(cluster[plain[:3]]) == {0, 1, 2}


def test_centring_removes_the_shared_direction():
    rng = np.random.default_rng(2)
    shared = np.ones(16) * 3
    x = normalise_rows(shared + rng.normal(size=(20, 16)))
    raw_cos = np.mean(np.abs(x @ x.T)[~np.eye(20, dtype=bool)])
    c = centre_features(x, x.mean(axis=0))
    centred_cos = np.mean(np.abs(c @ c.T)[~np.eye(20, dtype=bool)])
    assert raw_cos > 0.8
    assert centred_cos < 0.3
    assert np.allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)


def test_spherical_kmeans_finds_well_separated_clusters():
    rng = np.random.default_rng(3)
    x, truth = _clusters(rng, [6, 9, 5])
    labels = spherical_kmeans(x, 3, seed=0)
    # Same partition up to renaming.
    assert len({(a, b) for a, b in zip(truth, labels)}) == 3


def test_stratified_order_takes_equal_counts_from_each_cluster():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    order = stratified_random_order(labels, seed=5)
    assert sorted(order) == list(range(20))
    for k in (3, 6, 9):
        counts = np.bincount(labels[order[:k]], minlength=3)
        assert counts.max() - counts.min() <= 1
    # Once cluster 1 runs out, the others keep alternating.
    assert np.bincount(labels[order[:15]], minlength=3).tolist() == [6, 3, 6]
    assert stratified_random_order(labels, seed=5) == order
    assert stratified_random_order(labels, seed=6) != order


def _features(rng: np.random.Generator) -> tuple[Features, list[int], list[int]]:
    rows, _ = _clusters(rng, [6, 6, 6])
    van = normalise_rows(rng.normal(size=(6, 32)).astype(np.float32))
    return Features(rows, rows, van), list(range(12)), list(range(12, 18))


@pytest.mark.parametrize("kind", ["gradient", "stratified", "random"])
def test_every_ranking_orders_all_candidates_and_is_seeded(kind: str):
    features, idk, ik = _features(np.random.default_rng(4))
    cfg = SelectionConfig()
    a = rank_candidates(kind, idk_rows=idk, ik_rows=ik, features=features, cfg=cfg, seed=0)
    b = rank_candidates(kind, idk_rows=idk, ik_rows=ik, features=features, cfg=cfg, seed=0)
    assert sorted(a.order) == list(range(len(idk)))
    assert a.order == b.order


def test_gradient_ranking_avoids_the_known_cluster_and_records_its_terms():
    features, idk, ik = _features(np.random.default_rng(5))  # rows 12-17 (cluster 2) are known
    idk = list(range(18))[:6] + list(range(6, 12)) + [12, 13]  # two unknowns in the known cluster
    ik = [14, 15, 16, 17]
    r = rank_candidates(
        "gradient", idk_rows=idk, ik_rows=ik, features=features, cfg=SelectionConfig(), seed=0
    )
    assert {12, 13}.isdisjoint({idk[i] for i in r.order[:2]})
    assert set(r.terms) >= {"i_idk", "i_ik", "van", "gain"}
    score = rank_candidates(
        "gradient",
        idk_rows=idk,
        ik_rows=ik,
        features=features,
        cfg=SelectionConfig(strategy="score"),
        seed=0,
    )
    assert "score" in score.terms and sorted(score.order) == list(range(len(idk)))


def test_relative_temperature_spreads_weights_where_the_absolute_one_leaves_them_flat():
    rng = np.random.default_rng(6)
    n = 20
    ranking = Ranking(
        list(range(n)), {"i_idk": 0.003 * rng.normal(size=n), "i_ik": 0.003 * rng.normal(size=n)}
    )
    picked = list(range(10))
    flat = refusal_weights(
        ranking, picked, WeightingConfig(temperature_scale="absolute"), weighted=True
    )
    spread = refusal_weights(ranking, picked, WeightingConfig(), weighted=True)
    assert np.ptp(flat) < 0.5 < np.ptp(spread)
    # Safer samples (lower alpha = I_ik - I_idk) weigh more.
    alpha = ranking.terms["i_ik"][picked] - ranking.terms["i_idk"][picked]
    assert np.argmax(spread) == np.argmin(alpha)
    assert (
        refusal_weights(ranking, picked, WeightingConfig(), weighted=False).tolist() == [1.0] * 10
    )


def test_unknown_share_reads_each_candidates_neighbourhood_and_skips_itself():
    rows, cluster = _clusters(np.random.default_rng(6), [20, 20])
    is_idk = np.r_[np.ones(18, bool), np.zeros(2, bool), np.zeros(18, bool), np.ones(2, bool)]
    ids = np.arange(40)
    cand = np.flatnonzero(is_idk)
    share = unknown_share(
        rows[cand], rows, is_idk, candidate_ids=cand, reference_ids=ids, neighbours=10
    )
    in_unknown_cluster = cluster[cand] == 0
    assert share[in_unknown_cluster].min() > 0.7  # (≥8 of 10 neighbours unknown + 1) / 12
    assert share[~in_unknown_cluster].max() < 0.3  # a lone unknown among knowns
    # Without self-exclusion a candidate would count itself: one reference, itself -> 1/2.
    alone = unknown_share(
        rows[:1],
        rows[:1],
        np.ones(1, bool),
        candidate_ids=ids[:1],
        reference_ids=ids[:1],
        neighbours=10,
    )
    assert alone.tolist() == [0.5]


def test_share_weighted_order_is_random_at_tilt_zero_and_tilts_towards_unknown_regions():
    share = np.r_[np.full(50, 0.9), np.full(50, 0.1)]
    flat = share_weighted_order(share, tilt=0.0, seed=1)
    assert flat == share_weighted_order(np.full(100, 0.5), tilt=0.0, seed=1)  # shares ignored
    firsts_flat, firsts_tilted = [], []
    for seed in range(40):
        firsts_flat.append(
            np.mean(np.array(share_weighted_order(share, tilt=0.0, seed=seed)[:10]) < 50)
        )
        firsts_tilted.append(
            np.mean(np.array(share_weighted_order(share, tilt=1.0, seed=seed)[:10]) < 50)
        )
    assert 0.35 < np.mean(firsts_flat) < 0.65
    assert (
        np.mean(firsts_tilted) > 0.85
    )  # odds 9 vs 1/9: almost every early pick is from the first half
    tilted = share_weighted_order(share, tilt=1.0, seed=1)
    assert sorted(tilted) == list(range(100)) and tilted != flat


def test_neighbourhood_ranking_shares_random_idks_keys_and_records_the_share():
    features, idk, ik = _features(np.random.default_rng(7))
    cfg = SelectionConfig(strategy="neighbourhood", tilt=0.0)
    flat = rank_candidates("gradient", idk_rows=idk, ik_rows=ik, features=features, cfg=cfg, seed=2)
    rand = rank_candidates("random", idk_rows=idk, ik_rows=ik, features=None, cfg=cfg, seed=2)
    assert flat.order == rand.order  # common random numbers: the tilt is the only difference
    tilted = rank_candidates(
        "gradient",
        idk_rows=idk,
        ik_rows=ik,
        features=features,
        cfg=SelectionConfig(strategy="neighbourhood"),
        seed=2,
    )
    assert set(tilted.terms) >= {"unknown_share", "i_idk", "i_ik"}
    assert len(tilted.terms["unknown_share"]) == len(idk)


def test_share_apportions_picks_by_unknowns_minus_knowns_and_leaves_known_clusters_last():
    # cluster 0: 12 unknowns, 0 knowns (V 12); cluster 1: 6 unknowns, 2 knowns (V 4);
    # cluster 2: 2 unknowns, 10 knowns (V -8).
    cand = np.r_[np.zeros(12), np.ones(6), np.full(2, 2)].astype(int)
    known = np.r_[np.ones(2), np.full(10, 2)].astype(int)
    order, value = share_apportioned_order(cand, known, lam=1.0, seed=3)
    assert sorted(order) == list(range(20))
    assert value.tolist() == [12.0] * 12 + [4.0] * 6 + [-8.0] * 2
    first8 = cand[order[:8]]
    assert (first8 == 0).sum() == 6 and (first8 == 1).sum() == 2  # 12 : 4, as D'Hondt gives
    assert set(cand[order[-2:]]) == {2}  # the mostly-known cluster only after the others
    assert share_apportioned_order(cand, known, lam=1.0, seed=3)[0] == order
    assert share_apportioned_order(cand, known, lam=1.0, seed=4)[0] != order
    # λ = 0: picks in proportion to the unknowns, as random-idk in expectation.
    flat, _ = share_apportioned_order(cand, known, lam=0.0, seed=3)
    assert (cand[flat[:10]] == 0).sum() == 6 and (cand[flat[:10]] == 1).sum() == 3


def test_share_ranking_clusters_all_training_questions_and_skips_the_known_cluster():
    features, _, _ = _features(np.random.default_rng(5))  # three clusters of 6 rows
    idk = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12]  # cluster 0 all unknown, 1 half, 2 one of 6
    ik = [9, 10, 11, 13, 14, 15, 16, 17]
    r = rank_candidates(
        "gradient",
        idk_rows=idk,
        ik_rows=ik,
        features=features,
        cfg=SelectionConfig(strategy="share", clusters=3),
        seed=0,
    )
    assert sorted(r.order) == list(range(len(idk)))
    assert idk[r.order[-1]] == 12  # the lone unknown among knowns goes last
    assert {idk[i] for i in r.order[:3]} <= set(range(6))  # V 6 against V 0
    assert set(r.terms) >= {"cluster", "cluster_value", "i_idk"}
