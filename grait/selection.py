"""Stage 2c — gradient-driven selection of the unknown (idk) samples to train as refusals.

grait.md, "Selection": greedily build S of size n_idk, each step taking the candidate x with
  score(x) = I_idk(x) - lam*I_ik(x) + mu*VAN(x) - rho*max_{s in S} <G(x), G(s)>
where G(x) is x's preconditioned refusal feature, I_idk / I_ik its mean inner product with
the raw refusal features of the other unknown / the known samples, and VAN its mean inner
product with the raw answer features of the kept known samples.

A mean of inner products is the inner product with the mean, so the first three terms cost
one streamed pass over the candidates; only rho > 0 needs a pass per pick. Matrices are read
in row blocks, so float16 memmaps larger than RAM work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


class RowView:
    """A subset of a (possibly memory-mapped) matrix's rows, read in float32 blocks."""

    def __init__(self, matrix: np.ndarray, rows: Sequence[int] | None = None):
        self.matrix = matrix
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return self.matrix.shape[0] if self.rows is None else len(self.rows)

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def blocks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self), size):
            if self.rows is None:
                block = self.matrix[start : start + size]
            else:
                block = self.matrix[np.sort(self.rows[start : start + size])]
                # Restore the caller's order inside the block after the sorted (fast) read.
                order = np.argsort(np.argsort(self.rows[start : start + size]))
                block = block[order]
            yield start, np.asarray(block, dtype=np.float32)

    def row(self, i: int) -> np.ndarray:
        r = i if self.rows is None else int(self.rows[i])
        return np.asarray(self.matrix[r], dtype=np.float32)


def mean_row(view: RowView, block_rows: int) -> np.ndarray:
    """Mean of the rows, accumulated in float64 block by block."""
    total = np.zeros(view.dim, dtype=np.float64)
    for _, block in view.blocks(block_rows):
        total += block.sum(axis=0, dtype=np.float64)
    return total / max(1, len(view))


def row_dots(a: RowView, b: RowView, block_rows: int) -> np.ndarray:
    """<a_i, b_i> for paired rows (used to take each sample out of its own mean)."""
    out = np.empty(len(a), dtype=np.float64)
    for (start, ab), (_, bb) in zip(a.blocks(block_rows), b.blocks(block_rows)):
        out[start : start + len(ab)] = np.einsum("ij,ij->i", ab, bb, dtype=np.float64)
    return out


def matvecs(view: RowView, vectors: np.ndarray, block_rows: int) -> np.ndarray:
    """view @ vectors.T, streamed: [len(view), k]."""
    vecs = np.asarray(vectors, dtype=np.float32).reshape(-1, view.dim)
    out = np.empty((len(view), vecs.shape[0]), dtype=np.float64)
    for start, block in view.blocks(block_rows):
        out[start : start + len(block)] = block @ vecs.T
    return out


@dataclass(frozen=True)
class SelectionResult:
    """Chosen candidates (positions in the candidate list, in pick order) and every score term."""

    selected: list[int]
    i_idk: np.ndarray
    i_ik: np.ndarray
    van: np.ndarray
    redundancy: np.ndarray  # max similarity to earlier picks, at the time each was picked
    score: np.ndarray  # score at the time of picking (NaN for candidates never picked)


def influence_terms(
    idk_pre: RowView,
    idk_raw: RowView,
    ik_raw: RowView,
    van_raw: RowView,
    *,
    block_rows: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """I_idk (excluding the sample itself), I_ik and VAN for every idk candidate.

    `idk_pre` and `idk_raw` hold the same samples in the same order (candidates = idk set).
    """
    if len(idk_pre) != len(idk_raw):
        raise ValueError("idk_pre and idk_raw must list the same samples")
    n_idk = len(idk_raw)
    refs = [mean_row(idk_raw, block_rows)]
    refs.append(mean_row(ik_raw, block_rows) if len(ik_raw) else np.zeros(idk_pre.dim))
    refs.append(mean_row(van_raw, block_rows) if len(van_raw) else np.zeros(idk_pre.dim))
    dots = matvecs(idk_pre, np.stack(refs), block_rows)
    if n_idk > 1:
        own = row_dots(idk_pre, idk_raw, block_rows)
        i_idk = (dots[:, 0] * n_idk - own) / (n_idk - 1)
    else:
        i_idk = np.zeros(n_idk)
    return i_idk, dots[:, 1], dots[:, 2]


def select_idk_samples(
    idk_pre: RowView,
    idk_raw: RowView,
    ik_raw: RowView,
    van_raw: RowView,
    n_select: int,
    *,
    lam: float = 1.0,
    mu: float = 1.0,
    rho: float = 0.0,
    block_rows: int = 4096,
) -> SelectionResult:
    """Greedy selection per grait.md; with rho = 0 it is exactly a top-n by score."""
    n = len(idk_pre)
    n_select = min(n_select, n)
    i_idk, i_ik, van = influence_terms(idk_pre, idk_raw, ik_raw, van_raw, block_rows=block_rows)
    base = i_idk - lam * i_ik + mu * van
    redundancy = np.zeros(n)
    score = np.full(n, np.nan)
    if rho == 0.0:
        # Ties break toward the earlier candidate, as the greedy loop's argmax would.
        order = np.lexsort((np.arange(n), -base))[:n_select]
        score[order] = base[order]
        return SelectionResult([int(i) for i in order], i_idk, i_ik, van, redundancy, score)
    max_sim = np.zeros(n)  # max over an empty S is taken as 0
    available = np.ones(n, dtype=bool)
    picked: list[int] = []
    for _ in range(n_select):
        current = np.where(available, base - rho * max_sim, -np.inf)
        best = int(np.argmax(current))
        picked.append(best)
        score[best] = current[best]
        redundancy[best] = max_sim[best]
        available[best] = False
        sims = matvecs(idk_pre, idk_pre.row(best), block_rows)[:, 0]
        max_sim = sims if len(picked) == 1 else np.maximum(max_sim, sims)
    return SelectionResult(picked, i_idk, i_ik, van, redundancy, score)


# ---- coverage-aware selection -----------------------------------------------------------------
#
# quality-study.md: a top-n of a linear score over template-clustered features picks the best
# cluster, and refusal is learned per template, so a top-n covers one template. The functions
# below return a full *order* of the candidates (a budget of b takes the first b), so one
# ranking serves every budget of a trade-off curve and nested budgets stay comparable.


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def centre_features(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Subtract the shared direction (e.g. the mean refusal feature) and renormalise.

    Refusal gradients share the " I don't know." target, so raw cosines are dominated by one
    common component; what distinguishes samples is what remains after removing it.
    """
    return normalise_rows(np.asarray(x, dtype=np.float32) - np.asarray(mean, dtype=np.float32))


def reference_rows(n: int, cap: int, seed: int) -> np.ndarray:
    """All rows when n <= cap, else a seeded sample of `cap` rows (keeps the kernel n x cap)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


@dataclass(frozen=True)
class CoverageResult:
    """A full order of the candidates and each pick's marginal gain (unknowns, knowns)."""

    order: list[int]
    gain: np.ndarray  # net gain at the time of the pick, in pick order
    idk_gain: np.ndarray
    ik_gain: np.ndarray


def facility_location_order(
    candidates: np.ndarray,
    idk_refs: np.ndarray,
    ik_refs: np.ndarray,
    *,
    lam: float = 1.0,
) -> CoverageResult:
    """Greedy order maximising mean_z∈idk max_s k(s,z) − λ·mean_z∈ik max_s k(s,z).

    k(x,z) = max(0, cos(x,z)) on (centred) features. A pick covers the unknowns its refusal
    gradient resembles (it will spread refusal to them, O1) and is charged for the knowns it
    resembles (over-refusal, O2); once a region is covered, more picks there gain nothing, so
    the picks spread over the candidates instead of stacking in one cluster. Every candidate
    is ordered; gains may turn negative late in the order, which the caller may read as
    "refusing more costs more than it covers".
    """
    cand = np.asarray(candidates, dtype=np.float32)
    k_idk = np.maximum(cand @ np.asarray(idk_refs, dtype=np.float32).T, 0.0)
    k_ik = np.maximum(cand @ np.asarray(ik_refs, dtype=np.float32).T, 0.0)
    cover_idk = np.zeros(k_idk.shape[1], dtype=np.float32)
    cover_ik = np.zeros(k_ik.shape[1], dtype=np.float32)
    available = np.ones(len(cand), dtype=bool)
    none = np.zeros(len(cand), dtype=np.float32)
    order: list[int] = []
    gains, idk_gains, ik_gains = [], [], []
    for _ in range(len(cand)):
        g_idk = np.maximum(k_idk - cover_idk, 0.0).mean(axis=1) if k_idk.shape[1] else none
        g_ik = np.maximum(k_ik - cover_ik, 0.0).mean(axis=1) if k_ik.shape[1] else none
        net = np.where(available, g_idk - lam * g_ik, -np.inf)
        best = int(np.argmax(net))  # ties -> earliest candidate
        order.append(best)
        gains.append(float(net[best]))
        idk_gains.append(float(g_idk[best]))
        ik_gains.append(float(g_ik[best]))
        available[best] = False
        if k_idk.shape[1]:
            cover_idk = np.maximum(cover_idk, k_idk[best])
        if k_ik.shape[1]:
            cover_ik = np.maximum(cover_ik, k_ik[best])
    return CoverageResult(order, np.array(gains), np.array(idk_gains), np.array(ik_gains))


def unknown_share(
    candidates: np.ndarray,
    references: np.ndarray,
    reference_is_idk: np.ndarray,
    *,
    candidate_ids: np.ndarray,
    reference_ids: np.ndarray,
    neighbours: int,
) -> np.ndarray:
    """Per candidate: the smoothed share of unknowns among its nearest training questions.

    A refusal trained on one question spreads to the questions whose refusal gradients
    resemble it (O1), known ones included (O2). The unknown share of that neighbourhood is the
    precision such a refusal can hope for; add-one smoothing keeps a thin neighbourhood near
    1/2. The candidate itself (same id) is not its own neighbour.
    """
    cand = np.asarray(candidates, dtype=np.float32)
    refs = np.asarray(references, dtype=np.float32)
    is_idk = np.asarray(reference_is_idk, dtype=bool)
    m = max(1, min(neighbours, len(refs) - 1)) if len(refs) > 1 else 0
    share = np.full(len(cand), 0.5)
    if m == 0:
        return share
    for start in range(0, len(cand), 1024):
        sims = cand[start : start + 1024] @ refs.T
        own = np.asarray(candidate_ids[start : start + 1024])[:, None] == reference_ids[None, :]
        sims[own] = -np.inf
        nearest = np.argpartition(-sims, m - 1, axis=1)[:, :m]
        share[start : start + len(sims)] = (is_idk[nearest].sum(axis=1) + 1.0) / (m + 2.0)
    return share


def share_weighted_order(share: np.ndarray, *, tilt: float, seed: int) -> list[int]:
    """A random order that favours candidates in mostly-unknown neighbourhoods.

    Weighted sampling without replacement (Efraimidis-Spirakis keys log(U)/w) with weight
    w = (share / (1 − share))^tilt: tilt 0 is a uniform random order (random-idk), larger
    tilts move the picks towards regions where a refusal mostly hits unknowns. It stays a
    random sample, so the picks keep random-idk's spread over the candidates: deterministic
    top-n rankings stack in one cluster, and refusal generalises per cluster.
    """
    share = np.clip(np.asarray(share, dtype=np.float64), 1e-6, 1 - 1e-6)
    log_w = tilt * (np.log(share) - np.log1p(-share))
    u = np.random.default_rng(seed).random(len(share))
    keys = np.log(np.maximum(u, 1e-300)) * np.exp(-log_w)
    return [int(i) for i in np.argsort(-keys, kind="stable")]


def spherical_kmeans(x: np.ndarray, k: int, *, seed: int, iterations: int = 50) -> np.ndarray:
    """Cluster labels of unit rows by cosine (k-means++ start); small and dependency-free."""
    x = normalise_rows(np.asarray(x, dtype=np.float32))
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        dist = np.clip(1.0 - np.max(x @ np.stack(centres).T, axis=1), 0.0, None)
        total = dist.sum()
        pick = rng.integers(n) if total <= 0 else rng.choice(n, p=dist / total)
        centres.append(x[pick])
    c = np.stack(centres)
    labels = np.zeros(n, dtype=np.int64)
    for step in range(iterations):
        new = np.argmax(x @ c.T, axis=1)
        if step and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = normalise_rows(members.sum(axis=0, keepdims=True))[0]
    return labels


def stratified_random_order(labels: np.ndarray, *, seed: int) -> list[int]:
    """Round robin over clusters (random order within each): any prefix takes equal counts.

    The baseline a gradient method has to beat once coverage is the point: it uses the same
    features, but no influence scores and no labels a user lacks.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    clusters = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    rng.shuffle(clusters)
    order: list[int] = []
    while any(clusters):
        for members in clusters:
            if members:
                order.append(int(members.pop()))
    return order


def share_apportioned_order(
    candidate_labels: np.ndarray,
    known_labels: np.ndarray,
    *,
    lam: float,
    seed: int,
) -> tuple[list[int], np.ndarray]:
    """Picks apportioned to clusters by their unknowns minus λ·their knowns; the order and
    each candidate's cluster value.

    Refusal spreads to a whole cluster (topic, template) of similar questions, known ones
    included (quality-study.md). A cluster's value V = U − λ·K (U its unknown candidates,
    K its known training questions) is what refusing all of it gains. Random-idk gives each
    cluster picks in proportion to U; here the next pick goes to the cluster with the largest
    V / (its picks + 1) (D'Hondt), so picks are proportional to V and a mostly-known cluster
    (V ≤ 0) gets none until every positive cluster is exhausted; those come last, highest
    unknown share first. Within a cluster the order is random, as random-idk's. It uses
    Stage 1's split and the features' clusters only: no labels a user lacks.
    """
    rng = np.random.default_rng(seed)
    cand = np.asarray(candidate_labels, dtype=np.int64)
    known = np.asarray(known_labels, dtype=np.int64)
    clusters = np.unique(np.concatenate([cand, known]))
    members = {int(c): list(rng.permutation(np.flatnonzero(cand == c))) for c in clusters}
    unknowns = {c: len(m) for c, m in members.items()}
    knowns = {int(c): int((known == c).sum()) for c in clusters}
    value = {c: unknowns[c] - lam * knowns[c] for c in members}
    tie = {c: rng.random() for c in members}
    picks = dict.fromkeys(members, 0)
    order: list[int] = []
    positive = [c for c in members if value[c] > 0 and members[c]]
    while positive:
        best = max(positive, key=lambda c: (value[c] / (picks[c] + 1), tie[c]))
        order.append(int(members[best].pop()))
        picks[best] += 1
        if not members[best]:
            positive.remove(best)
    rest = sorted(
        (c for c in members if members[c]),
        key=lambda c: (-unknowns[c] / max(unknowns[c] + knowns[c], 1), tie[c]),
    )
    for c in rest:
        order.extend(int(i) for i in reversed(members[c]))
    per_candidate = np.array([value[int(c)] for c in cand], dtype=np.float64)
    return order, per_candidate


def default_cluster_count(n_candidates: int) -> int:
    """About √(n/2) clusters: a rule of thumb that needs no knowledge of the data's topics."""
    return max(1, round((n_candidates / 2) ** 0.5))
