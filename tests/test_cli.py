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
    out = run_cli("demo", "--steps", "1", "--data-dir", str(tmp_path / "missing"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradstore: error: data directory")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["demo", "--noise", "1.5"], ["demo", "--steps", "zero"], ["nosuchcommand"]])
def test_bad_arguments_exit_2(args):
    out = run_cli(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "Error" in out.stderr


def test_demo_runs_in_process(capsys):
    main(["demo", "--steps", "20", "--noise", "0", "--noise", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().endswith(tuple("0123456789")) and "%" in line]
    assert [r[0] for r in rows] == ["0%", "100%"]
    for r in rows:
        assert all(0.0 <= float(v) <= 1.0 for v in r[1:] if v != "nan")
