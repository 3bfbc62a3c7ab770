"""``gradstore theory``: table, --json, exit status 1 on a failed check, 2 on a bad check name."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import theory
from pipelines.cli import COMMANDS, main
from pipelines.cli.theory import theory as theory_command
from theory.result import CheckResult

FAST = ["lemma4_zero_gradients", "theorem3_moments"]


def test_registered():
    assert COMMANDS["theory"][:2] == ("pipelines.cli.theory", "theory")


def test_table_lists_every_selected_statement():
    result = CliRunner().invoke(theory_command, [f"--check={n}" for n in FAST])
    assert result.exit_code == 0, result.output
    assert "statement" in result.output and "where" in result.output
    assert "Lemma 4" in result.output and "Theorem 3" in result.output
    assert result.output.count("PASS") == 2
    assert "2/2 statements verified" in result.output


def test_json_parses_and_matches_run_checks():
    result = CliRunner().invoke(theory_command, ["--json", *[f"--check={n}" for n in FAST]])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["passed"] is True
    assert [c["name"] for c in payload["checks"]] == FAST
    assert set(payload["checks"][0]) == {"name", "statement", "location", "method", "passed", "seconds", "detail"}


def test_list_names_every_check():
    result = CliRunner().invoke(theory_command, ["--list"])
    assert result.exit_code == 0
    assert result.output.split() == list(theory.REGISTRY)


def test_a_failing_check_exits_1(monkeypatch):
    def failing(names=None):
        return [CheckResult("x", "a false statement", "nowhere", "none", False, 0.0, "rejected")]

    monkeypatch.setattr(theory, "run_checks", failing)
    result = CliRunner().invoke(theory_command, [])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "FAILED x: rejected" in result.output
    result = CliRunner().invoke(theory_command, ["--json"])
    assert result.exit_code == 1 and json.loads(result.output)["passed"] is False


def test_unknown_check_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["theory", "--check", "no_such_check"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradstore: error: unknown theory check") and "\n" not in err


def test_console_script_json():
    """The installed entry point, in a fresh process, with one fast check."""
    out = subprocess.run(
        [sys.executable, "-c", "from pipelines.cli import main; main()", "theory", "--json",
         "--check", "lemma4_zero_gradients"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["checks"][0]["passed"] is True
