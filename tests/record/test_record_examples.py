"""The runnable examples (examples/*.py) run end to end and write what they say."""

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstore.store import open_run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_own_loop_records_a_cnn_with_batchnorm_and_dropout_in_eval_mode_primed(tmp_path):
    store = _load("own_loop").main(["--out", str(tmp_path / "own"), "--steps", "3", "--every", "3"])
    ds = open_run(store).load()
    assert ds.step.values.tolist() == [0, 3]
    assert ds.attrs["task"] == "classification"
    assert ds.attrs["measurement"] == {"mode": "eval", "bn_priming": {"batches": 4, "reset": True}}
    assert (ds.m.sel(sample="moments_train").values == 2000).all()
    assert (ds.sq_norm.values > 0).all() and not ds.nonfinite.values.any()
    np.testing.assert_allclose(ds.sum_of_norm_sq.sel(sample="tracked_train").values,
                               ds.sq_norm.values[:, :128].sum(1), rtol=1e-12)


def test_lm_sequence_records_per_sequence_losses_over_unpadded_bytes(tmp_path):
    example = _load("lm_sequence")
    store = example.main(["--out", str(tmp_path / "lm"), "--steps", "1", "--every", "2"])
    ds = open_run(store).load()
    assert ds.step.values.tolist() == [0]
    assert ds.attrs["task"] == "sequence" and (ds.train_label.values == -1).all()
    assert ((ds.correct.values >= 0) & (ds.correct.values <= 1)).all()
    # step 0 is the seeded initial model: the stored loss of a tracked window is its mean next-byte
    # cross entropy over its own length, whatever padding the batch added
    torch.manual_seed(0)
    model = example.TinyGPT(context=64).eval()
    text = example.stdlib_bytes()
    rng = np.random.default_rng(0)
    split = int(0.9 * len(text))
    starts = rng.choice(split - 65, 64, replace=False)
    rng.choice(len(text) - split - 65, 32, replace=False)  # the test windows' starts, drawn in between
    lengths = rng.integers(16, 65, 64)
    for row in (0, int(np.argmin(lengths))):
        s, n = int(starts[row]), int(lengths[row])
        x, y = text[s:s + n], text[s + 1:s + n + 1]
        with torch.no_grad():
            want = torch.nn.functional.cross_entropy(model(x[None])[0], y)
        assert ds.example.values[row] == s
        np.testing.assert_allclose(ds.loss.values[0, row], want.item(), rtol=1e-5)


def test_stream_moments_sums_over_every_example_of_the_dataset(tmp_path):
    row = _load("stream_moments").main(["--out", str(tmp_path / "s"), "--m", "300", "--chunk", "128"])
    ds = open_run(tmp_path / "s" / "store.zarr").load()
    assert row["m"] == 300 and (ds.m.sel(sample="moments_train").values == 300).all()
    assert (ds.sum_of_norm_sq.sel(sample="moments_train").values > 0).all()


def _scalar_tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_lightning_callback_records_the_trainers_optimizer_steps(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("tensorboard")
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    with warnings.catch_warnings():
        # Lightning's advice on dataloader workers and its own use of a deprecated torch API
        warnings.simplefilter("ignore", PossibleUserWarning)
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        store = _load("lightning_callback").main(["--out", str(tmp_path / "pl"), "--steps", "2", "--every", "2"])
    ds = open_run(store).load()
    assert ds.step.values.tolist() == [0, 2]  # optimizer steps (accumulation 2), step 0 the initial model
    assert (ds.m.sel(sample="moments_train").values == 1024).all()
    assert (ds.sq_norm.values > 0).all() and not ds.nonfinite.values.any()
    assert np.isfinite(ds.train_loss.values[1:]).all() and (ds.lr.values[1:] == 0.05).all()
    tags = _scalar_tags(tmp_path / "pl" / "tensorboard")
    assert {f"m_coherence/{sample}/{layer}" for sample in ("tracked_train", "tracked_test", "moments_train")
            for layer in [*ds.layer.values.tolist(), "model"]} == tags


def test_hf_trainer_records_a_gpt2_trained_by_the_hugging_face_trainer(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    example = _load("hf_trainer")
    store = example.main(["--out", str(tmp_path / "hf"), "--steps", "2", "--every", "2"])
    ds = open_run(store).load()
    assert ds.step.values.tolist() == [0, 2]
    assert ds.attrs["task"] == "sequence" and not ds.nonfinite.values.any()
    assert np.isfinite(ds.loss.values).all() and ((ds.correct.values >= 0) & (ds.correct.values <= 1)).all()
    np.testing.assert_allclose(ds.lr.values[1:], [5e-4])  # linear decay over 2 steps: the lr step 2 used
    # step 0 is the seeded initial GPT-2: a tracked window's stored loss is the model's own causal-LM
    # loss of that window alone, unpadded
    torch.manual_seed(0)
    model = example.gpt2().eval()
    text = example.stdlib_text()
    rng = np.random.default_rng(0)
    split = int(0.9 * len(text))
    train_starts = rng.choice(split - 64, 2048, replace=False)
    tracked = np.sort(rng.choice(train_starts, 32, replace=False))
    rng.choice(len(text) - split - 64, 16, replace=False)  # the held-out starts, drawn in between
    lengths = rng.integers(16, 65, 48)
    for row in (0, int(np.argmin(lengths[:32]))):
        s, n = int(tracked[row]), int(lengths[row])
        window = text[s:s + n][None]
        with torch.no_grad():
            want = model(input_ids=window, labels=window).loss
        assert ds.example.values[row] == s
        np.testing.assert_allclose(ds.loss.values[0, row], want.item(), rtol=1e-5)
    assert "m_coherence/tracked_test/model" in _scalar_tags(tmp_path / "hf" / "tensorboard")
