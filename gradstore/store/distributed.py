"""Capture sharded over ``torch.distributed`` ranks, one writer: :class:`DistributedRecorder`.

Design
------
Rank 0 runs the training loop and owns the only :class:`~gradstore.store.writer.RunWriter`; ranks
1..N-1 are *capture workers* (:func:`serve`). At each captured step rank 0 broadcasts the model's
``state_dict``; every rank (rank 0 included) captures its contiguous shard of each tracked sample
(``numpy.array_split`` order, so shards concatenate back to the tracked order) and of the
``moments_train`` sample. Then:

- Σ g over a tracked sample is ``all_reduce``-d in float64 *before* the per-example pass, so
  ``dot_with_sum`` dots with the sum over the whole sample, exactly as one process would;
- the moments (m, Σ g, Σ ||g||²) are sums and are ``all_reduce``-d in float64;
- the per-example arrays are gathered to rank 0 (:func:`gather_messages`), which writes the step and
  commits it. No two processes ever write to the store, so no shard or chunk has two writers and
  the commit counter is written last, by rank 0, as in a single-process run.
- Gram blocks (``gram=True``) need every pair of examples, so rank 0 computes them over the whole
  tracked sample (not sharded).

Collectives use the default process group; with gloo every tensor that crosses ranks is moved to
the CPU first, so models may live on CUDA devices (worker rank r uses ``cuda:r % device_count``).

Authentication
--------------
Messages that carry Python objects (the ``open``/``capture``/``close``/``exit`` broadcasts and the
gathered per-example arrays) are pickled here, never by torch.distributed, and sent as one uint8
tensor: a 32-byte HMAC-SHA256 tag, then the pickle. The tag covers the message's kind, its sender's
rank and its sequence number (every rank counts the exchanges, so a message cannot be replayed or
moved) and the pickle; a receiver checks it with :func:`hmac.compare_digest` before it unpickles
anything, and a bad tag stops that rank with one line. The key is a secret shared by the ranks
outside the network: :func:`pipelines.distributed.capture_workers` makes one per run
(``secrets.token_bytes``) and hands it to the workers through their spawn arguments; a process group
started otherwise calls :func:`set_group_key` on every rank, or sets ``GRADSTORE_GROUP_KEY`` (hex) in
every rank's environment. The float64 sums are ``all_reduce``-d as plain tensors (numbers, never
unpickled).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np

from gradstore.errors import StoreError

KEY_ENV = "GRADSTORE_GROUP_KEY"
_TAG = hashlib.sha256().digest_size  # 32 bytes
_auth = {"key": None, "seq": 0}  # this process's group key and count of authenticated exchanges


def set_group_key(key: bytes | None) -> None:
    """Use ``key`` (>= 16 random bytes, the same on every rank) to authenticate this process's messages.

    Call it on every rank before the first message; ``None`` forgets the key. The exchange count
    restarts at 0, so every rank must set it at the same point (right after the group starts).
    """
    if key is not None and (not isinstance(key, bytes) or len(key) < 16):
        raise StoreError("the group key must be at least 16 random bytes (secrets.token_bytes(32))")
    _auth.update(key=key, seq=0)


def _key() -> bytes:
    if _auth["key"] is None and os.environ.get(KEY_ENV):
        try:
            set_group_key(bytes.fromhex(os.environ[KEY_ENV]))
        except ValueError as err:
            raise StoreError(f"{KEY_ENV} must be the hex of at least 16 random bytes; {err}") from None
    if _auth["key"] is None:
        raise StoreError("capture messages between ranks need a shared secret: start the workers with "
                         f"pipelines.distributed.capture_workers, or call set_group_key() (or set {KEY_ENV}) "
                         "on every rank")
    return _auth["key"]


def _next_seq() -> int:
    seq = _auth["seq"]
    _auth["seq"] = seq + 1
    return seq


def _tag(key: bytes, kind: bytes, sender: int, seq: int, payload) -> bytes:
    mac = hmac.new(key, kind + struct.pack("<qq", sender, seq), hashlib.sha256)
    mac.update(payload)
    return mac.digest()


def seal(obj, kind: bytes, sender: int, seq: int, key: bytes):
    """``obj`` pickled here and prefixed with its tag, as a uint8 tensor ready to send."""
    import torch

    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    frame = torch.empty(_TAG + len(payload), dtype=torch.uint8)
    view = frame.numpy()
    view[:_TAG] = np.frombuffer(_tag(key, kind, sender, seq, payload), dtype=np.uint8)
    view[_TAG:] = np.frombuffer(payload, dtype=np.uint8)
    return frame


def unseal(frame, kind: bytes, sender: int, seq: int, key: bytes):
    """The object in ``frame`` (bytes-like), unpickled only once its tag checks; a bad tag raises StoreError."""
    view = memoryview(frame).cast("B")
    tag, payload = bytes(view[:_TAG]), view[_TAG:]
    if len(tag) != _TAG or not hmac.compare_digest(tag, _tag(key, kind, sender, seq, payload)):
        raise StoreError(f"a capture message from rank {sender} failed authentication (message {seq}): "
                         "something other than this run's ranks reached the process group; stopping")
    return pickle.loads(payload)


def broadcast_message(obj=None):
    """Rank 0 sends ``obj`` to every rank (call with the object on rank 0, nothing elsewhere); returns it."""
    import torch
    import torch.distributed as dist

    rank, _ = world()
    key, seq = _key(), _next_seq()
    if rank == 0:
        frame = seal(obj, b"B", 0, seq, key)
        dist.broadcast(torch.tensor([frame.numel()], dtype=torch.int64), src=0)
        dist.broadcast(frame, src=0)
        return obj
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0)
    frame = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(frame, src=0)
    return unseal(frame.numpy(), b"B", 0, seq, key)


def gather_messages(obj):
    """Every rank sends ``obj`` to rank 0; rank 0 gets the list in rank order, the others None."""
    import torch
    import torch.distributed as dist

    rank, size = world()
    key, seq = _key(), _next_seq()
    frame = seal(obj, b"G", rank, seq, key)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(sizes, torch.tensor([frame.numel()], dtype=torch.int64))
    longest = max(int(n) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:frame.numel()] = frame
    frames = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)] if rank == 0 else None
    dist.gather(padded, frames, dst=0)
    if rank != 0:
        return None
    return [unseal(f[:int(n)].numpy(), b"G", r, seq, key) for r, (f, n) in enumerate(zip(frames, sizes))]
from gradstore.store.recorder import Recorder, _np, autocast_forward
from gradstore.store.schema import SAMPLES, RunLayout


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_recorder(*args, **kwargs) -> Recorder:
    """A :class:`DistributedRecorder` when a process group of several ranks is active, else a :class:`Recorder`."""
    return DistributedRecorder(*args, **kwargs) if world()[1] > 1 else Recorder(*args, **kwargs)


@dataclass
class ShardSpec:
    """What every rank needs to capture its shards (built on rank 0, broadcast to the workers)."""

    layout: RunLayout
    loss_fn: object
    _coords: dict
    _layer_of: dict
    n_proj: int
    projection_seed: int
    autocast: str | None
    train: tuple
    test: tuple | None
    moments: tuple | None

    def __post_init__(self):
        from gradstore.capture import Projection

        self._projection = Projection(self.n_proj, seed=self.projection_seed) if self.n_proj else None

    _split_part = Recorder._split_part  # the same per-example code as a single-process run


def _shard(n: int, rank: int, size: int) -> slice:
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), size)])
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def _flat_sum(grad_sum: dict, params: dict):
    import torch

    if not grad_sum:
        return torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64)
    return torch.cat([grad_sum[name].detach().to("cpu", torch.float64).reshape(-1) for name in params])


def _unflatten(flat, params: dict) -> dict:
    out, start = {}, 0
    for name, p in params.items():
        out[name] = flat[start:start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def _by_layer(per_param: dict, layer_of: dict, layers) -> list[float]:
    acc = dict.fromkeys(layers, 0.0)
    for name, value in per_param.items():
        acc[layer_of[name]] += float(value)
    return [acc[layer] for layer in layers]


def sharded_capture(spec: ShardSpec, model, rank: int, size: int) -> dict | None:
    """Capture this rank's shards (collective: every rank calls it); rank 0 gets the step's arrays.

    Returns the arrays of :meth:`Recorder.capture_step` without ``gram`` on rank 0, None elsewhere.
    """
    import torch
    import torch.distributed as dist

    from gradstore.capture import capture, coherence_moments, plan

    params = plan(model).params
    device = next(model.parameters()).device
    lay = spec.layout
    nl = len(lay.layers)
    m = np.zeros((len(SAMPLES), nl))
    norm_sq_of_sum = np.zeros((len(SAMPLES), nl))
    sum_of_norm_sq = np.zeros((len(SAMPLES), nl))
    parts = []
    for row, split in enumerate(s for s in (spec.train, spec.test) if s is not None):
        inputs, targets = split
        rows = _shard(len(targets), rank, size)
        xs, ys = inputs[rows].to(device), targets[rows].to(device)
        grad_sum = {}
        if len(ys):
            with autocast_forward(model, spec.autocast):
                grad_sum = capture(model, spec.loss_fn, xs, ys, sq_norms=False, grad_sum=True).grad_sum
        total = _flat_sum(grad_sum, params)
        dist.all_reduce(total)  # Σ g over the whole tracked sample, float64
        vectors = {name: v.to(device=device, dtype=params[name].dtype) for name, v in _unflatten(total, params).items()}
        part = spec._split_part(model, xs, ys, vectors)[0] if len(ys) else None
        gathered = gather_messages(part)
        if rank == 0:
            pieces = [p for p in gathered if p is not None]
            part = {key: np.concatenate([p[key] for p in pieces]) for key in pieces[0]}
            m[row] = len(targets)
            norm_sq_of_sum[row] = _by_layer({k: (v * v).sum() for k, v in _unflatten(total, params).items()},
                                            spec._layer_of, lay.layers)
            sum_of_norm_sq[row] = part["sq_norm"].sum(axis=0)
            parts.append(part)
    if spec.moments is not None:
        inputs, targets = spec.moments
        rows = _shard(len(targets), rank, size)
        sq = torch.zeros(len(params), dtype=torch.float64)
        sums = {}
        if rows.stop > rows.start:
            with autocast_forward(model, spec.autocast):
                mom = coherence_moments(model, spec.loss_fn, inputs[rows], targets[rows])
            sums = mom.sum_grad
            sq = torch.tensor([mom.sum_sq_norm[name] for name in params], dtype=torch.float64)
        both = torch.cat([_flat_sum(sums, params), sq])
        dist.all_reduce(both)
        if rank == 0:
            total, sq = both[:-len(params)], both[-len(params):]
            m[2] = len(targets)
            norm_sq_of_sum[2] = _by_layer({k: (v * v).sum() for k, v in _unflatten(total, params).items()},
                                          spec._layer_of, lay.layers)
            sum_of_norm_sq[2] = _by_layer(dict(zip(params, sq.tolist())), spec._layer_of, lay.layers)
    if rank != 0:
        return None
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    out.update(m=m, norm_sq_of_sum=norm_sq_of_sum, sum_of_norm_sq=sum_of_norm_sq)
    return out


class DistributedRecorder(Recorder):
    """A :class:`Recorder` on rank 0 whose captures are sharded over every rank of the process group.

    Takes the arguments of :class:`Recorder`. Create it on rank 0 only, while ranks 1..N-1 run
    :func:`serve` (``pipelines.distributed.capture_workers`` sets this up); the stored run equals the
    single-process run to floating-point rounding (sums are reduced in float64, in another order).
    """

    def __init__(self, *args, **kwargs):
        rank, size = world()
        if size < 2:
            raise StoreError("DistributedRecorder needs a torch.distributed process group of 2 or more ranks; "
                             "use Recorder in one process (make_recorder picks for you)")
        if rank != 0:
            raise StoreError(f"DistributedRecorder is created on rank 0 only (this is rank {rank}); "
                             "other ranks run gradstore.store.distributed.serve()")
        _key()  # refused before any store exists when the ranks share no secret
        super().__init__(*args, **kwargs)
        self._size = size
        model = args[1] if len(args) > 1 else kwargs["model"]
        self._spec = ShardSpec(
            layout=self.layout, loss_fn=self.loss_fn, _coords=self._coords, _layer_of=self._layer_of,
            n_proj=self.layout.n_proj, projection_seed=self.layout.projection_seed or 0,
            autocast=self.autocast, train=_cpu(self._train), test=_cpu(self._test), moments=_cpu(self._moments))
        shipped = copy.copy(self._spec)
        shipped._projection = None  # rebuilt from its seed on each worker
        broadcast_message(("open", (shipped, copy.deepcopy(model).cpu())))
        self._open = True

    def capture_step(self, model) -> dict[str, np.ndarray]:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        broadcast_message(("capture", state))
        out = sharded_capture(self._spec, model, 0, self._size)
        if self.layout.gram:
            from gradstore.capture import capture

            device = next(model.parameters()).device
            inputs, targets = (t.to(device) for t in self._all_tracked())
            with autocast_forward(model, self.autocast):
                res = capture(model, self.loss_fn, inputs, targets, sq_norms=False, gram=True)
            by_layer = res.by_layer("gram")
            out["gram"] = np.stack([_np(by_layer[layer]) for layer in self.layout.layers])
        return out

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._open:
                self._open = False
                broadcast_message(("close", None))


def _cpu(pair):
    if pair is None:
        return None
    return tuple(t.detach().cpu() for t in pair)


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
    spec = model = None
    while True:
        kind, payload = broadcast_message()
        if kind == "open":
            spec, model = payload
            spec.__post_init__()
            model = model.to(device)
        elif kind == "capture":
            model.load_state_dict(payload)
            sharded_capture(spec, model, rank, size)
        elif kind == "close":
            spec = model = None
        elif kind == "exit":
            return
        else:
            raise StoreError(f"capture worker {rank} got an unknown message {kind!r}")


def stop_workers() -> None:
    """Tell every :func:`serve` loop to return (rank 0)."""
    broadcast_message(("exit", None))
