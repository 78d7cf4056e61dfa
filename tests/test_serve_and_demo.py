"""The `serve` and `demo` commands as a user runs them, in real processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import duckdb
import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 60) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            return httpx.get(url, timeout=2)
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds} s")


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


def test_demo_records_the_bundled_model(tmp_path):
    out = tmp_path / "demo.duckdb"
    r = subprocess.run([sys.executable, "-m", "gluscope.cli", "demo", "--no-serve", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "an interesting neuron" in r.stdout
    con = duckdb.connect(str(out), read_only=True)
    name, n_layers, n_tokens, refactor = con.execute(
        "SELECT model_name, n_layers, n_tokens, refactor_glu FROM metadata").fetchone()
    assert (name, n_layers, refactor) == ("gluscope-demo-llama", 4, True) and n_tokens > 50_000
    # Every quadrant occurs in every layer of a trained model.
    empty = con.execute("SELECT count(*) FROM neurons GROUP BY layer HAVING min(count_nn) = 0 AND max(count_nn) = 0").fetchall()
    assert empty == []
    # A second run reuses the database instead of recording again.
    again = subprocess.run([sys.executable, "-m", "gluscope.cli", "demo", "--no-serve", "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "reusing" in again.stdout
