"""``gradstore bench analysis``: out-of-core scaling and permutation-null speed of the analysis.

Cases (each timed in its own process, which reports its wall time and peak resident memory):

* ``scale-Nx``: synthetic run stores (written with the store writer) of N × ``base_steps`` steps,
  ``examples`` tracked examples, ``coords`` coordinates and exact Gram blocks; the analysis
  (coherence exact + estimated, stiffness, confusion, loss split with ``nulls`` permutations) is
  computed from disk with the threaded scheduler, 8 steps per compute
  (:func:`analysis.report.compute_by_steps`, as ``gradstore analyze`` does). Wall time should grow linearly, peak memory not.
* ``nulls-exact``: ``nulls`` permutations of the pristine/corrupt split of f_p over the stored
  per-example ``dot_with_sum`` of ``null_steps`` steps × ``examples`` examples (in memory).
* ``nulls-coords``: the same from ``grad_coords`` (``null_coords`` coordinates, held in memory):
  per-example d_i = g_i·g estimated from the coordinates, then the nulls.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCALE_METRICS = ("coherence", "stiffness", "confusion", "loss_split")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20  # resident pages


def _disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def case_scale(store: str, nulls: int) -> dict:
    import dask

    from analysis.report import analyze, compute_by_steps, open_store

    before = _peak_rss_mb()
    t0, c0 = time.perf_counter(), _cpu_s()
    ds = open_store(store)
    with dask.config.set(scheduler="threads"):
        result = compute_by_steps(analyze(ds, metrics=SCALE_METRICS, n_permutations=nulls), steps_per_batch=8)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cpu_s": _cpu_s() - c0, "peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": before,
            "steps": ds.sizes["step"], "f_p_last": float(result.f_p.isel(step=-1).sel(layer="(model)"))}


def case_nulls(source: str, steps: int, examples: int, coords: int, nulls: int) -> dict:
    import numpy as np

    from analysis import losssplit, nulls as nulls_mod, sources
    from analysis.synthetic import synthetic_run

    # the exact case only needs dot_with_sum: generate it from a few coordinates
    ds = synthetic_run(n_steps=steps, n_train=examples, n_test=0, n_coords=coords if source == "coords" else 16,
                       gram=False, proj=False, step_chunk=10)
    ds = ds[["grad_coords", "dot_with_sum", "corrupt", "split", "coord_layer"]]
    if source == "coords":
        ds["grad_coords"] = ds["grad_coords"].persist()
        d = sources.layer_dot_with_sum(ds, "coords")
    else:
        ds["dot_with_sum"] = ds["dot_with_sum"].persist()
        d = sources.layer_dot_with_sum(ds, "exact")
    pristine = ~np.asarray(ds.corrupt.values, bool)
    rss_input = _rss_now_mb()
    t0 = time.perf_counter()
    d = d.persist(scheduler="threads")  # the per-example reduction: d_i = g_i·g per layer
    reduce_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = nulls_mod.permutation_test(lambda m: losssplit.share(d, m), pristine, n_permutations=nulls,
                                      seed=0).compute(scheduler="threads")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "reduce_s": reduce_s, "peak_rss_mb": _peak_rss_mb(), "rss_with_input_mb": rss_input,
            "rss_after_mb": _rss_now_mb(), "null_size": int(test.null.size),
            "input_mb": (ds.grad_coords.nbytes if source == "coords" else ds.dot_with_sum.nbytes) / 1e6}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "pipelines.bench.analysis", *args], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark case {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(*, examples: int, coords: int, base_steps: int, factors=(1, 4, 8), nulls: int = 1000,
        null_steps: int = 100, null_coords: int = 4096, workdir: str | None = None, echo=print) -> dict:
    """Write the synthetic stores, time every case in a subprocess; return the rows.

    ``workdir`` (an existing folder) holds the temporary stores; :class:`GradstoreError` if it is missing.
    """
    from analysis.synthetic import write_synthetic_store
    from gradstore.errors import GradstoreError

    if workdir is not None and not Path(workdir).is_dir():
        raise GradstoreError(f"--workdir {workdir} is not an existing folder; create it or choose another")
    rows: dict = {"scale": [], "nulls": []}
    with tempfile.TemporaryDirectory(prefix="gradstore-bench-analysis-", dir=workdir) as tmp:
        for factor in factors:
            path = Path(tmp) / f"run-{factor}x"
            t0 = time.perf_counter()
            write_synthetic_store(path, n_steps=factor * base_steps, n_train=examples, n_test=0, n_coords=coords,
                                  proj=False, step_chunk=1)
            size = _disk_mb(path)
            echo(f"  wrote {factor}x store: {size:.0f} MB in {time.perf_counter() - t0:.0f} s")
            row = _child(["scale", str(path), str(nulls)])
            row.update(factor=factor, store_mb=size)
            rows["scale"].append(row)
            echo(f"  scale {factor}x: {row['wall_s']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB")
            import shutil

            shutil.rmtree(path)
    for source in ("exact", "coords"):
        row = _child(["nulls", source, str(null_steps), str(examples), str(null_coords), str(nulls)])
        row.update(source=source)
        rows["nulls"].append(row)
        echo(f"  nulls {source}: {row['wall_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB")
    return rows


def markdown(rows: dict, *, examples: int, coords: int, base_steps: int, nulls: int, null_steps: int,
             null_coords: int) -> str:
    lines = [f"Out-of-core scaling ({examples} examples, {coords} coords, exact Gram blocks, "
             f"metrics {', '.join(SCALE_METRICS)}, {nulls} permutations; threaded scheduler, 8 steps per batch):", "",
             "| store | steps | size on disk (MB) | wall (s) | CPU (s) | CPU s / step | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows["scale"]:
        lines.append(f"| {r['factor']}x | {r['steps']} | {r['store_mb']:.0f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['cpu_s'] / r['steps']:.2f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"{nulls} permutation nulls of the pristine/corrupt split (f_p), {null_steps} steps × "
              f"{examples} examples (input held in memory):", "",
              "| input | input size (MB) | d_i from input (s) | nulls + p-values + bands (s) | "
              "RSS with input loaded (MB) | RSS after (MB) |",
              "|---|---|---|---|---|---|"]
    for r in rows["nulls"]:
        what = "per-example dot_with_sum (exact)" if r["source"] == "exact" else f"grad_coords ({null_coords} coords)"
        lines.append(f"| {what} | {r['input_mb']:.0f} | {r['reduce_s']:.2f} | {r['wall_s']:.2f} | "
                     f"{r['rss_with_input_mb']:.0f} | "
                     f"{r['rss_after_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="one analysis benchmark case (run by gradstore bench analysis)")
    parser.add_argument("case", choices=["scale", "nulls"])
    parser.add_argument("args", nargs="+")
    ns = parser.parse_args(argv)
    if ns.case == "scale":
        row = case_scale(ns.args[0], int(ns.args[1]))
    else:
        source, steps, examples, coords, nulls = ns.args
        row = case_nulls(source, int(steps), int(examples), int(coords), int(nulls))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
