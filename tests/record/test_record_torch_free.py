"""gradstore.store reads and writes a run without importing torch (or the capture engine)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import gradstore.store as gs
    from gradstore.store import RunLayout, RunWriter, create_run, open_run, verify_run

    layout = RunLayout(layers=("a",), params=(("a.w", (2,), "a"),), example_ids=np.arange(3), n_train=2,
                       task="sequence", correct="fraction")
    with create_run(sys.argv[1], layout) as writer:
        assert isinstance(writer, RunWriter)
        writer.append_step(0, loss=np.ones(3), correct=np.array([0.5, 1.0, 0.0]), sq_norm=np.ones((3, 1)),
                           dot_with_sum=np.ones((3, 1)), m=np.ones((3, 1)), norm_sq_of_sum=np.ones((3, 1)),
                           sum_of_norm_sq=np.ones((3, 1)))
    ds = open_run(sys.argv[1]).load()
    assert ds.attrs["task"] == "sequence" and ds.correct.dtype == np.float64, ds.attrs
    assert verify_run(sys.argv[1]).ok
    bad = [m for m in ("torch", "gradstore.capture", "gradstore.record") if m in sys.modules]
    print("imported:", bad)
    assert not bad, bad
    gs.Recorder  # the old name still works: imports the torch side now
    assert "torch" in sys.modules
""")


def test_the_store_reads_and_writes_without_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run.zarr")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported: []" in out.stdout
