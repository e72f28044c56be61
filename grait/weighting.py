"""Stage 3 — adaptive weights for the selected refusal samples.

grait.md, "Stage 3": alpha(x) = I_ik(x) - I_idk(x) (over-refusal risk minus refusal benefit),
w(x) = N * softmax(-alpha(x) / T) over the N selected samples (mean weight 1), clipped to
[w_min, w_max] for stability. Known samples keep weight 1.
"""

from __future__ import annotations

import numpy as np


def adaptive_weights(
    i_idk: np.ndarray,
    i_ik: np.ndarray,
    *,
    temperature: float = 0.05,
    w_min: float = 0.1,
    w_max: float = 5.0,
) -> np.ndarray:
    """Loss weights for the selected idk samples; lower alpha (safer sample) -> larger weight."""
    alpha = np.asarray(i_ik, dtype=np.float64) - np.asarray(i_idk, dtype=np.float64)
    if alpha.size == 0:
        return alpha
    z = -alpha / temperature
    z -= z.max()
    soft = np.exp(z) / np.exp(z).sum()
    return np.clip(alpha.size * soft, w_min, w_max)
