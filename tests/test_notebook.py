"""The example notebook runs headless, start to end, on a real recording with a real probe beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "paper_usage.ipynb"


@pytest.mark.system
def test_the_papers_usage_examples_run_in_the_notebook(recorded_db, live_probe_server, monkeypatch, tmp_path):
    monkeypatch.setenv("GLUSCOPE_DB", str(recorded_db))
    monkeypatch.setenv("GLUSCOPE_SERVER", live_probe_server)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "the notebook is committed without outputs"
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "the SQL gives" in text                       # §5.1: Figure 4's correlation, checked against the SQL
    assert any("image/png" in o.get("data", {}) for o in outputs)  # its plot
    assert html.count("gluscope-notebook") >= 2 and "gate-_in-" in html  # §5.2: the neuron and its list inline
    assert "switched off at its" in text and "no probe answered" not in text  # the probe answered
