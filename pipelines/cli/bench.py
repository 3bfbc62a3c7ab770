"""``gradstore bench``: benchmarks, one subcommand each (``capture`` here; add others with
``@bench.command()`` in this module or ``bench.add_command(...)``)."""

from __future__ import annotations

import click

from pipelines.cli.options import NonEmptyPath, check_device, check_out, data_dir_option, device_option


def _names(text: str) -> tuple:
    """The items of a comma-separated option, stripped, empty ones dropped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _ints(text: str, hint: str) -> tuple:
    """A comma-separated option of integers; click's one-line error naming ``hint`` otherwise."""
    try:
        return tuple(int(item) for item in _names(text))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=hint) from None


@click.group()
def bench() -> None:
    """Speed and memory benchmarks (figures for docs/benchmarks.md)."""


@bench.command("capture")
@click.option("--m", "m", type=click.IntRange(min=2), default=4000, show_default=True,
              help="Examples for the MLP and CNN cases.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed calls per case (median reported), after one warm-up.")
@click.option("--gram-m", type=click.IntRange(min=2), default=2000, show_default=True,
              help="Examples in the Gram-block case.")
@click.option("--vmap-m", type=click.IntRange(min=1), default=400, show_default=True,
              help="Examples on which torch.func vmap is timed (scaled linearly to --m).")
@click.option("--gram-small", type=click.IntRange(min=4), default=250, show_default=True,
              help="Largest m at which the materialized Gram is timed (also at half of it).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch CPU threads per case (0: torch's default).")
@click.option("--lm-m", type=click.IntRange(min=2), default=128, show_default=True,
              help="Sequences (T = 64 bytes of the stdlib's sources) in the language-model cases.")
@click.option("--only", type=click.Choice(["all", "lm"]), default="all", show_default=True,
              help="'lm': the language-model cases only.")
@data_dir_option
@device_option
def capture(m: int, repeats: int, gram_m: int, vmap_m: int, gram_small: int, threads: int, lm_m: int, only: str,
            data_dir: str | None, device: str) -> None:
    """Capture engine vs a plain forward+backward pass, torch.func vmap and materialized Gram blocks."""
    from pipelines.bench.capture import lm_markdown, markdown, run, run_lm

    import torch

    check_device(device)
    click.echo(f"gradstore bench capture: m={m}, device={device}, repeats={repeats}, torch threads="
               f"{threads or torch.get_num_threads()} (each case in its own process)")
    lm_rows = run_lm(m=lm_m, device=device, repeats=repeats, threads=threads, echo=click.echo)
    if only == "lm":
        click.echo("\n" + lm_markdown(lm_rows, m=lm_m))
        return
    rows = run(m=m, device=device, repeats=repeats, data_dir=data_dir, vmap_m=min(vmap_m, m), gram_m=gram_m,
               gram_small=gram_small, threads=threads, echo=click.echo)
    extras = [name for name, key in (("BackPACK", "mlp-backpack"), ("Opacus", "mlp-opacus")) if key in rows]
    click.echo("bench extra: " + (", ".join(extras) + " timed" if extras else "not installed (`make bench-extra`)"))
    click.echo(f"data: {rows['mlp-plain']['source']}\n")
    click.echo(markdown(rows, m=m, gram_m=gram_m, vmap_m=min(vmap_m, m), gram_small=gram_small))
    click.echo("\n" + lm_markdown(lm_rows, m=lm_m))


@bench.command("store")
@click.option("--examples", type=click.IntRange(min=1), default=1000, show_default=True, help="Tracked examples.")
@click.option("--coords", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Sampled gradient coordinates (split over the model's two layers).")
@click.option("--steps", type=click.IntRange(min=2), default=8, show_default=True, help="Steps appended per case.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed capture / capture+write pairs (median reported).")
@data_dir_option
@device_option
def store(examples: int, coords: int, steps: int, repeats: int, data_dir: str | None, device: str) -> None:
    """Run-store write throughput (MB/s) and the cost of writing relative to capture."""
    from pipelines.bench.store import markdown, run

    check_device(device)
    click.echo(f"gradstore bench store: examples={examples}, coords={coords}, device={device}")
    rows = run(examples=examples, coords=coords, steps=steps, repeats=repeats, device=device, data_dir=data_dir,
               echo=click.echo)
    click.echo(f"data: {rows['source']}\n")
    click.echo(markdown(rows, examples=examples, coords=coords, steps=steps, repeats=repeats, device=device))


@bench.command("analysis")
@click.option("--examples", type=click.IntRange(min=4), default=50_000, show_default=True, help="Tracked examples.")
@click.option("--layers", type=click.IntRange(min=1), default=60, show_default=True, help="Layers.")
@click.option("--base-steps", type=click.IntRange(min=1), default=28, show_default=True,
              help="Steps of the 1x store (the others have 4x and 16x as many; 16 x 28 steps is ~20 GB).")
@click.option("--factors", default="1,4,16", show_default=True, help="Comma-separated step multiples.")
@click.option("--nulls", type=click.IntRange(min=0), default=1000, show_default=True, help="Permutations.")
@click.option("--steps-per-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Steps per compute.")
@click.option("--worker-memory", default="1.5GB", show_default=True, help="Memory limit of each cluster worker.")
@click.option("--cases", default="threads,cluster", show_default=True,
              help="Comma-separated: threads, cluster, pairwise (stiffness and confusion from coordinates).")
@click.option("--workdir", type=NonEmptyPath(exists=True, file_okay=False), default=None,
              help="Existing folder where each store goes while measured [default: the working directory].")
def analysis(examples: int, layers: int, base_steps: int, factors: str, nulls: int, steps_per_batch: int,
             worker_memory: str, cases: str, workdir: str | None) -> None:
    """Analysis wall time and peak memory of every process on 1x/4x/16x per-example stores (out of core)."""
    from pipelines.bench.analysis import markdown, run

    if workdir is not None:
        check_out(workdir, "--workdir")
    steps = _ints(factors, "--factors")
    chosen = _names(cases)
    if not steps or not chosen or set(chosen) - {"threads", "cluster", "pairwise"}:
        raise click.BadParameter("give at least one factor and cases from threads, cluster, pairwise",
                                 param_hint="--cases")
    kw = dict(examples=examples, layers=layers, nulls=nulls, steps_per_batch=steps_per_batch,
              worker_memory=worker_memory)
    click.echo(f"gradstore bench analysis: {kw}, base_steps={base_steps}, factors={steps}, cases={chosen}")
    rows = run(**kw, base_steps=base_steps, factors=steps, cases=chosen, workdir=workdir, echo=click.echo)
    click.echo("")
    click.echo(markdown(rows, **kw))


@bench.command("record")
@click.option("--models", default="mlp-cg,cnn-bn", show_default=True, help="Comma-separated: mlp-cg, cnn-bn.")
@click.option("--m", "ms", default="1000,4000", show_default=True,
              help="Comma-separated numbers of tracked training examples.")
@click.option("--steps", type=click.IntRange(min=2), default=60, show_default=True,
              help="Training steps of each loop (plain, then recorded).")
@click.option("--every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Capture every N steps (step 0 included).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Training minibatch size.")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Alternating plain/recorded loops per case (the fastest of each kind is reported).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch CPU threads (0: torch's default).")
@click.option("--workdir", type=NonEmptyPath(exists=True, file_okay=False), default=None,
              help="Existing folder on the disk the stores are written to [default: the system's temp folder].")
@data_dir_option
@device_option
def record(models: str, ms: str, steps: int, every: int, batch_size: int, rounds: int, threads: int,
           workdir: str | None, data_dir: str | None, device: str) -> None:
    """Recorder overhead per step of a user's training loop: idle schedule check, capture, background write."""
    from pipelines.bench.record import MODELS, markdown, run

    chosen = _names(models)
    if not chosen or set(chosen) - set(MODELS):
        raise click.BadParameter(f"give models from {', '.join(MODELS)}", param_hint="--models")
    sizes = _ints(ms, "--m")
    if not sizes or min(sizes) < 2:
        raise click.BadParameter("give at least one m, each >= 2", param_hint="--m")
    if every >= steps:
        raise click.BadParameter(f"--every {every} leaves no capture after step 0 in {steps} steps; make it "
                                 f"smaller than --steps", param_hint="--every")
    if workdir is not None:
        check_out(workdir, "--workdir")
    check_device(device)
    click.echo(f"gradstore bench record: models={chosen}, m={sizes}, steps={steps}, every={every}, "
               f"batch={batch_size}, rounds={rounds}, device={device} (each case in its own process)")
    rows = run(models=chosen, ms=sizes, steps=steps, every=every, batch_size=batch_size, rounds=rounds,
               device=device, threads=threads, data_dir=data_dir, workdir=workdir, echo=click.echo)
    click.echo(f"data: {rows[0]['source']}\n")
    click.echo(markdown(rows))
