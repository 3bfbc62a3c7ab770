"""``gradstore demo``: train the Coherent Gradients MLP on the bundled subset at several noise levels."""

from __future__ import annotations

import click
from tqdm import tqdm

from pipelines.cli.options import data_dir_option, device_option


@click.command()
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="SGD steps per noise level.")
@click.option(
    "--noise",
    "noise_levels",
    type=click.FloatRange(0.0, 1.0),
    multiple=True,
    default=(0.0, 0.5, 1.0),
    show_default=True,
    help="Label-noise fraction; repeat for several.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@data_dir_option
@device_option
def demo(steps: int, noise_levels: tuple[float, ...], seed: int, data_dir: str | None, device: str) -> None:
    """Train the 784-2048-10 MLP (SGD, lr 0.1, batch 100) at each noise level; print train/test accuracy."""
    from pipelines.data import load_mnist
    from pipelines.train import TrainConfig, TrainData, train

    mnist = load_mnist(data_dir)
    click.echo(f"data: {mnist.source} ({len(mnist.train_labels)} train, {len(mnist.test_labels)} test)")
    rows = []
    for noise in noise_levels:
        config = TrainConfig(model="mlp-cg", noise=noise, seed=seed, steps=steps, device=device)
        config.validate()
        data = TrainData.from_mnist(mnist, noise=noise, seed=seed, device=device)
        with tqdm(total=steps, desc=f"noise {noise:.0%}", unit="step", leave=False) as bar:
            result = train(config, data, progress=lambda _step: bar.update(1))
        final = result.final
        rows.append((noise, data.noise.proper_accuracy, final["train_acc"], final["pristine_acc"],
                     final["corrupt_acc"], final["test_acc"]))
    click.echo(f"\n{'noise':>6} {'proper acc':>10} {'train acc':>9} {'pristine':>8} {'corrupt':>8} {'test acc':>8}")
    for noise, proper, tr, pr, co, te in rows:
        click.echo(f"{noise:>6.0%} {proper:>10.3f} {tr:>9.3f} {pr:>8.3f} {co:>8.3f} {te:>8.3f}")
