"""Command-line options checked at the door (issue 12, findings 14, 16, 20 and 22): every bad option,
folder or store is one line (or click's usage error) with exit status 2, before any work."""

import errno
import os
import socket
import sys
import time

import numpy as np
import pytest

from analysis.synthetic import synthetic_run, write_synthetic_store
from gradstore.errors import AnalysisError, StoreError
from gradstore.store import create_run
from pipelines.cli import cli_words, main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "store"))
from store_helpers import small_layout, step_data  # noqa: E402


def invoke(capsys, *argv):
    """Exit status and stderr of ``gradstore ARGV`` run in-process."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def one_line_error(code, err, *phrases):
    assert code == 2, err
    assert err.startswith("gradstore: error: ") and err.count("\n") == 1, err
    for phrase in phrases:
        assert phrase in err, err


def usage_error(code, err, option):
    assert code == 2 and "Traceback" not in err and f"Invalid value for '{option}'" in err, err


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run"
    return write_synthetic_store(path, synthetic_run(n_steps=2, n_train=8, n_test=2, n_coords=8))


# --- analyze ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--seed", "-1"),  # numpy's default_rng refuses negative seeds
    ("--nulls", "100000000"),  # MemoryError before
    ("--scheduler", "garbage"),
    ("--scheduler", "tcp://host:99999"),
    ("--out", ""),  # wrote into the working folder before
])
def test_analyze_option_out_of_range_is_a_usage_error(store, tmp_path, capsys, option, value):
    code, err = invoke(capsys, "analyze", store, "--out", str(tmp_path / "o"), option, value)
    usage_error(code, err, option)
    assert not (tmp_path / "o").exists()


def test_analyze_accepts_a_well_formed_scheduler_address(store, tmp_path, capsys):
    """The address check lets through the forms dask accepts (scheme optional, IPv6 in brackets)."""
    from pipelines.cli.options import SchedulerAddress

    for address in ("tcp://127.0.0.1:8786", "10.0.0.5:8786", "tls://[::1]:8786", "tcp://scheduler-0.local:1"):
        assert SchedulerAddress().convert(address, None, None) == address


def test_unreachable_scheduler_fails_within_seconds(store, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    code, err = invoke(capsys, "analyze", store, "--out", str(tmp_path / "o"), "--nulls", "0",
                       "--metrics", "coherence", "--scheduler", f"tcp://127.0.0.1:{port}")
    assert time.perf_counter() - started < 20  # 30 s and a traceback before
    one_line_error(code, err, f"cannot connect to a Dask scheduler at tcp://127.0.0.1:{port}", "--scheduler")


def test_analyze_with_no_metrics_computes_nothing_and_says_so(store, tmp_path, capsys):
    for value in ("", " , "):
        code, err = invoke(capsys, "analyze", store, "--out", str(tmp_path / "o"), "--metrics", value)
        one_line_error(code, err, "nothing to compute", "coherence")
    assert not (tmp_path / "o").exists()


def test_null_memory_estimate_refuses_what_cannot_fit():
    from pipelines.cli.analyze import check_null_memory

    check_null_memory(1000, 400)  # the papers' setting: a few MB
    with pytest.raises(AnalysisError, match="use fewer --nulls"):
        check_null_memory(100_000, 10**9)


def _zero_step_store(path):
    create_run(str(path), small_layout())  # what a run killed before its first step leaves
    return path


def _zero_example_store(path):
    layout = small_layout(example_ids=np.zeros(0, np.int64), n_train=0, true_label=None, train_label=None)
    writer = create_run(str(path), layout)
    writer.append_step(0, **step_data(layout, 0))
    if hasattr(writer, "close"):
        writer.close()
    return path


@pytest.mark.parametrize("make, phrase", [(_zero_step_store, "has no committed steps"),
                                          (_zero_example_store, "tracks no examples")])
def test_analyze_empty_store_is_one_line(tmp_path, capsys, make, phrase):
    path = make(tmp_path / "run")
    code, err = invoke(capsys, "analyze", str(path), "--out", str(tmp_path / "o"), "--nulls", "2")
    one_line_error(code, err, phrase)
    assert not (tmp_path / "o").exists()


# --- output folders and file-system errors ------------------------------------------------------------------

def test_out_through_a_file_is_one_line(store, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (["run", "label-noise", "--quick"], ["demo", "--quick"], ["analyze", store]):
        code, err = invoke(capsys, *argv, "--out", str(afile / "sub"))
        one_line_error(code, err, f"--out {afile / 'sub'}", "is a file, not a folder")
    assert afile.read_text() == "x"


def test_unwritable_out_is_refused_before_any_work(store, tmp_path, capsys, monkeypatch):
    """Root may write anywhere, so the permission answer is faked; the chmod test below runs as a user."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode, **kw: False if os.path.abspath(p) == str(locked) else real(p, mode, **kw))
    never_start(monkeypatch)
    for argv in (["run", "label-noise", "--quick"], ["analyze", store]):
        code, err = invoke(capsys, *argv, "--out", str(locked / "o"))
        one_line_error(code, err, "is not writable", "--out")
    monkeypatch.chdir(locked)  # an unwritable working folder and the default --out
    code, err = invoke(capsys, "demo", "--quick")
    one_line_error(code, err, "the working folder is not writable", "run from one")


def _fail_if_run(*args, **kwargs):
    raise AssertionError("the command started its work although an option is unusable")


def never_start(monkeypatch):
    """Make ``run`` and ``demo`` fail the test if they get past their door checks."""
    import pipelines.experiments as experiments
    import pipelines.experiments.label_noise as label_noise

    monkeypatch.setattr(experiments, "run_experiment", _fail_if_run)
    monkeypatch.setattr(label_noise, "run", _fail_if_run)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_chmod_read_only_out_is_one_line(store, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = invoke(capsys, "analyze", store, "--out", str(locked / "o"))
        one_line_error(code, err, "is not writable")
    finally:
        locked.chmod(0o755)


def test_os_errors_of_a_command_are_one_line_but_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    import pipelines.cli.analyze as analyze_cli

    def deny(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "o" / "results.zarr"))

    monkeypatch.setattr(analyze_cli, "check_out", deny)
    code, err = invoke(capsys, "analyze", "x", "--out", str(tmp_path / "o"))
    one_line_error(code, err, f"cannot use {tmp_path / 'o' / 'results.zarr'} (Permission denied)", "--out")

    def bug(*args, **kwargs):
        raise KeyError("a programming error")

    monkeypatch.setattr(analyze_cli, "check_out", bug)
    with pytest.raises(KeyError):
        main(["analyze", "x", "--out", str(tmp_path / "o")])


def test_bench_analysis_workdir_must_exist(tmp_path, capsys):
    code, err = invoke(capsys, "bench", "analysis", "--workdir", str(tmp_path / "missing"))
    usage_error(code, err, "--workdir")
    from gradstore.errors import GradstoreError
    from pipelines.bench.analysis import run

    with pytest.raises(GradstoreError, match="--workdir"):
        run(examples=4, base_steps=1, workdir=str(tmp_path / "missing"))


def test_cuda_device_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    never_start(monkeypatch)
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for argv in (["bench", "capture", "--m", "4"], ["bench", "store"], ["run", "label-noise", "--quick",
                                                                         "--out", str(tmp_path / "o")]):
        code, err = invoke(capsys, *argv, "--device", "cuda")
        one_line_error(code, err, "no CUDA device is available", "use --device cpu")
    assert not (tmp_path / "o").exists()


# --- messages in the CLI's words -------------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    "a run already exists at 'x'; pass overwrite=True to replace it or resume=True to append to it",
    "cannot append to 'x': y differs from the stored run; write to another path or pass overwrite=True",
    "a run already exists at 'x'; continue it (--resume on the command line, resume=True in Python) or write to "
    "another path",
    "cannot append to 'x': y differs from the stored run; write to another path (or replace the run: "
    "overwrite=True in Python)",
])
def test_library_argument_names_become_cli_options(message):
    shown = cli_words(message)
    assert "=True" not in shown and "Python" not in shown and "--" in shown, shown


def test_main_shows_library_errors_in_cli_words(tmp_path, capsys, monkeypatch):
    """Finding 20: the refusal of a mismatched store named overwrite=True, a Python argument."""
    import pipelines.cli.analyze as analyze_cli

    def refuse(*args, **kwargs):
        raise StoreError("cannot append to 'x': the model differs from the stored run; write to another path "
                         "(or replace the run: overwrite=True in Python)")

    monkeypatch.setattr(analyze_cli, "check_out", refuse)
    code, err = invoke(capsys, "analyze", "x", "--out", str(tmp_path / "o"))
    one_line_error(code, err, "differs from the stored run; choose another --out")
    assert "=True" not in err and "Python" not in err


def test_errors_stay_on_one_line_whatever_the_user_typed(tmp_path, capsys):
    weird = tmp_path / "a\nb\u2028c"
    code, err = invoke(capsys, "analyze", str(weird), "--out", str(tmp_path / "o"))
    one_line_error(code, err)
    assert len(err.splitlines()) == 1


def test_analysis_errors_from_the_library_are_analysis_errors():
    from analysis.report import check_metrics

    with pytest.raises(AnalysisError, match="vibes"):
        check_metrics(["coherence", "vibes"])
    with pytest.raises(AnalysisError, match="nothing to compute"):
        check_metrics([])
    assert check_metrics(["coherence", "coherence"]) == ("coherence",)
