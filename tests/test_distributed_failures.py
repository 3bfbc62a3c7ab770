"""Ranks that disagree or die (2 gloo processes, every rank recording as under DDP): every rank stops
with one GradstoreError line within the reducer's timeout, nobody hangs, and the store keeps exactly
the steps committed before (no torn step), from which a restarted run resumes."""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_helpers import tiny_data, tiny_model
from torch import nn

from gradstore.errors import GradstoreError
from gradstore.record import LocalReducer, ProcessGroupReducer, Recorder, Schedule
from gradstore.record.reduce import CAPTURE, FIELDS, OPEN, header, mismatch
from gradstore.store import open_run, verify_run

TIMEOUT = 5.0  # the capture collectives' timeout in these tests (the default is 300 s)


# ---------------------------------------------------------------- the header check, without processes
def _table(*rows):
    return np.stack(rows)


def _head(doing=CAPTURE, step=3, **changes):
    base = dict(exchange=2, messages=4, timeout=5.0, sizes=(7, 3, 11), config=12345, weights=(1.5, 2.5))
    return header(doing, step, **{**base, **changes})


def test_headers_that_agree_pass_and_every_disagreement_is_named():
    assert mismatch(_table(_head(), _head(), _head())) is None
    cases = {
        "rank 0 capturing step 3, rank 1 capturing step 4": _head(step=4),
        "rank 0 capturing step 3, rank 1 opening its Recorder": _head(OPEN, None),
        "a rank skipped a capture": _head(exchange=3),
        "rank 0 waits 5 s, rank 1 waits 10 s": _head(timeout=10.0),
        "tracked train sample differs (rank 0 has 7 examples, rank 1 has 6 examples)": _head(sizes=(6, 3, 11)),
        "tracked test sample differs (rank 0 has 3 examples, rank 1 has none)": _head(sizes=(7, -1, 11)),
        "moments sample differs": _head(sizes=(7, 3, 10)),
        "the run's configuration differs": _head(config=54321),
        "the model's weights differ": _head(weights=(1.5 + 1e-6, 2.5)),
        "counts of authenticated messages differ": _head(messages=5),
    }
    for expected, other in cases.items():
        line = mismatch(_table(_head(), other))
        assert line is not None and expected in line, (expected, line)
        assert "\n" not in line
    # three ranks: the odd one out is named, the two that agree together
    assert "ranks 0, 2 capturing step 3, rank 1 capturing step 9" in mismatch(_table(_head(), _head(step=9), _head()))
    # weights that agree to rounding pass (DDP replicas are bit-identical; 1e-12 relative is far inside 1e-7)
    assert mismatch(_table(_head(), _head(weights=(1.5 * (1 + 1e-12), 2.5)))) is None
    assert len(FIELDS) == _head().size


# ---------------------------------------------------------------- two processes
def _recorder(target, model, *, n_train=7, reducer=None, **options):
    x, y = tiny_data(16, 0)
    xt, yt = tiny_data(3, 1)
    xm, ym = tiny_data(11, 2)
    return Recorder(target, model, train_inputs=x[:n_train], train_targets=y[:n_train], train_ids=np.arange(n_train),
                    test_inputs=xt, test_targets=yt, test_ids=[20, 21, 22], moments_inputs=xm, moments_targets=ym,
                    coords_per_layer=options.pop("coords_per_layer", 4), n_proj=3,
                    reducer=reducer if reducer is not None else ProcessGroupReducer(timeout=TIMEOUT), **options)


def _sgd(model):
    """The same full-batch step on every rank (so the ranks' weights stay equal without DDP)."""
    x, y = tiny_data(16, 0)
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= 0.3 * g


def _attempt(results, name, run):
    start = time.monotonic()
    try:
        run()
        results[name] = {"error": None, "seconds": time.monotonic() - start}
    except GradstoreError as err:
        results[name] = {"error": str(err), "kind": type(err).__name__, "seconds": time.monotonic() - start,
                         "at": time.time()}


def _join(rank, size, rendezvous):
    import torch.distributed as dist

    from gradstore.record.messages import set_group_key

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    set_group_key(bytes.fromhex(os.environ["TEST_GROUP_KEY"]))


def _mismatches(rank, size, rendezvous, root):
    """Rank 0 and rank 1 disagree in several ways, one after the other; each rank writes what it raised."""
    import torch.distributed as dist

    _join(rank, size, rendezvous)
    root, results = Path(root), {}

    with _recorder(str(root / "steps.zarr"), tiny_model(), background=False) as rec:  # (a) rank 1 at another step
        rec.record_now(0, tiny_model())
        _attempt(results, "steps", lambda: rec.record_now(1 if rank == 0 else 2, tiny_model()))
    # (b) another tracked-sample size on rank 1; (c) other coordinates; (d) other weights
    _attempt(results, "sizes", lambda: _recorder(str(root / "sizes.zarr"), tiny_model(), n_train=7 if rank == 0 else 6))
    _attempt(results, "config", lambda: _recorder(str(root / "config.zarr"), tiny_model(),
                                                  coords_per_layer=4 if rank == 0 else 3))
    other = tiny_model()
    if rank == 1:
        with torch.no_grad():
            other[0].weight[0, 0] += 1e-3
    _attempt(results, "weights", lambda: _recorder(str(root / "weights.zarr"), other))
    # (e) rank 1 skips a capture and never comes: rank 0 waits TIMEOUT, then stops with the rank named
    rec = _recorder(str(root / "skip.zarr"), tiny_model(), background=False)
    if rank == 0:
        _attempt(results, "skip", lambda: rec.record_now(0, tiny_model()))
        _attempt(results, "after", lambda: rec.record_now(1, tiny_model()))
    else:
        time.sleep(TIMEOUT + 1)
    rec.close()
    # (f) the other way round, on a new group (another timeout): rank 0 never comes, rank 1 names it
    rec = _recorder(str(root / "skip0.zarr"), tiny_model(), background=False, reducer=ProcessGroupReducer(timeout=3.0))
    if rank == 1:
        _attempt(results, "skip0", lambda: rec.record_now(0, tiny_model()))
    else:
        time.sleep(4.0)
    rec.close()
    (root / f"mismatch-{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


class _DiesInStep2(ProcessGroupReducer):
    """Rank 1's reducer: the process exits in the middle of the capture of step 2, before its gather."""

    gathers, marker = 0, None

    def gather(self, part):
        self.gathers += 1
        if self.gathers == 5:  # two gathers a step (train, test): the first of step 2
            self.marker.write_text(repr(time.time()))
            os._exit(3)
        return super().gather(part)


def _dies(rank, size, rendezvous, root):
    import torch.distributed as dist

    _join(rank, size, rendezvous)
    root, results, model = Path(root), {}, tiny_model()
    reducer = _DiesInStep2(timeout=TIMEOUT) if rank == 1 else ProcessGroupReducer(timeout=TIMEOUT)
    reducer.marker = root / "died-at"

    def train():
        with _recorder(str(root / "dies.zarr"), model, reducer=reducer) as rec:  # background writes
            for step in range(4):
                rec.record_now(step, model, lr=0.3)
                _sgd(model)
    _attempt(results, "dies", train)
    (root / f"dies-{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _run(target, root, timeout=120):
    """Two spawned ranks of ``target``; wait for both (a rank's death must not take the other down)."""
    ctx = multiprocessing.get_context("spawn")
    os.environ.setdefault("TEST_GROUP_KEY", secrets.token_hex(32))  # the ranks' shared secret
    procs = [ctx.Process(target=target, args=(rank, 2, str(root / "rendezvous"), str(root))) for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatch")
    codes = _run(_mismatches, root)
    assert codes == [0, 0]
    return [json.loads((root / f"mismatch-{rank}.json").read_text()) for rank in range(2)], root


@pytest.mark.slow  # two spawned processes importing torch, a 5 s and a 3 s timeout: ~25 s on 2 shared cores
def test_ranks_recording_different_steps_both_stop_with_the_same_line(mismatched):
    results, root = mismatched
    lines = [r["steps"]["error"] for r in results]
    assert lines[0] == lines[1] and "\n" not in lines[0]
    assert "the ranks disagree about the capture of step 1: rank 0 capturing step 1, rank 1 capturing step 2" in lines[0]
    assert all(r["steps"]["seconds"] < TIMEOUT for r in results)  # at once, not after a timeout
    assert open_run(root / "steps.zarr").load().step.values.tolist() == [0]  # the step they agreed on


@pytest.mark.slow
def test_ranks_with_other_samples_configurations_or_weights_stop_before_any_store_exists(mismatched):
    results, root = mismatched
    expected = {"sizes": "the tracked train sample differs (rank 0 has 7 examples, rank 1 has 6 examples)",
                "config": "the run's configuration differs",
                "weights": "the model's weights differ"}
    for case, text in expected.items():
        lines = [r[case]["error"] for r in results]
        assert lines[0] == lines[1] and text in lines[0], (case, lines)
        assert lines[0].startswith("the ranks disagree about opening the Recorder")
        assert not (root / f"{case}.zarr").exists()  # refused before rank 0 created the store


@pytest.mark.slow
def test_a_rank_that_never_comes_is_named_after_the_timeout_and_the_recorder_refuses_to_go_on(mismatched):
    results, _ = mismatched
    skip = results[0]["skip"]
    assert skip["kind"] == "RankTimeout"
    assert skip["error"].startswith(f"rank 1 did not answer the capture of step 0 within {TIMEOUT:g} s")
    assert TIMEOUT - 0.5 < skip["seconds"] < TIMEOUT + 5
    assert "cannot be used again" in results[0]["after"]["error"]
    skip0 = results[1]["skip0"]  # and a rank waiting for rank 0 names rank 0
    assert skip0["error"].startswith("rank 0 did not answer the capture of step 0 within 3 s"), skip0
    assert 2.5 < skip0["seconds"] < 8


@pytest.mark.slow  # two spawned processes importing torch: ~12 s on 2 shared cores
def test_a_rank_dying_mid_capture_stops_the_other_and_leaves_only_committed_steps(tmp_path):
    codes = _run(_dies, tmp_path)
    assert codes[1] == 3  # rank 1 died
    assert codes[0] == 0
    dies = json.loads((tmp_path / "dies-0.json").read_text())["dies"]
    assert dies["kind"] == "RankTimeout", dies
    assert dies["error"].startswith("rank 1 did not answer the capture of step 2 within 5 s"), dies
    assert "nothing of this step was written" in dies["error"]
    # at once (the closed connection), well inside the timeout, never after torch's 30 minutes
    assert dies["at"] - float((tmp_path / "died-at").read_text()) < TIMEOUT
    target = tmp_path / "dies.zarr"
    verify_run(target)
    two = open_run(target).load()
    assert two.step.values.tolist() == [0, 1]  # step 1's background write finished; step 2 never began

    # the same run in one process, all four steps: the independent reference
    model = tiny_model()
    with _recorder(str(tmp_path / "one.zarr"), model, reducer=LocalReducer()) as rec:
        for step in range(4):
            rec.record_now(step, model, lr=0.3)
            _sgd(model)
    one = open_run(tmp_path / "one.zarr").load()
    _close(two, one.isel(step=[0, 1]))

    # a restart resumes after the last committed step: training replayed, the stored steps skipped
    model = tiny_model()
    with _recorder(str(target), model, reducer=LocalReducer(), schedule=Schedule.every(1)) as rec:
        assert rec.committed == 2
        for step in range(4):
            rec.maybe_record(step, model, lr=0.3)
            _sgd(model)
    resumed = open_run(target).load()
    assert resumed.step.values.tolist() == [0, 1, 2, 3]
    _close(resumed, one)


def _close(a, b):
    assert set(a.variables) == set(b.variables)
    for name in b.variables:
        x, y = a[name].values, b[name].values
        if y.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
