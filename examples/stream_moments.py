"""Exact coherence moments over a large Dataset, streamed: memory bounded by the chunk, not by m.

The moments sample is a map-style Dataset of m synthetic 1x28x28 examples, each made from its
index on demand, so the Dataset itself holds nothing; the Recorder reads and collates
``--chunk`` examples at a time, and one captured step sums Σ g and Σ ||g||² over all m in float64.
Prints one JSON line: m, chunk, seconds for the captured step and the peak resident memory above
the level before it (sampled every 5 ms).

    python examples/stream_moments.py --out /tmp/stream --m 50000 --chunk 1024
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from gradstore.record import Recorder


class Synthetic(Dataset):
    """Item i: a 1x28x28 image and a label in [0, 10), both made from i (nothing is held)."""

    def __init__(self, m: int, seed: int = 0):
        self.m, self.seed = m, seed

    def __len__(self):
        return self.m

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        return torch.rand(1, 28, 28, generator=g), torch.randint(0, 10, (), generator=g)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run store (created)")
    parser.add_argument("--m", type=int, default=50_000, help="examples in the moments sample")
    parser.add_argument("--chunk", type=int, default=1024, help="examples per streamed pass")
    parser.add_argument("--steps", type=int, default=1, help="captured steps")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    tracked = Synthetic(64, seed=1)
    args.out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(args.out / "store.zarr", model, train_dataset=tracked, train_ids=np.arange(64),
                   moments_dataset=Synthetic(args.m, seed=2), moments_chunk=args.chunk, coords_per_layer=0,
                   background=False, overwrite=True)
    base, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    with rec:
        for step in range(args.steps):
            rec.record_now(step, model)
    seconds = (time.perf_counter() - start) / args.steps
    stop.set()
    watcher.join()
    row = {"m": args.m, "chunk": args.chunk, "seconds_per_step": round(seconds, 3),
           "peak_rss_above_start_mib": round((max(peak[0], _rss()) - base) / 2**20, 1),
           "threads": torch.get_num_threads()}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
