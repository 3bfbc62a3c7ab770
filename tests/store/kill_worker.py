"""Worker of the chosen-moment crash tests: append steps to a store, SIGKILL itself at a chosen moment.

``python kill_worker.py STORE N_STEPS MOMENT K`` appends steps 0..N_STEPS-1 (skipping those already
committed) of :func:`store_helpers.step_data` to STORE and kills itself with SIGKILL at the K-th
(1-based) occurrence of MOMENT, counted from its start:

- ``resize``: just before an array is grown (K-1 arrays of the step already grown);
- ``write``: just before an array's slot is written;
- ``commit``: just before the root zarr.json (the commit record) is replaced;
- ``committed``: just after it was replaced;
- ``never``: runs to the end.

With ``--slow S`` it sleeps S seconds after every commit (a writer for concurrent readers).
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import zarr  # noqa: E402
from store_helpers import small_layout, step_data  # noqa: E402

import gradstore.store.writer as writer_module  # noqa: E402
from gradstore.store import create_run  # noqa: E402


def main(store: str, n_steps: int, moment: str, k: int, slow: float = 0.0) -> None:
    seen = {"n": 0}

    def tick(now: str) -> None:
        if now == moment and writer_module_state["open"]:
            seen["n"] += 1
            if seen["n"] == k:
                os.kill(os.getpid(), signal.SIGKILL)

    resize, setitem, put = zarr.AsyncArray.resize, zarr.AsyncArray.setitem, writer_module._put

    async def counted_resize(self, *a, **kw):
        tick("resize")
        return await resize(self, *a, **kw)

    async def counted_setitem(self, *a, **kw):
        tick("write")
        return await setitem(self, *a, **kw)

    def counted_put(store_, key, document):
        tick("commit")
        put(store_, key, document)
        if writer_module_state["open"]:
            tick("committed")
            time.sleep(slow)

    writer_module_state = {"open": False}
    zarr.AsyncArray.resize, zarr.AsyncArray.setitem, writer_module._put = counted_resize, counted_setitem, counted_put
    layout = small_layout()
    with create_run(store, layout) as writer:
        writer_module_state["open"] = True  # count the appends' moments only, not creation's
        print("open", writer.committed, flush=True)
        for step in range(n_steps):
            if writer.last_step is None or step > writer.last_step:
                writer.append_step(step, **step_data(layout, step))


if __name__ == "__main__":
    args = sys.argv[1:]
    slow = 0.0
    if "--slow" in args:
        i = args.index("--slow")
        slow = float(args[i + 1])
        del args[i:i + 2]
    main(args[0], int(args[1]), args[2], int(args[3]), slow)
