import numpy as np
import pytest

from grait.weighting import adaptive_weights


def test_weights_follow_the_softmax_formula_and_average_one():
    i_idk = np.array([0.30, 0.20, 0.25])
    i_ik = np.array([0.10, 0.15, 0.20])
    w = adaptive_weights(i_idk, i_ik, temperature=0.5, w_min=0.0, w_max=100.0)
    alpha = i_ik - i_idk
    expected = 3 * np.exp(-alpha / 0.5) / np.exp(-alpha / 0.5).sum()
    assert w == pytest.approx(expected)
    assert w.mean() == pytest.approx(1.0)


def test_safer_samples_get_larger_weights():
    w = adaptive_weights(
        np.array([0.5, 0.1]), np.array([0.0, 0.4]), temperature=1.0, w_min=0.0, w_max=10
    )
    assert w[0] > w[1]


def test_weights_are_clipped():
    i_idk = np.array([1.0] + [0.0] * 9)
    i_ik = np.array([0.0] + [1.0] * 9)
    w = adaptive_weights(i_idk, i_ik, temperature=0.05)
    assert w.max() == pytest.approx(5.0)
    assert w.min() == pytest.approx(0.1)


def test_equal_influence_gives_unit_weights():
    w = adaptive_weights(np.full(4, 0.2), np.full(4, 0.1))
    assert w == pytest.approx(np.ones(4))
