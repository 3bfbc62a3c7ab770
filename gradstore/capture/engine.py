"""One forward+backward pass, every requested per-example quantity: :func:`capture`.

Flow: find the trainable parameters, the modules that own them (several for tied weights) and their
rules (:func:`plan`); run the model in eval mode under a :class:`~gradstore.capture.hooks.Tap`
(calls of the owning modules) and a :class:`~gradstore.capture.uses.UseTracker` (every operation
consuming a parameter, wherever it runs: parent forwards, ``F.multi_head_attention_forward``,
``loss_fn``); pick each parameter's sources -- module rules, op rules, the torch.func fallbacks --
or refuse (:mod:`gradstore.capture.sources`); differentiate the summed loss with
``torch.autograd.grad`` (which never touches ``.grad``) at the recorded outputs' autograd edges, so
that the hooks see every output gradient and autograd forms no weight gradient (Σ_n g_n comes from
the factors; see :func:`_backward`); merge each parameter's factors over its uses (exact cross
terms) and turn them into the requested quantities (:mod:`gradstore.capture.factors`). With
``verify=True`` the factors are checked against autograd (:mod:`gradstore.capture.verify`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from torch.utils._pytree import tree_map

from gradstore.capture.factors import Dense, merge
from gradstore.capture.hooks import Tap
from gradstore._nest import tensor_leaves
from gradstore.capture.projection import Projection
from gradstore.capture.registry import lookup_rule
from gradstore.capture.sources import assign, module_factors, module_fallback_factors, op_factors
from gradstore.capture.state import preserved_run
from gradstore.capture.uses import UseTracker
from gradstore.errors import CaptureError, GradstoreError


@dataclass
class Plan:
    """Trainable parameters of a model and the modules that own them."""

    params: dict[str, nn.Parameter]  # full name -> parameter (requires_grad only)
    owner: dict[str, tuple[str, str]]  # full name -> (first owning module path, local name)
    modules: dict[str, nn.Module]  # module path -> module owning >= 1 trainable parameter
    owners: dict[str, list] = field(default_factory=dict)  # full name -> every (path, local): tied weights

    @property
    def layer_of(self) -> dict[str, str]:
        return {name: path for name, (path, _) in self.owner.items()}


def plan(model: nn.Module) -> Plan:
    """The trainable parameters of ``model``, named as in ``model.named_parameters()``.

    A parameter shared by several modules (tied weights, ``head.weight = emb.weight``) is one
    parameter, named after its first owner, with every owner in ``owners``.
    """
    params, owner, owners, modules, seen = {}, {}, {}, {}, {}
    for path, module in model.named_modules():
        for local, param in module._parameters.items():
            if param is None or not param.requires_grad:
                continue
            if id(param) in seen:
                owners[seen[id(param)]].append((path, local))
                modules[path] = module
                continue
            name = f"{path}.{local}" if path else local
            seen[id(param)] = name
            params[name], owner[name], owners[name] = param, (path, local), [(path, local)]
            modules[path] = module
    return Plan(params, owner, modules, owners)


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


def first_input(inputs):
    """The tensor whose first axis counts the examples: ``inputs``, its first item, or its first
    tensor value (a dict of keyword inputs such as ``{"input_ids": ..., "attention_mask": ...}``)."""
    if isinstance(inputs, dict):
        return next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    if isinstance(inputs, (tuple, list)):
        return inputs[0] if inputs else None
    return inputs


def _batch_size(inputs, targets) -> int:
    first = first_input(inputs)
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise CaptureError("inputs must be a tensor (or tuple of tensors) with the example axis first, "
                           "or a dict of keyword inputs")
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
    if isinstance(value, (tuple, list, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def _input_error(name: str, inputs, pl: Plan, err: BaseException) -> CaptureError:
    """The one-line error for inputs the model's forward pass refused, with the likely fix."""
    first = first_input(inputs)
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
    """``model(inputs)`` (a tuple is unpacked, a dict passed as keyword arguments); a refused input
    becomes a one-line CaptureError naming ``name`` and describing ``described`` (default
    ``inputs``; e.g. the whole argument when ``inputs`` is a slice of it)."""
    try:
        if isinstance(inputs, dict):
            return model(**inputs)
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
    verify: bool = False,
) -> CaptureResult:
    """Per-example gradient quantities of ``model`` on m examples from ONE forward+backward pass.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode for the pass (BatchNorm uses running statistics); modes, RNG state,
        parameters and ``.grad`` are left as they were. Frozen parameters are skipped; a model
        with no trainable parameter is refused. Its output may be any structure (tensor, tuple,
        dict, Hugging Face ``ModelOutput``); ``loss_fn`` receives it as is.
    loss_fn : callable
        ``loss_fn(outputs, targets)`` returning per-example losses of shape (m,)
        (``reduction='none'``; a sequence model's per-token losses summed or averaged per
        sequence: the example is the sequence); the engine differentiates their sum.
    inputs : Tensor, tuple of Tensor or dict
        Model inputs, example axis first: a tuple is unpacked into ``model(*inputs)``, a dict
        passed as keyword arguments (``model(**inputs)``: ``input_ids``, ``attention_mask``,
        ``position_ids``). The examples are counted on the first tensor.
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
    verify : bool
        Self-check (:mod:`gradstore.capture.verify`): compare each parameter's Σ_n g_n from the
        factors, and one example's g_n, with autograd's; raise CaptureError naming the parameter
        on a mismatch. Costs two more backward passes.

    Returns
    -------
    CaptureResult

    Raises
    ------
    CaptureError
        Inputs the model cannot take, targets ``loss_fn`` cannot take, losses that are not (m,) or
        carry no gradient, a model without trainable parameters, or a use of a trainable parameter
        whose per-example gradients cannot be recovered exactly (:mod:`gradstore.capture.sources`;
        one line each, naming the parameter, the operation and the fix).
    """
    m = _batch_size(inputs, targets)
    pl = plan(model)
    require_trainable(model, pl)
    coords = _check_coords(coords, pl)
    dot_with = _check_dot_with(dot_with, pl)
    if isinstance(projection, int):
        projection = Projection(projection)
    names = list(pl.params)
    rule_paths = {path for path, module in pl.modules.items() if lookup_rule(type(module)) is not None}
    with preserved_run(model), torch.enable_grad():
        model.eval()
        tracker = UseTracker(model, pl.params, pl.owners, rule_paths, m, data=tensor_leaves(inputs))
        with Tap(pl.modules, tracker) as tap:
            with tracker:
                outputs = call_model(model, inputs, pl)
                losses = call_loss(loss_fn, outputs, targets, m)
            tracker.recording = tap.recording = False  # fallbacks re-run modules: record nothing more
            sources = assign(pl, tap, tracker, rule_paths, m)
            needed = {path for src in sources.values() for path, _ in src.modules}
            needed |= {src.fallback[0] for src in sources.values() if src.fallback is not None}
            for path in tap.uses:  # calls of modules no source reads (their parameters used by op rules)
                if path not in needed:
                    tap.release(path)
            result = CaptureResult(m, losses.detach(), _detach(outputs), pl.layer_of)
            needs_total = grad_sum or dot_with == "sum"
            factors: dict[str, object] = {}
            module_cache: dict = {}
            op_cache: dict = {}

            def add(name, factor):
                if factor is not None:
                    factors[name] = factor if name not in factors else merge(factors[name], factor)

            def collect(name: str) -> None:
                """Every use's factor of parameter ``name``, merged."""
                src = sources[name]
                for path, local in src.modules:
                    module = pl.modules[path]
                    for use in tap.uses[path]:
                        if id(use) not in module_cache:
                            module_cache[id(use)] = module_factors(path, module, use, m)
                        add(name, module_cache[id(use)].get(local))
                if src.fallback is not None:
                    path, local = src.fallback
                    add(name, module_fallback_factors(path, pl.modules[path], local, tap.uses[path], m))
                for use in src.ops:
                    if id(use) not in op_cache:
                        op_cache[id(use)] = op_factors(use, m, pl.params, pl.owners, pl.modules)
                    for i, factor in op_cache[id(use)].items():
                        if use.views[i][0] == name:
                            add(name, factor)

            sums: dict[str, torch.Tensor] = {}
            done: set[str] = set()

            def finish(name: str) -> None:
                done.add(name)
                collect(name)
                param = pl.params[name]
                factor = factors.get(name)
                if factor is None:  # parameter did not influence the loss
                    factor = factors[name] = Dense(param.new_zeros((m, *param.shape)))
                total = norms = None
                if needs_total and name in sums:
                    total = sums[name]
                elif needs_total and sq_norms:  # both from one pass where that is cheaper
                    total, norms = factor.sum_and_sq_norms()
                elif needs_total:
                    total = factor.sum()
                if grad_sum:
                    result.grad_sum[name] = total
                vector = total if dot_with == "sum" else (dot_with or {}).get(name)
                _quantities(result, name, param, factor, sq_norms=sq_norms, coords=coords,
                            projection=projection, gram=gram, vector=vector, grads=grads, norms=norms)
                if not verify:
                    del factors[name]

            # Each parameter is finished inside the backward pass as soon as the output gradients of
            # all its uses (module calls and recorded operations) have arrived, and a use's recorded
            # input and output gradient are released once every parameter it serves is finished, as
            # autograd releases its own: the pass holds about one layer's extra tensors, not every
            # layer's (holding them all faulted in 150 MB of fresh pages per pass on the benchmark LM).
            # Deferred to the end: a parameter with a fallback or a batch-constant use, and every
            # parameter under verify.
            uses_of = {name: [u for path, _ in sources[name].modules for u in tap.uses[path]] + list(sources[name].ops)
                       for name in names}
            serves: dict[int, list[str]] = {}  # id(use) -> the parameters whose factors it gives
            release: dict[int, object] = {}  # id(use) -> how to free its recorded tensors
            for name in names:
                for path, _ in sources[name].modules:
                    for u in tap.uses[path]:
                        serves.setdefault(id(u), []).append(name)
                        release[id(u)] = partial(_release_module_use, tap, path, module_cache)
                for u in sources[name].ops:
                    serves.setdefault(id(u), []).append(name)
                    release[id(u)] = partial(_release_op_use, u, op_cache)
            expected = {id(u): [i for i, edge in enumerate(u.edges) if edge is not None]
                        for us in uses_of.values() for u in us}
            early = {name for name in names
                     if not verify and sources[name].fallback is None and uses_of[name]
                     and all(u.batched for u in uses_of[name])}
            complete: set[int] = set()

            def arrived(use) -> None:
                key = id(use)
                if key in complete or key not in expected or any(use.grads[i] is None for i in expected[key]):
                    return
                complete.add(key)
                for name in list(serves.get(key, ())):
                    if name in early and name not in done and all(id(u) in complete for u in uses_of[name]):
                        finish(name)
                        for u in uses_of[name]:
                            left = serves[id(u)]
                            if name in left:
                                left.remove(name)
                                if not left:
                                    release.pop(id(u))()

            tap.on_grad = lambda path, use: arrived(use)
            tracker.on_grad = arrived
            sums.update(_backward(losses.sum(), tap.uses, tracker.uses, sources, pl, names, retain=verify))
            tap.on_grad = tracker.on_grad = None
            for name in names:
                if name not in done:
                    finish(name)
            if verify:
                from gradstore.capture.verify import check

                tap.muted = tracker.muted = True
                check(losses, pl.params, factors, m)
            for quantity in ("sq_norms", "coords", "proj", "gram", "dots", "grad_sum", "grads"):
                values = getattr(result, quantity)  # in the parameters' order, whatever order they came in
                setattr(result, quantity, {name: values[name] for name in names if name in values})
    return result


def _backward(loss, module_uses: dict, op_uses: list, sources: dict, pl: Plan, names: list[str],
              retain: bool = False):
    """Run the backward pass; return Σ_n g_n of the parameters it had to form.

    A parameter with recorded uses gets its Σ_n g_n from its factors (``factor.sum()``, the product
    autograd would do), so autograd is not asked for it and never forms its weight gradient -- a
    grouped per-example convolution then replaces that work instead of adding to it. Only a
    parameter without uses is asked for (its gradient is zero). Every recorded output's tensor hook
    must still fire: it does when autograd runs the node that made the output, i.e. when something
    asked for lies below that node. Only for the outputs with nothing asked below them (typically
    the first layer's, or a batch-constant use's expanded outputs) is autograd asked for the output
    gradient itself, at the output's recorded edge (the value the module returned, even if an
    in-place op rewrote the tensor since), which it then holds until the pass ends (asking for
    every output held every layer's output gradient: +26% peak memory on cnn-bn, m = 4000).
    """
    def uses_of(name):
        src = sources[name]
        out = [u for path, _ in src.modules for u in module_uses[path]] + list(src.ops)
        if src.fallback is not None:
            out += module_uses[src.fallback[0]]
        return out

    records = [u for uses in module_uses.values() for u in uses] + list(op_uses)
    asked = [n for n in names if not uses_of(n)]
    edges = [edge for r in records for edge in r.edges if edge is not None]
    outputs = {edge.node for edge in edges}
    below: dict = {}
    asked_ids = {id(pl.params[n]) for n in asked}
    captured, seen = [], set()
    for edge in edges:
        key = (id(edge.node), edge.output_nr)
        if key not in seen and not _reaches(edge.node, below, outputs, asked_ids):
            seen.add(key)
            captured.append(edge)
    del edges, outputs, below
    for record in records:
        record.edges = [None] * len(record.edges)  # the graph keeps what backward needs
    wanted = [pl.params[n] for n in asked] + captured
    del captured
    grads = torch.autograd.grad(loss, wanted, allow_unused=True, retain_graph=retain) if wanted else []
    return {
        name: torch.zeros_like(pl.params[name]) if g is None else (g.to_dense() if g.is_sparse else g)
        for name, g in zip(asked, grads)
    }


def _release_module_use(tap, path: str, module_cache: dict) -> None:
    """Free the recorded tensors of module ``path``'s calls and the factors made from them."""
    for use in tap.uses[path]:
        module_cache.pop(id(use), None)
    tap.release(path)


def _release_op_use(use, op_cache: dict) -> None:
    """Free the recorded tensors of one operation and the factors made from them."""
    op_cache.pop(id(use), None)
    use.release()


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


def _quantities(result, name, param, factor, *, sq_norms, coords, projection, gram, vector, grads, norms=None):
    with torch.no_grad():
        if sq_norms:
            result.sq_norms[name] = factor.sq_norms() if norms is None else norms
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
    return tree_map(lambda o: o.detach() if isinstance(o, torch.Tensor) else o, outputs)


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
