"""``gradstore bench``: benchmarks, one subcommand each (``capture`` here; add others with
``@bench.command()`` in this module or ``bench.add_command(...)``)."""

from __future__ import annotations

import click

from pipelines.cli.options import NonEmptyPath, check_device, check_out, data_dir_option, device_option


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
@data_dir_option
@device_option
def capture(m: int, repeats: int, gram_m: int, vmap_m: int, gram_small: int, threads: int, data_dir: str | None,
            device: str) -> None:
    """Capture engine vs a plain forward+backward pass, torch.func vmap and materialized Gram blocks."""
    from pipelines.bench.capture import markdown, run

    import torch

    check_device(device)
    click.echo(f"gradstore bench capture: m={m}, device={device}, repeats={repeats}, torch threads="
               f"{threads or torch.get_num_threads()} (each case in its own process)")
    rows = run(m=m, device=device, repeats=repeats, data_dir=data_dir, vmap_m=min(vmap_m, m), gram_m=gram_m,
               gram_small=gram_small, threads=threads, echo=click.echo)
    extras = [name for name, key in (("BackPACK", "mlp-backpack"), ("Opacus", "mlp-opacus")) if key in rows]
    click.echo("bench extra: " + (", ".join(extras) + " timed" if extras else "not installed (`make bench-extra`)"))
    click.echo(f"data: {rows['mlp-plain']['source']}\n")
    click.echo(markdown(rows, m=m, gram_m=gram_m, vmap_m=min(vmap_m, m), gram_small=gram_small))


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
@click.option("--examples", type=click.IntRange(min=4), default=1000, show_default=True, help="Tracked examples.")
@click.option("--coords", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Coordinates per example in the scaling stores.")
@click.option("--base-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Steps of the 1x store (the others have 4x and 8x as many).")
@click.option("--nulls", type=click.IntRange(min=1), default=1000, show_default=True, help="Permutations.")
@click.option("--null-steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Steps of the permutation-null case.")
@click.option("--null-coords", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Coordinates of the permutation-null case from grad_coords.")
@click.option("--workdir", type=NonEmptyPath(exists=True, file_okay=False), default=None,
              help="Existing folder where the temporary stores go [default: the system temporary folder].")
def analysis(examples: int, coords: int, base_steps: int, nulls: int, null_steps: int, null_coords: int,
             workdir: str | None) -> None:
    """Analysis wall time and peak memory on 1x/4x/8x stores; permutation-null speed."""
    from pipelines.bench.analysis import markdown, run

    if workdir is not None:
        check_out(workdir, "--workdir")
    kw = dict(examples=examples, coords=coords, base_steps=base_steps, nulls=nulls, null_steps=null_steps,
              null_coords=null_coords)
    click.echo(f"gradstore bench analysis: {kw}")
    rows = run(**kw, workdir=workdir, echo=click.echo)
    click.echo("")
    click.echo(markdown(rows, **kw))
