"""Experiment configuration: packaged TOML defaults (the paper's settings), a ``[quick]`` table of
overrides for a few-minutes run on 2 CPU cores, and an optional user file on top.

Every key a user file sets must already exist in the defaults, with a value of the same type, so a
typo is an error and not a silently ignored setting.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from gradstore.errors import GradstoreError


def packaged_defaults(name: str) -> dict[str, Any]:
    """The TOML file ``pipelines/configs/<name>.toml`` as a dict (with its ``quick`` table)."""
    text = resources.files("pipelines").joinpath("configs", f"{name}.toml").read_text()
    return tomllib.loads(text)


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return type(default) is type(value)


def merge(base: dict[str, Any], override: dict[str, Any], *, where: str) -> dict[str, Any]:
    """``base`` updated by ``override``, refusing unknown keys and values of another type."""
    out = dict(base)
    for key, value in override.items():
        if key not in base:
            raise GradstoreError(f"{where}: unknown setting {key!r}; known settings: {', '.join(sorted(base))}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise GradstoreError(f"{where}: setting {key!r} must be a table")
            out[key] = merge(base[key], value, where=f"{where} [{key}]")
        elif not _same_kind(base[key], value):
            raise GradstoreError(
                f"{where}: setting {key!r} must be a {type(base[key]).__name__}, got {value!r}"
            )
        else:
            out[key] = value
    return out


def load_config(name: str, *, quick: bool = False, path: str | Path | None = None) -> dict[str, Any]:
    """The configuration of experiment ``name``: defaults, then ``[quick]`` if asked, then ``path``."""
    config = packaged_defaults(name)
    quick_table = config.pop("quick", {})
    if quick:
        config = merge(config, quick_table, where=f"{name} [quick]")
    if path is not None:
        path = Path(path)
        try:
            user = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise GradstoreError(f"configuration file {path} does not exist; give an existing TOML file") from None
        except tomllib.TOMLDecodeError as exc:
            raise GradstoreError(f"configuration file {path} is not valid TOML: {exc}") from None
        user.pop("quick", None)
        config = merge(config, user, where=str(path))
    return config
