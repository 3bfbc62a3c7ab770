"""Benchmarks of the layer rules of issue 13 part B (``python -m pipelines.bench.layers CASE``).

Cases (1 thread unless ``--threads``; medians of ``--repeats`` rounds, each round timing every
variant once, interleaved):

* ``gram-form`` -- the cost choice of :class:`gradstore.capture.factors.Outer`: ||g_n||² of
  g_n = Σ_t L_t R_tᵀ (L: r wide, R: c wide) by the Gram form Σ_ts (L_t·L_s)(R_t·R_s) against
  materializing g_n, over t at fixed r = c, with the same einsums the factor uses; prints the
  time of each and the ratio t(r + c)/(rc) the rule compares with 1. ``--quantity gram``: the
  (n, n) Gram block instead (pairs of examples: Σ_ts (L_nt·L_ms)(R_nt·R_ms) against G Gᵀ).
* ``joint-form`` -- Σ_n g_n and ||g_n||² together (what exact m-coherence needs) of
  g_n = Σ_t L_t R_tᵀ: apart (one weight-gradient product for the sum, the Gram form or
  materializing for the norms, as :class:`~gradstore.capture.factors.Outer` picks) against
  materializing g_n in cache-sized blocks and reducing each block to both
  (``Outer.sum_and_sq_norms``), over t and the layer shapes of the language-model benchmark;
  prints the ratio t²(r + c)/(t·r·c) the rule compares with ``JOINT_BREAK_EVEN``.
* ``lm-products`` -- at the Linear shapes of the GPT-style LM (t = 64): the joint form's block pass
  (per-example products, norms and sum) against the one weight-gradient product it replaces.
* ``lm-joint`` -- the language models of ``gradstore bench capture --only lm`` (m sequences of
  T = 64 stdlib bytes, 2 threads unless ``--threads``): exact m-coherence moments
  (``coherence_moments``) with the joint form on and off (``JOINT_BREAK_EVEN`` = its value / ∞),
  each paired with a plain forward+backward, pairs interleaved; medians of the CPU-time ratios and
  of the minor page faults per pass (the fresh pages glibc had to take from the kernel).
* ``lm-phases`` -- the same models, where the time goes: a plain forward+backward and a capture
  (``coherence_moments``) alternated ``--repeats`` times, each split into its forward (model and
  loss) and backward; the capture's backward split further into the engine's rules (the gradient
  hooks, inclusive) and, inside them, the joint form's block pass; wall clock, lower quartile
  (the passes least disturbed by the rest of the machine) and median, with the minor page faults.
* ``lm-memory`` -- the same models: heap memory in use (glibc ``mallinfo2``) at the end of the
  forward and of the backward pass, plain forward+backward against a capture.
* ``lstm`` -- an LSTM classifier on MNIST-shaped rows (28 steps of 28 features, hidden 128, a
  linear head on the last state; random inputs): a plain forward+backward against per-example
  ||g_n||² of every parameter. Through ``capture`` when the engine takes the LSTM's tuple output;
  otherwise "rule-level": the same forward, ``torch.autograd.grad`` to the output leaves, the
  LSTM and Linear rules, ``sq_norms`` of every factor (what capture does, without its bookkeeping).
  Also a per-example loop of single-example backward passes (vmap cannot run the fused LSTM
  kernel), timed on 32 examples and scaled linearly to m.
* ``hf-conv1d`` -- a GPT-2-style MLP block of Hugging Face ``Conv1D`` layers (d = 64, T = 64,
  4d hidden, GELU): plain forward+backward, ``capture`` with the Conv1D rule, and ``capture``
  through the torch.func fallback (rule unregistered for the run).
* ``decoder`` -- an image decoder: ConvTranspose2d 16 -> 8 -> 1 (7 -> 14 -> 28) with InstanceNorm2d
  and PReLU between, the same three variants (the three rules unregistered for the fallback).
* ``conv3d`` -- two Conv3d layers (1 -> 8 -> 8 channels, 8 x 16 x 16 volumes), the same variants.
"""

from __future__ import annotations

import argparse
import time


def _median_rounds(variants: dict, repeats: int) -> dict:
    """Median seconds of each variant (a callable), one call of each per round, after one warm-up."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def gram_form(repeats: int, width: int, n: int, quantity: str) -> None:
    import torch

    what = "||g_n||^2" if quantity == "sq-norms" else "the (n, n) Gram block g_n . g_m"
    print(f"gram-form: {what} of g_n = sum_t L_t R_t^T, r = c = {width}, n = {n}, {torch.get_num_threads()} thread(s)")
    print("t    t(r+c)/(rc)  gram form ms  materialize ms  faster")
    gen = torch.Generator().manual_seed(0)
    for t in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        left = torch.randn(n, t, 1, width, generator=gen)
        right = torch.randn(n, t, 1, width, generator=gen)

        def by_gram():
            if quantity == "sq-norms":
                ll = torch.einsum("ntgd,nsgd->ngts", left, left)
                rr = torch.einsum("ntgd,nsgd->ngts", right, right)
                return (ll * rr).sum((1, 2, 3))
            ll = torch.einsum("ntgd,msgd->nmgts", left, left)
            rr = torch.einsum("ntgd,msgd->nmgts", right, right)
            return (ll * rr).sum((2, 3, 4))

        def by_materializing():
            g = torch.einsum("ntgr,ntgc->ngrc", left, right).reshape(n, -1)
            if quantity == "sq-norms":
                return torch.linalg.vector_norm(g, dim=-1).square()
            return g @ g.T

        a, b = by_gram(), by_materializing()  # the two forms agree (float32 rounding, relative to the largest)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
        med = _median_rounds({"gram": by_gram, "mat": by_materializing}, repeats)
        ratio = t * 2 * width / (width * width)
        faster = "gram" if med["gram"] < med["mat"] else "materialize"
        print(f"{t:<4} {ratio:<12.3f} {med['gram'] * 1e3:<13.3f} {med['mat'] * 1e3:<15.3f} {faster}")


def joint_form(repeats: int, n: int) -> None:
    import torch

    from gradstore.capture import factors

    print(f"joint-form: sum_n g_n and ||g_n||^2 of g_n = sum_t L_t R_t^T, n = {n}, "
          f"{torch.get_num_threads()} thread(s); the rule materializes where ratio > {factors.JOINT_BREAK_EVEN}")
    print("r    c    t    t(r+c)/(rc)  apart ms  joint ms  faster  rule picks")
    gen = torch.Generator().manual_seed(0)
    for r, c in ((128, 128), (384, 128), (512, 128), (128, 512), (256, 128), (64, 64)):
        for t in (2, 4, 8, 16, 32, 64, 128):
            left = torch.randn(n, t, 1, r, generator=gen)
            right = torch.randn(n, t, 1, c, generator=gen)
            f = factors.Outer(left, right, (r, c))

            def joint():  # the joint form, whatever the rule picks
                return f._sum_and_sq_norms_by_blocks()

            def apart():
                return f.sum(), f.sq_norms()

            (s1, n1), (s2, n2) = apart(), joint()
            torch.testing.assert_close(s2, s1, rtol=1e-3, atol=1e-3 * float(s1.abs().max()))
            torch.testing.assert_close(n2, n1, rtol=1e-3, atol=0.0)
            med = _median_rounds({"apart": apart, "joint": joint}, repeats)
            ratio = t * (r + c) / (r * c)
            picks = "joint" if f._joint_materialize_cheaper() else "apart"
            faster = "joint" if med["joint"] < med["apart"] else "apart"
            print(f"{r:<4} {c:<4} {t:<4} {ratio:<12.3f} {med['apart'] * 1e3:<9.2f} {med['joint'] * 1e3:<9.2f} "
                  f"{faster:<7} {picks}")


def lm_products(repeats: int, m: int) -> None:
    """The per-example products of the joint form against the one weight-gradient product they
    replace, at the Linear shapes of the GPT-style LM (t = 64 tokens per example)."""
    import torch

    from gradstore.capture import factors
    from pipelines.bench.capture import LM

    t, d, vocab = LM["t"], LM["d"], LM["vocab"]
    print(f"lm-products: m = {m}, t = {t}, {torch.get_num_threads()} thread(s); one product B^T A over all m·t rows "
          f"(the plain pass's weight gradient) against the joint form's block pass (Σ g and ||g_n||²)")
    print("layer  r    c    one product ms  block pass ms  ratio")
    gen = torch.Generator().manual_seed(0)
    total = {"one": 0.0, "blocks": 0.0}
    for layer, r, c, count in (("qkv", d, 3 * d, LM["layers"]), ("proj", d, d, LM["layers"]),
                               ("fc", d, 4 * d, LM["layers"]), ("out", 4 * d, d, LM["layers"]), ("head", d, vocab, 1)):
        left = torch.randn(m, t, 1, r, generator=gen)
        right = torch.randn(m, t, 1, c, generator=gen)
        f = factors.Outer(left, right, (r, c))
        a, b = left.reshape(m * t, r), right.reshape(m * t, c)
        med = _median_rounds({"one": lambda: a.T @ b, "blocks": f._sum_and_sq_norms_by_blocks}, repeats)
        for k in total:
            total[k] += count * med[k]
        print(f"{layer:<6} {r:<4} {c:<4} {med['one'] * 1e3:<15.2f} {med['blocks'] * 1e3:<14.2f} "
              f"{med['blocks'] / med['one']:.2f}")
    print(f"whole model (4 blocks + head): one product {total['one'] * 1e3:.1f} ms, block pass "
          f"{total['blocks'] * 1e3:.1f} ms, ratio {total['blocks'] / total['one']:.2f}")


def lm_joint(repeats: int, m: int) -> None:
    import statistics

    import torch

    from gradstore.capture import coherence_moments, factors
    from pipelines.bench.capture import LM, LM_KINDS, _benchmark_lm, _sequence_loss, _text_windows

    x, y, _ = _text_windows(m, LM["t"], "cpu")
    on = factors.JOINT_BREAK_EVEN
    print(f"lm-joint: m = {m}, T = {LM['t']}, {torch.get_num_threads()} thread(s), {repeats} interleaved pairs; "
          f"ratio = capture / plain forward+backward (CPU time), joint form off (break-even inf) and on ({on})")
    print("case     off    on     on: min-max   minor page faults per pass: plain, capture (on)")
    for kind in LM_KINDS:
        model = _benchmark_lm(kind)

        def plain():
            model.zero_grad(set_to_none=True)
            _sequence_loss(model(x), y).sum().backward()

        def ours():
            return coherence_moments(model, _sequence_loss, x, y, chunk_size=m)

        plain(), ours()
        ratios = {"off": [], "on": []}
        faults = {"plain": [], "on": []}  # minor page faults per pass (fresh pages from the kernel)
        try:
            for _ in range(repeats):
                for name, value in (("off", float("inf")), ("on", on)):
                    factors.JOINT_BREAK_EVEN = value
                    f0, start = _minor_faults(), time.process_time()
                    plain()
                    p, f1 = time.process_time() - start, _minor_faults()
                    start = time.process_time()
                    ours()
                    ratios[name].append((time.process_time() - start) / p)
                    if name == "on":
                        faults["plain"].append(f1 - f0)
                        faults["on"].append(_minor_faults() - f1)
        finally:
            factors.JOINT_BREAK_EVEN = on
        med = {k: statistics.median(v) for k, v in ratios.items()}
        print(f"{kind:<8} {med['off']:<6.3f} {med['on']:<6.3f} {min(ratios['on']):.2f}-{max(ratios['on']):.2f}   "
              f"{statistics.median(faults['plain']):>6.0f} {statistics.median(faults['on']):>7.0f}")


def lm_memory(repeats: int, m: int) -> None:
    """Heap memory in use (glibc ``mallinfo2``) at the end of the forward pass and of the backward
    pass, above what was in use before the pass: a plain forward+backward against a capture."""
    import ctypes
    import statistics

    from gradstore.capture import coherence_moments, engine
    from pipelines.bench.capture import LM, LM_KINDS, _benchmark_lm, _sequence_loss, _text_windows

    class Info(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
    except (OSError, AttributeError):
        print("lm-memory needs glibc's mallinfo2 (glibc 2.33 or later)")
        return

    def used() -> float:
        info = libc.mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**20

    x, y, _ = _text_windows(m, LM["t"], "cpu")
    print(f"lm-memory: m = {m}, T = {LM['t']}; MiB of heap in use above the start of the pass, medians of {repeats}")
    print("case     plain: forward end, backward end    capture: forward end, backward end")
    for kind in LM_KINDS:
        model = _benchmark_lm(kind)
        marks: dict = {}
        backward = engine._backward

        def timed_backward(*args, **kwargs):  # the capture's forward ends where its backward begins
            marks["forward"] = used()
            out = backward(*args, **kwargs)
            marks["backward"] = used()
            return out

        def plain():
            model.zero_grad(set_to_none=True)
            loss = _sequence_loss(model(x), y).sum()
            marks["forward"] = used()
            loss.backward()
            marks["backward"] = used()

        def ours():
            coherence_moments(model, _sequence_loss, x, y, chunk_size=m)

        rows: dict = {"plain": [], "capture": []}
        engine._backward = timed_backward
        try:
            plain(), ours()
            for _ in range(repeats):
                for name, fn in (("plain", plain), ("capture", ours)):
                    start = used()
                    fn()
                    rows[name].append((marks["forward"] - start, marks["backward"] - start))
        finally:
            engine._backward = backward
        med = {k: [statistics.median(r[i] for r in v) for i in (0, 1)] for k, v in rows.items()}
        print(f"{kind:<8} {med['plain'][0]:>12.0f} {med['plain'][1]:>13.0f}    "
              f"{med['capture'][0]:>16.0f} {med['capture'][1]:>13.0f}")


def lm_phases(repeats: int, m: int) -> None:
    import functools
    import statistics

    import torch

    from gradstore.capture import coherence_moments, engine, factors, hooks, uses
    from pipelines.bench.capture import LM, LM_KINDS, _benchmark_lm, _sequence_loss, _text_windows

    x, y, _ = _text_windows(m, LM["t"], "cpu")
    spent: dict = {}

    def timed(owner, name, label):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
        setattr(owner, name, wrapper)
        return owner, name, original

    print(f"lm-phases: m = {m}, T = {LM['t']}, {torch.get_num_threads()} thread(s), {repeats} alternated passes each; "
          "ms of wall clock, lower quartile / median")
    print("case     plain: forward backward total    capture: forward backward (rules, block pass) other total    "
          "ratio: lower quartiles, medians   faults: plain, capture")
    patched = [timed(engine, "call_model", "forward"), timed(engine, "call_loss", "forward"),
               timed(engine, "_backward", "backward"),
               timed(hooks.Tap, "_on_grad", "rules"), timed(uses.UseTracker, "_on_grad", "rules"),
               timed(factors.Outer, "_sum_and_sq_norms_by_blocks", "blocks")]
    try:
        for kind in LM_KINDS:
            model = _benchmark_lm(kind)
            rows: dict = {k: [] for k in ("p_fwd", "p_bwd", "p_all", "c_fwd", "c_bwd", "c_rules", "c_blocks",
                                          "c_other", "c_all", "p_faults", "c_faults")}

            def plain():
                model.zero_grad(set_to_none=True)
                f0, start = _minor_faults(), time.perf_counter()
                loss = _sequence_loss(model(x), y).sum()
                mid = time.perf_counter()
                loss.backward()
                end = time.perf_counter()
                for key, value in (("p_fwd", mid - start), ("p_bwd", end - mid), ("p_all", end - start),
                                   ("p_faults", _minor_faults() - f0)):
                    rows[key].append(value)

            def ours():
                spent.clear()
                f0, start = _minor_faults(), time.perf_counter()
                coherence_moments(model, _sequence_loss, x, y, chunk_size=m)
                total = time.perf_counter() - start
                for key, value in (("c_all", total), ("c_faults", _minor_faults() - f0), ("c_fwd", spent["forward"]),
                                   ("c_bwd", spent["backward"]),
                                   ("c_other", total - spent["forward"] - spent["backward"]),
                                   ("c_rules", spent.get("rules", 0.0)), ("c_blocks", spent.get("blocks", 0.0))):
                    rows[key].append(value)

            for _ in range(2):  # untimed: the heap's growth in a fresh process (measure_paired's warm-up)
                plain()
                ours()
            for values in rows.values():
                values.clear()
            for _ in range(repeats):
                plain()
                ours()
            low = {k: sorted(v)[len(v) // 4] for k, v in rows.items()}
            med = {k: statistics.median(v) for k, v in rows.items()}

            def both(key):
                return f"{low[key] * 1e3:.0f}/{med[key] * 1e3:.0f}"

            print(f"{kind:<8} {both('p_fwd'):>9} {both('p_bwd'):>9} {both('p_all'):>9}    "
                  f"{both('c_fwd'):>9} {both('c_bwd'):>9} ({both('c_rules')}, {both('c_blocks')}) {both('c_other'):>7} "
                  f"{both('c_all'):>9}    "
                  f"{low['c_all'] / low['p_all']:.3f} {med['c_all'] / med['p_all']:.3f}   "
                  f"{med['p_faults']:>6.0f} {med['c_faults']:>6.0f}")
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def _minor_faults() -> int:
    """This process's minor page faults so far (pages the kernel had to map and zero for it)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def lstm(repeats: int, m: int) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils._pytree import tree_flatten

    from gradstore.capture import capture, lookup_rule
    from gradstore.errors import CaptureError

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(28, 128, batch_first=True)
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return self.fc(h[-1])

    torch.manual_seed(0)
    model = Classifier().eval()
    x, y = torch.rand(m, 28, 28), torch.randint(0, 10, (m,))

    def loss_fn(out, targets):
        return F.cross_entropy(out, targets, reduction="none")

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).sum().backward()

    def by_capture():
        return capture(model, loss_fn, x, y).sq_norms

    def rule_level():
        out = model.lstm(x)
        leaves, _ = tree_flatten(out)
        feature = out[1][0][-1]
        z = model.fc(feature)
        gz, *gl = torch.autograd.grad(loss_fn(z, y).sum(), [z, *leaves], allow_unused=True)
        factors = {**lookup_rule(nn.Linear)(model.fc, (feature.detach(),), gz),
                   **lookup_rule(nn.LSTM)(model.lstm, (x,), tuple(gl))}
        return {name: f.sq_norms() for name, f in factors.items()}

    sub = min(m, 32)
    params = [p for p in model.parameters()]

    def loop():  # the alternative where vmap cannot run the fused kernel: one backward per example
        for j in range(sub):
            grads = torch.autograd.grad(loss_fn(model(x[j:j + 1]), y[j:j + 1]).sum(), params)
            sum(g.square().sum() for g in grads)

    try:
        by_capture()
        ours, how = by_capture, "capture"
    except CaptureError as err:
        ours, how = rule_level, f"rule-level (capture refused: {str(err)[:80]}...)"
    med = _median_rounds({"plain": plain, "ours": ours, "loop": loop}, repeats)
    loop_scaled = med["loop"] * m / sub
    print(f"lstm: m = {m}, {torch.get_num_threads()} thread(s), {how}")
    print(f"plain forward+backward {med['plain'] * 1e3:.1f} ms, per-example sq_norms {med['ours'] * 1e3:.1f} ms, "
          f"ratio {med['ours'] / med['plain']:.2f}x; per-example loop (timed on {sub}, scaled) "
          f"{loop_scaled * 1e3:.0f} ms, {loop_scaled / med['plain']:.1f}x")


def _rule_vs_fallback(model, x, y, types, repeats):
    """Median seconds of a plain pass, capture with the rules of ``types``, capture by the fallback."""
    import warnings

    from gradstore.capture import capture, lookup_rule, register_rule, unregister_rule
    from gradstore.capture.fallback import CaptureFallbackWarning

    def loss_fn(out, targets):
        return ((out - targets) ** 2).flatten(1).sum(1)

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).sum().backward()

    def ours():
        return capture(model, loss_fn, x, y).sq_norms

    rules = {t: lookup_rule(t) for t in types}
    med = _median_rounds({"plain": plain, "rule": ours}, repeats)
    for t in types:
        unregister_rule(t)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CaptureFallbackWarning)
            fallback = _median_rounds({"plain": plain, "fallback": ours}, repeats)
    finally:
        for t, rule in rules.items():
            register_rule(t, overwrite=True)(rule)
    return med, fallback


def _report(name, med, fallback):
    print(f"plain {med['plain'] * 1e3:.1f} ms; capture with the rule {med['rule'] * 1e3:.1f} ms "
          f"({med['rule'] / med['plain']:.2f}x); capture by the fallback {fallback['fallback'] * 1e3:.1f} ms "
          f"({fallback['fallback'] / fallback['plain']:.2f}x of its own paired plain pass)")


def hf_conv1d(repeats: int, m: int) -> None:
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    d, t = 64, 64
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(4 * d, d), nn.GELU(), Conv1D(d, 4 * d)).eval()
    x, y = torch.randn(m, t, d), torch.randn(m, t, d)
    print(f"hf-conv1d: m = {m}, T = {t}, d = {d}, {torch.get_num_threads()} thread(s)")
    _report("hf-conv1d", *_rule_vs_fallback(model, x, y, [Conv1D], repeats))


def decoder(repeats: int, m: int) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (16, 7, 7)),
        nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.InstanceNorm2d(8, affine=True), nn.PReLU(8),
        nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1),
    ).eval()
    x, y = torch.randn(m, 16 * 49), torch.rand(m, 1, 28, 28)
    print(f"decoder: m = {m}, ConvTranspose2d 16->8->1 (7 -> 14 -> 28) + InstanceNorm2d + PReLU, "
          f"{torch.get_num_threads()} thread(s)")
    _report("decoder", *_rule_vs_fallback(model, x, y, [nn.ConvTranspose2d, nn.InstanceNorm2d, nn.PReLU], repeats))


def conv3d(repeats: int, m: int) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, stride=2, padding=1)).eval()
    x = torch.randn(m, 1, 8, 16, 16)
    y = torch.randn(m, 8, 4, 8, 8)
    print(f"conv3d: m = {m}, Conv3d 1->8->8 on 8x16x16 volumes, {torch.get_num_threads()} thread(s)")
    _report("conv3d", *_rule_vs_fallback(model, x, y, [nn.Conv3d], repeats))


def mha_bias_kv(repeats: int, m: int) -> None:
    """nn.MultiheadAttention with and without add_bias_kv (bias_k/bias_v tiled over the batch inside
    F.multi_head_attention_forward, captured by the op rule of the tiling), each against its own
    plain pass."""
    import torch
    from torch import nn

    from gradstore.capture import capture

    d, t = 128, 64

    class Attention(nn.Module):
        def __init__(self, bias_kv):
            super().__init__()
            self.att = nn.MultiheadAttention(d, 4, add_bias_kv=bias_kv, batch_first=True)
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            return self.head(self.att(x, x, x, need_weights=False)[0].mean(1))

    def loss_fn(out, targets):
        return nn.functional.cross_entropy(out, targets, reduction="none")

    x, y = torch.randn(m, t, d), torch.randint(0, 10, (m,))
    print(f"mha-bias-kv: m = {m}, T = {t}, d = {d}, 4 heads, {torch.get_num_threads()} thread(s)")
    for bias_kv in (False, True):
        torch.manual_seed(0)
        model = Attention(bias_kv).eval()

        def plain():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).sum().backward()

        med = _median_rounds({"plain": plain, "capture": lambda: capture(model, loss_fn, x, y).sq_norms}, repeats)
        print(f"add_bias_kv={bias_kv}: plain {med['plain'] * 1e3:.1f} ms; capture {med['capture'] * 1e3:.1f} ms "
              f"({med['capture'] / med['plain']:.2f}x)")


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(prog="python -m pipelines.bench.layers", description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=["gram-form", "joint-form", "lm-products", "lm-joint", "lm-phases", "lm-memory", "lstm", "hf-conv1d", "decoder", "conv3d", "mha-bias-kv"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--width", type=int, default=128, help="gram-form: r = c")
    parser.add_argument("--quantity", choices=["sq-norms", "gram"], default="sq-norms", help="gram-form: which quantity")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.case == "gram-form":
        gram_form(args.repeats, args.width, args.m, args.quantity)
    elif args.case == "joint-form":
        joint_form(args.repeats, args.m)
    elif args.case == "lm-joint":
        lm_joint(args.repeats, args.m)
    elif args.case == "lm-phases":
        lm_phases(args.repeats, args.m)
    elif args.case == "lm-memory":
        lm_memory(args.repeats, args.m)
    elif args.case == "lm-products":
        lm_products(args.repeats, args.m)
    elif args.case == "lstm":
        lstm(args.repeats, args.m)
    else:
        {"hf-conv1d": hf_conv1d, "decoder": decoder, "conv3d": conv3d, "mha-bias-kv": mha_bias_kv}[args.case](args.repeats, args.m)


if __name__ == "__main__":
    main()
