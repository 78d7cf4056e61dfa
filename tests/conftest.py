"""Session fixtures: a tiny real model, a real corpus and a database made by the real recorder.

Nothing is mocked and nothing is downloaded: the model is a random Llama
saved locally with its own BPE tokenizer, loaded by TransformerLens through
the same path a hub name takes. Every model, corpus and recording comes from
tests/recordings.py, built once per test run and shared by every test and
worker that asks for the same one.

The tiers (pyproject.toml's markers) are set per module with `pytestmark`:
`unit` needs no recording, `integration` runs the recorder or the app in
this process, `system` starts processes, engines or browsers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

import duckdb
import pytest

from gluscope.schema import HOOKS, QUADRANT_SLUGS

from . import recordings

TIERS = ("unit", "integration", "system")


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config, "cache", None) is not None:
        is_xdist_worker = hasattr(config, "workerinput")
        recordings.use_folder(config.cache.mkdir("gluscope-recordings"), prune=not is_xdist_worker)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to exactly one tier: a module without one is a mistake to catch at collection.

    Slow tests run first, then the system tier, then the rest: the xdist workers take tests in this order,
    so the long ones start while there is still short work to fill the other worker, and both finish
    together instead of one waiting for the other's last long test.
    """
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: marked {sorted(tiers) or 'with no tier'}; "
                                    f"mark it with exactly one of {', '.join(TIERS)}")
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 item.get_closest_marker("system") is None))


@pytest.fixture
def gluscope_here(capsys: pytest.CaptureFixture) -> Callable[..., subprocess.CompletedProcess]:
    """`gluscope ARGS` run in this process, its exit status and output as the shell would see them.

    For refusals, whose subject is the one-line message and what is left on disk: a process of their own would
    import torch and transformers again for each. Tests whose subject is the process (signals, locks, what a
    real run prints) start one (processes.run_cli).
    """
    from gluscope.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own refusals
            code = e.code if isinstance(e.code, int) else 2
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["gluscope", *args], code, out, err)

    return run


@pytest.fixture(scope="session")
def corpus_file() -> Path:
    return recordings.corpus("standard")


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return recordings.model("llama")


@pytest.fixture(scope="session")
def recorded_db(tiny_llama, corpus_file) -> Path:
    """A database recorded by `gluscope record` from the tiny Llama over the test corpus."""
    return recordings.record(tiny_llama, corpus_file, "--source-column", "source", "--max-length", "48",
                             "--batch-size", "4")


@pytest.fixture(scope="module")
def con(recorded_db):
    """A read-only connection to recorded_db, for the tables a test checks the server against (a module may
    define its own `con` over another file)."""
    c = duckdb.connect(str(recorded_db), read_only=True)
    yield c
    c.close()


@pytest.fixture(scope="session")
def planted_script_text_id(recorded_db) -> int:
    """text_id of the corpus text holding the planted `<script>` token."""
    con = duckdb.connect(str(recorded_db), read_only=True)
    try:
        (script_id,) = con.execute("SELECT token_id FROM vocab WHERE token = '<script>'").fetchone()
        row = con.execute("SELECT min(text_id) FROM texts WHERE list_contains(token_ids, ?)", [script_id]).fetchone()
    finally:
        con.close()
    assert row[0] is not None
    return int(row[0])


@pytest.fixture(scope="session")
def client(recorded_db):
    """The real app over the recorded database, through Starlette's HTTP test client."""
    from starlette.testclient import TestClient

    from gluscope.server.app import create_app

    with TestClient(create_app([recorded_db]), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="session")
def model_id(client) -> str:
    (model,) = client.get("/api/models").json()["models"]
    return model["id"]


@pytest.fixture(scope="session")
def script_list(recorded_db, planted_script_text_id) -> tuple[int, int, str, str]:
    """(layer, neuron, slug, hook) of the first example list whose window shows the planted <script> token."""
    con = duckdb.connect(str(recorded_db), read_only=True)
    try:
        row = con.execute("""
            WITH s AS (SELECT list_position(token_ids, (SELECT token_id FROM vocab WHERE token = '<script>')) - 1 AS pos
                       FROM texts WHERE text_id = $t)
            SELECT e.layer, e.neuron, e.quadrant, e.hook
            FROM examples e JOIN windows w USING (layer, neuron, text_id, position), s
            WHERE e.text_id = $t AND s.pos BETWEEN w.window_start AND w.window_start + len(w.x_gate) - 1
            ORDER BY e.layer, e.neuron, e.quadrant, e.hook LIMIT 1""", {"t": planted_script_text_id}).fetchone()
    finally:
        con.close()
    assert row is not None
    return row[0], row[1], QUADRANT_SLUGS[row[2]], HOOKS[row[3]]


@pytest.fixture(scope="session")
def live_server(recorded_db):
    """The real app over the recorded database, served by uvicorn on a free port in a thread: its base URL."""
    from gluscope.server.app import create_app

    from .processes import served_in_thread

    with served_in_thread(create_app([recorded_db])) as url:
        yield url


@pytest.fixture(scope="session")
def probe_url(recorded_db):
    """A probe holding recorded_db's model (the tiny Llama), served in a thread: its base URL."""
    from gluscope.probe.answers import Limits
    from gluscope.probe.app import create_probe_app
    from gluscope.probe.batcher import Batcher
    from gluscope.probe.loaded import load_for
    from gluscope.server.db import open_databases

    from .processes import served_in_thread

    models = {model_id: load_for(db, "cpu") for model_id, db in open_databases([recorded_db]).items()}
    with served_in_thread(create_probe_app(models, Limits(), Batcher())) as url:
        yield url


@pytest.fixture(scope="session")
def probe_client(recorded_db, probe_url):
    """The real app over recorded_db with that probe (gluscope serve --probe), through the HTTP test client."""
    from starlette.testclient import TestClient

    from gluscope.server.app import create_app

    with TestClient(create_app([recorded_db], probe=probe_url), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="session")
def live_probe_server(recorded_db, probe_url):
    """The app with the probe, served by uvicorn in a thread, for the browser: its base URL."""
    from gluscope.server.app import create_app

    from .processes import served_in_thread

    with served_in_thread(create_app([recorded_db], probe=probe_url)) as url:
        yield url
