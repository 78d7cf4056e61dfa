"""Reader processes: the views that query the files run in them, fed from one queue."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from starlette.testclient import TestClient

from gluscope.server.app import create_app
from gluscope.server.errors import ParameterError
from gluscope.server.readers import Readers


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
