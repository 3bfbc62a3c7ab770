"""``--seeds 2`` on the quick variant of every experiment besides label-noise (tests/test_seeds.py):
each seed is its own run, and the report across seeds gives every varying number as the mean ± the
half-width of its 95% t-interval (recomputed here with scipy from the seeds' summaries) and judges
each of the experiment's declared claims."""

import importlib
import json
import math

import numpy as np
import pytest
from scipy.stats import t

from pipelines.cli import main
from pipelines.experiments.common import VERDICT_WORDS

SMALL_CAPTURE = """[capture]
tracked_train = 16
coords_per_layer = 4
moments_examples = 0
log_until = 2
log_points = 1
every = 4
[analysis]
nulls = 20
"""
OVERLAYS = {
    "winsorize": 'noise_levels = [0.5]\nc_values = [0, 2]\nsteps = 4\neval_every = 2\n' + SMALL_CAPTURE,
    "median-of-means": 'noise_levels = [0.5]\noptimizers = ["sgd", "m3"]\nsteps = 6\neval_every = 3\n' + SMALL_CAPTURE,
    "easy-hard": ('steps = 20\neval_every = 10\n[split]\nlearned_by = 10\n[retrain]\nsteps = 10\n[capture]\n'
                  'tracked_train = 24\nlog_until = 2\nlog_points = 1\nevery = 10\n[analysis]\nnulls = 20\n'),
    "coherence-evolution": ('noise_levels = [0.0, 1.0]\nepochs = 1\ntrain_examples = 200\ntest_examples = 40\n'
                            '[capture]\ntracked_train = 8\ntracked_test = 8\nmoments_examples = 0\n'
                            'first_epoch_every = 1\nprime_batches = 1\n'),
}


def _tables(summary):
    """A seed's summary.json as named lists of rows (a list of rows, or a dict of tables)."""
    if isinstance(summary, list):
        return {"summary": summary}
    return {k: v if isinstance(v, list) else [v] for k, v in summary.items() if isinstance(v, (list, dict))}


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_RUNS = {}


def _two_seeds(name, tmp_path_factory):
    """``--quick --seeds 2`` of ``name`` on its tiny overlay, run once per test session."""
    if name not in _RUNS:
        tmp = tmp_path_factory.mktemp(name)
        cfg = tmp / "tiny.toml"
        cfg.write_text(OVERLAYS[name])
        main(["run", name, "--quick", "--seeds", "2", "--no-progress", "--config", str(cfg), "--out", str(tmp / "run")])
        _RUNS[name] = tmp / "run"
    return _RUNS[name]


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_two_seeds_of_every_quick_variant(tmp_path_factory, name):
    out = _two_seeds(name, tmp_path_factory)
    seeds = [json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert all((out / f"seed-{s}" / "report.md").exists() for s in (0, 1))
    across = json.loads((out / "summary.json").read_text())
    checked = 0
    for key, first in _tables(seeds[0]).items():
        second, table = _tables(seeds[1])[key], across[key]
        for k, col in enumerate(table["header"]):
            a, b = first[0].get(col), second[0].get(col)
            if _number(a) and _number(b) and a != b:
                x = np.array([a, b], dtype=float)
                half = t.ppf(0.975, 1) * x.std(ddof=1) / math.sqrt(2)
                assert table["rows"][0][k] == f"{x.mean():.4g} ± {half:.2g}", (key, col)
                checked += 1
    assert checked, "two seeds give different numbers"
    report = (out / "report.md").read_text()
    assert "95% t-interval over 2 seeds" in report and "## Claims tested" in report
    # every claim with evidence in both seeds is judged across them, with its verdict
    module = importlib.import_module(f"pipelines.experiments.{name.replace('-', '_')}")
    evidence = [set(json.loads((out / f"seed-{s}" / "claims.json").read_text())) for s in (0, 1)]
    judged = [c for c in module.CLAIMS if c.key in evidence[0] & evidence[1]]
    assert judged
    for claim in judged:
        line = next(r for r in report.splitlines() if r.startswith(f"| {claim.statement} |"))
        assert "over 2 seeds" in line and line.rsplit("|", 2)[-2].strip() in VERDICT_WORDS.values(), line


def test_coherence_evolution_draws_its_curves_across_seeds(tmp_path_factory):
    from pipelines.experiments import coherence_evolution as ce

    out = _two_seeds("coherence-evolution", tmp_path_factory)
    report = (out / "report.md").read_text()
    assert "(seeds_m_coherence_cnn-bn.png)" in report and (out / "seeds_m_coherence_cnn-bn.png").stat().st_size > 0
    dirs = [out / f"seed-{s}" for s in (0, 1)]
    rows = [json.loads((d / "summary.json").read_text()) for d in dirs]
    for noise in (0.0, 1.0):
        for sample, key in (("tracked_train", "train"), ("tracked_test", "test")):
            steps, curves = ce.seed_curves(dirs, "cnn-bn", noise, sample)
            assert steps[0] == 0 and curves.shape == (2, len(steps))
            for curve, seed_rows in zip(curves, rows):  # each seed's own peak and first value, as it reported them
                (row,) = [r for r in seed_rows if r["noise"] == noise]
                assert curve.max() == pytest.approx(row[f"{key}_peak"], rel=1e-9)
                assert curve[0] == pytest.approx(row[f"{key}_initial"], rel=1e-9)
