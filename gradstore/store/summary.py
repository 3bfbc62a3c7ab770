"""A printable summary of a run store (what ``gradstore inspect`` shows)."""

from __future__ import annotations

import json
import os

import fsspec
import numpy as np

from gradstore.errors import StoreError
from gradstore.store import _location
from gradstore.store.reader import open_run
from gradstore.store.verify import verify_run


def disk_sizes(target) -> dict[str, int]:
    """Bytes stored under each top-level key of the store (arrays and ``zarr.json``)."""
    path = _location.local_path(target)
    sizes: dict[str, int] = {}
    if path is not None:
        for dirpath, _, files in os.walk(path):
            rel = os.path.relpath(dirpath, path)
            top = "zarr.json" if rel == "." else rel.split(os.sep)[0]
            sizes[top] = sizes.get(top, 0) + sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return sizes
    fs, root = fsspec.core.url_to_fs(os.fspath(target))
    for name, size in fs.du(root, total=False).items():
        rel = name[len(root.rstrip("/")):].lstrip("/") if name.startswith(root.rstrip("/")) else name
        top = rel.split("/")[0] if "/" in rel else "zarr.json"
        sizes[top] = sizes.get(top, 0) + int(size)
    return sizes


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _measurement(m) -> str:
    """The ``measurement`` attribute in words: mode, BatchNorm priming, dropout seed."""
    if not m:
        return "not recorded"
    text = f"{m.get('mode', '?')} mode"
    priming = m.get("bn_priming")
    text += (f", BatchNorm primed on {priming['batches']} batch(es)" + (" (reset)" if priming.get("reset") else "")
             if priming else ", no BatchNorm priming")
    if "dropout_seed" in m:
        text += f", seeded per-example dropout (seed {m['dropout_seed']})"
    return text


def summarize(target, *, verify: bool = False) -> str:
    """Multi-line summary: steps, examples, layers, recorded arrays, sizes, schema, configuration.

    With ``verify``, every committed value is read back and checked (:func:`verify_run`); a
    damaged store raises :class:`StoreError` naming the array, chunk and step.
    """
    checked = None
    if verify:
        checked = verify_run(target)
        if not checked.ok:
            raise StoreError(checked.message())
    ds = open_run(target)
    a = ds.attrs
    steps = ds.step.values
    split = ds.split.values
    sizes = disk_sizes(target)
    lines = [
        f"store      {_location.describe(target)}",
        f"schema     {a['gradstore_schema']} (written by {a.get('code_version', '?')})",
        f"steps      {steps.size} committed" + (f", step {steps[0]} .. {steps[-1]}" if steps.size else ""),
        f"examples   {split.size}: {(split == 'train').sum()} train ({int(ds.corrupt.values[split == 'train'].sum())} "
        f"corrupt), {(split == 'test').sum()} test",
        f"layers     {ds.sizes['layer']}: {', '.join(map(str, ds.layer.values))}",
        f"task       {a.get('task', 'classification')}"
        + (f" {json.dumps(a['task_options'], sort_keys=True)}" if a.get("task_options") else ""),
        f"measured   {_measurement(a.get('measurement'))}",
        f"storage    dtype {a['storage']['dtype']}, compression {a['storage']['compression']}",
        f"recorded   coords {ds.sizes.get('coord', 0)}, projection dim {ds.sizes.get('proj', 0)}"
        f" (seed {a.get('projection_seed')}), gram {'yes' if 'gram' in ds else 'no'}",
        f"nonfinite  {int(np.asarray(ds.nonfinite.values).sum())} step(s) flagged",
        f"disk       {_mb(sum(sizes.values()))} in all",
    ]
    for key, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:6]:
        lines.append(f"             {key:<16} {_mb(size)}")
    lines.append(f"seeds      {json.dumps(a.get('seeds', {}), sort_keys=True)}")
    lines.append(f"config     {json.dumps(a.get('config', {}), sort_keys=True)}")
    if checked is not None:
        lines.append(f"verify     every committed value read back: {checked.committed} step(s), "
                     + ("every chunk checksum and step digest matches" if checked.checksums
                        else "every chunk present (this store has no checksums)"))
    return "\n".join(lines)
