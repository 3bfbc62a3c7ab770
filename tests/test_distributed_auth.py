"""Capture workers unpickle nothing that fails its HMAC tag (issue 12, finding 24).

The payload used throughout is a pickle whose loading creates a file (``open(path, "w")``): a
message that was unpickled leaves that file behind, one that was refused does not.
"""

from __future__ import annotations

import multiprocessing
import pickle
import secrets

import numpy as np
import pytest
import torch

from gradstore.errors import StoreError
from gradstore.record import distributed
from gradstore.record.distributed import broadcast_message, make_recorder, seal, set_group_key, unseal, world
from pipelines.distributed import capture_workers
from pipelines.models import build_model


class CreatesFile:
    """Unpickling this runs ``open(path, "w")``: the file appears only if the pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


KEY = secrets.token_bytes(32)


def _frame(obj, kind=b"B", sender=0, seq=0, key=KEY) -> bytes:
    return seal(obj, kind, sender, seq, key).numpy().tobytes()


def test_a_frame_with_the_right_tag_is_unpickled(tmp_path):
    """The payload is live: with the right key, kind, sender and sequence number it does run."""
    target = tmp_path / "ran"
    unseal(_frame(CreatesFile(target)), b"B", 0, 0, KEY).close()
    assert target.exists()
    assert unseal(_frame({"a": np.arange(3)}, b"G", 2, 5), b"G", 2, 5, KEY)["a"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("forgery", ["other key", "flipped payload byte", "flipped tag byte", "replayed later",
                                     "other sender", "broadcast as gather", "truncated", "empty", "bare pickle"])
def test_a_frame_with_a_wrong_tag_is_refused_without_being_unpickled(tmp_path, forgery):
    target = tmp_path / "ran"
    evil = CreatesFile(target)
    frame = bytearray(_frame(evil, key=secrets.token_bytes(32) if forgery == "other key" else KEY))
    kind, sender, seq = b"B", 0, 0
    if forgery == "flipped payload byte":
        frame[-2] ^= 1
    elif forgery == "flipped tag byte":
        frame[0] ^= 1
    elif forgery == "replayed later":
        seq = 1
    elif forgery == "other sender":
        sender = 1
    elif forgery == "broadcast as gather":
        kind = b"G"
    elif forgery == "truncated":
        frame = frame[:20]
    elif forgery == "empty":
        frame = bytearray()
    elif forgery == "bare pickle":
        frame = bytearray(pickle.dumps(evil))
    with pytest.raises(StoreError) as err:
        unseal(bytes(frame), kind, sender, seq, KEY)
    assert "failed authentication" in str(err.value) and "\n" not in str(err.value)
    assert not target.exists()


def test_a_short_key_is_refused():
    with pytest.raises(StoreError, match="16 random bytes"):
        set_group_key(b"short")
    with pytest.raises(StoreError, match="16 random bytes"):
        set_group_key("a string of more than sixteen characters")


def _tiny_recorder(target):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 1, 28, 28, generator=g), torch.randint(0, 10, (3,), generator=g)
    return make_recorder(target, build_model("mlp-3x256", seed=0), train_inputs=x, train_targets=y,
                         train_ids=[0, 1, 2], coords_per_layer=0, background=False)


def test_without_a_shared_secret_the_distributed_recorder_is_refused_before_the_store(tmp_path):
    with capture_workers(2):
        assert world() == (0, 2)
        key = distributed._auth["key"]
        assert isinstance(key, bytes) and len(key) == 32  # capture_workers made one for this run
        distributed._auth["key"] = None
        try:
            with pytest.raises(StoreError, match="shared secret"):
                _tiny_recorder(str(tmp_path / "s.zarr"))
        finally:
            distributed._auth["key"] = key
    assert not (tmp_path / "s.zarr").exists()
    assert distributed._auth["key"] is None  # forgotten when the workers stop


def test_a_worker_refuses_a_forged_broadcast_and_stops_without_unpickling_it(tmp_path, capfd):
    """Rank 0 sends a file-creating pickle tagged with another key, as an intruder would: the worker
    stops with the one-line error and the file is never created."""
    target = tmp_path / "ran"
    with pytest.raises(RuntimeError, match="forged message sent"):
        with capture_workers(2):
            workers = multiprocessing.active_children()
            assert len(workers) == 1
            set_group_key(secrets.token_bytes(32))  # this rank only: the worker keeps the run's key
            broadcast_message(("open", CreatesFile(target)))
            workers[0].join(timeout=120)
            assert workers[0].exitcode == 2
            raise RuntimeError("forged message sent")  # leave without telling the (gone) worker
    assert world() == (0, 1)
    assert not target.exists()
    lines = [line for line in capfd.readouterr().err.splitlines() if "capture worker" in line]
    assert len(lines) == 1 and lines[0].startswith("gradstore: error: capture worker 1: ")
    assert "failed authentication" in lines[0]



def _rendezvous_folders() -> set:
    import glob
    import tempfile

    return set(glob.glob(f"{tempfile.gettempdir()}/gradstore-rendezvous-*"))


@pytest.mark.parametrize("fails", [False, True])
def test_the_rendezvous_is_a_private_folder_removed_afterwards(fails):
    """No TCP store for other users to reach: a file store in a 0700 folder, gone when the block ends."""
    import os
    import stat

    before = _rendezvous_folders()
    with pytest.raises(RuntimeError, match="leave") if fails else _nothing():
        with capture_workers(2):
            new = _rendezvous_folders() - before
            assert len(new) == 1
            assert stat.S_IMODE(os.stat(new.pop()).st_mode) == 0o700
            if fails:
                raise RuntimeError("leave")
    assert _rendezvous_folders() - before == set()
    assert world() == (0, 1)


def _nothing():
    import contextlib

    return contextlib.nullcontext()
