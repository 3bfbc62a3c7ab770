"""Report provenance: the first line says whether a run is at the paper's settings; the commit
(where available, never an error outside a git checkout), config hash, data checksums, versions."""

import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

from pipelines.experiments import provenance
from pipelines.experiments.common import Context
from pipelines.experiments.config import load_config


def test_git_commit_outside_a_checkout_is_a_sentence_not_an_error(tmp_path, monkeypatch):
    copy = tmp_path / "provenance_copy.py"
    shutil.copy(provenance.__file__, copy)
    spec = importlib.util.spec_from_file_location("provenance_copy", copy)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "provenance_copy", module)
    spec.loader.exec_module(module)
    assert module.git_commit().startswith("not available")


def test_config_hash_is_stable_and_sensitive():
    a = load_config("label-noise")
    assert provenance.config_hash(a) == provenance.config_hash(dict(reversed(list(a.items()))))
    assert provenance.config_hash(a) != provenance.config_hash({**a, "lr": 0.2})


def test_bundled_checksum_is_the_resource_sha256():
    from importlib import resources

    raw = resources.files("pipelines").joinpath("resources", "mnist_subset.npz").read_bytes()
    (value,) = provenance.data_checksums(None).values()
    assert value == "sha256 " + hashlib.sha256(raw).hexdigest()
    assert len(provenance.data_checksums("/some/dir")) == 4


def test_first_line_names_every_difference_from_the_paper(tmp_path):
    from pipelines.experiments.label_noise import PAPER

    config = load_config("label-noise")
    full = Context(out=tmp_path, data_dir="/data/mnist")
    assert provenance.deviations(config, full, PAPER, full_data=True) == []
    assert provenance.settings_line([], "label-noise").startswith("At the paper's settings")
    quick = load_config("label-noise", quick=True)
    found = provenance.deviations(quick, Context(out=tmp_path, quick=True), PAPER, full_data=False)
    line = provenance.settings_line(found, "label-noise")
    assert line.startswith("**Not at the paper's settings:**")
    for words in ("bundled 10,000-example MNIST subset", "`--quick`", "steps = 300, fewer than the paper's 100000",
                  "capture.tracked_train = 200"):
        assert words in line, words
    fewer = provenance.deviations({**config, "steps": 50_000}, full, PAPER, full_data=True)
    assert fewer == ["steps = 50000, fewer than the paper's 100000 (§2.1: about 170 epochs, ~10^5 steps)"]


def test_experiments_without_encoded_settings_never_claim_them(tmp_path):
    from pipelines.experiments import coherence_evolution, median_of_means

    full = Context(out=tmp_path, data_dir="/data/mnist")
    for exp in (coherence_evolution, median_of_means):
        assert provenance.deviations(load_config(exp.NAME), full, exp.PAPER, exp.FIXED_DEVIATIONS, full_data=True)


def test_record_lists_versions_and_commit(tmp_path):
    rec = provenance.record(load_config("label-noise", quick=True), Context(out=tmp_path), command="gradstore run x")
    assert set(provenance.PACKAGES) <= set(rec["versions"]) and rec["git_commit"]
    lines = provenance.lines(rec)
    assert any(line.startswith("git commit:") for line in lines) and lines[-1] == "command: `gradstore run x`"
    assert Path(provenance.__file__).exists()


def test_command_line_names_only_what_was_given():
    import click

    from pipelines.cli.options import command_line

    seen = []

    @click.command()
    @click.argument("name")
    @click.option("--quick", is_flag=True)
    @click.option("--resume", is_flag=True)
    @click.option("--seeds", type=int, default=1)
    @click.option("--out", default=None)
    def cmd(name, quick, resume, seeds, out):
        seen.append(command_line())

    cmd(["label-noise", "--out", "x y", "--seeds", "2"], standalone_mode=False)
    cmd(["label-noise", "--quick"], standalone_mode=False)
    assert seen[0].endswith(" label-noise --seeds 2 --out 'x y'") and "--quick" not in seen[0]
    assert seen[1].endswith(" label-noise --quick") and "--resume" not in seen[1]
