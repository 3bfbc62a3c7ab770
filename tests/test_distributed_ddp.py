"""Every rank trains (DDP, 2 processes on gloo): each captures its shard, rank 0 writes the store
that one process training on the same global batches writes."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ddp_helpers import assert_same_store, tiny_data, tiny_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradstore.record import ProcessGroupReducer, Recorder
from gradstore.errors import StoreError
from gradstore.record.messages import seal_parts, set_group_key, unseal_parts
from gradstore.store import open_run


def _train(target, model, rank=0, size=1, **options):
    """Three captured steps with two SGD steps on global batches of 8 between them."""
    x, y = tiny_data(16, 0)
    xt, yt = tiny_data(3, 1)
    xm, ym = tiny_data(11, 2)
    net = DistributedDataParallel(model) if size > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rec = Recorder(target, net, train_inputs=x[:7], train_targets=y[:7], train_ids=np.arange(7), test_inputs=xt,
                   test_targets=yt, test_ids=[20, 21, 22], moments_inputs=xm, moments_targets=ym, coords_per_layer=4,
                   n_proj=3, gram=True, background=False, **options)
    with rec:
        for step in range(3):
            rec.record_now(step, net, lr=0.3)
            rows = slice(8 * (step % 2) + 8 // size * rank, 8 * (step % 2) + 8 // size * (rank + 1))
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[rows]), y[rows]).backward()
            opt.step()


def _rank(rank, size, rendezvous, key, target):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    set_group_key(key)
    try:
        _train(target, tiny_model(), rank, size, reducer=ProcessGroupReducer())
        dist.barrier()  # every rank's collectives done before the group is torn down (gloo aborted once without)
    finally:
        set_group_key(None)
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~40 s on 2 shared cores
def test_ddp_ranks_capture_their_shards_and_rank_0_writes_the_single_process_store(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    _train(str(tmp_path / "one.zarr"), tiny_model())
    mp.spawn(_rank, args=(2, str(tmp_path / "rendezvous"), secrets.token_bytes(32), str(tmp_path / "two.zarr")),
             nprocs=2, join=True)
    one, two = open_run(tmp_path / "one.zarr").load(), open_run(tmp_path / "two.zarr").load()
    assert set(one.variables) == set(two.variables) and two.sizes["step"] == 3
    for name in one.variables:
        a, b = one[name].values, two[name].values
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)
    assert (two.m.sel(sample="moments_train").values == 11).all()


@pytest.mark.slow  # torchrun with 2 processes plus one plain process: ~50 s on 2 shared cores
def test_torchrun_writes_the_store_one_process_writes(tmp_path):
    """``torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py`` = ``python examples/ddp_torchrun.py``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_torchrun.py"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "GRADSTORE_GROUP_KEY": secrets.token_hex(32)}
    args = ["--steps", "4", "--every", "2"]
    runs = {"one": [sys.executable, str(example)],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(example)]}
    for name, command in runs.items():
        out = subprocess.run(command + ["--out", str(tmp_path / name), *args], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    one, two = (open_run(tmp_path / name / "store.zarr").load() for name in runs)
    assert one.step.values.tolist() == two.step.values.tolist() == [0, 2, 4]
    assert_same_store(two, one)


class _CreatesFile:
    """Unpickling this runs ``open(path, "w")``: the file appears only if the pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_gathered_arrays_travel_out_of_band_and_nothing_forged_is_unpickled(tmp_path):
    key = secrets.token_bytes(32)
    part = {"loss": np.arange(5.0), "sq_norm": np.arange(12.0).reshape(6, 2).T, "correct": np.array([True, False]),
            "grad_coords": np.ones((3, 4), np.float32), "empty": np.zeros((0, 3))}
    tag, meta, raws = seal_parts(part, b"G", 1, 7, key)
    assert len(raws) >= 4 and len(meta) < 1000  # the arrays' bytes are not in the pickle
    received = [np.frombuffer(bytes(r), np.uint8).copy() for r in raws]  # as rank 0 receives them
    back = unseal_parts(tag, np.frombuffer(meta, np.uint8), received, b"G", 1, 7, key)
    for name, value in part.items():
        np.testing.assert_array_equal(back[name], value)
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
    evil = _CreatesFile(tmp_path / "ran")
    tag, meta, raws = seal_parts({"x": np.arange(4.0), "evil": evil}, b"G", 1, 7, key)
    flipped = bytearray(raws[0])
    flipped[0] ^= 1
    other_key = seal_parts({"evil": evil}, b"G", 1, 7, secrets.token_bytes(32))
    forgeries = {  # (tag, pickle, buffers, sequence number, sender) as rank 0 would check them
        "flipped array byte": (tag, meta, [flipped], 7, 1), "other sequence number": (tag, meta, raws, 8, 1),
        "other sender": (tag, meta, raws, 7, 2), "dropped array": (tag, meta, [], 7, 1),
        "moved bytes": (tag, meta, [bytes(raws[0])[:-8], bytes(raws[0])[-8:]], 7, 1),
        "other key": (*other_key, 7, 1)}
    for name, (t, m, r, seq, sender) in forgeries.items():
        with pytest.raises(StoreError, match="failed authentication"):
            unseal_parts(t, m, r, b"G", sender, seq, key)
        assert not (tmp_path / "ran").exists(), name
    unseal_parts(tag, meta, raws, b"G", 1, 7, key)["evil"].close()  # the payload is live: unsealed, it runs
    assert (tmp_path / "ran").exists()
