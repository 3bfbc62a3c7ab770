"""``gradstore layers``: which path each parameter of a model takes through capture.

``--model`` names a built-in model (``pipelines.models``: mlp-cg, cnn-bn, ...) or a
``package.module:callable`` import path; the callable is called with no arguments and must return
an ``nn.Module``. With ``--input-shape`` (built-in models: 1,28,28) the model also runs once on two
random float examples (``--tokens V``: integer token ids in [0, V)), to find modules whose own
forward never runs. **An import path imports and runs that code**, as ``python -c`` would: use it only
for code you trust. ``--supported`` prints the table of layers with a registered rule instead.
Nothing is captured and no data is read.
"""

from __future__ import annotations

import importlib

import click

from gradstore.errors import GradstoreError


def load_model(spec: str):
    """A built-in model by name, or the nn.Module returned by calling ``module:callable`` (user code)."""
    from torch import nn

    from pipelines.models import MODELS, build_model

    if ":" not in spec:
        if spec not in MODELS:
            raise GradstoreError(
                f"unknown model {spec!r}; choose one of {', '.join(sorted(MODELS))}, or give an import "
                "path package.module:callable that returns an nn.Module"
            )
        return build_model(spec)
    module_name, _, attr = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise GradstoreError(f"cannot import {module_name!r} for --model {spec} ({err}); check the module path "
                             "and that it is importable from the current directory or PYTHONPATH") from err
    for part in attr.split("."):
        if not part or not hasattr(target, part):
            raise GradstoreError(f"{module_name!r} has no attribute {attr!r} (from --model {spec}); "
                                 "name a callable that returns an nn.Module")
        target = getattr(target, part)
    model = target() if callable(target) and not isinstance(target, nn.Module) else target
    if not isinstance(model, nn.Module):
        raise GradstoreError(f"--model {spec} gave a {type(model).__name__}, not an nn.Module; name a callable "
                             "that returns the model")
    return model


def _shape(text: str | None):
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise GradstoreError(f"--input-shape must be positive integers separated by commas (e.g. 1,28,28), got {text!r}")
    return shape


@click.command()
@click.option("--model", "spec", metavar="NAME|MODULE:CALLABLE",
              help="A built-in model name, or an import path module:callable returning an nn.Module "
                   "(imports and runs that code).")
@click.option("--input-shape", "input_shape", metavar="D1,D2,...",
              help="Run the model once on 2 random float examples of this shape (without the example axis) "
                   "to find modules whose forward never runs; built-in models use 1,28,28.")
@click.option("--tokens", type=click.IntRange(min=1), metavar="V",
              help="With --input-shape: integer token inputs drawn from [0, V) instead of floats (language models).")
@click.option("--supported", is_flag=True, help="Print the layers that have a capture rule (markdown) and exit.")
def layers(spec: str | None, input_shape: str | None, tokens: int | None, supported: bool) -> None:
    """Print, for each parameter of a model, how capture computes its per-example gradients.

    Paths: "rule <name>" (a layer rule), "per operation: op rule, else fallback (torch.func)" (no
    module rule: each operation consuming the parameter by its op rule, else exactly by the slower
    torch.func fallback), "refused: <why>" (capture would refuse), "frozen" (not captured); tied
    weights list each owner's path. Uses outside the owning module show only when capture runs.
    """
    from gradstore.capture.layers import explain, format_rows, supported_layers_markdown

    if supported:
        click.echo(supported_layers_markdown())
        return
    if not spec:
        raise GradstoreError("give --model NAME or --model module:callable (or --supported for the layer table)")
    if tokens is not None and input_shape is None:
        raise GradstoreError("--tokens needs --input-shape (the shape of one example's token ids, e.g. 64)")
    shape = _shape(input_shape) or ((1, 28, 28) if ":" not in spec else None)
    model = load_model(spec)
    inputs = None
    if shape is not None:
        import torch

        generator = torch.Generator().manual_seed(0)
        if tokens is not None:
            inputs = torch.randint(0, tokens, (2, *shape), generator=generator)
        else:
            inputs = torch.rand(2, *shape, generator=generator)
            dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
            if len(dtypes) == 1:
                inputs = inputs.to(dtypes.pop())
    try:
        rows = explain(model, inputs)
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as err:  # torch asserts shapes too
        if isinstance(err, GradstoreError):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise GradstoreError(f"the model cannot run on random inputs of shape {shape} ({type(err).__name__}: "
                             f"{first}); give --input-shape the shape of one example, or leave it out") from err
    click.echo(format_rows(rows))
