"""Weights-only per-layer m-coherence (issue 15) from the per-parameter moments, against
||Σ g_W||² / Σ ||g_W||² computed directly from per-example weight gradients; a store written
before the per-parameter moments analyses cleanly, with a note."""

import json

import dask
import numpy as np
import pytest
import xarray as xr

import analysis  # noqa: F401  (registers ds.gs)
from analysis.output import write_results
from analysis.report import analyze
from gradstore.errors import AnalysisError, StoreError
from gradstore.store import RunLayout, create_run, open_run

PARAMS = (("fc1.weight", (3, 4), "fc1"), ("fc1.bias", (3,), "fc1"), ("norm.weight", (3,), "norm"),
          ("norm.bias", (3,), "norm"), ("fc2.weight", (2, 3), "fc2"), ("fc2.bias", (2,), "fc2"))
LAYERS = ("fc1", "norm", "fc2")
N_TRAIN, N_TEST, STEPS = 5, 2, 2


def _gradients(seed):
    """Per-example gradients {param: (example, *shape)} of every step; a shared direction makes them coherent."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    out = []
    for _ in range(STEPS):
        out.append({name: rng.normal(size=shape) + rng.normal(size=(n, *shape)) * rng.uniform(0.3, 3)
                    for name, shape, _ in PARAMS})
    return out


def _write(path, grads, *, param_moments):
    layout = RunLayout(layers=LAYERS, params=PARAMS, example_ids=np.arange(N_TRAIN + N_TEST), n_train=N_TRAIN,
                       true_label=np.zeros(N_TRAIN + N_TEST, np.int64), train_label=np.zeros(N_TRAIN + N_TEST, np.int64),
                       param_moments=param_moments)
    samples = (slice(0, N_TRAIN), slice(N_TRAIN, None))  # tracked_train, tracked_test; no moments_train
    with create_run(path, layout) as writer:
        for step, g in enumerate(grads):
            flat = {name: g[name].reshape(len(g[name]), -1) for name, _, _ in PARAMS}
            p_nss, p_sns = np.zeros((3, len(PARAMS))), np.zeros((3, len(PARAMS)))
            m = np.zeros((3, len(LAYERS)))
            dots = np.zeros((N_TRAIN + N_TEST, len(LAYERS)))
            for row, rows in enumerate(samples):
                m[row] = len(range(N_TRAIN + N_TEST)[rows])
                for j, (name, _, layer) in enumerate(PARAMS):
                    x = flat[name][rows]
                    p_nss[row, j] = (x.sum(0) ** 2).sum()
                    p_sns[row, j] = (x ** 2).sum()
                    dots[rows, LAYERS.index(layer)] += x @ x.sum(0)
            onehot = np.array([[la == layer for layer in LAYERS] for _, _, la in PARAMS], dtype=float)
            sq = np.stack([(flat[name] ** 2).sum(1) for name, _, _ in PARAMS], axis=1) @ onehot
            extra = dict(param_norm_sq_of_sum=p_nss, param_sum_of_norm_sq=p_sns) if param_moments else {}
            writer.append_step(step, loss=np.ones(N_TRAIN + N_TEST), correct=np.ones(N_TRAIN + N_TEST, bool),
                               sq_norm=sq, dot_with_sum=dots, m=m, norm_sq_of_sum=p_nss @ onehot,
                               sum_of_norm_sq=p_sns @ onehot, **extra)
    return path


def _direct(grads, names, rows):
    """||Σ g_W||² / Σ ||g_W||² of the concatenated per-example gradients of ``names``, per step."""
    out = []
    for g in grads:
        w = np.concatenate([g[name][rows].reshape(len(g[name][rows]), -1) for name in names], axis=1)
        out.append((w.sum(0) ** 2).sum() / (w ** 2).sum())
    return np.array(out)


@pytest.fixture
def grads():
    return _gradients(3)


def _refuse(*args, **kwargs):
    raise RuntimeError("a dask computation ran before .compute()")


def test_weights_only_m_coherence_is_that_of_the_weights_alone(tmp_path, grads):
    path = _write(tmp_path / "run.zarr", grads, param_moments=True)
    ds, plain = open_run(path), xr.open_zarr(path)
    plain.gs.run  # reads the small static metadata, nothing per step
    with dask.config.set(scheduler=_refuse):  # lazy until computed
        results = analyze(ds, metrics=("coherence",), n_permutations=0)
        lazy = plain.gs.weights_m_coherence()
    got = results["weights_m_coherence"].compute()
    by_gs = lazy.compute()
    for sample, rows in (("tracked_train", slice(0, N_TRAIN)), ("tracked_test", slice(N_TRAIN, None))):
        for layer, names in (("fc1", ["fc1.weight"]), ("fc2", ["fc2.weight"]),
                             ("(model)", ["fc1.weight", "fc2.weight"])):
            want = _direct(grads, names, rows)
            np.testing.assert_allclose(got.sel(sample=sample, layer=layer).values, want, rtol=1e-12)
            np.testing.assert_allclose(by_gs.sel(sample=sample, layer=layer).values, want, rtol=1e-12)
        with_bias = _direct(grads, ["fc1.weight", "fc1.bias"], rows)  # the per-layer m-coherence counts the bias
        np.testing.assert_allclose(results["m_coherence"].sel(source="exact", sample=sample, layer="fc1").values,
                                   with_bias, rtol=1e-12)
        assert not np.allclose(with_bias, _direct(grads, ["fc1.weight"], rows), rtol=1e-3)
    assert np.isnan(got.sel(layer="norm")).all()  # a LayerNorm has no weight of dimension >= 2
    assert np.isnan(got.sel(sample="moments_train")).all()  # not computed: m = 0, empty sums
    assert not any("weights-only" in note for note in results.attrs["notes"])
    out = write_results(results.compute(), tmp_path / "analysis")
    assert (tmp_path / "analysis" / "weights_coherence.csv").is_file(), out


def _drop_param_moments_key(path):
    """Make the root look as a store written before per-parameter moments existed (no storage key)."""
    root = json.loads((path / "zarr.json").read_text())
    del root["attributes"]["storage"]["param_moments"]
    (path / "zarr.json").write_text(json.dumps(root))


def test_a_store_without_param_moments_analyses_cleanly_with_a_note(tmp_path, grads):
    path = _write(tmp_path / "old.zarr", grads, param_moments=False)
    _drop_param_moments_key(path)
    ds = open_run(path)
    assert "param_norm_sq_of_sum" not in ds.variables and "param" not in ds.dims
    results = analyze(ds, metrics=("coherence",), n_permutations=0).compute()
    assert "weights_m_coherence" not in results.variables
    assert any("no per-parameter moments" in note for note in results.attrs["notes"])
    assert np.isfinite(results["m_coherence"].sel(source="exact", sample="tracked_train")).all()
    write_results(results, tmp_path / "analysis")
    assert (tmp_path / "analysis" / "coherence.csv").is_file()
    assert not (tmp_path / "analysis" / "weights_coherence.csv").exists()
    with pytest.raises(AnalysisError, match="no per-parameter moments"):
        ds.gs.weights_m_coherence()
    with pytest.raises(StoreError, match="param_norm_sq_of_sum"):
        analysis.coherence.weight_moments(ds)


def test_a_layout_with_param_moments_needs_them_at_every_step(tmp_path):
    layout = RunLayout(layers=LAYERS, params=PARAMS, example_ids=np.arange(3), n_train=3, param_moments=True)
    with create_run(tmp_path / "run.zarr", layout) as writer:
        with pytest.raises(StoreError, match="param_norm_sq_of_sum is required"):
            writer.append_step(0, loss=np.ones(3), correct=np.ones(3, bool), sq_norm=np.ones((3, 3)),
                               dot_with_sum=np.ones((3, 3)), m=np.ones((3, 3)), norm_sq_of_sum=np.ones((3, 3)),
                               sum_of_norm_sq=np.ones((3, 3)))
    with pytest.raises(StoreError, match="per-parameter moments"):
        RunLayout(layers=("fc1",), params=PARAMS[:2] + (("x", (1,), "elsewhere"),), example_ids=np.arange(3),
                  n_train=3, param_moments=True)
