"""Loss-reduction split: f_p, f_c, r_p, r_c from dot_with_sum against the gradients themselves."""

import numpy as np
import pytest

from analysis import losssplit, sources
from analysis.synthetic import synthetic_run


def test_split_matches_group_sums_of_gradients():
    ds = synthetic_run(n_steps=5, n_train=16, n_test=4, n_coords=10, corrupt_fraction=0.4)
    train = np.flatnonzero(ds.split.values == "train")
    corrupt = ds.corrupt.values[train]
    d = sources.layer_dot_with_sum(ds).isel(example=train)
    out = losssplit.loss_split(d, corrupt).sel(layer=sources.MODEL).compute()
    x = ds.grad_coords.values[:, train].astype(np.float64)
    g_p, g_c = x[:, ~corrupt].sum(1), x[:, corrupt].sum(1)
    g = g_p + g_c
    gg = np.sum(g * g, 1)
    np.testing.assert_allclose(out.f_p, np.sum(g_p * g, 1) / gg)
    np.testing.assert_allclose(out.f_c, np.sum(g_c * g, 1) / gg)
    np.testing.assert_allclose(out.f_p + out.f_c, 1.0)
    np.testing.assert_allclose(out.r_p, np.cumsum(np.sum(g_p * g, 1)) / (~corrupt).sum())
    np.testing.assert_allclose(out.r_c, np.cumsum(np.sum(g_c * g, 1)) / corrupt.sum())
    assert int(out.n_p) + int(out.n_c) == train.size


def test_per_layer_split_sums_to_one():
    ds = synthetic_run(n_steps=3, n_train=12, n_test=0)
    out = losssplit.loss_split(sources.layer_dot_with_sum(ds), ds.corrupt.values).compute()
    np.testing.assert_allclose(out.f_p + out.f_c, 1.0)
    assert out.f_p.sizes["layer"] == 3


def test_no_corrupt_examples_gives_f_p_one():
    ds = synthetic_run(n_steps=2, n_train=8, n_test=0, corrupt_fraction=0.0)
    out = losssplit.loss_split(sources.layer_dot_with_sum(ds), ds.corrupt.values).compute()
    np.testing.assert_allclose(out.f_p, 1.0)
    assert np.isnan(out.r_c).all()
    assert out.f_c.values == pytest.approx(0.0)
