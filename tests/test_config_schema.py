"""Experiment configurations are checked against a schema per experiment before any work starts
(issue 12, findings 13, 21 and the config parts of 22): wrong types, inner types and ranges are one
line naming the file, the key and what is allowed."""

import pytest

from gradstore.errors import ConfigError, GradstoreError
from pipelines.cli import main
from pipelines.experiments import EXPERIMENTS
from pipelines.experiments.config import load_config, packaged_defaults
from pipelines.experiments.schema import SCHEMAS, check_keys

ALL = sorted(SCHEMAS)


def test_every_experiment_has_a_schema_covering_every_key():
    assert set(SCHEMAS) == set(EXPERIMENTS) | {"demo"}
    for name in ALL:
        defaults = packaged_defaults(name)
        defaults.pop("quick")
        check_keys(SCHEMAS[name], defaults)  # raises KeyError on a key without a rule (or a rule without a key)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("quick", [False, True])
def test_packaged_defaults_pass_their_schema(name, quick):
    load_config(name, quick=quick)


def _refused(tmp_path, name, text):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(name, quick=True, path=path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


# (experiment, TOML text, key as shown, a phrase of what is allowed)
BAD = [
    ("label-noise", "batch_size = 1.5", "batch_size = 1.5", "an integer in [1, 60000]"),
    ("label-noise", "steps = 2.7", "steps = 2.7", "an integer >= 1"),
    ("demo", "eval_every = 1.5", "eval_every = 1.5", "an integer >= 1"),
    ("label-noise", "noise_levels = []", "noise_levels = []", "a non-empty list"),
    ("label-noise", 'noise_levels = ["a"]', 'noise_levels = ["a"]', "a finite number in [0, 1]"),
    ("label-noise", "noise_levels = [1.5]", "noise_levels = [1.5]", "a finite number in [0, 1]"),
    ("label-noise", "noise_levels = [0.5, 0.501]", "noise_levels = [0.5, 0.501]", "rounded to 2 decimals"),
    ("demo", "[analysis]\nmetrics = [1, 2]", "[analysis] metrics = [1, 2]", "one of coherence, stiffness"),
    ("label-noise", '[analysis]\nmetrics = ["coherence", "vibes"]', "[analysis] metrics", "one of coherence"),
    ("label-noise", '[analysis]\nmetrics = ["stiffness"]', "[analysis] metrics", "include 'coherence'"),
    ("label-noise", "[analysis]\nnulls = -1", "[analysis] nulls = -1", "an integer in [0, 100000]"),
    ("label-noise", "[capture]\nevery = 0", "[capture] every = 0", "an integer >= 1"),
    ("label-noise", "[capture]\nmoments_examples = -5", "[capture] moments_examples = -5", "an integer in [0, 60000]"),
    ("label-noise", "[capture]\ntracked_train = -1", "[capture] tracked_train = -1", "an integer in [2, 60000]"),
    ("label-noise", "[capture]\ntracked_train = 100000", "[capture] tracked_train = 100000", "[2, 60000]"),
    ("label-noise", "seed = -200", "seed = -200", "an integer in [0, 2147483647]"),
    ("label-noise", "seed = true", "seed = true", "an integer"),
    ("label-noise", "lr = nan", "lr = nan", "a finite number > 0"),
    ("label-noise", 'model = "mlp"', 'model = "mlp"', "one of cnn-bn, mlp-3x256, mlp-cg, resnet-small"),
    ("label-noise", "[capture]\ngram = 1", "[capture] gram = 1", "true or false"),
    ("winsorize", 'c_values = ["x/../../../ESCAPED"]', "c_values", "each an integer >= 0"),
    ("winsorize", "c_values = [1.0]", "c_values = [1.0]", "each an integer >= 0"),
    ("winsorize", "c_values = [1, 1]", "c_values = [1, 1]", "distinct values"),
    ("median-of-means", 'optimizers = ["m3", "adam"]', "optimizers", "include 'sgd'"),
    ("easy-hard", "[capture]\ngram = false", "[capture] gram = false", "true"),
    ("easy-hard", "[split]\nfit_fraction = 1", "[split] fit_fraction = 1", "in (0, 1)"),
    ("easy-hard", '[split]\nrules = ["snapshot", "luck"]', "[split] rules", "one of snapshot, first_learned"),
    ("easy-hard", "[retrain]\nsteps = 0", "[retrain] steps = 0", "an integer >= 1"),
    ("coherence-evolution", "eval_every = -1", "eval_every = -1", "an integer >= 0"),
    ("coherence-evolution", 'models = ["cnn-bn", "cnn-bn"]', "models", "distinct values"),
    ("coherence-evolution", "[capture]\nprime_batch_size = 1", "[capture] prime_batch_size = 1", "[2, 60000]"),
]


@pytest.mark.parametrize("name, text, shown, allowed", BAD, ids=[f"{b[0]}:{b[1]}" for b in BAD])
def test_wrong_type_or_range_is_one_line_naming_file_key_and_allowed_values(tmp_path, name, text, shown, allowed):
    message = _refused(tmp_path, name, text)
    assert shown in message and allowed in message, message


def test_coherence_evolution_eval_every_zero_keeps_its_documented_meaning(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text("eval_every = 0\n")  # 0: evaluate only where a capture runs
    assert load_config("coherence-evolution", path=path)["eval_every"] == 0
    assert "eval_every = 0" in _refused(tmp_path, "label-noise", "eval_every = 0")


@pytest.mark.parametrize("name, text, phrase", [
    ("easy-hard", "steps = 100\n[split]\nlearned_by = 300", "[split] learned_by must be at most steps"),
    ("winsorize", "batch_size = 10\nc_values = [0, 5]", "2 * max(c_values) + 1 <= batch_size"),
    ("label-noise", "[capture]\ngram = false\ncoords_per_layer = 0", "unless [capture] stores pairwise products"),
])
def test_settings_that_do_not_fit_together_are_refused(tmp_path, name, text, phrase):
    message = _refused(tmp_path, name, text)
    assert "do not fit together" in message and phrase in message


def test_pairwise_metrics_can_be_dropped_when_nothing_pairwise_is_stored(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('[capture]\ngram = false\ncoords_per_layer = 0\n'
                    '[analysis]\nmetrics = ["coherence", "loss_split"]\n')
    assert load_config("label-noise", path=path)["capture"]["gram"] is False


def test_unknown_keys_are_still_refused(tmp_path):
    assert "unknown setting bach_size" in _refused(tmp_path, "label-noise", "bach_size = 10")
    assert "unknown setting [capture] evry" in _refused(tmp_path, "label-noise", "[capture]\nevry = 10")
    assert "must be a table" in _refused(tmp_path, "label-noise", "capture = 3")


def test_file_problems_are_one_line(tmp_path):
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(b"model = \"caf\xe9\"\n")
    cases = [(binary, "not UTF-8"), ("", "name is empty"), (tmp_path, "is a folder"),
             (tmp_path / "missing.toml", "does not exist")]
    broken = tmp_path / "broken.toml"
    broken.write_text("seed = \n")
    cases.append((broken, "not valid TOML"))
    for path, phrase in cases:
        with pytest.raises(ConfigError, match=phrase) as exc:
            load_config("demo", path=path)
        assert "\n" not in str(exc.value)
    assert issubclass(ConfigError, GradstoreError)


def _fail_if_run(*args, **kwargs):
    raise AssertionError("the experiment started although its configuration is invalid")


@pytest.mark.parametrize("text, phrase", [
    ("[analysis]\nnulls = -1", "[analysis] nulls = -1"),  # finding 21: refused only after training before
    ('[analysis]\nmetrics = ["coherence", "vibes"]', "vibes"),
])
def test_run_refuses_bad_analysis_settings_before_training(tmp_path, capsys, monkeypatch, text, phrase):
    import pipelines.experiments as experiments
    import pipelines.experiments.label_noise as label_noise

    monkeypatch.setattr(experiments, "run_experiment", _fail_if_run)
    monkeypatch.setattr(label_noise, "run", _fail_if_run)
    bad = tmp_path / "bad.toml"
    bad.write_text(text + "\n")
    for argv in (["run", "label-noise"], ["demo"]):  # one schema, shared by run and demo
        out = tmp_path / argv[0]
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--quick", "--no-progress", "--config", str(bad), "--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(f"gradstore: error: {bad}: ") and err.count("\n") == 1
        assert phrase in err
        assert not out.exists()  # nothing was created


def test_winsorize_c_values_are_checked_before_any_folder_is_made(tmp_path, capsys):
    """Finding 7's config side: c builds the run folder noise-…/c-{c}; a non-integer never gets that far."""
    work = tmp_path / "work"
    out = work / "out"
    work.mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_text('c_values = ["x/../../../ESCAPED"]\n')
    with pytest.raises(SystemExit) as exc:
        main(["run", "winsorize", "--quick", "--no-progress", "--config", str(bad), "--out", str(out)])
    assert exc.value.code == 2 and "each an integer >= 0" in capsys.readouterr().err
    assert list(work.iterdir()) == [] and not list(tmp_path.rglob("ESCAPED"))


def test_coherence_evolution_without_evaluation_at_captures_needs_eval_every(tmp_path):
    message = _refused(tmp_path, "coherence-evolution", "evaluate_captures = false")
    assert "do not fit together" in message and "eval_every must be at least 1" in message, message
    path = tmp_path / "ok.toml"
    path.write_text("evaluate_captures = false\neval_every = 20\n")
    assert load_config("coherence-evolution", path=path)["evaluate_captures"] is False
