"""The experiment run folder (issue 12): the marker and what --resume may overwrite (finding 4), paths
from config values kept inside --out (7), hostile or damaged folders refused in one line (18), a
second process resuming at once (20), tracked samples above the data size (22), analysis folders
written under a temporary name (24), and a full disk (19)."""

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gradstore.errors import GradstoreError
from pipelines.cli import main
from pipelines.experiments.common import MARKER, Context, RunFolder, tracked_indices

TINY = """
noise_levels = [0.5]
steps = 4
eval_every = 2

[capture]
tracked_train = 16
tracked_test = 0
coords_per_layer = 4
moments_examples = 32
gram = false
log_until = 2
log_points = 2
every = 2

[analysis]
nulls = 0
metrics = ["coherence"]
"""


def run_cli(capsys, out, *extra, config=None):
    """``gradstore run label-noise --quick`` with the tiny configuration; (exit code, stderr)."""
    args = ["run", "label-noise", "--quick", "--no-progress", "--out", str(out), *extra]
    if config is not None:
        args += ["--config", str(config)]
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradstore: error: "), err
    return lines[0]


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory):
    """One finished tiny label-noise run, made once for the module (each test gets a copy)."""
    root = tmp_path_factory.mktemp("finished")
    (root / "tiny.toml").write_text(TINY)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            main(["run", "label-noise", "--quick", "--no-progress", "--out", str(root / "run"),
                  "--config", str(root / "tiny.toml")])
        except SystemExit as exc:
            pytest.fail(f"the tiny run failed ({exc.code}): {err.getvalue()}")
    return root / "run"


@pytest.fixture
def finished(tmp_path, finished_once):
    """A finished tiny label-noise run folder of this test's own (a copy of the module's run)."""
    out = tmp_path / "run"
    shutil.copytree(finished_once, out, symlinks=True)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the run's marker and the store's root metadata (its writer's lock)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != MARKER and not str(p).endswith("store.zarr/zarr.json")}


# --- the marker ------------------------------------------------------------------------------------


def test_a_fresh_run_lists_every_path_it_writes(finished):
    marker = json.loads((finished / MARKER).read_text())
    assert marker["experiment"] == "label-noise"
    listed = set(marker["files"])
    on_disk = {p.name for p in finished.iterdir()} - {MARKER, "noise-0.50"}
    on_disk |= {f"noise-0.50/{p.name}" for p in (finished / "noise-0.50").iterdir()}
    assert on_disk == listed
    assert listed >= {"report.md", "summary.json", "noise-0.50/store.zarr", "noise-0.50/checkpoint.pt",
                      "noise-0.50/analysis", "noise-0.50/history.csv"}
    assert not any(name.startswith(".") for name in os.listdir(finished / "noise-0.50"))  # no partial left


def test_resume_into_a_folder_without_the_marker_is_refused(tmp_path, tiny, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my own report\n")
    (out / "summary.json").write_text("{}\n")
    code, err = run_cli(capsys, out, "--resume", config=tiny)
    assert code == 2
    line = one_line(err)
    assert MARKER in line and "--out" in line
    assert snapshot(out) == {"report.md": b"my own report\n", "summary.json": b"{}\n"}


def test_resume_refuses_a_file_the_run_did_not_write(finished, tiny, capsys):
    """The run was killed before its summary: someone else's summary.json there is kept, not overwritten."""
    marker = json.loads((finished / MARKER).read_text())
    marker["files"].remove("summary.json")
    (finished / MARKER).write_text(json.dumps(marker))
    (finished / "summary.json").write_text("someone else's\n")
    before = snapshot(finished)
    code, err = run_cli(capsys, finished, "--resume", config=tiny)
    assert code == 2
    line = one_line(err)
    assert "summary.json" in line and "was not written by this run" in line and "move it away" in line
    assert snapshot(finished) == before  # refused before any work: nothing rewritten


def test_resume_of_a_finished_run_rewrites_only_its_own_files(finished, tiny, capsys):
    (finished / "notes.txt").write_text("mine\n")
    summary = (finished / "summary.json").read_bytes()
    assert run_cli(capsys, finished, "--resume", config=tiny)[0] == 0
    assert (finished / "notes.txt").read_text() == "mine\n"
    assert (finished / "summary.json").read_bytes() == summary


@pytest.mark.parametrize("damage", ["other experiment", "not json", "not a marker"])
def test_a_foreign_or_damaged_marker_is_one_line(finished, tiny, capsys, damage):
    marker = finished / MARKER
    if damage == "other experiment":
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "experiment": "winsorize"}))
    elif damage == "not json":
        marker.write_bytes(b"\x00\xff garbage")
    else:
        marker.write_text(json.dumps({"files": "report.md"}))
    code, err = run_cli(capsys, finished, "--resume", config=tiny)
    assert code == 2
    assert "--out" in one_line(err)


def test_a_fresh_run_that_fails_before_writing_leaves_no_marker(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, out, "--data-dir", str(tmp_path / "missing"), config=tiny)
    assert code == 2 and one_line(err)
    assert not (out / MARKER).exists()
    assert run_cli(capsys, out, config=tiny)[0] == 0  # the corrected command starts it, no --resume needed


def test_a_second_process_in_the_same_folder_is_one_line(finished, tiny, capsys):
    holder = RunFolder.open(finished, "label-noise", resume=True)  # as a first `--resume` would
    try:
        code, err = run_cli(capsys, finished, "--resume", config=tiny)
    finally:
        holder.close()
    assert code == 2
    line = one_line(err)
    assert f"pid {os.getpid()}" in line and "another gradstore process" in line
    assert run_cli(capsys, finished, "--resume", config=tiny)[0] == 0  # released: resumes


# --- hostile and damaged folders (finding 18) ------------------------------------------------------


@pytest.mark.parametrize("what", ["analysis is a file", "run folder is a file", "garbage checkpoint",
                                  "truncated checkpoint", "store is a file"])
def test_resume_into_a_damaged_folder_is_one_line(finished, tiny, capsys, what):
    run_dir = finished / "noise-0.50"
    if what == "analysis is a file":
        shutil.rmtree(run_dir / "analysis")
        (run_dir / "analysis").write_text("x")
    elif what == "run folder is a file":
        shutil.rmtree(run_dir)
        run_dir.write_text("x")
    elif what == "garbage checkpoint":
        (run_dir / "checkpoint.pt").write_bytes(os.urandom(5000))
    elif what == "truncated checkpoint":
        path = run_dir / "checkpoint.pt"
        path.write_bytes(path.read_bytes()[:1000])
    else:
        shutil.rmtree(run_dir / "store.zarr")
        (run_dir / "store.zarr").write_text("x")
    before = snapshot(finished)
    code, err = run_cli(capsys, finished, "--resume", config=tiny)
    assert code == 2
    line = one_line(err)
    assert "--out" in line or "--resume" in line
    assert snapshot(finished) == before


def test_resume_with_the_store_deleted_and_the_checkpoint_kept_is_one_line(finished, tiny, capsys):
    """Not an IndexError, and not a store silently missing its early steps."""
    shutil.rmtree(finished / "noise-0.50" / "store.zarr")
    code, err = run_cli(capsys, finished, "--resume", config=tiny)
    assert code == 2
    line = one_line(err)
    assert "holds 0 committed steps" in line and "checkpoint.pt" in line and "--resume" in line
    (finished / "noise-0.50" / "checkpoint.pt").unlink()  # the fix the line names: replay from step 0
    assert run_cli(capsys, finished, "--resume", config=tiny)[0] == 0
    from gradstore.store import open_run

    assert open_run(finished / "noise-0.50" / "store.zarr").step.values.tolist() == [0, 1, 2, 4]


def test_out_is_a_file_is_one_line(tmp_path):
    from pipelines.experiments.common import prepare_out

    (tmp_path / "f").write_text("x")
    for opening in (lambda: prepare_out(tmp_path / "f", resume=True),
                    lambda: RunFolder.open(tmp_path / "f", "label-noise", resume=True)):
        with pytest.raises(GradstoreError, match="is a file|is not a folder") as exc:
            opening()
        assert "\n" not in str(exc.value) and "--out" in str(exc.value)
    assert (tmp_path / "f").read_text() == "x"


# --- paths from config values (finding 7) ----------------------------------------------------------


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("key, value", [("c_values", ["x/../../../ESCAPED"]), ("c_values", [0, "../../ESCAPED"]),
                                        ("noise_levels", ["../../ESCAPED"]), ("noise_levels", [0.5, 0.501])])
def test_winsorize_paths_from_config_values_stay_inside_out(tmp_path, key, value):
    """Called without the configuration schema (as a library user could): nothing is created anywhere."""
    from pipelines.experiments.config import load_config
    from pipelines.experiments.winsorize import run

    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    config = {**load_config("winsorize", quick=True), key: value}
    with pytest.raises(GradstoreError) as exc:
        run(config, Context(out=out, progress=False))
    assert "\n" not in str(exc.value)
    assert listing(tmp_path) == {"deep", "deep/out"}


def test_coherence_evolution_model_names_stay_inside_out(tmp_path):
    from pipelines.experiments.coherence_evolution import run
    from pipelines.experiments.config import load_config

    out = tmp_path / "out"
    out.mkdir()
    config = {**load_config("coherence-evolution", quick=True), "models": ["../../ESCAPED"]}
    with pytest.raises(GradstoreError):
        run(config, Context(out=out, progress=False))
    assert listing(tmp_path) == {"out"}


@pytest.mark.parametrize("parts", [("..",), ("a/b",), ("noise-0.50", "../../x"), ("",), ("a\\b",), ("a\x00",)])
def test_run_folder_paths_are_plain_names(tmp_path, parts):
    folder = RunFolder.open(tmp_path, "label-noise", resume=False)
    try:
        with pytest.raises(GradstoreError):
            folder.path(*parts)
    finally:
        folder.close()


def test_a_link_out_of_the_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    folder = RunFolder.open(out, "label-noise", resume=False)
    try:
        (out / "noise-0.50").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(GradstoreError, match="outside --out"):
            folder.claim("noise-0.50", "store.zarr", kind="dir")
        assert folder.path("noise-0.25", "store.zarr") == out / "noise-0.25" / "store.zarr"
    finally:
        folder.close()
    assert not any((tmp_path / "elsewhere").iterdir())


def test_a_write_that_fills_the_disk_is_one_line(tmp_path):
    folder = RunFolder.open(tmp_path, "label-noise", resume=False)
    try:
        with pytest.raises(GradstoreError) as exc:
            with folder.writing("report.md"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    finally:
        folder.close()
    assert str(exc.value) == f"writing {tmp_path / 'report.md'} failed: no space left on device; free space " \
                             "then run again with --resume"


# --- tracked samples above the data size (finding 22) ---------------------------------------------


def test_tracked_sample_above_the_data_size_is_refused():
    assert len(tracked_indices(100, 100, 0)) == 100 and len(tracked_indices(100, 0, 0)) == 0
    with pytest.raises(GradstoreError, match=r"\[capture\] tracked_train = 101 but the data have 100"):
        tracked_indices(100, 101, 0, key="[capture] tracked_train")


@pytest.mark.parametrize("key, value, size", [("tracked_train", 20000, "10000 training"),
                                              ("moments_examples", 10001, "10000 training"),
                                              ("tracked_test", 2001, "2000 test")])
def test_run_refuses_a_tracked_sample_above_the_data_size(tmp_path, capsys, key, value, size):
    """The bundled subset has 10,000 training and 2,000 test examples; never silently fewer tracked."""
    config = tmp_path / "big.toml"
    config.write_text(TINY.replace(f"{key} = ", f"{key} = {value} #"))
    code, err = run_cli(capsys, tmp_path / "run", config=config)
    assert code == 2
    line = one_line(err)
    assert f"{key} = {value}" in line and size in line
    assert not (tmp_path / "run" / "noise-0.50" / "checkpoint.pt").exists()


# --- analysis folders (finding 24, 20) ------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    import xarray as xr

    steps = np.arange(3)
    return xr.Dataset({"per_step_value": (("step", "layer"), np.arange(6.0).reshape(3, 2))},
                      coords={"step": steps, "layer": ["fc1", "(model)"]})


def test_an_interrupted_analysis_leaves_no_output_folder(tmp_path, results, monkeypatch):
    import analysis.output as output

    seen = []

    def fail(res, out):
        seen.append(((tmp_path / "a").exists(), out.name))
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "_plots", fail)
    with pytest.raises(KeyboardInterrupt):
        output.write_results(results, tmp_path / "a")
    assert seen[0][0] is False and seen[0][1].startswith(".a.partial-")  # written elsewhere meanwhile
    assert os.listdir(tmp_path) == []


def test_a_killed_analysis_leaves_only_a_marked_partial_folder(tmp_path):
    """kill -9 while writing: no ``out``, a ``.out.partial-PID-…`` folder, and a later analysis works."""
    code = f"""
import os, signal, numpy as np, xarray as xr
import analysis.output as output
output._plots = lambda res, out: os.kill(os.getpid(), signal.SIGKILL)
ds = xr.Dataset({{"v": (("step", "layer"), np.zeros((2, 1)))}}, coords={{"step": [0, 1], "layer": ["a"]}})
output.write_results(ds, {str(tmp_path / "a")!r})
"""
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr
    names = os.listdir(tmp_path)
    assert len(names) == 1 and names[0].startswith(".a.partial-")
    from analysis.output import write_results

    import xarray as xr

    ds = xr.Dataset({"v": (("step", "layer"), np.zeros((2, 1)))}, coords={"step": [0, 1], "layer": ["a"]})
    write_results(ds, tmp_path / "a")
    assert (tmp_path / "a" / "results.zarr").is_dir()


def test_write_results_still_refuses_a_non_empty_folder(tmp_path, results):
    from analysis.output import write_results

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("x")
    with pytest.raises(GradstoreError, match="already exists and is not empty"):
        write_results(results, tmp_path / "a")
    assert os.listdir(tmp_path / "a") == ["mine.txt"]


def test_two_analyses_finishing_at_once(tmp_path, results, monkeypatch):
    """The second one to finish gets one line (or, replacing, puts its own complete results in place)."""
    import analysis.output as output

    write_into = output._write_into

    def and_another_finishes(res, partial):
        written = write_into(res, partial)
        if not (tmp_path / "a").exists():
            write_into(res, output._new_sibling(tmp_path / "a", "x")).__len__()
            os.rename(next(tmp_path.glob(".a.x-*")), tmp_path / "a")
        return written

    monkeypatch.setattr(output, "_write_into", and_another_finishes)
    with pytest.raises(GradstoreError) as exc:
        output.write_results(results, tmp_path / "a")
    assert "another process" in str(exc.value) and "\n" not in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["a"]
    files = output.write_results(results, tmp_path / "a", replace=True)
    assert all(f.exists() for f in files) and sorted(os.listdir(tmp_path)) == ["a"]


@pytest.mark.parametrize("what", ["a file", "not an analysis"])
def test_replace_refuses_what_is_not_an_analysis(tmp_path, results, what):
    from analysis.output import write_results

    if what == "a file":
        (tmp_path / "a").write_text("x")
    else:
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "thesis.tex").write_text("x")
    with pytest.raises(GradstoreError) as exc:
        write_results(results, tmp_path / "a", replace=True)
    assert "move" in str(exc.value)
    assert snapshot(tmp_path) in ({"a": b"x"}, {"a/thesis.tex": b"x"})
