"""Helpers for the tests whose subject is a process boundary: the CLI as a user runs it, and servers on ports."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

GLUSCOPE = [sys.executable, "-m", "gluscope.cli"]


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`gluscope ARGS` in a fresh process, its output captured as text."""
    return subprocess.run([*GLUSCOPE, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def record_cmd(model: Path, corpus: Path, out: Path, *options: str) -> list[str]:
    """The command line of `gluscope record` on the CPU, without compilation."""
    return [*GLUSCOPE, "record", "--model", str(model), "--dataset", str(corpus), "--out", str(out),
            "--device", "cpu", "--compile", "off", *options]


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """A refusal as the CLI promises it: a non-zero exit, no traceback, one last line naming the command."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gluscope "), result.stderr
    for w in words:
        assert w in last, last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 60) -> httpx.Response:
    """The first answer of `url`, while `proc` (the server) is alive."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            return httpx.get(url, timeout=2)
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@contextmanager
def served_in_thread(app) -> Iterator[str]:
    """An ASGI app served by uvicorn on a free port in a thread of this process: its base URL.

    For an HTTP boundary inside one test process (the server calling the probe, a browser calling the
    server), where a separate process would add only its start-up time.
    """
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
