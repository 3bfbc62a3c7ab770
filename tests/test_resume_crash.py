"""kill -9 a recorded training run at chosen moments, resume it, and get the uninterrupted run's store
bit for bit (issue 12, finding 1: "store write, then checkpoint")."""

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradstore.store import open_run

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS = 12  # resume_worker.STEPS: steps 0..12 recorded, a checkpoint every 2 steps


def worker(run_dir: Path, *kill: str) -> int:
    done = subprocess.run([sys.executable, str(WORKER), str(run_dir), *kill], capture_output=True, text=True,
                          timeout=300)
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    assert worker(run_dir) == 0
    ds = open_run(run_dir / "store.zarr").load()
    assert ds.step.values.tolist() == list(range(STEPS + 1))
    return ds


def assert_same_store(store: Path, ref) -> None:
    ds = open_run(store).load()
    assert ds.step.values.tolist() == ref.step.values.tolist()
    for name in [*ref.data_vars, *ref.coords]:
        np.testing.assert_array_equal(ds[name].values, ref[name].values, err_msg=name)
    assert set(ds.data_vars) == set(ref.data_vars)


@pytest.mark.parametrize("k", [1, 3])
def test_kill_right_after_a_checkpoint_loses_no_step(tmp_path, reference, k):
    """The checkpoint of step 2k is in place the moment the run dies: that step must be in the store."""
    assert worker(tmp_path, "--kill-after-checkpoint", str(k)) == -signal.SIGKILL
    committed = open_run(tmp_path / "store.zarr").step.values.tolist()
    assert committed == list(range(2 * k + 1))  # flushed before the checkpoint: nothing after it yet
    assert worker(tmp_path) == 0
    assert_same_store(tmp_path / "store.zarr", reference)


def test_kill_after_the_store_commit_before_the_checkpoint(tmp_path, reference):
    """The store holds step 4 but the last checkpoint is of step 2: resume replays 3-4, skips their capture."""
    assert worker(tmp_path, "--kill-before-checkpoint", "2") == -signal.SIGKILL
    assert open_run(tmp_path / "store.zarr").step.values.tolist() == list(range(5))
    assert worker(tmp_path) == 0
    assert_same_store(tmp_path / "store.zarr", reference)
