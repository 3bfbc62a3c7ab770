"""Record a Hugging Face ``Trainer`` run: a tiny GPT-2 on bytes of Python's own sources.

``transformers.Trainer`` trains a ``GPT2LMHeadModel`` (2 blocks, width 64, a byte vocabulary of
256, random initial weights: nothing is downloaded) on windows of the standard library's source
files, with gradient accumulation 2. ``GradstoreTrainerCallback`` records it on the schedule,
unchanged: steps are the Trainer's optimizer steps (``state.global_step``), and each capture also
writes every layer's m-coherence to TensorBoard (``OUT/tensorboard``). The tracked windows have
different lengths, padded with an attention mask and labels -100, so padding never counts.

    python examples/hf_trainer.py --out runs/hf --steps 100
    tensorboard --logdir runs/hf/tensorboard
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradstore.record import Schedule
from gradstore.record.hf import GradstoreTrainerCallback, causal_lm_targets

CONTEXT = 64


def stdlib_text(limit: int = 300_000) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's top-level ``.py`` files, in path order."""
    data = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


class Windows(Dataset):
    """Training items as the Trainer takes them: ``input_ids`` and ``labels`` (the model shifts them)."""

    def __init__(self, text: torch.Tensor, starts):
        self.text, self.starts = text, list(starts)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        window = self.text[self.starts[i]:self.starts[i] + CONTEXT]
        return {"input_ids": window, "labels": window}


def padded(text: torch.Tensor, starts, lengths):
    """Tracked windows of different lengths, padded at the end: (inputs dict, sequence targets)."""
    ids = torch.zeros(len(starts), CONTEXT, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (s, n) in enumerate(zip(starts, lengths)):
        ids[row, :n], mask[row, :n], labels[row, :n] = text[s:s + n], 1, text[s:s + n]
    return {"input_ids": ids, "attention_mask": mask}, causal_lm_targets(labels)


def gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=CONTEXT,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run store (created)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--every", type=int, default=10, help="capture every N optimizer steps")
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 mixed precision (captures stay "
                        "float32)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    text = stdlib_text()
    split = int(0.9 * len(text))
    rng = np.random.default_rng(0)
    train_starts = rng.choice(split - CONTEXT, 2048, replace=False)
    tracked = np.sort(rng.choice(train_starts, 32, replace=False))     # ids: the windows' starts
    held_out = np.sort(split + rng.choice(len(text) - split - CONTEXT, 16, replace=False))
    lengths = rng.integers(16, CONTEXT + 1, len(tracked) + len(held_out))
    train_inputs, train_targets = padded(text, tracked, lengths[:len(tracked)])
    test_inputs, test_targets = padded(text, held_out, lengths[len(tracked):])

    args.out.mkdir(parents=True, exist_ok=True)
    callback = GradstoreTrainerCallback(
        args.out / "store.zarr", log_dir=args.out / "tensorboard", task="sequence",
        train_inputs=train_inputs, train_targets=train_targets, train_ids=tracked,
        test_inputs=test_inputs, test_targets=test_targets, test_ids=held_out,
        schedule=Schedule.every(args.every), coords_per_layer=20, overwrite=True,
        config={"example": "hf_trainer", "steps": args.steps, "context": CONTEXT}, seeds={"torch": 0, "windows": 0})
    training = TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=1e-3, seed=0, use_cpu=True, bf16=args.bf16,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=gpt2(), args=training, train_dataset=Windows(text, train_starts), callbacks=[callback])
    with callback:  # closes the store's writer even if training fails
        trainer.train()
    print(f"{trainer.state.global_step} optimizer steps; store {args.out / 'store.zarr'}, "
          f"TensorBoard scalars in {args.out / 'tensorboard'}")
    return args.out / "store.zarr"


if __name__ == "__main__":
    main()
