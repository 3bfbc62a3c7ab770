"""The library's capture-worker design (``pipelines.distributed.capture_workers``, a DistributedRecorder
on rank 0): capture sharded over 2 processes (gloo on 127.0.0.1) writes the single-process store.

``gradstore run --nproc N``, which trains with DDP on every rank instead, is tested in
``tests/test_run_nproc.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradstore.record import Recorder
from gradstore.record.distributed import DistributedRecorder, make_recorder, world
from gradstore.store import open_run
from pipelines.distributed import capture_workers
from pipelines.models import build_model


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _record(target, make):
    """Two captured steps with an SGD step between them; the Recorder from ``make``."""
    model = build_model("mlp-3x256", seed=0)
    x, y = _data(9, 1)  # odd sizes: unequal shards, and an empty test shard on rank 1
    xt, yt = _data(1, 2)
    xm, ym = _data(13, 3)
    rec = make(target, model, train_inputs=x, train_targets=y, train_ids=np.arange(9) + 100,
               test_inputs=xt, test_targets=yt, test_ids=[7], moments_inputs=xm, moments_targets=ym,
               coords_per_layer=5, n_proj=4, projection_seed=3, gram=True, background=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with rec:
        for step in (0, 1):
            rec.record(step, model, lr=0.5)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return open_run(target).load()


def test_two_processes_write_the_single_process_store(tmp_path):
    single = _record(str(tmp_path / "one.zarr"), Recorder)
    with capture_workers(2):
        assert world() == (0, 2)
        sharded = _record(f"file://{tmp_path / 'two.zarr'}", make_recorder)
    assert world() == (0, 1)
    assert set(sharded.variables) == set(single.variables)
    for name in single.variables:
        a, b = single[name].values, sharded[name].values
        if a.dtype.kind in "fc":
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)
    assert (sharded["m"].sel(sample="tracked_test").values == 1).all()
    assert (sharded["dot_with_sum"].values != 0).any()


def test_distributed_recorder_needs_a_process_group(tmp_path):
    from gradstore.errors import GradstoreError, StoreError

    assert type(make_recorder(str(tmp_path / "r.zarr"), build_model("mlp-3x256"), train_inputs=_data(2, 0)[0],
                              train_targets=_data(2, 0)[1], train_ids=[0, 1], coords_per_layer=0)) is Recorder
    with pytest.raises(StoreError, match="process group"):
        DistributedRecorder(str(tmp_path / "s.zarr"), build_model("mlp-3x256"), train_inputs=_data(2, 0)[0],
                            train_targets=_data(2, 0)[1], train_ids=[0, 1])
    with pytest.raises(GradstoreError, match="nproc"):
        with capture_workers(0):
            pass
    assert not (tmp_path / "s.zarr").exists()


def test_run_cli_refuses_a_bad_nproc(tmp_path, capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "label-noise", "--nproc", "0", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--nproc" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_error_on_rank_0_stops_the_workers():
    from gradstore.errors import GradstoreError

    with pytest.raises(GradstoreError, match="boom"):
        with capture_workers(2):
            assert world() == (0, 2)
            raise GradstoreError("boom")
    assert world() == (0, 1)  # the group is gone and a new one can start
