"""DDP benchmarks (docs/ddp.md): ``python -m pipelines.bench.ddp``.

Cases:

* ``torchrun``: ``examples/ddp_torchrun.py`` launched by ``torch.distributed.run --standalone``
  with 1 and with 2 processes (gloo, CPU; each process gets ``cores / processes`` torch threads,
  or ``--threads``),
  the same global batches and captures; rank 0's median seconds per training step (forward,
  backward, DDP all-reduce, optimizer step) and per captured step (header check, each rank's shard
  of the capture, float64 all-reduces, the gather, and the wait for the previous background write),
  and the wait for the last write at the end.
* ``gather``: the per-example arrays of one captured step brought to rank 0 by
  :meth:`ProcessGroupReducer.gather` between 2 spawned gloo processes, at m examples and L layers
  with ``coords`` sampled coordinates per layer (loss, correct, sq_norm and dot_with_sum per layer,
  grad_coords): bytes of the step, bytes that cross to rank 0, median seconds; and rank 0's
  :meth:`RunWriter.append_step` of the same step (the write a per-rank region write would split).

The machine these figures come from is named in docs/ddp.md with each table; on a loaded machine
they are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _median(values):
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- torchrun, 1 against 2 processes
def torchrun(processes: int, *, steps: int, every: int, tracked: int, moments: int, batch: int, out: Path,
             threads: int = 0) -> dict:
    """Run examples/ddp_torchrun.py under torch.distributed.run with ``processes`` ranks; rank 0's timings."""
    import secrets

    cores = os.cpu_count() or 1
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "GRADSTORE_GROUP_KEY": secrets.token_hex(32), "OMP_NUM_THREADS": str(threads or max(1, cores // processes))}
    bench = out / f"times-{processes}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(ROOT / "examples" / "ddp_torchrun.py"), "--out", str(out / f"run-{processes}"), "--steps",
               str(steps), "--every", str(every), "--tracked", str(tracked), "--moments", str(moments), "--batch",
               str(batch), "--bench", str(bench)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"torchrun with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    times = json.loads(bench.read_text())
    return {"processes": processes, "threads": times["threads"], "train_step_s": _median(times["train_step_s"][1:]),
            "capture_s": _median(times["capture_s"][1:]), "first_capture_s": times["capture_s"][0],
            "captures": len(times["capture_s"]), "close_s": times["close_s"], "wall_s": wall}


# ---------------------------------------------------------------- the gather of one step
def _part(n: int, layers: int, coords: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"loss": rng.random(n), "sq_norm": rng.random((n, layers)), "dot_with_sum": rng.standard_normal((n, layers)),
            "correct": rng.random(n) < 0.5,
            "grad_coords": rng.standard_normal((n, layers * coords), dtype=np.float32)}


def _gather_rank(rank, size, rendezvous, key, cases, repeats, result):
    import torch.distributed as dist

    from gradstore.record import ProcessGroupReducer
    from gradstore.record.messages import set_group_key

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    set_group_key(key)
    reducer, rows = ProcessGroupReducer(timeout=600), []
    try:
        for m, layers, coords in cases:
            rows_here = reducer.shard(m)
            part = _part(rows_here.stop - rows_here.start, layers, coords, seed=rank)
            seconds = []
            for i in range(repeats + 1):
                reducer.sum(_zero())  # line the ranks up
                start = time.perf_counter()
                pieces = reducer.gather(part)
                if i:
                    seconds.append(time.perf_counter() - start)
            if rank == 0:
                total = sum(a.nbytes for p in pieces for a in p.values())
                crossed = sum(a.nbytes for p in pieces[1:] for a in p.values())
                rows.append({"m": m, "layers": layers, "coords_per_layer": coords, "step_bytes": total,
                             "crossed_bytes": crossed, "gather_s": _median(seconds)})
            del pieces
        if rank == 0:
            Path(result).write_text(json.dumps(rows))
        dist.barrier()
    finally:
        set_group_key(None)
        dist.destroy_process_group()


def _zero():
    import torch

    return torch.zeros(1, dtype=torch.float64)


def gather(cases, *, repeats: int, out: Path) -> list[dict]:
    """Time ProcessGroupReducer.gather of one step's per-example arrays between 2 spawned gloo ranks."""
    import secrets

    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result = out / "gather.json"
    mp.spawn(_gather_rank, args=(2, str(out / "rendezvous"), secrets.token_bytes(32), list(cases), repeats,
                                 str(result)), nprocs=2, join=True)
    return json.loads(result.read_text())


def write(row: dict, *, out: Path) -> float:
    """Seconds of rank 0's RunWriter.append_step of the step ``row`` describes (float32, zstd)."""
    import numpy as np

    from gradstore.store import RunLayout, create_run

    m, layers, coords = row["m"], row["layers"], row["coords_per_layer"]
    names = [f"layer{i}" for i in range(layers)]
    layout = RunLayout(layers=tuple(names), params=tuple((f"{n}.weight", (coords,), n) for n in names),
                       example_ids=np.arange(m), n_train=m, coord_layer=tuple(n for n in names for _ in range(coords)),
                       coord_param=tuple(f"{n}.weight" for n in names for _ in range(coords)),
                       coord_index=np.tile(np.arange(coords), layers))
    part = _part(m, layers, coords, seed=0)
    zeros = np.zeros((3, layers))
    with create_run(str(out / f"write-{m}.zarr"), layout, overwrite=True) as writer:
        start = time.perf_counter()
        writer.append_step(0, m=zeros, norm_sq_of_sum=zeros, sum_of_norm_sq=zeros, **part)
        return time.perf_counter() - start


def markdown(runs: list[dict], gathers: list[dict]) -> str:
    lines = ["| processes | torch threads each | training step (ms) | captured step (ms) | first capture (ms) | "
             "last write wait (ms) |", "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['processes']} | {r['threads']} | {1e3 * r['train_step_s']:.1f} | {1e3 * r['capture_s']:.1f} | "
                     f"{1e3 * r['first_capture_s']:.0f} | {1e3 * r['close_s']:.0f} |")
    lines += ["", "| m | layers | coords/layer | step (MB) | to rank 0 (MB) | gather (s) | gather (GB/s) | "
              "rank 0 write (s) |", "|---|---|---|---|---|---|---|---|"]
    for g in gathers:
        rate = g["crossed_bytes"] / g["gather_s"] / 1e9 if g["gather_s"] > 0 else float("nan")
        lines.append(f"| {g['m']} | {g['layers']} | {g['coords_per_layer']} | {g['step_bytes'] / 1e6:.1f} | "
                     f"{g['crossed_bytes'] / 1e6:.1f} | {g['gather_s']:.3f} | {rate:.2f} | "
                     f"{g.get('write_s', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench.ddp", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps of each torchrun run")
    parser.add_argument("--every", type=int, default=5, help="capture every N steps")
    parser.add_argument("--tracked", type=int, default=1000, help="tracked train examples")
    parser.add_argument("--moments", type=int, default=2000, help="examples of the moments sample")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process in the torchrun cases (0: cores / processes)")
    parser.add_argument("--m", default="1000,10000,50000", help="examples of the gather cases, comma-separated")
    parser.add_argument("--layers", type=int, default=60, help="layers of the gather cases")
    parser.add_argument("--coords", type=int, default=20, help="sampled coordinates per layer in the gather cases")
    parser.add_argument("--repeats", type=int, default=3, help="timed gathers per case (median), after one warm-up")
    parser.add_argument("--no-write", action="store_true", help="skip rank 0's store write of each gather case")
    parser.add_argument("--skip-torchrun", action="store_true", help="the gather cases only")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gradstore-bench-ddp-") as tmp:
        out = Path(tmp)
        runs = [] if args.skip_torchrun else [
            torchrun(n, steps=args.steps, every=args.every, tracked=args.tracked, moments=args.moments,
                     batch=args.batch, out=out, threads=args.threads) for n in (1, 2)]
        cases = [(int(m), args.layers, args.coords) for m in args.m.split(",")]
        gathers = gather(cases, repeats=args.repeats, out=out)
        if not args.no_write:
            for row in gathers:
                row["write_s"] = write(row, out=out)
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")
    print(markdown(runs, gathers))
    if args.json is not None:
        args.json.write_text(json.dumps({"torchrun": runs, "gather": gathers}, indent=1))


if __name__ == "__main__":
    main()
