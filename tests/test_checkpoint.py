"""Checkpoints (issue 12): store write, then checkpoint (finding 1); weights_only loading, hostile and
damaged files refused in one line (findings 6, 18); a store that lost steps (finding 18); a full disk
while saving (finding 19)."""

import errno
import os
import pickle

import numpy as np
import pytest
import torch

import pipelines.train as trainer
from gradstore.errors import GradstoreError
from pipelines.train import observer_state, train
from resume_worker import recorded_run, tiny_config, tiny_data, tiny_model


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text, text
    return text


@pytest.fixture(scope="module")
def data():
    return tiny_data()


def checkpointed(tmp_path, data, steps=4, **changes):
    path = tmp_path / "checkpoint.pt"
    train(tiny_config(steps, **changes), data, model=tiny_model(), checkpoint=path, checkpoint_every=2)
    return path


class Payload:
    """Unpickling this creates ``path``: what a hostile run folder would do with a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_a_checkpoint_with_a_reduce_payload_is_refused_unexecuted(tmp_path, data, form):
    ckpt, marker = tmp_path / "checkpoint.pt", tmp_path / "PWNED"
    hostile = {"config": {"steps": 4}, "history": [Payload(marker)]}
    if form == "pickle":
        ckpt.write_bytes(pickle.dumps(hostile))
    else:
        torch.save(hostile, ckpt)
    assert not marker.exists()
    with pytest.raises(GradstoreError) as exc:
        train(tiny_config(4), data, model=tiny_model(), checkpoint=ckpt)
    assert not marker.exists()  # the payload never ran
    text = one_line(exc)
    assert str(ckpt) in text and "remove it" in text and "--out" in text


def test_checkpoint_content_loads_with_weights_only(tmp_path, data):
    """Every optimizer's state, the generator state (uint8), history and learned times: plain content."""
    for optimizer in ("sgd", "winsorized-sgd", "rm3"):
        options = {"c": 1} if optimizer == "winsorized-sgd" else {}
        (tmp_path / optimizer).mkdir()
        path = checkpointed(tmp_path / optimizer, data, optimizer=optimizer, optimizer_options=options)
        state = torch.load(path, weights_only=True)
        assert state["generator"].dtype == torch.uint8
        assert state["step"] == 4 and isinstance(state["history"][0]["step"], int)
        assert state["first_learned"].dtype == torch.int64


def test_resume_from_a_weights_only_checkpoint_matches_an_uninterrupted_run(tmp_path, data):
    for optimizer in ("sgd", "rm3"):
        straight = train(tiny_config(8, optimizer=optimizer), data, model=tiny_model())
        path = tmp_path / f"{optimizer}.pt"
        # the same run killed after its checkpoint of step 4
        train(tiny_config(4, optimizer=optimizer), data, model=tiny_model(), checkpoint=path, checkpoint_every=4)
        state = torch.load(path, weights_only=True)
        state["config"]["steps"] = 8
        torch.save(state, path)
        resumed = train(tiny_config(8, optimizer=optimizer), data, model=tiny_model(), checkpoint=path)
        for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
            assert torch.equal(a, b)
        assert resumed.history == straight.history
        np.testing.assert_array_equal(resumed.learned.first_learned, straight.learned.first_learned)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "folder", "list", "missing key", "other data"])
def test_a_damaged_checkpoint_is_one_line(tmp_path, data, damage):
    path = checkpointed(tmp_path, data)
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(os.urandom(3000))
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "folder":
        path.unlink()
        path.mkdir()
    elif damage == "list":
        torch.save([1, 2, 3], path)
    elif damage == "missing key":
        state = torch.load(path, weights_only=True)
        del state["order"]
        torch.save(state, path)
    with pytest.raises(GradstoreError) as exc:
        other = tiny_data(n_train=80) if damage == "other data" else data
        train(tiny_config(4), other, model=tiny_model(), checkpoint=path)
    text = one_line(exc)
    assert str(path) in text and ("remove it" in text or "--out" in text)


def test_a_checkpoint_of_another_configuration_is_one_line(tmp_path, data):
    path = checkpointed(tmp_path, data)
    with pytest.raises(GradstoreError) as exc:
        train(tiny_config(4, lr=0.01), data, model=tiny_model(), checkpoint=path)
    assert "another configuration" in one_line(exc)


class Watcher:
    """An observer of every step that logs its calls, with the optional flush and checkpoint_state."""

    def __init__(self, log):
        self.log, self.pending, self.committed = log, None, 0

    def wants(self, step):
        return True

    def __call__(self, step, model, metrics):
        self.pending = step

    def flush(self):
        if self.pending is not None:
            self.log.append(("flush", self.pending))
            self.committed, self.pending = self.committed + 1, None

    def checkpoint_state(self):
        return {"committed": self.committed}


def test_observers_are_flushed_before_every_checkpoint(tmp_path, data, monkeypatch):
    log = []
    save = trainer._save_checkpoint
    monkeypatch.setattr(trainer, "_save_checkpoint", lambda path, state: (log.append(("save", state["step"])),
                                                                          save(path, state)))
    watcher = Watcher(log)
    train(tiny_config(6), data, model=tiny_model(), observers=[watcher], checkpoint=tmp_path / "c.pt",
          checkpoint_every=2)
    assert log == [("flush", 2), ("save", 2), ("flush", 4), ("save", 4), ("flush", 6), ("save", 6)]
    assert torch.load(tmp_path / "c.pt", weights_only=True)["observers"] == [{"committed": 3}]


def test_the_checkpoint_records_the_stores_committed_steps(tmp_path):
    recorded_run(tmp_path, steps=6)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["observers"] == [{"committed": 7, "last_step": 6}]


@pytest.mark.parametrize("loss", ["deleted", "rebuilt empty"])
def test_resume_refuses_a_store_with_fewer_steps_than_the_checkpoint(tmp_path, loss):
    import shutil

    recorded_run(tmp_path, steps=6)
    shutil.rmtree(tmp_path / "store.zarr")
    if loss == "rebuilt empty":
        from resume_worker import recorder

        recorder(tmp_path / "store.zarr", tiny_model(), tiny_data()).close()
    with pytest.raises(GradstoreError) as exc:
        recorded_run(tmp_path, steps=6)
    text = one_line(exc)
    assert "holds 0 committed steps" in text and "held 7" in text and "checkpoint.pt" in text
    # the fix it names works: without the checkpoint the run is replayed and recorded again
    (tmp_path / "checkpoint.pt").unlink()
    recorded_run(tmp_path, steps=6)
    from gradstore.store import open_run

    assert open_run(tmp_path / "store.zarr").step.values.tolist() == list(range(7))


def test_observer_state_of_a_recorder(tmp_path):
    from resume_worker import recorder

    with recorder(tmp_path / "s.zarr", tiny_model(), tiny_data()) as rec:
        assert observer_state(rec) == {"committed": 0, "last_step": -1}
    assert observer_state(object()) is None


def test_a_full_disk_while_serializing_is_one_line_and_leaves_no_tmp(tmp_path, data, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(GradstoreError) as exc:
        train(tiny_config(2), data, model=tiny_model(), checkpoint=tmp_path / "checkpoint.pt", checkpoint_every=2)
    text = one_line(exc)
    assert "no space left" in text and "free space" in text and "--resume" in text
    assert sorted(os.listdir(tmp_path)) == []


def test_a_full_disk_while_writing_is_one_line_and_leaves_no_tmp(tmp_path, data, monkeypatch):
    """The temporary file exists when the write fails (here: at its fsync, from the 2nd checkpoint on)."""
    path, sync = tmp_path / "checkpoint.pt", os.fsync
    saved = []

    def full(fd):
        if (tmp_path / "checkpoint.pt.tmp").exists() and path.exists():
            saved.append(path.read_bytes())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        sync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(GradstoreError) as exc:
        train(tiny_config(4), data, model=tiny_model(), checkpoint=path, checkpoint_every=2)
    assert "saving checkpoint" in one_line(exc) and "free space" in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    assert torch.load(path, weights_only=True)["step"] == 2  # the previous checkpoint is kept
    assert path.read_bytes() == saved[0]
