"""`gradstore bench record`'s case runs a user loop with and without a Recorder and splits its times."""

from pipelines.bench.record import case, markdown


def test_a_record_case_runs_and_its_parts_add_up(tmp_path):
    row = case("mlp-cg", m=6, steps=5, every=2, batch_size=4, rounds=1, device="cpu", threads=1, data_dir=None,
               workdir=str(tmp_path))
    assert row["captures"] == 3  # steps 0, 2 and 4
    assert 0 < row["idle_check_s"] < row["idle_step_s"]
    assert 0 < row["capture_s"] <= row["foreground_s"] < row["captured_step_s"]  # capture is part of the step
    assert row["write_s"] > 0 and row["peak_rss_recorded"] >= row["peak_rss_plain"] > 0
    assert not list(tmp_path.iterdir())  # the store went with its temporary folder
    table = markdown([row])
    assert table.count("\n") == 2 and "| mlp-cg | 6 |" in table
