"""`gluscope demo` (what `make demo` runs): record the bundled demo model on held-out stdlib code, then serve it.

The demo model (demo/model) is a small SwiGLU Llama trained by
demo/train_demo_model.py on Python's standard-library sources; it records on
the held-out files, so nothing is downloaded. A second run reuses the database.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gluscope.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "demo" / "model"
DEMO_NAME = "gluscope-demo-llama"
DEMO_TOKENS = 150_000
DEMO_MAX_LENGTH = 256


def _record_demo(out: Path) -> None:
    from gluscope.recorder.corpus import load_text_dataset, tokenize
    from gluscope.recorder.model import load_model
    from gluscope.recorder.record import record

    sys.path.insert(0, str(REPO))
    from demo.corpus import write_demo_corpus

    corpus_file = write_demo_corpus(REPO / "demo" / "out" / "heldout.jsonl")
    model = load_model(str(DEMO_MODEL), device="cpu", dtype="float32")
    model.name = DEMO_NAME  # the model id and page titles derive from it
    ds = load_text_dataset(str(corpus_file), "text")
    corpus = tokenize(ds, model.tokenizer, text_column="text", max_length=DEMO_MAX_LENGTH,
                      max_tokens=DEMO_TOKENS, seed=0)
    record(model, corpus, out, dataset="Python standard library, held-out files (demo/corpus.py)",
           batch_size=8, overwrite=True)


def interesting_neuron(path: Path) -> tuple[int, int]:
    """A neuron whose behaviour differs by quadrant: both gate+_in+ and gate-_in- are common,
    in a middle layer, and its strongest gate-_in- output is large."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        n_layers, n_tokens = con.execute("SELECT n_layers, n_tokens FROM metadata").fetchone()
        row = con.execute(
            """
            SELECT n.layer, n.neuron
            FROM neurons n JOIN value_stats s
              ON s.layer = n.layer AND s.neuron = n.neuron AND s.quadrant = 3 AND s.hook = 0
            WHERE n.layer = ?
            ORDER BY least(n.count_pp, n.count_nn) * s.max DESC
            LIMIT 1
            """,
            [n_layers // 2],
        ).fetchone()
    finally:
        con.close()
    return int(row[0]), int(row[1])


def run_demo(args: argparse.Namespace) -> None:
    if not (DEMO_MODEL / "config.json").exists():
        raise UserError(f"the demo model is missing ({DEMO_MODEL}); run `make demo` from a checkout of the repository")
    out: Path = args.out
    stale = not out.exists() or out.stat().st_mtime < max(p.stat().st_mtime for p in DEMO_MODEL.iterdir())
    if stale:
        started = time.perf_counter()
        print(f"recording the demo model into {out} (about a minute on 2 CPU cores) ...", flush=True)
        _record_demo(out)
        print(f"recorded in {time.perf_counter() - started:.0f} s", flush=True)
    else:
        print(f"reusing {out} (delete it to record again)")
    layer, neuron = interesting_neuron(out)
    if args.no_serve:
        print(f"database: {out}; an interesting neuron: {layer}.{neuron}")
        return

    import uvicorn

    from gluscope.server.app import create_app
    from gluscope.server.readers import usable_cpus

    app = create_app([out], readers=usable_cpus())
    model_id = next(iter(app.state.registry))
    base = f"http://{args.host}:{args.port}"
    print(f"\nGLUScope demo: {base}/")
    print(f"an interesting neuron: {base}/models/{model_id}/neurons/{layer}/{neuron}\n", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
