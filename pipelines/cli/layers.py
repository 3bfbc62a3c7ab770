"""``gradstore layers``: which path each parameter of a model takes through capture.

``--model`` names a built-in model (``pipelines.models``: mlp-cg, cnn-bn, ...) or a
``package.module:callable`` import path; the callable is called with no arguments and must return
an ``nn.Module``. **An import path imports and runs that code**, as ``python -c`` would: use it only
for code you trust. ``--supported`` prints the table of layers with a registered rule instead.
Nothing is captured and no data is read; the model is only built.
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


@click.command()
@click.option("--model", "spec", metavar="NAME|MODULE:CALLABLE",
              help="A built-in model name, or an import path module:callable returning an nn.Module "
                   "(imports and runs that code).")
@click.option("--supported", is_flag=True, help="Print the layers that have a capture rule (markdown) and exit.")
def layers(spec: str | None, supported: bool) -> None:
    """Print, for each parameter of a model, how capture computes its per-example gradients.

    Paths: "rule <name>" (a layer rule), "fallback (torch.func)" (exact, slower), "refused: <why>"
    (capture would refuse), "frozen" (not captured). Uses of a parameter outside its owning module
    (functional weight tying) show only when capture runs.
    """
    from gradstore.capture.layers import explain, format_rows, supported_layers_markdown

    if supported:
        click.echo(supported_layers_markdown())
        return
    if not spec:
        raise GradstoreError("give --model NAME or --model module:callable (or --supported for the layer table)")
    click.echo(format_rows(explain(load_model(spec))))
