"""The Hugging Face TrainerCallback records a real ``transformers.Trainer`` run on the schedule:
once per optimizer step under gradient accumulation, exact against a per-example autograd loop,
the run and the model unchanged, float32 captures under bf16 mixed precision, TensorBoard scalars
(needs transformers, accelerate and tensorboard; skipped without them)."""

import copy
import warnings
from importlib.util import find_spec

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from record_helpers import loop_sq_norms

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.utils.data import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainerControl  # noqa: E402
from transformers import TrainerState, TrainingArguments  # noqa: E402

from gradstore.errors import StoreError  # noqa: E402
from gradstore.record import Schedule, Sequence  # noqa: E402
from gradstore.record.hf import GradstoreTrainerCallback, causal_lm_targets  # noqa: E402
from gradstore.store import open_run  # noqa: E402

STEPS, ACCUMULATE, LR = 3, 2, 0.01


class Tokens(Dataset):
    def __init__(self, n: int, t: int = 12):
        self.x = torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _gpt2(dtype=torch.float64):
    torch.manual_seed(0)  # dropout stays on (0.1) in training: the run's RNG must be left alone
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype)


def _tracked():
    """Five sequences of different lengths, padded at the end (attention mask 0, labels -100)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (5, 10), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate([10, 7, 4, 10, 2]):
        mask[row, n:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


class Substeps(TrainerCallback):
    def __init__(self):
        self.substeps, self.steps = 0, []

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _train(out, *, record: bool, dtype=torch.float64, bf16=False, **options):
    model = _gpt2(dtype)
    initial = copy.deepcopy(model)
    keys = list(model.state_dict())
    ids, mask, labels = _tracked()
    counter = Substeps()
    callbacks = [counter]
    callback = None
    if record:
        callback = GradstoreTrainerCallback(
            out / "store.zarr", task="sequence", train_inputs={"input_ids": ids, "attention_mask": mask},
            train_targets=causal_lm_targets(labels), train_ids=np.arange(5), coords_per_layer=0, **options)
        callbacks.insert(0, callback)
    args = TrainingArguments(str(out / "trainer"), max_steps=STEPS, per_device_train_batch_size=4,
                             gradient_accumulation_steps=ACCUMULATE, learning_rate=LR, seed=0, use_cpu=True,
                             bf16=bf16, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(40), callbacks=callbacks)
    trainer.train()
    assert list(model.state_dict()) == keys  # nothing wrapped or renamed
    ds = open_run(out / "store.zarr").load() if record else None
    return {"model": model, "initial": initial, "trainer": trainer, "counter": counter, "ds": ds, "callback": callback}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    log_dir = base / "tb" if find_spec("tensorboard") else None  # the TensorBoard test skips without it
    recorded = _train(base / "with", record=True, schedule=Schedule.every(1), log_dir=log_dir)
    plain = _train(base / "without", record=False)
    return recorded, plain, base


def _layers(model, names):
    """Layer (owning module) -> its parameter names, in the store's layer order."""
    layers = {name: [] for name in names}
    for param, _ in model.named_parameters():
        layers[param.rsplit(".", 1)[0]].append(param)
    return layers


def _oracle(model, ds):
    """Per-example ||g||² by layer: one autograd pass per tracked sequence, its loss the causal-LM loss
    (mean cross entropy of its counted next tokens, HF's shift) at the model's precision, in eval mode.
    Also the model's own ``labels=`` loss of each sequence (HF computes it in float32)."""
    ids, mask, labels = _tracked()
    model = model.eval()

    def loss(i):
        logits = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
        return F.cross_entropy(logits[0, :-1], labels[i, 1:], ignore_index=-100)

    sq, _ = loop_sq_norms(model, loss, len(ids), _layers(model, ds.layer.values.tolist()))
    with torch.no_grad():
        own = [float(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1]).loss)
               for i in range(len(ids))]
        losses = [float(loss(i)) for i in range(len(ids))]
    np.testing.assert_allclose(losses, own, rtol=1e-6)
    return sq.numpy(), np.array(losses)


def test_steps_are_optimizer_steps_captured_once_each(runs):
    recorded, _, _ = runs
    ds, counter = recorded["ds"], recorded["counter"]
    assert counter.substeps == STEPS * (ACCUMULATE - 1)  # the micro-batches between optimizer steps
    assert counter.steps == [1, 2, 3] and recorded["trainer"].state.global_step == STEPS
    assert ds.step.values.tolist() == [0, 1, 2, 3]  # the initial model, then each optimizer step once
    # the lr each optimizer step used (linear decay to 0 over STEPS, no warmup), not the scheduler's next
    np.testing.assert_allclose(ds.lr.values[1:], [LR * (STEPS - k) / STEPS for k in range(STEPS)], rtol=1e-12)
    assert np.isnan(ds.lr.values[0]) and np.isnan(ds.train_loss.values).all()
    assert recorded["callback"].recorder is None  # closed at on_train_end


@pytest.mark.parametrize("which", ["initial", "model"])
def test_captured_norms_equal_a_per_example_autograd_loop(runs, which):
    """Step 0 is the initial model, step 3 the trained one (float64 throughout)."""
    recorded, _, _ = runs
    ds = recorded["ds"]
    sq, losses = _oracle(recorded[which], ds)
    step = 0 if which == "initial" else STEPS
    got = ds.sq_norm.sel(step=step).values[:5]
    assert got.shape == sq.shape and (sq > 0).all()
    np.testing.assert_allclose(got, sq, rtol=1e-9)
    np.testing.assert_allclose(ds.loss.sel(step=step).values[:5], losses, rtol=1e-10)
    np.testing.assert_allclose(ds.sum_of_norm_sq.sel(step=step, sample="tracked_train").values, sq.sum(0), rtol=1e-9)


def test_the_training_run_is_unchanged_by_the_callback(runs):
    recorded, plain, _ = runs
    trained, alone = recorded["model"].state_dict(), plain["model"].state_dict()
    assert list(trained) == list(alone)
    changed = [k for k in trained if not torch.equal(trained[k], recorded["initial"].state_dict()[k])]
    assert changed  # it did train
    assert all(torch.equal(trained[k], alone[k]) for k in trained)  # bit for bit, dropout RNG included


def test_tensorboard_scalars_are_each_layers_m_coherence(runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from analysis.coherence import m_coherence

    recorded, _, base = runs
    ds = recorded["ds"]
    events = EventAccumulator(str(base / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    layers = ds.layer.values.tolist()
    assert tags == {f"m_coherence/tracked_train/{layer}" for layer in [*layers, "model"]}  # no test/moments sample
    sel = ds.sel(sample="tracked_train")
    want = m_coherence(sel.norm_sq_of_sum, sel.sum_of_norm_sq).values  # (step, layer)
    for j, layer in enumerate(layers):
        scalars = events.Scalars(f"m_coherence/tracked_train/{layer}")
        assert [s.step for s in scalars] == [0, 1, 2, 3]
        np.testing.assert_allclose([s.value for s in scalars], want[:, j], rtol=1e-6)  # stored as float32
    whole = [s.value for s in events.Scalars("m_coherence/tracked_train/model")]
    np.testing.assert_allclose(whole, m_coherence(sel.norm_sq_of_sum.sum("layer"), sel.sum_of_norm_sq.sum("layer")),
                               rtol=1e-6)


def test_bf16_mixed_precision_training_is_captured_in_float32(tmp_path):
    """Accelerate wraps the model's forward in bf16 autocast; the capture runs the model's own forward."""
    recorded = _train(tmp_path, record=True, dtype=torch.float32, bf16=True, schedule=Schedule.at([STEPS]))
    model, ds = recorded["model"], recorded["ds"]
    assert "_original_forward" in vars(model) and "forward" in vars(model)  # the Trainer's wrapper, put back
    plain = _gpt2(torch.float32)
    plain.load_state_dict(model.state_dict())
    sq, losses = _oracle(plain, ds)
    assert ds.step.values.tolist() == [STEPS]
    np.testing.assert_allclose(ds.sq_norm.values[0, :5], sq, rtol=1e-4)  # bf16 would be off by ~1e-2
    np.testing.assert_allclose(ds.loss.values[0, :5], losses, rtol=1e-5)


def test_a_compiled_model_is_recorded_through_its_original_module(tmp_path):
    model = _gpt2(torch.float32)
    with warnings.catch_warnings():  # torch's own import inside torch.compile warns about torch.jit
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)
        compiled = torch.compile(model)
    assert compiled._orig_mod is model
    ids, mask, labels = _tracked()
    callback = GradstoreTrainerCallback(tmp_path / "c.zarr", task="sequence",
                                        train_inputs={"input_ids": ids, "attention_mask": mask},
                                        train_targets=causal_lm_targets(labels), train_ids=np.arange(5),
                                        coords_per_layer=0, background=False)
    args = TrainingArguments(str(tmp_path / "t"), use_cpu=True, report_to="none")
    with callback:
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=compiled)
        names = [name for name, _, _ in callback.recorder.layout.params]
    assert names == [name for name, _ in model.named_parameters()]  # no "_orig_mod." prefix
    assert open_run(tmp_path / "c.zarr").load().step.values.tolist() == [0]


def test_bad_arguments_are_refused_in_one_line(tmp_path):
    with pytest.raises(StoreError, match="do not pass model="):
        GradstoreTrainerCallback(tmp_path / "s.zarr", model=torch.nn.Linear(2, 2))
    with pytest.raises(StoreError, match=r"labels of shape \(examples, positions\)"):
        causal_lm_targets(torch.zeros(3, dtype=torch.long))


def test_causal_lm_targets_make_the_sequence_loss_the_models_shifted_loss():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    targets = causal_lm_targets(labels)
    assert targets.tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(0))
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")  # HF's shift
    counted = labels[:, 1:] != -100
    want = (per_token * counted).sum(1) / counted.sum(1)
    torch.testing.assert_close(Sequence().loss(logits, targets), want)
