"""The whole analysis: lazy until computed, chunking-invariant, same on threads and a LocalCluster."""

import dask
import numpy as np
import pytest
import xarray as xr

from analysis.report import analyze, compute_by_steps, prepare
from analysis.synthetic import synthetic_run

LAZY_METRICS = ("coherence", "stiffness", "confusion", "loss_split", "minibatch")


def _refuse(*args, **kwargs):
    raise RuntimeError("a dask computation ran while building the analysis")


def test_building_the_analysis_computes_nothing():
    ds = synthetic_run(n_steps=4, n_train=12, n_test=4)
    with dask.config.set(scheduler=_refuse):
        out = analyze(ds, metrics=LAZY_METRICS, n_permutations=20)
        with pytest.raises(RuntimeError, match="dask computation"):
            out.f_p.compute()
    lazy = [name for name in out.data_vars if out[name].chunks is None and "step" in out[name].dims]
    assert lazy == []


def test_results_do_not_depend_on_chunking_or_step_batches():
    a = analyze(synthetic_run(n_steps=6, n_train=14, n_test=4, step_chunk=1), n_permutations=30).compute()
    lazy = analyze(synthetic_run(n_steps=6, n_train=14, n_test=4, step_chunk=4), n_permutations=30)
    b = compute_by_steps(lazy, steps_per_batch=4)  # batches of 4 and 2 steps: r_p crosses them
    xr.testing.assert_allclose(a, b)
    plan = prepare(synthetic_run(n_steps=6, n_train=14, n_test=4, step_chunk=4), n_permutations=30)
    for steps in (1, 4):  # the running sums of r_p, r_c and their nulls carried from batch to batch
        c = plan.compute(steps_per_batch=steps)
        xr.testing.assert_allclose(a, c)
        for name in a.data_vars:
            assert a[name].dims == b[name].dims == c[name].dims, name
    small = plan.compute(steps_per_batch=4, null_distributions=False)
    assert "r_p_null" not in small and "r_p_null_low" in small
    xr.testing.assert_allclose(small.r_p_p_value, a.r_p_p_value)
    assert a.attrs["pairwise_source"] == "exact" and a.f_p.attrs["source"] == "exact"


def test_threaded_and_two_process_cluster_agree():
    distributed = pytest.importorskip("distributed")
    plan = prepare(synthetic_run(n_steps=3, n_train=10, n_test=3), n_permutations=20,
                   metrics=("coherence", "stiffness", "loss_split", "confusion"), max_pair_examples=6)
    threaded = plan.lazy().compute(scheduler="threads")
    from pipelines.cli.analyze import _compute  # what `gradstore analyze --scheduler ADDRESS` runs

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster:
        remote = _compute(plan, cluster.scheduler_address, 2)
    xr.testing.assert_allclose(threaded, remote)
    assert np.isfinite(remote.f_p).all() and np.isfinite(remote.sign_stiffness_se).all()
