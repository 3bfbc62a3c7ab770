"""A process without gradstore opens a run with plain xarray + zarr and reads the same values."""

import json
import subprocess
import sys

import numpy as np
from store_helpers import step_data

from gradstore.store import create_run, open_run

SCRIPT = r"""
import json, sys
sys.path = [p for p in sys.path if p not in ("", ".")]
import xarray as xr
ds = xr.open_zarr(sys.argv[1])  # the root's consolidated metadata: the commit record
assert not any(m == "gradstore" or m.startswith(("gradstore.", "pipelines", "torch")) for m in sys.modules), \
    sorted(m for m in sys.modules if m.startswith(("gradstore", "pipelines", "torch")))
out = {k: ds[k].values.tolist() for k in ("step", "loss", "grad_coords", "gram", "m", "coord_param", "split", "stored")}
out["dims"] = {k: list(ds[k].dims) for k in ds.variables}
out["coords"] = sorted(ds.coords)
out["schema"] = ds.attrs["gradstore_schema"]
tree = xr.open_datatree(sys.argv[1], engine="zarr")
out["tree_sizes"] = dict(tree.ds.sizes)
print(json.dumps(out))
"""


def test_plain_xarray_reads_the_store_without_gradstore(tmp_path, layout):
    with create_run(tmp_path / "run.zarr", layout) as writer:
        for s in (0, 5):
            writer.append_step(s, **step_data(layout, s))
    proc = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(tmp_path / "run.zarr")], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ds = open_run(tmp_path / "run.zarr")
    assert got["schema"] == 3 and got["step"] == [0, 5]
    # xarray.open_datatree sees the same root dataset, plus the integrity arrays gradstore hides
    assert got["tree_sizes"] == {**ds.sizes, "stored": len(got["stored"])}
    assert got["dims"].pop("step_crc32c") == ["step", "stored"] and got["dims"].pop("stored") == ["stored"]
    assert "loss" in got["stored"] and "step" in got["stored"]
    for key in ("loss", "grad_coords", "gram", "m"):
        np.testing.assert_array_equal(np.array(got[key]), ds[key].values)
    assert got["coord_param"] == list(layout.coord_param)
    got["coords"].remove("stored")
    assert got["split"] == ["train"] * 7 + ["test"] * 3
    assert {k: tuple(v) for k, v in got["dims"].items()} == {k: ds[k].dims for k in ds.variables}
    assert {"coord_layer", "coord_param", "coord_index", "true_label", "train_label", "corrupt", "split"} <= set(
        got["coords"])


def test_import_store_does_not_import_torch():
    code = "import sys, gradstore.store, gradstore; gradstore.open_run; assert 'torch' not in sys.modules, 'torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
