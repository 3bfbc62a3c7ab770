"""Store integrity (issue 12): the commit protocol under kills at chosen moments, readers during
writes, one writer, damage detection (missing, flipped, swapped chunks; a forged commit record),
and refusals that change nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from store_helpers import small_layout, step_data

from gradstore.errors import StoreError
from gradstore.store import RunLayout, create_run, open_run, verify_run
from pipelines.cli import main

WORKER = Path(__file__).with_name("kill_worker.py")
N = 6


def write(path, layout, steps):
    with create_run(path, layout) as writer:
        for s in steps:
            writer.append_step(s, **step_data(layout, s))
    return path


def worker(store, moment="never", k=1, n=N, *args, wait=True):
    cmd = [sys.executable, str(WORKER), str(store), str(n), moment, str(k), *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def assert_same_run(a: xr.Dataset, b: xr.Dataset):
    assert a.sizes == b.sizes
    for key in list(b.variables):
        np.testing.assert_array_equal(a[key].values, b[key].values, err_msg=key)


def raw_steps(path, key="loss"):
    """An array's own stored values (zarr directly, not through the commit record)."""
    return zarr.open_group(path, mode="r", use_consolidated=False)[key][...]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert worker(path).returncode == 0
    return open_run(path).load()


# ------------------------------------------------------------------ kills at chosen moments
# per step: 18 per-step arrays grown and 18 slots written (the digest too); moments in step 3
MOMENTS = [("resize", 2 * 18 + 1), ("resize", 2 * 18 + 9), ("write", 2 * 18 + 10), ("commit", 3),
           ("committed", 3)]


@pytest.mark.parametrize("moment,k", MOMENTS, ids=[f"{m}-{k}" for m, k in MOMENTS])
def test_kill_at_chosen_moment_then_resume_equals_uninterrupted_run(tmp_path, reference, moment, k):
    store = tmp_path / "run.zarr"
    proc = worker(store, moment, k)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    committed = 3 if moment == "committed" else 2
    # a reader right after the kill: plain xarray and gradstore see exactly the committed steps
    plain = xr.open_zarr(store)
    assert plain.sizes["step"] == committed == plain.attrs["committed_steps"]
    assert_same_run(open_run(store).load(), reference.isel(step=slice(0, committed)))
    assert worker(store).returncode == 0  # resume: discards the one uncommitted step, goes on
    resumed = open_run(store).load()
    assert_same_run(resumed, reference)
    assert verify_run(store).ok
    assert not list(store.rglob("*.partial"))


def test_readers_during_writes_never_fail(tmp_path, reference):
    """Finding 12: a plain xarray reader in a loop while steps are appended: zero failures."""
    store = tmp_path / "run.zarr"
    reads, sizes = 0, set()
    with worker(store, "never", 1, 80, "--slow", "0.02", wait=False) as proc:
        assert proc.stdout.readline().startswith("open")
        while proc.poll() is None:
            plain = xr.open_zarr(store)
            n = plain.sizes["step"]
            assert n == plain.attrs["committed_steps"]
            assert np.all(np.isfinite(plain.loss.values))  # every step read is whole
            assert open_run(store).sizes["step"] >= n
            sizes.add(n)
            reads += 1
    assert proc.returncode == 0
    assert reads > 20 and len(sizes) > 5, (reads, sizes)


# ------------------------------------------------------------------ the commit record
def _edit_root(path, attrs=None, shape=None):
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"].update(attrs or {})
    if shape is not None:
        for doc in meta["consolidated_metadata"]["metadata"].values():
            if doc["dimension_names"][0] == "step":
                doc["shape"][0] = shape
    (path / "zarr.json").write_text(json.dumps(meta))


def test_resume_refuses_a_counter_behind_the_data_and_deletes_nothing(tmp_path, layout):
    """Finding 2: a counter edited down to 2 of 13 steps is damage; nothing is shrunk or deleted."""
    store = write(tmp_path / "run.zarr", layout, range(13))
    before = raw_steps(store)
    _edit_root(store, {"committed_steps": 2, "last_step": 1}, shape=2)
    with pytest.raises(StoreError, match=r"holds 13 steps but the commit record says 2.*nothing was changed"):
        create_run(store, layout)
    after = raw_steps(store)
    assert after.shape[0] == 13
    np.testing.assert_array_equal(after, before)


def test_counter_ahead_of_the_data_is_damage(tmp_path, layout):
    """Finding 10: committed_steps and every shape grown to 3 over 2 written steps: not fill values."""
    store = write(tmp_path / "run.zarr", layout, (0, 1))
    _edit_root(store, {"committed_steps": 3, "last_step": 2}, shape=3)
    for key in ("loss", "step", "grad_coords", "step_crc32c"):
        meta = json.loads((store / key / "zarr.json").read_text())
        meta["shape"][0] = 3
        (store / key / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"damaged: array 'grad_coords', chunk 'grad_coords/c/2/0/0', step index 2"):
        open_run(store)
    with pytest.raises(StoreError, match="damaged"):
        create_run(store, layout)
    found = verify_run(store)
    assert not found.ok and found.damaged_indices == [2]


def test_last_step_disagreeing_with_step_is_damage(tmp_path, layout):
    store = write(tmp_path / "run.zarr", layout, (0, 4))
    _edit_root(store, {"last_step": 9})
    with pytest.raises(StoreError, match="'last_step' is 9 but the last committed step is 4"):
        open_run(store)
    with pytest.raises(StoreError, match="'last_step' is 9"):
        create_run(store, layout)


def test_damaged_root_is_not_called_foreign_and_is_kept(tmp_path, layout):
    """Finding 20: damaged root metadata on resume is reported as damaged, and nothing is replaced."""
    store = write(tmp_path / "run.zarr", layout, (0,))
    text = (store / "zarr.json").read_text()
    (store / "zarr.json").write_text(text[: len(text) // 2])
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="damaged root zarr.json; nothing was changed"):
            create_run(store, layout, overwrite=overwrite)
    assert (store / "zarr.json").read_text() == text[: len(text) // 2]


# ------------------------------------------------------------------ one writer
def test_second_writer_in_this_process_is_refused_with_the_holder(tmp_path, layout):
    """Finding 3: no two writers; the second is told who holds the store."""
    store = tmp_path / "run.zarr"
    with create_run(store, layout) as first:
        first.append_step(0, **step_data(layout, 0))
        with pytest.raises(StoreError, match=rf"being written by pid {os.getpid()} on host"):
            create_run(store, layout)
        with pytest.raises(StoreError, match="being written by"):
            create_run(store, layout, overwrite=True)
        first.append_step(1, **step_data(layout, 1))
    with create_run(store, layout) as second:  # released on close
        assert second.committed == 2


def test_writer_in_another_process_holds_the_lock_until_it_dies(tmp_path, layout):
    """Finding 3: a second process is refused while a writer lives; its lock dies with it (no stale lock)."""
    store = tmp_path / "run.zarr"
    with worker(store, "never", 1, 10_000, "--slow", "0.01", wait=False) as proc:
        assert proc.stdout.readline().startswith("open")
        while open_run(store).sizes["step"] == 0:
            time.sleep(0.01)
        with pytest.raises(StoreError, match=rf"being written by pid {proc.pid}"):
            create_run(store, layout)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with create_run(store, layout) as writer:  # the crashed writer's lock is gone
        committed = writer.committed
        writer.append_step(writer.last_step + 1, **step_data(layout, writer.last_step + 1))
    assert committed > 0 and verify_run(store).ok


def test_closed_writer_refuses_appends(tmp_path, layout):
    writer = create_run(tmp_path / "run.zarr", layout)
    writer.close()
    with pytest.raises(StoreError, match="closed"):
        writer.append_step(0, **step_data(layout, 0))


# ------------------------------------------------------------------ overwrite
def test_overwrite_deletes_only_what_the_store_owns(tmp_path, layout):
    """Finding 5: overwrite=True on a folder with zarr.json and other files deletes nothing."""
    store = write(tmp_path / "run.zarr", layout, (0, 1))
    (store / "notes.txt").write_text("mine")
    (store / "figures").mkdir()
    (store / "figures" / "a.png").write_bytes(b"png")
    with pytest.raises(StoreError, match=r"not part of a gradstore run \(figures, notes.txt\); nothing was deleted"):
        create_run(store, small_layout(gram=False), overwrite=True)
    assert (store / "notes.txt").read_text() == "mine" and (store / "figures" / "a.png").exists()
    assert open_run(store).sizes["step"] == 2
    (store / "notes.txt").unlink()
    shutil.rmtree(store / "figures")
    with create_run(store, small_layout(gram=False), overwrite=True):
        pass
    ds = open_run(store)
    assert ds.sizes["step"] == 0 and "gram" not in ds and not (store / "gram").exists()


def test_overwrite_of_a_foreign_zarr_store_deletes_nothing(tmp_path, layout):
    zarr.open_group(tmp_path / "f.zarr", mode="w", zarr_format=3).create_array("theirs", shape=(2,), dtype="f4")
    with pytest.raises(StoreError, match=r"not part of a gradstore run \(theirs\)"):
        create_run(tmp_path / "f.zarr", layout, overwrite=True)
    assert (tmp_path / "f.zarr" / "theirs" / "zarr.json").exists()


# ------------------------------------------------------------------ damaged chunks
@pytest.fixture
def run(tmp_path, layout):
    return write(tmp_path / "run.zarr", layout, (0, 5, 9))


def _inspect_verify(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--verify", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("gradstore: error: ")
    return err[0]


def test_deleted_chunk_is_damage_not_fill_values(run, capsys):
    """Finding 8: a deleted chunk is named at open, by verify and by inspect --verify (exit 2)."""
    (run / "grad_proj" / "c" / "1" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"array 'grad_proj', chunk 'grad_proj/c/1/0/0/0', step 5: chunk missing"):
        open_run(run)
    assert verify_run(run).damaged_indices == [1]
    line = _inspect_verify(run, capsys)
    assert "grad_proj/c/1/0/0/0" in line and "step 5" in line
    ds = open_run(run, skip_steps=[1])  # what analyze --skip-damaged opens
    assert list(ds.step.values) == [0, 9] and ds.attrs["skipped_steps"] == [5]


def test_deleted_static_chunk_is_damage(run):
    """Finding 17: deleted `example` chunk is named, not a crash."""
    (run / "example" / "c" / "0").unlink()
    with pytest.raises(StoreError, match=r"array 'example', chunk 'example/c/0': chunk missing"):
        open_run(run)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_flipped_bytes_are_detected(tmp_path, compression, capsys):
    """Finding 9: a flipped byte in a chunk fails its CRC32C instead of decoding to another number."""
    layout = small_layout(compression=compression)
    store = write(tmp_path / "run.zarr", layout, (0, 1))
    chunk = store / "loss" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    found = verify_run(store)
    assert found.damaged_indices == [0, 1] and all(p.array == "loss" for p in found.problems)
    assert "unreadable" in found.problems[0].what
    line = _inspect_verify(store, capsys)
    assert "array 'loss', chunk 'loss/c/0/0', steps 0, 1: unreadable" in line


def test_swapped_shards_are_detected(run):
    """Finding 9: two steps' shard files swapped decode fine but fail the steps' digests."""
    a, b = run / "gram" / "c" / "0" / "0" / "0" / "0", run / "gram" / "c" / "2" / "0" / "0" / "0"
    tmp = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(tmp)
    open_run(run).gram.values  # noqa: B018  (decodes: every chunk checksum is intact)
    found = verify_run(run)
    assert {(p.array, p.step) for p in found.problems} == {("gram", 0), ("gram", 9)}
    assert "digest mismatch" in found.problems[0].what


def test_store_without_checksums_says_so(tmp_path, capsys):
    store = write(tmp_path / "run.zarr", small_layout(checksums=False), (0,))
    assert verify_run(store).ok and not verify_run(store).checksums
    main(["inspect", "--verify", str(store)])
    assert "this store has no checksums" in capsys.readouterr().out


# ------------------------------------------------------------------ API misuse
def test_duplicate_and_non_integer_example_ids_are_refused():
    """Finding 11: duplicate ids (a test id equal to a train id) and float ids."""
    with pytest.raises(StoreError, match=r"example_ids must be unique.*\[103\]"):
        small_layout(example_ids=np.array([100, 103, 106, 109, 112, 115, 118, 103, 124, 127]))
    with pytest.raises(StoreError, match="integer"):
        small_layout(example_ids=np.arange(10) + 0.5)


def test_bad_step_and_target_types_are_refused(tmp_path, layout):
    """Finding 23: append_step("x"), open_run(None), create_run without a RunLayout."""
    with create_run(tmp_path / "run.zarr", layout) as writer:
        for bad in ("x", 1.5, -1, True):
            with pytest.raises(StoreError, match="step must be an integer >= 0"):
                writer.append_step(bad, **step_data(layout, 0))
    with pytest.raises(StoreError, match="a run store is a path or URL"):
        open_run(None)
    with pytest.raises(StoreError, match="layout must be a gradstore.store.RunLayout"):
        create_run(tmp_path / "other.zarr", {"layers": ["a"]})
    assert isinstance(layout, RunLayout)


def test_read_during_append_sees_committed_length(tmp_path, layout):
    """Finding 12 (deterministic): arrays grown one at a time are never seen by a reader."""
    store = write(tmp_path / "run.zarr", layout, (0, 1))
    arrays = zarr.open_group(store, mode="r+", use_consolidated=False)
    arrays["loss"].resize((3, layout.n_example))  # an append in progress: one array grown
    plain = xr.open_zarr(store)
    assert plain.sizes["step"] == 2 and plain.loss.shape == (2, layout.n_example)
    assert open_run(store).sizes["step"] == 2
    time.sleep(0)


def test_a_failed_write_is_one_line_and_keeps_the_committed_steps(tmp_path, layout, monkeypatch):
    """Finding 19 (store side): an OSError such as a full disk mid-append commits nothing, loses nothing."""
    import errno

    store = tmp_path / "run.zarr"
    with create_run(store, layout) as writer:
        writer.append_step(0, **step_data(layout, 0))
        setitem = zarr.AsyncArray.setitem
        calls = {"n": 0}

        async def full(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return await setitem(self, *a, **kw)

        monkeypatch.setattr(zarr.AsyncArray, "setitem", full)
        with pytest.raises(StoreError, match=r"writing step 1 .* failed \(No space left on device\); it was not "
                                             r"committed and the 1 committed step"):
            writer.append_step(1, **step_data(layout, 1))
        monkeypatch.setattr(zarr.AsyncArray, "setitem", setitem)
        assert writer.committed == 1 and open_run(store).sizes["step"] == 1
        writer.append_step(1, **step_data(layout, 1))  # space freed: the same step goes in
    assert verify_run(store).ok and list(open_run(store).step.values) == [0, 1]
