"""Worker of the crash test: a tiny fork server of capturing training runs.

``python crash_worker.py N_STEPS`` imports torch and gradstore once (touching neither torch ops nor
zarr, so forking stays safe), prints ``loaded``, then for every store path read from stdin forks a
child that trains a tiny model deterministically and records every step. It prints ``pid PID``
after forking and ``exit PID CODE`` when the child ends (CODE -9: killed by SIGKILL); the child
prints ``ready`` once its Recorder is open and ``done`` at the end. Steps already committed in the
store are skipped by the Recorder, so a killed run restarted on the same store continues where the
store left off. Forking spares each run the multi-second torch import.
"""

import os
import sys

import numpy as np
import torch
from torch import nn

import gradstore.capture  # noqa: F401  (imported before forking)
from gradstore.store import Recorder, Schedule


def run(store: str, n_steps: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g)
    rec = Recorder(store, model, train_inputs=x[:24], train_targets=y[:24], train_ids=np.arange(24),
                   test_inputs=x[48:], test_targets=y[48:], test_ids=np.arange(48, 64),
                   schedule=Schedule.every(1), coords_per_layer=20, n_proj=8, projection_seed=3, gram=True)
    print("ready", flush=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(n_steps):
        if rec.wants(step):
            rec(step, model, {"lr": 0.05})
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    rec.close()
    print("done", flush=True)


def serve(n_steps: int) -> None:
    print("loaded", flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run(line.strip(), n_steps)
                code = 0
            finally:
                sys.stdout.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
