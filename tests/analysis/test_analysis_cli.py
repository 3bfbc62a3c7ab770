"""``gradstore analyze`` on a real run store written by the store writer."""

import numpy as np
import pytest
import xarray as xr

from analysis.report import open_store
from analysis.synthetic import synthetic_run, write_synthetic_store
from gradstore.errors import StoreError
from pipelines.cli import main


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run"
    return write_synthetic_store(path, synthetic_run(n_steps=4, n_train=16, n_test=4, n_coords=16))


def test_analyze_writes_results_tables_and_plots(store, tmp_path, capsys):
    out = tmp_path / "out"
    main(["analyze", store, "--out", str(out), "--nulls", "20", "--seed", "3"])
    assert "wrote" in capsys.readouterr().out
    for name in ("coherence.csv", "stiffness.csv", "confusion.csv", "loss_split.csv", "stiffness_class.csv", "easy_hard.csv", "minibatch.csv",
                 "loss_split.png", "easy_hard.png", "m_coherence_tracked_train_exact.png"):
        assert (out / name).stat().st_size > 0, name
    results = xr.open_zarr(out / "results.zarr", consolidated=False)
    assert results.sizes["permutation"] == 20
    ds = synthetic_run(n_steps=4, n_train=16, n_test=4, n_coords=16)
    x = ds.grad_coords.values[:, :16].astype(np.float64)
    expect = np.sum(x.sum(1) ** 2, 1) / np.sum(x**2, (1, 2))
    got = results.m_coherence.sel(source="exact", sample="tracked_train", layer="(model)").values
    np.testing.assert_allclose(got, expect, rtol=1e-5)


def test_existing_output_is_never_overwritten(store, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("data")
    with pytest.raises(SystemExit) as exc:
        main(["analyze", store, "--out", str(tmp_path), "--metrics", "coherence"])
    assert exc.value.code == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "data"


@pytest.mark.parametrize("make", ["missing", "file", "foreign"])
def test_bad_store_path_is_one_line_error(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make == "file":
        target.write_text("not a store")
    elif make == "foreign":
        target.mkdir()
        (target / "a.txt").write_text("hello")
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(target), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("gradstore: error: ") and err.count("\n") == 1
    with pytest.raises(StoreError):
        open_store(target)


def test_pairwise_source_choice_is_recorded(store, tmp_path):
    out = tmp_path / "o"
    main(["analyze", store, "--out", str(out), "--nulls", "0", "--metrics", "stiffness",
          "--pairwise-source", "coords"])
    results = xr.open_zarr(out / "results.zarr", consolidated=False)
    assert results.sign_stiffness.attrs["source"] == "coords"
    assert results.attrs["pairwise_source"] == "coords"


def test_unknown_metric_is_rejected(store, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", store, "--out", str(tmp_path / "o"), "--metrics", "coherence,vibes"])
    assert exc.value.code == 2 and "vibes" in capsys.readouterr().err
