"""Runs examples/paper_usage.ipynb headless (nbclient) against a recording and a server with a probe."""

from __future__ import annotations

import os
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "paper_usage.ipynb"


def run_notebook(db: Path, server: str) -> None:
    """Execute every cell against `db` and the server at `server`; fail on any error, and unless the paper's two
    usage examples and the probe's ablation each left their output."""
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {**os.environ, "GLUSCOPE_DB": str(db), "GLUSCOPE_SERVER": server,
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute(env=env)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, "\n".join(f"{o.ename}: {o.evalue}" for o in errors)
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "the SQL gives" in text                       # §5.1: Figure 4's correlation, checked against the SQL
    assert any("image/png" in o.get("data", {}) for o in outputs)  # its plot
    assert html.count("gluscope-notebook") >= 2 and "gate-_in-" in html  # §5.2: the neuron and its list inline
    assert "switched off at its" in text and "no probe answered" not in text  # the probe answered
