"""The parameter-centric engine on the models of issue 13: GPT-style LMs (untied, module-tied,
functionally tied, positions broadcast over the batch), attention and transformer layers, structured
outputs and dict inputs, Hugging Face GPT-2; every case against torch.func vmap(grad) in float64 or
a per-example loop, with the engine's own self-check (verify=True) on."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from capture_harness import ce_loss, check_all, oracle_grads, rel_err, sq_loss
from torch import nn

from gradstore.capture import Dense, Outer, capture, register_rule, unregister_rule
from gradstore.errors import CaptureError

VOCAB, D, T, M = 13, 8, 6, 5


class TinyGPT(nn.Module):
    """Token + position embeddings, one pre-norm block (hand-written attention), a head.

    ``tie``: "none" (own head), "module" (head.weight = tok.weight), "functional" (h @ tok.weight.T).
    ``positions``: "arange" (self.pos(torch.arange(T)), broadcast over the batch) or "given" (n, T).
    """

    def __init__(self, tie="none", positions="arange"):
        super().__init__()
        self.tie, self.positions = tie, positions
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T, D)
        self.ln = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tie == "module":
            self.head.weight = self.tok.weight

    def forward(self, idx, pos=None):
        n, t = idx.shape
        p = self.pos(torch.arange(t) if pos is None else pos)
        h = self.tok(idx) + p
        q, k, v = self.qkv(self.ln(h)).split(D, dim=-1)
        att = (q @ k.transpose(1, 2) / D**0.5).masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
        h = h + self.proj(att.softmax(-1) @ v)
        return h @ self.tok.weight.T if self.tie == "functional" else self.head(h)


def seq_loss(logits, targets):
    """Per-token cross entropy, mean over each sequence's non-ignored tokens: the example is the sequence."""
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-1)
    return per_token.sum(1) / (targets != -1).sum(1)


def _lm_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (M, T), generator=gen)
    targets = torch.randint(0, VOCAB, (M, T), generator=gen)
    targets[0, 4:] = -1  # padding
    return idx, targets


@pytest.mark.parametrize("tie", ["none", "module", "functional"])
def test_gpt_style_lm_is_exact(tie):
    torch.manual_seed(0)
    model = TinyGPT(tie).double()
    idx, targets = _lm_batch()
    res = check_all(model, seq_loss, idx, targets, rtol=1e-6)
    assert set(res.sq_norms) == {n for n, _ in model.named_parameters()}
    capture(model, seq_loss, idx, targets, verify=True)


def test_positions_given_per_example_are_exact():
    torch.manual_seed(1)
    model = TinyGPT("module", positions="given").double()
    idx, targets = _lm_batch(1)
    pos = torch.arange(T).expand(M, T)
    check_all(model, seq_loss, (idx, pos), targets, rtol=1e-6)


def test_the_tied_cross_term_is_what_the_old_engine_missed():
    """||g_emb + g_head||² ≠ ||g_emb||² + ||g_head||²: the engine's norm of the tied weight includes
    the cross term (a one-hot side against a dense side), which is not small here."""
    torch.manual_seed(2)
    model = TinyGPT("module").double()
    idx, targets = _lm_batch(2)
    res = check_all(model, seq_loss, idx, targets, rtol=1e-6)
    untied = TinyGPT("none").double()
    untied.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    untied.head.weight = nn.Parameter(model.tok.weight.detach().clone())
    parts = capture(untied, seq_loss, idx, targets)
    separate = parts.sq_norms["tok.weight"] + parts.sq_norms["head.weight"]
    assert (res.sq_norms["tok.weight"] - separate).abs().max() > 1e-3 * separate.max()


class EscapingPositions(nn.Module):
    """Positions consumed by something other than an elementwise op with the examples: refused."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, 3)

    def forward(self, idx):
        p = self.pos(torch.arange(idx.shape[1]))
        return self.head(self.tok(idx).mean(1) + p.mean(0))  # p.mean(0): no per-example use of p


def test_positions_without_an_example_axis_are_refused_with_the_fix():
    model = EscapingPositions().double()
    idx, _ = _lm_batch()
    with pytest.raises(CaptureError) as info:
        capture(model, ce_loss, idx, torch.randint(0, 3, (M,)))
    message = str(info.value)
    assert "\n" not in message and "'pos.weight'" in message and "mean" in message
    assert "position_ids of shape (n, T)" in message


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_options_are_exact(batch_first, need_weights):
    torch.manual_seed(3)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(D, 2, batch_first=batch_first, kdim=5, vdim=7)
            self.head = nn.Linear(D, 3)

        def forward(self, x, kv, mask):
            q = x if batch_first else x.transpose(0, 1)
            k, v = (kv[..., :5], kv[..., :7]) if batch_first else (kv[..., :5].transpose(0, 1), kv[..., :7].transpose(0, 1))
            out = self.attn(q, k, v, key_padding_mask=mask, need_weights=need_weights)[0]
            return self.head((out if batch_first else out.transpose(0, 1)).mean(1))

    model = Attn().double()
    x, kv = torch.randn(M, T, D, dtype=torch.float64), torch.randn(M, T + 1, 7, dtype=torch.float64)
    mask = torch.zeros(M, T + 1, dtype=torch.bool)
    mask[0, -2:] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # op rules only, no fallback
        check_all(model, ce_loss, (x, kv, mask), torch.randint(0, 3, (M,)), rtol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_bias_kv_is_exact_without_the_fallback(batch_first):
    """add_bias_kv: bias_k/bias_v are tiled over the examples by ``repeat(1, N, 1)`` inside
    F.multi_head_attention_forward; per operation, not through the module's torch.func fallback."""
    torch.manual_seed(5)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(D, 2, batch_first=batch_first, add_bias_kv=True)
            self.head = nn.Linear(D, 3)

        def forward(self, x):
            q = x if batch_first else x.transpose(0, 1)
            out = self.attn(q, q, q, need_weights=False)[0]
            return self.head((out if batch_first else out.transpose(0, 1)).mean(1))

    model = Attn().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # op rules only, no fallback
        check_all(model, ce_loss, torch.randn(M, T, D, dtype=torch.float64), torch.randint(0, 3, (M,)), rtol=1e-6)


@pytest.mark.parametrize("tile", ["expand", "repeat"])
def test_class_token_tiled_over_the_batch_is_exact(tile):
    """A ViT-style class token (1, 1, D) tiled to (n, 1, D) and prepended: exact per operation."""
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, D))
            self.mix = nn.Linear(D, D)
            self.head = nn.Linear(D, 3)

        def forward(self, x):
            n = x.shape[0]
            cls = self.cls.expand(n, -1, -1) if tile == "expand" else self.cls.repeat(n, 1, 1)
            h = torch.tanh(self.mix(torch.cat([cls, x], 1)))
            return self.head(h[:, 0] + h.mean(1))

    model = Net().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # op rules only, no fallback
        check_all(model, ce_loss, torch.randn(M, T, D, dtype=torch.float64), torch.randint(0, 3, (M,)), rtol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_and_decoder_layers_are_exact(batch_first):
    torch.manual_seed(4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=batch_first)
            self.dec = nn.TransformerDecoderLayer(D, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=True)
            self.head = nn.Linear(D, 3)

        def forward(self, x):
            x = x if batch_first else x.transpose(0, 1)
            mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
            h = self.dec(x, self.enc(x, src_mask=mask), tgt_mask=mask)
            return self.head((h if batch_first else h.transpose(0, 1)).mean(1))

    model = Net().double()
    check_all(model, ce_loss, torch.randn(M, T, D, dtype=torch.float64), torch.randint(0, 3, (M,)), rtol=1e-6)


# ---- structured outputs and inputs -------------------------------------------------------------


class PairLinear(nn.Module):
    """A module with parameters returning (y, {"aux": 2 x W^T, "const": ...}), with a rule taking the
    tuple of gradients (aux computed apart from y, so y's gradient does not include aux's)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x @ self.weight.T, {"aux": 2 * (x @ self.weight.T), "const": torch.ones(1)}


def _pair_rule(module, inputs, grad_output):
    assert isinstance(grad_output, tuple) and len(grad_output) == 3 and grad_output[2] is None
    b = grad_output[0] + 2 * grad_output[1]
    n = b.shape[0]
    return {"weight": Outer(b.reshape(n, 1, 1, 3), inputs[0].reshape(n, 1, 1, 4), (3, 4))}


def test_structured_outputs_reach_rules_as_a_tuple_per_leaf():
    register_rule(PairLinear)(_pair_rule)
    try:
        torch.manual_seed(5)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.pair = PairLinear()
                self.out = nn.Linear(3, 2)

            def forward(self, x):
                y, extra = self.pair(x)
                return {"logits": self.out(torch.tanh(y + extra["aux"]))}

        model = Net().double()
        x = torch.randn(M, 4, dtype=torch.float64)

        def loss(out, y):
            return ce_loss(out["logits"], y)

        check_all(model, loss, x, torch.randint(0, 2, (M,)), rtol=1e-6)
        res = capture(model, loss, x, torch.randint(0, 2, (M,)), verify=True)
        assert isinstance(res.outputs, dict) and not res.outputs["logits"].requires_grad
    finally:
        unregister_rule(PairLinear)


def test_dict_inputs_are_keyword_arguments():
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, D)
            self.out = nn.Linear(D, 3)

        def forward(self, input_ids, attention_mask):
            h = self.emb(input_ids) * attention_mask[..., None]
            return self.out(h.sum(1) / attention_mask.sum(1, keepdim=True))

    model = Net().double()
    ids, _ = _lm_batch()
    mask = torch.ones(M, T, dtype=torch.float64)
    mask[1, 3:] = 0
    y = torch.randint(0, 3, (M,))
    res = capture(model, ce_loss, {"input_ids": ids, "attention_mask": mask}, y, grads=True, verify=True)
    ref = capture(model, ce_loss, (ids, mask), y, grads=True)
    for name, g in ref.grads.items():
        torch.testing.assert_close(res.grads[name], g)


# ---- the self-check ---------------------------------------------------------------------------


class Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x * self.w


def test_verify_names_the_parameter_of_a_wrong_rule():
    @register_rule(Doubler)
    def wrong(module, inputs, grad_output):
        return {"w": Dense(2 * inputs[0] * grad_output)}  # twice the true gradient

    try:
        model = nn.Sequential(Doubler(), nn.Linear(3, 2)).double()
        x, y = torch.randn(M, 3, dtype=torch.float64), torch.randn(M, 2, dtype=torch.float64)
        capture(model, sq_loss, x, y)  # without the check, the wrong numbers pass
        with pytest.raises(CaptureError, match=r"verify: parameter '0\.w'.*relative"):
            capture(model, sq_loss, x, y, verify=True)
    finally:
        unregister_rule(Doubler)


def test_verify_catches_examples_swapped_by_a_rule():
    """Σ g is right but the per-example attribution is not: the second check catches it."""

    @register_rule(Doubler)
    def rolled(module, inputs, grad_output):
        return {"w": Dense((inputs[0] * grad_output).roll(1, 0))}

    try:
        model = nn.Sequential(Doubler(), nn.Linear(3, 2)).double()
        x, y = torch.randn(M, 3, dtype=torch.float64), torch.randn(M, 2, dtype=torch.float64)
        with pytest.raises(CaptureError, match=r"verify: parameter '0\.w': example 4"):
            capture(model, sq_loss, x, y, verify=True)
    finally:
        unregister_rule(Doubler)


# ---- Hugging Face GPT-2 -----------------------------------------------------------------------


def _gpt2(tie: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64,
                                     tie_word_embeddings=tie, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(7)
    return transformers.GPT2LMHeadModel(config).double()


def _gpt2_loss(out, labels):
    logits = out.logits[:, :-1]
    per_token = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
    return per_token.sum(1) / (labels[:, 1:] != -100).sum(1)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("positions", [False, True])
def test_hugging_face_gpt2_is_exact(tie, positions):
    """GPT2LMHeadModel from a config (random weights), dict inputs with an attention mask and padding,
    default positions (one (1, T) lookup broadcast over the batch) or explicit (n, T) position_ids;
    against a loop of single-example backward passes."""
    model = _gpt2(tie)
    m, t = 3, 9
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 256, (m, t), generator=gen)
    mask = torch.ones(m, t, dtype=torch.long)
    mask[0, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if positions:
        inputs["position_ids"] = torch.arange(t).expand(m, t)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        res = capture(model, _gpt2_loss, inputs, labels, grad_sum=True, verify=True)
    params = dict(model.named_parameters())
    assert ("lm_head.weight" in res.sq_norms) == (not tie)
    for n in range(m):
        one = {k: v[n:n + 1] for k, v in inputs.items()}
        loss = _gpt2_loss(model(**one), labels[n:n + 1]).sum()
        grads = torch.autograd.grad(loss, [params[k] for k in res.sq_norms], allow_unused=True)
        for name, g in zip(res.sq_norms, grads):
            expected = torch.zeros(()) if g is None else g.double().square().sum()
            got = res.sq_norms[name][n]
            assert abs(got - expected) <= 1e-6 * max(expected, 1e-12), (name, n, float(got), float(expected))


def test_a_rule_modules_parameter_used_inside_its_child_is_refused():
    """A Linear subclass (the Linear rule, by the MRO) handing its weight to a child: the rule would
    count the module's call and the child's operation would be counted again."""

    class Helper(nn.Module):
        def forward(self, x, w):
            return x @ w.T

    class Odd(nn.Linear):
        def __init__(self):
            super().__init__(4, 3, bias=False)
            self.helper = Helper()

        def forward(self, x):
            return self.helper(x, self.weight)

    model = nn.Sequential(Odd(), nn.Linear(3, 2)).double()
    with pytest.raises(CaptureError) as info:
        capture(model, sq_loss, torch.randn(M, 4, dtype=torch.float64), torch.randn(M, 2, dtype=torch.float64))
    message = str(info.value)
    assert "'0.weight'" in message and "'0.helper'" in message and "\n" not in message


@pytest.mark.parametrize("break_even", [0.0, float("inf")])
@pytest.mark.parametrize("t, r, c, groups", [(1, 5, 3, 1), (7, 5, 3, 1), (4, 6, 2, 3), (0, 4, 4, 1)])
def test_sum_and_sq_norms_take_either_form_exactly(monkeypatch, break_even, t, r, c, groups):
    """Σ g and ||g_n||² from one pass of blocks (blocks of 2 examples here) or apart: both equal the
    materialized gradients' (float64), whichever form the rule picks."""
    from gradstore.capture import factors

    monkeypatch.setattr(factors, "JOINT_BREAK_EVEN", break_even)
    monkeypatch.setattr(factors, "JOINT_BLOCK_ELEMENTS", 2 * groups * r * c)
    gen = torch.Generator().manual_seed(t + r)
    n = 5
    left = torch.randn(n, t, groups, r, generator=gen, dtype=torch.float64)
    right = torch.randn(n, t, groups, c, generator=gen, dtype=torch.float64)
    factor = Outer(left, right, (groups * r, c))
    g = torch.einsum("ntgr,ntgc->ngrc", left, right).reshape(n, -1)
    total, norms = factor.sum_and_sq_norms()
    assert factor._joint_materialize_cheaper() == (t > 1 and break_even == 0.0)
    torch.testing.assert_close(total.reshape(-1), g.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norms, (g * g).sum(1), rtol=1e-12, atol=1e-12)


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoderLayer (its attention's weights are functional uses of F.linear) and a head."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, D)
        self.layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(D, 3)

    def forward(self, idx):
        h = self.emb(idx)
        h = self.layer(h if self.batch_first else h.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("case", ["none", "module", "functional", "encoder-batch-first", "encoder-seq-first"])
def test_parameters_finished_inside_the_backward_pass_are_exact(case):
    """Without verify, each parameter is finished inside the backward pass as soon as its uses'
    gradients have arrived (tied, functional and attention uses included) and its records are
    released; check_all runs with verify=True, which defers every parameter to the end, so this
    checks the in-pass path against the oracle."""
    torch.manual_seed(0)
    idx, targets = _lm_batch()
    if case.startswith("encoder"):
        model, loss_fn, targets = EncoderClassifier(case == "encoder-batch-first").double().eval(), ce_loss, targets[:, 0] % 3
    else:
        model, loss_fn = TinyGPT(case).double(), seq_loss
    ref = oracle_grads(model, loss_fn, idx, targets)
    res = capture(model, loss_fn, idx, targets, grad_sum=True, dot_with="sum")
    for name, g in ref.items():
        flat = g.flatten(1)
        total = flat.sum(0)
        assert rel_err(res.sq_norms[name], flat.square().sum(1)) < 1e-10, name
        assert rel_err(res.grad_sum[name].flatten(), total) < 1e-10, name
        assert rel_err(res.dots[name], flat @ total) < 1e-10, name
