"""Missing, foreign, damaged and future-schema stores give one clear StoreError; inspect exits 2."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr
from store_helpers import step_data

from gradstore.errors import StoreError
from gradstore.store import create_run, open_run
from pipelines.cli import main


@pytest.fixture
def run(tmp_path, layout):
    with create_run(tmp_path / "run.zarr", layout) as writer:
        writer.append_step(0, **step_data(layout, 0))
        writer.append_step(1, **step_data(layout, 1))
    return tmp_path / "run.zarr"


def _edit_root(path, **changes):
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"].update(changes)
    (path / "zarr.json").write_text(json.dumps(meta))


def test_missing_path(tmp_path):
    with pytest.raises(StoreError, match="no run store at"):
        open_run(tmp_path / "nothing.zarr")


def test_plain_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="holds no zarr v3 group"):
        open_run(tmp_path / "d")


def test_foreign_zarr_group(tmp_path):
    zarr.open_group(tmp_path / "f.zarr", mode="w", zarr_format=3).create_array("x", shape=(3,), dtype="i4")
    with pytest.raises(StoreError, match="zarr group but not a gradstore run"):
        open_run(tmp_path / "f.zarr")


def test_zarr_array_at_root(tmp_path):
    zarr.create_array(tmp_path / "a.zarr", shape=(3,), dtype="i4", zarr_format=3)
    with pytest.raises(StoreError, match="is a zarr array, not a gradstore run"):
        open_run(tmp_path / "a.zarr")


def test_unknown_schema_version(run):
    _edit_root(run, gradstore_schema=4)
    with pytest.raises(StoreError, match="schema 4; this gradstore reads schemas 2, 3 only"):
        open_run(run)


def test_schema_2_stores_are_read(run):
    """Schema 3 adds the optional per-parameter moments to 2: a store of version 2 (none stored)
    reads as before; one claiming them is refused as damaged."""
    storage = json.loads((run / "zarr.json").read_text())["attributes"]["storage"]
    _edit_root(run, gradstore_schema=2, storage={**storage, "param_moments": False})
    assert open_run(run).attrs["gradstore_schema"] == 2
    _edit_root(run, gradstore_schema=2, storage={**storage, "param_moments": True})
    with pytest.raises(StoreError, match="schema 2 has no per-parameter moments"):
        open_run(run)


def test_truncated_root_metadata(run):
    text = (run / "zarr.json").read_text()
    (run / "zarr.json").write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match="damaged root metadata"):
        open_run(run)


def test_bad_commit_counter(run):
    _edit_root(run, committed_steps="two")
    with pytest.raises(StoreError, match="damaged: root attribute 'committed_steps'"):
        open_run(run)


def test_counter_beyond_written_steps(run):
    _edit_root(run, committed_steps=5)
    with pytest.raises(StoreError, match=r"damaged: array .* holds 2 steps but the commit record says 5"):
        open_run(run)


def test_missing_array(run):
    shutil.rmtree(run / "sq_norm")
    with pytest.raises(StoreError, match="damaged: array 'sq_norm' is missing"):
        open_run(run)


def test_array_with_wrong_dimensions(run):
    meta = json.loads((run / "loss" / "zarr.json").read_text())
    meta["dimension_names"] = ["step", "examples"]
    (run / "loss" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="damaged: array 'loss' has dimensions"):
        open_run(run)


def test_damaged_chunk_found_by_verify(run, capsys):
    chunk = next(p for p in (run / "grad_coords").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--verify", str(run)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradstore: error: ") and "is damaged: array 'grad_coords'" in err[0]
    assert "unreadable" in err[0] and "step 0" in err[0]


def test_inspect_summary(run, capsys):
    main(["inspect", str(run)])
    out = capsys.readouterr().out
    assert "steps      2 committed, step 0 .. 1" in out
    assert "examples   10: 7 train (1 corrupt), 3 test" in out
    assert "layers     2: fc1, fc2" in out
    assert "recorded   coords 5, projection dim 4 (seed 11), gram yes" in out
    assert "schema     3" in out and "disk " in out


def test_inspect_exit_2_one_line(tmp_path):
    target = tmp_path / "x.zarr"
    zarr.open_group(target, mode="w", zarr_format=3)
    proc = subprocess.run([sys.executable, "-c", "from pipelines.cli import main; main()", "inspect", str(target)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradstore: error: ")


def test_memory_url_not_found():
    with pytest.raises(StoreError):
        open_run("memory://gradstore-test/never-written.zarr")


def test_interrupted_creation_is_reported_then_recreated(tmp_path, layout):
    zarr.open_group(tmp_path / "c.zarr", mode="w", zarr_format=3, attributes={"gradstore_creating": True})
    with pytest.raises(StoreError, match="creation was interrupted"):
        open_run(tmp_path / "c.zarr")
    writer = create_run(tmp_path / "c.zarr", layout, resume=False)  # a half-created run is not a run
    writer.append_step(0, **step_data(layout, 0))
    np.testing.assert_array_equal(open_run(tmp_path / "c.zarr").step.values, [0])


def test_inspect_memory_url(layout, capsys):
    url = "memory://gradstore-test/inspect-me.zarr"
    writer = create_run(url, layout, overwrite=True)
    writer.append_step(7, **step_data(layout, 7))
    main(["inspect", url])
    out = capsys.readouterr().out
    assert "steps      1 committed, step 7 .. 7" in out and "disk " in out and "grad_coords" in out
