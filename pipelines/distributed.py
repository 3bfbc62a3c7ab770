"""Several processes for ``gradstore run NAME``: DDP training launched through torch's own launcher.

``gradstore run NAME --nproc N`` (N >= 2) checks its arguments, then re-launches itself through
``torch.distributed.run`` (:func:`launch`): ``torchrun --standalone --nproc_per_node N -m
pipelines.cli run NAME ...`` with the same arguments minus ``--nproc``, a fresh
``GRADSTORE_GROUP_KEY`` secret in the ranks' environment (it authenticates the messages that carry
Python objects, :mod:`gradstore.record.messages`) and one torch thread pool of ``cores // N``
threads per rank. Started by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment;
also when a user runs torchrun or a cluster scheduler, on one machine or several), the command joins
the default process group (:func:`ddp_session`: gloo on the CPU; with ``--device cuda`` NCCL for
CUDA tensors when every local rank has its own GPU, else gloo) and

- rank 0 runs the experiment as one process would: the run folder, every store, the analysis,
  the figures and the report are its alone. At each recorded training
  (:func:`pipelines.experiments.common.train_recorded`) it sends the other ranks what to train;
- ranks 1..N-1 wait for those messages (:func:`follow`) and exit 0 when rank 0 is done.

Each recorded training then runs on every rank (:func:`pipelines.experiments.common.recorded_training`):
the same model from the same seed, wrapped in ``DistributedDataParallel``, the same global batch
from the same seeded generator, each rank training on its contiguous slice
(:func:`pipelines.train.train` with ``ddp=True``), and a Recorder with ``ProcessGroupReducer()``
on every rank: each captures its shard of the tracked samples, the moments are all-reduced in
float64 and rank 0 writes. The store is the one-process store to floating-point rounding.

Errors: under :func:`launch` every rank writes its error to a private folder instead of stderr
(:func:`rank_errors`) and torchrun stops the other ranks when one fails; the launcher then prints
the first rank's error as one line (exit 2), or the traceback of a bug (exit 1).

:func:`capture_workers` starts the library's other design, capture-only workers around one training
process (:func:`gradstore.record.distributed.DistributedRecorder`); ``gradstore run`` no longer uses it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta

from gradstore.errors import GradstoreError

#: where the ranks started by :func:`launch` write their errors (a private folder, one file per rank)
ERRORS_ENV = "GRADSTORE_RANK_ERRORS"
#: the ``--nproc`` that :func:`launch` was given (for the command line in the report's provenance)
NPROC_ENV = "GRADSTORE_NPROC"
#: how long a rank waits in a collective: rank 0 analyses stores between trainings while the others
#: wait for its next message (a rank that dies is noticed at once: torchrun stops the others)
WAIT = timedelta(hours=2)


class LostRank(GradstoreError):
    """A rank other than 0 lost rank 0 (which stopped first; its own error says why)."""


def torchrun_world() -> int:
    """The number of ranks when this process was started by torchrun (or a launcher setting the same
    variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else 1."""
    if not all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return 1
    try:
        size = int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise GradstoreError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of ranks; start the ranks "
                             "with torchrun") from None
    return max(size, 1)


def precheck(config: dict, nproc: int) -> None:
    """Refuse, before any rank starts, a configuration that DDP over ``nproc`` ranks cannot train like
    one process (:func:`pipelines.train.check_ddp`, for every model and optimizer the configuration names)."""
    import torch

    from pipelines.models import build_model
    from pipelines.train import OPTIMIZERS, TrainConfig, check_ddp

    models = [config["model"]] if isinstance(config.get("model"), str) else []
    models += [m for m in config.get("models", []) if isinstance(m, str)]
    optimizers = [o for o in config.get("optimizers", ["sgd"]) if o in OPTIMIZERS]
    batch = config.get("batch_size")
    for name in models or [None]:
        model = build_model(name, seed=0) if name is not None else torch.nn.Linear(1, 1)
        for opt in optimizers or ["sgd"]:
            tc = TrainConfig(model=str(name), batch_size=batch if isinstance(batch, int) else nproc, optimizer=opt)
            check_ddp(tc, model, OPTIMIZERS[opt](model.parameters(), 0.1), nproc)


def launch(nproc: int, args: list[str]) -> None:
    """Run ``gradstore ARGS`` on ``nproc`` local ranks through ``torch.distributed.run`` (standalone).

    Returns when every rank exits 0. Otherwise raises a :class:`GradstoreError` with the first rank's
    error (one line), or, for a bug, prints its traceback and exits 1.
    """
    import logging
    import signal

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from gradstore.record.messages import KEY_ENV

    errors = tempfile.mkdtemp(prefix="gradstore-ranks-")  # mode 0700: this user only
    env = {KEY_ENV: secrets.token_hex(32), ERRORS_ENV: errors, NPROC_ENV: str(nproc),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc)),
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME") or "lo"}  # one machine: the loopback
    saved_env = {name: os.environ.get(name) for name in env}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed")]
    levels = [logger.level for logger in loggers]
    try:
        os.environ.update(env)  # the ranks inherit it
        for logger in loggers:  # torchrun's own report of a failure: the ranks' errors say it in one line
            logger.setLevel(logging.CRITICAL + 1)
        try:
            # torchrun's main() without its @record (which would enable faulthandler in this process)
            torchrun.run(torchrun.parse_args(["--standalone", "--nproc-per-node", str(nproc),
                                              "--monitor-interval", "0.1", "-m", "pipelines.cli", *args]))
        except ChildFailedError as failed:
            _raise_first_error(errors, failed.failures)
        except SignalException:  # Ctrl-C or a kill: torchrun has stopped the ranks
            import click

            raise click.Abort() from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        shutil.rmtree(errors, ignore_errors=True)


def _raise_first_error(folder: str, failures: dict) -> None:
    """One line for the rank that failed first (a gradstore error before any other), else the bug's traceback."""
    import signal

    reports = []
    for name in sorted(os.listdir(folder)):
        try:
            with open(os.path.join(folder, name)) as fh:
                reports.append(json.load(fh))
        except (OSError, ValueError):
            continue
    known = sorted((r for r in reports if r.get("kind") in ("gradstore", "lost")),
                   key=lambda r: (r["kind"] == "lost", r["time"]))  # the cause before its consequences
    if known:
        raise GradstoreError(f"rank {known[0]['rank']}: {known[0]['message']}")
    reported = {r.get("rank") for r in reports}
    for rank, failure in sorted(failures.items()):
        if failure.exitcode == -signal.SIGTERM or rank in reported:
            continue  # stopped by torchrun after another rank failed, or it said why
        try:
            how = (f"was killed by signal {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
                   else f"exited with status {failure.exitcode}")
        except ValueError:
            how = f"stopped with status {failure.exitcode}"
        raise GradstoreError(f"rank {rank} {how} without reporting an error (out of memory?); "
                             "run again, or with --nproc 1 to see it in one process")
    others = sorted(reports, key=lambda r: r["time"])
    if others:
        print(others[0]["traceback"], file=sys.stderr, end="", flush=True)
        raise SystemExit(1)
    raise GradstoreError("every rank was stopped (SIGTERM) before reporting an error; run again")


@contextmanager
def rank_errors():
    """In a rank started by :func:`launch`: an error leaves this rank as a report in the launcher's
    folder (no output; exit 2 for a gradstore error, 1 for any other) for the launcher to print once.
    Elsewhere (a rank started by a user's torchrun) errors go to stderr as usual."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder:
        yield
        return
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every error is reported once, by the launcher
        from pipelines.cli import cli_words, one_line, os_error_message

        known = isinstance(exc, (GradstoreError, OSError))
        message = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
        report = {"rank": int(os.environ.get("RANK", "0")), "time": time.time(),
                  "kind": "lost" if isinstance(exc, LostRank) else "gradstore" if known else "other", "message": one_line(cli_words(message)),
                  "traceback": "".join(traceback.format_exception(exc))}
        path = os.path.join(folder, f"rank-{report['rank']}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(report, fh)
        os.replace(path + ".tmp", path)
        raise SystemExit(2 if known else 1) from None


@contextmanager
def ddp_session(device: str = "cpu"):
    """Join the default process group of the ranks torchrun started; yield this rank.

    The ranks must share ``GRADSTORE_GROUP_KEY`` (:func:`launch` sets a fresh one). Backend: gloo,
    plus NCCL for CUDA tensors with ``--device cuda`` when every local rank has a GPU of its own
    (rank r uses ``cuda:(LOCAL_RANK % device count)``). On success rank 0 tells the others that it
    is done, and every rank leaves the group together.
    """
    import torch
    import torch.distributed as dist

    from gradstore.errors import StoreError
    from gradstore.record.messages import KEY_ENV, broadcast_message, set_group_key

    key = os.environ.get(KEY_ENV, "")
    try:
        secret = bytes.fromhex(key)
        set_group_key(secret)
    except (ValueError, StoreError):
        raise GradstoreError(f"the ranks need a shared secret: set {KEY_ENV} to the same random hex on every rank "
                             "(python -c \"import secrets; print(secrets.token_hex(32))\"), or use "
                             "gradstore run --nproc N, which makes one") from None
    backend = "gloo"
    if device.startswith("cuda"):
        local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        torch.cuda.set_device(local % gpus)
        if gpus >= int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
            backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=WAIT)
    try:
        rank = dist.get_rank()
        yield rank
        if rank == 0:
            broadcast_message(("exit", None))
        dist.barrier()  # every rank's collectives done before the group is torn down
    finally:
        set_group_key(None)
        dist.destroy_process_group()


def follow(device: str = "cpu") -> int:
    """Ranks 1..N-1: train with rank 0 every time it asks (:func:`pipelines.experiments.common.train_recorded`),
    until it says it is done; return the number of trainings."""
    import torch.distributed as dist

    from gradstore.record.messages import broadcast_message
    from pipelines.experiments.common import recorded_training
    from pipelines.train import TrainData

    done = 0
    while True:
        try:
            kind, job = broadcast_message()
        except RuntimeError as exc:  # rank 0 stopped: its own error says why
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise LostRank(f"rank {dist.get_rank()} lost rank 0 ({first}); rank 0's error says why") from None
        if kind == "exit":
            return done
        if kind != "train":
            raise GradstoreError(f"rank {dist.get_rank()} got an unknown message {kind!r} from rank 0; stopping")
        train = job["train"]
        data = TrainData.from_mnist(job.pop("mnist"), noise=job["noise"], seed=train["seed"], device=train["device"])
        recorded_training(job, data)
        done += 1


# ---------------------------------------------------------------- the library's capture-worker design


def _init(rank: int, size: int, rendezvous: str, key: bytes) -> None:
    import torch.distributed as dist

    from gradstore.record.distributed import set_group_key

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    set_group_key(key)


def _worker(index: int, size: int, rendezvous: str, key: bytes, device: str, threads: int) -> None:
    import torch
    import torch.distributed as dist

    from gradstore.record.distributed import serve, set_group_key

    if threads:
        torch.set_num_threads(threads)
    _init(index + 1, size, rendezvous, key)
    code = 0
    try:
        serve(device)
        dist.barrier()  # with rank 0's, after its close: no rank tears its group down under a peer's traffic
    except GradstoreError as err:  # e.g. a message that failed authentication: one line, exit 2
        print(f"gradstore: error: capture worker {index + 1}: {err}", file=sys.stderr, flush=True)
        code = 2
    finally:
        set_group_key(None)
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: with the group destroyed and nothing left to write,
    # gloo's threads could still abort it ("terminate called without an active exception", SIGABRT:
    # seen once in the full suite after the barrier above), which rank 0 reads as a failed worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def capture_workers(nproc: int, device: str = "cpu", threads: int = 0):
    """Run the block as rank 0 of ``nproc`` local processes whose captures are sharded.

    Parameters
    ----------
    nproc : int
        Processes in all (1: no workers, nothing changes).
    device : {"cpu", "cuda"}
        Where the workers capture (worker r uses ``cuda:r % device_count``).
    threads : int
        torch threads per worker (0: torch's default).
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise GradstoreError(f"--nproc must be a positive integer, got {nproc!r}")
    if nproc == 1:
        yield
        return
    import torch.distributed as dist

    if dist.is_initialized():
        raise GradstoreError("a torch.distributed process group is already initialised in this process; "
                             "capture_workers starts its own")
    folder = tempfile.mkdtemp(prefix="gradstore-rendezvous-")  # mode 0700: this user only
    try:
        with _group(nproc, os.path.join(folder, "store"), device, threads):
            yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _group(nproc: int, rendezvous: str, device: str, threads: int):
    """Spawn the workers, join the group as rank 0 (one new secret for this run), stop them on exit."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from gradstore.record.distributed import set_group_key, stop_workers

    key = secrets.token_bytes(32)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    context = mp.spawn(_worker, args=(nproc, rendezvous, key, device, threads), nprocs=nproc - 1, join=False)
    ok = False
    try:
        _init(0, nproc, rendezvous, key)
        yield
        ok = True
    finally:
        try:
            if ok:
                stop_workers()
                dist.barrier()  # every worker has left serve(): then all tear down (a gloo peer torn
                dist.destroy_process_group()  # down mid-traffic aborts: "terminate called without ...")
                while not context.join(timeout=60):
                    pass
        finally:
            if not ok:  # a worker may wait in a collective that will never come: stop ours
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                for process in context.processes:
                    process.join(timeout=10)
            if dist.is_initialized():
                dist.destroy_process_group()
            set_group_key(None)
