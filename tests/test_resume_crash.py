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


# --- a full disk (finding 19) ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (skipped where mounting is not permitted, as in most CI containers)."""
    import shutil

    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.decode().strip()[:100]})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def used_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("share", [0.25, 0.6, 0.9])
def test_a_full_disk_is_one_line_and_resume_after_freeing_space_matches(tmp_path, small_disk, share):
    """The disk fills at a ``share`` of what the run needs: one line, no checkpoint.pt.tmp, committed steps
    readable; after freeing space --resume ends with the uninterrupted run's store."""
    import os

    from gradstore.errors import GradstoreError
    from resume_worker import recorded_run, recorder, tiny_data, tiny_model

    recorded_run(tmp_path / "reference")
    ref = open_run(tmp_path / "reference" / "store.zarr").load()
    (small_disk / "probe").mkdir()
    recorder(small_disk / "probe" / "store.zarr", tiny_model(), tiny_data()).close()
    created = used_bytes(small_disk / "probe")  # an empty store
    recorded_run(small_disk / "probe")
    need = used_bytes(small_disk / "probe")
    subprocess.run(["rm", "-rf", str(small_disk / "probe")], check=True)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(small_disk / "filler", "wb") as fh:  # the disk fills part way through training
        fh.write(b"\0" * (free - created - int(share * (need - created))))
    run_dir = small_disk / "run"
    with pytest.raises(GradstoreError) as exc:
        recorded_run(run_dir)
    text = str(exc.value)
    assert "\n" not in text and "no space left on device" in text.lower() and "resume" in text, text
    assert not (run_dir / "checkpoint.pt.tmp").exists()
    ds = open_run(run_dir / "store.zarr").load()  # committed steps stay readable and exact
    n = ds.sizes["step"]
    assert n < ref.sizes["step"]
    for name in ref.data_vars:
        np.testing.assert_array_equal(ds[name].values, ref[name].values[:n], err_msg=name)
    (small_disk / "filler").unlink()
    recorded_run(run_dir)
    assert_same_store(run_dir / "store.zarr", ref)


def test_a_full_disk_while_saving_the_checkpoint(tmp_path, small_disk):
    """The checkpoint's disk is full (the store's is not): one line, no checkpoint.pt.tmp; the steps before
    it stay committed, and --resume after freeing space ends with the uninterrupted run's store."""
    import os

    from gradstore.errors import GradstoreError
    from resume_worker import recorded_run

    recorded_run(tmp_path / "reference")
    ref = open_run(tmp_path / "reference" / "store.zarr").load()
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(small_disk / "filler", "wb") as fh:
        fh.write(b"\0" * free)
    checkpoint = small_disk / "checkpoint.pt"
    with pytest.raises(GradstoreError) as exc:
        recorded_run(tmp_path / "run", checkpoint=checkpoint)
    assert str(exc.value) == (f"saving checkpoint {checkpoint} failed: no space left on device; free space then "
                              "run again with --resume")
    assert sorted(os.listdir(small_disk)) == ["filler"]
    assert open_run(tmp_path / "run" / "store.zarr").step.values.tolist() == [0, 1, 2]  # flushed before it
    (small_disk / "filler").unlink()
    recorded_run(tmp_path / "run", checkpoint=checkpoint)
    assert_same_store(tmp_path / "run" / "store.zarr", ref)
