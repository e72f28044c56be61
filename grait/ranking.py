"""Order the unknown candidates once per method; a refusal budget of b takes the first b.

One ranking serves every budget (a trade-off curve, the `auto` operating point) and keeps
nested budgets comparable. Rankings:

- `gradient` (GRAIT), strategy `coverage` (default): greedy facility location on centred
  refusal features — cover the unknowns, charged λ for covering the knowns
  (`selection.facility_location_order`). Strategy `score`: the paper's linear score
  I_idk − λ·I_ik + μ·VAN − ρ·redundancy, greedy (`selection.select_idk_samples`).
  Strategy `neighbourhood`: a random order tilted towards candidates whose nearest training
  questions (by centred refusal feature) are mostly unknown (`selection.unknown_share`).
  Strategy `share`: spherical k-means clusters of every training question's feature; picks
  apportioned to clusters by unknowns − λ·knowns, random within a cluster
  (`selection.share_apportioned_order`).
- `stratified`: round robin over spherical k-means clusters of the same centred features.
- `certainty` / `correctness` (CRaFT, `grait.craft`): the unknowns its rehearsal did not
  make answerable, least certain (or least correct) first.
- `random`: a seeded uniform order (the `neighbourhood` keys at tilt 0).

Every gradient ranking also records the paper's influence terms per candidate, so users can
audit a pick and Stage 3 can weight it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from grait.config import SelectionConfig, WeightingConfig
from grait.craft import KnowledgeSignals, refusal_order
from grait.selection import (
    RowView,
    centre_features,
    default_cluster_count,
    facility_location_order,
    influence_terms,
    normalise_rows,
    reference_rows,
    select_idk_samples,
    share_apportioned_order,
    share_weighted_order,
    spherical_kmeans,
    stratified_random_order,
    unknown_share,
)
from grait.weighting import adaptive_weights


@dataclass(frozen=True)
class Features:
    """Stage 2 outputs for the training rows (float16 or float32, unit rows)."""

    idk_pre: np.ndarray  # [n_train, d] preconditioned refusal features
    idk_raw: np.ndarray  # [n_train, d] raw refusal features
    van_raw: np.ndarray  # [n_kept, d] raw answer features of the kept known samples


@dataclass(frozen=True)
class Ranking:
    """Candidates (positions in the idk list) in pick order, and per-candidate terms."""

    order: list[int]
    terms: dict[str, np.ndarray] = field(default_factory=dict)


def rank_candidates(
    kind: str,
    *,
    idk_rows: list[int],
    ik_rows: list[int],
    features: Features | None,
    cfg: SelectionConfig,
    seed: int,
    signals: KnowledgeSignals | None = None,
) -> Ranking:
    """The pick order of the unknowns for ranking `kind` (see the module docstring).

    Every ranking orders all candidates except CRaFT's, which leaves out the unknowns its
    rehearsal made more answerable (`signals`, from Stage 1 and the rehearsal).
    """
    n = len(idk_rows)
    if kind in ("certainty", "correctness"):
        if signals is None:
            raise ValueError(f"ranking {kind!r} needs Stage 1's knowledge signals")
        rows = list(idk_rows)
        terms = {
            "certainty": signals.certainty[rows].astype(float),
            "correctness": signals.correctness[rows].astype(float),
        }
        if signals.delta is not None:
            terms["delta"] = signals.delta[rows].astype(float)
        return Ranking(refusal_order(kind, rows, signals), terms)
    if kind == "random":
        # The neighbourhood strategy's keys at tilt 0: with the same seed, its order is this
        # one tilted (common random numbers make the paired comparison less noisy).
        return Ranking(share_weighted_order(np.full(n, 0.5), tilt=0.0, seed=seed))
    if features is None:
        raise ValueError(f"ranking {kind!r} needs gradient features")
    if n == 0:
        return Ranking([])
    raw = np.asarray(features.idk_raw, dtype=np.float32)
    pre = np.asarray(features.idk_pre, dtype=np.float32)
    cand_all = pre if cfg.candidate_features == "preconditioned" else raw
    if cfg.centre:
        # The shared direction: the mean refusal feature over all training rows (each side).
        ref_all = centre_features(raw, raw.mean(axis=0))
        cand_all = centre_features(cand_all, cand_all.mean(axis=0))
    else:
        ref_all = normalise_rows(raw)
    cand = cand_all[idk_rows]
    if kind == "stratified":
        k = cfg.clusters or default_cluster_count(n)
        labels = spherical_kmeans(cand, k, seed=seed)
        return Ranking(
            stratified_random_order(labels, seed=seed), {"cluster": labels.astype(float)}
        )
    if kind != "gradient":
        raise ValueError(f"unknown ranking {kind!r}")
    i_idk, i_ik, van = influence_terms(
        RowView(pre, idk_rows),
        RowView(raw, idk_rows),
        RowView(raw, ik_rows),
        RowView(np.asarray(features.van_raw, dtype=np.float32)),
        block_rows=cfg.block_rows,
    )
    terms = {"i_idk": i_idk, "i_ik": i_ik, "van": van}
    if cfg.strategy == "score":
        res = select_idk_samples(
            RowView(pre, idk_rows),
            RowView(raw, idk_rows),
            RowView(raw, ik_rows),
            RowView(np.asarray(features.van_raw, dtype=np.float32)),
            n,
            lam=cfg.lam,
            mu=cfg.mu,
            rho=cfg.rho,
            block_rows=cfg.block_rows,
        )
        return Ranking(res.selected, {**terms, "score": _at_pick(res.score, res.selected, n)})
    if cfg.strategy == "share":
        rows = np.asarray(sorted(set(idk_rows) | set(ik_rows)), dtype=np.int64)
        labels = spherical_kmeans(
            cand_all[rows], cfg.clusters or default_cluster_count(len(rows)), seed=seed
        )
        label_of = dict(zip(rows.tolist(), labels.tolist(), strict=True))
        cand_labels = np.array([label_of[r] for r in idk_rows], dtype=np.int64)
        known_labels = np.array([label_of[r] for r in ik_rows], dtype=np.int64)
        order, value = share_apportioned_order(cand_labels, known_labels, lam=cfg.lam, seed=seed)
        return Ranking(
            order, {**terms, "cluster": cand_labels.astype(float), "cluster_value": value}
        )
    if cfg.strategy == "neighbourhood":
        rows = np.asarray(sorted(set(idk_rows) | set(ik_rows)), dtype=np.int64)
        rows = rows[reference_rows(len(rows), cfg.max_references, seed + 2)]
        share = unknown_share(
            cand,
            cand_all[rows],
            np.isin(rows, idk_rows),
            candidate_ids=np.asarray(idk_rows, dtype=np.int64),
            reference_ids=rows,
            neighbours=cfg.neighbours,
        )
        order = share_weighted_order(share, tilt=cfg.tilt, seed=seed)
        return Ranking(order, {**terms, "unknown_share": share})
    idk_refs = ref_all[idk_rows][reference_rows(n, cfg.max_references, seed)]
    ik_sel = np.asarray(ik_rows, dtype=np.int64)
    ik_refs = ref_all[ik_sel[reference_rows(len(ik_sel), cfg.max_references, seed + 1)]]
    cov = facility_location_order(cand, idk_refs, ik_refs, lam=cfg.lam)
    gain = np.full(n, np.nan)
    gain[cov.order] = cov.gain
    return Ranking(cov.order, {**terms, "gain": gain})


def _at_pick(values: np.ndarray, order: list[int], n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    out[order] = np.asarray(values)[order]
    return out


def refusal_weights(
    ranking: Ranking, picked: list[int], cfg: WeightingConfig, *, weighted: bool
) -> np.ndarray:
    """Stage 3 weights of the picked candidates (ones for unweighted methods).

    With `temperature_scale: relative` the temperature is T_rel·std(α) over all candidates, so
    the weights spread the same whatever the scale of the influence terms (an absolute
    T = 0.05 left them at 1 ± 0.1 on the testbed: quality-study.md).
    """
    if not weighted or not picked or "i_idk" not in ranking.terms:
        return np.ones(len(picked))
    i_idk, i_ik = ranking.terms["i_idk"], ranking.terms["i_ik"]
    temperature = cfg.temperature
    if cfg.temperature_scale == "relative":
        spread = float(np.std(i_ik - i_idk))
        temperature = cfg.relative_temperature * spread if spread > 0 else cfg.temperature
    return adaptive_weights(
        i_idk[picked], i_ik[picked], temperature=temperature, w_min=cfg.w_min, w_max=cfg.w_max
    )
