"""Experiment configuration: packaged TOML defaults (the paper's settings), a ``[quick]`` table of
overrides for a few-minutes run on 2 CPU cores, and an optional user file on top.

Every key a user file sets must already exist in the defaults, so a typo is an error and not a
silently ignored setting; every value is then checked against the experiment's schema
(:mod:`pipelines.experiments.schema`: type and range of each key, and rules across keys) before
any work starts. Errors are :class:`~gradstore.errors.ConfigError`, one line naming the file, the
key and what is allowed.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from gradstore.errors import ConfigError
from pipelines.experiments.schema import SCHEMAS, check_keys, problems, shown_key


def packaged_defaults(name: str) -> dict[str, Any]:
    """The TOML file ``pipelines/configs/<name>.toml`` as a dict (with its ``quick`` table)."""
    text = resources.files("pipelines").joinpath("configs", f"{name}.toml").read_text()
    return tomllib.loads(text)


def merge(base: dict[str, Any], override: dict[str, Any], *, where: str,
          table: tuple[str, ...] = ()) -> dict[str, Any]:
    """``base`` updated by ``override``, refusing unknown keys and a value where a table belongs.

    ``where`` names the file in messages and ``table`` the TOML table being merged. Types and
    ranges are the schema's job (:func:`check`), not this function's.
    """
    out = dict(base)
    for key, value in override.items():
        shown = shown_key((*table, key))
        if key not in base:
            raise ConfigError(f"{where}: unknown setting {shown}; known settings"
                              f"{' of [' + shown_key(table) + ']' if table else ''}: {', '.join(sorted(base))}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: setting {shown} must be a table ([{shown_key((*table, key))}])")
            out[key] = merge(base[key], value, where=where, table=(*table, key))
        else:
            out[key] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """A user's TOML configuration file as a dict; :class:`ConfigError` (one line) if it cannot be read."""
    if str(path) == "":
        raise ConfigError("the configuration file name is empty; give --config the path of a TOML file")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"configuration file {path} is a folder; give --config the path of a TOML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist; give an existing TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not UTF-8 text (byte {exc.start}); "
                          "save it as UTF-8 TOML") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path} ({exc.strerror or exc}); "
                          "give a readable TOML file") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def check(name: str, config: dict[str, Any], *, origin) -> None:
    """Refuse the first setting of ``config`` that experiment ``name``'s schema does not allow.

    ``origin(path)`` names the file a key path's value came from (for the message).
    """
    schema = SCHEMAS[name]
    check_keys(schema, config)  # the defaults and the schema must agree (a bug otherwise)
    found = problems(schema, config)
    if found:
        paths, message = found[0]
        raise ConfigError(f"{origin(paths)}: {message}")


def _has(table: dict[str, Any], path) -> bool:
    for key in path:
        if not isinstance(table, dict) or key not in table:
            return False
        table = table[key]
    return True


def load_config(name: str, *, quick: bool = False, path: str | Path | None = None) -> dict[str, Any]:
    """The configuration of experiment ``name``: defaults, then ``[quick]`` if asked, then ``path``.

    Raises
    ------
    ConfigError
        If ``path`` cannot be read or is not TOML, sets an unknown key, or any setting has the
        wrong type or range (see :mod:`pipelines.experiments.schema`).
    """
    config = packaged_defaults(name)
    quick_table = config.pop("quick", {})
    user: dict[str, Any] = {}
    if quick:
        config = merge(config, quick_table, where=f"{name} [quick]")
    if path is not None:
        user = read_toml(path)
        user.pop("quick", None)
        config = merge(config, user, where=str(path))

    def origin(paths) -> str:
        if any(_has(user, p) for p in paths):
            return str(path)
        where = f"pipelines/configs/{name}.toml"
        return where + (" [quick]" if quick and any(_has(quick_table, p) for p in paths) else "")

    check(name, config, origin=origin)
    return config

