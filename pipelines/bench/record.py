"""``gradstore bench record``: what the Recorder costs a user's own training loop.

Each case (a model and a number m of tracked training examples) runs in its own process: a plain
PyTorch loop over seeded random minibatches of MNIST training images (SGD, momentum 0.9), first
``steps`` steps without a Recorder, then ``steps`` steps of the same loop from the same initial
weights with a :class:`gradstore.record.Recorder` that captures every ``every`` steps (step 0
included) and writes each captured step to a run store on local disk in its background thread
(the default). Per training step it measures:

* ``plain``: the training step (forward, loss, backward, optimizer step) without a Recorder;
* ``idle``: a step with the Recorder on a step the schedule does not want, and, of it, the
  ``maybe_record`` call itself (the schedule check);
* ``captured``: a step the schedule wants: the training step plus the foreground part of
  ``maybe_record`` (``capture``: :meth:`Recorder.capture_step`, exact per-example statistics of
  the m tracked examples; the rest: handing the arrays to the writer thread, waiting for the write
  before if it is still running), and the background write (:meth:`RunWriter.append_step`,
  compress, checksum, commit), which overlaps the next training steps;
* ``overhead per capture``: (recorded loop − plain loop, including the wait for the last write in
  ``close``) / number of captures: everything the Recorder costs the loop, spread over its captures.

Times are medians over the steps of each kind, after an untimed warm-up of five plain steps. ``peak RSS``: the process's peak resident set after
the plain loop and after the recorded loop (Linux ``ru_maxrss``).

Models: ``mlp-cg`` (784-2048-10, Coherent Gradients) and ``cnn-bn`` (two conv-BN-ReLU-pool blocks
and a linear layer, Making Coherence; the BatchNorm CNN of ``examples/own_loop.py``, on MNIST's
28 x 28 images), with the Recorder's defaults (eval mode, 300 sampled coordinates per layer, no
projections or Gram blocks, float32 zstd with checksums).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

#: the benchmark's models (names of :func:`pipelines.models.build_model`)
MODELS = ("mlp-cg", "cnn-bn")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def case(model_name: str, *, m: int, steps: int, every: int, batch_size: int, device: str, threads: int,
         data_dir: str | None, workdir: str | None) -> dict:
    """One model and m: the plain loop, then the recorded loop; returns the medians and peaks."""
    import numpy as np
    import torch
    from torch import nn

    from gradstore.errors import DataError
    from gradstore.record import Recorder, Schedule
    from pipelines.data import load_mnist
    from pipelines.models import build_model

    if threads:
        torch.set_num_threads(threads)
    mnist = load_mnist(data_dir)
    n = len(mnist.train_labels)
    if m > n:
        raise DataError(f"--m {m} exceeds the {n} training images of {mnist.source}")
    images = torch.from_numpy(mnist.train_images.astype(np.float32) / 255.0).unsqueeze(1)
    labels = torch.from_numpy(np.ascontiguousarray(mnist.train_labels)).long()
    batches = torch.randint(0, n, (steps, batch_size), generator=torch.Generator().manual_seed(0))
    tracked_x, tracked_y = images[:m].to(device), labels[:m].to(device)

    def loop(recorder=None):
        model = build_model(model_name, seed=0).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if recorder is not None:
            recorder = recorder(model)
        step_s, check_s = [], []
        start = time.perf_counter()
        for step in range(steps):
            t0 = time.perf_counter()
            x, y = images[batches[step]].to(device), labels[batches[step]].to(device)
            model.train()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            captured = recorder is not None and recorder.maybe_record(step, model, lr=0.05,
                                                                      train_loss=float(loss))
            t2 = time.perf_counter()
            step_s.append((t2 - t0, captured))
            check_s.append(t2 - t1)
        if recorder is not None:
            recorder.close()  # waits for the last background write
        return time.perf_counter() - start, step_s, check_s, model

    warm = steps
    steps = min(5, steps)
    loop()  # warm-up (allocator, threads, first-call costs), not timed
    steps = warm
    plain_total, plain_steps, _, _ = loop()
    peak_plain = _peak_rss()
    timings = {"capture": [], "write": []}

    def recorder(model):
        rec = Recorder(f"{tmp}/store.zarr", model, train_inputs=tracked_x, train_targets=tracked_y,
                       train_ids=np.arange(m), schedule=Schedule.every(every), config={"bench": "record"})
        capture, append = rec.capture_step, rec.writer.append_step

        def timed_capture(*a, **kw):
            t0 = time.perf_counter()
            out = capture(*a, **kw)
            timings["capture"].append(time.perf_counter() - t0)
            return out

        def timed_append(*a, **kw):  # runs in the Recorder's writer thread
            t0 = time.perf_counter()
            out = append(*a, **kw)
            timings["write"].append(time.perf_counter() - t0)
            return out

        rec.capture_step, rec.writer.append_step = timed_capture, timed_append
        return rec

    with tempfile.TemporaryDirectory(prefix="gradstore-bench-record-", dir=workdir) as tmp:
        rec_total, rec_steps, checks, _ = loop(recorder)
    peak_rec = _peak_rss()
    captured = [t for t, c in rec_steps if c]
    idle = [t for t, c in rec_steps if not c]
    idle_checks = [c for c, (_, was) in zip(checks, rec_steps) if not was]
    fg = [c for c, (_, was) in zip(checks, rec_steps) if was]
    med = statistics.median
    return {
        "model": model_name, "m": m, "steps": steps, "every": every, "batch_size": batch_size,
        "captures": len(captured), "source": str(mnist.source), "threads": torch.get_num_threads(),
        "plain_step_s": med(t for t, _ in plain_steps), "idle_step_s": med(idle), "idle_check_s": med(idle_checks),
        "captured_step_s": med(captured), "foreground_s": med(fg), "capture_s": med(timings["capture"]),
        "write_s": med(timings["write"]), "plain_loop_s": plain_total, "recorded_loop_s": rec_total,
        "overhead_per_capture_s": (rec_total - plain_total) / max(1, len(captured)),
        "peak_rss_plain": peak_plain, "peak_rss_recorded": peak_rec,
    }


def run(*, models: tuple[str, ...], ms: tuple[int, ...], steps: int, every: int, batch_size: int, device: str,
        threads: int, data_dir: str | None, workdir: str | None, echo=print) -> list[dict]:
    """Every (model, m) case, each in a fresh process; the rows of :func:`case`."""
    from pipelines.bench import run_case

    rows = []
    for name in models:
        for m in ms:
            args = [name, "--m", str(m), "--steps", str(steps), "--every", str(every), "--batch-size",
                    str(batch_size), "--device", device, "--threads", str(threads)]
            if data_dir:
                args += ["--data-dir", data_dir]
            if workdir:
                args += ["--workdir", workdir]
            row = run_case(__name__, args)
            echo(f"  {name:<7} m={m:<5} plain {row['plain_step_s'] * 1e3:7.1f} ms  idle {row['idle_step_s'] * 1e3:7.1f} ms"
                 f"  captured {row['captured_step_s']:6.3f} s (capture {row['capture_s']:.3f} s)  write "
                 f"{row['write_s']:.3f} s  overhead/capture {row['overhead_per_capture_s']:.3f} s  peak RSS "
                 f"{row['peak_rss_plain'] / 2**20:.0f} -> {row['peak_rss_recorded'] / 2**20:.0f} MiB")
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| model | m | plain step (ms) | non-capture step (ms) / of it the schedule check (µs) | captured step (s) "
        "| of it capture (s) | background write (s) | loop overhead per capture (s) | peak RSS plain → recorded (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['m']} | {r['plain_step_s'] * 1e3:.1f} | {r['idle_step_s'] * 1e3:.1f} / "
            f"{r['idle_check_s'] * 1e6:.0f} | {r['captured_step_s']:.3f} | {r['capture_s']:.3f} | {r['write_s']:.3f} | "
            f"**{r['overhead_per_capture_s']:.3f}** | {r['peak_rss_plain'] / 2**20:.0f} → "
            f"{r['peak_rss_recorded'] / 2**20:.0f} |")
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(description="one Recorder-overhead benchmark case (internal)")
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--m", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    print(json.dumps(case(args.model, m=args.m, steps=args.steps, every=args.every, batch_size=args.batch_size,
                          device=args.device, threads=args.threads, data_dir=args.data_dir, workdir=args.workdir)))


if __name__ == "__main__":
    _main()
