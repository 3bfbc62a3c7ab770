"""Mixed-precision capture: the model's forward under ``torch.autocast``, capture factors in float32."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def autocast_forward(model, dtype: str | None):
    """Run ``model``'s forward passes under ``torch.autocast(dtype)`` with float32 capture factors.

    The matrix products of the forward and backward passes run in ``dtype``; the inputs and outputs
    of every module with parameters are cast to float32 around it, so the capture engine records
    float32 activations and output gradients and forms every per-example product in float32 (the
    model output is float32 too). ``None`` does nothing. Hooks are removed on exit.
    """
    if dtype is None:
        yield model
        return
    import torch

    from gradstore.capture import plan

    device = next(model.parameters()).device.type
    contexts = []

    def up(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def enter(_module, _args):
        ctx = torch.autocast(device_type=device, dtype=getattr(torch, dtype))
        ctx.__enter__()
        contexts.append(ctx)

    def leave(_module, _args, output):
        contexts.pop().__exit__(None, None, None)
        return up(output)

    # registered before capture's own hooks, so those see the float32 values
    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    for module in plan(model).modules.values():
        handles.append(module.register_forward_pre_hook(lambda _m, args: tuple(up(a) for a in args)))
        handles.append(module.register_forward_hook(lambda _m, _a, output: up(output)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        while contexts:  # a forward that raised never reached ``leave``
            contexts.pop().__exit__(None, None, None)
