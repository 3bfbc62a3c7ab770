"""Run stores on object storage for real: an S3-compatible server on localhost (moto's server mode),
reached through fsspec/s3fs exactly as a user's bucket would be.

What is checked against the same run written to a local directory: the Recorder (with a resume
part-way), ``open_run`` and plain ``xarray.open_zarr``, ``gradstore inspect`` and ``gradstore analyze``;
a writer process killed mid-step and resumed; damaged objects reported in one line; and the writer
lease that keeps one writer per store on S3 (docs/object-storage.md).
"""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gradstore.errors import StoreError
from gradstore.store import Recorder, Schedule, create_run, open_run
from pipelines.cli import main
from recorder_helpers import data, tiny_model
from s3_server import BUCKET, environment, serve
from store_helpers import small_layout, step_data

KILL_WORKER = Path(__file__).with_name("kill_worker.py")
N_STEPS = 4


@pytest.fixture(scope="module")
def s3():
    """``(endpoint, s3fs filesystem)`` of a moto server with the bucket ``BUCKET``, for this module."""
    with pytest.MonkeyPatch.context() as mp, serve(mp) as server:
        yield server


def url(*parts) -> str:
    return "s3://" + "/".join((BUCKET,) + parts)


def run_cli(capsys, *argv):
    """Exit status, stdout and stderr of ``gradstore ARGV`` in this process."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_same_run(got: xr.Dataset, want: xr.Dataset) -> None:
    """Every coordinate and variable equal, bit for bit (the same values were written)."""
    assert set(got.variables) == set(want.variables)
    for key in want.variables:
        np.testing.assert_array_equal(got[key].values, want[key].values, err_msg=key)


# ---------------------------------------------------------------------- the Recorder on s3://
@pytest.fixture(scope="module")
def recorded(s3, tmp_path_factory):
    """One training loop recorded to a local store and to s3:// (there in two Recorders: the second
    resumes the store the first closed)."""
    local = tmp_path_factory.mktemp("local") / "store.zarr"
    remote = url("run", "store.zarr")
    torch.manual_seed(0)
    model = tiny_model()
    x, y = data(7, 1)
    xt, yt = data(4, 2)
    kw = dict(train_inputs=x, train_targets=y, train_ids=np.arange(7) + 10, test_inputs=xt, test_targets=yt,
              test_ids=np.arange(4) + 90, schedule=Schedule.every(1), coords_per_layer=4, n_proj=3,
              projection_seed=2, gram=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(local, model, **kw) as here:
        there = Recorder(remote, model, **kw)
        for step in range(N_STEPS):
            if step == 2:  # the second half goes to a new Recorder that resumes the s3 store
                there.close()
                there = Recorder(remote, model, **kw)
                assert there.committed == 2
            here.maybe_record(step, model, lr=0.1)
            there.maybe_record(step, model, lr=0.1)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        there.close()
    return local, remote


def test_recorder_on_s3_equals_local(s3, recorded):
    local, remote = recorded
    want = open_run(local).load()
    assert want.sizes["step"] == N_STEPS
    assert_same_run(open_run(remote).load(), want)
    # plain xarray through fsspec: the commit record (consolidated metadata) is all it needs
    plain_local, plain_remote = xr.open_zarr(local), xr.open_zarr(remote)
    assert plain_remote.sizes == plain_local.sizes
    for key in plain_local.variables:
        np.testing.assert_array_equal(plain_remote[key].values, plain_local[key].values, err_msg=key)
    # the lease object is gone once the last writer closed
    assert not s3[1].exists(f"{BUCKET}/run/store.zarr.gradstore-lock")


def test_inspect_and_analyze_on_s3_agree_with_local(s3, recorded, tmp_path, capsys):
    local, remote = recorded
    code, out, err = run_cli(capsys, "inspect", remote, "--verify")
    assert code == 0, err
    assert f"steps      {N_STEPS} committed, step 0 .. {N_STEPS - 1}" in out
    assert "every chunk checksum and step digest matches" in out
    code, local_out, _ = run_cli(capsys, "inspect", local)
    assert [line for line in out.splitlines() if line.startswith(("steps", "examples", "layers", "recorded"))] == \
        [line for line in local_out.splitlines() if line.startswith(("steps", "examples", "layers", "recorded"))]

    results = {}
    for where, store in (("local", local), ("s3", remote)):
        code, _, err = run_cli(capsys, "analyze", store, "--out", tmp_path / where, "--nulls", "8",
                               "--metrics", "coherence,stiffness")
        assert code == 0, err
        results[where] = xr.open_zarr(tmp_path / where / "results.zarr", consolidated=False).load()
    assert set(results["s3"].data_vars) == set(results["local"].data_vars) and results["local"].data_vars
    for key in results["local"].variables:
        np.testing.assert_array_equal(results["s3"][key].values, results["local"][key].values, err_msg=key)
    tables = sorted(p.name for p in (tmp_path / "local").glob("*.csv"))
    assert tables and tables == sorted(p.name for p in (tmp_path / "s3").glob("*.csv"))
    for name in tables:
        assert (tmp_path / "s3" / name).read_text() == (tmp_path / "local" / name).read_text(), name


# ---------------------------------------------------------------------- kill -9 and resume
def local_run(path: Path, steps: int) -> Path:
    """``steps`` steps of :func:`store_helpers.step_data` written to a local store."""
    layout = small_layout()
    with create_run(path, layout) as writer:
        for step in range(steps):
            writer.append_step(step, **step_data(layout, step))
    return path


def upload(fs, path: Path, *parts) -> str:
    """A copy of the local store ``path`` on s3:// (faster than writing it there step by step)."""
    fs.put(str(path), "/".join((BUCKET,) + parts), recursive=True)
    return url(*parts)


def kill_run(store: str, moment: str, k: int) -> int:
    """Run kill_worker.py on ``store`` until it SIGKILLs itself at the k-th ``moment``; its exit code."""
    proc = subprocess.run([sys.executable, str(KILL_WORKER), store, "5", moment, str(k)], env=environment(),
                          capture_output=True, text=True, timeout=120)
    return proc.returncode


#: writes of one step of small_layout(): 17 arrays and the step's digests
WRITES_PER_STEP = 18


def test_killed_writer_resumes_on_s3(s3, tmp_path):
    fs = s3[1]
    want = open_run(local_run(tmp_path / "ref.zarr", 5)).load()  # the uninterrupted run
    store = upload(fs, local_run(tmp_path / "start.zarr", 2), "killed", "store.zarr")
    lease = f"{BUCKET}/killed/store.zarr.gradstore-lock"

    # a writer process resumes the store and is killed just before the commit of step 2: the
    # step is fully written, not committed
    assert kill_run(store, "commit", 1) == -9
    assert json.loads(fs.cat(lease))["host"] == socket.gethostname()  # the dead writer's lease is left
    assert fs.exists(f"{BUCKET}/killed/store.zarr/gram/c/2/0/0/0")
    assert_same_run(open_run(store).load(), want.isel(step=slice(0, 2)))  # readers: committed steps only
    assert xr.open_zarr(store).sizes["step"] == 2

    # the next one takes the dead writer's lease over at once, drops step 2's leftovers, writes
    # step 2 again and is killed in the middle of step 3
    assert kill_run(store, "write", WRITES_PER_STEP + 5) == -9
    assert json.loads(fs.cat(f"{BUCKET}/killed/store.zarr/zarr.json"))["attributes"]["committed_steps"] == 3

    # a third one runs to the end, slowly, while this process reads: whole committed steps only
    seen = []
    with subprocess.Popen([sys.executable, str(KILL_WORKER), store, "5", "never", "0", "--slow", "0.3"],
                          env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        while proc.poll() is None:
            ds = open_run(store).load()
            assert_same_run(ds, want.isel(step=slice(0, ds.sizes["step"])))
            seen.append(ds.sizes["step"])
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert seen and seen == sorted(seen) and seen[0] >= 3
    assert_same_run(open_run(store).load(), want)
    assert not fs.exists(lease)


# ---------------------------------------------------------------------- damage, reported in one line
@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_damaged_objects_on_s3_are_reported_as_locally(s3, tmp_path, capsys, damage):
    fs = s3[1]
    local = local_run(tmp_path / "store.zarr", 3)
    remote = upload(fs, local, "damaged", damage, "store.zarr")
    assert open_run(remote).sizes["step"] == 3
    chunk = "gram/c/1/0/0/0"
    if damage == "missing":
        (local / chunk).unlink()
        fs.rm(f"{BUCKET}/damaged/{damage}/store.zarr/{chunk}")
    else:
        raw = bytearray((local / chunk).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (local / chunk).write_bytes(bytes(raw))
        fs.pipe(f"{BUCKET}/damaged/{damage}/store.zarr/{chunk}", bytes(raw))
    lines = {}
    for where, target in (("local", local), ("s3", remote)):
        code, _, err = run_cli(capsys, "inspect", target, "--verify")
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and err.startswith("gradstore: error: "), err
        lines[where] = err.strip().replace(str(target), "STORE")
    assert lines["s3"] == lines["local"]
    assert "array 'gram', chunk 'gram/c/1/0/0/0', step 1" in lines["s3"]
    if damage == "missing":  # a reader refuses it too, in one line
        with pytest.raises(StoreError, match=r"array 'gram', chunk 'gram/c/1/0/0/0', step 1: chunk missing") as info:
            open_run(remote)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- one writer per store on s3://
def test_second_writer_is_refused_until_the_first_closes(s3):
    layout, store = small_layout(), url("locked", "store.zarr")
    first = create_run(store, layout)
    with pytest.raises(StoreError, match=rf"is being written by pid \d+ on host {socket.gethostname()}") as info:
        create_run(store, layout)
    assert "\n" not in str(info.value)
    first.append_step(0, **step_data(layout, 0))
    first.close()
    with create_run(store, layout) as second:
        assert second.committed == 1


def write_lease(fs, store_key: str, **fields) -> None:
    fs.pipe(store_key + ".gradstore-lock", json.dumps(fields).encode())


def test_lease_of_another_host_is_respected_until_it_expires(s3):
    layout, store, fs = small_layout(), url("leased", "store.zarr"), s3[1]
    key = f"{BUCKET}/leased/store.zarr"
    write_lease(fs, key, pid=1, host="elsewhere", since="2026-01-01T00:00:00Z", token="x",
                expires=time.time() + 600)
    with pytest.raises(StoreError, match="being written by pid 1 on host elsewhere .* expires"):
        create_run(store, layout)
    assert not fs.exists(key + "/zarr.json")  # nothing was written
    write_lease(fs, key, pid=1, host="elsewhere", since="2026-01-01T00:00:00Z", token="x",
                expires=time.time() - 1)
    with create_run(store, layout) as writer:  # expired: taken over
        assert json.loads(fs.cat(key + ".gradstore-lock"))["host"] == socket.gethostname()
        writer.append_step(0, **step_data(layout, 0))
    assert open_run(store).sizes["step"] == 1


def test_writer_that_lost_its_lease_commits_nothing(s3, monkeypatch):
    import gradstore.store._lock as lock_module

    monkeypatch.setattr(lock_module, "LEASE_SECONDS", 1.0)  # renewed every 0.25 s
    layout, store, fs = small_layout(), url("lost", "store.zarr"), s3[1]
    key = f"{BUCKET}/lost/store.zarr.gradstore-lock"
    writer = create_run(store, layout)
    first = json.loads(fs.cat(key))["expires"]
    time.sleep(0.8)  # longer than the lease: it is renewed meanwhile
    assert json.loads(fs.cat(key))["expires"] > first
    writer.append_step(0, **step_data(layout, 0))
    write_lease(fs, key.removesuffix(".gradstore-lock"), pid=1, host="elsewhere", since="now", token="y",
                expires=time.time() + 600)  # another writer took the lease over
    time.sleep(0.8)
    with pytest.raises(StoreError, match="lost the writer lock .*another writer replaced its lease") as info:
        writer.append_step(1, **step_data(layout, 1))
    assert "\n" not in str(info.value)
    writer.close()
    assert json.loads(fs.cat(key))["host"] == "elsewhere"  # a lost lease is not deleted on close
    assert open_run(store).sizes["step"] == 1


@pytest.mark.parametrize("ignored", ["If-None-Match", "If-Match"])
def test_endpoint_ignoring_conditional_writes_is_refused(s3, monkeypatch, ignored):
    import s3fs

    pipe = s3fs.S3FileSystem._pipe_file

    async def unconditional(self, path, data, mode="overwrite", **kwargs):  # an endpoint ignoring one header
        kwargs.pop("IfMatch", None)
        return await pipe(self, path, data, mode="overwrite" if ignored == "If-None-Match" else mode, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", unconditional)
    with pytest.raises(StoreError, match=rf"ignores conditional writes \({ignored}\)"):
        create_run(url("unconditional", ignored, "store.zarr"), small_layout())
    monkeypatch.undo()
    assert not s3[1].exists(f"{BUCKET}/unconditional/{ignored}/store.zarr.gradstore-lock")


def test_unlockable_places_are_refused_in_one_line(s3):
    layout, fs = small_layout(), s3[1]
    fs.mkdir("empty-bucket")
    with pytest.raises(StoreError, match="under a prefix of its bucket"):
        create_run("s3://empty-bucket", layout)
    fs.pipe(f"{BUCKET}/notes/readme.txt", b"not a store")
    with pytest.raises(StoreError, match="exists and is not a zarr store"):
        create_run(url("notes"), layout)
    assert fs.cat(f"{BUCKET}/notes/readme.txt") == b"not a store"
    with pytest.raises(StoreError, match="check that the bucket exists"):
        create_run("s3://no-such-bucket/run/store.zarr", layout)


def test_second_writer_on_memory_is_refused():
    layout = small_layout()
    with create_run("memory://lock-test/store.zarr", layout, overwrite=True):
        with pytest.raises(StoreError, match="is being written by pid"):
            create_run("memory://lock-test/store.zarr", layout)
    with create_run("memory://lock-test/store.zarr", layout) as again:
        assert again.committed == 0


def test_writing_where_no_lock_can_be_held_is_refused():
    from types import SimpleNamespace

    from gradstore.store._lock import object_lock

    store = SimpleNamespace(fs=SimpleNamespace(protocol=("gs", "gcs")), path="bucket/run/store.zarr")
    with pytest.raises(StoreError, match="not on gs://; write the run locally and copy the finished store"):
        object_lock(store, "gs://bucket/run/store.zarr")
