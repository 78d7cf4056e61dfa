"""`gluscope probe`: load the model of each database once and answer the web server's probe requests."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gluscope.errors import UserError


def database_files(paths: list[Path]) -> list[Path]:
    """The .duckdb files named, and those in the folders named."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.duckdb"))
            if not found:
                raise UserError(f"{p} holds no .duckdb file")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist (record one with `gluscope record`)")
    return files


def run_probe(args: argparse.Namespace) -> None:
    from gluscope.server.db import check_database_file, open_databases

    files = database_files(args.files)
    for f in files:
        check_database_file(f)
    for name, value, least in (("--max-tokens", args.max_tokens, 1), ("--max-neurons", args.max_neurons, 1),
                               ("--queue", args.queue, 1), ("--batch-tokens", args.batch_tokens, 1)):
        if value < least:
            raise UserError(f"{name} must be at least {least}")
    if not args.timeout > 0:
        raise UserError("--timeout must be above 0 seconds")
    if args.model_dir is not None and not args.model_dir.is_dir():
        raise UserError(f"--model-dir {args.model_dir} is not a folder")

    import uvicorn

    from gluscope.probe.answers import Limits
    from gluscope.probe.app import create_probe_app
    from gluscope.probe.batcher import Batcher
    from gluscope.probe.loaded import load_for

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    registry = open_databases(files)
    shared: dict = {}
    models = {}
    for model_id, db in registry.items():
        print(f"gluscope probe: loading the model of {db.path.name} ({db.meta['model_name']}) ...", file=sys.stderr,
              flush=True)
        models[model_id] = load_for(db, args.device, args.model_dir, shared)
    batcher = Batcher(queue_size=args.queue, timeout_s=args.timeout, batch_tokens=args.batch_tokens)
    app = create_probe_app(models, Limits(args.max_tokens, args.max_neurons), batcher)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
