"""Session fixtures: a tiny real model, a real corpus and a database made by the real recorder.

Nothing is mocked and nothing is downloaded: the model is a random Llama
saved locally with its own BPE tokenizer, loaded by TransformerLens through
the same path a hub name takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from gluscope.cli import main as gluscope_main
from gluscope.schema import HOOKS, QUADRANT_SLUGS

PLANTED_SCRIPT = "<script>alert(1)</script>"

# schema.sql's count lists as rows of (bin, count), the way its comment reads them; zeros between counts kept.
HISTOGRAM_CELLS = ("(SELECT layer, neuron, quadrant, hook, first_bin + generate_subscripts(counts, 1) - 1 AS bin, "
                   "unnest(counts) AS count FROM histograms)")
DENSITY_CELLS = ("(SELECT layer, neuron, gate_bin, first_in_bin + generate_subscripts(counts, 1) - 1 AS in_bin, "
                 "unnest(counts) AS count FROM density)")

PROSE = [
    "The quick brown fox jumps over the lazy dog, and then it jumps over the dog again.",
    "Once again the committee met on Monday; once again nothing was decided.",
    "Rivers carry sediment to the sea, where it settles into layers of sand and clay.",
    "She opened the door, looked outside, and closed it again without a word.",
    "In 1969 the first humans walked on the Moon, an event watched by millions.",
    "Prices rose sharply in March, then fell back in April as supply recovered.",
]
CODE = [
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "import os\n\nfor name in os.listdir('.'):\n    print(name)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "while True:\n\tline = input()\n\tif not line:\n\t\tbreak\n",
]
SPECIAL = [
    f"Malicious markup {PLANTED_SCRIPT} must show as text, never run.",
    "Tabs\tand  double  spaces\nand newlines\n\nare whitespace worth seeing.",
    "Unicode: naïve café, 東京, emoji 🙂 and ümlauts.",
]


def require_kernel() -> None:
    """Skip, saying why, where the CPU kernel cannot be built (`make test` installs g++ where it can)."""
    from gluscope.recorder.reduce_cpu import KernelUnavailable, load_kernel
    try:
        load_kernel()
    except (KernelUnavailable, OSError) as e:
        pytest.skip(f"the CPU kernel cannot be built here: {e}")


def corpus_texts() -> list[str]:
    """Document-sized texts: each base text repeated with variations, so the corpus has ~40 texts."""
    texts = []
    for i, base in enumerate(PROSE + CODE + SPECIAL):
        texts.append(base)
        texts.append(f"{base} {base.lower()} (variant {i})")
        texts.append(base.replace(" ", "  ") + f"\n# note {i}\n" + base)
    return texts


def tokenizer_training_texts() -> list[str]:
    return corpus_texts() * 4


def corpus_source(i: int) -> str:
    """Where corpus text i "came from": what a page shows beside its examples (`record --source-column`)."""
    return f"corpus/text-{i:03d}.txt"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with path.open("w") as f:
        for i, text in enumerate(corpus_texts()):
            f.write(json.dumps({"text": text, "id": i, "source": corpus_source(i)}) + "\n")
    return path


def make_model(tmp_path_factory, arch: str) -> Path:
    from gluscope.recorder.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp(f"model-{arch}"), arch, tokenizer_training_texts(),
                           init_std=0.15, extra_tokens=("<script>", "</script>"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def recorded_db(tmp_path_factory, tiny_llama, corpus_file) -> Path:
    """A database recorded by `gluscope record` from the tiny Llama over the test corpus."""
    out = tmp_path_factory.mktemp("db") / "tiny-llama.duckdb"
    code = gluscope_main(["record", "--model", str(tiny_llama), "--dataset", str(corpus_file), "--out", str(out),
                          "--source-column", "source",
                          "--max-length", "48", "--batch-size", "4", "--device", "cpu", "--compile", "off"])
    assert code == 0 and out.exists()
    return out


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
    import socket
    import threading
    import time

    import uvicorn

    from gluscope.server.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app([recorded_db]), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
