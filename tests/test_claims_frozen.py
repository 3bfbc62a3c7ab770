"""A run that cannot learn (lr 1e-9) reports no fitting claim as supported: winsorize and
median-of-means, each on the tiniest overlay that runs (one noisy level, one step, one capture of
4 examples, no permutation nulls), judged from the run's recorded evidence (claims.json) by the one
engine, as tests/test_claims_run.py does for label-noise."""

import csv
import json

import pytest

from pipelines.cli import main
from pipelines.experiments import claims as engine
from pipelines.experiments import median_of_means, winsorize
from pipelines.experiments.common import VERDICT_WORDS

FROZEN = """{settings}
steps = 1
eval_every = 1
lr = 1e-9
[capture]
tracked_train = 4
coords_per_layer = 0
moments_examples = 0
log_until = 1
log_points = 1
every = 1
[analysis]
nulls = 0
metrics = ["coherence"]
"""


def _frozen_run(tmp_path, experiment, settings):
    cfg = tmp_path / "frozen.toml"
    cfg.write_text(FROZEN.format(settings=settings))
    out = tmp_path / "run"
    main(["run", experiment, "--quick", "--no-progress", "--config", str(cfg), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def frozen_winsorize(tmp_path_factory):
    return _frozen_run(tmp_path_factory.mktemp("winsorize"), "winsorize", "noise_levels = [0.5]\nc_values = [0, 2]")


@pytest.fixture(scope="module")
def frozen_mom(tmp_path_factory):
    return _frozen_run(tmp_path_factory.mktemp("mom"), "median-of-means",
                       'noise_levels = [0.5]\noptimizers = ["sgd", "m3", "ra3"]')


def _judged(out, specs):
    evidence = {k: [engine.Condition.from_dict(c) for c in v]
                for k, v in json.loads((out / "claims.json").read_text()).items()}
    return {c.key: c for c in engine.judge_all(specs, [evidence])}, evidence


def _did_not_learn(out):
    """Every condition's training loss and accuracies are the same at every evaluation."""
    histories = sorted(out.glob("noise-*/*/history.csv"))
    assert histories
    for path in histories:
        with open(path) as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) >= 2, path  # step 0 and at least one evaluation after it
        for key in ("train_loss", "train_acc", "test_acc"):
            values = [float(r[key]) for r in rows]
            assert max(values) - min(values) < 1e-5, (path, key)
    return histories


def _report_shows(out, judged):
    report = (out / "report.md").read_text()
    for c in judged.values():
        line = next(row for row in report.splitlines() if row.startswith(f"| {c.statement} |"))
        assert line.endswith(f"| {VERDICT_WORDS[c.supported]} |")


def test_frozen_winsorize_supports_no_fitting_claim(frozen_winsorize):
    assert len(_did_not_learn(frozen_winsorize)) == 2  # c = 0 and c = 2
    judged, evidence = _judged(frozen_winsorize, winsorize.CLAIMS)
    fitting = [c for c in judged.values() if c.kind == "fitting"]
    assert [c.key for c in fitting] == ["overfit_reduced"]
    assert all(c.supported is not True for c in fitting), [(c.key, c.measured) for c in fitting]
    # both models are the untrained initialisation: no difference in overfitting at all
    (cond,) = evidence["overfit_reduced"]
    assert cond.estimate == 0.0 and judged["overfit_reduced"].supported is None
    _report_shows(frozen_winsorize, judged)


def test_frozen_median_of_means_supports_no_directional_fitting_claim(frozen_mom):
    assert len(_did_not_learn(frozen_mom)) == 3  # SGD, M3, RA3
    judged, evidence = _judged(frozen_mom, median_of_means.CLAIMS)
    directional = [c for c in judged.values() if c.kind == "fitting" and c.key != "ra3_like_sgd"]
    assert {c.key for c in directional} == {"m3_matched", "m3_final"}
    assert all(c.supported is not True for c in directional), [(c.key, c.measured) for c in directional]
    for key in ("m3_matched", "m3_final"):
        assert [c.estimate for c in evidence[key]] == [0.0]  # M3 and SGD never left the same start
    _report_shows(frozen_mom, judged)


def test_frozen_median_of_means_supports_no_fitting_claim(frozen_mom):
    judged, _ = _judged(frozen_mom, median_of_means.CLAIMS)
    fitting = [c for c in judged.values() if c.kind == "fitting"]
    assert "ra3_like_sgd" in {c.key for c in fitting}
    assert all(c.supported is not True for c in fitting), [(c.key, c.measured) for c in fitting]
    assert judged["ra3_like_sgd"].supported is None  # inconclusive: SGD never moved, so "like SGD" says nothing
