"""The one definition of each quantity (analysis.coherence) against independent NumPy computations.

Each quantity is computed here from explicit per-example gradients g_i (rows of a matrix) with
plain NumPy, in the paper's own form, and compared with the public function; the modules that use
the quantities (minibatch, pairwise, nulls, sources, report) are checked to go through them.
"""

from __future__ import annotations

import doctest

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import analysis.coherence as coh
from analysis import minibatch, nulls, pairwise, sources
from analysis.report import check_metrics, pairwise_source
from analysis.synthetic import synthetic_run
from gradstore.errors import AnalysisError, GradstoreError

RTOL = 1e-12


def _grads(m=7, d=5, seed=0, shift=0.7):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, d)) + shift  # a shared direction: alpha well inside (0, 1)


def _moments(g):
    total = g.sum(0)
    return float(total @ total), float((g * g).sum()), g.shape[0]


def _gram(g, *lead):
    """(…, example, example_) DataArray of g g^T, optionally with leading dims of size 1."""
    gram = g @ g.T
    dims = tuple(lead) + ("example", "example_")
    return xr.DataArray(gram.reshape((1,) * len(lead) + gram.shape), dims=dims)


def test_the_doc_examples_run():
    result = doctest.testmod(coh, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0


@pytest.mark.parametrize("seed", range(5))
def test_scalar_quantities_match_their_paper_forms(seed):
    g = _grads(seed=seed)
    m = g.shape[0]
    nss, sns, _ = _moments(g)
    mean = g.mean(0)
    alpha_means = (mean @ mean) / np.mean(np.sum(g * g, 1))        # ||E g||² / E||g||² (eq. 3)
    gram = g @ g.T
    off = gram.sum() - np.trace(gram)                               # Σ_{i≠j} g_i·g_j
    np.testing.assert_allclose(coh.alpha(nss, sns, m), alpha_means, rtol=RTOL)
    np.testing.assert_allclose(coh.m_coherence(nss, sns, m), gram.sum() / np.trace(gram), rtol=RTOL)
    np.testing.assert_allclose(coh.m_coherence(nss, sns, m), m * alpha_means, rtol=RTOL)
    np.testing.assert_allclose(coh.gradient_diversity(nss, sns, m), 1 / alpha_means, rtol=RTOL)
    np.testing.assert_allclose(coh.self_removed_m_coherence(nss, sns, m), off / np.trace(gram), rtol=RTOL)
    # the pairwise form: mean over pairs i ≠ j over the mean square; = (m-coherence − 1)/(m − 1)
    pa = coh.pairwise_alpha(off / (m * (m - 1)), np.trace(gram) / m)
    np.testing.assert_allclose(pa, (gram.sum() / np.trace(gram) - 1) / (m - 1), rtol=RTOL)


def test_limits_and_undefined_values():
    eye = np.eye(4)
    nss, sns, m = _moments(eye)                                     # orthogonal
    assert coh.alpha(nss, sns, m) == pytest.approx(1 / 4) and coh.m_coherence(nss, sns, m) == pytest.approx(1)
    nss, sns, m = _moments(np.ones((3, 2)))                         # identical
    assert coh.alpha(nss, sns, m) == pytest.approx(1) and coh.m_coherence(nss, sns, m) == pytest.approx(3)
    for f in (coh.alpha, coh.m_coherence, coh.gradient_diversity, coh.self_removed_m_coherence):
        assert np.isnan(f(0.0, 0.0, 3)), f.__name__                 # every g_i zero: undefined
    assert np.isnan(coh.pairwise_alpha(0.0, 0.0))


def test_gram_diagonal_is_the_diagonal_on_any_leading_dims_and_names():
    rng = np.random.default_rng(1)
    blocks = rng.standard_normal((2, 3, 4, 4))
    got = coh.gram_diagonal(xr.DataArray(blocks, dims=("step", "layer", "group", "group_")), "group")
    assert got.dims == ("step", "layer", "group")
    np.testing.assert_array_equal(got.values, np.diagonal(blocks, axis1=2, axis2=3))
    g = _grads()
    np.testing.assert_array_equal(coh.gram_diagonal(_gram(g)).values, np.diag(g @ g.T))
    np.testing.assert_allclose(coh.gram_diagonal(_gram(g)).values, np.sum(g * g, 1), rtol=RTOL)


def test_gram_moments_whole_and_weighted():
    g = _grads(m=6)
    nss, sns, m = coh.gram_moments(_gram(g, "step"))
    np.testing.assert_allclose([float(nss[0]), float(sns[0]), m], _moments(g), rtol=RTOL)
    masks = np.array([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]], float)
    nss, sns, m = coh.gram_moments(_gram(g, "step"), xr.DataArray(masks, dims=("permutation", "example")))
    for k, mask in enumerate(masks):
        expected = _moments(g[mask.astype(bool)])
        got = [float(nss.isel(permutation=k, step=0)), float(sns.isel(permutation=k, step=0)), float(m[k])]
        np.testing.assert_allclose(got, expected, rtol=RTOL)


def test_estimators_from_vectors():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 6))                              # (step, example, coord)
    layer_of = np.array([0, 0, 1, 1, 1, 0])
    onehot = xr.DataArray((layer_of[:, None] == np.arange(2)[None, :]).astype(float), dims=("coord", "layer"),
                          coords={"layer": ["a", "b"]})
    xa = xr.DataArray(x, dims=("step", "example", "coord"))
    mask = np.array([1, 1, 0, 1, 0], float)
    inner = lambda a, b: xr.dot(a * b, onehot, dim="coord")  # noqa: E731
    nss, sns, m = coh.estimated_moments(xa, xr.DataArray(mask, dims="example"), inner)
    gram = coh.estimated_gram(xa, "coord", layers=onehot)
    assert m == 3.0 and gram.dims[0] == "layer"
    for t in range(2):
        for j, name in enumerate(["a", "b"]):
            xl = x[t][:, layer_of == j]
            np.testing.assert_allclose(gram.sel(layer=name).isel(step=t).values, xl @ xl.T, rtol=RTOL)
            expected = _moments(xl[mask.astype(bool)])
            np.testing.assert_allclose([float(nss.isel(step=t).sel(layer=name)),
                                        float(sns.isel(step=t).sel(layer=name))], expected[:2], rtol=RTOL)
    proj = xr.DataArray(x, dims=("step", "example", "proj"))
    np.testing.assert_allclose(coh.estimated_gram(proj, "proj").values, np.einsum("sep,sfp->sef", x, x), rtol=RTOL)


def test_quantities_stay_lazy_on_dask():
    g = _grads()
    gram = _gram(g, "step").copy(data=da.from_array(_gram(g, "step").values))
    nss, sns, m = coh.gram_moments(gram)
    for value in (coh.alpha(nss, sns, m), coh.m_coherence(nss, sns, m), coh.gram_diagonal(gram)):
        assert value.chunks is not None
    np.testing.assert_allclose(coh.alpha(nss, sns, m).compute().values, [coh.alpha(*_moments(g))], rtol=RTOL)


def test_the_metrics_use_the_definitions():
    g = _grads(m=8, seed=3)
    gram = _gram(g, "step")
    nss, sns, m = _moments(g)
    out = minibatch.minibatch_coherence(gram, (1, 3), n_batches=4)
    np.testing.assert_allclose(out.alpha.values, [coh.alpha(nss, sns, m)], rtol=RTOL)
    labels = np.array(list("aabbabab"))
    groups = pairwise.group_coherence(gram, labels)
    stat = nulls.coherence_gap(gram)
    gap = stat(xr.DataArray((labels == "a")[None].astype(float), dims=("permutation", "example")))
    for name in ("a", "b"):
        sub = g[labels == name]
        ms, ss, ns = _moments(sub)
        np.testing.assert_allclose(groups.m_coherence.sel(group=name).values, [coh.m_coherence(ms, ss)], rtol=RTOL)
        gs = sub @ sub.T
        within = (gs.sum() - np.trace(gs)) / (ns * (ns - 1))
        np.testing.assert_allclose(groups.pairwise_alpha.sel(group=name, group_=name).values,
                                   [coh.pairwise_alpha(within, ss / ns)], rtol=RTOL)
    expected = coh.m_coherence(*_moments(g[labels == "a"])) - coh.m_coherence(*_moments(g[labels == "b"]))
    np.testing.assert_allclose(gap.values.ravel(), [expected], rtol=RTOL)
    cos = pairwise.cosines(gram).values[0]
    norms = np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(cos, (g @ g.T) / np.outer(norms, norms), rtol=RTOL)


def test_source_preference_is_one_order():
    ds = synthetic_run(n_steps=1, n_train=4, n_test=2, n_coords=8)
    assert sources.SOURCES == ("exact", "coords", "proj")
    assert sources.available_sources(ds, "gram") == ["exact", "coords", "proj"]
    assert sources.best_source(ds.drop_vars("gram"), "gram") == "coords" == pairwise_source(ds.drop_vars("gram"))
    only_proj = ds.drop_vars(["gram", "grad_coords", "norm_sq_of_sum"])
    assert sources.available_sources(only_proj, "norm_sq_of_sum") == ["proj"]
    assert sources.best_source(only_proj.drop_vars("grad_proj"), "dot_with_sum") == "exact"
    assert sources.best_source(only_proj.drop_vars(["grad_proj", "dot_with_sum"]), "dot_with_sum") is None


def test_unknown_metric_and_source_are_analysis_errors_on_one_line():
    with pytest.raises(AnalysisError, match="unknown metric") as err:
        check_metrics(["coherence", "vibes"])
    assert "\n" not in str(err.value) and isinstance(err.value, GradstoreError)
    with pytest.raises(AnalysisError, match="unknown source") as err:
        sources.check_source("bogus")
    assert "\n" not in str(err.value)


def test_synthetic_run_attributes_are_dicts_like_a_real_run():
    from gradstore.store import SAMPLES

    ds = synthetic_run(n_steps=1, n_train=3, n_test=1, n_coords=4, seed=5)
    assert ds.attrs["config"] == {"synthetic": True, "seed": 5}
    assert isinstance(ds.attrs["seeds"], dict) and isinstance(ds.attrs["model"], dict)
    assert tuple(ds.sample.values) == SAMPLES


def test_a_written_synthetic_store_has_dict_config_and_seeds_like_a_real_run(tmp_path):
    import xarray as xr

    from analysis.report import open_store
    from analysis.synthetic import write_synthetic_store

    store = write_synthetic_store(tmp_path / "run", synthetic_run(n_steps=1, n_train=3, n_test=1, n_coords=4, seed=5))
    for ds in (open_store(store), xr.open_zarr(store)):
        assert ds.attrs["config"] == {"synthetic": True, "seed": 5}
        assert ds.attrs["seeds"] == {"seed": 5}
