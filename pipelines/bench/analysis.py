"""``gradstore bench analysis``: the analysis out of core, at the papers' shape.

Synthetic run stores of ``examples`` tracked examples × ``layers`` layers holding per-example
arrays only (``loss``, ``correct``, ``sq_norm``, ``dot_with_sum`` and the moments; no coordinates,
projections or Gram blocks), written with the store writer
(:func:`analysis.synthetic.write_per_example_store`) at 1×, 4× and 16× ``base_steps`` steps, one
at a time (each deleted before the next is written). On each:

* ``threads``: coherence and the pristine/corrupt loss split with ``nulls`` permutation nulls,
  computed from disk by :meth:`analysis.report.Plan.compute` (``steps_per_batch`` steps per
  compute) with the threaded scheduler, in a process of its own with one BLAS thread
  (``OMP_NUM_THREADS=1``: BLAS threads on top of Dask's oversubscribe the cores, 4x slower here)
  and ``MALLOC_TRIM_THRESHOLD_=65536`` (as dask.distributed's nanny sets for its workers);
* ``cluster``: the same through ``gradstore analyze STORE --scheduler ADDRESS`` (which first
  verifies every chunk of the store) on a 2-process ``distributed.LocalCluster`` with
  ``worker_memory`` per worker, one thread each;
* ``pairwise``: stiffness and gradient confusion through ``gradstore analyze --scheduler`` on the
  same kind of cluster, from ``grad_coords`` (the stores then hold ``coords_per_layer``
  coordinates per layer) over a seeded sample of ``pair_examples`` examples.

The resident memory of every process (the analysing process, and each worker) is sampled every
0.2 s with psutil; its peak is reported, as are worker restarts (a worker's pid changing) and the
bytes each worker spilled to disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

METRICS = ("coherence", "loss_split")
#: the pairwise metrics of the ``pairwise`` case: exact over a seeded sample of examples' pairs
PAIRWISE = ("stiffness", "confusion")


class RssSampler:
    """Peak resident memory of a set of processes (and their children), sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peaks, self.names = interval, {}, {}
        self._roots: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, pid: int, name: str, children: bool = False) -> None:
        self._roots[pid] = (name, children)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            for pid, (name, children) in list(self._roots.items()):
                try:
                    proc = psutil.Process(pid)
                    procs = [(pid, name, proc)]
                    if children:
                        procs += [(c.pid, f"{name}/child{c.pid}", c) for c in proc.children(recursive=True)]
                    for p_pid, p_name, p in procs:
                        rss = p.memory_info().rss / 2**20
                        if rss > self.peaks.get(p_pid, 0):
                            self.peaks[p_pid], self.names[p_pid] = rss, p_name
                except psutil.Error:
                    continue
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peak(self, name: str) -> float:
        return max((v for k, v in self.peaks.items() if self.names[k] == name), default=float("nan"))


def _disk_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e9


def case_threads(store: str, nulls: int, steps_per_batch: int) -> dict:
    """One analysis with the threaded scheduler (run in its own process by :func:`run`)."""
    import dask

    from analysis.report import open_store, prepare

    t0 = time.perf_counter()
    ds = open_store(store)
    with dask.config.set(scheduler="threads"):
        plan = prepare(ds, metrics=METRICS, n_permutations=nulls)
        results = plan.compute(steps_per_batch=steps_per_batch, null_distributions=False)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "steps": int(ds.sizes["step"]),
            "f_p_last": float(results.f_p.isel(step=-1).sel(layer="(model)")),
            "r_p_p_last": float(results.r_p_p_value.isel(step=-1).sel(layer="(model)"))}


#: one BLAS thread per Dask thread (as dask.distributed's nanny sets for its workers): the threaded
#: scheduler's threads each run a matrix product, and BLAS threads on top oversubscribe the cores
ONE_BLAS_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
#: glibc gives freed memory back at once (what the nanny sets for dask.distributed's workers): without
#: it the threaded process's peak RSS reflects heap fragmentation (614-652 MB instead of 383 MB at 1x)
TRIM = {"MALLOC_TRIM_THRESHOLD_": "65536"}


def _threads(store: Path, nulls: int, steps_per_batch: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.bench.analysis", "threads", str(store), str(nulls),
                             str(steps_per_batch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_BLAS_THREAD, **TRIM})
    with RssSampler() as rss:
        rss.watch(proc.pid, "main")
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"threaded analysis of {store} failed:\n{err[-3000:]}")
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_mb"] = {"main": rss.peak("main")}
    return row


def _worker_state(dask_worker=None):
    data = dask_worker.data
    spilled = getattr(data, "spilled_total", None)
    return {"pid": os.getpid(), "spilled_bytes": int(getattr(spilled, "disk_write_bytes", 0) if spilled else 0)}


def _cluster(store: Path, out: Path, nulls: int, steps_per_batch: int, worker_memory: str, metrics=METRICS,
             extra=("--no-null-distributions",)) -> dict:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=worker_memory,
                      dashboard_address=":0", silence_logs=50) as cluster, Client(cluster) as client:
        before = client.run(_worker_state)
        cmd = [sys.executable, "-c", "from pipelines.cli import main; main()", "analyze", str(store), "--out", str(out), "--scheduler",
               cluster.scheduler_address, "--metrics", ",".join(metrics), "--nulls", str(nulls),
               "--steps-per-batch", str(steps_per_batch), *extra]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with RssSampler() as rss:
            rss.watch(proc.pid, "main")
            for k, state in enumerate(before.values()):
                rss.watch(state["pid"], f"worker{k}")
            stdout, stderr = proc.communicate()
        wall = time.perf_counter() - t0
        after = client.run(_worker_state)
    if proc.returncode != 0:
        raise RuntimeError(f"gradstore analyze --scheduler on {store} failed:\n{stderr[-3000:]}")
    restarts = len({s["pid"] for s in before.values()} ^ {s["pid"] for s in after.values()}) // 2
    dashboard = next((line for line in stderr.splitlines() if "dashboard" in line), "")
    return {"wall_s": wall, "peak_rss_mb": {name: rss.peak(name) for name in ("main", "worker0", "worker1")},
            "restarts": restarts, "spilled_mb": sum(s["spilled_bytes"] for s in after.values()) / 2**20,
            "dashboard_line": dashboard.strip(), "stdout": stdout.strip().splitlines()[-1:]}


def run(*, examples: int = 50_000, layers: int = 60, base_steps: int = 28, factors=(1, 4, 16), nulls: int = 1000,
        steps_per_batch: int = 8, worker_memory: str = "1.5GB", workdir: str | None = None, cases=("threads", "cluster"),
        coords_per_layer: int = 16, pair_examples: int = 512, echo=print) -> list[dict]:
    """Write each store, analyse it in every case, delete it; return one row per store.

    The ``pairwise`` case (stiffness and gradient confusion on the cluster, from ``grad_coords``
    over a seeded sample of ``pair_examples`` examples) needs coordinates: with it in ``cases``
    every store holds ``coords_per_layer`` float32 coordinates per layer and example.

    ``workdir`` (an existing folder) holds the store while it is measured; :class:`GradstoreError`
    if it is missing or has less free space than the largest store needs (with a margin).
    """
    from analysis.synthetic import write_per_example_store
    from gradstore.errors import GradstoreError

    work = Path(workdir) if workdir is not None else Path.cwd()
    if not work.is_dir():
        raise GradstoreError(f"--workdir {work} is not an existing folder; create it or choose another")
    k = coords_per_layer if "pairwise" in cases else 0
    need_gb = max(factors) * base_steps * examples * layers * (16 + 4 * k) * 1.1 / 1e9  # 2 float64 arrays, coords, +10%
    free_gb = shutil.disk_usage(work).free / 1e9
    if need_gb > free_gb - 5:
        raise GradstoreError(f"the {max(factors)}x store needs about {need_gb:.0f} GB but {work} has {free_gb:.0f} GB "
                             "free (keeping 5 GB spare); lower --base-steps or choose another --workdir")
    rows = []
    for factor in factors:
        store = work / f"bench-analysis-{factor}x.gradstore"
        out = work / f"bench-analysis-{factor}x.analysis"
        try:
            t0 = time.perf_counter()
            write_per_example_store(store, n_steps=factor * base_steps, n_examples=examples, n_layers=layers,
                                    coords_per_layer=k)
            row = {"factor": factor, "steps": factor * base_steps, "store_gb": _disk_gb(store),
                   "write_s": time.perf_counter() - t0}
            echo(f"  wrote {factor}x store: {row['store_gb']:.1f} GB in {row['write_s']:.0f} s")
            if "threads" in cases:
                row["threads"] = _threads(store, nulls, steps_per_batch)
                echo(f"  {factor}x threads: {row['threads']['wall_s']:.0f} s, peak RSS "
                     f"{row['threads']['peak_rss_mb']['main']:.0f} MB")
            if "cluster" in cases:
                row["cluster"] = _cluster(store, out, nulls, steps_per_batch, worker_memory)
                c = row["cluster"]
                echo(f"  {factor}x cluster: {c['wall_s']:.0f} s, peak RSS " +
                     ", ".join(f"{k} {v:.0f} MB" for k, v in c["peak_rss_mb"].items()) +
                     f", restarts {c['restarts']}, spilled {c['spilled_mb']:.0f} MB")
            if "pairwise" in cases:
                pair_out = work / f"bench-analysis-{factor}x-pairwise.analysis"
                try:
                    row["pairwise"] = _cluster(store, pair_out, 0, steps_per_batch, worker_memory, metrics=PAIRWISE,
                                               extra=("--pair-examples", str(pair_examples),
                                                      "--pairwise-source", "coords"))
                finally:
                    shutil.rmtree(pair_out, ignore_errors=True)
                c = row["pairwise"]
                echo(f"  {factor}x pairwise: {c['wall_s']:.0f} s, peak RSS " +
                     ", ".join(f"{k} {v:.0f} MB" for k, v in c["peak_rss_mb"].items()) +
                     f", restarts {c['restarts']}, spilled {c['spilled_mb']:.0f} MB")
            rows.append(row)
            echo("  " + json.dumps(row))
        finally:
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def markdown(rows: list[dict], *, examples: int, layers: int, nulls: int, steps_per_batch: int,
             worker_memory: str) -> str:
    lines = [f"Per-example stores of {examples} examples × {layers} layers (loss, correct, sq_norm, dot_with_sum, "
             f"moments), metrics {', '.join(METRICS)} with {nulls} permutation nulls of the pristine/corrupt split, "
             f"{steps_per_batch} steps per compute. threads: `Plan.compute`, threaded scheduler; cluster: "
             f"`gradstore analyze --scheduler` (verification included) on a 2-process LocalCluster, "
             f"{worker_memory} per worker:", "",
             "| store | steps | size (GB) | write (s) | threads wall (s) | threads s/step | threads peak RSS (MB) | "
             "cluster wall (s) | cluster s/step | peak RSS main / worker 0 / worker 1 (MB) | restarts | spilled (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, c = r.get("threads"), r.get("cluster")
        cells = [f"{r['factor']}x", str(r["steps"]), f"{r['store_gb']:.1f}", f"{r['write_s']:.0f}"]
        cells += [f"{t['wall_s']:.0f}", f"{t['wall_s'] / r['steps']:.2f}", f"{t['peak_rss_mb']['main']:.0f}"] if t \
            else ["", "", ""]
        if c:
            p = c["peak_rss_mb"]
            cells += [f"{c['wall_s']:.0f}", f"{c['wall_s'] / r['steps']:.2f}",
                      f"{p['main']:.0f} / {p['worker0']:.0f} / {p['worker1']:.0f}", str(c["restarts"]),
                      f"{c['spilled_mb']:.0f}"]
        else:
            cells += ["", "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = [r for r in rows if r.get("pairwise")]
    if pairs:
        lines += ["", f"pairwise: {', '.join(PAIRWISE)} from grad_coords over a seeded sample of examples (exact over "
                  "its pairs, jackknife standard errors), `gradstore analyze --scheduler` on the same cluster:", "",
                  "| store | steps | size (GB) | wall (s) | s/step | peak RSS main / worker 0 / worker 1 (MB) | "
                  "restarts | spilled (MB) |", "|---|---|---|---|---|---|---|---|"]
        for r in pairs:
            c = r["pairwise"]
            p = c["peak_rss_mb"]
            lines.append(f"| {r['factor']}x | {r['steps']} | {r['store_gb']:.1f} | {c['wall_s']:.0f} | "
                         f"{c['wall_s'] / r['steps']:.2f} | {p['main']:.0f} / {p['worker0']:.0f} / {p['worker1']:.0f} | "
                         f"{c['restarts']} | {c['spilled_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="one analysis benchmark case (run by gradstore bench analysis)")
    parser.add_argument("case", choices=["threads"])
    parser.add_argument("args", nargs="+")
    ns = parser.parse_args(argv)
    store, nulls, spb = ns.args
    print(json.dumps(case_threads(store, int(nulls), int(spb))))


if __name__ == "__main__":
    main()
