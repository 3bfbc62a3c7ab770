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

The plain and the recorded loop alternate for ``rounds`` rounds (after an untimed warm-up of five
plain steps); the fastest loop of each kind (the least disturbed on a shared machine) gives the
figures, medians over its steps of each kind; CPU times (``time.process_time``: every thread of the
process, torch's and the writer's included) are given beside the wall times, as a shared machine
disturbs them less. ``peak RSS``: the process's peak resident set after
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


def case(model_name: str, *, m: int, steps: int, every: int, batch_size: int, rounds: int, device: str,
         threads: int, data_dir: str | None, workdir: str | None) -> dict:
    """One model and m: ``rounds`` x (the plain loop, then the recorded loop); the medians of the
    fastest loop of each kind, and the peaks."""
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

    def loop(recorder=None, n_steps=steps):
        """The user's loop; per step (wall s, CPU s, captured), the maybe_record calls, the totals."""
        model = build_model(model_name, seed=0).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if recorder is not None:
            recorder = recorder(model)
        per_step, checks = [], []
        start, cpu_start = time.perf_counter(), time.process_time()
        for step in range(n_steps):
            t0, c0 = time.perf_counter(), time.process_time()
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
                                                                      train_loss=loss.detach().item())
            t2 = time.perf_counter()
            per_step.append((t2 - t0, time.process_time() - c0, captured))
            checks.append(t2 - t1)
        if recorder is not None:
            recorder.close()  # waits for the last background write
        return {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu_start, "steps": per_step,
                "checks": checks}

    timings: dict = {}

    def recorder(model):
        rec = Recorder(f"{tmp}/store.zarr", model, train_inputs=tracked_x, train_targets=tracked_y,
                       train_ids=np.arange(m), schedule=Schedule.every(every), overwrite=True,
                       config={"bench": "record"})
        capture, append = rec.capture_step, rec.writer.append_step

        def timed_capture(*a, **kw):
            t0, c0 = time.perf_counter(), time.process_time()
            out = capture(*a, **kw)
            timings["capture"].append((time.perf_counter() - t0, time.process_time() - c0))
            return out

        def timed_append(*a, **kw):  # runs in the Recorder's writer thread
            t0 = time.perf_counter()
            out = append(*a, **kw)
            timings["write"].append(time.perf_counter() - t0)
            return out

        rec.capture_step, rec.writer.append_step = timed_capture, timed_append
        return rec

    loop(n_steps=min(5, steps))  # warm-up (allocator, threads, first calls), not timed
    best: dict = {}
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="gradstore-bench-record-", dir=workdir) as tmp:
        for _ in range(rounds):  # alternating, the fastest loop of each kind (the least disturbed)
            for kind in ("plain", "recorded"):
                timings.update(capture=[], write=[])
                out = loop(recorder if kind == "recorded" else None)
                out["timings"] = {k: list(v) for k, v in timings.items()}
                peaks.setdefault(kind, _peak_rss())  # the first plain loop: before any Recorder existed
                if kind not in best or out["wall"] < best[kind]["wall"]:
                    best[kind] = out
    plain, rec = best["plain"], best["recorded"]
    med = statistics.median
    captured = [(w, c) for w, c, was in rec["steps"] if was]
    idle = [(w, c) for w, c, was in rec["steps"] if not was]
    checks = [t for t, (_, _, was) in zip(rec["checks"], rec["steps"]) if not was]
    foreground = [t for t, (_, _, was) in zip(rec["checks"], rec["steps"]) if was]
    n_cap = max(1, len(captured))
    return {
        "model": model_name, "m": m, "steps": steps, "every": every, "batch_size": batch_size, "rounds": rounds,
        "captures": len(captured), "source": str(mnist.source), "threads": torch.get_num_threads(),
        "plain_step_s": med(w for w, _, _ in plain["steps"]), "plain_step_cpu_s": med(c for _, c, _ in plain["steps"]),
        "idle_step_s": med(w for w, _ in idle), "idle_step_cpu_s": med(c for _, c in idle),
        "idle_check_s": med(checks), "captured_step_s": med(w for w, _ in captured),
        "captured_step_cpu_s": med(c for _, c in captured), "foreground_s": med(foreground),
        "capture_s": med(w for w, _ in rec["timings"]["capture"]),
        "capture_cpu_s": med(c for _, c in rec["timings"]["capture"]), "write_s": med(rec["timings"]["write"]),
        "plain_loop_s": plain["wall"], "recorded_loop_s": rec["wall"], "plain_loop_cpu_s": plain["cpu"],
        "recorded_loop_cpu_s": rec["cpu"], "overhead_per_capture_s": (rec["wall"] - plain["wall"]) / n_cap,
        "overhead_per_capture_cpu_s": (rec["cpu"] - plain["cpu"]) / n_cap,
        "peak_rss_plain": peaks["plain"], "peak_rss_recorded": peaks["recorded"],
    }


def run(*, models: tuple[str, ...], ms: tuple[int, ...], steps: int, every: int, batch_size: int, rounds: int,
        device: str, threads: int, data_dir: str | None, workdir: str | None, echo=print) -> list[dict]:
    """Every (model, m) case, each in a fresh process; the rows of :func:`case`."""
    from pipelines.bench import run_case

    rows = []
    for name in models:
        for m in ms:
            args = [name, "--m", str(m), "--steps", str(steps), "--every", str(every), "--batch-size",
                    str(batch_size), "--rounds", str(rounds), "--device", device, "--threads", str(threads)]
            if data_dir:
                args += ["--data-dir", data_dir]
            if workdir:
                args += ["--workdir", workdir]
            row = run_case(__name__, args)
            echo(f"  {name:<7} m={m:<5} plain {row['plain_step_s'] * 1e3:.1f} ms "
                 f"(CPU {row['plain_step_cpu_s'] * 1e3:.1f}), "
                 f"non-capture {row['idle_step_s'] * 1e3:.1f} ms (CPU {row['idle_step_cpu_s'] * 1e3:.1f}), captured "
                 f"{row['captured_step_s']:.3f} s (capture {row['capture_s']:.3f} s), write {row['write_s']:.3f} s, "
                 f"overhead per capture {row['overhead_per_capture_s']:.3f} s (CPU "
                 f"{row['overhead_per_capture_cpu_s']:.3f} s), peak RSS {row['peak_rss_plain'] / 2**20:.0f} -> "
                 f"{row['peak_rss_recorded'] / 2**20:.0f} MiB")
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table: wall times, CPU times (all threads of the process) in brackets."""
    lines = [
        "| model | m | plain step, ms | non-capture step, ms / its schedule check, µs | captured step, s "
        "| of it capture, s | background write, s | loop overhead per capture, s | peak RSS plain → recorded, MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['m']} | {r['plain_step_s'] * 1e3:.1f} ({r['plain_step_cpu_s'] * 1e3:.1f}) | "
            f"{r['idle_step_s'] * 1e3:.1f} ({r['idle_step_cpu_s'] * 1e3:.1f}) / {r['idle_check_s'] * 1e6:.0f} | "
            f"{r['captured_step_s']:.3f} ({r['captured_step_cpu_s']:.3f}) | {r['capture_s']:.3f} "
            f"({r['capture_cpu_s']:.3f}) | {r['write_s']:.3f} | **{r['overhead_per_capture_s']:.3f}** "
            f"({r['overhead_per_capture_cpu_s']:.3f}) | {r['peak_rss_plain'] / 2**20:.0f} → "
            f"{r['peak_rss_recorded'] / 2**20:.0f} |")
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(description="one Recorder-overhead benchmark case (internal)")
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--m", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    print(json.dumps(case(args.model, m=args.m, steps=args.steps, every=args.every, batch_size=args.batch_size,
                          rounds=args.rounds, device=args.device, threads=args.threads, data_dir=args.data_dir,
                          workdir=args.workdir)))


if __name__ == "__main__":
    _main()
