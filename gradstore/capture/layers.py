"""Which path each parameter of a model takes through capture, and the table of supported layers.

:func:`explain` answers, for a user's model and without running it, how capture will compute each
trainable parameter's per-example gradients:

* ``rule <name>`` -- a registered layer rule (:mod:`gradstore.capture.registry`) covers the module
  that owns the parameter: exact, at the cost of the rule's factors;
* ``per operation: op rule, else fallback (torch.func)`` -- no rule for the owning module's type:
  each operation that consumes the parameter is covered by its op rule (:mod:`gradstore.capture.ops`:
  ``F.linear``, ``matmul``, ``addmm``, ``embedding``, ... -- how ``nn.MultiheadAttention`` runs at
  Linear-rule cost), else exactly by the slower torch.func fallback (a warning at capture says so);
* ``refused: <why>`` -- capture would refuse the model, with that one-line reason; or
* ``frozen`` -- ``requires_grad=False``: not captured.

Refusals known before any input is seen come from the rules: a rule may carry a ``refusal``
attribute, ``refusal(module) -> str | None``, the one line it would raise for this module's
configuration whatever the input (BatchNorm without running statistics, ``max_norm`` on an
EmbeddingBag, ...). Given example inputs, :func:`explain` also runs the model once to find the
modules whose own ``forward`` never runs (their parameters are used functionally elsewhere). What
else depends on the inputs -- a use outside the owning module's forward next to one inside it
(functional weight tying), an input without an example axis -- shows only when capture runs.

:func:`supported_layers` lists the registry (the table of ``docs/layers.md`` is generated from it by
:func:`supported_layers_markdown`; ``python -m gradstore.capture.layers docs/layers.md`` rewrites it).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from gradstore.capture.registry import lookup_rule, registered_types
from gradstore.capture.state import preserved_run
from gradstore.errors import CaptureError

#: the path of a parameter whose owning module has no rule: each operation consuming it goes to that
#: operation's op rule (``F.linear``, ``matmul``, ``addmm``, ``embedding``, ...; gradstore.capture.ops),
#: else to the exact torch.func fallback
FALLBACK = "per operation: op rule, else fallback (torch.func)"
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


def _modules_run(model: nn.Module, inputs) -> set[int]:
    """ids of the modules whose forward runs on ``inputs``: eval mode with autograd on, as capture runs
    (under ``no_grad`` PyTorch's fused transformer paths skip their submodules); modes restored."""
    ran: set[int] = set()
    handles = [module.register_forward_pre_hook(lambda mod, args: ran.add(id(mod))) for module in model.modules()]
    try:
        with preserved_run(model), torch.enable_grad():
            model.eval()
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ran


def explain(model: nn.Module, inputs=None) -> list[Row]:
    """For each parameter of ``model`` (``named_parameters`` order, shared tensors listed once), the
    path capture takes: ``"rule <name>"``, the per-operation path of a module without a rule
    (:data:`FALLBACK`), ``"refused: <why>"`` or ``"frozen"``; a parameter shared by several modules
    (tied weights) lists each owner's path, joined by ``" + "``.

    Without ``inputs`` nothing is run. With ``inputs`` (as ``model`` takes them) the model runs once
    (eval mode, modes and RNG restored) to see which modules' ``forward`` is called:
    a module with a rule whose forward never runs -- ``out_proj`` of ``nn.MultiheadAttention``, whose
    weight the attention uses functionally -- has its parameters captured per operation instead.
    """
    ran = None if inputs is None else _modules_run(model, inputs)
    owners: dict[int, list] = {}
    for path, module in model.named_modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append((path, module))
    rows = []
    for name, param in model.named_parameters():
        mine = owners[id(param)]
        if not param.requires_grad:
            how = FROZEN
        else:
            paths = list(dict.fromkeys(
                FALLBACK if ran is not None and id(module) not in ran else _path_of(module) for _, module in mine))
            refused = [p for p in paths if p.startswith("refused: ")]
            how = refused[0] if refused else " + ".join(paths)
        rows.append(Row(name, tuple(param.shape), ", ".join(p or "<root>" for p, _ in mine),
                        ", ".join(dict.fromkeys(type(m).__qualname__ for _, m in mine)), how))
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
        kind = ("refused" if r.path.startswith("refused: ") else FROZEN if r.path == FROZEN
                else "by a rule" if FALLBACK not in r.path else "per operation")
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
