"""The text corpus: load a text dataset, shuffle it, tokenize it with the model's tokenizer.

A corpus is stored as a folder holding `tokens.parquet` (source_index,
token_ids) and `gluscope-dataset.json` (how it was made), which `gluscope
record` reads back, so a long corpus is tokenized once and reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gluscope.errors import UserError

MANIFEST = "gluscope-dataset.json"
TOKENS = "tokens.parquet"
TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CHUNK_ROWS = 512


@dataclass
class Corpus:
    source_index: np.ndarray           # [n_texts] int64: row in the source dataset
    token_ids: list[np.ndarray]        # each int32, BOS first
    info: dict[str, Any] = field(default_factory=dict)
    sources: list[str | None] | None = None  # per text, from the dataset's source column (a path, say)

    @property
    def n_texts(self) -> int:
        return len(self.token_ids)

    def fingerprint(self) -> str:
        """Identifies the texts and their order, so that only shards of one corpus are merged."""
        digest = hashlib.sha256(np.ascontiguousarray(self.source_index, np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.lengths).tobytes())
        for ids in self.token_ids:
            digest.update(np.ascontiguousarray(ids, np.int32).tobytes())
        return digest.hexdigest()[:32]

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.token_ids), dtype=np.int64, count=len(self.token_ids))


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a vocabulary, so a corpus is never recorded with another model's tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha1(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def bos_token_id(tokenizer) -> int:
    """The id every text starts with: BOS, or EOS when the tokenizer has no BOS (as in the paper)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise UserError("the tokenizer has neither a BOS nor an EOS token to start texts with")


def _data_files(folder: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    kinds = {TEXT_SUFFIXES[p.suffix] for p in files}
    if not files:
        raise UserError(f"{folder} holds no .txt, .jsonl or .parquet files and is not a saved dataset")
    if len(kinds) > 1:
        raise UserError(f"{folder} mixes file types ({', '.join(sorted(kinds))}); keep one kind per folder")
    return kinds.pop(), [str(p) for p in files]


def load_text_dataset(source: str, text_column: str = "text", split: str = "train"):
    """A `datasets.Dataset` from a hub name, local files or folder, or a save_to_disk folder."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                              or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{source} has splits {', '.join(ds)}; choose one with --split")
                ds = ds[split]
        elif path.is_dir() or path.is_file():
            if path.is_dir():
                kind, files = _data_files(path)
            else:
                if path.suffix not in TEXT_SUFFIXES:
                    raise UserError(f"{source}: unknown file type {path.suffix!r} (use .txt, .jsonl or .parquet)")
                kind, files = TEXT_SUFFIXES[path.suffix], [str(path)]
            extra = {"sample_by": "document"} if kind == "text" else {}
            ds = datasets.load_dataset(kind, data_files=files, split="train", **extra)
        elif source.startswith((".", "/", "~")) or source.endswith(tuple(TEXT_SUFFIXES)):
            raise UserError(f"{source}: no such file or folder")
        else:
            ds = datasets.load_dataset(source, split=split)
    except UserError:
        raise
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load dataset {source}: {first}") from None
    if text_column not in ds.column_names:
        raise UserError(f"{source} has no column {text_column!r} (columns: {', '.join(ds.column_names)}); "
                        "choose one with --text-column")
    if len(ds) == 0:
        raise UserError(f"{source} is empty: there are no texts to record")
    return ds


def _token_chunks(ds, tokenizer, text_column: str, max_length: int, seed: int,
                  source_column: str | None = None) -> Iterator[tuple[int, list[int], str | None]]:
    """(source row, token ids without BOS (at most max_length-1), source) in shuffled order."""
    order = np.random.default_rng(seed).permutation(len(ds))
    # Tokenizing a whole long document to keep its first 1023 tokens is wasted
    # work: cut the text first, with a margin, and only fall back when short.
    char_cap = 16 * max_length + 64
    keep = max_length - 1
    for start in range(0, len(order), CHUNK_ROWS):
        rows = order[start:start + CHUNK_ROWS]
        chunk = ds.select(rows)
        texts = ["" if t is None else str(t) for t in chunk[text_column]]
        sources = chunk[source_column] if source_column else [None] * len(rows)
        heads = [t[:char_cap] for t in texts]
        encoded = tokenizer(heads, add_special_tokens=False)["input_ids"]
        for row, text, ids, source in zip(rows, texts, encoded, sources):
            if len(text) > char_cap and len(ids) < keep + 8:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            yield int(row), ids[:keep], None if source is None else str(source)


def tokenize(ds, tokenizer, *, text_column: str, max_length: int, max_tokens: int, seed: int,
             source_column: str | None = None) -> Corpus:
    """Shuffle with `seed`, put BOS first, truncate to max_length, stop once max_tokens are kept (BOS counted).

    `source_column` names a column that says where each text came from (a path, a URL); it is kept per text.
    """
    if not 2 <= max_length <= 32767:
        # The database stores positions as SMALLINT.
        raise UserError("--max-length must be between 2 (BOS plus one token) and 32767")
    if max_tokens < 2:
        raise UserError("--max-tokens must be at least 2")
    if source_column is not None and source_column not in ds.column_names:
        raise UserError(f"the dataset has no column {source_column!r} (columns: {', '.join(ds.column_names)}); "
                        "choose one with --source-column")
    bos = bos_token_id(tokenizer)
    sources: list[int] = []
    origins: list[str | None] = []
    token_ids: list[np.ndarray] = []
    total = 0
    for row, ids, origin in _token_chunks(ds, tokenizer, text_column, max_length, seed, source_column):
        if not ids:
            continue  # an empty text adds nothing but a BOS
        arr = np.empty(len(ids) + 1, dtype=np.int32)
        arr[0] = bos
        arr[1:] = ids
        sources.append(row)
        origins.append(origin)
        token_ids.append(arr)
        total += len(arr)
        if total >= max_tokens:
            break
    if not token_ids:
        raise UserError("every text is empty after tokenization: there is nothing to record")
    return Corpus(np.asarray(sources, dtype=np.int64), token_ids, {
        "bos_token_id": bos,
        "max_length": max_length,
        "max_tokens": max_tokens,
        "seed": seed,
        "text_column": text_column,
        "source_column": source_column,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "n_texts": len(token_ids),
        "n_tokens_with_bos": total,
    }, origins if source_column else None)


def save_corpus(corpus: Corpus, out: Path, overwrite: bool = False) -> Path:
    """Write the corpus folder atomically (built beside, renamed when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        offsets = np.zeros(corpus.n_texts + 1, dtype=np.int64)
        np.cumsum(corpus.lengths, out=offsets[1:])
        columns = {
            "source_index": pa.array(corpus.source_index),
            "token_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(corpus.token_ids))),
        }
        if corpus.sources is not None:
            columns["source"] = pa.array(corpus.sources, pa.string())
        table = pa.table(columns)
        pq.write_table(table, tmp / TOKENS)
        (tmp / MANIFEST).write_text(json.dumps(corpus.info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_corpus_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_corpus(folder: str | Path) -> Corpus:
    import pyarrow.parquet as pq

    folder = Path(folder)
    info = json.loads((folder / MANIFEST).read_text())
    table = pq.read_table(folder / TOKENS)
    col = table.column("token_ids").combine_chunks()
    flat = col.values.to_numpy().astype(np.int32)
    offsets = col.offsets.to_numpy()
    token_ids = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    sources = table.column("source").to_pylist() if "source" in table.column_names else None
    return Corpus(table.column("source_index").to_numpy().astype(np.int64), token_ids, info, sources)
