"""Write computed results: an xarray Zarr file, CSV tables and PNG plots, into a new directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from analysis import plots
from gradstore.errors import StoreError

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
        raise StoreError(f"output directory {str(out)!r} already exists and is not empty; "
                         "choose another --out or remove it")
    return out


def write_results(results: xr.Dataset, out) -> list[Path]:
    """Write computed ``results`` (from :func:`analysis.report.analyze`) into the new directory ``out``.

    Returns
    -------
    list of pathlib.Path
        ``results.zarr``, one CSV per table of :data:`TABLES` present, and the PNG plots.
    """
    out = prepare_out(out)
    out.mkdir(parents=True, exist_ok=True)
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
