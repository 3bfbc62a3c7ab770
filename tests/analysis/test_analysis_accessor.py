"""``ds.gs``: agrees with the functions, on open_run stores and plain xarray.open_zarr Datasets, and
computes nothing before ``.compute()``; ``from analysis import analyze, open_store``."""

import dask
import numpy as np
import pytest
import xarray as xr

import analysis  # noqa: F401  (registers ds.gs)
from analysis import analyze, open_store
from analysis import coherence, losssplit, pairwise, sources
from analysis.synthetic import synthetic_run, write_synthetic_store
from gradstore.errors import AnalysisError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run"
    return write_synthetic_store(path, synthetic_run(n_steps=3, n_train=10, n_test=4, n_coords=16))


def test_accessor_agrees_with_the_functions(store):
    assert analysis.open_store is open_store and analysis.analyze is analyze
    run = open_store(store)
    mo = sources.layer_moments(run, "exact")
    np.testing.assert_allclose(run.gs.m_coherence(by="layer").values,
                               coherence.m_coherence(mo.norm_sq_of_sum, mo.sum_of_norm_sq).values)
    np.testing.assert_allclose(run.gs.alpha(by="model").values,
                               coherence.alpha(mo.norm_sq_of_sum, mo.sum_of_norm_sq, mo.m).sel(layer="(model)").values)
    train = np.flatnonzero(run.split.values == "train")
    d = sources.layer_dot_with_sum(run, "exact").isel(example=train)
    xr.testing.assert_allclose(run.gs.loss_split().compute(), losssplit.loss_split(d, run.corrupt.values[train]).compute())
    gram = sources.layer_gram(run, "exact", examples=train)
    xr.testing.assert_allclose(run.gs.stiffness().compute(),
                               pairwise.stiffness(gram, labels=run.true_label.values[train]).compute())
    xr.testing.assert_allclose(run.gs.confusion().compute(), pairwise.confusion(gram).compute())
    # an independent check of one number: m-coherence of the whole model from the stored gradients
    x = synthetic_run(n_steps=3, n_train=10, n_test=4, n_coords=16).grad_coords.values[:, :10].astype(np.float64)
    np.testing.assert_allclose(run.gs.m_coherence(by="model").sel(sample="tracked_train").values,
                               np.sum(x.sum(1) ** 2, 1) / np.sum(x**2, (1, 2)), rtol=1e-5)
    with pytest.raises(AnalysisError, match="by='example'"):
        run.gs.m_coherence(by="example")


def test_accessor_on_a_plain_open_zarr_matches_open_run(store):
    plain = xr.open_zarr(store)
    assert "step_crc32c" in plain and "stored" in plain.dims  # the integrity arrays are there ...
    run = open_store(store)
    assert "stored" not in plain.gs.run.dims  # ... and left out by the accessor
    xr.testing.assert_allclose(plain.gs.m_coherence().compute(), run.gs.m_coherence().compute())
    xr.testing.assert_allclose(plain.gs.loss_split().compute(), run.gs.loss_split().compute())
    xr.testing.assert_allclose(plain.gs.analyze(n_permutations=10).compute(), analyze(run, n_permutations=10).compute())


def _refuse(*args, **kwargs):
    raise RuntimeError("a dask computation ran before .compute()")


def test_nothing_is_computed_before_compute(store):
    plain = xr.open_zarr(store)
    plain.gs.run  # opening reads the small static metadata (labels, splits), nothing per step
    with dask.config.set(scheduler=_refuse):
        lazy = [plain.gs.m_coherence(), plain.gs.alpha(), plain.gs.loss_split(), plain.gs.stiffness(),
                plain.gs.confusion(), plain.gs.analyze(n_permutations=10, metrics=("coherence", "stiffness",
                                                                                    "confusion", "loss_split"))]
        with pytest.raises(RuntimeError, match="before .compute"):
            lazy[0].compute()
    assert all(obj.chunks for obj in lazy[:2])
    assert all(lazy[k][v].chunks for k in (2, 3, 4, 5) for v in lazy[k].data_vars if "step" in lazy[k][v].dims)
    assert np.isfinite(lazy[0].sel(sample="tracked_train").compute()).all()
