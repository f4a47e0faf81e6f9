"""Every notebook under notebooks/ runs from top to bottom under nbclient and draws its plots.

``retail_analysis.ipynb`` runs twice: on the session's demo lake (``CDC_NOTEBOOK_LAKE``), and
as a newcomer opens it, starting the demo itself (a throwaway PostgreSQL of its own).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
RETAIL = NOTEBOOK_DIR / "retail_analysis.ipynb"

#: The retail notebook's plot cells, by tag: each must draw a figure.
RETAIL_PLOTS = (
    "plot-stock-now",
    "plot-orders-per-minute",
    "plot-price-history",
    "plot-as-of",
    "plot-anomalies",
)

pytestmark = [pytest.mark.notebook, pytest.mark.postgres]


def execute(path: Path) -> nbformat.NotebookNode:
    """Run ``path`` in a fresh ipykernel (working directory: the notebook's folder) and
    return it with its outputs; fails the test, with the cell's traceback, if a cell raises."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}")
    return nb


def images(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def cell_tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged {tag!r}, found {len(tagged)}"
    return tagged[0]


def text_output(cell: nbformat.NotebookNode) -> str:
    return "".join(
        out.get("text", "") or out.get("data", {}).get("text/plain", "")
        for out in cell.get("outputs", [])
    )


def check_retail(nb: nbformat.NotebookNode) -> None:
    missing = [tag for tag in RETAIL_PLOTS if images(cell_tagged(nb, tag)) == 0]
    assert not missing, f"no plot (image/png output) from the cells tagged {missing}"
    # The demo's workload loses a pallet every 100 orders: the anomaly check flags them.
    summary = text_output(cell_tagged(nb, "plot-anomalies"))
    counted = re.search(r"(\d+) flagged", summary)
    assert counted and int(counted.group(1)) > 0, f"the anomaly check flagged nothing: {summary}"
    flagged = text_output(cell_tagged(nb, "flagged-rows"))
    assert flagged.count(" store ") >= int(counted.group(1)), flagged


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_plots(
    path: Path, demo_lake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDC_NOTEBOOK_LAKE", str(demo_lake))
    nb = execute(path)
    assert sum(images(c) for c in nb.cells) > 0, f"{path.name} drew no plot"
    if path == RETAIL:
        check_retail(nb)


def test_retail_notebook_starts_the_demo_without_a_lake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDC_NOTEBOOK_LAKE", raising=False)
    monkeypatch.setenv("CDC_NOTEBOOK_DEMO_SECONDS", "3")
    nb = execute(RETAIL)
    setup = "".join(text_output(c) for c in nb.cells[:4])
    written = re.search(r"^lake: (/.*cdc-demo-lake-\S+)$", setup, re.MULTILINE)
    assert written, f"the notebook did not say which lake the demo wrote:\n{setup}"
    try:
        check_retail(nb)
        assert "rows per table, PostgreSQL / lake" in setup, setup
    finally:
        shutil.rmtree(written.group(1))


def test_a_failing_cell_fails_the_test(tmp_path: Path) -> None:
    """The check above is not vacuous: an exception in a cell fails the test, naming it."""
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("x / 0")]
    )
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(pytest.fail.Exception, match="ZeroDivisionError"):
        execute(path)
