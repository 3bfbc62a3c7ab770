"""One forward+backward pass, every requested per-example quantity: :func:`capture`.

Flow: find the modules owning trainable parameters and their rules (:func:`plan`); run the model
in eval mode under a :class:`~gradstore.capture.hooks.Tap`, with every use of a trainable parameter
checked to be one the engine accounts for (:class:`~gradstore.capture.uses.UseCheck`);
differentiate the summed loss with ``torch.autograd.grad`` (which never touches ``.grad``) with
respect to the modules' outputs, so that the hooks see every output gradient and autograd forms no
weight gradient (Σ_n g_n comes from the factors; see :func:`_backward`); turn each module's recorded
uses into factors (its rule, or the torch.func fallback) and each factor into the requested
quantities (:mod:`gradstore.capture.factors`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from gradstore.capture.factors import Dense
from gradstore.capture.fallback import fallback_rule, warn_fallback
from gradstore.capture.hooks import Tap
from gradstore.capture.projection import Projection
from gradstore.capture.registry import lookup_rule
from gradstore.capture.state import preserved_run
from gradstore.capture.uses import UseCheck
from gradstore.errors import CaptureError, GradstoreError


#: check every use of a trainable parameter during the capture forward (off only to time the check)
CHECK_USES = True


@dataclass
class Plan:
    """Trainable parameters of a model and the modules that own them."""

    params: dict[str, nn.Parameter]  # full name -> parameter (requires_grad only)
    owner: dict[str, tuple[str, str]]  # full name -> (module path, local name)
    modules: dict[str, nn.Module]  # module path -> module owning >= 1 trainable parameter

    @property
    def layer_of(self) -> dict[str, str]:
        return {name: path for name, (path, _) in self.owner.items()}


def plan(model: nn.Module) -> Plan:
    """The trainable parameters of ``model``, named as in ``model.named_parameters()``."""
    params, owner, modules, seen = {}, {}, {}, {}
    for path, module in model.named_modules():
        for local, param in module._parameters.items():
            if param is None:
                continue
            name = f"{path}.{local}" if path else local
            if id(param) in seen:
                raise CaptureError(
                    f"parameter {name!r} is the same tensor as {seen[id(param)]!r} (tied weights); "
                    "capture needs each parameter owned by one module"
                )
            seen[id(param)] = name
            if param.requires_grad:
                params[name], owner[name] = param, (path, local)
                modules[path] = module
    return Plan(params, owner, modules)


@dataclass
class CaptureResult:
    """Per-example quantities from one pass over m examples; dicts are keyed by parameter name.

    Attributes
    ----------
    losses : Tensor (m,)           per-example losses (detached)
    outputs : Tensor               model outputs (detached)
    sq_norms : {param: (m,)}       ||g_n||²
    coords : {param: (m, n_c)}     g_n at the requested flat coordinates
    proj : {param: (m, k)}         random projections of g_n
    gram : {param: (m, m)}         g_n · g_m
    dots : {param: (m,)}           g_n · v (v = Σ_j g_j for ``dot_with="sum"``)
    grad_sum : {param: tensor}     Σ_n g_n
    grads : {param: (m, *shape)}   materialized g_n (reference path only)
    layer_of : {param: layer}      owning module's qualified name
    """

    m: int
    losses: torch.Tensor
    outputs: object
    layer_of: dict[str, str]
    sq_norms: dict = field(default_factory=dict)
    coords: dict = field(default_factory=dict)
    proj: dict = field(default_factory=dict)
    gram: dict = field(default_factory=dict)
    dots: dict = field(default_factory=dict)
    grad_sum: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)

    def by_layer(self, quantity: str) -> dict[str, torch.Tensor]:
        """Sum a per-parameter quantity (``sq_norms``, ``gram``, ``dots``) over each layer's parameters.

        Parameter blocks are disjoint, so ||g||², g·g' and g·v add across a layer's parameters.
        """
        values = self._summable(quantity)
        out: dict[str, torch.Tensor] = {}
        for name, value in values.items():
            layer = self.layer_of[name]
            out[layer] = value if layer not in out else out[layer] + value
        return out

    def model_total(self, quantity: str) -> torch.Tensor:
        """Sum a per-parameter quantity over the whole model (every layer)."""
        values = list(self._summable(quantity).values())
        if not values:
            raise CaptureError(f"{quantity!r} was not captured; request it in capture(...)")
        return torch.stack(values).sum(0)

    def _summable(self, quantity: str) -> dict:
        if quantity not in ("sq_norms", "gram", "dots"):
            raise CaptureError(f"only sq_norms, gram and dots add over parameters, not {quantity!r}")
        return getattr(self, quantity)


def _batch_size(inputs, targets) -> int:
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise CaptureError("inputs must be a tensor (or tuple of tensors) with the example axis first")
    m = first.shape[0]
    if m == 0:
        raise CaptureError("capture needs at least one example; got an empty batch")
    if isinstance(targets, torch.Tensor) and (targets.dim() == 0 or targets.shape[0] != m):
        raise CaptureError(f"targets must have {m} rows like inputs, got shape {tuple(targets.shape)}")
    return m


def require_trainable(model: nn.Module, pl: Plan) -> None:
    """Refuse, in one line, a model whose plan has no trainable parameter (nothing to capture)."""
    if not pl.params:
        raise CaptureError(
            f"the model ({type(model).__name__}) has no trainable parameters (requires_grad=True); unfreeze "
            "the parameters to observe (param.requires_grad_(True)) before capturing"
        )


# errors a forward pass or a loss raises on inputs or targets of the wrong shape, dtype or range
_CALL_ERRORS = (RuntimeError, TypeError, ValueError, IndexError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(":. ")


def _described(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def _input_error(name: str, inputs, pl: Plan, err: BaseException) -> CaptureError:
    """The one-line error for inputs the model's forward pass refused, with the likely fix."""
    first = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
    dtypes = {p.dtype for p in pl.params.values() if p.is_floating_point()}
    want = dtypes.pop() if len(dtypes) == 1 else None
    if isinstance(first, torch.Tensor) and want is not None and first.dtype != want:
        fix = f"the model's parameters are {want}: pass {name}.to({want})"
        if not first.is_floating_point():
            fix += " if the model takes floating-point inputs"
    else:
        fix = f"give {name} the shape and dtype the model takes, example axis first"
    return CaptureError(f"the model cannot run on {name} ({_described(first)}): {_first_line(err)}; {fix}")


def _loss_error(name: str, outputs, targets, err: BaseException) -> CaptureError:
    """The one-line error for targets (or a loss_fn) that loss_fn(outputs, targets) refused."""
    classes = outputs.shape[1] if isinstance(outputs, torch.Tensor) and outputs.dim() == 2 else "n_classes"
    return CaptureError(
        f"loss_fn(outputs, {name}) failed on outputs ({_described(outputs)}) and {name} ({_described(targets)}): "
        f"{_first_line(err)}; give {name} in the form loss_fn takes (for cross entropy: a 1-d integer "
        f"tensor of class indices in [0, {classes}))"
    )


def _check_losses(losses, m: int) -> None:
    """loss_fn must return (m,) per-example losses that autograd can differentiate."""
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (m,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise CaptureError(
            f"loss_fn must return one loss per example, shape ({m},) for {m} examples, got {shape}; "
            "use reduction='none'"
        )
    if not losses.requires_grad:
        raise CaptureError(
            "loss_fn returned losses that do not require grad (detached, or computed under no_grad); "
            "return losses computed from the model's outputs, without .detach()"
        )


def call_model(model: nn.Module, inputs, pl: Plan, name: str = "inputs", *, described=None):
    """``model(inputs)`` (a tuple is unpacked); a refused input becomes a one-line CaptureError
    naming ``name`` and describing ``described`` (default ``inputs``; e.g. the whole argument when
    ``inputs`` is a slice of it)."""
    try:
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    except _CALL_ERRORS as err:
        if isinstance(err, (GradstoreError, torch.OutOfMemoryError)):
            raise
        raise _input_error(name, inputs if described is None else described, pl, err) from err


def call_loss(loss_fn, outputs, targets, m: int, name: str = "targets"):
    """``loss_fn(outputs, targets)``, checked; refused targets become a one-line CaptureError."""
    try:
        losses = loss_fn(outputs, targets)
    except _CALL_ERRORS as err:
        if isinstance(err, (GradstoreError, torch.OutOfMemoryError)):
            raise
        raise _loss_error(name, outputs, targets, err) from err
    _check_losses(losses, m)
    return losses


def _check_coords(coords, pl: Plan) -> dict[str, torch.Tensor]:
    checked = {}
    for name, index in (coords or {}).items():
        if name not in pl.params:
            raise CaptureError(f"coords given for {name!r}, which is not a trainable parameter of the model")
        param = pl.params[name]
        index = torch.as_tensor(index, dtype=torch.long, device=param.device).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= param.numel()):
            raise CaptureError(f"coords of {name!r} must lie in [0, {param.numel()}), the flat index range")
        checked[name] = index
    return checked


def _check_dot_with(dot_with, pl: Plan):
    if dot_with is None or isinstance(dot_with, str):
        if dot_with not in (None, "sum"):
            raise CaptureError(f"dot_with must be None, 'sum' or a dict of tensors, got {dot_with!r}")
        return dot_with
    for name, vector in dot_with.items():
        if name not in pl.params or tuple(vector.shape) != tuple(pl.params[name].shape):
            raise CaptureError(f"dot_with[{name!r}] must be a tensor shaped like that trainable parameter")
    return dot_with


def _module_factors(path, module, uses, locals_, m):
    """Factors of ``module``'s trainable parameters (local names ``locals_``), merged over uses."""
    rule = lookup_rule(type(module))
    if rule is None:
        warn_fallback(path, module)
    merged: dict = {}
    for use in uses:
        if use.grad_output is None:  # this use does not reach the loss: contributes nothing
            continue
        if use.grad_output.shape[0] != m:
            raise CaptureError(
                f"module {path!r} saw a batch of {use.grad_output.shape[0]} rows, not the {m} examples; "
                "every layer with parameters needs the example axis first"
            )
        if rule is None:
            factors = fallback_rule(module, {k: module._parameters[k] for k in locals_}, use)
        else:
            factors = rule(module, use.inputs, use.grad_output)
        for local in locals_:
            if local in factors:
                merged[local] = factors[local] if local not in merged else merged[local].merge(factors[local])
    return merged


def capture(
    model: nn.Module,
    loss_fn,
    inputs,
    targets,
    *,
    sq_norms: bool = True,
    coords: dict | None = None,
    projection: Projection | int | None = None,
    gram: bool = False,
    dot_with=None,
    grad_sum: bool = False,
    grads: bool = False,
) -> CaptureResult:
    """Per-example gradient quantities of ``model`` on m examples from ONE forward+backward pass.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode for the pass (BatchNorm uses running statistics); modes, RNG state,
        parameters and ``.grad`` are left as they were. Frozen parameters are skipped; a model
        with no trainable parameter is refused.
    loss_fn : callable
        ``loss_fn(outputs, targets)`` returning per-example losses of shape (m,)
        (``reduction='none'``); the engine differentiates their sum.
    inputs : Tensor or tuple of Tensor
        Model inputs, example axis first (a tuple is unpacked into ``model(*inputs)``).
    targets : object
        Passed to ``loss_fn``.
    sq_norms : bool
        ||g_n||² per parameter.
    coords : dict, optional
        Parameter name -> flat coordinate indices; gradient values there.
    projection : Projection or int, optional
        Seeded random projection (an int k means ``Projection(k)``).
    gram : bool
        The (m, m) Gram block g_n · g_m per parameter.
    dot_with : None, "sum" or dict
        Vectors v per parameter for g_n · v; ``"sum"`` uses v = Σ_j g_j from this same pass.
    grad_sum : bool
        Σ_n g_n per parameter.
    grads : bool
        Materialize g_n, (m, *shape) per parameter: the slow reference path.

    Returns
    -------
    CaptureResult

    Raises
    ------
    CaptureError
        Inputs the model cannot take, targets ``loss_fn`` cannot take, losses that are not (m,) or
        carry no gradient, a model without trainable parameters, or a trainable parameter used
        outside the forward of the module that owns it (functional weight tying, a child's weight
        used by a parent, a parameter in ``loss_fn``; :mod:`gradstore.capture.uses`), which the
        engine would otherwise miss (one line each).
    """
    m = _batch_size(inputs, targets)
    pl = plan(model)
    require_trainable(model, pl)
    coords = _check_coords(coords, pl)
    dot_with = _check_dot_with(dot_with, pl)
    if isinstance(projection, int):
        projection = Projection(projection)
    names = list(pl.params)
    with preserved_run(model), torch.enable_grad(), Tap(pl.modules) as tap:
        model.eval()
        # every use of a trainable parameter in the model's forward and in loss_fn is one the engine
        # accounts for (its owner's rule or the fallback), or capture refuses here (gradstore.capture.uses)
        fallback = {path for path, module in pl.modules.items() if lookup_rule(type(module)) is None}
        with UseCheck(model, pl.params, pl.owner, fallback) if CHECK_USES else nullcontext():
            outputs = call_model(model, inputs, pl)
            losses = call_loss(loss_fn, outputs, targets, m)
        result = CaptureResult(m, losses.detach(), _detach(outputs), pl.layer_of)
        by_module: dict[str, list[str]] = {}
        for name in names:
            by_module.setdefault(pl.owner[name][0], []).append(name)
        needs_total = grad_sum or dot_with == "sum"
        sums: dict[str, torch.Tensor] = {}
        finished: set[str] = set()

        def finish(path: str) -> None:
            """Factors of one module -> its parameters' quantities; its recorded uses are released."""
            finished.add(path)
            module_names = by_module[path]
            locals_ = [pl.owner[n][1] for n in module_names]
            factors = _module_factors(path, pl.modules[path], tap.uses[path], locals_, m)
            tap.release(path)
            for name in module_names:
                param = pl.params[name]
                factor = factors.get(pl.owner[name][1])
                if factor is None:  # parameter did not influence the loss
                    factor = Dense(param.new_zeros((m, *param.shape)))
                total = None
                if needs_total:
                    total = sums[name] if name in sums else factor.sum()
                if grad_sum:
                    result.grad_sum[name] = total
                vector = total if dot_with == "sum" else (dot_with or {}).get(name)
                _quantities(result, name, param, factor, sq_norms=sq_norms, coords=coords,
                            projection=projection, gram=gram, vector=vector, grads=grads)

        # A module used once and covered by a rule is finished inside the backward pass, as soon as
        # its output gradient arrives; its input and output gradient are released then, as autograd
        # releases its own, so the pass holds about one layer's extra tensors, not every layer's.
        # (Needing Σ g from autograd -- an output rewritten in place -- or several uses defers it.)
        early = {
            path for path, uses in tap.uses.items()
            if len(uses) == 1 and lookup_rule(type(pl.modules[path])) is not None
            and (uses[0].intact or not needs_total)
        }
        tap.on_grad = lambda path: finish(path) if path in early and path not in finished else None
        sums.update(_backward(losses.sum(), tap, pl, names))
        tap.recording, tap.on_grad = False, None
        for path in by_module:
            if path not in finished:
                finish(path)
        for quantity in ("sq_norms", "coords", "proj", "gram", "dots", "grad_sum", "grads"):
            values = getattr(result, quantity)  # in the parameters' order, whatever order they came in
            setattr(result, quantity, {name: values[name] for name in names if name in values})
    return result


def _backward(loss, tap: Tap, pl: Plan, names: list[str]) -> dict[str, torch.Tensor]:
    """Run the backward pass; return Σ_n g_n of the parameters it had to form.

    A module whose every use returned an output that is still intact (no in-place op rewrote it)
    gets its Σ_n g_n from its factors (``factor.sum()``, the product autograd would do), so autograd
    is not asked for its parameters and never forms their weight gradients -- a grouped per-example
    convolution then replaces that work instead of adding to it. Other modules' parameters are
    asked for. Every recorded output's tensor hook must still fire: it does when autograd runs the
    node that made the output, i.e. when something asked for lies below that node. Only for the
    outputs with nothing asked below them (typically the first layer's) is autograd asked for the
    output gradient itself, which it then holds until the pass ends (asking for every output held
    every layer's output gradient: +26% peak memory on cnn-bn, m = 4000).
    """
    via_factors = {path for path, uses in tap.uses.items() if uses and all(u.intact for u in uses)}
    asked = [n for n in names if pl.owner[n][0] not in via_factors]
    outputs = {u.output.grad_fn for uses in tap.uses.values() for u in uses
               if u.output is not None and u.output.grad_fn is not None}
    below: dict = {}
    asked_ids = {id(pl.params[n]) for n in asked}
    frontier = [path for path in via_factors
                if any(u.output.grad_fn is None or not _reaches(u.output.grad_fn, below, outputs, asked_ids)
                       for u in tap.uses[path])]
    captured = [u.output for path in frontier for u in tap.uses[path]]
    for uses in tap.uses.values():
        for use in uses:
            use.output = None  # the graph keeps what backward needs
    wanted = [pl.params[n] for n in asked] + captured
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else []
    return {
        name: torch.zeros_like(pl.params[name]) if g is None else (g.to_dense() if g.is_sparse else g)
        for name, g in zip(asked, grads)
    }


def _reaches(node, below: dict, outputs: set, asked_ids: set) -> bool:
    """Whether a recorded output's node, or an asked parameter, lies strictly below ``node``.

    ``below`` memoizes the answer per node across calls (iterative: deep graphs need no recursion).
    """
    def hit(child):
        return child in outputs or id(getattr(child, "variable", None)) in asked_ids or below.get(child, False)

    stack = [(node, False)]
    while stack:
        current, expanded = stack.pop()
        if current in below:
            continue
        children = [c for c, _ in current.next_functions if c is not None]
        if expanded:
            below[current] = any(hit(c) for c in children)
        else:
            stack.append((current, True))
            stack.extend((c, False) for c in children if c not in below)
    return below[node]


def _quantities(result, name, param, factor, *, sq_norms, coords, projection, gram, vector, grads):
    with torch.no_grad():
        if sq_norms:
            result.sq_norms[name] = factor.sq_norms()
        if name in coords:
            result.coords[name] = factor.coords(coords[name])
        if projection is not None:
            u, v = projection.matrices(name, param.shape, device=param.device, dtype=param.dtype)
            result.proj[name] = factor.project(u, v)
        if gram:
            result.gram[name] = factor.gram()
        if vector is not None:
            result.dots[name] = factor.dots(vector)
        if grads:
            result.grads[name] = factor.materialize()


def _detach(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_detach(o) for o in outputs)
    return outputs


def per_example_sq_norms(model, loss_fn, inputs, targets) -> dict[str, torch.Tensor]:
    """Parameter name -> (m,) exact ||g_n||², without materializing g_n."""
    return capture(model, loss_fn, inputs, targets, sq_norms=True).sq_norms


def per_example_grads(model, loss_fn, inputs, targets, coords=None) -> dict[str, torch.Tensor]:
    """The reference path: parameter name -> (m, *shape) per-example gradients.

    With ``coords`` (parameter name -> flat indices) only those parameters and coordinates are
    returned, (m, n_coords) each, computed without materializing g_n.
    """
    if coords is not None:
        return capture(model, loss_fn, inputs, targets, sq_norms=False, coords=coords).coords
    return capture(model, loss_fn, inputs, targets, sq_norms=False, grads=True).grads
