"""Stores without classes (sequence or regression tasks): class metrics are skipped with a note,
per-example metrics run; pairwise metrics over a seeded sample of examples report their error."""

import numpy as np
import pytest
import xarray as xr

from analysis import pairwise
from analysis.report import analyze
from analysis.synthetic import synthetic_run, write_synthetic_store
from pipelines.cli import main


def _classless(**kwargs):
    ds = synthetic_run(n_steps=3, n_train=12, n_test=4, n_coords=16, **kwargs)
    ds = ds.drop_vars(["true_label"])
    ds.attrs["task"] = "regression"
    return ds


def test_a_store_without_classes_analyses_cleanly():
    ds = _classless()
    results = analyze(ds, n_permutations=10).compute()
    assert results.attrs["skipped_metrics"] == ["easy_hard"]
    notes = " ".join(results.attrs["notes"])
    assert "easy_hard: skipped" in notes and "class-by-class matrices are left out" in notes
    assert "sign_stiffness_class" not in results and "easy_hard_m_coherence" not in results
    full = analyze(synthetic_run(n_steps=3, n_train=12, n_test=4, n_coords=16), n_permutations=10).compute()
    for name in ("m_coherence", "f_p", "r_p", "sign_stiffness", "min_cosine", "alpha_k_measured"):
        xr.testing.assert_allclose(results[name], full[name])  # per-example and pairwise metrics unchanged


def test_the_cli_on_a_stored_run_without_labels(tmp_path, capsys):
    ds = synthetic_run(n_steps=3, n_train=12, n_test=4, n_coords=16)
    ds["true_label"] = ("example", np.full(ds.sizes["example"], -1))  # what a store without classes records
    store = write_synthetic_store(tmp_path / "run", ds)
    out = tmp_path / "out"
    main(["analyze", store, "--out", str(out), "--nulls", "5"])
    err = capsys.readouterr().err
    assert "easy_hard: skipped, the store has no correct" in err
    results = xr.open_zarr(out / "results.zarr", consolidated=False)
    assert "f_p" in results and "sign_stiffness" in results and "sign_stiffness_class" not in results
    assert (out / "loss_split.csv").exists() and not (out / "stiffness_class.csv").exists()
    assert not (out / "easy_hard.png").exists()


def test_sampled_pairs_are_exact_over_the_sample_with_a_jackknife_error():
    ds = synthetic_run(n_steps=2, n_train=40, n_test=0, n_coords=32, gram=True, proj=False)
    results = analyze(ds, metrics=("stiffness", "confusion"), max_pair_examples=15, seed=4).compute()
    assert results.attrs["pair_sample"] == 15
    rng = np.random.default_rng([4, 0x5A17])
    sample = np.sort(rng.choice(40, size=15, replace=False))
    g = ds.gram.values[:, :, sample][:, :, :, sample].sum(1)  # whole model (step, i, j)
    off = ~np.eye(15, dtype=bool)
    signs = np.sign(g)
    np.testing.assert_allclose(results.sign_stiffness.sel(layer="(model)").values, signs[:, off].mean(1))
    # jackknife by brute force: the mean over pairs with one example left out, for each example
    for t in range(2):
        loo = [signs[t][np.ix_(keep, keep)][~np.eye(14, dtype=bool)].mean()
               for keep in (np.delete(np.arange(15), k) for k in range(15))]
        se = np.sqrt(14 / 15 * np.sum((np.array(loo) - np.mean(loo)) ** 2))
        assert results.sign_stiffness_se.sel(layer="(model)").values[t] == pytest.approx(se)
    cos = g / np.sqrt(np.einsum("tii->ti", g)[:, :, None] * np.einsum("tii->ti", g)[:, None, :])
    np.testing.assert_allclose(results.fraction_negative.sel(layer="(model)").values,
                               (cos[:, off] < 0).mean(1))
    assert np.isfinite(results.fraction_negative_se).all()
    unsampled = analyze(ds, metrics=("stiffness",)).compute()
    assert "sign_stiffness_se" not in unsampled and "pair_sample" not in unsampled.attrs


def test_pair_mean_se_is_zero_for_a_constant_matrix():
    m = xr.DataArray(np.ones((6, 6)), dims=("example", "example_"))
    assert float(pairwise.pair_mean_se(m)) == pytest.approx(0.0)
