"""The ``gradstore`` command line.

Each subcommand lives in its own module of this package and is imported only when it runs, so
``gradstore --help`` stays fast. Adding a subcommand is adding one entry to ``COMMANDS``.

Any :class:`gradstore.errors.GradstoreError` raised by a command is printed as a single line,
``gradstore: error: <what is wrong and how to fix it>``, with exit status 2 (as click does for bad
arguments); nothing else is printed.
"""

from __future__ import annotations

import importlib
import sys

import click

from gradstore.errors import GradstoreError

#: subcommand name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("pipelines.cli.demo", "demo", "Label noise + coherence on the bundled MNIST subset, with a report."),
    "run": ("pipelines.cli.run", "run", "Run one of the papers' experiments end to end."),
    "analyze": ("pipelines.cli.analyze", "analyze", "Offline metrics, permutation nulls and plots of a run store."),
    "inspect": ("pipelines.cli.inspect", "inspect", "Summarise a gradstore run store (steps, examples, layers, sizes)."),
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
        click.echo(f"gradstore: error: {exc}", err=True)
        sys.exit(2)
