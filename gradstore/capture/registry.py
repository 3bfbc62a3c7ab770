"""The rule registry: which per-layer rule computes the per-example gradient factors of a module.

This is the stable extension point for custom modules. A **rule** is a function

    rule(module, inputs, grad_output) -> dict[str, Factor]

called once per use of ``module`` in a forward pass, after the backward pass. ``inputs`` is the
tuple of positional tensors the module was called with (detached), ``grad_output`` the gradient of
the *summed* loss with respect to the module's output, with the example axis first. It returns,
for each of the module's own parameters (local names such as ``"weight"``), a factor
(:class:`gradstore.capture.factors.Dense` or :class:`gradstore.capture.factors.Outer`) describing
that parameter's per-example gradients. Quantities (norms, Gram blocks, projections, ...) are
computed from factors elsewhere, so a rule never deals with them.

A rule registered with ``kwargs=True`` is called as ``rule(module, inputs, grad_output, kwargs)``
with the keyword arguments of the call (tensors detached); the 3-argument form stays the default.

For a module whose output is not a single tensor (a tuple, list, dict or ``ModelOutput``), the
output is flattened with ``torch.utils._pytree.tree_flatten`` and ``grad_output`` is a TUPLE with
one entry per tensor leaf in flatten order: the gradient of the summed loss with respect to that
leaf, or None where no gradient reached it. ``inputs`` are the positional arguments, tensors
detached (nested tuples such as an LSTM's ``(h0, c0)`` too; a ``PackedSequence`` passed as is),
examples first (inside a ``batch_first=False`` transformer the engine moves them first; an RNN's
own ``batch_first=False`` is the rule's to handle).

A rule covers the uses of its module's parameters inside that module's own ``forward`` (with no
child module running); any other use of them is captured per operation (:mod:`gradstore.capture.ops`).

Lookup policy (:func:`lookup_rule`): the rule registered for the module's exact type wins;
otherwise the type's method resolution order is walked and the first registered base class's rule
is used (so a subclass of ``nn.Linear`` that does not change the math needs nothing). A module
with parameters and no rule goes to the torch.func fallback with a one-time warning.

Example
-------
>>> from gradstore.capture import register_rule, Dense
>>> @register_rule(MyScale)                                   # doctest: +SKIP
... def my_scale_rule(module, inputs, grad_output):
...     (x,) = inputs
...     return {"scale": Dense((x * grad_output).flatten(1).sum(1, keepdim=True))}
"""

from __future__ import annotations

from collections.abc import Callable

from gradstore.errors import CaptureError

Rule = Callable  # (module, inputs: tuple[Tensor, ...], grad_output: Tensor) -> dict[str, Factor]

_RULES: dict[type, Rule] = {}
_WANTS_KWARGS: set[int] = set()
#: rule modules for another package's layers, imported once that package is (see :func:`register_lazy`)
_LAZY: dict[str, str] = {}


def register_lazy(package: str, rules_module: str) -> None:
    """Register the rules of ``rules_module`` (which imports ``package``) without importing either.

    A module of ``package`` can only be in a model once ``package`` was imported, so the rules are
    imported the first time a lookup misses, or a rule is registered or removed, while ``package``
    is in ``sys.modules`` (and when :func:`registered_types` lists every rule): importing gradstore
    never imports an optional package (transformers takes 0.7 s to import), and a user's own rule
    for one of its types needs ``overwrite=True`` as if the rule had been there all along.
    """
    _LAZY[package] = rules_module


def _load_lazy(*, installed: bool = False) -> None:
    """Import the lazy rule modules whose package is imported (``installed``: or importable)."""
    import importlib
    import importlib.util
    import sys

    for package, rules_module in list(_LAZY.items()):
        if package in sys.modules or (installed and importlib.util.find_spec(package) is not None):
            del _LAZY[package]
            importlib.import_module(rules_module)


def wants_kwargs(rule: Rule) -> bool:
    """Whether ``rule`` was registered with ``kwargs=True`` (called with the call's keyword arguments)."""
    return id(rule) in _WANTS_KWARGS


def register_rule(*module_types: type, overwrite: bool = False, kwargs: bool = False) -> Callable[[Rule], Rule]:
    """Decorator registering ``rule`` for each of ``module_types``.

    Parameters
    ----------
    *module_types : type
        ``nn.Module`` subclasses the rule handles.
    overwrite : bool, default False
        Replace an existing registration instead of failing.
    kwargs : bool, default False
        Call the rule as ``rule(module, inputs, grad_output, kwargs)``.

    Raises
    ------
    CaptureError
        If a type already has a rule and ``overwrite`` is False, or no type is given.
    """
    if not module_types:
        raise CaptureError("register_rule needs at least one module type, e.g. @register_rule(nn.Linear)")

    def decorate(rule: Rule) -> Rule:
        _load_lazy()  # the rules of imported packages first, so that they never replace this one
        for module_type in module_types:
            if not isinstance(module_type, type):
                raise CaptureError(f"register_rule expects module classes, got {module_type!r}")
            if module_type in _RULES and not overwrite:
                raise CaptureError(
                    f"a capture rule is already registered for {module_type.__qualname__}; "
                    "pass overwrite=True to replace it"
                )
        for module_type in module_types:
            _RULES[module_type] = rule
        if kwargs:
            _WANTS_KWARGS.add(id(rule))
        return rule

    return decorate


def unregister_rule(module_type: type) -> None:
    """Remove the rule registered for exactly ``module_type`` (no error if there is none)."""
    _load_lazy()  # else a lazy rule loaded later would come back
    _RULES.pop(module_type, None)


def lookup_rule(module_type: type) -> Rule | None:
    """The rule for ``module_type``: exact type first, then the first registered base in its MRO."""
    rule = _RULES.get(module_type)
    if rule is not None:
        return rule
    for base in module_type.__mro__[1:]:
        if base in _RULES:
            return _RULES[base]
    if _LAZY:
        before = len(_RULES)
        _load_lazy()
        if len(_RULES) != before:
            return lookup_rule(module_type)
    return None


def registered_types() -> tuple[type, ...]:
    """The module types that have a rule of their own, in registration order (the rules of every
    installed optional package included)."""
    _load_lazy(installed=True)
    return tuple(_RULES)
