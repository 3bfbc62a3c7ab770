"""Which path each parameter of a model takes through capture, and the table of supported layers.

:func:`explain` answers, for a user's model and without running it, how capture will compute each
trainable parameter's per-example gradients:

* ``rule <name>`` -- a registered layer rule (:mod:`gradstore.capture.registry`) covers the module
  that owns the parameter: exact, at the cost of the rule's factors;
* ``fallback (torch.func)`` -- no rule for the owning module's type: exact through the slower
  torch.func fallback (one ``vmap(grad)`` over examples of that module), with a warning at capture;
* ``refused: <why>`` -- capture would refuse the model, with that one-line reason; or
* ``frozen`` -- ``requires_grad=False``: not captured.

Refusals known before any input is seen come from the engine's own planning
(:func:`gradstore.capture.engine.plan`) and from the rules: a rule may carry a ``refusal``
attribute, ``refusal(module) -> str | None``, the one line it would raise for this module's
configuration whatever the input (BatchNorm without running statistics, ``max_norm`` on an
EmbeddingBag, ...). What depends on the inputs -- a parameter used outside its owning module's
forward (functional weight tying), an input without an example axis -- shows only when capture runs.

:func:`supported_layers` lists the registry (the table of ``docs/layers.md`` is generated from it by
:func:`supported_layers_markdown`; ``python -m gradstore.capture.layers docs/layers.md`` rewrites it).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

from torch import nn

from gradstore.capture.engine import plan
from gradstore.capture.registry import lookup_rule, registered_types
from gradstore.errors import CaptureError

FALLBACK = "fallback (torch.func)"
FROZEN = "frozen"


@dataclass(frozen=True)
class Row:
    """One parameter: its name and shape, the owning module's path and type, and its capture path."""

    parameter: str
    shape: tuple
    module: str
    module_type: str
    path: str


def rule_name(rule) -> str:
    """A rule's short name: its module's last component and its function name (``linear.linear_rule``)."""
    return f"{rule.__module__.rsplit('.', 1)[-1]}.{rule.__qualname__}"


def _path_of(module: nn.Module) -> str:
    rule = lookup_rule(type(module))
    if rule is None:
        return FALLBACK
    refusal = getattr(rule, "refusal", None)
    reason = refusal(module) if refusal is not None else None
    return f"refused: {reason}" if reason else f"rule {rule_name(rule)}"


def explain(model: nn.Module) -> list[Row]:
    """For each parameter of ``model`` (``named_parameters`` order, shared tensors listed once), the
    path capture takes: ``"rule <name>"``, ``"fallback (torch.func)"``, ``"refused: <why>"`` or
    ``"frozen"``. Nothing is run; see the module docstring for what only a capture can find."""
    try:
        plan(model)
        refused_model = None
    except CaptureError as err:  # the engine refuses the model as a whole (e.g. tied weights)
        refused_model = str(err)
    owners = {}
    for path, module in model.named_modules():
        for local, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((path, local, module))
    rows = []
    for name, param in model.named_parameters():
        path, _, module = owners[id(param)][0]
        shared = len(owners[id(param)]) > 1
        if not param.requires_grad:
            how = FROZEN
        elif refused_model is not None and shared:
            how = f"refused: {refused_model}"
        else:
            how = _path_of(module)
        rows.append(Row(name, tuple(param.shape), path or "<root>", type(module).__qualname__, how))
    return rows


def format_rows(rows: list[Row]) -> str:
    """``rows`` as an aligned plain-text table (one line per parameter) with a summary line."""
    header = ("parameter", "shape", "module", "type", "path")
    cells = [header] + [(r.parameter, "x".join(map(str, r.shape)) or "scalar", r.module, r.module_type, r.path)
                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(widths))) + "  " + c[-1] for c in cells]
    counts: dict[str, int] = {}
    for r in rows:
        kind = r.path.split(" ", 1)[0].rstrip(":")
        counts[kind] = counts.get(kind, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) + f" ({len(rows)} parameters)")
    return "\n".join(lines)


# ---- the supported-layers table ----------------------------------------------------------------


def _type_name(module_type: type) -> str:
    module = module_type.__module__
    if module.startswith("torch.nn.modules."):
        module = "torch.nn"
    return f"{module}.{module_type.__qualname__}"


def supported_layers() -> list[tuple[str, str, str]]:
    """(layer type, rule, what the rule returns) for every type with a registered rule, by type name."""
    rows = []
    for module_type in registered_types():
        rule = lookup_rule(module_type)
        doc = inspect.getdoc(rule) or ""
        rows.append((_type_name(module_type), rule_name(rule), doc.splitlines()[0] if doc else ""))
    return sorted(rows)


BEGIN = "<!-- BEGIN supported layers: generated by gradstore.capture.layers.supported_layers_markdown -->"
END = "<!-- END supported layers -->"


def supported_layers_markdown() -> str:
    """The markdown table of :func:`supported_layers`, between the BEGIN/END markers."""
    lines = [BEGIN, "", "| layer | rule | factors |", "|---|---|---|"]
    for layer, rule, doc in supported_layers():
        lines.append(f"| `{layer}` | `{rule}` | {doc.replace('|', '&#124;')} |")
    lines += ["", END]
    return "\n".join(lines)


def replace_table(text: str) -> str:
    """``text`` (the contents of docs/layers.md) with its generated table replaced by the current one."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise CaptureError("the file has no generated supported-layers table (BEGIN/END markers); add them")
    return text[:start] + supported_layers_markdown() + text[end + len(END):]


if __name__ == "__main__":  # python -m gradstore.capture.layers docs/layers.md
    target = sys.argv[1]
    with open(target, encoding="utf-8") as f:
        content = f.read()
    with open(target, "w", encoding="utf-8") as f:
        f.write(replace_table(content))
