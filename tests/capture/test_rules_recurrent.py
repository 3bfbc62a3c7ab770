"""nn.RNN / nn.LSTM / nn.GRU rule, called directly, against a per-example loop of single-example
backward passes in float64 (vmap cannot run the fused recurrent kernels).

The rule is called as the engine calls it for a module with a structured output: ``inputs`` the
positional arguments (detached), ``grad_output`` one gradient per tensor leaf of the output in
``torch.utils._pytree.tree_flatten`` order (None where no gradient reached that leaf).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rules_harness import check_factors, loop_grads
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils._pytree import tree_flatten

from gradstore.capture.registry import lookup_rule
from gradstore.errors import CaptureError

KINDS = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_detached(v) for v in value)
    return value


def _loss(module, out, targets, lengths, batch_first, use_hidden):
    """Per-example losses: squared error of the padded output on valid steps (+ of h_n, c_n)."""
    seq, hidden = out
    if lengths is not None:
        seq = pad_packed_sequence(seq, batch_first=True)[0]
    elif not batch_first:
        seq = seq.transpose(0, 1)
    losses = ((seq - targets[0][:, : seq.shape[1]]) ** 2).flatten(1).sum(1)
    if use_hidden:
        for state, target in zip(hidden if isinstance(hidden, tuple) else (hidden,), targets[1:]):
            losses = losses + (torch.sin(state).transpose(0, 1) * target).flatten(1).sum(1)
    return losses


def _run(module, x, hx, lengths, batch_first):
    if lengths is not None:
        x = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    return (module(x) if hx is None else module(x, hx)), x


def check_recurrent(kind, *, m=3, steps=4, i=3, hidden=4, layers=1, bidirectional=False, batch_first=False,
                    with_h0=False, bias=True, packed=False, proj=0, use_hidden=True, nonlinearity="tanh", seed=0):
    torch.manual_seed(seed)
    kwargs = {"bias": bias, "batch_first": batch_first, "bidirectional": bidirectional, "num_layers": layers}
    if kind == "LSTM" and proj:
        kwargs["proj_size"] = proj
    if kind == "RNN":
        kwargs["nonlinearity"] = nonlinearity
    module = KINDS[kind](i, hidden, **kwargs).double().eval()
    dirs = 2 if bidirectional else 1
    state = proj or hidden
    xb = torch.randn(m, steps, i, dtype=torch.float64)  # batch-major copy for the oracle
    x = xb if batch_first else xb.transpose(0, 1)
    lengths = torch.randint(1, steps + 1, (m,)) if packed else None
    if packed:
        lengths[0] = steps
    hx = None
    if with_h0:
        h0 = torch.randn(layers * dirs, m, state, dtype=torch.float64)
        hx = (h0, torch.randn(layers * dirs, m, hidden, dtype=torch.float64)) if kind == "LSTM" else h0
    targets = [torch.randn(m, steps, dirs * state, dtype=torch.float64),
               torch.randn(m, layers * dirs, state, dtype=torch.float64)]
    if kind == "LSTM":
        targets.append(torch.randn(m, layers * dirs, hidden, dtype=torch.float64))

    out, packed_x = _run(module, x, hx, lengths, batch_first)
    loss = _loss(module, out, targets, lengths, batch_first, use_hidden).sum()
    leaves, _ = tree_flatten(out)
    grads = torch.autograd.grad(loss, [v for v in leaves if v.requires_grad], allow_unused=True)
    grads = iter(grads)
    grad_output = tuple(next(grads) if v.requires_grad else None for v in leaves)
    inputs = (_detached(packed_x),) if hx is None else (_detached(packed_x), _detached(hx))
    factors = lookup_rule(type(module))(module, inputs, grad_output)

    def one(j):
        length = steps if lengths is None else int(lengths[j])
        xj = xb[j:j + 1, :length]
        xj = xj if batch_first else xj.transpose(0, 1)
        hj = None
        if hx is not None:
            hj = (hx[0][:, j:j + 1], hx[1][:, j:j + 1]) if kind == "LSTM" else hx[:, j:j + 1]
        outj = module(xj) if hj is None else module(xj, hj)
        return _loss(module, outj, [t[j:j + 1] for t in targets], None, batch_first, use_hidden).sum()

    params = dict(module.named_parameters())
    ref = loop_grads(params, one, m)
    check_factors(factors, ref, rtol=1e-6, seed=seed)
    return factors


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), m=st.integers(1, 3), steps=st.integers(1, 4), layers=st.integers(1, 2),
       bidirectional=st.booleans(), batch_first=st.booleans(), with_h0=st.booleans(), bias=st.booleans(),
       packed=st.booleans(), use_hidden=st.booleans(), seed=st.integers(0, 3))
def test_recurrent_shapes(kind, m, steps, layers, bidirectional, batch_first, with_h0, bias, packed, use_hidden, seed):
    check_recurrent(kind, m=m, steps=steps, layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                    with_h0=with_h0, bias=bias, packed=packed, use_hidden=use_hidden, seed=seed)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_recurrent_two_layers_bidirectional_packed(kind):
    factors = check_recurrent(kind, m=4, steps=5, layers=2, bidirectional=True, with_h0=True, packed=True)
    assert "weight_hh_l1_reverse" in factors


def test_rnn_relu():
    check_recurrent("RNN", layers=2, bidirectional=True, nonlinearity="relu", with_h0=True)


@pytest.mark.parametrize("packed", [False, True])
def test_lstm_proj_size(packed):
    factors = check_recurrent("LSTM", m=3, steps=4, hidden=5, proj=2, layers=2, bidirectional=True, with_h0=True,
                              packed=packed, batch_first=True)
    assert factors["weight_hr_l1_reverse"].materialize().shape == (3, 2, 5)


def test_only_the_output_reaches_the_loss():
    check_recurrent("LSTM", m=2, steps=3, use_hidden=False)


def test_dropout_in_training_mode_is_refused():
    module = nn.GRU(3, 4, num_layers=2, dropout=0.5).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, h = module(x)
    with pytest.raises(CaptureError, match="eval mode"):
        lookup_rule(nn.GRU)(module, (x,), (torch.ones_like(out), None))


def test_unbatched_input_is_refused():
    module = nn.RNN(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    out, h = module(x)
    with pytest.raises(CaptureError, match="batched"):
        lookup_rule(nn.RNN)(module, (x,), (torch.ones_like(out), None))


# ---- end to end: capture() on models with recurrent layers, against a per-example loop ------------


class Classifier(nn.Module):
    """A recurrent encoder (any kind, optional h0) and a linear head on the last step and on h_n."""

    def __init__(self, kind, **kwargs):
        super().__init__()
        self.rnn = KINDS[kind](3, 4, **kwargs)
        dirs = 2 if kwargs.get("bidirectional") else 1
        self.head = nn.Linear(4 * dirs + 4, 2)

    def forward(self, x, *h0):  # x batch-major (capture reads the examples off the first input's axis 0)
        out, hidden = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1), *h0)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        last = out[:, -1] if self.rnn.batch_first else out[-1]
        return self.head(torch.cat([last, torch.tanh(h_n[-1])], 1))


def _sq(outputs, targets):
    return ((outputs - targets) ** 2).sum(1)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(("batch_first", "with_h0"), [(True, False), (True, True), (False, True)])
def test_capture_end_to_end(kind, batch_first, with_h0):
    from rules_harness import check_capture_by_loop

    torch.manual_seed(7)
    model = Classifier(kind, batch_first=batch_first, num_layers=2, bidirectional=True).double()
    m = 3
    x = torch.randn(m, 5, 3, dtype=torch.float64)
    y = torch.randn(m, 2, dtype=torch.float64)
    h0 = ()
    if with_h0:
        h = torch.randn(4, m, 4, dtype=torch.float64)
        h0 = ((h, torch.randn(4, m, 4, dtype=torch.float64)),) if kind == "LSTM" else (h,)

    def example(j):
        xj = x[j:j + 1]
        hj = tuple(tuple(s[:, j:j + 1] for s in h) if isinstance(h, tuple) else h[:, j:j + 1] for h in h0)
        return (xj, *hj), y[j:j + 1]

    check_capture_by_loop(model, _sq, (x, *h0), y, example, rtol=1e-6)


class PackedClassifier(nn.Module):
    """Padded batch-major input and lengths, packed inside the model; a head on h_n."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.rnn(packed)
        return self.head(torch.cat([h_n[0], h_n[1]], 1))


def test_capture_end_to_end_packed():
    from rules_harness import check_capture_by_loop

    torch.manual_seed(8)
    model = PackedClassifier().double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    y = torch.randn(3, 2, dtype=torch.float64)

    def example(j):
        return (x[j:j + 1, : int(lengths[j])], lengths[j:j + 1]), y[j:j + 1]

    check_capture_by_loop(model, _sq, (x, lengths), y, example, rtol=1e-6)


class LastState(nn.Module):
    """The usual sequence classifier: a head on h_n only (the output sequence gets no gradient)."""

    def __init__(self, kind):
        super().__init__()
        self.rnn = KINDS[kind](3, 4, batch_first=True, num_layers=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        _, hidden = self.rnn(x)
        return self.head((hidden[0] if isinstance(hidden, tuple) else hidden)[-1])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_capture_classifier_on_last_state(kind):
    from rules_harness import check_capture_by_loop

    torch.manual_seed(9)
    model = LastState(kind).double()
    x, y = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    check_capture_by_loop(model, _sq, x, y, lambda j: (x[j:j + 1], y[j:j + 1]), rtol=1e-6)


class TwoSequences(nn.Module):
    """One GRU applied to two sequences of each example (its uses' factors concatenate over time)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, a, b):
        return self.head(torch.cat([self.rnn(a)[1][-1], self.rnn(b)[0][:, -1]], 1))


def test_capture_module_used_twice():
    from rules_harness import check_capture_by_loop

    torch.manual_seed(10)
    model = TwoSequences().double()
    a, b = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 2, 3, dtype=torch.float64)
    y = torch.randn(3, 2, dtype=torch.float64)
    check_capture_by_loop(model, _sq, (a, b), y, lambda j: ((a[j:j + 1], b[j:j + 1]), y[j:j + 1]), rtol=1e-6)


# ---- cells in the user's own loop --------------------------------------------------------------

CELLS = {"RNNCell": nn.RNNCell, "LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell}


class CellLoop(nn.Module):
    """A cell stepped over time by hand, from a given or a zero state; a head on the last state and,
    for an LSTM cell, on the last cell state too (so both of its outputs carry gradient)."""

    def __init__(self, kind, bias):
        super().__init__()
        self.cell = CELLS[kind](3, 4, bias=bias)
        self.head = nn.Linear(4, 2)

    def forward(self, x, *h0):
        state = h0[0] if h0 else None
        if isinstance(self.cell, nn.LSTMCell) and h0:
            state = (h0[0], torch.zeros_like(h0[0]))
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        if isinstance(state, tuple):
            return self.head(state[0]) + torch.sin(state[1]).sum(1, keepdim=True)
        return self.head(state)


@pytest.mark.parametrize("kind", sorted(CELLS))
@pytest.mark.parametrize(("bias", "with_h0"), [(True, False), (False, True)])
def test_cell_loop_end_to_end(kind, bias, with_h0):
    from rules_harness import check_capture_by_loop

    torch.manual_seed(11)
    model = CellLoop(kind, bias).double()
    x, y = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    h0 = (torch.randn(3, 4, dtype=torch.float64),) if with_h0 else ()
    check_capture_by_loop(model, _sq, (x, *h0), y,
                          lambda j: ((x[j:j + 1], *(h[j:j + 1] for h in h0)), y[j:j + 1]), rtol=1e-6)


def test_unbatched_cell_input_is_refused():
    cell = nn.GRUCell(3, 4).double()
    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(CaptureError, match="batched"):
        lookup_rule(nn.GRUCell)(cell, (x,), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_float32_kernels(kind):
    """float32 on the CPU runs other kernels (oneDNN for nn.LSTM; a cell whose h' is computed from
    c' by separate operations, so c''s recorded gradient already holds h''s): both stay exact."""
    from rules_harness import check_capture_by_loop

    torch.manual_seed(12)
    model = CellLoop(kind, True) if kind == "LSTMCell" else Classifier(kind, batch_first=True, num_layers=2)
    x, y = torch.randn(4, 5, 3), torch.randn(4, 2)
    check_capture_by_loop(model, _sq, x, y, lambda j: (x[j:j + 1], y[j:j + 1]), rtol=1e-4)


class KeywordState(nn.Module):
    """h0 passed by keyword, to a whole-sequence module and to a cell: rnn(x, hx=h0), cell(x_t, hx=h)
    (the engine binds it to its position; without that, or the rules reading kwargs, h0 would be lost)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.cell = nn.GRUCell(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, h0, c0):
        out, _ = self.rnn(x, hx=(h0[None], c0[None]))
        h = h0
        for t in range(out.shape[1]):
            h = self.cell(out[:, t], hx=h)
        return self.head(h)


def test_initial_state_by_keyword():
    from rules_harness import check_capture_by_loop

    torch.manual_seed(13)
    model = KeywordState().double()
    x, h0, c0 = (torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64),
                 torch.randn(3, 4, dtype=torch.float64))
    y = torch.randn(3, 2, dtype=torch.float64)
    check_capture_by_loop(model, _sq, (x, h0, c0), y,
                          lambda j: ((x[j:j + 1], h0[j:j + 1], c0[j:j + 1]), y[j:j + 1]), rtol=1e-6)


@pytest.mark.parametrize("contiguous", [False, True])
def test_learned_initial_state_tiled_over_the_batch_is_exact(contiguous):
    """A learned (layers, 1, hidden) h0/c0 expanded to the batch, ``self.h0.expand(-1, n, -1)``:
    the examples are on its axis 1; the expansion is example data (g_n = the slice of example n of
    the LSTM's gradient with respect to its initial state), against a per-example loop."""
    import warnings

    from rules_harness import check_capture_by_loop

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.h0 = nn.Parameter(torch.randn(2, 1, 6))
            self.c0 = nn.Parameter(torch.randn(2, 1, 6))
            self.rnn = nn.LSTM(4, 6, num_layers=2, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            n = x.shape[0]
            h0, c0 = self.h0.expand(-1, n, -1), self.c0.expand(-1, n, -1)
            if contiguous:
                h0, c0 = h0.contiguous(), c0.contiguous()
            return self.head(self.rnn(x, (h0, c0))[0][:, -1])

    model = Net().double().eval()
    x, y = torch.randn(5, 7, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)

    def loss(out, target):
        return ((out - target) ** 2).sum(1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rules and op rules only, no fallback
        check_capture_by_loop(model, loss, x, y, lambda j: (x[j:j + 1], y[j:j + 1]), rtol=1e-6)
