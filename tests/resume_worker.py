"""A tiny recorded training run, used in-process by the checkpoint tests and as the crash tests' worker.

``python resume_worker.py RUN_DIR [--kill-after-checkpoint K | --kill-before-checkpoint K]`` trains
:func:`tiny_model` on :func:`tiny_data` with :func:`pipelines.train.train`, a background
:class:`gradstore.store.Recorder` capturing every step into ``RUN_DIR/store.zarr`` and a checkpoint
``RUN_DIR/checkpoint.pt`` every :data:`CHECKPOINT_EVERY` steps, resuming both if they exist. The kill
options SIGKILL the process itself at a chosen moment: right after the K-th checkpoint is in place
(``checkpoint.pt`` has just changed its mtime), or right before the K-th checkpoint is saved (after
its step was handed to the store). It prints ``done`` when the run ends.
"""

import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradstore.store import Recorder, Schedule
from pipelines.train import TrainConfig, TrainData

STEPS = 12
CHECKPOINT_EVERY = 2
N_TRAIN, N_TEST = 96, 32


def tiny_data(n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 5) -> TrainData:
    """Random 12-feature inputs with 4 classes, a quarter of the training labels corrupted."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 12, generator=g)
    y = torch.randint(0, 4, (n_train + n_test,), generator=g)
    y_train = y[:n_train].clone()
    corrupt = torch.zeros(n_train, dtype=torch.bool)
    corrupt[: n_train // 4] = True
    y_train[corrupt] = (y_train[corrupt] + 1) % 4
    return TrainData(x_train=x[:n_train], y_train=y_train, y_true=y[:n_train], corrupt=corrupt,
                     train_ids=torch.arange(n_train), x_test=x[n_train:], y_test=y[n_train:],
                     test_ids=torch.arange(n_test) + 60_000, noise=None)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def tiny_config(steps: int = STEPS, **changes) -> TrainConfig:
    return TrainConfig(**{"model": "tiny", "steps": steps, "eval_every": 4, "batch_size": 16, "lr": 0.05,
                          **changes})


def recorder(store, model, data: TrainData, **options) -> Recorder:
    """A Recorder of every step on 24 training and 8 test examples of ``data``."""
    return Recorder(str(store), model, train_inputs=data.x_train[:24], train_targets=data.y_train[:24],
                    train_ids=data.train_ids[:24].numpy(), train_true=data.y_true[:24].numpy(),
                    test_inputs=data.x_test[:8], test_targets=data.y_test[:8], test_ids=data.test_ids[:8].numpy(),
                    schedule=Schedule.every(1), coords_per_layer=10, n_proj=4, projection_seed=3, gram=True,
                    **options)


def recorded_run(run_dir, *, steps: int = STEPS, checkpoint_every: int = CHECKPOINT_EVERY, checkpoint=None,
                 **recorder_options):
    """Train the tiny model with a Recorder and a checkpoint in ``run_dir`` (resumed where they exist).

    ``checkpoint`` puts the checkpoint elsewhere (default ``run_dir/checkpoint.pt``).
    """
    from pipelines.train import train

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = tiny_data()
    model = tiny_model()
    with recorder(run_dir / "store.zarr", model, data, **recorder_options) as rec:
        return train(tiny_config(steps), data, model=model, observers=[rec],
                     checkpoint=checkpoint or run_dir / "checkpoint.pt", checkpoint_every=checkpoint_every)


def kill_at_checkpoint(k: int, *, after: bool) -> None:
    """SIGKILL this process right after (or right before) the ``k``-th checkpoint save."""
    import pipelines.train as trainer

    save, count = trainer._save_checkpoint, [0]

    def saving(path, state):
        count[0] += 1
        if count[0] == k and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        save(path, state)
        if count[0] == k and after:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer._save_checkpoint = saving


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    if len(argv) == 3:
        kill_at_checkpoint(int(argv[2]), after=argv[1] == "--kill-after-checkpoint")
    recorded_run(argv[0])
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
