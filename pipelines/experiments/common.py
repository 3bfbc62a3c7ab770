"""Pieces every experiment uses: the output folder, the tracked sample, training with a Recorder,
and the markdown report.

The run folder (``--out``) is a :class:`RunFolder`. Every path an experiment writes is made by
:meth:`RunFolder.claim` (or :meth:`RunFolder.writing`): built from checked names only, it must
resolve inside ``--out``, and it is listed in the folder's marker ``.gradstore-run.json`` (written
first, naming the experiment, rewritten atomically before each new path is written). On
``--resume`` a path that exists but is not listed was not written by the run and is refused, never
overwritten; a non-empty folder without the marker is refused. While a run is going, the folder is
locked (``flock`` on the folder), so a second process resuming it gets one clear line.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradstore.errors import GradstoreError, RunFolderError

MARKER = ".gradstore-run.json"
_FORMAT = "gradstore-run-folder"
_BAD_CHARS = frozenset("/\\\0:")


@dataclass
class Context:
    """Where and how an experiment runs (from the command line)."""

    out: Path
    data_dir: str | None = None
    device: str = "cpu"
    resume: bool = False
    quick: bool = False
    progress: bool = True
    autocast: str | None = None  # mixed-precision capture (Recorder(autocast=...))
    command: str | None = None  # the command line, for the report's provenance
    ranks: int = 1  # processes training the recorded runs (DDP under --nproc N or torchrun)
    trained: list[int] = field(default_factory=list)  # training examples each rank trained on (train_recorded)
    folder: RunFolder | None = field(default=None, repr=False)  # set while an experiment runs (experiment())


def prepare_out(out: Path, *, resume: bool) -> Path:
    """Create ``out``; refuse to write into a folder that already holds results unless resuming."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GradstoreError(f"--out {out} is a file; give a folder for the experiment's results")
    if out.exists() and any(out.iterdir()) and not resume:
        raise GradstoreError(
            f"{out} already holds results; pass --resume to continue that run or choose another --out"
        )
    with RunFolder.errors(f"creating --out {out}"):
        out.mkdir(parents=True, exist_ok=True)
    return out


def _check_name(part: str) -> str:
    """``part`` as one plain path component (no separator, no ``..``); a one-line error otherwise."""
    if (not isinstance(part, str) or part in ("", ".", "..") or _BAD_CHARS & set(part) or len(part) > 200
            or not part.isprintable()):
        raise RunFolderError(f"{part!r} cannot name a file or folder of the run (built from a config value or "
                             "argument); give plain names and numbers in the configuration")
    return part


def number_label(value, key: str, spec: str = ".2f") -> str:
    """``value`` formatted by ``spec`` for a folder name, if it is a finite number (else one line naming ``key``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GradstoreError(f"{key}: {value!r} is not a number; give numbers in the configuration")
    if spec == "d":
        if float(value) != int(value):
            raise GradstoreError(f"{key}: {value!r} is not an integer; give integers in the configuration")
        value = int(value)
    return format(value, spec)


def distinct_dirs(labels: dict, key: str) -> dict:
    """``labels`` (condition -> folder name) unchanged if no two conditions share a folder; else one line."""
    seen: dict[str, Any] = {}
    for condition, label in labels.items():
        if label in seen:
            raise GradstoreError(f"{key}: {seen[label]!r} and {condition!r} would share the folder {label}; "
                                 "give values that differ in their folder names")
        seen[label] = condition
    return labels


class RunFolder:
    """The results folder of one experiment run; see the module docstring.

    Use :meth:`open` (which checks the marker and takes the lock) and :meth:`close`.

    Parameters
    ----------
    out : path
        The ``--out`` folder (it exists).
    experiment : str
        The experiment's name, kept in the marker.
    files : list of str
        The relative paths already listed in the marker.
    """

    def __init__(self, out: Path, experiment: str, files: list[str], lock: int | None = None, fresh: bool = False):
        self.out, self.experiment, self.files = Path(out), experiment, set(files)
        self.root = self.out.resolve()
        self._lock, self._fresh = lock, fresh

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, out, experiment: str, *, resume: bool) -> RunFolder:
        """The run folder ``out`` of ``experiment``: started (fresh) or checked and reopened (``resume``).

        A fresh run writes the marker into the empty folder before anything else. With ``resume`` a
        folder with the marker of another experiment, a damaged marker, or a non-empty folder
        without one is refused (an empty folder starts the run afresh).
        """
        out = Path(out)
        if not out.is_dir():
            raise RunFolderError(f"--out {out} is not a folder; give a folder for the experiment's results")
        lock = _lock_folder(out)
        try:
            marker = out / MARKER
            if marker.exists() or marker.is_symlink():
                state = _read_marker(marker)
                if not resume:
                    raise RunFolderError(f"{out} already holds results; pass --resume to continue that run "
                                         "or choose another --out")
                if state["experiment"] != experiment:
                    other = state["experiment"][:60]
                    raise RunFolderError(f"{out} holds a {other!r} run, not {experiment!r}; resume it with "
                                         f"`gradstore run {other!r} --resume` or choose another --out")
                folder = cls(out, experiment, state["files"], lock)
            elif any(out.iterdir()):
                what = "has no" if resume else "already holds files and no"
                raise RunFolderError(f"{out} {what} {MARKER}: it is not a gradstore run folder, so --resume "
                                     "will not write into it; move its files away or choose another --out")
            else:
                folder = cls(out, experiment, [], lock, fresh=True)
            folder._save()
            return folder
        except BaseException:
            _unlock(lock)
            raise

    def close(self, *, failed: bool = False) -> None:
        """Release the folder's lock. The marker stays, unless ``failed`` before anything it lists was
        written by a run that started the folder (so that a corrected command can start it afresh)."""
        if failed and self._fresh and not any((self.out / rel).exists() for rel in self.files):
            (self.out / MARKER).unlink(missing_ok=True)
        _unlock(self._lock)
        self._lock = None

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str | Path) -> Path:
        """``out/part/...`` after checking every part is a plain name and the result stays inside ``out``.

        The first part may be a path this method returned (a condition's folder). Nothing is
        created; use it to check every folder of a run before any work starts.
        """
        if parts and isinstance(parts[0], Path):
            parts = (*parts[0].relative_to(self.out).parts, *parts[1:])
        path = self.out.joinpath(*(_check_name(p) for p in parts))
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise RunFolderError(f"{path} resolves to {resolved}, outside --out {self.out}; remove the link "
                                 "or choose another --out")
        return path

    def claim(self, *parts: str | Path, kind: str = "file") -> Path:
        """The checked :meth:`path` of something the run is about to write, listed in the marker first.

        Nothing is created. Refused (one line): a parent that is a file, a ``kind``
        (``"file"`` or ``"dir"``) that does not match what is there, or something already there that
        the marker does not list (not written by this run).
        """
        path = self.path(*parts)
        rel = path.relative_to(self.out).as_posix()
        for parent in reversed(path.relative_to(self.out).parents[:-1]):
            where = self.out / parent
            if where.exists() and not where.is_dir():
                raise RunFolderError(f"{where} is a file, where the run keeps a folder; move it away "
                                     "or choose another --out")
        if path.exists() or path.is_symlink():
            if not self.owns(rel):
                raise RunFolderError(f"{path} exists but was not written by this run; move it away "
                                     "or choose another --out")
            if path.is_dir() != (kind == "dir"):
                raise RunFolderError(f"{path} is a {'folder' if path.is_dir() else 'file'}, where the run "
                                     f"keeps a {'folder' if kind == 'dir' else 'file'}; move it away "
                                     "or choose another --out")
        if not self.owns(rel):
            self.files.add(rel)
            self._save()
        return path

    def claim_all(self, folders, names) -> None:
        """:meth:`claim` every ``(name, kind)`` of ``names`` in each of ``folders`` (before any work)."""
        for where in folders:
            for name, kind in names:
                self.claim(where, name, kind=kind)

    def makedirs(self, path: Path) -> Path:
        """Create the folder ``path`` (a checked :meth:`path`) and its parents; one line if that fails."""
        with self.errors(f"creating {path}"):
            path.mkdir(parents=True, exist_ok=True)
        return path

    def owns(self, rel: str) -> bool:
        """Whether the marker lists ``rel`` or a folder above it."""
        parts = rel.split("/")
        return any("/".join(parts[:k]) in self.files for k in range(1, len(parts) + 1))

    @contextmanager
    def writing(self, *parts: str | Path, kind: str = "file"):
        """``with folder.writing("report.md") as path:`` write there: claimed, and a file-system error
        (a full disk) becomes one line saying to run again with ``--resume``."""
        path = self.claim(*parts, kind=kind)
        self.makedirs(path.parent)
        with self.errors(f"writing {path}"):
            yield path

    @staticmethod
    @contextmanager
    def errors(what: str):
        """Turn an ``OSError`` of the block into one line (what failed, and ``--resume`` once fixed)."""
        try:
            yield
        except OSError as exc:
            raise RunFolderError.write_failed(what, exc) from None

    def _save(self) -> None:
        state = {"format": _FORMAT, "version": 1, "experiment": self.experiment,
                 "pid": os.getpid(), "host": socket.gethostname(), "files": sorted(self.files)}
        marker = self.out / MARKER
        tmp = marker.with_name(f"{MARKER}.tmp-{os.getpid()}")
        with self.errors(f"writing {marker}"):
            try:
                tmp.write_text(json.dumps(state, indent=1) + "\n")
                os.replace(tmp, marker)
            finally:
                tmp.unlink(missing_ok=True)


def _read_marker(marker: Path) -> dict:
    fix = "restore it, or choose another --out"
    if marker.is_symlink() or not marker.is_file():
        raise RunFolderError(f"{marker} is not a file; {fix}")
    try:
        state = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise RunFolderError(f"{marker} is damaged (not JSON); {fix}") from None
    if (not isinstance(state, dict) or state.get("format") != _FORMAT or not isinstance(state.get("experiment"), str)
            or not isinstance(state.get("files"), list) or not all(isinstance(f, str) for f in state["files"])):
        raise RunFolderError(f"{marker} is not a gradstore run marker; {fix}")
    return state


def _lock_folder(out: Path) -> int | None:
    """An exclusive ``flock`` on the folder ``out`` for this process (None where unsupported).

    The OS drops it when the process ends, a kill included, so a lock is never stale.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = ""
        try:
            state = json.loads((out / MARKER).read_text())
            holder = f" (pid {int(state['pid'])} on {str(state['host'])[:100]})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise RunFolderError(f"another gradstore process{holder} is running in {out}; wait for it to finish, "
                             "or choose another --out") from None
    except OSError:  # a file system without flock: no lock
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def tracked_indices(n: int, size: int, seed: int, *, key: str = "size", data: str = "examples") -> np.ndarray:
    """A fixed random sample of ``size`` of ``n`` indices (sorted), the same for every noise level.

    ``size`` above ``n`` is refused (one line naming the setting ``key``, its value and ``n``), never
    silently reduced; 0 gives none.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 <= size <= n:
        raise GradstoreError(f"{key} = {size!r} but the data have {n} {data}; give an integer from 0 to {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(size), replace=False))


def schedule_from(capture: dict[str, Any], steps: int | None = None):
    """The capture schedule of a ``[capture]`` table: log-spaced early steps, then a cadence; with
    ``every_step_until = N`` (> 0) also every step 0..N (then ``steps``, the run length, is needed)."""
    from gradstore.store import Schedule

    base = Schedule.log_then_every(capture["every"], until=capture["log_until"], n_log=capture["log_points"])
    dense = capture.get("every_step_until", 0)
    if not dense:
        return base
    if steps is None:
        raise ValueError("schedule_from: every_step_until needs the run length (steps)")
    return Schedule.at(sorted(set(base.steps(steps + 1)) | set(range(min(dense, steps) + 1))))


def train_recorded(config: dict[str, Any], noise: float, mnist, run_dir: Path, ctx: Context, *, desc: str,
                   optimizer: str = "sgd", optimizer_options: dict | None = None, model_name: str | None = None,
                   steps: int | None = None, eval_every: int | None = None, schedule=None, prime=None,
                   checkpoint_every: int | None = None, evaluate_captures: bool = True):
    """Train one model at one noise level with a Recorder on the tracked sample: the one recorded
    training of every experiment (so ``--nproc`` and ``--autocast`` apply to all of them).

    ``run_dir`` is a folder of ``ctx.folder`` (:meth:`RunFolder.path`). ``model_name``, ``steps``,
    ``eval_every`` and ``schedule`` default to the configuration's ``model``, ``steps``,
    ``eval_every`` and its ``[capture]`` schedule; ``prime(data)`` may return the training batches the
    Recorder primes BatchNorm on before each capture (``Recorder(prime_batches=...)``). Returns the
    :class:`~pipelines.train.TrainResult`, the :class:`~pipelines.train.TrainData` and the store
    path. A resumed run continues from its checkpoint and its last committed store step.
    ``evaluate_captures=False`` evaluates only every ``eval_every`` steps, not at every capture
    (:attr:`~pipelines.train.TrainConfig.evaluate_captures`).

    Under ``gradstore run --nproc N`` (or ``torchrun``) this runs on rank 0, which sends the other
    ranks (waiting in :func:`pipelines.distributed.follow`) what to train; every rank then runs
    :func:`recorded_training` (DDP training, each rank capturing its shard), and rank 0 alone writes.
    """
    from tqdm import tqdm

    from gradstore.record.messages import broadcast_message, world
    from pipelines.train import TrainConfig, TrainData, moved

    seed = config["seed"]
    model_name = model_name or config["model"]
    tc = TrainConfig(model=model_name, noise=noise, seed=seed, lr=config["lr"], batch_size=config["batch_size"],
                     steps=config["steps"] if steps is None else steps,
                     eval_every=config["eval_every"] if eval_every is None else eval_every,
                     optimizer=optimizer, optimizer_options=dict(optimizer_options or {}), device=ctx.device,
                     evaluate_captures=evaluate_captures)
    tc.validate()
    data = TrainData.from_mnist(mnist, noise=noise, seed=seed, device=ctx.device)
    tracked_samples(config["capture"], len(data.y_train), len(data.y_test), seed)  # sizes refused before any claim
    folder = ctx.folder
    store = folder.claim(run_dir, "store.zarr", kind="dir")
    checkpoint = folder.claim(run_dir, "checkpoint.pt")
    history, learned = folder.claim(run_dir, "history.csv"), folder.claim(run_dir, "learned_times.npz")
    folder.makedirs(run_dir)
    job = {"config": config, "noise": noise, "train": asdict(tc), "resume": ctx.resume, "autocast": ctx.autocast,
           "schedule": schedule if schedule is not None else schedule_from(config["capture"], tc.steps),
           "prime": prime(data) if prime is not None else None,
           "checkpoint_every": checkpoint_every or max(tc.eval_every, 1), "target": str(store)}
    if world()[1] > 1:
        broadcast_message(("train", {**job, "prime": moved(job["prime"]), "mnist": mnist}))
    with folder.errors(f"recording the run store {store}"):
        with tqdm(total=tc.steps, desc=desc, unit="step", disable=not ctx.progress, leave=False) as bar:
            result, per_rank = recorded_training(job, data, checkpoint=checkpoint, progress=lambda _s: bar.update(1))
    ctx.trained = [a + b for a, b in zip(ctx.trained, per_rank)] if len(ctx.trained) == len(per_rank) else per_rank
    with folder.errors(f"writing {history}"):
        write_csv(history, result.history)
    with folder.errors(f"writing {learned}"):
        np.savez(learned, example_id=data.train_ids.cpu().numpy(), first_learned=result.learned.first_learned,
                 run_start=result.learned.run_start, corrupt=data.corrupt.cpu().numpy())
    return result, data, store


def recorded_training(job: dict[str, Any], data, *, checkpoint=None, progress=None):
    """The training of one :func:`train_recorded` call, on this rank: a Recorder on the tracked
    samples and :func:`pipelines.train.train` (DDP over the default process group's ranks, if any).

    ``job`` holds plain values (what rank 0 sends the other ranks): the configuration, the noise
    level, the :class:`~pipelines.train.TrainConfig` fields, the schedule, the priming batches,
    ``resume``, ``autocast``, ``checkpoint_every`` and the store's ``target`` (written by rank 0
    only). Collective where there are several ranks: every rank calls it with the same ``job``.
    Returns the :class:`~pipelines.train.TrainResult` and, per rank, the training examples it
    trained on (on rank 0; ``[]`` elsewhere).
    """
    from gradstore.record import ProcessGroupReducer, Recorder
    from gradstore.record.messages import gather_messages, world
    from pipelines.models import build_model
    from pipelines.train import TrainConfig, moved, train

    config, noise, tc = job["config"], job["noise"], TrainConfig(**job["train"])
    cap, seed = config["capture"], tc.seed
    _, size = world()
    tr, te, mo = tracked_samples(cap, len(data.y_train), len(data.y_test), seed)
    model = build_model(tc.model, seed=seed).to(tc.device)
    prime = moved(job["prime"], tc.device) if size > 1 else job["prime"]  # (sent on the CPU)
    recorder = Recorder(
        job["target"], model,
        train_inputs=data.x_train[tr], train_targets=data.y_train[tr], train_ids=data.train_ids[tr].cpu().numpy(),
        train_true=data.y_true[tr].cpu().numpy(),
        test_inputs=data.x_test[te] if len(te) else None, test_targets=data.y_test[te] if len(te) else None,
        test_ids=data.test_ids[te].cpu().numpy() if len(te) else None,
        moments_inputs=data.x_train[mo] if len(mo) else None,
        moments_targets=data.y_train[mo] if len(mo) else None,
        schedule=job["schedule"], coords_per_layer=cap.get("coords_per_layer", 0), coord_seed=seed,
        n_proj=cap.get("projection_dim", 0), projection_seed=seed, gram=cap.get("gram", False),
        config={**config, "model": tc.model, "noise": noise, "optimizer": tc.optimizer,
                "optimizer_options": dict(tc.optimizer_options)},
        seeds={"seed": seed}, resume=job["resume"], autocast=job["autocast"], prime_batches=prime,
        reducer=ProcessGroupReducer() if size > 1 else None,  # each rank captures its shard, rank 0 writes
    )
    with recorder:
        result = train(tc, data, model=model, observers=[recorder], checkpoint=checkpoint,
                       checkpoint_every=job["checkpoint_every"], progress=progress, ddp=size > 1)
    per_rank = gather_messages(result.examples) if size > 1 else [result.examples]
    return result, per_rank or []


#: what :func:`train_recorded` and the analysis of its store write in a condition's folder
RECORDED = (("store.zarr", "dir"), ("checkpoint.pt", "file"), ("history.csv", "file"),
            ("learned_times.npz", "file"), ("analysis", "dir"))


def analyse_store(store: Path, out: Path, *, nulls: int, seed: int, metrics, progress: bool, resume: bool = False):
    """Analyse one run store into ``out`` (results.zarr, CSVs, PNGs); return the computed results.

    The folder is written under a temporary name and renamed into place when complete. A resumed
    run recomputes its analysis: with ``resume`` an earlier ``out`` is replaced, only then.
    """
    from dask.diagnostics import ProgressBar

    from analysis.output import write_results
    from analysis.report import analyze, open_store

    lazy = analyze(open_store(store), metrics=metrics, n_permutations=nulls, seed=seed)
    if progress:
        with ProgressBar(minimum=1.0):
            results = lazy.compute()
    else:
        results = lazy.compute()
    write_results(results, out, replace=resume)
    return results


def noise_dirs(folder, levels, key: str = "noise_levels") -> dict[float, Path]:
    """The checked folder ``noise-P.PP`` of every noise level (before anything is written)."""
    return {noise: folder.path(name) for noise, name in
            distinct_dirs({noise: f"noise-{number_label(noise, key)}" for noise in levels}, key).items()}


def train_condition(config: dict[str, Any], *, noise: float, optimizer: str, options: dict, mnist, run_dir: Path,
                    ctx: Context, desc: str):
    """Train one (noise, optimizer) condition with a Recorder and a checkpoint in ``run_dir``; analyse its store.

    Returns the :class:`~pipelines.train.TrainResult`, the :class:`~pipelines.train.TrainData` and
    the whole-model coherence summary of the store (:func:`coherence_summary`).
    """
    result, data, store = train_recorded(config, noise, mnist, run_dir, ctx, desc=desc, optimizer=optimizer,
                                         optimizer_options=options)
    results = analyse_store(store, ctx.folder.claim(run_dir, "analysis", kind="dir"), nulls=config["analysis"]["nulls"],
                            seed=config["analysis"]["seed"], metrics=tuple(config["analysis"]["metrics"]),
                            progress=ctx.progress, resume=ctx.resume)
    return result, data, coherence_summary(results)


def binomial_se(acc: float, n: int) -> float:
    """Standard error of an accuracy measured on n examples (NaN where undefined)."""
    return math.sqrt(acc * (1 - acc) / n) if n > 0 and math.isfinite(acc) else math.nan


def tracked_samples(cap: dict[str, Any], n_train: int, n_test: int, seed: int):
    """The tracked training, tracked test and moments samples of a ``[capture]`` table (indices).

    A size above the data size is refused in one line naming the setting (0: no such sample).
    """
    return (tracked_indices(n_train, cap["tracked_train"], seed + 100, key="[capture] tracked_train",
                            data="training examples"),
            tracked_indices(n_test, cap["tracked_test"], seed + 200, key="[capture] tracked_test",
                            data="test examples"),
            tracked_indices(n_train, cap.get("moments_examples", 0), seed + 300, key="[capture] moments_examples",
                            data="training examples"))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class Claim:
    """A claim of a paper, what was measured, and whether the data support it (a judged
    :class:`~pipelines.experiments.claims.ClaimSpec`)."""

    statement: str
    where: str
    measured: str
    supported: bool | None  # None: inconclusive (``measured`` says why)
    statistic: str = ""
    test: str = ""
    p_claim: float = math.nan  # the intersection-union p-value of the claim (largest per-condition p)
    p_opposite: float = math.nan  # the smallest Holm-adjusted p-value of the opposite direction
    key: str = ""
    kind: str = ""


VERDICT_WORDS = {True: "supported", False: "**not supported**", None: "inconclusive"}


@dataclass(frozen=True)
class Figure:
    """A figure an experiment declares (in :class:`~pipelines.experiments.runner.Outcome`): the runner
    draws it into the run folder's ``name`` and captions it in the report, in the declared order.
    ``draw(path)`` returns False when there is nothing to draw (the file then says why, and the report
    leaves it out)."""

    name: str
    caption: str
    draw: Callable[[Path], Any]


@dataclass
class Report:
    title: str
    intro: str
    claims: list[Claim] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, relative path)
    notes: list[str] = field(default_factory=list)
    first_line: str = ""  # the settings statement (pipelines.experiments.provenance), before the title
    provenance: list[str] = field(default_factory=list)

    def write(self, path: Path) -> Path:
        lines = ([self.first_line, ""] if self.first_line else []) + [f"# {self.title}", "", self.intro, ""]
        if self.claims:
            lines += ["## Claims tested", "",
                      "| claim | paper | statistic (window) | measured | test | p (claim) | p (opposite, Holm) | verdict |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {c.statement} | {c.where} | {c.statistic} | {c.measured} | {c.test} | {_pv(c.p_claim)} | "
                      f"{_pv(c.p_opposite)} | {VERDICT_WORDS[c.supported]} |" for c in self.claims]
            lines.append("")
        for caption, header, rows in self.tables:
            lines += [f"## {caption}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
            lines.append("")
        if self.figures:
            lines += ["## Figures", ""]
            lines += [f"![{caption}]({rel})\n\n*{caption}*\n" for caption, rel in self.figures]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        if self.provenance:
            lines += ["## Provenance", ""] + [f"- {n}" for n in self.provenance] + [""]
        path.write_text("\n".join(lines))
        return path


def _pv(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return "< 1e-16" if p < 1e-16 else f"{p:.3g}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if np.isnan(v):
            return "–"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (figures are saved with analysis.plots.save)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float))


def coherence_summary(results) -> dict[str, Any]:
    """Whole-model m-coherence of the tracked training sample (peak, its step, final) and the final f_p."""
    mc = results["m_coherence"].sel(source="exact", sample="tracked_train", layer="(model)").values
    steps = results["step"].values
    k = int(np.nanargmax(mc))
    f_p = float(results["f_p"].sel(layer="(model)").values[-1]) if "f_p" in results else float("nan")
    return {"peak_m_coherence": float(mc[k]), "peak_step": int(steps[k]), "final_m_coherence": float(mc[-1]),
            "final_f_p": f_p}


def coherence_table(rows, key: str, label: str):
    """A report table of :func:`coherence_summary` values per (noise, ``key``) condition."""
    header = ["noise", label, "peak m-coherence", "peak step", "final m-coherence", "f_p at the end"]
    return ("Gradient coherence of the tracked sample (exact, from the run store)", header, [
        [f"{r['noise']:.0%}", r[key], r["peak_m_coherence"], r["peak_step"], r["final_m_coherence"], r["final_f_p"]]
        for r in rows if "peak_m_coherence" in r])
