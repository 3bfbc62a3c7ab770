"""Authenticated messages between the ranks of a torch.distributed process group.

Messages that carry Python objects (the capture workers' ``open``/``capture``/``close``/``exit``
broadcasts and the gathered per-example arrays) are pickled here, never by torch.distributed, and
sent as one uint8 tensor: a 32-byte HMAC-SHA256 tag, then the pickle. The tag covers the message's
kind, its sender's rank and its sequence number (every rank counts the exchanges, so a message
cannot be replayed or moved) and the pickle; a receiver checks it with :func:`hmac.compare_digest`
before it unpickles anything, and a bad tag stops that rank with one line. The key is a secret
shared by the ranks outside the network: :func:`pipelines.distributed.capture_workers` makes one per
run (``secrets.token_bytes``) and hands it to the workers through their spawn arguments; a process
group started otherwise calls :func:`set_group_key` on every rank, or sets ``GRADSTORE_GROUP_KEY``
(hex) in every rank's environment. Float64 sums are ``all_reduce``-d as plain tensors (numbers,
never unpickled). The gathered frames travel point to point to rank 0, rank by rank, over the group
and with the timeout the reducer gives (:class:`gradstore.record.reduce.ProcessGroupReducer`: its
gloo capture group), so a rank that does not answer is named.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import struct

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


def _tag_parts(key: bytes, kind: bytes, sender: int, seq: int, meta, raws) -> bytes:
    mac = hmac.new(key, kind + struct.pack("<qqq", sender, seq, len(raws)), hashlib.sha256)
    for part in (meta, *raws):
        mac.update(struct.pack("<q", len(part)))
        mac.update(part)
    return mac.digest()


def seal_parts(obj, kind: bytes, sender: int, seq: int, key: bytes):
    """``obj`` pickled with its large buffers out of band (pickle protocol 5: numpy arrays are sent
    from their own memory, never copied into a frame): (tag, pickle, buffers), the tag covering the
    pickle and every buffer with their lengths."""
    buffers: list = []
    meta = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = []
    for buffer in buffers:
        raw = buffer.raw()
        raws.append(raw if not raw.readonly else memoryview(bytearray(raw)))
    return _tag_parts(key, kind, sender, seq, meta, raws), meta, raws


def unseal_parts(tag: bytes, meta, raws, kind: bytes, sender: int, seq: int, key: bytes):
    """The object of :func:`seal_parts`, unpickled over ``raws`` (no copy) only once its tag checks."""
    raws = [memoryview(r).cast("B") for r in raws]
    if len(tag) != _TAG or not hmac.compare_digest(bytes(tag), _tag_parts(key, kind, sender, seq, meta, raws)):
        raise StoreError(f"a capture message from rank {sender} failed authentication (message {seq}): "
                         "something other than this run's ranks reached the process group; stopping")
    return pickle.loads(meta, buffers=raws)


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


def gather_messages(obj, *, group=None, timeout: float | None = None, on_peer=None):
    """Every rank sends ``obj`` to rank 0; rank 0 gets the list in rank order (its own ``obj`` first,
    as it is), the others None.

    Point to point over ``group`` (default: the default group): each rank sends the lengths, the
    tag and pickle, then each array's bytes; rank 0 receives them rank by rank, waiting at most ``timeout`` seconds for each
    (default: the group's own timeout) and calling ``on_peer(rank)`` before it waits for ``rank``
    (so a failure names the rank that did not answer). The arrays travel out of band
    (:func:`seal_parts`): no copy into a frame on the sender, none out of one on rank 0.
    """
    import datetime

    import torch
    import torch.distributed as dist

    rank, size = world()
    key, seq = _key(), _next_seq()
    waits = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    on_peer = on_peer or (lambda _rank: None)

    def send(tensor):
        dist.isend(tensor, dst=0, group=group).wait(**waits)

    def recv(tensor, r):
        dist.irecv(tensor, src=r, group=group).wait(**waits)
        return tensor
    if rank != 0:
        tag, meta, raws = seal_parts(obj, b"G", rank, seq, key)
        on_peer(0)
        send(torch.tensor([len(meta), len(raws)], dtype=torch.int64))
        if raws:
            send(torch.tensor([len(r) for r in raws], dtype=torch.int64))
        send(torch.frombuffer(bytearray(tag + meta), dtype=torch.uint8))
        for raw in raws:
            if len(raw):
                send(torch.frombuffer(raw, dtype=torch.uint8))
        return None
    out = [obj]
    for r in range(1, size):
        on_peer(r)
        n_meta, n_raws = recv(torch.zeros(2, dtype=torch.int64), r).tolist()
        lengths = recv(torch.zeros(n_raws, dtype=torch.int64), r).tolist() if n_raws else []
        head = recv(torch.empty(_TAG + n_meta, dtype=torch.uint8), r).numpy()
        raws = [recv(torch.empty(n, dtype=torch.uint8), r).numpy() if n else np.empty(0, np.uint8) for n in lengths]
        out.append(unseal_parts(head[:_TAG].tobytes(), head[_TAG:], raws, b"G", r, seq, key))
    return out


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
