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

import numpy as np
import xarray as xr

from analysis import plots
from gradstore.errors import AnalysisError, RunFolderError

#: CSV table name for each set of dimensions (variables with a ``permutation`` dim stay in Zarr only)
TABLES = {
    frozenset({"source", "step", "sample", "layer"}): "coherence",
    frozenset({"step", "layer"}): "per_step",
    frozenset({"step", "layer", "class", "class_"}): "stiffness_class",
    frozenset({"step", "layer", "group"}): "easy_hard",
    frozenset({"step", "layer", "group", "group_"}): "easy_hard_pairs",
    frozenset({"batch_size", "step", "layer"}): "minibatch",
    frozenset({"example"}): "examples",
}


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
        ``results.zarr``, one CSV per table of :data:`TABLES` present, and the PNG plots.
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
    for dims, name in TABLES.items():
        names = [v for v in results.data_vars if frozenset(results[v].dims) == dims]
        if names:
            table = results[names].to_dataframe()
            table.to_csv(out / f"{name}.csv")
            written.append(out / f"{name}.csv")
    written += _plots(results, out)
    return written


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
    files = []
    if "m_coherence" in results and "source" in results.dims:
        for sample in results.sample.values:
            for source in results.source.values:
                if np.isfinite(results.m_coherence.sel(source=source, sample=sample)).any():
                    path = out / f"m_coherence_{sample}_{source}.png"
                    plots.coherence_plot(results, path, sample=str(sample), source=str(source))
                    files.append(path)
    if "f_p" in results:
        files.append(out / "loss_split.png")
        plots.loss_split_plot(results, files[-1])
    for name in ("sign_stiffness_class", "cosine_stiffness_class"):
        if name in results:
            for label, step in (("first", results.step.values[0]), ("last", results.step.values[-1])):
                files.append(out / f"{name}_{label}.png")
                plots.matrix_plot(results[name].sel(step=step, layer="(model)"), files[-1],
                                  title=f"{name.replace('_class', '')} at step {step}")
    if "easy_hard_m_coherence" in results:
        files.append(out / "easy_hard.png")
        plots.easy_hard_plot(results, files[-1])
    return files
