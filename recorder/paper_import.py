"""`gluscope import-gluscope`: a dataset in the layout of the paper's Hugging Face dataset, as a GLUScope database.

The layout (gluscope/paper_layout.py writes it; docs/paper-layout.md says
what each column means) has per neuron and quadrant the frequency, each
value's mean and its top texts with their values, and a second dataset of
the texts those lists index. It has no positions, no windows and no
distributions, so the database holds the examples at text level, each
value's extreme in its quadrant (the first entry of its list) and NULL for
the rest. With a model (`--model`), the texts the lists name are run through
it with the recorder's own loading and hooks, and each example's position is
the original's: the most extreme token of the value in its quadrant, kept
where the replay gives the stored value there.

Without a model this reads Parquet and writes DuckDB only: torch is imported
by `locate` alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import gluscope
from gluscope.errors import UserError
from gluscope.paper_layout import PAPER_VALUES, has_top_list
from gluscope.recorder.writer import DatabaseWriter
from gluscope.schema import COUNT_COLUMNS, GEOMETRY, HOOKS, QUADRANT_SIGNS, QUADRANTS, SCHEMA_VERSION

LAYOUT = "gluscope-hf"
# A count is rounded back from its float32 frequency only while the error of float32 (half a unit in the last
# place, 2^-24 of the value) stays below half a token for every count up to the denominator.
EXACT_COUNT_TOKENS = 2 ** 23
# The replay's value must agree with the stored one to this share: it runs the texts one at a time, the
# recording in padded batches, and a GPU's kernels differ from a CPU's in the last bits.
LOCATE_RTOL = 1e-2
LOCATE_ATOL = 1e-6
WINDOW_BEFORE, WINDOW_AFTER = 24, 2  # the recorder's defaults (gluscope record --window-before/--window-after)
# Our export's dataset card says which weights its values are for (paper_layout.dataset_card).
CARD_REFACTOR = re.compile(r"metadata\.refactor_glu = (true|false)")


@dataclass
class Layout:
    """Where the two datasets are and what the texts say about the counting."""

    neuron_files: list[Path]
    text_files: list[Path]
    ours: bool                 # our export (texts carry text_id): the BOS is not counted
    refactor_glu: bool | None  # from our export's card; None: the layout does not say


def parquet_files(folder: Path, what: str) -> list[Path]:
    """The Parquet files of a dataset folder: data/*.parquet (the Hub's layout, our export's) or *.parquet."""
    if not folder.is_dir():
        raise UserError(f"{what} {folder} is not a folder")
    for inner in (folder / "data", folder):
        files = sorted(inner.glob("*.parquet"))
        if files:
            return files
    raise UserError(f"{what} {folder} holds no Parquet files (neither *.parquet nor data/*.parquet)")


def neuron_columns() -> list[str]:
    """The layout's 50 columns after layer and neuron, with paper_layout's names."""
    columns = []
    for quadrant in QUADRANTS:
        columns.append(f"{quadrant}_freq")
        for hook in HOOKS:
            name = f"{quadrant}_{PAPER_VALUES[hook]}"
            if has_top_list(quadrant, hook):
                columns += [f"{name}_max_values", f"{name}_max_indices"]
            columns.append(f"{name}_mean")
    return columns


def _columns_of(con: duckdb.DuckDBPyConnection, files: list[Path]) -> set[str]:
    try:
        return {row[0] for row in con.execute("DESCRIBE SELECT * FROM read_parquet($f)",
                                              {"f": [str(f) for f in files]}).fetchall()}
    except duckdb.Error as e:
        raise UserError(f"cannot read {files[0].parent} as Parquet ({str(e).splitlines()[0]})") from None


def _require(have: set[str], needed: list[str], where: Path) -> None:
    missing = [c for c in needed if c not in have]
    if missing:
        raise UserError(f"{where} lacks the paper layout's column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")


def find_layout(con: duckdb.DuckDBPyConnection, hf_dir: Path, texts_dir: Path) -> Layout:
    """Check both folders and their columns (UserError, one line, for what is missing)."""
    neuron_files, text_files = parquet_files(hf_dir, "HF_DIR"), parquet_files(texts_dir, "--texts")
    have = _columns_of(con, neuron_files)
    _require(have, ["layer", "neuron", *neuron_columns()], hf_dir)
    if "expert" in have:
        raise UserError(f"{hf_dir} is the export of a mixture-of-experts file; only dense models are imported")
    text_columns = _columns_of(con, text_files)
    _require(text_columns, ["input_ids"], texts_dir)
    card = hf_dir / "README.md"
    found = CARD_REFACTOR.search(card.read_text(encoding="utf-8", errors="replace")) if card.is_file() else None
    return Layout(neuron_files, text_files, ours="text_id" in text_columns,
                  refactor_glu=None if found is None else found.group(1) == "true")


@dataclass
class Texts:
    """The texts dataset, row i being text i."""

    token_ids: list[np.ndarray]  # int32, BOS first
    text: list[str | None]
    source_index: np.ndarray     # int64: our export's, else the row itself
    source: list[str | None]


def read_texts(con: duckdb.DuckDBPyConnection, layout: Layout) -> Texts:
    columns = _columns_of(con, layout.text_files)
    pick = ["input_ids"] + [c for c in ("text", "source_index", "source") if c in columns]
    rows = con.execute(f"SELECT {', '.join(pick)} FROM read_parquet($f, filename = true, file_row_number = true) "
                       "ORDER BY filename, file_row_number", {"f": [str(f) for f in layout.text_files]}).fetchnumpy()
    n = len(rows["input_ids"])
    token_ids = [np.asarray(ids, np.int32) for ids in rows["input_ids"]]
    if any(len(ids) == 0 for ids in token_ids):
        raise UserError(f"--texts {layout.text_files[0].parent}: a text has no input_ids")
    source = rows.get("source")
    return Texts(token_ids=token_ids,
                 text=list(rows["text"]) if "text" in rows else [None] * n,
                 source_index=np.asarray(rows["source_index"], np.int64) if "source_index" in rows
                 else np.arange(n, dtype=np.int64),
                 source=[None if s is None or s is np.ma.masked else str(s) for s in source] if source is not None
                 else [None] * n)


@dataclass
class Neurons:
    """The neurons dataset as arrays, by layer then neuron; quadrant and hook axes in schema code order."""

    layer: np.ndarray       # [n] int64
    neuron: np.ndarray      # [n] int64
    frequency: np.ndarray   # [n, 4] float32
    mean: np.ndarray        # [n, 4, 4] float32, NaN where the quadrant had no token
    values: np.ndarray      # [n, 4, 4, k] float32, NaN where the original keeps no list
    indices: np.ndarray     # [n, 4, 4, k] int64, -1 where it keeps none


def _fixed_lists(column, k: int | None, where: Path, name: str) -> np.ndarray:
    """A column of equally long lists as [rows, k]."""
    lengths = np.asarray(column.value_lengths().fill_null(0))
    if len(lengths) and ((lengths != lengths[0]).any() or (k is not None and lengths[0] != k)):
        raise UserError(f"{where}: the lists of {name} differ in length")
    return np.asarray(column.flatten()).reshape(len(lengths), -1)


def read_neurons(layout: Layout, hf_dir: Path) -> Neurons:
    table = pa.concat_tables([pq.read_table(f, columns=["layer", "neuron", *neuron_columns()])
                              for f in layout.neuron_files]).sort_by([("layer", "ascending"), ("neuron", "ascending")])
    n = table.num_rows
    column = {name: table.column(name).combine_chunks() for name in table.column_names}
    k = len(column[f"{QUADRANTS[-1]}_hook_post_max_values"][0]) if n else 0
    out = Neurons(layer=np.asarray(column["layer"], np.int64), neuron=np.asarray(column["neuron"], np.int64),
                  frequency=np.zeros((n, 4), np.float32), mean=np.full((n, 4, 4), np.nan, np.float32),
                  values=np.full((n, 4, 4, k), np.nan, np.float32), indices=np.full((n, 4, 4, k), -1, np.int64))
    for q, quadrant in enumerate(QUADRANTS):
        out.frequency[:, q] = np.asarray(column[f"{quadrant}_freq"].fill_null(np.nan), np.float32)
        for h, hook in enumerate(HOOKS):
            name = f"{quadrant}_{PAPER_VALUES[hook]}"
            out.mean[:, q, h] = np.asarray(column[f"{name}_mean"].fill_null(np.nan), np.float32)
            if has_top_list(quadrant, hook):
                out.values[:, q, h] = _fixed_lists(column[f"{name}_max_values"], k, hf_dir, name)
                out.indices[:, q, h] = _fixed_lists(column[f"{name}_max_indices"], k, hf_dir, name)
    return out


def check_neurons(neurons: Neurons, n_texts: int, hf_dir: Path) -> None:
    """Every neuron once, each layer numbered from 0, and every index a row of the texts."""
    key = neurons.layer * (int(neurons.neuron.max(initial=0)) + 1) + neurons.neuron
    if len(key) == 0:
        raise UserError(f"{hf_dir} holds no neurons")
    if (neurons.layer < 0).any() or (neurons.neuron < 0).any() or (np.diff(key) == 0).any():
        raise UserError(f"{hf_dir}: layer and neuron must be non-negative and name each neuron once")
    listed = neurons.indices[neurons.values == neurons.values]  # lists the original keeps
    bad = listed[(listed < 0) | (listed >= n_texts)]
    if len(bad):
        raise UserError(f"{hf_dir}: index {int(bad[0])} points outside the {n_texts:,} texts of --texts")


@dataclass
class Examples:
    """The top lists' real entries (the layout's zeros are filler), one row per entry, by neuron then list."""

    row: np.ndarray       # [E] the neuron's row in Neurons
    quadrant: np.ndarray  # [E]
    hook: np.ndarray      # [E]
    rank: np.ndarray      # [E] within its list, from 0
    value: np.ndarray     # [E] float32
    text_id: np.ndarray   # [E]
    position: np.ndarray  # [E] int64, -1 until located


def list_entries(neurons: Neurons) -> Examples:
    """The entries worth showing: the original's page generator skips value 0 (c_neuron_vis._vis_examples),
    which pads a list where fewer than k texts had a token in the quadrant."""
    real = (neurons.values == neurons.values) & (neurons.values != 0)
    rank = np.cumsum(real, axis=-1) - 1
    row, q, h, slot = np.nonzero(real)
    return Examples(row=row, quadrant=q, hook=h, rank=rank[row, q, h, slot], value=neurons.values[row, q, h, slot],
                    text_id=neurons.indices[row, q, h, slot], position=np.full(len(row), -1, np.int64))


def value_extremes(examples: Examples, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) [n, 4, 4] of each value in its quadrant, as far as the lists tell: a list's first entry is
    the most extreme, so it is the max of a positive value and the min of a negative one; the other is NaN."""
    lo, hi = np.full((n, 4, 4), np.nan, np.float32), np.full((n, 4, 4), np.nan, np.float32)
    first = examples.rank == 0
    at = (examples.row[first], examples.quadrant[first], examples.hook[first])
    v = examples.value[first]
    hi[at] = np.where(v > 0, v, np.nan)
    lo[at] = np.where(v < 0, v, np.nan)
    return lo, hi


def counts_from(frequency: np.ndarray, n_tokens: int) -> np.ndarray | None:
    """[n, 4] counts where the frequencies give them exactly (EXACT_COUNT_TOKENS), else None."""
    if n_tokens > EXACT_COUNT_TOKENS or not np.isfinite(frequency).all():
        return None
    return np.rint(frequency.astype(np.float64) * n_tokens).astype(np.int64)


@dataclass
class Located:
    """What a model replay adds: weights, vocabulary and the examples' positions and windows."""

    model: Any                          # recorder.model.GatedModel
    flipped: np.ndarray                 # [n] bool, by Neurons row
    geometry: dict[str, np.ndarray]     # GEOMETRY: [n] each
    vocab: tuple[list[str], list[bytes]]
    windows: dict[str, list]            # the windows table's columns
    weights_fingerprint: str
    tokenizer_fingerprint: str


def locate(model_path: str, neurons: Neurons, examples: Examples, texts: Texts, refactor_glu: bool,
           bos_counted: bool) -> Located:
    """Replay the texts the lists name through the model (the recorder's loading and hooks) and give each
    example the position of its value's most extreme token in its quadrant, where the replay reproduces the
    stored value there (LOCATE_RTOL); examples.position is set in place, -1 where not located."""
    from gluscope.recorder import replay  # torch: only with --model

    return replay.locate(model_path, neurons, examples, texts, refactor_glu, bos_counted)


def _metadata(layout: Layout, hf_dir: Path, texts_dir: Path, neurons: Neurons, texts: Texts, n_tokens: int,
              refactor_glu: bool, located: Located | None, n_located: int) -> dict[str, Any]:
    from gluscope.recorder.corpus import Corpus

    lengths = [len(t) for t in texts.token_ids]
    model = located.model if located else None
    convention = ("refactor_glu: w_in and w_out of each neuron multiplied by sign(w_gate . w_in), so "
                  "cos(w_gate, w_in) >= 0" if refactor_glu else "raw weights as published")
    if layout.refactor_glu is None:
        convention += " (assumed, as in the paper's dataset: the layout does not say)"
    return {
        "schema_version": SCHEMA_VERSION, "tool_version": gluscope.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
        "model_name": model.name if model else hf_dir.absolute().name,
        "model_source": model.source if model else str(hf_dir),
        "model_revision": None, "weights_file": None, "weights_sha256": None, "quantization": None,
        "architecture": model.architecture if model else "unknown (imported without --model)",
        # The layout calls the activation `swish` (the original's name whatever the model computes).
        "act_fn": model.act_fn_name if model else PAPER_VALUES["act"],
        "n_layers": int(neurons.layer.max()) + 1, "d_model": model.d_model if model else None,
        "d_mlp": int(neurons.neuron.max()) + 1, "vocab_size": len(located.vocab[0]) if located else 0,
        "dtype": "float32",  # the layout's values are float32
        "dataset": str(texts_dir), "text_column": "text" if any(t is not None for t in texts.text) else None,
        "max_length": max(lengths), "bos_token_id": int(texts.token_ids[0][0]),
        "n_texts": len(lengths), "n_tokens": n_tokens, "batch_size": 1 if located else 0,
        "corpus_fingerprint": Corpus(texts.source_index, texts.token_ids).fingerprint(),
        "weights_fingerprint": located.weights_fingerprint if located else "",
        "tokenizer_fingerprint": located.tokenizer_fingerprint if located else "",
        "shard_index": None, "shard_count": None, "layer_first": None, "layer_last": None,
        "expert_first": None, "expert_last": None,
        "k": neurons.values.shape[-1], "window_before": WINDOW_BEFORE if located else 0,
        "window_after": WINDOW_AFTER if located else 0,
        "refactor_glu": refactor_glu, "weight_convention": convention,
        "sample_seed": 0, "n_random": 0, "n_per_interval": 0, "calibration_batches": 0,
        "imported_from": f"{LAYOUT}: {hf_dir} (texts: {texts_dir})",
        "bos_counted": not layout.ours,
        "located_with": model.source if model else None,
        "examples_located": n_located if located else None,
    }


def write_database(writer: DatabaseWriter, meta: dict[str, Any], neurons: Neurons, examples: Examples,
                   texts: Texts, located: Located | None) -> None:
    """Every table the layout (and the replay) fills; the others stay empty."""
    n = len(neurons.layer)
    layer, neuron = neurons.layer.astype(np.int16), neurons.neuron.astype(np.int32)
    writer.write_metadata(meta)
    writer.write_texts(texts.source_index, texts.token_ids, sources=texts.source, texts=texts.text)
    if located:  # the bins' rules need torch, which only the replay has loaded; without bins no page draws one
        writer.write_vocab(*located.vocab)
        writer.write_histogram_bins()
    widths = np.bincount(neurons.layer, minlength=meta["n_layers"])
    writer.write_layers([(i, int(w), 0, 0, None, None) for i, w in enumerate(widths)])
    counts = counts_from(neurons.frequency, int(meta["n_tokens"]))
    writer.write_rows("neurons", {
        "layer": layer, "neuron": neuron,
        **{c: counts[:, q] if counts is not None else pa_nulls(n, "int64") for q, c in enumerate(COUNT_COLUMNS)},
        "flipped": located.flipped if located else pa_nulls(n, "bool_"),
        **{g: located.geometry[g] if located else pa_nulls(n, "float32") for g in GEOMETRY}})
    writer.write_rows("imported_frequencies", {
        "layer": np.repeat(layer, 4), "neuron": np.repeat(neuron, 4),
        "quadrant": np.tile(np.arange(4, dtype=np.int8), n), "frequency": neurons.frequency.reshape(-1)})
    lo, hi = value_extremes(examples, n)
    mean = neurons.mean.reshape(-1).astype(np.float64)
    writer.write_rows("value_stats", {
        "layer": np.repeat(layer, 16), "neuron": np.repeat(neuron, 16),
        "quadrant": np.tile(np.repeat(np.arange(4, dtype=np.int8), 4), n),
        "hook": np.tile(np.tile(np.arange(4, dtype=np.int8), 4), n),
        "min": nullable(lo.reshape(-1)), "max": nullable(hi.reshape(-1)), "mean": nullable(mean)})
    e = examples
    writer.write_rows("examples", {
        "layer": layer[e.row], "neuron": neuron[e.row], "quadrant": e.quadrant.astype(np.int8),
        "hook": e.hook.astype(np.int8), "rank": e.rank.astype(np.int8), "value": e.value,
        "text_id": e.text_id.astype(np.int32), "position": nullable(e.position.astype(np.int16), e.position < 0)})
    if located:
        writer.write_rows("windows", located.windows)
    writer.write_example_tokens()


def pa_nulls(n: int, dtype: str):
    """A column of n NULLs of an Arrow type."""
    return pa.nulls(n, getattr(pa, dtype)())


def nullable(values: np.ndarray, missing: np.ndarray | None = None):
    """An Arrow column, NULL where `missing` (default: where NaN)."""
    return pa.array(values, mask=np.isnan(values) if missing is None else missing)


def import_gluscope(hf_dir: Path, texts_dir: Path, out: Path, model: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write the dataset in HF_DIR (and its texts in TEXTS_DIR) as the database `out`; return its path.

    Raises UserError (one line) for missing folders, folders without Parquet files or the layout's columns,
    indices outside the texts, an existing `out` without `overwrite`, and a model that cannot be loaded or
    does not fit; nothing is left at `out` then.
    """
    hf_dir, texts_dir, out = Path(hf_dir), Path(texts_dir), Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    con = duckdb.connect()
    try:
        layout = find_layout(con, hf_dir, texts_dir)
        texts = read_texts(con, layout)
        neurons = read_neurons(layout, hf_dir)
    finally:
        con.close()
    check_neurons(neurons, len(texts.token_ids), hf_dir)
    # The original counts every token, BOS included; our export counts none of the BOS positions.
    n_tokens = sum(len(t) for t in texts.token_ids) - (len(texts.token_ids) if layout.ours else 0)
    refactor_glu = True if layout.refactor_glu is None else layout.refactor_glu
    examples = list_entries(neurons)
    located = locate(model, neurons, examples, texts, refactor_glu, not layout.ours) if model else None
    n_located = int((examples.position >= 0).sum())
    meta = _metadata(layout, hf_dir, texts_dir, neurons, texts, n_tokens, refactor_glu, located, n_located)
    with DatabaseWriter(out, overwrite=True) as writer:
        write_database(writer, meta, neurons, examples, texts, located)
    return out


def run_import(args: argparse.Namespace) -> None:
    """`gluscope import-gluscope HF_DIR --texts TEXTS_DIR --out FILE [--model MODEL] [--overwrite]`."""
    out = import_gluscope(args.hf_dir, args.texts, args.out, args.model, args.overwrite)
    print(f"wrote {out}")
