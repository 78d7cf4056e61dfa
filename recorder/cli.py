"""`gluscope dataset` and `gluscope record`: argument handling around corpus.py and record.py."""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gluscope.errors import UserError


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from gluscope.recorder.gguf import convert, is_gguf

    path = Path(name).expanduser()
    if is_gguf(name):
        path = convert(path)  # the tokenizer is read from the converted folder, as `record` will
    elif name.startswith((".", "/", "~")) and not path.is_dir():
        raise UserError(f"--tokenizer {name}: no such folder")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load the tokenizer of {name} ({first})") from None


def _corpus_from_source(source: str, tokenizer, args: argparse.Namespace):
    from gluscope.recorder.corpus import load_text_dataset, tokenize

    ds = load_text_dataset(source, args.text_column, args.split)
    corpus = tokenize(ds, tokenizer, text_column=args.text_column, max_length=args.max_length,
                      max_tokens=args.max_tokens, seed=args.seed, source_column=args.source_column)
    corpus.info["source"] = source
    return corpus


def run_dataset(args: argparse.Namespace) -> None:
    from gluscope.recorder.corpus import save_corpus

    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} already exists; pass --overwrite to replace it")
    corpus = _corpus_from_source(args.source, _tokenizer(args.tokenizer), args)
    corpus.info["tokenizer"] = args.tokenizer
    save_corpus(corpus, args.out, overwrite=args.overwrite)
    print(f"wrote {corpus.n_texts} texts, {int(corpus.lengths.sum())} tokens (BOS included) to {args.out}")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` for the whole run, so that a second run writing it is refused.

    The lock file lives in GLUScope's cache, named by a hash of `out`'s absolute
    path, so nothing is left beside the output; it is not deleted afterwards,
    since deleting a lock file another process has open would let two runs
    hold two locks.
    """
    import hashlib

    from gluscope.cache import cache_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:24]
    with (cache_dir("locks") / f"{key}.lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--out {out}: another `gluscope record` is writing this file") from None
        yield


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: give I/N, e.g. 0/4 for the first of four shards") from None
    if not 0 <= index < count:
        raise UserError(f"--shard {text}: I must be between 0 and N-1")
    return index, count


def run_record(args: argparse.Namespace) -> None:
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give a .duckdb file path")
    shard = parse_shard(args.shard)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if shard is not None:
            raise UserError("--shard and torchrun do not mix: under torchrun every rank records its own shard")
        if args.resume or args.checkpoint_every:
            raise UserError("--resume and --checkpoint-every do not work under torchrun yet; record shards with "
                            "--shard I/N to resume each alone")
        args.checkpoint_every = 0
        return _record_distributed(args)
    missing = _missing_folders(args.out.parent)
    try:
        with output_lock(args.out):
            _record(args, args.out, shard)
    except UserError:  # refused (no space, a bad option found late): leave no folder that this run made
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:  # not empty: something was written there after all
                break
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """The folders of `folder`'s path that do not exist yet, deepest first (output_lock creates them)."""
    missing = []
    folder = folder.absolute()
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _check_size(args: argparse.Namespace, out: Path, shape, corpus, shard: tuple[int, int] | None) -> None:
    """Print the database's expected size; refuse (UserError) when --out's folder cannot hold it (recorder/sizes.py)."""
    import numpy as np

    from gluscope.recorder import sizes

    lengths = corpus.lengths
    if shard is not None:  # about every N-th text (record.shard_batches takes every N-th batch)
        lengths = lengths[shard[0]::shard[1]]
    distinct = None
    if any(layer.experts for layer in shape.layers) and corpus.n_texts:  # expert_tokens: a row per (expert, token)
        distinct = int(np.count_nonzero(np.bincount(np.concatenate(corpus.token_ids).astype(np.int64))))
    sizes.check_disk(out, shape, lengths, k=args.k, window_before=args.window_before,
                     window_after=args.window_after, checkpoints=args.checkpoint_every != 0,
                     distinct_tokens=distinct, check=args.size_check)


def _record_distributed(args: argparse.Namespace) -> None:
    """One shard per torchrun rank on its own device; rank 0 merges them into --out once all are written.

    torch.distributed only synchronises the ranks (NCCL on GPUs, gloo on
    CPUs): each rank writes its shard beside --out, and the merge reads them.
    """
    import torch
    import torch.distributed as dist

    from gluscope.recorder.merge import merge

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    out: Path = args.out
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    on_gpu = torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda"))
    if on_gpu:
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    parts = [out.with_name(f".{out.name}.shard{i}-of-{world}.duckdb") for i in range(world)]
    try:
        with output_lock(parts[rank]):
            _record(args, parts[rank], (rank, world), overwrite=True)
        dist.barrier()
        if rank == 0:
            with output_lock(out):
                merge(parts, out, overwrite=args.overwrite)
            print(f"merged {world} shards into {out}")
        dist.barrier()
    finally:
        parts[rank].unlink(missing_ok=True)
        dist.destroy_process_group()


def run_merge(args: argparse.Namespace) -> None:
    from gluscope.recorder.merge import merge

    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give a .duckdb file path")
    with output_lock(args.out):
        merge(list(args.shards), args.out, overwrite=args.overwrite)
    print(f"merged {len(args.shards)} files into {args.out}")


def _record(args: argparse.Namespace, out: Path, shard: tuple[int, int] | None, overwrite: bool | None = None) -> None:
    from gluscope.recorder.checkpoint import checkpoint_path, remove_stale_temporaries
    from gluscope.recorder.model_source import check_model_source

    overwrite = args.overwrite if overwrite is None else overwrite
    saved = checkpoint_path(out)
    if out.exists() and not overwrite:
        if args.resume and saved.exists():  # killed between the database's rename and the checkpoint's removal
            raise UserError(f"{out} already exists, so the run of {saved} finished; delete the checkpoint, "
                            f"or pass --overwrite to write {out} again from it")
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise UserError("--checkpoint-every must not be negative (0 turns checkpoints off)")
    if args.resume and not saved.exists():
        raise UserError(f"--resume: there is no checkpoint {saved} (a run writes one with --checkpoint-every)")
    if saved.exists() and not args.resume:
        if not overwrite:
            raise UserError(f"{saved} holds an interrupted run: pass --resume to continue it, "
                            f"or --overwrite to start over")
        saved.unlink()
    remove_stale_temporaries(out)
    for name, value in (("--batch-size", args.batch_size), ("--k", args.k)):
        if value < 1:
            raise UserError(f"{name} must be at least 1")
    if args.k > 128:  # ranks are TINYINT (schema.sql)
        raise UserError("--k must be at most 128")
    if args.window_before < 0 or args.window_after < 0:
        raise UserError("--window-before and --window-after must not be negative")
    if args.calibration_batches < 0:
        raise UserError("--calibration-batches must not be negative")
    if not 0 <= args.sample_seed < 2 ** 32:
        raise UserError("--sample-seed must be in 0 .. 2^32 - 1")
    if args.name is not None and not args.name.strip():
        raise UserError("--name must not be empty")
    from gluscope.recorder.parts import Selection, parse_range
    selection = Selection(parse_range("--layers", args.layers), parse_range("--experts", args.experts))
    # The model's and the dataset's paths are checked before the (slow) imports and model load.
    check_model_source(args.model)
    dataset = args.dataset
    if dataset.startswith((".", "/", "~")) and not Path(dataset).expanduser().exists():
        raise UserError(f"--dataset {dataset}: no such file or folder")

    from gluscope.recorder import sizes
    from gluscope.recorder.corpus import is_corpus_folder, load_corpus
    from gluscope.recorder.model_source import model_folder

    # The size check needs the model's shape and the corpus: a model folder's config.json and a corpus folder are
    # read before the model is loaded; a hub model, a GGUF file or texts to tokenize are checked once loaded.
    folder = model_folder(args.model)
    shape = sizes.shape_from_folder(folder) if folder is not None else None
    corpus = load_corpus(dataset) if is_corpus_folder(dataset) else None
    if shape is not None and corpus is not None:
        _check_size(args, out, shape, corpus, shard)

    # Imported after the checks above, which then answer in a second instead of after torch's import.
    import duckdb

    from gluscope.recorder.corpus import tokenizer_fingerprint
    from gluscope.recorder.model import load_model
    from gluscope.recorder.record import record

    from gluscope.recorder.parts import check_selection

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                       display_name=args.name)
    check_selection(selection, model.n_layers,
                    [layout.n_experts for layout in model.layouts] if model.layouts else [0] * model.n_layers,
                    args.model)
    if corpus is not None:
        want = corpus.info.get("tokenizer_fingerprint")
        if want and want != tokenizer_fingerprint(model.tokenizer):
            raise UserError(f"{dataset} was tokenized with another tokenizer ({corpus.info.get('tokenizer')}); "
                            f"run `gluscope dataset` again with --tokenizer {args.model}")
        if shape is None:
            _check_size(args, out, sizes.shape_from_model(model), corpus, shard)
    else:
        corpus = _corpus_from_source(dataset, model.tokenizer, args)
        _check_size(args, out, shape or sizes.shape_from_model(model), corpus, shard)
    try:
        record(model, corpus, out, dataset=str(corpus.info.get("source", dataset)), batch_size=args.batch_size,
               k=args.k, window_before=args.window_before, window_after=args.window_after,
               refactor_glu=args.refactor_glu, compile=args.compile, reducer=args.reducer,
               overwrite=overwrite, shard=shard, checkpoint_every=args.checkpoint_every, resume=args.resume,
               sample_seed=args.sample_seed, calibration_batches=args.calibration_batches, selection=selection)
    except KeyboardInterrupt:
        if saved.exists():
            raise KeyboardInterrupt(f"{saved} is kept: run the same command with --resume to continue") from None
        raise
    except (OSError, duckdb.Error) as e:  # a full disk, a file-size limit: the writer has removed its file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot write {out} ({first[:200]}); nothing was left behind") from None
    print(f"wrote {out}" + (f" (shard {shard[0]}/{shard[1]})" if shard else "")
          + ("" if selection.whole else f" ({selection.describe()}: a part, for gluscope merge)"))
