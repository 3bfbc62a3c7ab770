"""The metric registry: a metric registered in this file alone appears in analyze's results, its
CSV table, its plot, the CLI and the TOML check; undeclared outputs and clashes are refused."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from analysis import registry
from analysis.report import METRICS, analyze
from analysis.synthetic import synthetic_run, write_synthetic_store
from gradstore.errors import AnalysisError
from pipelines.cli import main


def _plot(results, folder):
    from analysis import plots

    fig, ax = plots._pyplot().subplots()
    ax.plot(results.step, results.train_mean_loss)
    path = folder / "train_mean_loss.png"
    plots.save(fig, path)
    return [path]


@pytest.fixture
def mean_loss():
    @registry.metric("train_mean_loss", tables={"train_mean_loss": ("step",)}, plot=_plot)
    def train_mean_loss(ctx):
        """Mean loss of the tracked training examples per step."""
        return xr.Dataset({"train_mean_loss": ctx.ds["loss"].isel(example=ctx.train_index).mean("example")})

    yield "train_mean_loss"
    registry.unregister("train_mean_loss")


def test_a_metric_registered_here_appears_everywhere(mean_loss, tmp_path):
    from pipelines.experiments.schema import _metrics

    assert mean_loss in METRICS and mean_loss in _metrics()
    ds = synthetic_run(n_steps=3, n_train=10, n_test=4, n_coords=16)
    store = write_synthetic_store(tmp_path / "run", ds)
    out = tmp_path / "out"
    main(["analyze", store, "--out", str(out), "--metrics", f"coherence,{mean_loss}", "--nulls", "0"])
    expect = ds.loss.values[:, :10].mean(1)  # the 10 training examples come first
    results = xr.open_zarr(out / "results.zarr", consolidated=False)
    np.testing.assert_allclose(results.train_mean_loss.values, expect)
    table = pd.read_csv(out / "train_mean_loss.csv")
    np.testing.assert_allclose(table.train_mean_loss.values, expect)
    assert (out / "train_mean_loss.png").stat().st_size > 0
    assert results.train_mean_loss.attrs["metric"] == mean_loss


def test_an_output_without_a_declared_table_is_refused():
    @registry.metric("untabled", tables={"untabled": ("step",)})
    def untabled(ctx):
        return xr.Dataset({"per_example": ctx.ds["loss"]})  # (step, example): no table declared

    try:
        with pytest.raises(AnalysisError, match=r"dimensions \('example', 'step'\) that none of its tables \(untabled\)"):
            analyze(synthetic_run(n_steps=2), metrics=["untabled"])
    finally:
        registry.unregister("untabled")


def test_duplicate_names_tables_and_outputs_are_refused():
    with pytest.raises(AnalysisError, match="already registered"):
        registry.metric("coherence")(lambda ctx: None)
    with pytest.raises(AnalysisError, match="table 'coherence' is already"):
        registry.metric("other", tables={"coherence": ("step",)})(lambda ctx: None)
    with pytest.raises(AnalysisError, match="unknown input"):
        registry.metric("other", inputs=("vibes",))(lambda ctx: None)

    @registry.metric("copycat", tables={"copycat": ("source", "step", "sample", "layer")})
    def copycat(ctx):
        return xr.Dataset({"m_coherence": ctx.ds["m"]})

    try:
        with pytest.raises(AnalysisError, match="both output 'm_coherence'"):
            analyze(synthetic_run(n_steps=2), metrics=["coherence", "copycat"])
    finally:
        registry.unregister("copycat")
    assert "copycat" not in METRICS and "other" not in METRICS
