"""``gradstore run NAME --seeds N``: N seeds as parallel processes, each in its own run folder, the
report across seeds (mean ± 95% t-interval, verdicts from across-seed tests), and resume per seed."""

import json
import math

import numpy as np
import pytest
from scipy.stats import t

from pipelines.cli import main

TINY = """noise_levels = [0.5]
steps = 20
eval_every = 10
[capture]
tracked_train = 40
coords_per_layer = 4
moments_examples = 100
log_until = 5
log_points = 3
every = 10
[analysis]
nulls = 50
"""


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    cfg = tmp / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp / "run"
    argv = ["run", "label-noise", "--quick", "--seeds", "2", "--no-progress", "--config", str(cfg), "--out", str(out)]
    main(argv)
    return out, argv


def test_each_seed_is_its_own_run(two_seeds):
    out, _ = two_seeds
    for seed in (0, 1):
        d = out / f"seed-{seed}"
        assert (d / "report.md").exists() and (d / ".gradstore-run.json").exists()
        assert (d / "noise-0.50" / "store.zarr").is_dir()  # a store per seed
    # different seeds, different runs
    a, b = (json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1))
    assert a[0]["noise"] == b[0]["noise"] and a[0]["final_m_coherence"] != b[0]["final_m_coherence"]


def test_across_seed_numbers_are_t_intervals(two_seeds):
    out, _ = two_seeds
    seeds = [json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
    table = json.loads((out / "summary.json").read_text())["summary"]
    col = table["header"].index("test_acc")
    x = np.array([s[0]["test_acc"] for s in seeds])
    half = t.ppf(0.975, 1) * x.std(ddof=1) / math.sqrt(2)
    assert table["rows"][0][col] == f"{x.mean():.4g} ± {half:.2g}"
    assert table["rows"][0][table["header"].index("noise")] == 0.5  # a condition column, the same in both
    report = (out / "report.md").read_text()
    assert report.startswith("**Not at the paper's settings:**")
    assert "95% t-interval over 2 seeds" in report and "across 2 seeds: one-sided t-test" in report
    assert "[seed 0](seed-0/report.md)" in report and "## Provenance" in report


def test_resume_works_per_seed(two_seeds):
    out, argv = two_seeds
    before = (out / "seed-1" / "summary.json").read_text()
    (out / "seed-1" / "report.md").unlink()  # as if seed 1 was killed before its report
    main([*argv, "--resume"])
    assert (out / "seed-1" / "report.md").exists()
    assert (out / "seed-1" / "summary.json").read_text() == before


def test_seeds_and_nproc_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "label-noise", "--quick", "--seeds", "2", "--nproc", "2", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--seeds 2 with --nproc 2" in capsys.readouterr().err
