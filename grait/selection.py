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
