"""The example notebook as committed; test_demo.py runs it against the demo's recording and probe."""

from __future__ import annotations

import pytest

from .notebook_run import NOTEBOOK

nbformat = pytest.importorskip("nbformat")


@pytest.mark.unit
def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") or cell.get("execution_count") for cell in notebook.cells
                   if cell.cell_type == "code")
