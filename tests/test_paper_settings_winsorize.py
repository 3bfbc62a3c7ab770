"""winsorize declares Fig. 4's noise levels among its paper settings: a run at one noise level is
reported as not at the paper's settings, naming the noise levels (no training run)."""

from pipelines.experiments import provenance, winsorize
from pipelines.experiments.common import Context
from pipelines.experiments.config import load_config

PAPER_LEVELS = [0.0, 0.25, 0.5, 0.75, 1.0]


def test_paper_declares_the_noise_levels_of_the_defaults():
    (setting,) = [s for s in winsorize.PAPER if s.path == ("noise_levels",)]
    assert setting.value == PAPER_LEVELS and setting.rule == "eq" and "§3" in setting.where
    assert load_config("winsorize")["noise_levels"] == PAPER_LEVELS


def test_the_defaults_on_the_full_mnist_are_at_the_paper_settings(tmp_path):
    full = Context(out=tmp_path, data_dir="/data/mnist")
    assert provenance.deviations(load_config("winsorize"), full, winsorize.PAPER, winsorize.FIXED_DEVIATIONS,
                                 full_data=True) == []


def test_one_noise_level_is_not_at_the_paper_settings(tmp_path):
    config = {**load_config("winsorize"), "noise_levels": [0.5]}
    full = Context(out=tmp_path, data_dir="/data/mnist")
    found = provenance.deviations(config, full, winsorize.PAPER, winsorize.FIXED_DEVIATIONS, full_data=True)
    assert found == [f"noise_levels = [0.5], not the paper's {PAPER_LEVELS!r} (§3, Fig. 4: its noise levels)"]
    line = provenance.settings_line(found, winsorize.NAME)
    assert line.startswith("**Not at the paper's settings:**") and "noise_levels = [0.5]" in line


def test_the_quick_variant_names_the_noise_levels_too(tmp_path):
    quick = load_config("winsorize", quick=True)
    assert quick["noise_levels"] == [0.5]
    found = provenance.deviations(quick, Context(out=tmp_path, quick=True), winsorize.PAPER,
                                  winsorize.FIXED_DEVIATIONS, full_data=False)
    line = provenance.settings_line(found, winsorize.NAME)
    assert "noise_levels = [0.5], not the paper's [0.0, 0.25, 0.5, 0.75, 1.0]" in line
    assert "`--quick`" in line and "steps = 20, fewer than the paper's 60000" in line
