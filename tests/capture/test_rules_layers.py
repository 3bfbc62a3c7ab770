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


def test_explain_tied_parameter_listed_once_with_every_owner():
    (row,) = explain(Tied())
    assert row.parameter == "emb.weight" and row.module == "emb, head" and row.module_type == "Embedding, Linear"
    assert row.path == "rule embedding.embedding_rule + rule linear.linear_rule"


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_explain_module_without_rule_goes_per_operation():
    model = Attention()
    static = {r.parameter: r.path for r in explain(model)}
    assert static["attn.in_proj_weight"] == FALLBACK
    assert static["attn.out_proj.weight"] == "rule linear.linear_rule"  # its forward is not known to be skipped
    model.train()
    run = {r.parameter: r.path for r in explain(model, torch.randn(2, 3, 4))}
    assert run["attn.out_proj.weight"] == FALLBACK == run["attn.in_proj_weight"]  # MHA uses out_proj functionally
    assert model.training and model.attn.training  # modes restored


def test_explain_runs_like_capture_not_the_fused_inference_path():
    """Under no_grad an eval TransformerEncoderLayer takes a fused path that skips its Linear modules;
    capture runs with autograd on, where they run, so their rules apply."""
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8, batch_first=True), 1, enable_nested_tensor=False)
    rows = {r.parameter: r.path for r in explain(model, torch.randn(2, 3, 4))}
    assert rows["layers.0.linear1.weight"] == "rule linear.linear_rule"
    assert rows["layers.0.self_attn.out_proj.weight"] == FALLBACK


def test_cli_builtin_and_import_path():
    out = CliRunner().invoke(layers_command, ["--model", "cnn-bn"])
    assert out.exit_code == 0, out.output
    assert "0.weight" in out.output and "rule conv.conv_rule" in out.output
    assert "8 by a rule (8 parameters)" in out.output
    out = CliRunner().invoke(layers_command, ["--model", "test_rules_layers:small_model"])
    assert out.exit_code == 0, out.output
    assert FALLBACK in out.output and "refused: BatchNorm1d" in out.output
    out = CliRunner().invoke(layers_command, ["--model", "test_rules_layers:Attention", "--input-shape", "3,4"])
    assert out.exit_code == 0, out.output
    assert "rule linear" not in out.output


class TinyLM(nn.Module):
    """Token ids -> logits through a head tied functionally to the embedding (h @ emb.weight.T)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids):
        return self.mix(self.emb(ids)) @ self.emb.weight.T


def test_cli_token_inputs():
    out = CliRunner().invoke(layers_command, ["--model", "test_rules_layers:TinyLM", "--input-shape", "5",
                                              "--tokens", "11"])
    assert out.exit_code == 0, out.output
    assert "rule embedding.embedding_rule" in out.output
    out = CliRunner().invoke(layers_command, ["--model", "test_rules_layers:TinyLM", "--tokens", "11"])
    assert isinstance(out.exception, GradstoreError)


@pytest.mark.parametrize("shape", ["0,3", "a", "5,5"])
def test_cli_bad_input_shape_is_one_error(shape):
    out = CliRunner().invoke(layers_command, ["--model", "test_rules_layers:Attention", "--input-shape", shape])
    assert out.exit_code != 0 and isinstance(out.exception, GradstoreError)


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


def tiny_gpt2():
    """A 1-layer GPT-2 from a config (random weights, nothing downloaded), embeddings tied to the head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def test_cli_hugging_face_gpt2():
    pytest.importorskip("transformers")
    out = CliRunner().invoke(layers_command, ["--model", "test_rules_layers:tiny_gpt2", "--input-shape", "6",
                                              "--tokens", "32"])
    assert out.exit_code == 0, out.output
    rows = {line.split()[0]: line for line in out.output.splitlines() if line.startswith("transformer.")}
    assert "rule hf.hf_conv1d_rule" in rows["transformer.h.0.attn.c_attn.weight"]
    assert "rule embedding.embedding_rule + rule linear.linear_rule" in rows["transformer.wte.weight"]  # tied head


@pytest.mark.parametrize("argv", [["gram-form", "--m", "2", "--width", "4", "--repeats", "1"],
                                  ["lstm", "--m", "2", "--repeats", "1"], ["decoder", "--m", "2", "--repeats", "1"],
                                  ["mha-bias-kv", "--m", "2", "--repeats", "1"],
                                  ["joint-form", "--m", "2", "--repeats", "1"], ["lm-products", "--m", "2", "--repeats", "1"]])
def test_layer_benchmarks_run(argv, capsys):
    """The benchmark cases of docs/layers.md still run (tiny sizes; no timing is asserted)."""
    from pipelines.bench.layers import main

    main([*argv, "--threads", str(torch.get_num_threads())])  # leave the process's thread count as it is
    assert " ms" in capsys.readouterr().out


def test_the_joint_form_benchmark_runs_every_language_model(capsys):
    from pipelines.bench.layers import main

    main(["lm-joint", "--m", "2", "--repeats", "1", "--threads", str(torch.get_num_threads())])
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["untied", "tied", "encoder", "gpt2"]


def test_the_phase_benchmark_splits_every_language_model_and_unpatches_the_engine(capsys):
    """lm-phases times the engine by wrapping its functions: every model gets a row, and the
    engine's own functions are back in place afterwards (a capture then runs unwrapped)."""
    from gradstore.capture import engine, factors, hooks, uses
    from pipelines.bench.layers import main

    before = (engine.call_model, engine.call_loss, engine._backward, hooks.Tap._on_grad,
              uses.UseTracker._on_grad, factors.Outer._sum_and_sq_norms_by_blocks)
    main(["lm-phases", "--m", "2", "--repeats", "1", "--threads", str(torch.get_num_threads())])
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["untied", "tied", "encoder", "gpt2"]
    after = (engine.call_model, engine.call_loss, engine._backward, hooks.Tap._on_grad,
             uses.UseTracker._on_grad, factors.Outer._sum_and_sq_norms_by_blocks)
    assert all(a is b for a, b in zip(before, after))
