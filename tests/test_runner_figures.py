"""The runner draws the figures an experiment declares (``Outcome.figures``), in order, into the run
folder, and captions in the report only those that had something to draw."""

from pipelines.experiments.common import Figure, RunFolder
from pipelines.experiments.runner import draw_figures


def test_declared_figures_are_drawn_in_order_and_empty_ones_left_out_of_the_report(tmp_path):
    drawn = []

    def draw(text, result):
        def go(path):
            path.write_text(text)
            drawn.append(path.name)
            return result
        return go

    (tmp_path / "run").mkdir()
    folder = RunFolder.open(tmp_path / "run", "demo", resume=False)
    try:
        captions = draw_figures(folder, [Figure("b.png", "B", draw("b", None)), Figure("a.png", "A", draw("a", True)),
                                         Figure("empty.png", "nothing", draw("says why", False))])
    finally:
        folder.close()
    assert drawn == ["b.png", "a.png", "empty.png"]  # all drawn, in the declared order
    assert captions == [("B", "b.png"), ("A", "a.png")]  # the empty one is not captioned
    assert (tmp_path / "run" / "empty.png").read_text() == "says why"  # its file says why
    assert "empty.png" in folder.files  # claimed by the run, like every file it writes
