"""Write computed results: an xarray Zarr file, CSV tables and PNG plots, into a new directory.

The directory is written under a temporary sibling name, ``.NAME.partial-PID-XXXX``, and renamed to
``NAME`` only when every file is written: a killed run leaves no ``NAME``, only the marked partial
folder (safe to delete), and a reader never sees half an analysis.
"""

from __future__ import annotations

import errno
import os
import shutil
import secrets
from pathlib import Path

import xarray as xr

from analysis import registry
from gradstore.errors import AnalysisError, RunFolderError

def prepare_out(out) -> Path:
    """Check that ``out`` is new or an empty directory (results never overwrite anything)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AnalysisError(f"output directory {str(out)!r} already exists and is not empty; "
                         "choose another --out or remove it")
    return out


def write_results(results: xr.Dataset, out, *, replace: bool = False) -> list[Path]:
    """Write computed ``results`` (from :func:`analysis.report.analyze`) into the new directory ``out``.

    Parameters
    ----------
    results : xarray.Dataset
    out : path
        A new or empty directory; written under a temporary name and renamed into place when complete.
    replace : bool
        Replace an earlier analysis in ``out`` (a folder with ``results.zarr``), once the new one is
        complete (a resumed experiment recomputes its analysis). Anything else in ``out`` is refused.

    Returns
    -------
    list of pathlib.Path
        ``results.zarr``, one CSV per table the metrics declare (:func:`analysis.registry.metric`),
        and the PNG plots the metrics declare.
    """
    out = Path(out)
    if replace:
        _check_replaceable(out)
    else:
        prepare_out(out)
    retry = "run it again (gradstore run: with --resume)"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = _new_sibling(out, "partial")
    except OSError as exc:
        raise RunFolderError.write_failed(f"creating the analysis folder {out}", exc, retry=retry) from None
    try:
        written = _write_into(results, partial)
        _into_place(partial, out, replace=replace)
    except OSError as exc:
        raise RunFolderError.write_failed(f"writing the analysis {out}", exc, retry=retry) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone once renamed; removed after an error
    return [out / path.relative_to(partial) for path in written]


def _write_into(results: xr.Dataset, out: Path) -> list[Path]:
    """Write the Zarr file, the tables and the plots into the existing empty directory ``out``."""
    written = [out / "results.zarr"]
    # fixed-width unicode has no Zarr v3 specification; variable-length strings do
    results = results.copy()
    for name in list(results.variables):
        if results[name].dtype.kind == "U":
            results[name] = results[name].astype(object)
    results.to_zarr(written[0], mode="w-", consolidated=False)
    for name, names in tables(results).items():
        results[names].to_dataframe().to_csv(out / f"{name}.csv")
        written.append(out / f"{name}.csv")
    written += _plots(results, out)
    return written


def _metrics_of(results: xr.Dataset) -> dict:
    """metric name -> its variables of ``results`` (from each variable's ``metric`` attribute)."""
    found: dict = {}
    for v in results.data_vars:
        name = results[v].attrs.get("metric")
        if name in registry.REGISTRY:
            found.setdefault(name, []).append(v)
    return found


def tables(results: xr.Dataset) -> dict:
    """CSV table name -> the variables that go into it, from each metric's declared tables.

    Variables with a ``permutation`` dimension, and scalars, stay in Zarr only; a metric's output
    whose dimensions none of its tables declares is an :class:`AnalysisError`.
    """
    out: dict = {}
    for name, names in _metrics_of(results).items():
        metric = registry.get(name)
        for v in names:
            table = registry.table_of(metric, results[v].dims)
            if table is not None:
                out.setdefault(table, []).append(v)
    return out


def _new_sibling(out: Path, kind: str) -> Path:
    """A new empty folder ``.NAME.KIND-PID-XXXXXXXX`` beside ``out`` (permissions as ``mkdir`` gives)."""
    while True:
        path = out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _check_replaceable(out: Path) -> None:
    """Refuse to replace ``out`` unless it is missing, empty, or an earlier analysis."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise AnalysisError(f"{out} is a file, where the analysis folder goes; move it away or choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.zarr").is_dir():
        raise AnalysisError(f"{out} holds files that are not an analysis (no results.zarr); move them away "
                         "or choose another --out")


def _into_place(partial: Path, out: Path, *, replace: bool) -> None:
    """Rename the complete ``partial`` folder to ``out`` (an earlier ``out`` set aside first if ``replace``).

    Two processes finishing at once: without ``replace`` the second one is refused (one line); with
    it, the second one's results (of the same store) simply replace the first one's.
    """
    for _attempt in range(5):
        old = None
        if replace and out.is_dir() and any(out.iterdir()):
            old = _new_sibling(out, "old")
            try:
                os.replace(out, old)  # onto the empty temporary folder
            except FileNotFoundError:  # another process moved it meanwhile
                old.rmdir()
                old = None
        try:
            os.rename(partial, out)  # onto a missing or empty folder only
        except OSError as exc:
            if old is not None:
                try:
                    os.rename(old, out)  # the earlier analysis back in place
                    old = None
                except OSError:
                    pass  # another process put a complete analysis there: the earlier one can go
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not replace:
                raise AnalysisError(f"output directory {str(out)!r} was written by another process meanwhile; "
                                 "choose another --out or remove it") from None
            continue  # another process put its analysis in place between our two renames: set it aside too
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise AnalysisError(f"could not put the analysis into {out}: other processes keep writing it; "
                     "run one at a time")


def _plots(results: xr.Dataset, out: Path) -> list[Path]:
    """Every metric's declared plot of ``results``."""
    files = []
    for name in _metrics_of(results):
        plot = registry.get(name).plot
        if plot is not None:
            files += [Path(f) for f in plot(results, out)]
    return files
