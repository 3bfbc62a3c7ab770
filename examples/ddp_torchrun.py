"""A CNN trained with DistributedDataParallel, every rank training and recording.

    python examples/ddp_torchrun.py --out runs/ddp --steps 20                      # one process
    GRADSTORE_GROUP_KEY=$(python -c "import secrets; print(secrets.token_hex(32))") \\
        torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --out runs/ddp2 --steps 20

(``--timeout S``: how long a rank waits for the others inside a capture before every rank stops
with one line; ``--bench FILE``: rank 0's seconds per training and per captured step, as
``python -m pipelines.bench.ddp`` reads them; docs/ddp.md.)

Both write the same store (to floating-point rounding): the global batch of every step is drawn
from one seeded generator and each rank trains on its slice of it, so DDP's averaged gradient is
the single process's. At a capture every rank captures its shard of the tracked samples
(``ProcessGroupReducer``), the float64 sums are all-reduced and rank 0 writes. The ranks share a
secret (``GRADSTORE_GROUP_KEY``, hex) that authenticates the per-example arrays they exchange.

The CNN is own_loop's without BatchNorm and dropout: under DDP, BatchNorm normalises each rank's
share of the batch (SyncBatchNorm would be needed) and dropout draws each rank's masks from its own
RNG, so *training* would differ from one process's -- the recording would not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradstore.errors import GradstoreError
from gradstore.record import ProcessGroupReducer, Recorder, Schedule

_spec = importlib.util.spec_from_file_location("own_loop", Path(__file__).with_name("own_loop.py"))
own_loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(own_loop)


def plain_cnn(classes: int = 4) -> nn.Module:
    """own_loop's CNN without BatchNorm and dropout (training is then the same on any number of ranks)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 3 * 3, classes))


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run store (created by rank 0)")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--every", type=int, default=5, help="capture every N steps")
    parser.add_argument("--batch", type=int, default=64, help="global batch size (divisible by the ranks)")
    parser.add_argument("--tracked", type=int, default=64, help="tracked train examples (m)")
    parser.add_argument("--moments", type=int, default=512, help="examples of the moments sample")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a rank waits for the others inside a capture before it stops with an error")
    parser.add_argument("--bench", type=Path, default=None,
                        help="write rank 0's wall-clock seconds per training step and per captured step to this JSON file")
    args = parser.parse_args(argv)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        if not os.environ.get("GRADSTORE_GROUP_KEY"):
            raise GradstoreError("set GRADSTORE_GROUP_KEY to the same random hex on every rank (python -c "
                                 "\"import secrets; print(secrets.token_hex(32))\"); it authenticates the ranks' messages")
        dist.init_process_group("gloo")
    rank = dist.get_rank() if size > 1 else 0
    if args.batch % size:
        raise GradstoreError(f"--batch {args.batch} must be divisible by the {size} ranks")
    try:
        torch.manual_seed(0)
        train_set, test_set = own_loop.Blobs(2000, seed=1), own_loop.Blobs(500, seed=2)
        model = plain_cnn()
        net = DistributedDataParallel(model) if size > 1 else model
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rng = np.random.default_rng(0)
        tracked = np.sort(rng.choice(len(train_set), args.tracked, replace=False))
        held_out = np.sort(rng.choice(len(test_set), 32, replace=False))
        if rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
        recorder = Recorder(
            args.out / "store.zarr", net, train_inputs=train_set.images[tracked], train_targets=train_set.labels[tracked],
            train_ids=tracked, test_inputs=test_set.images[held_out], test_targets=test_set.labels[held_out],
            test_ids=100_000 + held_out, moments_inputs=train_set.images[:args.moments], moments_targets=train_set.labels[:args.moments],
            schedule=Schedule.every(args.every), coords_per_layer=20, overwrite=True,
            reducer=ProcessGroupReducer(timeout=args.timeout) if size > 1 else None, config={"example": "ddp_torchrun"})
        batches = torch.Generator().manual_seed(1)  # the same global batches whatever the number of ranks
        share = args.batch // size
        times = {"processes": size, "threads": torch.get_num_threads(), "train_step_s": [], "capture_s": []}
        with recorder:
            for step in range(args.steps + 1):
                start = time.perf_counter()
                if recorder.maybe_record(step, net, lr=0.05):
                    times["capture_s"].append(time.perf_counter() - start)
                if step == args.steps:
                    break
                start = time.perf_counter()
                rows = torch.randperm(len(train_set), generator=batches)[:args.batch][rank * share:(rank + 1) * share]
                net.train()
                loss = nn.functional.cross_entropy(net(train_set.images[rows]), train_set.labels[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
                times["train_step_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
        times["close_s"] = time.perf_counter() - start  # the wait for the last background write
        if rank == 0:
            print(f"recorded {recorder.committed} steps with {size} process(es) to {args.out / 'store.zarr'}")
            if args.bench is not None:
                args.bench.write_text(json.dumps(times))
        if size > 1:
            dist.barrier()  # every rank's collectives done before the group is torn down (gloo aborts otherwise)
    finally:
        if size > 1:
            dist.destroy_process_group()
    return args.out / "store.zarr"


if __name__ == "__main__":
    main()
