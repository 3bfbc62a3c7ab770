"""Where a report's numbers come from, and whether its run is at the paper's settings.

Every report records the git commit of the code (when it runs from a git checkout; never an error
outside one), a hash of the merged configuration, the checksums of the data and the versions of
the packages that computed it. Its first line says whether the run is at the paper's settings, as
the experiment declares them (:class:`PaperSetting`), and names every way it is not: the bundled
subset instead of the full MNIST, ``--quick``, fewer steps than the paper, ...
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

PACKAGES = ("gradstore", "torch", "numpy", "scipy", "zarr", "dask", "xarray")


@dataclass(frozen=True)
class PaperSetting:
    """One setting of the paper: the config key path, the paper's value and where it says so.

    ``rule``: ``"eq"`` (the same value) or ``"min"`` (at least the paper's value, e.g. steps).
    """

    path: tuple[str, ...]
    value: Any
    where: str
    rule: str = "eq"

    def deviation(self, config: dict) -> str | None:
        have: Any = config
        for key in self.path:
            have = have[key]
        name = ".".join(self.path)
        if self.rule == "min" and have < self.value:
            return f"{name} = {have!r}, fewer than the paper's {self.value!r} ({self.where})"
        if self.rule == "eq" and have != self.value:
            return f"{name} = {have!r}, not the paper's {self.value!r} ({self.where})"
        return None


def deviations(config: dict, ctx, paper: tuple[PaperSetting, ...], fixed: tuple[str, ...] = (),
               *, full_data: bool | None = None) -> list[str]:
    """Every way the run is not at the paper's settings (an empty list: it is)."""
    out = list(fixed)
    if full_data is None:
        full_data = ctx.data_dir is not None
    if not full_data:
        out.append("the bundled 10,000-example MNIST subset, not the full MNIST (give --data-dir)")
    if getattr(ctx, "quick", False):
        out.append("the `--quick` variant")
    out += [d for d in (s.deviation(config) for s in paper) if d]
    return out


def settings_line(found: list[str], name: str) -> str:
    """The report's first line."""
    if found:
        return "**Not at the paper's settings:** " + "; ".join(found) + "."
    return (f"At the paper's settings (as declared in `PAPER` of the `{name}` experiment), on the full MNIST.")


def git_commit() -> str:
    """``<commit>`` of the checkout this code runs from (``+ uncommitted changes`` if dirty), or a
    sentence saying it is not available (not a git checkout, no git)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return "not available (not a git checkout)"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "not available (git not found)"
    return commit.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def config_hash(config: dict) -> str:
    """sha256 (first 16 hex digits) of the configuration as canonical JSON."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_checksums(data_dir) -> dict[str, str]:
    """The data's checksums: md5 of the four uncompressed MNIST files (verified when they were
    loaded), or the sha256 of the bundled subset."""
    from pipelines.data import MNIST_FILES, SUBSET_RESOURCE

    if data_dir is None:
        raw = resources.files("pipelines").joinpath("resources", SUBSET_RESOURCE).read_bytes()
        return {SUBSET_RESOURCE: "sha256 " + hashlib.sha256(raw).hexdigest()}
    return {name: f"md5 {md5} (uncompressed, verified at load)" for name, md5 in MNIST_FILES.values()}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def record(config: dict, ctx, *, command: str | None = None) -> dict[str, Any]:
    """The provenance of a run, as a JSON-able dict."""
    import os

    data_dir = ctx.data_dir if ctx.data_dir is not None else (os.environ.get("GRADSTORE_DATA") or None)
    return {"git_commit": git_commit(), "config_sha256_16": config_hash(config), "data": data_checksums(data_dir),
            "data_dir": str(data_dir) if data_dir else "bundled subset", "versions": versions(),
            **({"command": command} if command else {})}


def lines(rec: dict[str, Any]) -> list[str]:
    """The report's provenance section."""
    out = [f"git commit: `{rec['git_commit']}`", f"configuration hash (sha256 of the canonical JSON, first 16): "
           f"`{rec['config_sha256_16']}`", f"data: {rec['data_dir']}; " + "; ".join(f"`{k}` {v}" for k, v in
                                                                                  rec["data"].items()),
           "packages: " + ", ".join(f"{k} {v}" for k, v in rec["versions"].items())]
    if rec.get("command"):
        out.append(f"command: `{rec['command']}`")
    return out
