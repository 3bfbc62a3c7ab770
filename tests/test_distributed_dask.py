"""``gradstore analyze`` on a store at an fsspec URL: local threads (memory://) and a two-process
dask.distributed LocalCluster (file://, which every worker process can read) give the same results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from gradstore.record import Recorder
from pipelines.cli import main
from pipelines.models import build_model

METRICS = "coherence,stiffness,loss_split"


def _write(target):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 1, 28, 28, generator=g), torch.randint(0, 10, (12,), generator=g)
    xt, yt = torch.rand(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    model = build_model("mlp-3x256", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with Recorder(target, model, train_inputs=x, train_targets=y, train_ids=range(12), test_inputs=xt,
                  test_targets=yt, test_ids=range(100, 104), coords_per_layer=8, gram=True,
                  background=False) as rec:
        for step in range(3):
            rec.record(step, model, lr=0.5)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def test_analyze_a_url_store_on_a_two_process_cluster(tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    url = f"file://{tmp_path / 'run.zarr'}"
    _write(url)
    _write("memory://dask-test/run.zarr")
    main(["analyze", "memory://dask-test/run.zarr", "--out", str(tmp_path / "local"), "--metrics", METRICS,
          "--nulls", "10"])
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster:
        main(["analyze", url, "--out", str(tmp_path / "cluster"), "--metrics", METRICS, "--nulls", "10",
              "--scheduler", cluster.scheduler_address])
    local = xr.open_zarr(tmp_path / "local" / "results.zarr", consolidated=False).load()
    remote = xr.open_zarr(tmp_path / "cluster" / "results.zarr", consolidated=False).load()
    xr.testing.assert_allclose(local, remote)
    assert np.isfinite(local["alpha"]).any() and np.isfinite(local["cosine_stiffness"]).any()
    assert "3 steps, 16 examples" in capsys.readouterr().err
