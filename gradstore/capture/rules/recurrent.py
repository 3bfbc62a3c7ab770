"""``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (and their cells): per-example gradients of recurrent weights.

Index letters: n = example, t = time step, g = gate pre-activation (G = gates × hidden), i = layer
input feature, j = recurrent state feature (hidden, or ``proj_size`` for a projected LSTM), u = LSTM
cell output feature (before the projection). For layer k and direction d, with layer input x
(n,t,i), previous state h_{t-1} (n,t,j) (h_{-1} = h0) and the gradients of the summed loss with
respect to the gate pre-activations, dz (n,t,g) for the input part ``x W_ih^T + b_ih`` and dz'
(n,t,g) for the recurrent part ``h W_hh^T + b_hh``:

    weight_ih g_n[g, i] = sum_t dz[n,t,g] x[n,t,i]         (Outer, L = dz,  R = x)
    weight_hh g_n[g, j] = sum_t dz'[n,t,g] h[n,t-1,j]      (Outer, L = dz', R = h_{t-1})
    bias_ih   g_n[g]    = sum_t dz[n,t,g]                  (Dense)
    bias_hh   g_n[g]    = sum_t dz'[n,t,g]                 (Dense)
    weight_hr g_n[j, u] = sum_t dp[n,t,j] c[n,t,u]         (LSTM proj_size: p = c W_hr^T, c = o·tanh(cell))

dz' = dz for RNN and LSTM; for GRU the candidate gate's recurrent part is scaled by the reset gate,
n_t = tanh(x W_in^T + b_in + r_t (h W_hn^T + b_hn)), so dz'_n = dz_n · r_t. Each example's
gradient depends only on its own sequence, so the gradient of the summed loss with respect to an
example's pre-activation is that example's own.

The rule recomputes the recurrence with explicit operations (under ``enable_grad``, from the
detached inputs and detached weights) and differentiates the module's output leaves against the
recorded output gradients with respect to the per-step pre-activations only: no weight gradient is
formed. Called as ``rule(module, inputs, grad_output)`` with ``grad_output`` a tuple with one entry
per tensor leaf of the module's output in ``torch.utils._pytree.tree_flatten`` order (None where no
gradient reached that leaf): the output (or a ``PackedSequence``'s data), any packed-sequence index
leaves, then h_n (and c_n for LSTM), which are (layers × directions, n, j) -- examples on axis 1.
``inputs`` are the positional arguments: the input (padded tensor or ``PackedSequence``) and
optionally h0 (LSTM: (h0, c0)); the engine binds ``hx=`` given by keyword to its position, and the
rules (registered with ``kwargs=True``) also read it from the keyword arguments, whichever arrives.

Packed sequences are supported: the recurrence runs on the padded batch, and a step past an
example's length leaves its state unchanged (so the reverse direction starts at the example's last
step), which gives zero gate gradients there.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from gradstore.capture.factors import Dense, Outer
from gradstore.capture.registry import register_rule
from gradstore.errors import CaptureError


def _split_grads(module, grad_output, n_hidden):
    """(grad of the output or its packed data, [grads of h_n (, c_n)]) from the leaf-gradient tuple."""
    if isinstance(grad_output, torch.Tensor) or grad_output is None:
        return grad_output, [None] * n_hidden
    grads = list(grad_output)
    if len(grads) < 1 + n_hidden:
        raise CaptureError(
            f"{type(module).__name__} rule expected output-leaf gradients (output, h_n{', c_n' if n_hidden == 2 else ''}), "
            f"got {len(grads)}; the capture engine must pass one gradient per output tensor leaf"
        )
    return grads[0], grads[len(grads) - n_hidden:]


def _padded(module, x, grad_out):
    """Time-major padded input (T, n, i), the output gradient in the same layout, and the step mask."""
    if isinstance(x, PackedSequence):
        padded, lengths = pad_packed_sequence(x)  # (T, n, i), original example order
        if grad_out is not None:
            grad_out = pad_packed_sequence(PackedSequence(grad_out, x.batch_sizes, x.sorted_indices,
                                                          x.unsorted_indices))[0]
        steps = torch.arange(padded.shape[0], device=lengths.device)
        mask = (steps[:, None] < lengths[None, :]).to(padded.device)  # (T, n)
        return padded, grad_out, mask
    if x.dim() != 3:
        raise CaptureError(
            f"{type(module).__name__} input of shape {tuple(x.shape)} has no example axis; capture "
            "needs batched inputs (examples on the batch axis)"
        )
    if module.batch_first:
        x = x.transpose(0, 1)
        grad_out = None if grad_out is None else grad_out.transpose(0, 1)
    return x, grad_out, None


def _initial(module, hx):
    """Initial states (h0, c0), each (layers × directions, n, ·), or None where not given."""
    if hx is None:
        return None, None
    if isinstance(module, nn.LSTM):
        h0, c0 = hx
        return h0, c0
    return hx, None


def _weights(module, k, suffix):
    def get(name):
        value = getattr(module, f"{name}_l{k}{suffix}", None)
        return None if value is None else value.detach()

    return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")


def _cell(module, kind, xp, h, c, w_hh, b_hh, w_hr, record):
    """One step of the recurrence from the input pre-activation ``xp`` (n, G); returns (h, c)."""
    if kind != "GRU":  # b_hh is folded into xp: z = xp + h W_hh^T, one addmm
        z = torch.addmm(xp, h, w_hh.T)
    else:
        gh = torch.addmm(b_hh, h, w_hh.T) if b_hh is not None else h @ w_hh.T
    if kind == "LSTM":
        i, f, _, o = torch.sigmoid(z).chunk(4, 1)  # chunks, not slices: one backward node each
        g = torch.tanh(z.chunk(4, 1)[2])
        c = f * c + i * g
        out = o * torch.tanh(c.detach() if record.get("cut_c") else c)
        if w_hr is not None:
            record["cell_out"].append(out.detach())
            out = out @ w_hr.T
            record["proj"].append(out)
        return out, c
    if kind == "GRU":
        xr, xz, xn = xp.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        record["reset"].append(r.detach())
        cand = torch.tanh(xn + r * hn)
        return cand + z * (h - cand), None
    return (torch.tanh(z) if module.nonlinearity == "tanh" else torch.relu(z)), None


def _direction(module, kind, x, h, c, mask, weights, reverse):
    """Run one layer in one direction over time-major ``x`` (T, n, i); returns outputs, states, record."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    xp = x @ w_ih.T
    if b_ih is not None:  # RNN and LSTM add both biases before any nonlinearity: fold b_hh in here
        xp = xp + (b_ih if kind == "GRU" else b_ih + b_hh)
    if not xp.requires_grad:
        xp.requires_grad_(True)  # a leaf: the gradient w.r.t. it is dz
    record = {"h_prev": [], "cell_out": [], "proj": [], "reset": []}
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs = [None] * x.shape[0]
    per_step = xp.unbind(0)  # one backward node for all steps (indexing xp[t] would zero-fill T times)
    for t in steps:
        record["h_prev"].append(h.detach())
        h_new, c_new = _cell(module, kind, per_step[t], h, c, w_hh, b_hh, w_hr, record)
        if mask is not None:  # past an example's length its state stays as it was
            keep = mask[t][:, None]
            h_new = torch.where(keep, h_new, h)
            if c_new is not None:
                c_new = torch.where(keep, c_new, c)
        h, c = h_new, c_new
        outputs[t] = h
    if reverse:
        for key in ("h_prev", "cell_out", "proj", "reset"):
            record[key].reverse()
    return torch.stack(outputs), h, c, xp, record


def _batch_major(seq):
    """(T, n, ·) list or tensor -> (n, T, 1, ·)."""
    if isinstance(seq, list):
        seq = torch.stack(seq)
    return seq.transpose(0, 1).unsqueeze(2)


def _bound(inputs, kwargs):
    """``(input, hx)`` of a call ``module(input, hx=None)``, ``input`` and ``hx`` positional or by keyword."""
    kwargs = kwargs or {}
    x = inputs[0] if inputs else kwargs.get("input")
    hx = inputs[1] if len(inputs) > 1 else kwargs.get("hx")
    return x, hx


def recurrent_rule(module, inputs, grad_output, kwargs=None):
    """Factors of every ``weight_*`` (Outer over time steps) and ``bias_*`` (Dense) of the module."""
    kind = "LSTM" if isinstance(module, nn.LSTM) else "GRU" if isinstance(module, nn.GRU) else "RNN"
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise CaptureError(
            f"{type(module).__name__}(dropout={module.dropout}) in training mode drops units at random "
            "between layers, so a recomputation cannot reproduce the pass; capture in eval mode"
        )
    n_hidden = 2 if kind == "LSTM" else 1
    grad_out, grad_hidden = _split_grads(module, grad_output, n_hidden)
    x, hx = _bound(inputs, kwargs)
    x, grad_out, mask = _padded(module, x, grad_out)
    n = x.shape[1]
    h0, c0 = _initial(module, hx)
    dirs = 2 if module.bidirectional else 1
    proj = getattr(module, "proj_size", 0) or 0
    state_dim = proj or module.hidden_size
    dtype, device = x.dtype, x.device

    factors, probes, records = {}, [], []
    finals_h, finals_c = [], []
    with torch.enable_grad():
        layer_in = x
        for k in range(module.num_layers):
            outs = []
            for d in range(dirs):
                suffix = "_reverse" if d else ""
                weights = _weights(module, k, suffix)
                idx = k * dirs + d
                h = h0[idx] if h0 is not None else x.new_zeros(n, state_dim)
                c = None
                if kind == "LSTM":
                    c = c0[idx] if c0 is not None else x.new_zeros(n, module.hidden_size)
                out, h, c, xp, record = _direction(module, kind, layer_in, h, c, mask, weights, reverse=bool(d))
                outs.append(out)
                finals_h.append(h)
                finals_c.append(c)
                probes.append(xp)
                records.append((k, suffix, layer_in.detach(), weights, record))
            layer_in = torch.cat(outs, 2) if dirs == 2 else outs[0]
            if mask is not None:
                layer_in = layer_in * mask[..., None].to(dtype)
        roots, root_grads = [], []
        pairs = [(layer_in, grad_out), (torch.stack(finals_h), grad_hidden[0])]
        if kind == "LSTM":
            pairs.append((torch.stack(finals_c), grad_hidden[1]))
        for value, grad in pairs:
            if grad is not None:
                roots.append(value)
                root_grads.append(grad.to(dtype=dtype, device=device))
        proj_outs = [p for *_, record in records for p in record["proj"]]
        wanted = probes + proj_outs
        if roots:
            grads = torch.autograd.grad(roots, wanted, root_grads, allow_unused=True)
        else:
            grads = [None] * len(wanted)
    dzs, dps = grads[:len(probes)], list(grads[len(probes):])
    for (k, suffix, layer_x, weights, record), xp, dz in zip(records, probes, dzs):
        w_ih, w_hh, b_ih, b_hh, w_hr = weights
        if dz is None:
            dz = torch.zeros_like(xp)
        dz = dz.detach()
        if kind == "GRU":
            hidden = module.hidden_size
            reset = torch.stack(record["reset"])
            dzh = torch.cat([dz[..., :2 * hidden], dz[..., 2 * hidden:] * reset], 2)
        else:
            dzh = dz
        left, left_h = _batch_major(dz), _batch_major(dzh)
        name = f"l{k}{suffix}"
        factors[f"weight_ih_{name}"] = Outer(left, _batch_major(layer_x), tuple(w_ih.shape))
        factors[f"weight_hh_{name}"] = Outer(left_h, _batch_major(record["h_prev"]), tuple(w_hh.shape))
        if b_ih is not None:
            factors[f"bias_ih_{name}"] = Dense(dz.sum(0))
            factors[f"bias_hh_{name}"] = Dense(dzh.sum(0))
        if w_hr is not None:
            steps = len(record["proj"])
            dp = [g if g is not None else torch.zeros_like(p) for g, p in zip(dps[:steps], record["proj"])]
            del dps[:steps]
            factors[f"weight_hr_{name}"] = Outer(_batch_major(dp), _batch_major(record["cell_out"]),
                                                 tuple(w_hr.shape))
    return factors


register_rule(nn.RNN, nn.LSTM, nn.GRU, kwargs=True)(recurrent_rule)


# ---- cells: one step, called by the user's own loop (the engine adds the calls' factors over time) ----


def _c_feeds_h(module, x, h, c) -> bool:
    """Whether this LSTMCell kernel (device, dtype) computes h' from c' by separate autograd operations.

    One probe step of the kernel the module calls (``torch.lstm_cell``, not the module, whose hooks
    capture owns) on the first example: c' strictly below h' in the graph means the gradient
    recorded at c' includes what reached h'.
    """
    bias = [None, None] if module.bias_ih is None else [module.bias_ih.detach(), module.bias_hh.detach()]
    with torch.enable_grad():
        probe = x[:1].detach().clone().requires_grad_(True)
        h2, c2 = torch.lstm_cell(probe, (h[:1], c[:1]), module.weight_ih.detach(), module.weight_hh.detach(), *bias)
    target, stack, seen = c2.grad_fn, [h2.grad_fn], set()
    if target is None or target is h2.grad_fn:
        return False
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node is target:
            return True
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return False


def cell_rule(module, inputs, grad_output, kwargs=None):
    """Factors of ``weight_ih``, ``weight_hh`` (Outer, one position per call) and the biases (Dense).

    ``nn.RNNCell`` / ``nn.GRUCell`` return h' (``grad_output`` a tensor), ``nn.LSTMCell`` (h', c')
    (a tuple of two gradients). A cell called at every step of a loop has one use per step; the
    engine merges the uses' Outer factors by concatenating positions, which is the sum over time.
    """
    kind = "LSTM" if isinstance(module, nn.LSTMCell) else "GRU" if isinstance(module, nn.GRUCell) else "RNN"
    x, hx = _bound(inputs, kwargs)
    if x.dim() != 2:
        raise CaptureError(
            f"{type(module).__name__} input of shape {tuple(x.shape)} has no example axis; capture needs "
            "batched inputs (examples first)"
        )
    n = x.shape[0]
    if kind == "LSTM":
        h, c = hx if hx is not None else (None, None)
        grads = list(grad_output) if isinstance(grad_output, (tuple, list)) else [grad_output, None]
    else:
        h, c = hx, None
        grads = [grad_output]
    h = x.new_zeros(n, module.hidden_size) if h is None else h
    if kind == "LSTM" and c is None:
        c = x.new_zeros(n, module.hidden_size)
    w_ih, w_hh = module.weight_ih.detach(), module.weight_hh.detach()
    b_ih = None if module.bias_ih is None else module.bias_ih.detach()
    b_hh = None if module.bias_hh is None else module.bias_hh.detach()
    # An LSTMCell's c' gradient already holds the path through h' when the kernel computes h' from
    # c' as separate autograd operations (the CPU one does; a fused kernel's outputs are independent):
    # then h' must not pass gradient to c' a second time here.
    c_holds_h = kind == "LSTM" and grads[0] is not None and grads[1] is not None and _c_feeds_h(module, x, h, c)
    with torch.enable_grad():
        xp = x @ w_ih.T
        if b_ih is not None:
            xp = xp + (b_ih if kind == "GRU" else b_ih + b_hh)
        xp.requires_grad_(True)  # a leaf: the gradient w.r.t. it is dz
        record = {"reset": [], "cut_c": c_holds_h}
        h_new, c_new = _cell(module, kind, xp, h, c, w_hh, b_hh, None, record)
        pairs = [(v, g) for v, g in zip((h_new, c_new), grads) if g is not None]
        if not pairs:
            return {}
        (dz,) = torch.autograd.grad([v for v, _ in pairs], [xp], [g.to(xp.dtype) for _, g in pairs])
    if kind == "GRU":
        hidden = module.hidden_size
        dzh = torch.cat([dz[:, :2 * hidden], dz[:, 2 * hidden:] * record["reset"][0]], 1)
    else:
        dzh = dz
    factors = {
        "weight_ih": Outer(dz[:, None, None, :], x[:, None, None, :], tuple(w_ih.shape)),
        "weight_hh": Outer(dzh[:, None, None, :], h.detach()[:, None, None, :], tuple(w_hh.shape)),
    }
    if b_ih is not None:
        factors["bias_ih"], factors["bias_hh"] = Dense(dz), Dense(dzh)
    return factors


register_rule(nn.RNNCell, nn.LSTMCell, nn.GRUCell, kwargs=True)(cell_rule)
