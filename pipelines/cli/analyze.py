"""``gradstore analyze``: every offline metric of a run store, locally or on a Dask cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from analysis.context import MAX_PAIR_EXAMPLES
from analysis.report import METRICS
from gradstore.errors import AnalysisError
from pipelines.cli.options import NonEmptyPath, SchedulerAddress, check_out
from pipelines.experiments.schema import MAX_NULLS, MAX_SEED

#: seconds to wait for a --scheduler to answer
CONNECT_TIMEOUT = 5


@click.command()
@click.argument("store")
@click.option("--out", type=NonEmptyPath(path_type=Path), default=None,
              help="New directory for results.zarr, CSV tables and PNG plots [default: STORE.analysis].")
@click.option("--metrics", default=None,
              help=f"Comma-separated metrics to compute, from the registered ones: {', '.join(METRICS)} [default: all].")
@click.option("--nulls", type=click.IntRange(0, MAX_NULLS), default=1000, show_default=True,
              help="Permutations per permutation test (0: no nulls).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of permutations and minibatch draws.")
@click.option("--snapshot", type=int, default=None, help="Step splitting easy from hard [default: middle step].")
@click.option("--pairwise-source", type=click.Choice(["exact", "coords", "proj"]), default=None,
              help="Source of pairwise products for stiffness/confusion/easy-hard/minibatch "
                   "[default: gram if stored, else grad_coords, else grad_proj].")
@click.option("--scheduler", type=SchedulerAddress(), default=None, metavar="ADDRESS",
              help="dask.distributed scheduler address (e.g. tcp://host:8786); default: local threads.")
@click.option("--steps-per-batch", type=click.IntRange(min=1), default=None,
              help="Steps per compute (peak memory is about one batch) [default: 8 on local threads; on a "
                   "cluster, its number of worker threads: each worker then holds about one step]")
@click.option("--skip-damaged", is_flag=True,
              help="Leave out the steps that fail verification (named in the output) instead of refusing the store.")
@click.option("--pair-examples", type=click.IntRange(min=2), default=MAX_PAIR_EXAMPLES, show_default=True,
              help="Most training examples in pairwise metrics; more are a seeded sample (with standard errors).")
@click.option("--null-distributions/--no-null-distributions", default=True, show_default=True,
              help="Keep every null world per step in results.zarr (they grow with the run; bands and "
                   "p-values are kept either way).")
@click.option("--retries", type=click.IntRange(0, 10), default=2, show_default=True,
              help="Retries of a failed task on a --scheduler cluster (a lost worker).")
def analyze(store: str, out: Path | None, metrics: str, nulls: int, seed: int, snapshot: int | None,
            pairwise_source: str | None, scheduler: str | None, steps_per_batch: int, skip_damaged: bool,
            pair_examples: int, null_distributions: bool, retries: int) -> None:
    """Compute the registered metrics of STORE (default: all of them).

    STORE is verified first (every committed value read back against its checksum and digest); a
    damaged store is refused with one line naming the array, chunk and step, unless --skip-damaged.
    Metrics a store cannot have (class-based ones on a store without classes) are skipped with a note.
    """
    from analysis.output import prepare_out, write_results
    from analysis.report import check_metrics, open_store, prepare

    chosen = check_metrics(METRICS if metrics is None else [m.strip() for m in metrics.split(",") if m.strip()])
    out = out if out is not None else _default_out(store)
    check_out(out)
    out = prepare_out(out)
    ds = open_store(store, verify=True, skip_damaged=skip_damaged, progress=_verify_bar)
    skipped = ds.attrs.get("skipped_steps", [])
    if skipped:
        click.echo(f"{store}: leaving out {len(skipped)} damaged step(s): {', '.join(map(str, skipped[:10]))}"
                   + (" ..." if len(skipped) > 10 else ""), err=True)
    check_null_memory(nulls, ds.sizes["example"])
    plan = prepare(ds, metrics=chosen, n_permutations=nulls, seed=seed, snapshot=snapshot,
                   pair_source=pairwise_source, max_pair_examples=pair_examples)
    what = (f"{store}: {ds.sizes['step']} steps, {ds.sizes['example']} examples, "
            f"{ds.sizes['layer']} layers; computing {', '.join(plan.attrs['metrics'])}")

    def announce():  # once connected: an unreachable scheduler is the only line
        for note in plan.attrs["notes"]:
            click.echo(f"{store}: {note}", err=True)
        click.echo(what, err=True)

    results = _compute(plan, scheduler, steps_per_batch, null_distributions=null_distributions, retries=retries,
                       announce=announce)
    if skipped:
        results.attrs["skipped_steps"] = list(skipped)
    files = write_results(results, out)
    click.echo(f"wrote {len(files)} files to {out}")


def _verify_bar(arrays):
    from tqdm import tqdm

    return tqdm(arrays, desc="verifying", unit="array", file=sys.stderr, leave=False, disable=None)  # terminals only


def _default_out(store: str) -> Path:
    """``STORE.analysis`` beside a local store; ``NAME.analysis`` in the working directory for a URL."""
    if "://" in store:
        return Path(store.rstrip("/").rsplit("/", 1)[-1] + ".analysis")
    path = Path(store)
    return path.with_name(path.name + ".analysis")


#: steps per compute on local threads (threads share one process's memory; fewer was slower here)
LOCAL_STEPS_PER_BATCH = 8


def _compute(plan, scheduler: str | None, steps_per_batch: int | None = None, *, null_distributions: bool = True,
             retries: int = 2, announce=None):
    """Compute ``plan`` (:func:`analysis.report.prepare`) in step batches (bounded memory) with a
    progress bar, locally or on the cluster of ``scheduler`` (its dashboard link printed, failed
    tasks retried ``retries`` times); ``announce()`` once ready to compute (after connecting)."""
    announce = announce or (lambda: None)
    from tqdm import tqdm

    def bar(batches):
        return tqdm(batches, desc=f"steps ({steps_per_batch} per batch)", unit="batch", file=sys.stderr)

    if scheduler is None:
        steps_per_batch = steps_per_batch or LOCAL_STEPS_PER_BATCH
        announce()
        return plan.compute(steps_per_batch=steps_per_batch, progress=bar, null_distributions=null_distributions)
    with connect(scheduler) as client:  # the default scheduler while open: every .compute() runs on the cluster
        announce()
        workers = client.scheduler_info().get("workers", {})
        # one step per worker thread a batch (docs/benchmarks.md, Analysis): at 8, a worker held several
        # step chunks at once and its peak grew with the run (+17 % over 16x the steps), at 2 it did not
        steps_per_batch = steps_per_batch or max(1, sum(w.get("nthreads", 1) for w in workers.values()))
        click.echo(f"Dask cluster at {scheduler}: {len(workers)} workers; dashboard {client.dashboard_link}",
                   err=True)
        return plan.compute(steps_per_batch=steps_per_batch, progress=bar, null_distributions=null_distributions,
                            compute=lambda obj: obj.compute(retries=retries))


def connect(address: str, timeout: float = CONNECT_TIMEOUT):
    """A ``distributed.Client`` of the scheduler at ``address``; :class:`AnalysisError` if it does not answer."""
    from distributed import Client

    try:
        return Client(address, timeout=timeout)
    except (OSError, ValueError, MemoryError) as exc:  # MemoryError: a peer that is not a Dask scheduler
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AnalysisError(f"cannot connect to a Dask scheduler at {address} within {timeout:g} s ({reason}); "
                            "start one (`dask scheduler`) or fix --scheduler") from None


def check_null_memory(nulls: int, examples: int) -> None:
    """Refuse ``--nulls`` whose permutation masks (nulls x examples float64) would not fit in memory."""
    need = 8 * nulls * examples * 2  # the masks and numpy's permuted copy
    total = _physical_memory()
    if total and need > total // 2:
        raise AnalysisError(f"--nulls {nulls} needs about {need / 2**30:.1f} GiB for the permutation masks of "
                            f"{examples} examples, more than half of this machine's {total / 2**30:.0f} GiB; "
                            "use fewer --nulls")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not on this platform
        return None
