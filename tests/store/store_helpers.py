"""Helpers of the store tests: a small layout and deterministic per-step data (numpy only)."""

import numpy as np

from gradstore.store import RunLayout


def small_layout(**changes) -> RunLayout:
    """Two layers, 7 train + 3 test examples, 5 coordinates, 4-dim projections, Gram blocks."""
    base = dict(
        layers=("fc1", "fc2"),
        params=(("fc1.weight", (4, 3), "fc1"), ("fc1.bias", (4,), "fc1"), ("fc2.weight", (2, 4), "fc2")),
        example_ids=np.arange(10, dtype=np.int64) * 3 + 100,
        n_train=7,
        true_label=np.arange(10) % 2,
        train_label=np.array([0, 1, 0, 0, 0, 1, 0, 1, 0, 1]),
        coord_layer=("fc1", "fc1", "fc2", "fc2", "fc2"),
        coord_param=("fc1.weight", "fc1.bias", "fc2.weight", "fc2.weight", "fc2.weight"),
        coord_index=np.array([0, 3, 1, 5, 7]),
        n_proj=4,
        projection_seed=11,
        gram=True,
        dtype="float32",
        compression="zstd",
    )
    base.update(changes)
    return RunLayout(**base)


def step_data(layout: RunLayout, step: int) -> dict:
    """Deterministic arrays for ``step`` (a function of the step number only)."""
    rng = np.random.default_rng(1000 + step)
    n, nl = layout.n_example, len(layout.layers)
    data = dict(
        loss=rng.random(n),
        correct=rng.random(n) > 0.5,
        sq_norm=rng.random((n, nl)),
        dot_with_sum=rng.standard_normal((n, nl)),
        m=np.tile(np.array([[7.0], [3.0], [0.0]]), (1, nl)),  # moments_train not computed: empty sums
        norm_sq_of_sum=rng.random((3, nl)) * [[1], [1], [0]],
        sum_of_norm_sq=rng.random((3, nl)) * [[1], [1], [0]],
        lr=0.1 / (1 + step),
        train_loss=float(rng.random()),
        train_acc=float(rng.random()),
        test_loss=float(rng.random()),
        test_acc=float(rng.random()),
    )
    if layout.n_coord:
        data["grad_coords"] = rng.standard_normal((n, layout.n_coord)).astype(np.float32)
    if layout.n_proj:
        data["grad_proj"] = rng.standard_normal((n, nl, layout.n_proj)).astype(np.float32)
    if layout.gram:
        g = rng.standard_normal((nl, n, 6))
        data["gram"] = np.einsum("lik,ljk->lij", g, g)
    return data
