"""Easy vs hard from the correct history, and minibatch amplification (Corollary 3.1)."""

import numpy as np
import pytest
import xarray as xr

from analysis import hardness, minibatch
from gradstore.errors import GradstoreError


def _correct(table, steps=None):
    table = np.asarray(table, bool)
    steps = np.arange(table.shape[0]) * 5 if steps is None else steps
    return xr.DataArray(table, dims=("step", "example"), coords={"step": steps}).chunk({"step": 2})


def test_learned_step_first_step_staying_correct():
    c = _correct([[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(hardness.learned_step(c).values, [5, 10, 0, 15])
    np.testing.assert_array_equal(hardness.learned_step(c, permanently=False).values, [5, 0, 0, 15])
    never = _correct([[1, 0], [0, 0]])
    assert np.isnan(hardness.learned_step(never).values).all()


def test_easy_mask_rules():
    c = _correct([[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(hardness.easy_mask(c, at=5).values, [True, False, True, False])
    np.testing.assert_array_equal(hardness.easy_mask(c, at=5, rule="snapshot").values, [True, False, True, False])
    np.testing.assert_array_equal(hardness.easy_mask(c, at=0, rule="snapshot").values, [False, True, True, False])
    with pytest.raises(GradstoreError, match="not captured"):
        hardness.easy_mask(c, at=7)
    with pytest.raises(GradstoreError, match="rule"):
        hardness.easy_mask(c, at=5, rule="median")


def test_easy_hard_groups():
    g = np.array([[1.0, 0], [1, 0.1], [0, 1], [0, -1]])
    gram = xr.DataArray((g @ g.T)[None], dims=("step", "example", "example_"))
    out = hardness.easy_hard(gram, [True, True, False, False]).isel(step=0).compute()
    assert float(out.m_coherence.sel(group="hard")) == pytest.approx(0.0)
    assert float(out.sign_stiffness.sel(group="easy", group_="easy")) == 1.0
    assert float(out.sign_stiffness.sel(group="hard", group_="hard")) == -1.0
    assert float(out.pairwise_alpha.sel(group="easy", group_="hard")) == pytest.approx(
        np.mean([g[i] @ g[j] for i in (0, 1) for j in (2, 3)]) / np.mean(np.sum(g**2, 1)))


def test_predicted_amplification_formula():
    assert minibatch.predicted_alpha_k(0.25, 1) == 0.25
    assert minibatch.predicted_alpha_k(1.0, 7) == 1.0
    assert minibatch.predicted_alpha_k(0.1, 10) == pytest.approx(1 / 1.9)


def test_measured_minibatch_alpha_matches_corollary():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((40, 30)) + 0.3
    gram = xr.DataArray((g @ g.T)[None], dims=("step", "example", "example_"))
    out = minibatch.minibatch_coherence(gram, (1, 4, 16), n_batches=4000, seed=1).isel(step=0).compute()
    a = np.sum(g.sum(0) ** 2) / (40 * np.sum(g**2))
    assert float(out.alpha) == pytest.approx(a)
    np.testing.assert_allclose(out.alpha_k_predicted, [minibatch.predicted_alpha_k(a, k) for k in (1, 4, 16)])
    np.testing.assert_allclose(out.alpha_k_measured, out.alpha_k_predicted, rtol=0.08)
    # measured directly from the minibatch gradients themselves
    w = minibatch.batch_counts(40, 4, 4000, seed=1)  # the draws minibatch_coherence makes
    h = w @ g
    cross = (np.sum(h.sum(0) ** 2) - np.sum(h**2)) / (4000 * 3999)
    direct = minibatch.minibatch_coherence(gram, (4,), n_batches=4000, seed=1).alpha_k_measured.values
    assert cross / np.mean(np.sum(h**2, 1)) == pytest.approx(float(direct[0, 0]))


def test_batch_counts():
    w = minibatch.batch_counts(10, 3, 50, seed=0, replace=False)
    assert w.shape == (50, 10) and (w.sum(1) == 3).all() and w.max() == 1
    with pytest.raises(GradstoreError, match="impossible"):
        minibatch.batch_counts(2, 3, 5, replace=False)
