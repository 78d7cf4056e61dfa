"""The `serve` command as a user runs it, in real processes (the demo: tests/test_demo.py)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from .processes import free_port, wait_for

pytestmark = pytest.mark.system


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_answers_with_one_or_more_workers(recorded_db, workers):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gluscope.cli", "serve", str(recorded_db), "--port", str(port),
                             "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        models = wait_for(f"http://127.0.0.1:{port}/api/models", proc).json()["models"]
        assert len(models) == 1
        page = httpx.get(f"http://127.0.0.1:{port}/models/{models[0]['id']}/neurons/1/3", timeout=10)
        assert page.status_code == 200 and "gate-_in-" in page.text
        # A view that reads the file, answered by a reader process.
        section = httpx.get(f"http://127.0.0.1:{port}/api/models/{models[0]['id']}/neurons/1/3/examples",
                            params={"quadrant": "nn", "hook": "act"}, timeout=10)
        assert section.status_code == 200 and section.json()["examples"]
    finally:
        proc.terminate()
        proc.wait(20)


def test_importing_the_server_does_not_import_torch():
    code = "import sys, gluscope.server.app, gluscope.cli; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
