"""`gradstore bench capture` wiring (the benchmark itself is run by hand, never timed in tests)."""

import pytest
from click.testing import CliRunner

from gradstore.errors import DataError
from pipelines.bench.capture import case
from pipelines.cli import COMMANDS
from pipelines.cli.bench import bench


def test_bench_group_lists_capture():
    assert "bench" in COMMANDS
    out = CliRunner().invoke(bench, ["--help"])
    assert out.exit_code == 0 and "capture" in out.output
    out = CliRunner().invoke(bench, ["capture", "--help"])
    assert out.exit_code == 0 and "--repeats" in out.output


@pytest.mark.parametrize("name", ["mlp-moments", "cnn-moments", "gram-ours"])
def test_one_case_runs_on_the_bundled_subset(name):
    row = case(name, m=6, device="cpu", repeats=1, data_dir=None)
    assert row["case"] == name and row["m"] == 6
    assert row["seconds"] > 0 and row["peak_bytes"] >= 0 and len(row["times"]) == 1


def test_too_many_examples_is_a_data_error():
    with pytest.raises(DataError, match="exceeds"):
        case("mlp-plain", m=10**7, device="cpu", repeats=1, data_dir=None)


def test_backpack_case_agrees_with_the_engine():
    """With the optional bench extra: BackPACK's Σ||g_n||² per layer is an independent check of ours."""
    pytest.importorskip("backpack")
    row = case("mlp-backpack", m=64, device="cpu", repeats=1, data_dir=None)
    assert row["sum_of_norm_sq_rel_diff"] < 1e-5 and row["ratio"] > 0


def test_opacus_case_runs():
    pytest.importorskip("opacus")
    row = case("mlp-opacus", m=4, device="cpu", repeats=1, data_dir=None)
    assert row["case"] == "mlp-opacus" and row["seconds"] > 0
