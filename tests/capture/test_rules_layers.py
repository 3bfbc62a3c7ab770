"""``gradstore layers`` and gradstore.capture.layers: the path of each parameter, the supported-layers
table of docs/layers.md (generated from the registry)."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gradstore.capture import lookup_rule, register_rule, unregister_rule
from gradstore.capture.layers import FALLBACK, FROZEN, explain, replace_table, rule_name, supported_layers
from gradstore.errors import GradstoreError
from pipelines.cli.layers import layers as layers_command
from pipelines.cli.layers import load_model

DOCS = Path(__file__).resolve().parents[2] / "docs" / "layers.md"


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.s


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight


def small_model():
    model = nn.Sequential(nn.Linear(3, 3), Scale(), nn.BatchNorm1d(3, track_running_stats=False), nn.LSTM(3, 2))
    model[0].bias.requires_grad_(False)
    return model


def test_explain_paths():
    rows = {r.parameter: r for r in explain(small_model())}
    assert rows["0.weight"].path == f"rule {rule_name(lookup_rule(nn.Linear))}" == "rule linear.linear_rule"
    assert rows["0.bias"].path == FROZEN
    assert rows["1.s"].path == FALLBACK and rows["1.s"].module_type == "Scale"
    assert rows["2.weight"].path.startswith("refused: BatchNorm1d must use running statistics")
    assert rows["3.weight_hh_l0"].path == "rule recurrent.recurrent_rule"
    assert rows["3.weight_hh_l0"].shape == (8, 2) and rows["3.weight_hh_l0"].module == "3"


def test_explain_follows_the_registry():
    register_rule(Scale)(lambda module, inputs, grad_output: {})
    try:
        assert explain(Scale())[0].path.startswith("rule ")
    finally:
        unregister_rule(Scale)
    assert explain(Scale())[0].path == FALLBACK


def test_explain_shared_parameter_listed_once():
    rows = explain(Tied())
    assert [r.parameter for r in rows] == ["emb.weight"]


def test_cli_builtin_and_import_path():
    out = CliRunner().invoke(layers_command, ["--model", "cnn-bn"])
    assert out.exit_code == 0, out.output
    assert "0.weight" in out.output and "rule conv.conv_rule" in out.output
    assert "(8 parameters)" in out.output
    out = CliRunner().invoke(layers_command, ["--model", "test_rules_layers:small_model"])
    assert out.exit_code == 0, out.output
    assert FALLBACK in out.output and "refused: BatchNorm1d" in out.output


@pytest.mark.parametrize("spec", ["nosuch", "nosuch_module_xyz:f", "test_rules_layers:missing", "torch:float32"])
def test_bad_model_is_one_gradstore_error(spec):
    with pytest.raises(GradstoreError):
        load_model(spec)


def test_supported_lists_every_registered_type():
    names = [layer for layer, _, _ in supported_layers()]
    assert "torch.nn.Linear" in names and "torch.nn.LSTM" in names and len(names) == len(set(names))


def test_docs_table_matches_the_registry():
    pytest.importorskip("transformers")  # the table includes the Hugging Face Conv1D rule
    text = DOCS.read_text(encoding="utf-8")
    assert replace_table(text) == text, (
        "docs/layers.md's supported-layers table is out of date; regenerate it with "
        "`python -m gradstore.capture.layers docs/layers.md`"
    )
