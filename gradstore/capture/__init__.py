"""Exact per-example gradient statistics from one forward+backward pass (hooks + per-layer rules).

Public API
----------
capture                 every requested quantity from one pass -> :class:`CaptureResult`
per_example_sq_norms    parameter -> (m,) ||g_n||²
per_example_grads       reference path: parameter -> (m, *shape), or (m, n_coords) at coords
coherence_moments       streamed m, Σ g, Σ ||g||² -> :class:`Moments`
Projection              seeded Kronecker-structured random projection
bn_priming, prime_batchnorm   BatchNorm running-statistics priming
register_rule, lookup_rule    the extension point for new layer types (see ``registry``)
register_op_rule        the extension point for operations consuming parameters (see ``ops``)
Dense, Outer, OneHot    the factor forms a rule returns; Sum, merge: several uses of one parameter
"""

from gradstore.capture import rules  # noqa: F401  (registers the built-in rules)
from gradstore.capture.engine import CaptureResult, capture, per_example_grads, per_example_sq_norms, plan
from gradstore.capture.factors import Dense, OneHot, Outer, Sum, merge
from gradstore.capture.fallback import CaptureFallbackWarning
from gradstore.capture.moments import Moments, coherence_moments
from gradstore.capture.ops import lookup_op_rule, register_op_rule
from gradstore.capture.projection import Projection
from gradstore.capture.registry import lookup_rule, register_rule, registered_types, unregister_rule
from gradstore.capture.state import bn_priming, preserved_run, prime_batchnorm

__all__ = [
    "CaptureFallbackWarning",
    "CaptureResult",
    "Dense",
    "Moments",
    "OneHot",
    "Outer",
    "Projection",
    "Sum",
    "bn_priming",
    "capture",
    "coherence_moments",
    "lookup_op_rule",
    "lookup_rule",
    "merge",
    "per_example_grads",
    "per_example_sq_norms",
    "plan",
    "preserved_run",
    "prime_batchnorm",
    "register_op_rule",
    "register_rule",
    "registered_types",
    "unregister_rule",
]
