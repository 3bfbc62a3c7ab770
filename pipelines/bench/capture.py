"""``gradstore bench capture``: the capture engine against a plain forward+backward pass.

Cases (each in its own process, real MNIST training images, the project's models):

* ``mlp-*``: MLP 784-2048-10 (``mlp-cg``), m examples: exact m-coherence moments of the whole
  model and per layer (``coherence_moments``) vs a plain forward+backward; torch.func vmap(grad)
  (timed on a subsample, scaled linearly in m) for comparison.
* ``cnn-*``: the small CNN with BatchNorm (``cnn-bn``, eval mode), same m.
* ``mlp-backpack`` / ``mlp-opacus`` (with the optional ``bench`` extra, ``make bench-extra``):
  BackPACK BatchL2Grad on the same m examples (paired with a plain pass; its Σ||g_n||² is checked
  against ours), Opacus GradSampleModule moments (timed on ``vmap_m`` examples, scaled linearly).
* ``lm-*`` (language models, real text: bytes of the Python standard library's own sources read at
  run time from ``sysconfig.get_paths()["stdlib"]``, windows of T = 64 tokens, vocabulary 256):
  a GPT-style LM written from ``nn.Linear`` (4 layers, d = 128, 4 heads) untied (``lm-untied``),
  with its head tied to the token embedding (``lm-tied``), and with ``nn.TransformerEncoder``
  instead of the hand-written attention (``lm-encoder``); a tiny Hugging Face GPT-2 (2 layers,
  n_embd 64, ``gpt2``, if transformers is installed). Exact m-coherence moments (whole model + per
  layer, per-sequence mean token loss) paired with a plain forward+backward of the same model;
  torch.func vmap(grad) moments (``*-vmap``) on the same examples.
* ``gram-*``: the exact per-layer Gram block of the MLP on ``gram_m`` examples; building it from
  materialized per-example gradients is timed at ``gram_small`` examples and scaled by blocks
  (k = gram_m / gram_small: k materializations, k(k+1)/2 block products), since ``gram_m``
  materialized gradients of 1.6 M parameters do not fit in memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings

#: cases timed in pairs with a plain forward+backward over the same examples, in the same process
BASELINE = {"mlp-moments": "mlp-plain", "mlp-moments-chunked": "mlp-plain", "cnn-moments": "cnn-plain",
            "gram-ours": "gram-plain", "mlp-backpack": "mlp-plain"}


def _data(m: int, device: str, data_dir: str | None):
    import numpy as np
    import torch

    from pipelines.data import load_mnist

    mnist = load_mnist(data_dir)
    if m > len(mnist.train_labels):
        from gradstore.errors import DataError

        raise DataError(f"--m {m} exceeds the {len(mnist.train_labels)} training images of {mnist.source}")
    x = torch.from_numpy(mnist.train_images[:m].astype(np.float32) / 255.0).unsqueeze(1).to(device)
    y = torch.from_numpy(np.ascontiguousarray(mnist.train_labels[:m])).to(device)
    return x, y, mnist.source


# ---- language models on real text ---------------------------------------------------------------

LM = {"vocab": 256, "d": 128, "heads": 4, "layers": 4, "t": 64}


def _text_windows(m: int, t: int, device: str):
    """m windows of t + 1 bytes of the standard library's .py sources (sorted paths; inputs, next bytes)."""
    import os
    import sysconfig

    import torch

    root = sysconfig.get_paths()["stdlib"]
    data = bytearray()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "__pycache__"))
        for filename in sorted(filenames):
            if filename.endswith(".py"):
                with open(os.path.join(dirpath, filename), "rb") as fh:
                    data += fh.read()
            if len(data) >= m * (t + 1):
                break
        if len(data) >= m * (t + 1):
            break
    tokens = torch.tensor(list(data[: m * (t + 1)]), dtype=torch.long).view(m, t + 1).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), f"stdlib sources under {root}"


def _lm_model(kind: str):
    """GPT-style LM from nn.Linear ("untied", "tied"), or with nn.TransformerEncoder ("encoder")."""
    import torch
    from torch import nn

    vocab, d, heads, layers, t = LM["vocab"], LM["d"], LM["heads"], LM["layers"], LM["t"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            n, s, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(n, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(att.transpose(1, 2).reshape(n, s, d))
            return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(t, d)
            if kind == "encoder":
                layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
                self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            else:
                self.blocks = nn.Sequential(*[Block() for _ in range(layers)])
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)
            if kind == "tied":
                self.head.weight = self.tok.weight

        def forward(self, idx):
            s = idx.shape[1]
            h = self.tok(idx) + self.pos(torch.arange(s, device=idx.device))
            if kind == "encoder":
                mask = nn.Transformer.generate_square_subsequent_mask(s, device=idx.device)
                h = self.blocks(h, mask=mask, is_causal=True)
            else:
                h = self.blocks(h)
            return self.head(self.ln(h))

    torch.manual_seed(0)
    return GPT()


def _gpt2_model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=LM["t"], bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


#: the language models of the LM benchmarks, in the order the tables list them
LM_KINDS = ("untied", "tied", "encoder", "gpt2")


def _benchmark_lm(kind: str):
    """The LM benchmark model of ``kind`` (one of ``LM_KINDS``), random weights, eval mode."""
    return (_gpt2_model() if kind == "gpt2" else _lm_model(kind)).eval()


def _sequence_loss(logits, targets):
    """Mean next-byte cross entropy per sequence: the example is the sequence."""
    import torch.nn.functional as F

    logits = getattr(logits, "logits", logits)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


def _lm_case(name: str, *, m: int, device: str, repeats: int) -> dict:
    from gradstore.capture import coherence_moments
    from pipelines.bench import measure_paired

    kind = name.split("-")[1] if name.startswith("lm-") else "gpt2"
    model = _benchmark_lm(kind).to(device)
    x, y, source = _text_windows(m, LM["t"], device)
    loss_fn = _sequence_loss

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).sum().backward()

    def ours():
        mom = coherence_moments(model, loss_fn, x, y, chunk_size=m)
        return mom.norm_sq_of_sum("layer"), mom.sum_of_norm_sq("layer"), mom.norm_sq_of_sum("model")

    extra = {}
    if name.endswith("-vmap"):
        fn = lambda: _materialized_moments(_vmap_per_example(model, loss_fn), x, y, chunk=32)  # noqa: E731
        _materialized_moments(_vmap_per_example(model, loss_fn), x[:2], y[:2])  # warm up torch.func
        result = measure_paired(fn, plain, repeats=max(1, repeats // 3), device=device)
    elif name.endswith(("-opacus", "-ghost")):
        try:
            fn = _lm_peer(name, model, loss_fn, x, y)
            result = measure_paired(fn, plain, repeats=max(1, repeats // 3), device=device)  # its first call: the peak
        except Exception as exc:  # the peer refuses this model: say so in the table
            return {"case": name, "m": m, "device": device, "error": f"{type(exc).__name__}: {exc}"[:300]}
        # a cross-check, not a timing: the peer's Σ_n ||g_n||² of the whole model against ours
        truth = coherence_moments(model, loss_fn, x, y, chunk_size=m).sum_of_norm_sq("model")
        extra["sum_of_norm_sq_rel_diff"] = abs(sum(fn()[1].values()) - truth) / truth
    else:
        result = measure_paired(ours, plain, repeats=repeats, device=device)
        extra["flop_ratio"] = _flops(ours) / _flops(plain)
    result.update(extra)
    params = sum(p.numel() for p in model.parameters())
    return {"case": name, "m": m, "device": device, "source": source, "parameters": params, **result}


def _flops(fn) -> int:
    """Matrix-product FLOPs of one call of ``fn`` (``torch.utils.flop_counter``: mm, bmm, addmm,
    attention, convolutions; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _lm_peer(name: str, model, loss_fn, x, y):
    """Opacus on a copy of ``model`` (its hooks never touch the model the plain pass times).

    ``*-opacus``: ``GradSampleModule`` per-example gradients (materialized, 32 sequences at a
    time), moments from them; ``*-ghost``: ``GradSampleModuleFastGradientClipping`` with ghost
    clipping (per-example norms without per-example gradients, clipping off), Σ_n ||g_n||² from
    its per-parameter norms and Σ g from ``.grad``. Both in train mode, which is where Opacus
    records (the models have no dropout). Returns ``fn``: ``fn()`` gives ``(Σ g, Σ_n ||g_n||²)``
    per parameter, as :func:`_materialized_moments` does.
    """
    import copy

    peer = copy.deepcopy(model).train()
    if name.endswith("-opacus"):
        from opacus import GradSampleModule

        wrapped = GradSampleModule(peer, loss_reduction="sum", batch_first=True)
        return lambda: _materialized_moments(_opacus_per_example(wrapped, loss_fn), x, y, chunk=32)
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(peer, loss_reduction="sum", batch_first=True, max_grad_norm=1e30,
                                                   use_ghost_clipping=True)

    def ghost():
        wrapped.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss_fn(wrapped(x), y).sum().backward()
        params = [(k, p) for k, p in wrapped.named_parameters() if p.requires_grad]
        return ({k: p.grad.double() for k, p in params},
                {k: float(p._norm_sample.double().pow(2).sum()) for k, p in params})

    return ghost


def gram_form_table(n: int = 32, repeats: int = 5) -> list:
    """||g_n||² of an Outer factor by the pairwise form and by materializing, per (r, c, t): the
    measured break-even of ``Outer._gram_form_cheaper`` (process time, best of ``repeats``)."""
    import time

    import torch

    from gradstore.capture.factors import Outer, _batched_dot, _inner_same, _sq_rows

    def best(f):
        f()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            f()
            times.append(time.process_time() - start)
        return min(times)

    rows = []
    for r, c in ((128, 128), (384, 128), (512, 512)):
        for t in (16, 32, 64, 128, 256, 512):
            left, right = torch.randn(n, t, 1, r), torch.randn(n, t, 1, c)
            factor = Outer(left, right, (r, c))
            pairwise = best(lambda: _batched_dot(_inner_same(left, left.dtype), _inner_same(right, right.dtype)))
            materialize = best(lambda: _sq_rows(factor.materialize().reshape(n, -1)))
            rows.append({"r": r, "c": c, "t": t, "pairwise_ms": pairwise * 1e3, "materialize_ms": materialize * 1e3,
                         "rule_picks": "pairwise" if factor._gram_form_cheaper() else "materialize"})
    return rows


def _vmap_per_example(model, loss_fn):
    """torch.func vmap(grad): ``(x, y) ->`` parameter name -> (n, *shape) per-example gradients."""
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach() for k, p in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    per_example = vmap(grad(one), in_dims=(None, 0, 0))
    return lambda x, y: per_example(params, x, y)


def _materialized_moments(per_example, x, y, chunk: int = 50):
    """Σ_n g_n and Σ_n ||g_n||² per parameter (float64) from ``per_example(x, y)`` gradients,
    materialized ``chunk`` examples at a time: the moments of the engine, the slow way."""
    sums: dict = {}
    sq: dict = {}
    for start in range(0, x.shape[0], chunk):
        for k, g in per_example(x[start:start + chunk], y[start:start + chunk]).items():
            sums[k] = sums.get(k, 0) + g.sum(0).double()
            sq[k] = sq.get(k, 0.0) + float(g.flatten(1).double().pow(2).sum())
    return sums, sq


def _backpack_moments(model, x, y):
    """BackPACK BatchL2Grad: Σ_n ||g_n||² per layer from its per-example squared norms, ||Σ g||² from .grad."""
    import torch.nn.functional as F
    from backpack import backpack
    from backpack.extensions import BatchL2Grad

    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    with backpack(BatchL2Grad()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # BackPACK's own hooks
        loss.backward()
    layers: dict = {}
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        sq, total = layers.get(layer, (0.0, 0.0))
        layers[layer] = (sq + float(p.batch_l2.double().sum()), total + float(p.grad.double().pow(2).sum()))
    return layers


def _opacus_per_example(wrapped, loss_fn=None):
    """Opacus GradSampleModule: ``(x, y) ->`` parameter name -> its ``grad_sample`` (n, *shape).

    ``loss_fn(outputs, targets)`` gives per-example losses (default: cross entropy), summed."""
    import torch.nn.functional as F

    def per_example(x, y):
        wrapped.zero_grad(set_to_none=True)
        out = wrapped(x)
        loss = F.cross_entropy(out, y, reduction="sum") if loss_fn is None else loss_fn(out, y).sum()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus's own hooks
            loss.backward()
        grads = {name: p.grad_sample for name, p in wrapped.named_parameters()}
        for p in wrapped.parameters():
            p.grad_sample = None
        return grads

    return per_example


def _materialized_gram(model, loss_fn, x, y, timings: dict, chunk: int = 50):
    """Per-layer Gram blocks from materialized per-example gradients (torch.func).

    Records ``materialize_seconds`` (vmap(grad) of every example, flattened per parameter) and
    ``product_seconds`` (the Gram products) in ``timings``.
    """
    import time

    import torch

    per_example = _vmap_per_example(model, loss_fn)
    start = time.perf_counter()
    parts = [per_example(x[s:s + chunk], y[s:s + chunk]) for s in range(0, x.shape[0], chunk)]
    flat = {k: torch.cat([p[k].flatten(1) for p in parts]) for k in parts[0]}
    del parts
    middle = time.perf_counter()
    gram = {}
    for k, g in flat.items():
        layer = k.rsplit(".", 1)[0]
        gram[layer] = g @ g.T + gram.get(layer, 0)
    timings.update(materialize_seconds=middle - start, product_seconds=time.perf_counter() - middle)
    return gram


def case(name: str, *, m: int, device: str, repeats: int, data_dir: str | None, threads: int = 0) -> dict:
    """Run one case in this process (``threads`` > 0 sets torch's CPU threads); return its measurement."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    if name == "gram-form":
        return {"case": name, "rows": gram_form_table(n=m, repeats=repeats)}
    if name.startswith(("lm-", "gpt2")):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap over attention
            return _lm_case(name, m=m, device=device, repeats=repeats)
    from gradstore.capture import capture, coherence_moments
    from pipelines.bench import measure, measure_paired
    from pipelines.models import build_model
    from pipelines.train import per_example_loss as loss_fn

    torch.manual_seed(0)
    x, y, source = _data(m, device, data_dir)
    model = build_model("cnn-bn" if name.startswith("cnn") else "mlp-cg", seed=0).to(device)

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).sum().backward()

    def moments(chunk):
        def run():
            mom = coherence_moments(model, loss_fn, x, y, chunk_size=chunk)
            return mom.norm_sq_of_sum("layer"), mom.sum_of_norm_sq("layer"), mom.norm_sq_of_sum("model")
        return run

    warmup = True  # the slow reference cases (tens of seconds) are timed once, without a warm-up
    if name.endswith("plain"):
        model.eval()
        fn = plain
    elif name in ("mlp-moments", "cnn-moments"):
        fn = moments(m)
    elif name == "mlp-moments-chunked":
        fn = moments(1000)
    elif name == "mlp-vmap":
        fn = lambda: _materialized_moments(_vmap_per_example(model, loss_fn), x, y)  # noqa: E731
        _materialized_moments(_vmap_per_example(model, loss_fn), x[:2], y[:2])  # warm up torch.func on two examples
        repeats, warmup = 1, False
    elif name == "mlp-backpack":
        from backpack import extend

        extended = extend(build_model("mlp-cg", seed=0).to(device).eval())
        fn = lambda: _backpack_moments(extended, x, y)  # noqa: E731
        ours = coherence_moments(model, loss_fn, x, y, chunk_size=m).sum_of_norm_sq("layer")
        theirs = {layer: sq for layer, (sq, _) in fn().items()}
        agreement = max(abs(theirs[k] - v) / v for k, v in ours.items())  # an independent cross-check
    elif name == "mlp-opacus":
        from opacus import GradSampleModule

        # Opacus records activations in training mode only (the MLP has no dropout or BatchNorm)
        wrapped = GradSampleModule(build_model("mlp-cg", seed=0).to(device).train(), loss_reduction="sum")
        fn = lambda: _materialized_moments(_opacus_per_example(wrapped), x, y)  # noqa: E731
        _materialized_moments(_opacus_per_example(wrapped), x[:2], y[:2])  # warm up
        repeats, warmup = 1, False
    elif name == "gram-ours":
        fn = lambda: capture(model, loss_fn, x, y, sq_norms=False, gram=True).by_layer("gram")  # noqa: E731
    elif name == "gram-materialized":
        timings: dict = {}
        fn = lambda: _materialized_gram(model, loss_fn, x, y, timings)  # noqa: E731
        _materialized_gram(model, loss_fn, x[:2], y[:2], {})  # warm up torch.func on two examples
        repeats, warmup = 1, False
    else:
        raise ValueError(f"unknown case {name!r}")
    if name in BASELINE:
        model.eval()
        result = measure_paired(fn, plain, repeats=repeats, device=device)
        if name == "mlp-backpack":
            result["sum_of_norm_sq_rel_diff"] = agreement
    else:
        result = measure(fn, repeats=repeats, device=device, warmup=warmup)
        if name == "gram-materialized":
            result.update(timings)
    return {"case": name, "m": m, "device": device, "source": source, **result}


LM_CASES = ("lm-untied", "lm-untied-vmap", "lm-tied", "lm-tied-vmap", "lm-encoder", "lm-encoder-vmap", "gpt2",
            "gpt2-vmap")
#: Opacus beside them (the optional ``bench`` extra): GradSampleModule and ghost clipping
LM_PEERS = tuple(f"{case}-{peer}" for case in ("lm-untied", "lm-tied", "lm-encoder", "gpt2")
                 for peer in ("opacus", "ghost"))


def run_lm(*, m: int, device: str, repeats: int, threads: int = 0, echo=print, cases=None) -> dict:
    """The language-model cases, each in a fresh process (``gpt2*`` only if transformers is installed;
    by default with Opacus beside them, :data:`LM_PEERS`, if it is installed)."""
    from pipelines.bench import run_case

    if cases is None:
        cases = LM_CASES + (LM_PEERS if importlib.util.find_spec("opacus") else ())
    rows = {}
    for name in cases:
        if name.startswith("gpt2") and importlib.util.find_spec("transformers") is None:
            continue
        args = [name, "--m", str(m), "--device", device, "--repeats", str(repeats), "--threads", str(threads)]
        row = rows[name] = run_case(__name__, args)
        if "error" in row:
            echo(f"  {name:<22} m={m:<5} refused: {row['error']}")
            continue
        echo(f"  {name:<22} m={m:<5} {row['seconds']:9.3f} s   peak +{row['peak_bytes'] / 2**20:8.1f} MiB   "
             f"paired plain {row['baseline_seconds']:.3f} s, median ratio {row['ratio']:.3f} (wall) "
             f"{row['cpu_ratio']:.3f} (CPU time)" +
             (f", Σ||g||² off ours by {row['sum_of_norm_sq_rel_diff']:.1e}" if "sum_of_norm_sq_rel_diff" in row else ""))
    return rows


def lm_markdown(rows: dict, *, m: int) -> str:
    """The language-model cases as a Markdown table (ratios paired with a plain pass of the same model)."""
    titles = {"lm-untied": "GPT-style LM (nn.Linear), untied", "lm-tied": "same, head tied to the embedding",
              "lm-encoder": "same, nn.TransformerEncoder", "gpt2": "HF GPT-2 (2 layers, n_embd 64)"}
    def peer(row):
        if row is None:
            return "–"
        if "error" in row:
            return f"refused ({row['error'].split(':')[0]})"
        off = row["sum_of_norm_sq_rel_diff"]
        return f"{row['ratio']:.2f}× ({row['cpu_ratio']:.2f}×), {row['peak_bytes'] / 2**20:.0f} MiB" + \
            (f", **Σ‖g‖² off by {off:.0e}**" if off > 1e-4 else "")

    lines = ["| case | m | parameters | capture (s) | ratio (CPU time) | matmul FLOPs ratio | peak MiB | "
             "torch.func vmap (s) | vmap ratio (CPU time) | vmap peak MiB | Opacus GradSampleModule | "
             "Opacus ghost clipping |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, title in titles.items():
        if name not in rows:
            continue
        r, v = rows[name], rows.get(name + "-vmap")
        vmap = (f"{v['seconds']:.2f} | {v['ratio']:.2f}× ({v['cpu_ratio']:.2f}×) | {v['peak_bytes'] / 2**20:.0f}"
                if v else "– | – | –")
        lines.append(f"| {title} | {m} | {r['parameters']:,} | {r['seconds']:.3f} | **{r['ratio']:.2f}×** "
                     f"({r['cpu_ratio']:.2f}×) | {r.get('flop_ratio', float('nan')):.3f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {vmap} | "
                     f"{peer(rows.get(name + '-opacus'))} | {peer(rows.get(name + '-ghost'))} |")
    return "\n".join(lines)


def run(*, m: int, device: str, repeats: int, data_dir: str | None, vmap_m: int, gram_m: int,
        gram_small: int, threads: int = 0, echo=print) -> dict:
    """All cases, each in a fresh process; returns rows with ratios to their plain baselines."""
    from pipelines.bench import run_case

    def one(name, size, reps=repeats):
        args = [name, "--m", str(size), "--device", device, "--repeats", str(reps), "--threads", str(threads)]
        if data_dir:
            args += ["--data-dir", data_dir]
        row = run_case(__name__, args)
        echo(f"  {name:<22} m={size:<5} {row['seconds']:9.3f} s   peak +{row['peak_bytes'] / 2**20:8.1f} MiB")
        return row

    rows = {}
    for name in ("mlp-plain", "mlp-moments", "mlp-moments-chunked", "cnn-plain", "cnn-moments", "gram-plain",
                 "gram-ours"):
        rows[name] = one(name, gram_m if name.startswith("gram") else m)
        if "ratio" in rows[name]:
            echo(f"  {'':<22} paired plain fwd+bwd {rows[name]['baseline_seconds']:.3f} s, median ratio "
                 f"{rows[name]['ratio']:.3f} (wall) {rows[name]['cpu_ratio']:.3f} (CPU time)")
    rows["mlp-vmap"] = one("mlp-vmap", vmap_m)
    rows["mlp-vmap"]["scaled_seconds"] = rows["mlp-vmap"]["seconds"] * m / vmap_m
    small = one("gram-materialized", gram_small)
    small_ours = one("gram-ours", gram_small)
    # gram_m examples = k blocks of gram_small: k times the materialization, and k(k+1)/2 block
    # products (the symmetric half; the same flops per block), each timed at gram_small
    k = gram_m / gram_small
    scaled = k * small["materialize_seconds"] + k * (k + 1) / 2 * small["product_seconds"]
    rows["gram-materialized"] = {**small, "scaled_seconds": scaled, "small_ours": small_ours["seconds"]}
    rows["mlp-vmap"]["ratio"] = rows["mlp-vmap"]["scaled_seconds"] / rows["mlp-plain"]["seconds"]
    rows["gram-ours"]["speedup_vs_materialized"] = rows["gram-materialized"]["scaled_seconds"] / rows["gram-ours"]["seconds"]
    rows["gram-materialized"]["speedup_at_small_m"] = small["seconds"] / small_ours["seconds"]
    # the optional `bench` extra: BackPACK (paired with a plain pass, like ours) and Opacus (timed on
    # vmap_m examples and scaled, like vmap: it materializes per-example gradients)
    if importlib.util.find_spec("backpack") is not None:
        rows["mlp-backpack"] = one("mlp-backpack", m)
        echo(f"  {'':<22} paired plain fwd+bwd {rows['mlp-backpack']['baseline_seconds']:.3f} s, median ratio "
             f"{rows['mlp-backpack']['ratio']:.3f}; its Σ||g||² vs ours: relative difference "
             f"{rows['mlp-backpack']['sum_of_norm_sq_rel_diff']:.1e}")
    if importlib.util.find_spec("opacus") is not None:
        rows["mlp-opacus"] = one("mlp-opacus", vmap_m, 1)
        rows["mlp-opacus"]["scaled_seconds"] = rows["mlp-opacus"]["seconds"] * m / vmap_m
        rows["mlp-opacus"]["ratio"] = rows["mlp-opacus"]["scaled_seconds"] / rows["mlp-plain"]["seconds"]
    return rows


def markdown(rows: dict, *, m: int, gram_m: int, vmap_m: int, gram_small: int) -> str:
    """The results as a Markdown table."""
    def mib(name):
        return f"{rows[name]['peak_bytes'] / 2**20:.0f}"

    r = rows
    g = r["gram-materialized"]

    def paired(name):
        return f"**{r[name]['ratio']:.2f}×** (CPU time {r[name]['cpu_ratio']:.2f}×)"

    lines = [
        "| case | m | median wall time (s) | ratio to plain fwd+bwd (paired) | peak memory growth (MiB) |",
        "|---|---|---|---|---|",
        f"| MLP plain forward+backward | {m} | {r['mlp-plain']['seconds']:.3f} | 1 | {mib('mlp-plain')} |",
        f"| MLP exact m-coherence, model + per layer (one chunk) | {m} | {r['mlp-moments']['seconds']:.3f} | "
        f"{paired('mlp-moments')} | {mib('mlp-moments')} |",
        f"| same, chunks of 1000 | {m} | {r['mlp-moments-chunked']['seconds']:.3f} | "
        f"{paired('mlp-moments-chunked')} | {mib('mlp-moments-chunked')} |",
        f"| MLP torch.func vmap(grad) moments (timed on {vmap_m}, ×{m / vmap_m:g}) | {m} | "
        f"{r['mlp-vmap']['scaled_seconds']:.1f} | {r['mlp-vmap']['ratio']:.0f}× (vs the row above) | "
        f"{mib('mlp-vmap')} (at {vmap_m}) |",
        _backpack_row(r, m),
        _opacus_row(r, m, vmap_m),
        f"| CNN-BN plain forward+backward (eval) | {m} | {r['cnn-plain']['seconds']:.3f} | 1 | {mib('cnn-plain')} |",
        f"| CNN-BN exact m-coherence, model + per layer | {m} | {r['cnn-moments']['seconds']:.3f} | "
        f"{paired('cnn-moments')} | {mib('cnn-moments')} |",
        f"| MLP plain forward+backward | {gram_m} | {r['gram-plain']['seconds']:.3f} | 1 | {mib('gram-plain')} |",
        f"| MLP exact per-layer Gram block (capture) | {gram_m} | {r['gram-ours']['seconds']:.3f} | "
        f"{paired('gram-ours')} | {mib('gram-ours')} |",
        f"| MLP Gram from materialized per-example grads (timed at {gram_small}: materialize "
        f"{g['materialize_seconds']:.1f} s + products {g['product_seconds']:.1f} s; scaled by blocks) | {gram_m} | "
        f"{g['scaled_seconds']:.1f} | – | {mib('gram-materialized')} (at {gram_small}) |",
    ]
    lines += [
        "",
        f"Gram block: capture is **{r['gram-ours']['speedup_vs_materialized']:.0f}×** faster than materializing at "
        f"m = {gram_m} (scaled from m = {gram_small}); measured directly at m = {gram_small}: materialized "
        f"{g['seconds']:.2f} s vs capture {g['small_ours']:.3f} s = {g['speedup_at_small_m']:.0f}×.",
    ]
    return "\n".join(lines)


def _backpack_row(r: dict, m: int) -> str:
    if "mlp-backpack" not in r:
        return f"| MLP BackPACK BatchL2Grad | {m} | – | not installed (`make bench-extra`) | – |"
    b = r["mlp-backpack"]
    return (f"| MLP BackPACK BatchL2Grad (its Σ‖g‖² within {b['sum_of_norm_sq_rel_diff']:.0e} of ours) | {m} | "
            f"{b['seconds']:.3f} | {b['ratio']:.2f}× (CPU time {b['cpu_ratio']:.2f}×) | {b['peak_bytes'] / 2**20:.0f} |")


def _opacus_row(r: dict, m: int, vmap_m: int) -> str:
    if "mlp-opacus" not in r:
        return f"| MLP Opacus GradSampleModule moments | {m} | – | not installed (`make bench-extra`) | – |"
    o = r["mlp-opacus"]
    return (f"| MLP Opacus GradSampleModule moments (timed on {vmap_m}, ×{m / vmap_m:g}) | {m} | "
            f"{o['scaled_seconds']:.1f} | {o['ratio']:.0f}× (vs the first row) | {o['peak_bytes'] / 2**20:.0f} "
            f"(at {vmap_m}) |")


def _main() -> None:
    parser = argparse.ArgumentParser(description="one capture benchmark case (internal)")
    parser.add_argument("case")
    parser.add_argument("--m", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(case(args.case, m=args.m, device=args.device, repeats=args.repeats, data_dir=args.data_dir,
                          threads=args.threads)))


if __name__ == "__main__":
    _main()
