import numpy as np
import pytest

from grait.selection import RowView, influence_terms, select_idk_samples


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_influence_terms_match_brute_force_means():
    rng = np.random.default_rng(0)
    pre, raw, ik, van = _unit(rng, 7, 16), _unit(rng, 7, 16), _unit(rng, 5, 16), _unit(rng, 3, 16)
    i_idk, i_ik, v = influence_terms(
        RowView(pre), RowView(raw), RowView(ik), RowView(van), block_rows=2
    )
    for x in range(7):
        others = [z for z in range(7) if z != x]
        assert i_idk[x] == pytest.approx(np.mean([pre[x] @ raw[z] for z in others]), abs=1e-6)
        assert i_ik[x] == pytest.approx(np.mean([pre[x] @ ik[z] for z in range(5)]), abs=1e-6)
        assert v[x] == pytest.approx(np.mean([pre[x] @ van[z] for z in range(3)]), abs=1e-6)


def test_selection_picks_the_candidate_with_the_best_score():
    # Candidate 2 points along the other unknowns and away from the knowns: best I_idk - I_ik.
    e = np.eye(4)
    idk = np.stack([e[1], e[2], e[0], e[0], e[0]])
    ik = np.stack([e[1], e[1]])
    van = np.zeros((0, 4))
    result = select_idk_samples(
        RowView(idk), RowView(idk), RowView(ik), RowView(van), 1, lam=1, mu=0
    )
    assert result.selected[0] in (2, 3, 4)
    assert result.score[result.selected[0]] == pytest.approx(result.i_idk[2] - result.i_ik[2])
    # Candidate 0 aligns with the known set: largest over-refusal term, never first.
    assert result.i_ik[0] == pytest.approx(1.0)
    assert result.selected[0] != 0


def test_mu_term_rewards_agreement_with_known_answers():
    e = np.eye(3)
    idk = np.stack([e[0], e[1]])
    van = np.stack([e[1]])
    empty = np.zeros((0, 3))
    no_mu = select_idk_samples(RowView(idk), RowView(idk), RowView(empty), RowView(van), 1, mu=0.0)
    with_mu = select_idk_samples(
        RowView(idk), RowView(idk), RowView(empty), RowView(van), 1, mu=1.0
    )
    assert no_mu.selected == [0]  # tie broken toward the earlier candidate
    assert with_mu.selected == [1]


def test_rho_penalises_redundant_picks():
    e = np.eye(3)
    idk = np.stack([e[0], e[0], 0.8 * e[0] + 0.6 * e[1]])
    empty = np.zeros((0, 3))
    plain = select_idk_samples(
        RowView(idk), RowView(idk), RowView(empty), RowView(empty), 2, rho=0.0
    )
    diverse = select_idk_samples(
        RowView(idk), RowView(idk), RowView(empty), RowView(empty), 2, rho=5.0
    )
    assert sorted(plain.selected) == [0, 1]
    assert diverse.selected[1] == 2
    assert diverse.redundancy[2] == pytest.approx(0.8)


def test_greedy_with_zero_rho_equals_top_n():
    rng = np.random.default_rng(1)
    idk, ik, van = _unit(rng, 50, 8), _unit(rng, 20, 8), _unit(rng, 10, 8)
    fast = select_idk_samples(RowView(idk), RowView(idk), RowView(ik), RowView(van), 10, rho=0.0)
    greedy = select_idk_samples(
        RowView(idk), RowView(idk), RowView(ik), RowView(van), 10, rho=1e-12
    )
    assert fast.selected == greedy.selected


def test_row_view_reads_memmapped_subsets_in_the_callers_order(tmp_path):
    data = np.arange(40, dtype=np.float16).reshape(10, 4)
    np.save(tmp_path / "m.npy", data)
    mm = np.load(tmp_path / "m.npy", mmap_mode="r")
    view = RowView(mm, [7, 2, 5])
    blocks = [b for _, b in view.blocks(2)]
    assert np.array_equal(np.concatenate(blocks), data[[7, 2, 5]].astype(np.float32))
