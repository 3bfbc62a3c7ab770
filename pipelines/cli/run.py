"""``gradstore run NAME``: one of the papers' experiments, end to end (train, capture, analyse, report).

With ``--nproc N`` (N >= 2) the command re-launches itself on N local ranks through torch's own
launcher; started by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, on one machine or
several) every rank trains with DistributedDataParallel and rank 0 writes (``pipelines.distributed``,
docs/scaling.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from gradstore.errors import GradstoreError
from pipelines.cli.options import (
    NonEmptyPath,
    check_device,
    check_out,
    command_line,
    config_option,
    data_dir_option,
    device_option,
)
from pipelines.experiments import EXPERIMENTS


@click.command()
@click.argument("name", type=click.Choice(sorted(EXPERIMENTS)))
@config_option("TOML file overriding the experiment's defaults (the paper's settings).")
@data_dir_option
@device_option
@click.option("--out", type=NonEmptyPath(file_okay=False), default=None, help="Results folder (default runs/NAME).")
@click.option("--quick", is_flag=True, help="A few-minutes variant on 2 CPU cores.")
@click.option("--resume", is_flag=True, help="Continue a killed run from its checkpoint and committed store step.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local processes, launched through torch.distributed.run: every one trains (DDP) on its slice of "
                   "each batch and captures its shard; rank 0 writes. For several machines start "
                   "`torchrun ... -m pipelines.cli run NAME` yourself (docs/scaling.md).")
@click.option("--autocast", type=click.Choice(["bfloat16", "float16"]), default=None,
              help="Capture forward passes under torch.autocast (mixed precision; sums stay float64).")
@click.option("--seeds", type=click.IntRange(min=1, max=1000), default=1, show_default=True,
              help="Run N seeds (seed, seed+1, ...) as parallel processes (at most the CPU count), each in OUT/seed-S; "
                   "the report gives mean ± 95% t-interval and across-seed verdicts.")
def run(name, config_path, data_dir, device, out, quick, resume, no_progress, nproc, autocast, seeds):
    """Run experiment NAME and write its stores, analysis, figures and report.md."""
    from pipelines import distributed
    from pipelines.experiments.common import prepare_out
    from pipelines.experiments.config import load_config
    from pipelines.experiments.runner import check_seeds

    config = load_config(name, quick=quick, path=config_path)  # every setting checked before any work
    ranks = distributed.torchrun_world()
    if ranks > 1 and nproc > 1:
        raise GradstoreError(f"--nproc {nproc} was given to a rank that torchrun started ({ranks} ranks); drop "
                             "--nproc (torchrun's --nproc_per_node and --nnodes set the ranks)")
    check_seeds(seeds, max(nproc, ranks))
    check_device(device)
    out = Path(out or f"runs/{name}{'-quick' if quick else ''}")
    if nproc > 1:  # every check that needs no rank, then the ranks
        distributed.precheck(config, nproc)
        check_out(out)
        prepare_out(out, resume=resume)
        distributed.launch(nproc, _relaunched())
        return
    if ranks > 1:
        with distributed.rank_errors(), distributed.ddp_session(device) as rank:
            if rank == 0:
                _experiment(name, config, out, data_dir, device, resume, quick, no_progress, autocast, seeds, ranks)
            else:
                distributed.follow(device)
        return
    _experiment(name, config, out, data_dir, device, resume, quick, no_progress, autocast, seeds, 1)


def _experiment(name, config, out, data_dir, device, resume, quick, no_progress, autocast, seeds, ranks):
    from pipelines import distributed
    from pipelines.experiments import run_experiment
    from pipelines.experiments.common import Context, prepare_out

    check_out(out)
    out_dir = prepare_out(out, resume=resume)
    command = command_line()
    if ranks > 1:  # the command the user gave (gradstore run --nproc N), or the ranks torchrun started
        nproc = os.environ.get(distributed.NPROC_ENV)
        command += f" --nproc {nproc}" if nproc else f"  # under torchrun, {ranks} ranks"
    ctx = Context(out=out_dir, data_dir=data_dir, device=device, resume=resume, quick=quick, progress=not no_progress,
                  autocast=autocast, command=command, ranks=ranks)
    report = run_experiment(name, config, ctx, **({"seeds": seeds} if seeds > 1 else {}))
    click.echo(f"report: {report}")


def _relaunched() -> list[str]:
    """This command's arguments for the ranks: ``run NAME`` and every option given, except ``--nproc``."""
    ctx = click.get_current_context()
    args = [ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif param.name == "nproc":
            continue
        elif getattr(param, "is_flag", False):
            if value:
                args.append(max(param.opts, key=len))
        elif value is not None and value != param.default:
            args += [max(param.opts, key=len), str(value)]
    return args
