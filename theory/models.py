"""Small symbolic models for the loss-change statements: a tanh network and a linear regression."""

from __future__ import annotations

import sympy as sp


def tiny_network(n_examples: int = 2, width: int = 2):
    """Per-example squared losses of f(x) = Σ_h c_h·tanh(a_h·x + b_h) on symbolic data (x_i, y_i).

    Returns
    -------
    params : list of sympy.Symbol
        The 3·width parameters (a_h, b_h, c_h).
    losses : list of sympy.Expr
        ℓ_i(w) = ½ (f(x_i) − y_i)², one per example.
    """
    a = sp.symbols(f"a_0:{width}", real=True)
    b = sp.symbols(f"b_0:{width}", real=True)
    c = sp.symbols(f"c_0:{width}", real=True)
    xs = sp.symbols(f"xin_0:{n_examples}", real=True)
    ys = sp.symbols(f"y_0:{n_examples}", real=True)
    losses = [
        sp.Rational(1, 2) * (sum(c[h] * sp.tanh(a[h] * x + b[h]) for h in range(width)) - y) ** 2
        for x, y in zip(xs, ys)
    ]
    return [*a, *b, *c], losses


def step_derivative(loss, params, direction, order: int = 1):
    """d^order/dη^order of loss(w − η·direction) at η = 0."""
    eta = sp.Symbol("eta", real=True)
    moved = loss.subs({p: p - eta * d for p, d in zip(params, direction)}, simultaneous=True)
    return sp.diff(moved, eta, order).subs(eta, 0)


def expected_cross_step_change(params, losses, grads):
    """d/dη E_{z,z'}[ℓ_z(w − η g_z')] at η = 0, z and z' independent and uniform over the examples."""
    m = len(losses)
    total = sum(step_derivative(loss, params, g) for loss in losses for g in grads)
    return total / m**2


def linear_regression(inputs):
    """Linear regression ℓ_i(w) = ½(w·x_i − y_i)² on the given inputs with symbolic targets y_i.

    Parameters
    ----------
    inputs : sequence of sequences of numbers
        The m input vectors x_i, all of one dimension n.

    Returns
    -------
    params : list of sympy.Symbol
        The weights w_0..w_{n−1}.
    losses : list of sympy.Expr
        One loss per example.
    """
    n = len(inputs[0])
    w = sp.symbols(f"w_0:{n}", real=True)
    ys = sp.symbols(f"t_0:{len(inputs)}", real=True)
    losses = [
        sp.Rational(1, 2) * (sum(wj * sp.sympify(xj) for wj, xj in zip(w, x)) - y) ** 2
        for x, y in zip(inputs, ys)
    ]
    return list(w), losses
