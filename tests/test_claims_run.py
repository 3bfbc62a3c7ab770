"""A run that cannot learn (lr 1e-9) reports no fitting claim as supported, and every declared claim
of the run is judged from its recorded evidence (claims.json) by the one engine."""

import json

import pytest

from pipelines.cli import main
from pipelines.experiments import claims as engine

TINY = """noise_levels = [0.5, 1.0]
steps = 20
eval_every = 10
lr = {lr}
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


def _run(tmp_path, lr):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY.format(lr=lr))
    out = tmp_path / "run"
    main(["run", "label-noise", "--quick", "--no-progress", "--config", str(cfg), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("frozen"), "1e-9")


def test_a_run_that_cannot_learn_supports_no_fitting_claim(frozen):
    from pipelines.experiments.label_noise import CLAIMS

    evidence = {k: [engine.Condition.from_dict(c) for c in v]
                for k, v in json.loads((frozen / "claims.json").read_text()).items()}
    judged = engine.judge_all(CLAIMS, [evidence])
    fitting = [c for c in judged if c.kind == "fitting"]
    assert fitting, "the run judged at least one fitting claim"
    assert all(c.supported is not True for c in fitting), [(c.statement, c.measured) for c in fitting]
    # the report shows the same verdicts, with statistic, test and p-values
    report = (frozen / "report.md").read_text()
    for c in judged:
        line = next(row for row in report.splitlines() if row.startswith(f"| {c.statement} |"))
        assert line.endswith(f"| {engine_word(c.supported)} |") and c.statistic in line and "p (claim)" in c.measured


def engine_word(supported):
    from pipelines.experiments.common import VERDICT_WORDS

    return VERDICT_WORDS[supported]


def test_the_frozen_run_really_did_not_learn(frozen):
    import csv

    with open(frozen / "noise-0.50" / "history.csv") as fh:
        hist = list(csv.DictReader(fh))
    losses = [float(h["train_loss"]) for h in hist]
    assert max(losses) - min(losses) < 1e-5  # lr 1e-9: the loss does not move


def test_sampled_f_p_estimate_matches_the_stored_coordinates(frozen):
    """The f_p estimate from the sampled weights, recomputed with numpy from the raw stored grad_coords."""
    import numpy as np

    from gradstore.store import open_run

    ds = open_run(str(frozen / "noise-0.50" / "store.zarr"))
    x = ds["grad_coords"].isel(step=0).values.astype(np.float64)  # (example, coord), step 0
    corrupt = ds["corrupt"].values.astype(bool)
    d = x @ x.sum(0)
    row = next(r for r in json.loads((frozen / "summary.json").read_text()) if r["noise"] == 0.5)
    assert row["f_p_step0_sampled"] == pytest.approx(d[~corrupt].sum() / d.sum(), rel=1e-6)
    assert abs(row["f_p_step0_sampled"] - row["f_p_step0"]) < 0.5  # an estimate of the exact value


def test_the_report_draws_fig_2_in_place_of_the_per_level_split_figures(frozen):
    report = (frozen / "report.md").read_text()
    assert "(figure_2.png)" in report and (frozen / "figure_2.png").stat().st_size > 10_000
    assert "loss_split.png" not in report  # Fig. 2 replaces the per-level split figures in the report


def test_fig_2_says_when_there_is_nothing_to_draw(tmp_path):
    from pipelines.experiments.label_noise import figure_2

    drew = figure_2([{"noise": 0.0}, {"noise": 1.0}], [{}, {}], [None, None], tmp_path / "f.png")
    assert drew is False and (tmp_path / "f.png").exists()
