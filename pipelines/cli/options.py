"""Options, click types and door checks shared by several subcommands.

Everything here runs before a command does any work: a bad option is a click usage error (exit 2)
and a bad output folder or device a one-line :class:`~gradstore.errors.GradstoreError` (exit 2).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from gradstore.errors import GradstoreError


class NonEmptyPath(click.Path):
    """A :class:`click.Path` that refuses the empty string (which would mean the working folder)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path names no file or folder; give a path", param, ctx)
        return super().convert(value, param, ctx)


class SchedulerAddress(click.ParamType):
    """A dask.distributed scheduler address, ``[scheme://]host:port`` (e.g. ``tcp://10.0.0.5:8786``)."""

    name = "address"
    _FORM = re.compile(r"(?:(?:tcp|tls|ws|wss|ucx)://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})")

    def convert(self, value, param, ctx):
        match = self._FORM.fullmatch(value) if isinstance(value, str) else None
        if match is None or not 1 <= int(match.group(1)) <= 65535:
            self.fail(f"{value!r} is not a scheduler address; give [scheme://]host:port with a port in 1-65535, "
                      "e.g. tcp://127.0.0.1:8786", param, ctx)
        return value


data_dir_option = click.option(
    "--data-dir",
    type=NonEmptyPath(file_okay=False),
    default=None,
    envvar="GRADSTORE_DATA",
    help="Folder with the four MNIST IDX files (default: $GRADSTORE_DATA, else the bundled subset).",
)
device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to train and capture."
)


def config_option(help: str):
    """``--config FILE``: a TOML file of settings.

    ``load_config`` reads and checks it, with one-line errors for an empty name, a folder, a file
    that is missing, unreadable, not UTF-8 or not TOML, and every wrong setting.
    """
    return click.option("--config", "config_path", type=click.Path(), default=None, metavar="FILE", help=help)


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` where torch sees no CUDA device (a CPU build of torch, or no GPU)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            build = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no GPU"
            raise GradstoreError(f"--device {device} was asked for but no CUDA device is available ({build}); "
                                 "use --device cpu")


def check_out(path: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be created or written.

    The nearest existing folder on the way to ``path`` must be a folder this user may write to.
    ``option`` is how the command line names the path (``--out``, ``--workdir``).
    """
    path = Path(path)
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    where = "the working folder" if str(probe) == "." else str(probe)
    if not probe.is_dir():
        raise GradstoreError(f"{option} {path}: {where} is a file, not a folder; choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        fix = f"choose a folder you may write to with {option}"
        if where == "the working folder":
            fix += " or run from one"
        raise GradstoreError(f"{option} {path}: {where} is not writable (permission denied); {fix}")


def command_line() -> str:
    """The running command as a shell line, rebuilt from its parsed parameters (for a report's
    provenance): the subcommand, its arguments and every option not left at its default."""
    import shlex

    ctx = click.get_current_context()
    parts = ["gradstore", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            parts.append(str(value))
        elif getattr(param, "is_flag", False):
            if value:  # a flag that was given (click may keep a flag's default as None)
                parts.append(max(param.opts, key=len))
        elif value is not None and value != param.default:
            parts += [max(param.opts, key=len), str(value)]
    return " ".join(shlex.quote(p) for p in parts)
