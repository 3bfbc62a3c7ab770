"""Coherence quantities: the paper's constructed examples, numpy oracles, exact vs estimated sources."""

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from analysis import sources
from analysis.coherence import alpha, coherence, gradient_diversity, m_coherence, self_removed_m_coherence
from analysis.synthetic import synthetic_run
from gradstore.errors import AnalysisError, StoreError


def _moments(g):
    return float(np.sum(g.sum(0) ** 2)), float(np.sum(g**2)), g.shape[0]


def test_import_analysis_never_imports_torch():
    code = ("import sys, importlib, pkgutil, analysis\n"
            "for m in pkgutil.iter_modules(analysis.__path__): importlib.import_module('analysis.' + m.name)\n"
            "import analysis.report, analysis.output\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pairwise_orthogonal_dataset_has_m_coherence_one():
    # the paper's 4-example dataset whose gradients are pairwise orthogonal
    g = np.diag([1.0, 2.0, 3.0, 0.5])
    nss, sns, m = _moments(g)
    assert m_coherence(nss, sns, m) == pytest.approx(1.0)
    assert alpha(nss, sns, m) == pytest.approx(1 / 4)
    assert self_removed_m_coherence(nss, sns, m) == pytest.approx(0.0, abs=1e-12)
    assert gradient_diversity(nss, sns, m) == pytest.approx(4.0)


@pytest.mark.parametrize("m,f", [(2, 0.0), (4, 0.5), (10, 0.3), (7, 1.0)])
def test_commonality_example_alpha(m, f):
    # each g_i = (sqrt(f) shared part) + (sqrt(1-f) own orthogonal part), unit norm, common fraction f
    g = np.zeros((m, m + 1))
    g[:, 0] = np.sqrt(f)
    g[np.arange(m), np.arange(1, m + 1)] = np.sqrt(1 - f)
    nss, sns, _ = _moments(g)
    assert alpha(nss, sns, m) == pytest.approx((1 + (m - 1) * f) / m)


def test_alpha_undefined_for_zero_gradients():
    assert np.isnan(alpha(0.0, 0.0, 3))
    da = xr.DataArray([0.0, 2.0])
    assert np.isnan(alpha(da, da, 2).values[0])


def test_exact_arithmetic_is_exact_and_zero_gradients_give_nan():
    from fractions import Fraction

    # Two gradients (1, 0) and (1, 1): ||Σg||² = 5, Σ||g||² = 3, alpha = 5/6 exactly.
    assert alpha(Fraction(5), Fraction(3), 2) == Fraction(5, 6)
    assert m_coherence(Fraction(5), Fraction(3), 2) == Fraction(5, 3)
    assert np.isnan(alpha(Fraction(0), Fraction(0), 3))
    assert np.isnan(m_coherence(0, 0, 3))


def test_coherence_dataset_matches_numpy_per_step_and_layer():
    ds = synthetic_run(n_steps=3, n_train=10, n_test=4, n_coords=12)
    result = coherence(sources.layer_moments(ds, "coords"), source="coords").compute()
    x = ds.grad_coords.values.astype(np.float64)
    layer_of = ds.coord_layer.values
    for t in range(3):
        for name in ("fc1", "fc2", sources.MODEL):
            cols = np.ones(12, bool) if name == sources.MODEL else layer_of == name
            g = x[t, :10][:, cols]
            nss, sns, m = _moments(g)
            got = result.sel(sample="tracked_train", layer=name).isel(step=t)
            assert float(got.alpha) == pytest.approx(nss / (m * sns))
            assert float(got.m_coherence) == pytest.approx(nss / sns)
            assert float(got.gradient_diversity) == pytest.approx(m * sns / nss)
            assert float(got.self_removed_m_coherence) == pytest.approx(nss / sns - 1)
    assert result.attrs["source"] == result.alpha.attrs["source"] == "coords"


def test_exact_and_coordinate_estimates_agree_when_all_coordinates_are_sampled():
    ds = synthetic_run(n_steps=3, n_train=10, n_test=5, n_coords=20)
    exact = coherence(sources.layer_moments(ds, "exact")).sel(sample=["tracked_train", "tracked_test"])
    est = coherence(sources.layer_moments(ds, "coords"), source="coords")
    xr.testing.assert_allclose(exact.drop_attrs(), est.drop_attrs())
    assert exact.attrs["source"] == "exact"
    # whole model = sum of the layers' additive moments
    mom = sources.layer_moments(ds, "exact").compute()
    np.testing.assert_allclose(mom.norm_sq_of_sum.sel(layer=sources.MODEL),
                               mom.norm_sq_of_sum.drop_sel(layer=sources.MODEL).sum("layer"))
    np.testing.assert_array_equal(mom.m.sel(layer=sources.MODEL), mom.m.sel(layer="fc1"))


def test_projection_estimate_is_close_for_many_projections():
    ds = synthetic_run(n_steps=2, n_train=30, n_test=2, n_coords=64, n_proj=2000, structure=2.0)
    exact = coherence(sources.layer_moments(ds, "exact")).alpha.sel(sample="tracked_train").compute()
    est = coherence(sources.layer_moments(ds, "proj")).alpha.sel(sample="tracked_train").compute()
    np.testing.assert_allclose(est, exact, rtol=0.1)


def test_missing_variables_are_store_errors_and_an_unknown_source_an_analysis_error():
    ds = synthetic_run(n_steps=2, gram=False, proj=False)
    with pytest.raises(StoreError, match="gram"):
        sources.layer_gram(ds, "exact")
    with pytest.raises(StoreError, match="grad_proj"):
        sources.layer_moments(ds, "proj")
    with pytest.raises(AnalysisError, match="unknown source"):
        sources.layer_moments(ds, "bogus")
