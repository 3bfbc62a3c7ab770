"""``gradstore analyze`` refuses a damaged store with verify's line, or leaves the damaged steps out."""

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from analysis.synthetic import synthetic_run, write_synthetic_store
from gradstore.store import open_run, verify_run
from pipelines.cli import main


@pytest.fixture
def store(tmp_path):
    return write_synthetic_store(tmp_path / "run", synthetic_run(n_steps=4, n_train=16, n_test=4, n_coords=16))


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gradstore")]
    assert exc.value.code == 2 and len(err) == 1
    return err[0]


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_damaged_store_is_refused_with_verify_message(store, tmp_path, capsys):
    """Findings 8, 9, 17: a flipped byte is one line naming array, chunk and step, not a codec traceback."""
    step = int(open_run(store).step.values[1])
    _flip(Path(store) / "grad_coords" / "c" / "1" / "0" / "0")
    line = _error_line(capsys, ["analyze", store, "--out", str(tmp_path / "out"), "--nulls", "5"])
    assert line == "gradstore: error: " + verify_run(store).message()
    assert f"array 'grad_coords', chunk 'grad_coords/c/1/0/0', step {step}: unreadable" in line
    assert "--skip-damaged" in line
    assert not (tmp_path / "out").exists()


def test_skip_damaged_leaves_out_only_the_damaged_steps(store, tmp_path, capsys):
    steps = open_run(store).step.values
    (Path(store) / "grad_coords" / "c" / "2" / "0" / "0").unlink()  # the third step's shard
    main(["analyze", store, "--out", str(tmp_path / "out"), "--nulls", "5", "--metrics", "coherence",
          "--skip-damaged"])
    assert f"leaving out 1 damaged step(s): {steps[2]}" in capsys.readouterr().err
    results = xr.open_zarr(tmp_path / "out" / "results.zarr", consolidated=False)
    assert list(results.step.values) == [s for i, s in enumerate(steps) if i != 2]
    assert results.attrs["skipped_steps"] == [int(steps[2])]
    # the kept steps' m-coherence is the intact run's (synthetic_run is deterministic)
    ds = synthetic_run(n_steps=4, n_train=16, n_test=4, n_coords=16)
    x = ds.grad_coords.values[[0, 1, 3], :16].astype(np.float64)
    expect = np.sum(x.sum(1) ** 2, 1) / np.sum(x**2, (1, 2))
    got = results.m_coherence.sel(source="exact", sample="tracked_train", layer="(model)").values
    np.testing.assert_allclose(got, expect, rtol=1e-5)


def test_damaged_static_array_cannot_be_skipped(store, tmp_path, capsys):
    (Path(store) / "train_label" / "c" / "0").unlink()
    line = _error_line(capsys, ["analyze", store, "--out", str(tmp_path / "out"), "--skip-damaged"])
    assert "array 'train_label', chunk 'train_label/c/0': chunk missing" in line
    assert "--skip-damaged" not in line
