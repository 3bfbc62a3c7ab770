"""Hypothesis fuzz of configuration files and command-line arguments (issue 12).

Every outcome is success or exit status 2 with exactly one line on stderr starting
``gradstore: error:`` (or click's usage error, also exit 2); never a traceback or another status.
Commands run in-process and stop after their door checks: the experiments, the benchmarks' timed
cases and the analysis' file writing are stubbed, so a valid input "succeeds" in milliseconds.
"""

import contextlib
import io
import itertools
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.report import METRICS
from analysis.synthetic import synthetic_run, write_synthetic_store
from gradstore.store import create_run
from pipelines.cli import COMMANDS, main
from pipelines.cli.options import SchedulerAddress
from pipelines.experiments import EXPERIMENTS
from pipelines.experiments.config import packaged_defaults
from pipelines.experiments.schema import MAX_NULLS, MAX_SEED

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NAMES = sorted(EXPERIMENTS)
_counter = itertools.count()


# --- running the CLI and judging the outcome ----------------------------------------------------------

def run_cli(argv):
    """Exit status and stderr of ``gradstore ARGV``, in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code
    return code, err.getvalue()


def _progress(line: str) -> bool:
    """Lines analyze prints while it works (the store summary and its progress bar)."""
    return " examples, " in line and "; computing " in line or line.startswith("steps (") or "batch/s" in line


def assert_clean(code, err, argv):
    assert "Traceback" not in err, (argv, err)
    if code == 0:
        return
    assert code == 2, (argv, code, err)
    lines = [line for line in err.splitlines() if line.strip() and not _progress(line)]
    if any(line.startswith("Error: ") for line in lines):  # click's usage error
        return
    assert len(lines) == 1 and lines[0].startswith("gradstore: error: "), (argv, err)


# --- stubs: stop every command after its door checks ----------------------------------------------------

def _default_types(config, prefix=()):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _default_types(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _fake_experiment(name, config, ctx):
    """Stands for the experiment; checks, independently of the schema, that what reaches it is sane."""
    defaults = packaged_defaults("demo" if name == "demo" else name)
    defaults.pop("quick")
    for path, default in _default_types(defaults):
        value = config
        for key in path:
            value = value[key]
        if isinstance(default, bool):
            assert isinstance(value, bool), (path, value)
        elif isinstance(default, int):
            assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, (path, value)
        elif isinstance(default, float):
            assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (path, value)
        elif isinstance(default, list):
            assert isinstance(value, list) and value, (path, value)
    return ctx.out / "report.md"


@pytest.fixture(scope="module", autouse=True)
def stubs(tmp_path_factory):
    import analysis.output
    import pipelines.bench.analysis
    import pipelines.bench.capture
    import pipelines.bench.record
    import pipelines.bench.store
    import pipelines.distributed
    import pipelines.experiments
    import pipelines.experiments.label_noise

    work = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # relative --out and the default runs/... land here
        mp.setattr(pipelines.experiments, "run_experiment", _fake_experiment)
        mp.setattr(pipelines.experiments.label_noise, "run",
                   lambda config, ctx, title=None: _fake_experiment("demo", config, ctx))
        mp.setattr(pipelines.distributed, "launch", lambda nproc, args: None)  # no ranks: --nproc N re-launches
        mp.setattr(analysis.output, "write_results", lambda results, out: [])
        mp.setattr(pipelines.bench.capture, "run", lambda **kw: {"mlp-plain": {"source": "stub"}})
        mp.setattr(pipelines.bench.capture, "run_lm", lambda **kw: {})
        mp.setattr(pipelines.bench.capture, "lm_markdown", lambda rows, **kw: "")
        mp.setattr(pipelines.bench.store, "run", lambda **kw: {"source": "stub"})
        mp.setattr(pipelines.bench.analysis, "run", lambda **kw: {})
        mp.setattr(pipelines.bench.record, "run", lambda **kw: [{"source": "stub"}])
        for module in (pipelines.bench.capture, pipelines.bench.store, pipelines.bench.analysis,
                       pipelines.bench.record):
            mp.setattr(module, "markdown", lambda rows, **kw: "")
        yield work


def _small_layout():
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "store"))
    from store_helpers import small_layout

    return small_layout()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    base = tmp_path_factory.mktemp("places")
    good = write_synthetic_store(base / "good", synthetic_run(n_steps=2, n_train=6, n_test=2, n_coords=4))
    empty = base / "empty"
    create_run(str(empty), _small_layout())
    afile = base / "afile"
    afile.write_text("not a store")
    return {"base": base, "good": str(good), "empty": str(empty), "file": str(afile),
            "missing": str(base / "missing")}


def fresh(base: Path) -> str:
    return str(base / f"new-{next(_counter)}")


# --- strategies --------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
SCALARS = (st.booleans() | st.integers(-2**63, 2**63 - 1) | st.integers(-3, 5)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT
           | st.sampled_from(["mlp-cg", "cnn-bn", "coherence", "sgd", "snapshot", "", "../x", 0.5, 1.0, 100]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(["a", "seed", "every"]), inner, max_size=2), max_leaves=6)


def _near(default):
    """Values close to a default: itself, a neighbour, another type of the same magnitude."""
    if isinstance(default, bool):
        return st.sampled_from([default, not default, 1, "true"])
    if isinstance(default, (int, float)):
        return st.sampled_from([default, 0, -1, default + 1, float(default) + 0.5, 2**31, MAX_NULLS + 1, -200])
    if isinstance(default, list):
        return st.sampled_from([default, [], default[:1], default + default[:1], [str(default[0])], [1, 2],
                                [*default[:1], "vibes"]])
    return st.sampled_from([default, "", "nosuch", 3])


def table(defaults: dict):
    """A TOML table over the keys of ``defaults``: any subset, each near its default or anything at all,
    and now and then a key the defaults do not have."""
    optional = {}
    for key, default in defaults.items():
        optional[key] = table(default) | VALUES if isinstance(default, dict) else _near(default) | VALUES
    known = st.fixed_dictionaries({}, optional=optional)
    unknown = st.fixed_dictionaries({"no_such_key": VALUES}, optional=optional)
    return st.sampled_from([known] * 5 + [unknown]).flatmap(lambda strategy: strategy)


def experiment_defaults(name):
    defaults = packaged_defaults(name)
    defaults.pop("quick")
    return defaults


CONFIGS = st.sampled_from(NAMES + ["demo"]).flatmap(lambda name: st.tuples(st.just(name),
                                                                           table(experiment_defaults(name))))


def toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(doc: dict) -> str:
    lines = [f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for key, inner in doc.items():
        if isinstance(inner, dict):
            lines.append(f"[{toml_string(key)}]")
            lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in inner.items()]
    return "\n".join(lines) + "\n"


def write(base: Path, content) -> str:
    path = base / f"config-{next(_counter)}.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


# --- configuration files -----------------------------------------------------------------------------------

@settings(FUZZ, max_examples=80)
@given(CONFIGS)
def test_fuzzed_config_values_are_accepted_or_one_line(paths, named_doc):
    name, doc = named_doc
    config = write(paths["base"], toml_document(doc))
    command = ["demo"] if name == "demo" else ["run", name]
    argv = [*command, "--config", config, "--out", fresh(paths["base"]), "--no-progress"]
    assert_clean(*run_cli(argv), argv)


@settings(FUZZ, max_examples=40)
@given(st.binary(max_size=200) | st.sampled_from([b"\xff\xfe", b"seed = \xe9\n", b"[capture\n", b"\x00"]))
def test_fuzzed_config_bytes_are_accepted_or_one_line(paths, content):
    config = write(paths["base"], content)
    argv = ["run", "label-noise", "--quick", "--config", config, "--out", fresh(paths["base"])]
    assert_clean(*run_cli(argv), argv)


# --- command-line arguments ------------------------------------------------------------------------------

#: anything at all, as a string (see :func:`mostly` for mixing it with valid values)
JUNK = (TEXT | st.integers(-10**12, 10**12).map(str)
        | st.sampled_from(["", "-1", "0", "1.5", "nan", "--", "-h"])).map(str)


def mostly(valid):
    """``valid`` three times in four, else anything at all."""
    return st.integers(0, 3).flatmap(lambda k: valid if k else JUNK)


def options(choices: dict):
    """A shuffled list of ``--option value`` pairs (and flags), each drawn from ``choices``."""
    def pairs(chosen):
        return [[option] if value is None else [option, value] for option, value in chosen.items()]

    optional = {opt: (st.just(None) if strategy is None else strategy) for opt, strategy in choices.items()}
    shuffled = st.fixed_dictionaries({}, optional=optional).map(pairs).flatmap(st.permutations)
    return shuffled.map(lambda chosen: [token for pair in chosen for token in pair])


def out_paths(paths):
    return st.sampled_from(["fresh", "fresh", "fresh", "", "file/sub", "junk"]).flatmap(lambda kind: {
        "fresh": st.just(fresh(paths["base"])), "": st.just(""),
        "file/sub": st.just(paths["file"] + "/sub"), "junk": TEXT.filter(bool)}[kind])


@FUZZ
@given(st.data())
def test_fuzzed_run_and_demo_arguments(paths, data):
    config = write(paths["base"], toml_document(data.draw(table(experiment_defaults("label-noise")))))
    common = {"--config": mostly(st.sampled_from([config, config, "", str(paths["base"]), paths["missing"]])),
              "--out": out_paths(paths), "--data-dir": JUNK, "--device": mostly(st.sampled_from(["cpu", "cuda"])),
              "--quick": None, "--no-progress": None}
    if data.draw(st.booleans()):
        argv = ["run", data.draw(mostly(st.sampled_from(NAMES))),
                *data.draw(options({**common, "--resume": None, "--nproc": mostly(st.integers(0, 3).map(str)),
                                    "--autocast": mostly(st.sampled_from(["bfloat16", "float16"]))}))]
    else:
        argv = ["demo", *data.draw(options(common))]
    assert_clean(*run_cli(argv), argv)


def _not_an_address(value: str) -> bool:
    """A well-formed address would be connected to (5 s); those are tested in test_cli_validation."""
    try:
        SchedulerAddress().convert(value, None, None)
        return False
    except Exception:
        return True


@settings(FUZZ, max_examples=25)
@given(st.data())
def test_fuzzed_analyze_arguments(paths, data):
    store = data.draw(mostly(st.sampled_from([paths["good"], paths["good"], paths["empty"], paths["missing"],
                                              paths["file"], "memory://x"])))
    metrics = st.lists(st.sampled_from([*METRICS, "vibes", "", " "]), max_size=3).map(",".join)
    argv = ["analyze", store, *data.draw(options({
        "--out": out_paths(paths), "--metrics": mostly(metrics),
        "--nulls": mostly(st.integers(-1, 8).map(str) | st.just(str(MAX_NULLS + 1))),
        "--seed": mostly(st.sampled_from(["-1", "0", "7", str(MAX_SEED), str(MAX_SEED + 1)])),
        "--snapshot": mostly(st.integers(-1, 3).map(str)),
        "--pairwise-source": mostly(st.sampled_from(["exact", "coords", "proj"])),
        "--steps-per-batch": mostly(st.integers(0, 4).map(str)),
    }))]
    if data.draw(st.integers(0, 4)) == 0:
        argv += ["--scheduler", data.draw(JUNK.filter(_not_an_address))]
    if "--out" not in argv:
        argv += ["--out", fresh(paths["base"])]  # the default STORE.analysis would be shared by examples
    assert_clean(*run_cli(argv), argv)


@settings(FUZZ, max_examples=15)
@given(st.data())
def test_fuzzed_inspect_arguments(paths, data):
    store = data.draw(st.sampled_from([paths["good"], paths["empty"], paths["missing"], paths["file"],
                                       "memory://nothing", "file://" + paths["good"]]) | JUNK)
    argv = ["inspect", store, *data.draw(options({"--verify": None}))]
    assert_clean(*run_cli(argv), argv)


@settings(FUZZ, max_examples=25)
@given(st.data())
def test_fuzzed_bench_arguments(paths, data):
    number = mostly(st.integers(-1, 6).map(str))
    device = mostly(st.sampled_from(["cpu", "cuda"]))
    sub = data.draw(mostly(st.sampled_from(["capture", "store", "analysis"])))
    choices = {
        "capture": {"--m": number, "--repeats": number, "--gram-m": number, "--vmap-m": number,
                    "--gram-small": number, "--threads": number, "--lm-m": number,
                    "--only": mostly(st.sampled_from(["all", "lm"])), "--data-dir": JUNK, "--device": device},
        "store": {"--examples": number, "--coords": number, "--steps": number, "--repeats": number,
                  "--data-dir": JUNK, "--device": device},
        "analysis": {"--examples": number, "--layers": number, "--base-steps": number, "--nulls": number,
                     "--steps-per-batch": number, "--factors": mostly(st.sampled_from(["1", "1,4", "0", "x"])),
                     "--worker-memory": mostly(st.sampled_from(["1.5GB", "2GB"])),
                     "--cases": mostly(st.sampled_from(["threads", "cluster", "threads,cluster"])),
                     "--workdir": mostly(st.sampled_from([str(paths["base"]), paths["missing"], paths["file"], ""]))},
    }.get(sub, {"--device": device})
    argv = ["bench", sub, *data.draw(options(choices))]
    assert_clean(*run_cli(argv), argv)


@settings(FUZZ, max_examples=15)
@given(st.data())
def test_fuzzed_theory_and_top_level_arguments(paths, data):
    from theory import REGISTRY

    if data.draw(st.booleans()):  # only unknown check names or --list: the real checks take minutes
        names = data.draw(st.lists(JUNK.filter(lambda n: n not in REGISTRY), min_size=1, max_size=2))
        argv = ["theory", *itertools.chain.from_iterable(("--check", n) for n in names),
                *data.draw(options({"--json": None}))]
    else:
        first = data.draw(JUNK.filter(lambda t: t not in COMMANDS and t not in ("-h", "--help", "--version")))
        argv = [first, *data.draw(st.lists(JUNK, max_size=3))]
    assert_clean(*run_cli(argv), argv)
