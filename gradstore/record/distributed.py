"""Capture sharded over ``torch.distributed`` ranks, one writer: :func:`DistributedRecorder`.

Design
------
Rank 0 runs the training loop and owns the only :class:`~gradstore.store.writer.RunWriter`; ranks
1..N-1 are *capture workers* (:func:`serve`). A DistributedRecorder is a plain
:class:`~gradstore.record.Recorder` composed with another reducer, :class:`CaptureWorkers`: when the
Recorder opens, rank 0 sends the workers its :class:`~gradstore.record.step.StepCapture` and a copy of
the model; at each captured step it broadcasts the model's ``state_dict`` (after BatchNorm priming,
when configured), and every rank (rank 0 included) runs the same StepCapture through a
:class:`~gradstore.record.reduce.ProcessGroupReducer`: each captures its contiguous shard of each
sample, Σ g and the moments are ``all_reduce``-d in float64, and the per-example arrays are gathered
to rank 0, which writes the step and commits it. No two processes ever write to the store, so no
shard or chunk has two writers and the commit counter is written last, by rank 0, as in a
single-process run. Gram blocks need every pair of examples, so rank 0 computes them over the whole
tracked sample.

Collectives use the default process group; with gloo every tensor that crosses ranks is moved to
the CPU first, so models may live on CUDA devices (worker rank r uses ``cuda:r % device_count``).
Messages that carry Python objects are authenticated (:mod:`gradstore.record.messages`).
"""

from __future__ import annotations

import copy

from gradstore.errors import StoreError
from gradstore.record.messages import (KEY_ENV, _auth, _key, broadcast_message, gather_messages, seal,
                                       set_group_key, unseal, world)
from gradstore.record.recorder import Recorder
from gradstore.record.reduce import ProcessGroupReducer

# the messages are re-exported: callers of the capture workers need nothing else
__all__ = ["KEY_ENV", "CaptureWorkers", "DistributedRecorder", "_auth", "broadcast_message", "gather_messages",
           "make_recorder", "seal", "serve", "set_group_key", "stop_workers", "unseal", "worker_device", "world"]


class CaptureWorkers:
    """The reducer of rank 0 whose captures are shared with the :func:`serve` loops of ranks 1..N-1.

    A :class:`ProcessGroupReducer` plus the messages that keep the workers in step: ``open``
    (the StepCapture and the model, once), ``capture`` (the step and the state_dict, each step) and
    ``close``. Refused, before anything is sent, outside a process group of 2 or more ranks, on a
    rank other than 0, or when the ranks share no secret.
    """

    def __init__(self):
        rank, size = world()
        if size < 2:
            raise StoreError("DistributedRecorder needs a torch.distributed process group of 2 or more ranks; "
                             "use Recorder in one process (make_recorder picks for you)")
        if rank != 0:
            raise StoreError(f"DistributedRecorder is created on rank 0 only (this is rank {rank}); "
                             "other ranks run gradstore.record.distributed.serve()")
        _key()  # refused before any store exists when the ranks share no secret
        self._group = ProcessGroupReducer()
        self.rank, self.size = self._group.rank, self._group.size
        self._open = False

    def shard(self, n: int) -> slice:
        return self._group.shard(n)

    def check_in(self, doing, step, **header) -> None:
        self._group.check_in(doing, step, **header)

    def sum(self, tensor):
        return self._group.sum(tensor)

    def gather(self, part):
        return self._group.gather(part)

    def open(self, step_capture, model) -> None:
        """Send the workers what they capture with (once, when the Recorder opens)."""
        broadcast_message(("open", (step_capture.cpu(), copy.deepcopy(model).cpu())))
        self._open = True

    def sync(self, model, step: int) -> None:
        """Send the workers the model's state at ``step`` (before each capture)."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        broadcast_message(("capture", (int(step), state)))

    def close(self) -> None:
        if self._open:
            self._open = False
            broadcast_message(("close", None))


def DistributedRecorder(*args, **kwargs) -> Recorder:  # noqa: N802 (a Recorder composed with CaptureWorkers)
    """A :class:`Recorder` on rank 0 whose captures are sharded over every rank of the process group.

    Takes the arguments of :class:`Recorder`. Create it on rank 0 only, while ranks 1..N-1 run
    :func:`serve` (``pipelines.distributed.capture_workers`` sets this up); the stored run equals the
    single-process run to floating-point rounding (sums are reduced in float64, in another order).
    """
    if "reducer" in kwargs:
        raise StoreError("DistributedRecorder chooses its own reducer; use Recorder(reducer=...) for another")
    return Recorder(*args, reducer=CaptureWorkers(), **kwargs)


def make_recorder(*args, **kwargs) -> Recorder:
    """A :func:`DistributedRecorder` when a process group of several ranks is active, else a :class:`Recorder`."""
    return DistributedRecorder(*args, **kwargs) if world()[1] > 1 else Recorder(*args, **kwargs)


def worker_device(device: str, rank: int, n_gpus: int) -> str:
    """Where capture worker ``rank`` runs: ``cuda:(rank % n_gpus)`` for ``"cuda"``, else ``device``."""
    if device == "cuda" or device.startswith("cuda:"):
        if n_gpus < 1:
            raise StoreError("capture on cuda was asked for but this worker sees no CUDA device; use --device cpu")
        return f"cuda:{rank % n_gpus}"
    return device


def serve(device: str = "cpu") -> None:
    """The capture-worker loop of ranks 1..N-1: answer rank 0's DistributedRecorders until told to stop."""
    import torch

    rank, size = world()
    device = worker_device(device, rank, torch.cuda.device_count() if device.startswith("cuda") else 0)
    reducer = ProcessGroupReducer()
    step_capture = model = None
    while True:
        kind, payload = broadcast_message()
        if kind == "open":
            step_capture, model = payload
            model = model.to(device)
        elif kind == "capture":
            step, state = payload
            model.load_state_dict(state)
            step_capture(model, reducer, step)
        elif kind == "close":
            step_capture = model = None
        elif kind == "exit":
            return
        else:
            raise StoreError(f"capture worker {rank} got an unknown message {kind!r}")


def stop_workers() -> None:
    """Tell every :func:`serve` loop to return (rank 0)."""
    broadcast_message(("exit", None))
