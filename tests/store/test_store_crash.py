"""kill -9 a capturing process at random moments: committed steps stay exact, readers see only
committed steps, and the restarted run continues to the end."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from gradstore.store import open_run

WORKER = Path(__file__).with_name("crash_worker.py")
N_STEPS = 20
KILLS = 10


@pytest.fixture
def server():
    proc = subprocess.Popen([sys.executable, str(WORKER), str(N_STEPS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    with proc:
        assert proc.stdout.readline().strip() == "loaded"
        yield proc
        proc.stdin.close()
        proc.wait(timeout=60)


def launch(server, store) -> int:
    server.stdin.write(f"{store}\n")
    server.stdin.flush()
    pid = int(server.stdout.readline().split()[1])
    assert server.stdout.readline().strip() == "ready"
    return pid


def finish(server, pid) -> int:
    """Read the child's remaining lines; return its exit code (-9: killed)."""
    while True:
        words = server.stdout.readline().split()
        if words[:2] == ["exit", str(pid)]:
            return int(words[2])


def check_prefix(ds: xr.Dataset, ref: xr.Dataset) -> int:
    """Every variable of ``ds`` equals the first steps of ``ref``; returns the number of steps."""
    n = ds.sizes["step"]
    want = ref.isel(step=slice(0, n))
    for key in ref.data_vars:
        np.testing.assert_array_equal(ds[key].values, want[key].values, err_msg=f"{key}, {n} committed steps")
    np.testing.assert_array_equal(ds.step.values, want.step.values)
    return n


def test_sigkill_at_random_moments(tmp_path, server):
    assert finish(server, launch(server, tmp_path / "ref.zarr")) == 0
    ref = open_run(tmp_path / "ref.zarr").load()
    assert ref.sizes["step"] == N_STEPS

    rng = random.Random(1234)
    store, seen, kills, reads = tmp_path / "run.zarr", [], 0, 0
    while True:
        pid = launch(server, store)
        if kills == KILLS:
            assert finish(server, pid) == 0
            break
        deadline = time.monotonic() + rng.uniform(0.0, 0.4)
        while time.monotonic() < deadline:  # a reader during writes sees committed steps only
            check_prefix(open_run(store), ref)
            reads += 1
        os.kill(pid, signal.SIGKILL)
        if finish(server, pid) == -signal.SIGKILL:
            kills += 1
            seen.append(check_prefix(open_run(store), ref))
    assert seen == sorted(seen) and seen[-1] < N_STEPS  # progress kept across kills, never lost
    assert reads > 0
    assert check_prefix(open_run(store), ref) == N_STEPS
    assert not list(store.rglob("*.partial"))  # leftovers of killed writes are removed on resume
