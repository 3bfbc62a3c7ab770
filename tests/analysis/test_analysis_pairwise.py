"""Stiffness, gradient confusion and group coherence against direct loops over pairs."""

import numpy as np
import pytest
import xarray as xr

from analysis import pairwise


def _gram(g):
    gram = g @ g.T
    return xr.DataArray(gram[None], dims=("step", "example", "example_"))


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((9, 5)) + np.array([0.8, 0, 0, 0, 0])
    labels = rng.integers(0, 3, 9)
    labels[:3] = [0, 1, 2]
    return g, labels


def _cos(a, b):
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_stiffness_overall_and_class_matrices_match_loops(data):
    g, labels = data
    out = pairwise.stiffness(_gram(g), labels=labels).isel(step=0).compute()
    pairs = [(i, j) for i in range(9) for j in range(9) if i != j]
    assert float(out.sign_stiffness) == pytest.approx(np.mean([np.sign(g[i] @ g[j]) for i, j in pairs]))
    assert float(out.cosine_stiffness) == pytest.approx(np.mean([_cos(g[i], g[j]) for i, j in pairs]))
    for a in range(3):
        for b in range(3):
            sel = [(i, j) for i, j in pairs if labels[i] == a and labels[j] == b]
            expect_sign = np.mean([np.sign(g[i] @ g[j]) for i, j in sel]) if sel else np.nan
            expect_cos = np.mean([_cos(g[i], g[j]) for i, j in sel]) if sel else np.nan
            np.testing.assert_allclose(out.sign_stiffness_class.sel({"class": a, "class_": b}), expect_sign)
            np.testing.assert_allclose(out.cosine_stiffness_class.sel({"class": a, "class_": b}), expect_cos)


def test_identical_gradients_are_fully_stiff():
    g = np.tile([1.0, -2.0, 0.5], (4, 1))
    out = pairwise.stiffness(_gram(g)).isel(step=0).compute()
    assert float(out.sign_stiffness) == pytest.approx(1.0)
    assert float(out.cosine_stiffness) == pytest.approx(1.0)


def test_confusion_matches_pairs_i_less_than_j(data):
    g, _ = data
    out = pairwise.confusion(_gram(g).chunk()).isel(step=0).compute()
    cos = np.array([_cos(g[i], g[j]) for i in range(9) for j in range(i + 1, 9)])
    assert float(out.min_cosine) == pytest.approx(cos.min())
    assert float(out.median_cosine) == pytest.approx(np.median(cos))
    assert float(out.p05_cosine) == pytest.approx(np.quantile(cos, 0.05))
    assert float(out.fraction_negative) == pytest.approx((cos < 0).mean())


def test_orthogonal_gradients_have_zero_cosines():
    out = pairwise.confusion(_gram(np.eye(4))).isel(step=0).compute()
    assert float(out.min_cosine) == 0.0 and float(out.fraction_negative) == 0.0


def test_group_coherence_matches_direct_sums(data):
    g, labels = data
    out = pairwise.group_coherence(_gram(g), labels).isel(step=0).compute()
    for a in range(3):
        ga = g[labels == a]
        assert float(out.m_coherence.sel(group=a)) == pytest.approx(np.sum(ga.sum(0) ** 2) / np.sum(ga**2))
        for b in range(3):
            gb = g[labels == b]
            dots = [g[i] @ g[j] for i in range(9) for j in range(9)
                    if i != j and labels[i] == a and labels[j] == b]
            both = g[(labels == a) | (labels == b)]
            expect = np.mean(dots) / np.mean(np.sum(both**2, 1))
            assert float(out.pairwise_alpha.sel(group=a, group_=b)) == pytest.approx(expect)
        # within a group the pairwise alpha is (m-coherence - 1) / (m - 1)
        m = len(ga)
        assert float(out.pairwise_alpha.sel(group=a, group_=a)) == pytest.approx(
            (float(out.m_coherence.sel(group=a)) - 1) / (m - 1))


def test_pairwise_metrics_from_coordinates_equal_the_exact_gram():
    from analysis import sources
    from analysis.synthetic import synthetic_run

    ds = synthetic_run(n_steps=3, n_train=12, n_test=3, n_coords=20)
    train = ds.split.values == "train"
    labels = ds.true_label.values[train]
    exact = pairwise.stiffness(sources.layer_gram(ds, "exact", examples=train), labels=labels)
    coords = pairwise.stiffness(sources.layer_gram(ds, "coords", examples=train), labels=labels)
    xr.testing.assert_allclose(exact.compute(), coords.compute())
    proj = pairwise.confusion(sources.layer_gram(ds, "proj", examples=train)).compute()
    assert proj.min_cosine.dims == ("step", "layer") and np.isfinite(proj.min_cosine).all()
