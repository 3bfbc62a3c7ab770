"""Hugging Face transformers' Conv1D rule vs the vmap(grad) oracle (skipped without transformers)."""

import pytest
import torch
from capture_harness import check_all, sq_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

from gradstore.capture import lookup_rule  # noqa: E402
from gradstore.capture.rules import hf  # noqa: E402


def test_registered_for_conv1d():
    assert lookup_rule(pytorch_utils.Conv1D) is hf.hf_conv1d_rule


def test_gradstore_does_not_import_transformers_and_conv1d_still_has_its_rule():
    """The rule is imported the first time a Conv1D is looked up (transformers imported by then)."""
    import subprocess
    import sys

    code = ("import sys, gradstore.capture as c, gradstore.store, gradstore.record; "
            "assert 'transformers' not in sys.modules; "
            "from transformers.pytorch_utils import Conv1D; "
            "assert c.lookup_rule(Conv1D).__name__ == 'hf_conv1d_rule'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
    # a user's rule for Conv1D, before anything looked it up: it replaces ours only with overwrite=True,
    # and stays once our rules load; removing it removes the rule for good
    code = ("import gradstore.capture as c; from gradstore.errors import CaptureError; "
            "from transformers.pytorch_utils import Conv1D\n"
            "def mine(module, inputs, grad_output): return {}\n"
            "try:\n    c.register_rule(Conv1D)(mine); print('registered')\nexcept CaptureError: pass\n"
            "c.register_rule(Conv1D, overwrite=True)(mine)\n"
            "class Other: pass\n"
            "assert c.lookup_rule(Other) is None and c.lookup_rule(Conv1D) is mine\n"
            "c.unregister_rule(Conv1D); assert c.lookup_rule(Conv1D) is None; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 4), t=st.integers(0, 3), nx=st.integers(1, 5), nf=st.integers(1, 5))
def test_conv1d_shapes(m, t, nx, nf):
    torch.manual_seed(m + t + nx)
    conv = pytorch_utils.Conv1D(nf, nx)
    conv.bias.data.normal_()
    model = nn.Sequential(conv, nn.Tanh(), pytorch_utils.Conv1D(2, nf)).double()
    x = torch.randn(m, *([t] if t else []), nx, dtype=torch.float64)
    check_all(model, sq_loss, x, torch.randn(m, *([t] if t else []), 2, dtype=torch.float64), rtol=1e-6)
