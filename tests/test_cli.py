"""The command line: bad input gives one clear line and exit status 2; the demo runs."""

import subprocess
import sys

import pytest

from pipelines.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", "from pipelines.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout


def test_missing_data_dir_is_one_line_exit_2(tmp_path):
    out = run_cli("demo", "--quick", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "missing"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradstore: error: data directory")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["run", "nosuch"], ["demo", "--device", "tpu"], ["nosuchcommand"]])
def test_bad_arguments_exit_2(args):
    out = run_cli(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "Error" in out.stderr


def test_demo_quick_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"report: {out / 'report.md'}"
    report = (out / "report.md").read_text()
    assert "| 0% |" in report and "| 50% |" in report and "| 100% |" in report
    for png in ("m_coherence.png", "accuracy.png", "noise-0.50/analysis/loss_split.png"):
        assert (out / png).stat().st_size > 1000
    # Never overwrites: a second run into the same folder is refused with exit status 2.
    again = run_cli("demo", "--quick", "--out", str(out))
    assert again.returncode == 2 and "already holds results" in again.stderr
