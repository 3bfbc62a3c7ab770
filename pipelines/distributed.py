"""Local multi-process capture: ``gradstore run NAME --nproc N``.

:func:`capture_workers` makes this process rank 0 of a gloo process group on this machine and
spawns N-1 capture workers (``torch.multiprocessing``, spawn start method; each imports torch once).
Inside the block, :func:`gradstore.record.distributed.make_recorder` returns a
:class:`~gradstore.record.distributed.DistributedRecorder`, so every capture is sharded over the N
processes while training runs once, on rank 0 (see ``docs/scaling.md``).

What other local users can reach: the rendezvous is a file store in a fresh folder only this user
can open (mode 0700, removed afterwards), not a TCP port; gloo's own connections stay on the
loopback interface; and every message that carries Python objects is authenticated with a random
per-run secret (HMAC-SHA256, see :mod:`gradstore.record.messages`) that reaches the workers
through their spawn arguments, never the network.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from contextlib import contextmanager

from gradstore.errors import GradstoreError


def _init(rank: int, size: int, rendezvous: str, key: bytes) -> None:
    import torch.distributed as dist

    from gradstore.record.distributed import set_group_key

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    set_group_key(key)


def _worker(index: int, size: int, rendezvous: str, key: bytes, device: str, threads: int) -> None:
    import torch
    import torch.distributed as dist

    from gradstore.record.distributed import serve, set_group_key

    if threads:
        torch.set_num_threads(threads)
    _init(index + 1, size, rendezvous, key)
    try:
        serve(device)
    except GradstoreError as err:  # e.g. a message that failed authentication: one line, exit 2
        print(f"gradstore: error: capture worker {index + 1}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        set_group_key(None)
        dist.destroy_process_group()


@contextmanager
def capture_workers(nproc: int, device: str = "cpu", threads: int = 0):
    """Run the block as rank 0 of ``nproc`` local processes whose captures are sharded.

    Parameters
    ----------
    nproc : int
        Processes in all (1: no workers, nothing changes).
    device : {"cpu", "cuda"}
        Where the workers capture (worker r uses ``cuda:r % device_count``).
    threads : int
        torch threads per worker (0: torch's default).
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise GradstoreError(f"--nproc must be a positive integer, got {nproc!r}")
    if nproc == 1:
        yield
        return
    import torch.distributed as dist

    if dist.is_initialized():
        raise GradstoreError("a torch.distributed process group is already initialised in this process; "
                             "capture_workers starts its own")
    folder = tempfile.mkdtemp(prefix="gradstore-rendezvous-")  # mode 0700: this user only
    try:
        with _group(nproc, os.path.join(folder, "store"), device, threads):
            yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _group(nproc: int, rendezvous: str, device: str, threads: int):
    """Spawn the workers, join the group as rank 0 (one new secret for this run), stop them on exit."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from gradstore.record.distributed import set_group_key, stop_workers

    key = secrets.token_bytes(32)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    context = mp.spawn(_worker, args=(nproc, rendezvous, key, device, threads), nprocs=nproc - 1, join=False)
    ok = False
    try:
        _init(0, nproc, rendezvous, key)
        yield
        ok = True
    finally:
        try:
            if ok:
                stop_workers()
                while not context.join(timeout=60):
                    pass
        finally:
            if not ok:  # a worker may wait in a collective that will never come: stop ours
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                for process in context.processes:
                    process.join(timeout=10)
            if dist.is_initialized():
                dist.destroy_process_group()
            set_group_key(None)


def bench(*, models=("mlp-3x256", "mlp-cg"), sizes=(256, 1024), nprocs=(1, 2), threads: int = 1,
          repeats: int = 3, moments: int = 0, coords: int = 300) -> list[dict]:
    """Seconds per captured step (median of ``repeats`` after one warm-up), by model, m and processes.

    Every process runs ``threads`` torch threads; the step is captured (tracked train sample of m
    bundled-MNIST examples, ``coords`` coordinates per layer, ``moments`` extra moment examples) but
    not written, so the figure is the capture cost that the workers share.
    """
    import time

    import numpy as np
    import torch

    from gradstore.record.distributed import make_recorder
    from pipelines.data import load_mnist
    from pipelines.models import build_model

    torch.set_num_threads(threads)
    mnist = load_mnist()
    x_all = torch.from_numpy(mnist.train_images.astype(np.float32) / 255.0).unsqueeze(1)
    y_all = torch.from_numpy(mnist.train_labels)
    rows = []
    for nproc in nprocs:
        with capture_workers(nproc, threads=threads):
            for name in models:
                model = build_model(name, seed=0)
                for m in sizes:
                    kwargs = dict(moments_inputs=x_all[m:m + moments], moments_targets=y_all[m:m + moments]) if moments else {}
                    rec = make_recorder(f"memory://bench-{name}-{m}-{nproc}", model, train_inputs=x_all[:m],
                                        train_targets=y_all[:m], train_ids=np.arange(m), coords_per_layer=coords,
                                        background=False, overwrite=True, **kwargs)
                    times = []
                    for _ in range(repeats + 1):
                        start = time.perf_counter()
                        rec.capture_step(model)
                        times.append(time.perf_counter() - start)
                    rec.close()
                    n_params = sum(p.numel() for p in model.parameters())
                    rows.append(dict(model=name, params=n_params, m=m, moments=moments, nproc=nproc,
                                     threads=threads, seconds=float(np.median(times[1:]))))
    return rows


if __name__ == "__main__":  # python -m pipelines.distributed [--threads T] [--moments K]
    import argparse
    import json

    parser = argparse.ArgumentParser(description="capture seconds per step with 1 and 2 local processes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--moments", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="256,1024")
    parser.add_argument("--nprocs", default="1,2")
    args = parser.parse_args()
    for row in bench(sizes=tuple(int(s) for s in args.sizes.split(",")), threads=args.threads,
                     moments=args.moments, repeats=args.repeats,
                     nprocs=tuple(int(s) for s in args.nprocs.split(","))):
        print(json.dumps(row))
