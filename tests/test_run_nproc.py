"""``gradstore run NAME --nproc N``: launched through torch.distributed.run, every rank trains (DDP).

The 2-rank run of a tiny label-noise configuration must write the store, history and report numbers
that one process writes (an independent computation: the plain training loop, no process group),
every rank must have trained on its half of every batch, and what DDP cannot train like one process
is refused in one line before any rank starts.
"""

from __future__ import annotations

import csv
import json
import signal
from types import SimpleNamespace

import pytest
import torch
from ddp_helpers import assert_same_store

from gradstore.errors import GradstoreError
from gradstore.store import open_run
from pipelines import distributed
from pipelines.cli import main

TINY = """
model = "mlp-3x256"
noise_levels = [0.5]
seed = 0
lr = 0.1
batch_size = {batch}
steps = 6
eval_every = 3

[capture]
tracked_train = {tracked}
tracked_test = 3
coords_per_layer = 5
moments_examples = 13
projection_dim = 4
gram = true
log_until = 2
log_points = 2
every_step_until = 0
every = 3

[analysis]
nulls = 5
seed = 0
metrics = ["coherence"]
"""


def _config(tmp_path, name="tiny.toml", *, batch=20, tracked=9):
    path = tmp_path / name
    path.write_text(TINY.format(batch=batch, tracked=tracked))
    return str(path)


def _run(capfd, *args):
    """Exit status, stdout and stderr of ``gradstore run label-noise ARGS`` (in this process)."""
    code = 0
    try:
        main(["run", "label-noise", "--no-progress", *args])
    except SystemExit as exc:
        code = exc.code
    out = capfd.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The tiny run in one process (no process group): what the 2-rank runs must reproduce."""
    root = tmp_path_factory.mktemp("one")
    config = _config(root)
    try:
        main(["run", "label-noise", "--no-progress", "--config", config, "--out", str(root / "one")])
    except SystemExit as exc:
        pytest.fail(f"the one-process run failed with exit status {exc.code}")
    return root / "one"


def _history(folder):
    with open(folder / "noise-0.50" / "history.csv") as fh:
        return list(csv.DictReader(fh))


def _compare_stores(one, two):
    a = open_run(one / "noise-0.50" / "store.zarr").load()
    b = open_run(two / "noise-0.50" / "store.zarr").load()
    assert set(a.variables) == set(b.variables) and b.step.values.tolist() == [0, 1, 3, 6]
    assert_same_store(b, a)
    assert (b["sum_of_norm_sq"].values > 0).all()


def _compare_histories(one, two):
    h1, h2 = _history(one), _history(two)
    assert [r["step"] for r in h1] == [r["step"] for r in h2] == ["0", "1", "3", "6"]
    for r1, r2 in zip(h1, h2):
        for key in ("train_loss", "test_loss", "train_acc", "test_acc", "pristine_acc", "corrupt_acc"):
            assert float(r2[key]) == pytest.approx(float(r1[key]), rel=1e-5, abs=1e-7), key
    assert float(h1[-1]["train_loss"]) != pytest.approx(float(h1[0]["train_loss"]), rel=1e-3)  # it did train


@pytest.mark.slow  # torchrun with 2 ranks (the one-process run is shared): 15-40 s on 2 shared cores
def test_two_ranks_write_the_one_process_run_and_both_train(tmp_path, capfd, one_process):
    config = _config(tmp_path)
    one, two = one_process, tmp_path / "two"
    code, out, err = _run(capfd, "--config", config, "--out", str(two), "--nproc", "2")
    assert code == 0, err
    assert f"report: {two / 'report.md'}" in out  # printed by rank 0, not twice

    _compare_stores(one, two)
    # the training itself: the same losses and accuracies at every evaluation, in history and report
    _compare_histories(one, two)
    table = [line for line in (one / "report.md").read_text().splitlines() if "50%" in line and "|" in line]
    assert table and table == [line for line in (two / "report.md").read_text().splitlines()
                               if "50%" in line and "|" in line]

    # every rank trained, on its half of each global batch of 20 (6 steps)
    p1, p2 = (json.loads((f / "provenance.json").read_text()) for f in (one, two))
    assert (p1["ranks"], p1["examples_trained_per_rank"]) == (1, [6 * 20])
    assert (p2["ranks"], p2["examples_trained_per_rank"]) == (2, [6 * 10, 6 * 10])
    assert p2["command"].endswith("--nproc 2") and "--nproc 2" in (two / "report.md").read_text()


@pytest.mark.slow  # one process killed, then torchrun with 2 ranks: 15-40 s on 2 shared cores
def test_a_killed_one_process_run_resumes_on_two_ranks(tmp_path, capfd, monkeypatch, one_process):
    """Killed after its checkpoint at step 3, a 1-process run continues on 2 ranks from that
    checkpoint (rank 0 sends the other its state) and ends as the uninterrupted run."""
    import pipelines.train

    config = _config(tmp_path)
    one, resumed = one_process, tmp_path / "resumed"
    save = pipelines.train._save_checkpoint

    def killed_after_step_3(path, state):
        save(path, state)
        if state["step"] == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(pipelines.train, "_save_checkpoint", killed_after_step_3)
        assert _run(capfd, "--config", config, "--out", str(resumed))[0] == 130
    assert open_run(resumed / "noise-0.50" / "store.zarr").load().step.values.tolist() == [0, 1, 3]
    code, _, err = _run(capfd, "--config", config, "--out", str(resumed), "--nproc", "2", "--resume")
    assert code == 0, err
    _compare_stores(one, resumed)
    _compare_histories(one, resumed)
    provenance = json.loads((resumed / "provenance.json").read_text())
    assert provenance["examples_trained_per_rank"] == [3 * 10, 3 * 10]  # steps 4-6, half a batch each


def test_a_batch_that_does_not_split_is_refused_before_any_rank_starts(tmp_path, capfd):
    code, _, err = _run(capfd, "--config", _config(tmp_path), "--out", str(tmp_path / "o"), "--nproc", "3")
    assert code == 2
    assert err.splitlines() == ["gradstore: error: batch_size 20 does not split over --nproc 3 ranks (each trains "
                                "on an equal slice of every batch); give a batch_size divisible by 3, or --nproc 2"]
    assert not (tmp_path / "o").exists()


def test_an_error_on_a_rank_is_one_line_and_exit_2(tmp_path, capfd):
    """Rank 0 refuses the tracked sample after the ranks started; rank 1, waiting for it, is stopped:
    the launcher prints rank 0's error once, not rank 1's or torchrun's report."""
    config = _config(tmp_path, tracked=20000)
    code, _, err = _run(capfd, "--config", config, "--out", str(tmp_path / "o"), "--nproc", "2")
    assert code == 2
    assert err.splitlines() == ["gradstore: error: rank 0: [capture] tracked_train = 20000 but the data have 10000 "
                                "training examples; give an integer from 0 to 10000"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the launcher's handlers are gone


def test_what_ddp_would_change_is_refused(tmp_path, capfd):
    from pipelines.models import build_model
    from pipelines.optim import WinsorizedSGD
    from pipelines.train import TrainConfig, check_ddp

    with pytest.raises(SystemExit) as exc:
        main(["run", "coherence-evolution", "--quick", "--no-progress", "--out", str(tmp_path / "o"), "--nproc", "2"])
    err = capfd.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "has BatchNorm" in err and "run it with --nproc 1" in err and not (tmp_path / "o").exists()

    model = build_model("mlp-3x256", seed=0)
    check_ddp(TrainConfig(model="mlp-3x256", batch_size=20), model, torch.optim.SGD(model.parameters(), 0.1), 2)
    with pytest.raises(GradstoreError, match="computes its own gradient from the whole batch"):
        check_ddp(TrainConfig(model="mlp-3x256", batch_size=20, optimizer="winsorized-sgd"), model,
                  WinsorizedSGD(model.parameters(), lr=0.1, c=1), 2)
    with pytest.raises(GradstoreError, match="has dropout"):
        check_ddp(TrainConfig(model="x", batch_size=20), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()),
                  torch.optim.SGD(model.parameters(), 0.1), 2)


def test_nproc_is_refused_inside_a_rank_and_seeds_with_ranks(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = _run(capfd, "--quick", "--out", str(tmp_path / "o"), "--nproc", "2")
    assert code == 2 and err.startswith("gradstore: error: --nproc 2 was given to a rank that torchrun started")
    code, _, err = _run(capfd, "--quick", "--out", str(tmp_path / "o"), "--seeds", "2")
    assert code == 2 and "--seeds 2 with --nproc 2" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_rank_without_the_shared_secret_is_refused_before_joining(monkeypatch):
    monkeypatch.delenv("GRADSTORE_GROUP_KEY", raising=False)
    with pytest.raises(GradstoreError, match="shared secret: set GRADSTORE_GROUP_KEY"):
        with distributed.ddp_session("cpu"):
            pass
    assert not torch.distributed.is_initialized()


def _reports(tmp_path, *reports):
    for r in reports:
        (tmp_path / f"rank-{r['rank']}.json").write_text(json.dumps({"traceback": "", **r}))
    return str(tmp_path)


def test_the_launcher_reports_the_cause_not_its_consequences(tmp_path):
    failed = {0: SimpleNamespace(exitcode=2), 1: SimpleNamespace(exitcode=2)}
    folder = _reports(tmp_path, {"rank": 1, "time": 1.0, "kind": "lost", "message": "rank 1 lost rank 0 (x)"},
                      {"rank": 0, "time": 2.0, "kind": "gradstore", "message": "the real cause"})
    with pytest.raises(GradstoreError, match="^rank 0: the real cause$"):
        distributed._raise_first_error(folder, failed)
    killed = {0: SimpleNamespace(exitcode=-signal.SIGKILL), 1: SimpleNamespace(exitcode=-signal.SIGTERM)}
    (tmp_path / "none").mkdir()
    with pytest.raises(GradstoreError, match="rank 0 was killed by signal SIGKILL without reporting an error"):
        distributed._raise_first_error(str(tmp_path / "none"), killed)
