"""Benchmarks behind ``gradstore bench <name>``: shared timing and peak-memory helpers.

Each measured case runs in a fresh Python process (:func:`run_case`), so its peak memory is its
own: the growth of the process's peak resident set (CPU) or ``torch.cuda.max_memory_allocated``
(CUDA) over the state after loading data and building the model. Times are medians over repeats
after one warm-up call.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

from gradstore.errors import GradstoreError


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(fn, *, repeats: int, device: str = "cpu", warmup: bool = True) -> dict:
    """Median wall time of ``fn()`` over ``repeats`` calls after a warm-up, and its peak memory.

    Returns ``{"seconds": median, "times": [...], "peak_bytes": growth of the peak during the calls}``.
    """
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _peak_bytes(device)
    if warmup:
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "times": times, "peak_bytes": _peak_bytes(device) - before}


#: Untimed pairs before the timed ones. In a fresh process the first passes take fresh pages while
#: glibc's heap grows to its steady size: HF GPT-2's capture took 101, 183, 233 and 140 ms in its
#: first four timed pairs against 103-124 ms later, the untied LM's plain pass 460 ms in its first
#: against 321-358 ms (docs/benchmarks.md, "Steady state", 2026-12-02).
WARMUP_PAIRS = 3


def measure_paired(fn, baseline, *, repeats: int, device: str = "cpu", warmup: int = WARMUP_PAIRS) -> dict:
    """Time ``fn`` and ``baseline`` alternately (so both see the same machine load).

    The first call of ``fn`` gives its peak memory; ``warmup`` more pairs run untimed, so that the
    timed ones see the steady state a long training run sees (``WARMUP_PAIRS``); then ``repeats``
    pairs are timed, by wall clock and by this process's CPU time (less sensitive to other
    processes on a shared machine). Returns ``{"seconds", "times", "baseline_seconds",
    "baseline_times", "ratio" (median of the per-pair wall-time ratios), "cpu_ratio" (same for CPU
    time), "peak_bytes"}``.
    """
    first = measure(fn, repeats=1, device=device)
    baseline()
    _sync(device)
    for _ in range(warmup):
        baseline(), fn()
        _sync(device)
    wall: dict = {"fn": [], "base": []}
    cpu: dict = {"fn": [], "base": []}
    for _ in range(repeats):
        for key, f in (("base", baseline), ("fn", fn)):
            start, start_cpu = time.perf_counter(), time.process_time()
            f()
            _sync(device)
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return {
        "seconds": statistics.median(wall["fn"]), "times": wall["fn"],
        "baseline_seconds": statistics.median(wall["base"]), "baseline_times": wall["base"],
        "ratio": statistics.median(t / b for t, b in zip(wall["fn"], wall["base"])),
        "cpu_ratio": statistics.median(t / b for t, b in zip(cpu["fn"], cpu["base"])),
        "peak_bytes": first["peak_bytes"],
    }


def run_case(module: str, args: list[str], *, timeout: float = 3600) -> dict:
    """Run ``python -m module *args`` in a fresh process; it prints one JSON object as its last line."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GradstoreError(f"benchmark case {' '.join(args)} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n_bytes: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n_bytes / 2**20:.1f}"
