"""The ``gradstore`` command line.

Each subcommand lives in its own module of this package and is imported only when it runs, so
``gradstore --help`` stays fast. Adding a subcommand is adding one entry to ``COMMANDS``.

Any :class:`gradstore.errors.GradstoreError` raised by a command is printed as a single line,
``gradstore: error: <what is wrong and how to fix it>``, with exit status 2 (as click does for bad
arguments); nothing else is printed. So is any :class:`OSError` (a folder that cannot be written, a
path through a file, a full disk): ``gradstore: error: cannot use PATH (<reason>); <fix>``. Other
exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import errno
import importlib
import re
import sys

import click

from gradstore.errors import GradstoreError

#: subcommand name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("pipelines.cli.demo", "demo", "Label noise + coherence on the bundled MNIST subset, with a report."),
    "run": ("pipelines.cli.run", "run", "Run one of the papers' experiments end to end."),
    "analyze": ("pipelines.cli.analyze", "analyze", "Offline metrics, permutation nulls and plots of a run store."),
    "inspect": ("pipelines.cli.inspect", "inspect", "Summarise a gradstore run store (steps, examples, layers, sizes)."),
    "layers": ("pipelines.cli.layers", "layers", "Which capture path (rule, fallback, refused) each parameter of a model takes."),
    "bench": ("pipelines.cli.bench", "bench", "Speed and memory benchmarks (capture, ...)."),
    "theory": ("pipelines.cli.theory", "theory", "Verify the coherence theorems symbolically against the implementation."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gradstore")
def cli():
    """gradstore: measure how per-example gradients align during training."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    try:
        cli.main(args=argv, prog_name="gradstore", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # bad arguments: click's message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("gradstore: aborted", err=True)
        sys.exit(130)
    except GradstoreError as exc:
        click.echo(f"gradstore: error: {one_line(cli_words(str(exc)))}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"gradstore: error: {one_line(os_error_message(exc))}", err=True)
        sys.exit(2)


#: Python argument names in library messages -> what a command-line user does instead
_CLI_WORDS = (
    (re.compile(r", \w+=\w+ in Python\)"), ")"),  # "(--resume on the command line, resume=True in Python)"
    (re.compile(r"\s*\([^()]*\b\w+=\w+ in Python\)"), ""),  # "(or replace the run: overwrite=True in Python)"
    (re.compile(r"pass overwrite=True to replace it or resume=True to append to it"),
     "choose another --out, or pass --resume to continue that run"),
    (re.compile(r"write to another path or pass overwrite=True"), "choose another --out"),
    (re.compile(r"pass overwrite=True"), "choose another --out"),
    (re.compile(r"write to another path"), "choose another --out"),
    (re.compile(r"\bresume=True\b"), "--resume"),
)


def cli_words(message: str) -> str:
    """``message`` with Python argument names (``overwrite=True``, ``resume=True``) in the CLI's terms."""
    for pattern, words in _CLI_WORDS:
        message = pattern.sub(words, message)
    return message


#: errno -> how to fix it, for :func:`os_error_message`
_OS_FIXES = {
    errno.EACCES: "choose a folder you may write to (--out) or change its permissions",
    errno.EPERM: "choose a folder you may write to (--out) or change its permissions",
    errno.EROFS: "the file system is read-only; choose a folder on another one (--out)",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder where a file is needed; give a file",
    errno.ENOENT: "check that the path exists",
    errno.EEXIST: "it already exists; choose another path",
    errno.ENOSPC: "the disk is full; free some space and run again (`gradstore run --resume` continues a run)",
    errno.EDQUOT: "the disk quota is used up; free some space and run again",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def os_error_message(exc: OSError) -> str:
    """One line for a file-system (or connection) error: what failed, why, and how to fix it."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        what = str(exc) or type(exc).__name__
        return what if exc.errno not in _OS_FIXES else f"{what}; {_OS_FIXES[exc.errno]}"
    target = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    fix = _OS_FIXES.get(exc.errno, "check the path and its permissions")
    return f"cannot use {target} ({reason}); {fix}"


#: characters str.splitlines() breaks at
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(message: str) -> str:
    """``message`` on one line: line breaks (in a user's path, say) written as escapes."""
    return _LINE_BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), message)
