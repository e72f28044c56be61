"""Rates averaged over seeds, with paired bootstrap intervals over questions.

Every method answers the same questions under every seed, and the base model answers them
once. One bootstrap resample draws question indices with replacement and applies them to
every seed's outcomes and to the base model's (paired), so an interval holds both the
question sampling noise and the base model's own noise that THS divides by. Seeds are
averaged inside each resample: the interval is for the seed-averaged rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from grait.scoring import OUTCOMES

METRICS = ("P_c", "P_w", "P_r", "THS")


def _codes(outcomes: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(OUTCOMES)}
    return np.array([index[o] for o in outcomes], dtype=np.int8)


def _fractions(codes: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
    """codes [S, n] -> [3, n_boot] (or [3] without resampling), averaged over seeds."""
    picked = codes if idx is None else codes[:, idx]  # [S, n] or [S, n_boot, n]
    return np.stack([(picked == k).mean(axis=-1).mean(axis=0) for k in range(len(OUTCOMES))])


def _ths(frac: np.ndarray, base: np.ndarray) -> np.ndarray:
    c, w = frac[0], frac[1]
    c0, w0 = base[0], base[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(w0 > 0, c - w * c0 / np.where(w0 > 0, w0, 1.0), np.nan)


def summarise(
    per_seed: Sequence[Sequence[str]],
    base: Sequence[str],
    *,
    columns: Sequence[int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """{metric: {"value", "ci": [lo, hi] | None}} for P_c, P_w, P_r and THS (vs `base`).

    `columns` restricts to a subset of questions (e.g. the known facts of the testbed).
    """
    codes = np.stack([_codes(o) for o in per_seed])
    base_codes = _codes(base)[None, :]
    if columns is not None:
        cols = np.asarray(columns, dtype=np.int64)
        codes, base_codes = codes[:, cols], base_codes[:, cols]
    n = codes.shape[1]
    if n == 0:
        return {m: {"value": None, "ci": None} for m in METRICS} | {"n": 0, "seeds": len(per_seed)}
    point = _fractions(codes, None)
    base_point = _fractions(base_codes, None)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = _fractions(codes, idx)
    base_boot = _fractions(base_codes, idx)
    values = {"P_c": (point[0], boot[0]), "P_w": (point[1], boot[1]), "P_r": (point[2], boot[2])}
    values["THS"] = (float(_ths(point, base_point)), _ths(boot, base_boot))
    out: dict[str, Any] = {"n": int(n), "seeds": len(per_seed)}
    for name, (value, samples) in values.items():
        samples = samples[~np.isnan(samples)]
        value = None if value is None or np.isnan(value) else float(value)
        ci = (
            None
            if value is None or samples.size == 0
            else [float(q) for q in np.quantile(samples, [0.025, 0.975])]
        )
        out[name] = {"value": value, "ci": ci}
    out["THS_per_seed"] = [
        None if np.isnan(t) else float(t)
        for t in (float(_ths(_fractions(c[None], None), base_point)) for c in codes)
    ]
    return out


def cell(entry: dict[str, Any]) -> str:
    """`0.412 (0.350–0.470)` or `n/a`."""
    if entry.get("value") is None:
        return "n/a"
    text = f"{entry['value']:.3f}"
    if entry.get("ci"):
        text += f" ({entry['ci'][0]:.3f}–{entry['ci'][1]:.3f})"
    return text
