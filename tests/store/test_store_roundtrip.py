"""Writer -> reader round trip of every array, options, URLs, resume and refusals."""

import numpy as np
import pytest
import xarray as xr
from store_helpers import small_layout, step_data

import gradstore
from gradstore.errors import StoreError
from gradstore.store import SAMPLES, create_run, open_run

STEPS = (0, 3, 10)


def write_steps(target, layout, steps=STEPS, **kw):
    writer = create_run(target, layout, config={"lr": 0.1, "model": "tiny"}, seeds={"train": 0}, **kw)
    for s in steps:
        writer.append_step(s, **step_data(layout, s))
    return writer


def check_run(ds: xr.Dataset, layout, steps=STEPS):
    """Every array of ``ds`` equals what was written (cast to the storage dtype)."""
    assert ds.sizes["step"] == len(steps)
    np.testing.assert_array_equal(ds.step.values, steps)
    np.testing.assert_array_equal(ds.example.values, layout.example_ids)
    assert list(ds.layer.values) == list(layout.layers)
    assert list(ds.sample.values) == list(SAMPLES)
    np.testing.assert_array_equal(ds.true_label.values, layout.true_label)
    np.testing.assert_array_equal(ds.train_label.values, layout.train_label)
    np.testing.assert_array_equal(ds.corrupt.values, layout.true_label != layout.train_label)
    assert list(ds.split.values) == ["train"] * layout.n_train + ["test"] * (layout.n_example - layout.n_train)
    if layout.n_coord:
        assert list(ds.coord_layer.values) == list(layout.coord_layer)
        assert list(ds.coord_param.values) == list(layout.coord_param)
        np.testing.assert_array_equal(ds.coord_index.values, layout.coord_index)
    for i, s in enumerate(steps):
        want = step_data(layout, s)
        for key, value in want.items():
            got = ds[key].isel(step=i).values
            expected = np.asarray(value).astype(ds[key].dtype)
            np.testing.assert_array_equal(got, expected, err_msg=f"{key} at step {s}")
        assert not bool(ds.nonfinite.isel(step=i))


def test_round_trip_every_array(tmp_path, layout):
    write_steps(tmp_path / "run.zarr", layout)
    ds = open_run(tmp_path / "run.zarr")
    check_run(ds, layout)
    assert ds.grad_coords.dims == ("step", "example", "coord")
    assert ds.grad_proj.dims == ("step", "example", "layer", "proj")
    assert ds.gram.dims == ("step", "layer", "example", "example_")
    np.testing.assert_array_equal(ds.example_.values, layout.example_ids)
    assert ds.attrs["gradstore_schema"] == 3
    assert ds.attrs["config"] == {"lr": 0.1, "model": "tiny"}
    assert ds.attrs["seeds"] == {"train": 0}
    assert ds.attrs["projection_seed"] == 11
    assert ds.attrs["model"]["params"][1] == {"name": "fc1.bias", "shape": [4], "layer": "fc1"}
    assert "gradstore" in ds.attrs["code_version"]


def test_reader_is_lazy_with_one_step_per_chunk_for_large_arrays(tmp_path, layout):
    write_steps(tmp_path / "run.zarr", layout)
    ds = open_run(tmp_path / "run.zarr")
    for key in ("grad_coords", "grad_proj", "gram", "loss", "sq_norm", "m"):
        assert ds[key].chunks is not None, key  # dask-backed
    assert ds.grad_coords.chunks[0] == (1, 1, 1)
    assert ds.gram.chunks[0] == (1, 1, 1)


def test_top_level_open_run(tmp_path, layout):
    write_steps(tmp_path / "run.zarr", layout, steps=(5,))
    assert gradstore.open_run(str(tmp_path / "run.zarr")).step.values.tolist() == [5]


@pytest.mark.parametrize("dtype,compression", [("float16", "none"), ("float32", "blosc")])
def test_dtype_and_compression_options(tmp_path, dtype, compression):
    layout = small_layout(dtype=dtype, compression=compression)
    write_steps(tmp_path / "run.zarr", layout)
    ds = open_run(tmp_path / "run.zarr")
    assert ds.grad_coords.dtype == np.dtype(dtype) and ds.grad_proj.dtype == np.dtype(dtype)
    check_run(ds, layout)


def test_minimal_layout_without_optional_arrays(tmp_path):
    layout = small_layout(coord_layer=(), coord_param=(), coord_index=[], n_proj=0, gram=False, n_train=10)
    write_steps(tmp_path / "run.zarr", layout)
    ds = open_run(tmp_path / "run.zarr")
    assert not {"grad_coords", "grad_proj", "gram", "coord", "proj"} & set(ds.variables)
    check_run(ds, layout)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_urls(tmp_path, layout, scheme):
    url = f"memory://gradstore-test/{tmp_path.name}/run.zarr" if scheme == "memory" else (tmp_path / "r.zarr").as_uri()
    write_steps(url, layout)
    check_run(open_run(url), layout)


def test_nonfinite_values_are_stored_and_flagged(tmp_path, layout):
    writer = create_run(tmp_path / "run.zarr", layout)
    bad = step_data(layout, 1)
    bad["grad_coords"][2, 1] = np.inf
    bad["sq_norm"][0, 0] = np.nan
    writer.append_step(0, **step_data(layout, 0))
    writer.append_step(1, **bad)
    ds = open_run(tmp_path / "run.zarr")
    assert ds.nonfinite.values.tolist() == [False, True]
    assert np.isposinf(ds.grad_coords.values[1, 2, 1]) and np.isnan(ds.sq_norm.values[1, 0, 0])


def test_resume_appends_after_committed_steps(tmp_path, layout):
    write_steps(tmp_path / "run.zarr", layout, steps=(0, 3))
    writer = create_run(tmp_path / "run.zarr", layout)  # resume=True by default
    assert writer.committed == 2 and writer.last_step == 3
    writer.append_step(10, **step_data(layout, 10))
    check_run(open_run(tmp_path / "run.zarr"), layout)


def test_steps_must_increase(tmp_path, layout):
    writer = write_steps(tmp_path / "run.zarr", layout, steps=(4,))
    with pytest.raises(StoreError, match="not after the last committed step 4"):
        writer.append_step(4, **step_data(layout, 4))


@pytest.mark.parametrize("key,value,match", [
    ("sq_norm", np.zeros((10, 3)), r"sq_norm has shape \(10, 3\); this run needs \(10, 2\)"),
    ("correct", np.zeros(10), "correct must be boolean"),
    ("grad_coords", None, "grad_coords is required"),
])
def test_bad_step_data_is_refused(tmp_path, layout, key, value, match):
    writer = create_run(tmp_path / "run.zarr", layout)
    data = step_data(layout, 0)
    data[key] = value
    with pytest.raises(StoreError, match=match):
        writer.append_step(0, **data)
    assert open_run(tmp_path / "run.zarr").sizes["step"] == 0


def test_array_not_recorded_is_refused(tmp_path):
    layout = small_layout(gram=False)
    writer = create_run(tmp_path / "run.zarr", layout)
    with pytest.raises(StoreError, match="gram was given but the run"):
        writer.append_step(0, **step_data(small_layout(), 0))


@pytest.mark.parametrize("changes,what", [
    (dict(params=(("fc1.weight", (4, 3), "fc1"), ("fc1.bias", (5,), "fc1"), ("fc2.weight", (2, 4), "fc2"))), "the model"),
    (dict(example_ids=np.arange(10) + 1), "the tracked examples"),
    (dict(n_train=6), "the tracked examples"),
    (dict(train_label=np.zeros(10)), "the example labels"),
    (dict(coord_index=np.array([0, 3, 1, 5, 8])), "the sampled coordinate set"),
    (dict(projection_seed=12), "the projection"),
    (dict(gram=False), "whether Gram blocks"),
    (dict(dtype="float16"), "the storage dtype"),
])
def test_mismatched_append_is_refused(tmp_path, layout, changes, what):
    write_steps(tmp_path / "run.zarr", layout, steps=(0,))
    with pytest.raises(StoreError, match=f"cannot append to .*: {what}"):
        create_run(tmp_path / "run.zarr", small_layout(**changes))
    check_run(open_run(tmp_path / "run.zarr"), layout, steps=(0,))  # untouched


def test_existing_run_is_kept_unless_overwrite(tmp_path, layout):
    write_steps(tmp_path / "run.zarr", layout, steps=(0,))
    with pytest.raises(StoreError, match="already exists.*--resume"):
        create_run(tmp_path / "run.zarr", layout, resume=False)
    check_run(open_run(tmp_path / "run.zarr"), layout, steps=(0,))
    create_run(tmp_path / "run.zarr", small_layout(gram=False), overwrite=True)
    ds = open_run(tmp_path / "run.zarr")
    assert ds.sizes["step"] == 0 and "gram" not in ds


def test_never_overwrites_a_non_zarr_directory(tmp_path, layout):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a zarr store; refusing to overwrite"):
        create_run(tmp_path / "mine", layout, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_foreign_zarr_group_needs_overwrite(tmp_path, layout):
    import zarr

    zarr.open_group(tmp_path / "foreign.zarr", mode="w", zarr_format=3).create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(StoreError, match="not a gradstore run; choose another path"):
        create_run(tmp_path / "foreign.zarr", layout)


def test_bad_layout_is_refused():
    with pytest.raises(StoreError, match="n_train=11"):
        small_layout(n_train=11)
    with pytest.raises(StoreError, match="same length"):
        small_layout(coord_index=np.array([1, 2]))
    with pytest.raises(StoreError, match="dtype must be one of"):
        small_layout(dtype="float64")
    with pytest.raises(StoreError, match="need n_proj > 0 and a projection_seed"):
        small_layout(projection_seed=None)
    with pytest.raises(StoreError, match="JSON"):
        create_run("memory://gradstore-test/badcfg", small_layout(), config={"f": object()})
