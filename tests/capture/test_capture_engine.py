"""The engine on a model mixing every supported layer, a reused module, frozen parameters and a
fallback module; run-state restoration; the registry; errors."""

import copy
import warnings

import pytest
import torch
from capture_harness import ce_loss, check_all, oracle_grads, rel_err, sq_loss
from mixed_models import Mixed, Scale, mixed_batch
from torch import nn

from gradstore.capture import (
    CaptureFallbackWarning,
    Dense,
    capture,
    lookup_rule,
    per_example_grads,
    per_example_sq_norms,
    register_rule,
    unregister_rule,
)
from gradstore.capture import fallback as fallback_module
from gradstore.errors import CaptureError


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    fallback_module._WARNED.clear()
    yield
    fallback_module._WARNED.clear()


def _mixed(dtype):
    torch.manual_seed(0)
    return Mixed().to(dtype)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_mixed_model_every_quantity(dtype, rtol):
    model = _mixed(dtype)
    inputs, targets = mixed_batch(6, dtype)
    with pytest.warns(CaptureFallbackWarning, match="'scale'.*register_rule"):
        res = check_all(model, ce_loss, inputs, targets, rtol=rtol, k=5)
    assert "head.weight" not in res.sq_norms and "head.bias" in res.sq_norms
    assert res.layer_of["shared.weight"] == "shared"
    per_layer = res.by_layer("sq_norms")
    torch.testing.assert_close(per_layer["shared"], res.sq_norms["shared.weight"] + res.sq_norms["shared.bias"])
    torch.testing.assert_close(res.model_total("sq_norms"), sum(per_layer.values()))
    assert res.losses.shape == (6,) and not res.losses.requires_grad and res.outputs.shape == (6, 3)


def test_fallback_warns_once_per_module():
    model = _mixed(torch.float64)
    inputs, targets = mixed_batch(2)
    with pytest.warns(CaptureFallbackWarning):
        capture(model, ce_loss, inputs, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capture(model, ce_loss, inputs, targets)


def test_module_used_twice_with_different_positions():
    torch.manual_seed(1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(x).flatten(1).sum(1, keepdim=True) + self.conv(x[:, :, ::2, ::2]).flatten(1)[:, :1]

    model = Twice().double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    check_all(model, sq_loss, x, torch.randn(4, 1, dtype=torch.float64), rtol=1e-6)


def test_capture_leaves_the_run_untouched():
    model = _mixed(torch.float32)
    model.train()
    model.gn.eval()
    inputs, targets = mixed_batch(5, torch.float32)
    ce_loss(model(*inputs), targets).sum().backward()
    state = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    with pytest.warns(CaptureFallbackWarning):
        capture(model, ce_loss, inputs, targets, gram=True, dot_with="sum", projection=3, grad_sum=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name])
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks for m in model.modules())


def test_public_shortcuts_and_coords_path():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ref = oracle_grads(model, ce_loss, x, y)
    norms = per_example_sq_norms(model, ce_loss, x, y)
    grads = per_example_grads(model, ce_loss, x, y)
    coords = per_example_grads(model, ce_loss, x, y, coords={"2.weight": [0, 7, 17]})
    for name, g in ref.items():
        assert rel_err(norms[name], g.flatten(1).pow(2).sum(1)) < 1e-10
        assert rel_err(grads[name], g) < 1e-10
    assert set(coords) == {"2.weight"}
    assert rel_err(coords["2.weight"], ref["2.weight"].flatten(1)[:, [0, 7, 17]]) < 1e-10


def test_dot_with_given_vectors():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    v = {"0.weight": torch.randn(3, 4, dtype=torch.float64)}
    res = capture(model, ce_loss, x, y, dot_with=v)
    g = oracle_grads(model, ce_loss, x, y)["0.weight"]
    assert set(res.dots) == {"0.weight"}
    assert rel_err(res.dots["0.weight"], g.flatten(1) @ v["0.weight"].flatten()) < 1e-10


def test_unused_parameter_gives_zeros():
    model = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)})
    res = capture(lambda_model(model), sq_loss, torch.randn(4, 3), torch.randn(4, 2), grad_sum=True)
    assert torch.equal(res.sq_norms["inner.b.weight"], torch.zeros(4))
    assert torch.equal(res.grad_sum["inner.b.bias"], torch.zeros(2))


def lambda_model(inner):
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner["a"](x)

    return Wrap()


def test_bad_input_errors():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(CaptureError, match="not a trainable parameter"):
        capture(model, sq_loss, x, y, coords={"nope": [0]})
    with pytest.raises(CaptureError, match=r"\[0, 6\)"):
        capture(model, sq_loss, x, y, coords={"weight": [6]})
    with pytest.raises(CaptureError, match="targets must have 4 rows"):
        capture(model, sq_loss, x, torch.randn(3, 2))
    with pytest.raises(CaptureError, match="dot_with"):
        capture(model, sq_loss, x, y, dot_with="mean")
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    tied[2].weight = tied[0].weight  # tied weights: once refused, now exact (one parameter, two owners)
    check_all(tied, sq_loss, x.double(), torch.randn(4, 3, dtype=torch.float64), rtol=1e-6)

    class Folded(nn.Module):  # its Linear sees 12 rows, not 4 examples
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 2)

        def forward(self, x):
            return self.lin(x.reshape(-1, 1)).reshape(x.shape[0], -1)

    with pytest.raises(CaptureError, match="example axis first"):
        capture(Folded(), sq_loss, x, torch.randn(4, 6))


def test_registry_policy():
    with pytest.raises(CaptureError, match="already registered"):
        register_rule(nn.Linear)(lambda module, inputs, grad_output: {})

    class MyLinear(nn.Linear):
        pass

    assert lookup_rule(MyLinear) is lookup_rule(nn.Linear)  # MRO walk
    assert lookup_rule(Scale) is None

    @register_rule(Scale)
    def scale_rule(module, inputs, grad_output):
        x = inputs[0]
        return {"s": Dense(grad_output * (x + 2 * module.s))}

    try:
        with pytest.raises(CaptureError, match="overwrite=True"):
            register_rule(Scale)(scale_rule)
        register_rule(Scale, overwrite=True)(scale_rule)
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(3, 4), Scale(4)).double()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a registered rule: no fallback warning
            check_all(model, sq_loss, torch.randn(5, 3, dtype=torch.float64),
                      torch.randn(5, 4, dtype=torch.float64), rtol=1e-6)
    finally:
        unregister_rule(Scale)


def test_a_use_that_does_not_reach_the_loss_contributes_nothing():
    torch.manual_seed(6)

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            self.lin(x * 2)  # computed, never used
            return self.lin(x)

    model = Branch().double()
    check_all(model, sq_loss, torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
              rtol=1e-6)


def test_state_is_restored_when_capture_fails():
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))
    model.train()
    with pytest.raises(CaptureError, match="reduction='none'"):
        capture(model, lambda o, y: o.sum(), torch.randn(4, 3), torch.randn(4, 2))
    assert model.training and model[1].training
    assert all(not m._forward_hooks for m in model.modules())


def test_outputs_rewritten_in_place_still_give_exact_gradients():
    """An in-place op after a module (ReLU(inplace=True), +=) rewrites its output: the tensor hooks
    and the recorded autograd edges still see the gradient of the value the module returned, so Σ g
    and every per-example quantity come from the factors, exact."""
    torch.manual_seed(7)

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3).eval()
            self.act = nn.ReLU(inplace=True)
            self.fc = nn.Linear(3 * 5 * 5, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            h = self.act(self.bn(self.act(self.conv(x))))  # conv and bn outputs rewritten in place
            z = self.fc(h.flatten(1))
            z += 1.0  # fc output rewritten in place
            return self.out(torch.tanh(z))  # out: intact

    model = InPlace().double()
    x = torch.randn(5, 2, 5, 5, dtype=torch.float64)
    check_all(model, ce_loss, x, torch.randint(0, 2, (5,)), rtol=1e-6)


def test_autograd_forms_no_weight_gradient_and_holds_one_output_gradient(monkeypatch):
    """Σ g comes from the factors: autograd is asked for no parameter and only for the output
    gradient of the first layer (the others' hooks fire because that output lies below them)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    asked = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, **kwargs):  # what is asked for: the node of each edge and what it saved
        asked.append([(type(i).__name__, i.node.name(), tuple(i.node._saved_mat1.shape)) for i in inputs])
        return grad(outputs, inputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    res = capture(model, ce_loss, x, y, grad_sum=True, dot_with="sum")
    # one edge: the first Linear's output (its node multiplied the (7, 4) inputs), no parameter
    assert asked == [[("GradientEdge", "AddmmBackward0", (7, 4))]]
    monkeypatch.undo()
    ref = oracle_grads(model, ce_loss, x, y)
    for name, g in ref.items():
        assert rel_err(res.grad_sum[name], g.sum(0)) < 1e-10
        assert rel_err(res.dots[name], g.flatten(1) @ g.sum(0).flatten()) < 1e-10
    assert list(res.sq_norms) == [n for n, _ in model.named_parameters()]  # parameter order kept


def test_a_rule_error_inside_the_backward_pass_is_reported_and_the_run_restored():
    """Rules run inside the backward pass (as each output gradient arrives): their errors still come
    out as the one-line CaptureError, with hooks removed and modes restored."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).train()
    with pytest.raises(CaptureError, match="running statistics"):
        capture(model, ce_loss, torch.randn(5, 3), torch.randint(0, 2, (5,)))
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("inplace", [False, True])
def test_residual_network_with_shared_outputs(inplace):
    """Residual branches (one output used twice, a 1x1 shortcut conv) and, optionally, in-place
    ReLUs after every BatchNorm: the graph walk still makes every hook fire, gradients exact."""
    from pipelines.models import build_model

    model = build_model("resnet-small", seed=0).double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, nn.ReLU):
            module.inplace = inplace
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    check_all(model, ce_loss, x, torch.randint(0, 10, (4,)), rtol=1e-6)


@pytest.mark.parametrize("quantities", [dict(sq_norms=True, grad_sum=True), dict(sq_norms=True)])
def test_finished_uses_release_their_output_gradients_during_the_backward_pass(quantities):
    """Every parameter is finished as soon as all its uses' output gradients have arrived, and the
    recorded tensors of a use are freed then, module calls and functional uses alike: when the first
    layer's output gradient arrives, the later layers' output gradients are gone. (They used to stay
    alive until the pass ended, held by the cache of factors and, for functional uses and modules
    whose calls no rule reads, by their records: 150 MB of fresh pages per pass on the benchmark LM.)"""
    import weakref

    import torch.nn.functional as F

    seen: dict = {}

    def keep(name):  # a tensor hook that only watches: a weak reference to the gradient it receives
        return lambda g: seen.__setitem__(name, weakref.ref(g))

    class Functional(nn.Module):  # no rule: its weight is an op use of F.linear
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8, dtype=torch.float64) / 3)

        def forward(self, x):
            y = F.linear(x, self.w)
            y.register_hook(keep("functional"))
            return y

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), Functional(), nn.Tanh(), nn.Linear(8, 3)).double()
    def watch(hook):  # a forward hook putting ``hook`` on the module's output (and returning None)
        return lambda mod, args, out: out.register_hook(hook) and None

    model[4].register_forward_hook(watch(keep("last")))
    alive_then: dict = {}

    def first(grad):  # the first layer's output gradient arrives last: what is still alive then?
        alive_then.update({name: ref() is not None for name, ref in seen.items()})

    model[0].register_forward_hook(watch(first))
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    res = capture(model, ce_loss, x, y, **quantities)
    assert alive_then == {"last": False, "functional": False}
    ref = oracle_grads(model, ce_loss, x, y)
    for name, g in ref.items():
        assert rel_err(res.sq_norms[name], g.flatten(1).square().sum(1)) < 1e-10
