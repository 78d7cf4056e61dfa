"""Reader processes: the views that query the files run in them, fed from one queue."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gluscope.server.app import create_app
from gluscope.server.errors import ParameterError
from gluscope.server.readers import Readers, usable_cpus

pytestmark = pytest.mark.system


def pid_after(registry, seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def refuse(registry, parameter: str) -> bytes:
    raise ParameterError(404, parameter, f"no such {parameter}", "0..3")


def test_requests_are_shared_by_all_readers_and_errors_come_back_whole(recorded_db):
    readers = Readers([recorded_db], 2)
    try:
        async def many():
            return await asyncio.gather(*(readers.run(pid_after, 0.2) for _ in range(4)))

        pids = asyncio.run(many())
        # Four requests of 0.2 s at once: each reader takes the next one as soon as it is free.
        assert sorted(set(pids)) == readers.pids() and len(set(pids)) == 2
        with pytest.raises(ParameterError) as e:
            asyncio.run(readers.run(refuse, "layer"))
        assert e.value.body() == {"error": {"status": 404, "parameter": "layer", "message": "no such layer",
                                            "valid": "0..3"}}
    finally:
        readers.close()


def test_a_reader_that_dies_is_replaced(recorded_db):
    with TestClient(create_app([recorded_db], readers=1), raise_server_exceptions=False) as client:
        m = client.get("/api/models").json()["models"][0]["id"]
        url = f"/api/models/{m}/neurons/0/3/examples?quadrant=pp&hook=act"
        assert client.get(url).status_code == 200
        (pid,) = client.app.state.readers.pids()
        os.kill(pid, signal.SIGKILL)
        failed = client.get(url)
        assert failed.status_code == 503 and "restarted" in failed.json()["error"]["message"]
        assert client.get(url).status_code == 200
        assert client.app.state.readers.pids() != [pid]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_readers_leave_when_the_http_process_is_killed(recorded_db):
    from .processes import free_port, wait_for

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gluscope.cli", "serve", str(recorded_db), "--port", str(port),
                             "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(f"http://127.0.0.1:{port}/api/models", proc).status_code == 200
        readers = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(readers) == 2
    finally:
        proc.kill()  # SIGKILL: no shutdown runs in the HTTP process
        proc.wait(10)
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{p}").exists() for p in readers):
        assert time.monotonic() < deadline, "reader processes outlived the HTTP process"
        time.sleep(0.2)


@pytest.mark.parametrize("cpu_max, cap", [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1),
                                          ("nonsense", None)])
def test_usable_cpus_follow_the_affinity_and_a_cgroup_quota(tmp_path, cpu_max, cap):
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(path) == (affinity if cap is None else min(affinity, cap))
    assert usable_cpus(tmp_path / "absent") == affinity


def test_serve_starts_one_reader_per_usable_cpu_by_default(recorded_db):
    from .processes import free_port, wait_for

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gluscope.cli", "serve", str(recorded_db), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(f"http://127.0.0.1:{port}/api/models", proc).status_code == 200
        readers = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(readers) == usable_cpus()
    finally:
        proc.terminate()
        proc.wait(20)
