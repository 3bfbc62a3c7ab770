"""Permutation nulls: vectorized = one world at a time, reproducible by seed, calibrated."""

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from analysis import losssplit, nulls, sources
from analysis.synthetic import synthetic_run
from gradstore.errors import GradstoreError


def _values(n_steps=6, n_ex=20, seed=0):
    rng = np.random.default_rng(seed)
    return xr.DataArray(rng.standard_normal((n_steps, n_ex)), dims=("step", "example"))


def test_masks_keep_group_sizes_and_are_seeded():
    mask = np.array([1, 0, 0, 1, 1, 0, 0, 0], bool)
    a = nulls.permuted_masks(mask, 50, seed=7)
    assert a.dims == ("permutation", "example")
    np.testing.assert_array_equal(a.sum("example"), 3)
    np.testing.assert_array_equal(a, nulls.permuted_masks(mask, 50, seed=7))
    assert not np.array_equal(a, nulls.permuted_masks(mask, 50, seed=8))


def test_vectorized_null_equals_one_world_at_a_time():
    values = _values()
    mask = np.arange(20) < 7
    stat = nulls.mean_difference(values)
    test = nulls.permutation_test(stat, mask, n_permutations=30, seed=1).compute()
    worlds = nulls.permuted_masks(mask, 30, seed=1).values
    for p in range(30):
        w = worlds[p].astype(bool)
        direct = values.values[:, w].mean(1) - values.values[:, ~w].mean(1)
        np.testing.assert_allclose(test.null.isel(permutation=p), direct)
    obs = values.values[:, mask].mean(1) - values.values[:, ~mask].mean(1)
    np.testing.assert_allclose(test.observed, obs)
    greater = (1 + (test.null.values >= obs).sum(0)) / 31
    less = (1 + (test.null.values <= obs).sum(0)) / 31
    np.testing.assert_allclose(test.p_value, np.minimum(1, 2 * np.minimum(greater, less)))


def test_coherence_gap_matches_direct_group_coherence():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((2, 10, 4)) + 0.5
    gram = xr.DataArray(np.einsum("sic,sjc->sij", g, g), dims=("step", "example", "example_"))
    mask = np.arange(10) % 3 == 0
    test = nulls.permutation_test(nulls.coherence_gap(gram), mask, n_permutations=5, seed=0).compute()

    def mcoh(x):
        return np.sum(x.sum(1) ** 2, -1) / np.sum(x**2, (1, 2))
    np.testing.assert_allclose(test.observed, mcoh(g[:, mask]) - mcoh(g[:, ~mask]))
    w = nulls.permuted_masks(mask, 5, seed=0).values[3].astype(bool)
    np.testing.assert_allclose(test.null.isel(permutation=3), mcoh(g[:, w]) - mcoh(g[:, ~w]))


def test_nulls_reproducible_by_seed():
    ds = synthetic_run(n_steps=3, n_train=20, n_test=0)
    d = sources.layer_dot_with_sum(ds)
    run = lambda seed: nulls.permutation_test(lambda m: losssplit.share(d, m), ~ds.corrupt.values,
                                              n_permutations=40, seed=seed).compute()
    xr.testing.assert_identical(run(5), run(5))
    assert not np.allclose(run(5).null, run(6).null)


def test_p_values_are_calibrated_for_random_groups():
    # no group structure at all: 400 independent steps, random group of 8 among 24
    ds = synthetic_run(n_steps=400, n_train=24, n_test=0, structure=0.0, step_chunk=100, gram=False, proj=False)
    d = sources.layer_dot_with_sum(ds).sel(layer=sources.MODEL)
    mask = np.random.default_rng(11).permutation(24) < 8
    test = nulls.permutation_test(lambda m: losssplit.share(d, m), mask, n_permutations=199, seed=3).compute()
    p = test.p_value.values
    assert stats.kstest(p, "uniform").pvalue > 1e-3
    assert 0.02 < (p <= 0.05).mean() < 0.10
    # a planted effect is detected: the group is the one with the largest dots
    strong = d.mean("step").values >= np.sort(d.mean("step").values)[-8]
    planted = nulls.permutation_test(lambda m: losssplit.share(d, m), strong, n_permutations=199,
                                     alternative="greater", seed=3).compute()
    assert np.median(planted.p_value) < 0.2


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(GradstoreError, match="alternative"):
        nulls.permutation_test(lambda m: m.sum("example"), [True, False], alternative="bigger")
    with pytest.raises(GradstoreError, match="at least 1"):
        nulls.permutation_test(lambda m: m.sum("example"), [True, False], n_permutations=0)


def test_class_pair_test_restricts_to_the_two_classes():
    rng = np.random.default_rng(4)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 0, 1])
    g = rng.standard_normal((1, 10, 3)) + 0.4 * (labels[None, :, None] == 0)
    gram = xr.DataArray(np.einsum("sic,sjc->sij", g, g), dims=("step", "example", "example_"))
    test = nulls.class_pair_test(gram, labels, 0, 1, n_permutations=50, seed=0).compute()

    def mcoh(x):
        return np.sum(x.sum(1) ** 2, -1) / np.sum(x**2, (1, 2))
    np.testing.assert_allclose(test.observed, mcoh(g[:, labels == 0]) - mcoh(g[:, labels == 1]))
    keep = np.flatnonzero(labels != 2)
    w = nulls.permuted_masks(labels[keep] == 0, 50, seed=0).values[7].astype(bool)
    np.testing.assert_allclose(test.null.isel(permutation=7), mcoh(g[:, keep[w]]) - mcoh(g[:, keep[~w]]))
    with pytest.raises(GradstoreError, match="both need examples"):
        nulls.class_pair_test(gram, labels, 0, 5)


@pytest.mark.parametrize("chunks", [None, {"step": 2, "example": 13}, {"step": 3}])
def test_null_sums_are_each_worlds_own_sum(chunks):
    """null_sums = Σ over each world's members, world by world from permuted_masks, eager or lazy
    (the example dimension split in chunks or not), with more worlds than one block of masks."""
    rng = np.random.default_rng(4)
    x = xr.DataArray(rng.standard_normal((5, 40, 3)), dims=("step", "example", "layer"))
    mask = rng.random(40) < 0.4
    n = nulls.PERMUTATION_BLOCK + nulls.SUM_BLOCK + 5
    sums = nulls.null_sums(mask, x if chunks is None else x.chunk(chunks), n, seed=9)
    assert sums.dims == ("permutation", "step", "layer") and sums.shape == (n, 5, 3)
    assert (sums.chunks is None) == (chunks is None)  # lazy stays lazy
    worlds = nulls.permuted_masks(mask, n, seed=9).values.astype(bool)
    direct = np.stack([x.values[:, w].sum(1) for w in worlds])
    np.testing.assert_allclose(sums.values, direct, rtol=1e-12, atol=1e-12)


def test_null_sums_graph_carries_no_masks():
    """The graph of a lazy null_sums holds the mask as packed bits, not the worlds: 1000 worlds
    over 50,000 examples are 50 MB, which a step-by-step computation would send with every batch."""
    import pickle

    import dask

    x = xr.DataArray(dask.array.zeros((4, 50_000, 2), chunks=(1, -1, -1)), dims=("step", "example", "layer"))
    mask = np.random.default_rng(0).random(50_000) < 0.75
    graph = dict(nulls.null_sums(mask, x, 1000).data.__dask_graph__())
    assert len(pickle.dumps(graph)) < 200_000
