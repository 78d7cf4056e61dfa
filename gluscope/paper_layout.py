"""`gluscope export --format gluscope-hf`: a recording in the layout of the paper's Hugging Face dataset.

The original tool (sjgerstner/gluscope) publishes one row per neuron: its
b_activations.py builds a dict of [layer, neuron] tensors and its
summary_dict_to_hf_dataset.py flattens them into columns. This writes the same
columns, with the same names, dtypes and shapes, from a GLUScope database, as
Parquet files that `datasets.load_dataset` reads, and beside them the texts
that the `*_max_indices` columns point into:

    OUT/README.md                           dataset card: the configs `default` (neurons) and `texts`
    OUT/data/train-00000-of-0000N.parquet   one row per neuron, by layer, then neuron
    OUT/texts/train-00000-of-0000M.parquet  one row per text: row i is text_id i

docs/paper-layout.md says what each column means and where our conventions
differ from the original's. Like the server, this only reads the file (opened
and checked by server/db.py) and never imports torch.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gluscope.errors import UserError
from gluscope.schema import HOOKS, QUADRANT_SLUGS, QUADRANTS
from gluscope.server.db import Database, open_database
from gluscope.server.data import whole_text
from gluscope.server.queries import NEURONS_WITH_EXPERTS, TEXT_STRINGS_BETWEEN, frequency, tokens_of, with_imported

FORMATS = ("gluscope-hf",)

# The original's name for each of our values: it calls act_fn(x_gate) `swish` whatever the activation
# (utils.VALUES_TO_SUMMARISE; b_activations computes it with the model's own act_fn).
PAPER_VALUES: dict[str, str] = {"hook_post": "hook_post", "hook_pre_linear": "hook_pre_linear",
                                "hook_pre": "hook_pre", "act": "swish"}

# Files of a few hundred MB, as the Hub serves them well: a shard holds whole layers (whole texts) until it
# reaches this many neurons (tokens). A summary row is about 3 KB; a text about 9 bytes a token.
NEURONS_PER_SHARD = 100_000
TOKENS_PER_SHARD = 20_000_000
# A reader (the Hub's viewer, streaming) takes a row group whole: some MB, not the default 122,880 wide rows.
ROW_GROUP_ROWS = 10_000

# Pad a top list to $k entries as the original's lists are padded: a text without a token in the quadrant
# counts there with value 0, so where fewer than k texts had one, the list goes on with value 0 at texts
# outside it, and our tie rule (the lower text_id first) picks them. A list holds at most k ids, so at least
# k of the first 2k ids (or of all ids, if fewer) lie outside it.
MACROS = """
CREATE OR REPLACE TEMP MACRO paper_values(vals, k) AS
    list_concat(coalesce(vals, []::FLOAT[]),
                list_transform(range(k - len(coalesce(vals, []::FLOAT[]))), lambda i: 0::FLOAT));
CREATE OR REPLACE TEMP MACRO paper_indices(ids, k, n_texts) AS
    list_concat(coalesce(ids, []::BIGINT[]),
                list_filter(range(least(2 * k, n_texts)),
                            lambda t: NOT list_contains(coalesce(ids, []::BIGINT[]), t))
                    [1:k - len(coalesce(ids, []::BIGINT[]))]);
"""

TEXTS = """
SELECT t.text_id::BIGINT AS text_id, d.text, t.token_ids AS input_ids,
       list_transform(t.token_ids, lambda i: 1::TINYINT) AS attention_mask,
       t.source_index, t.source
FROM texts t JOIN decoded_texts d ON d.text_id = t.text_id
WHERE t.text_id BETWEEN $lo AND $hi
ORDER BY t.text_id
"""


def has_top_list(quadrant: str, hook: str) -> bool:
    """Whether the original keeps a top list of this value in this quadrant: not of swish where x_gate > 0,
    where it ranks the texts as hook_pre does (b_activations._compute_reductions_on_single_batch skips it)."""
    return not (hook == "act" and quadrant.startswith("gate+"))


def _cells() -> Iterator[tuple[int, str, int, str]]:
    """(quadrant code, quadrant, hook code, hook) in the original's column order: quadrant, then value."""
    for q, quadrant in enumerate(QUADRANTS):
        for h, hook in enumerate(HOOKS):
            yield q, quadrant, h, hook


def _summary_columns(moe: bool, stated: bool) -> list[tuple[str, str]]:
    """(name, SQL) of each column of the summary, in order: the original's, and after `neuron` the neuron's
    expert and its index there in a file with experts (NULL for neurons of dense layers)."""
    columns = [("layer", "n.layer::BIGINT"), ("neuron", "n.neuron::BIGINT")]
    if moe:
        columns += [("expert", "e.expert::BIGINT"), ("expert_neuron", "(n.neuron - e.first_neuron)::BIGINT")]
    for q, quadrant, h, hook in _cells():
        if h == 0:  # a quadrant's columns start with its frequency
            columns.append((f"{quadrant}_freq",
                            f"coalesce({frequency([QUADRANT_SLUGS[q]], tokens_of(), stated)}, 'nan'::DOUBLE)::FLOAT"))
        name = f"{quadrant}_{PAPER_VALUES[hook]}"
        if has_top_list(quadrant, hook):
            columns += [(f"{name}_max_values", f"paper_values(t.v_{q}_{h}, $k)"),
                        (f"{name}_max_indices", f"paper_indices(t.i_{q}_{h}, $k, $n_texts)")]
        columns.append((f"{name}_mean", f"coalesce(m.m_{q}_{h}, 'nan'::DOUBLE)::FLOAT"))
    return columns


def summary_sql(moe: bool, stated: bool) -> str:
    """The summary rows of layers $lo .. $hi, by layer then neuron; $k entries a list, $n_texts texts,
    $n_tokens counted tokens (the denominator of a dense neuron's frequencies); stated: the file is an import
    with frequencies of its own (Database.stated), which an export of it keeps where it knows no counts."""
    tops = ",\n           ".join(
        f"any_value(vals) FILTER (WHERE quadrant = {q} AND hook = {h}) AS v_{q}_{h}, "
        f"any_value(ids) FILTER (WHERE quadrant = {q} AND hook = {h}) AS i_{q}_{h}"
        for q, quadrant, h, hook in _cells() if has_top_list(quadrant, hook))
    means = ",\n           ".join(f"any_value(mean) FILTER (WHERE quadrant = {q} AND hook = {h}) AS m_{q}_{h}"
                                  for q, _, h, _ in _cells())
    select = ",\n       ".join(f'{sql} AS "{name}"' for name, sql in _summary_columns(moe, stated))
    return f"""
WITH lists AS (
    SELECT layer, neuron, quadrant, hook,
           list(value ORDER BY rank) AS vals, list(text_id::BIGINT ORDER BY rank) AS ids
    FROM examples
    WHERE layer BETWEEN $lo AND $hi
    GROUP BY layer, neuron, quadrant, hook
), tops AS (
    SELECT layer, neuron,
           {tops}
    FROM lists
    GROUP BY layer, neuron
), means AS (
    SELECT layer, neuron,
           {means}
    FROM value_stats
    WHERE layer BETWEEN $lo AND $hi
    GROUP BY layer, neuron
)
SELECT {select}
FROM {with_imported(stated, NEURONS_WITH_EXPERTS, "layer BETWEEN $lo AND $hi")}
LEFT JOIN tops t ON t.layer = n.layer AND t.neuron = n.neuron
LEFT JOIN means m ON m.layer = n.layer AND m.neuron = n.neuron
WHERE n.layer BETWEEN $lo AND $hi
ORDER BY n.layer, n.neuron
"""


def shard_ranges(sizes: Sequence[int], target: int) -> list[tuple[int, int]]:
    """Consecutive items (layers by width, texts by length) grouped into inclusive ranges (first, last): a
    range closes once its sizes reach `target`, so each holds at least one item."""
    ranges, first, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= target:
            ranges.append((first, i))
            first, total = i + 1, 0
    if first < len(sizes):
        ranges.append((first, len(sizes) - 1))
    return ranges


def _shard_paths(folder: Path, n: int) -> list[Path]:
    """The Hub's names for n shards of the train split: train-00000-of-0000n.parquet ..."""
    return [folder / f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


def _copy(db: Database, sql: str, params: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(exist_ok=True)
    db.con.execute(f"COPY ({sql}) TO $path (FORMAT parquet, ROW_GROUP_SIZE {ROW_GROUP_ROWS})",
                   {**params, "path": str(path)})


def write_summary(db: Database, folder: Path) -> None:
    """The neurons' rows into folder/train-*.parquet."""
    n_texts = len(db.texts)
    params = {"k": min(int(db.meta["k"]), n_texts), "n_texts": n_texts, "n_tokens": int(db.meta["n_tokens"])}
    ranges = shard_ranges([db.experts.width(layer) for layer in range(db.n_layers)], NEURONS_PER_SHARD)
    sql = summary_sql(db.experts.any, db.stated)
    for (lo, hi), path in zip(ranges, _shard_paths(folder, len(ranges))):
        _copy(db, sql, {**params, "lo": lo, "hi": hi}, path)


def write_texts(db: Database, folder: Path) -> None:
    """The texts into folder/train-*.parquet, each as the pages show it (data.whole_text): an import's as its
    dataset gave it, else decoded with the file's own vocabulary (no tokenizer)."""
    ranges = shard_ranges(np.diff(db.texts.offsets).tolist(), TOKENS_PER_SHARD)
    for (lo, hi), path in zip(ranges, _shard_paths(folder, len(ranges))):
        ids = np.arange(lo, hi + 1, dtype=np.int64)
        stored = dict(db.query(TEXT_STRINGS_BETWEEN, {"lo": lo, "hi": hi}))
        text = np.array([whole_text(db, i, stored.get(i)) for i in ids.tolist()], dtype=object)
        db.con.register("decoded_texts", {"text_id": ids, "text": text})
        try:
            _copy(db, TEXTS, {"lo": lo, "hi": hi}, path)
        finally:
            db.con.unregister("decoded_texts")


def dataset_card(db: Database) -> str:
    """OUT/README.md: the Hub's configs of the two datasets, and what the file was recorded from."""
    m = db.meta
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
- config_name: texts
  data_files:
  - split: train
    path: texts/train-*.parquet
---
# {m['model_name']}: neuron activations (GLUScope)

The GLUScope recording of {m['model_source']} over {m['dataset']} ({m['n_texts']:,} texts,
{m['n_tokens']:,} counted tokens), exported by `gluscope export --format gluscope-hf` (GLUScope
{m['tool_version']}) in the layout of the GLUScope paper's activation dataset: one row per neuron
(config `default`), and the texts its `*_max_indices` columns point into (config `texts`: row i is text i).

Weights: {m['weight_convention']} (metadata.refactor_glu = {str(bool(m['refactor_glu'])).lower()}).

```python
import datasets
neurons = datasets.load_dataset("parquet", data_dir="DIR")["train"]
texts = datasets.load_dataset("parquet", data_dir="DIR/texts")["train"]
# or through this card's configs:
neurons = datasets.load_dataset("DIR")["train"]
texts = datasets.load_dataset("DIR", "texts")["train"]
```

Each column, and where its conventions differ from the original's: GLUScope's docs/paper-layout.md.
"""


def write_gluscope_hf(db: Database, out: Path) -> None:
    """The whole export of `db` into the (empty) folder `out`."""
    # The server's settings (server/db.py SETTINGS) suit many small lookups; an export scans whole tables.
    db.con.execute("RESET threads")
    db.con.execute("RESET memory_limit")
    db.con.execute(MACROS)
    write_summary(db, out / "data")
    write_texts(db, out / "texts")
    (out / "README.md").write_text(dataset_card(db), encoding="utf-8")


def _missing_folders(folder: Path) -> list[Path]:
    """The folders of `folder`'s path that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


@contextmanager
def _written_whole(out: Path) -> Iterator[Path]:
    """A new folder beside `out` to write into, renamed to `out` once complete. If anything fails (Ctrl-C
    included) it is removed, with any parent folder made for it: nothing half-written is left."""
    out = out.absolute()  # `.` has no name to put beside it
    made = _missing_folders(out.parent)
    work = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    try:
        try:
            work.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"cannot write beside --out {out}: {e.strerror}") from None
        yield work
        os.replace(work, out)  # onto an empty folder too: rename(2) replaces one
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty: someone else wrote there
                break
        raise


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty")


def export(path: Path, fmt: str, out: Path) -> None:
    """Write the recording at `path` in format `fmt` into the folder `out` (absent or empty).

    Raises UserError (one line) for an unknown format, a missing or unusable file (the server's checks on
    open: server/db.py) and an `out` that is not an empty folder.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; known: {', '.join(FORMATS)}")
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file (record one with `gluscope record`)")
    _check_out(out)
    db = open_database(path, neuron_table=False)
    try:
        with _written_whole(out) as work:
            write_gluscope_hf(db, work)
    finally:
        db.con.close()


def run_export(args: argparse.Namespace) -> None:
    """`gluscope export FILE --format F --out DIR`."""
    export(args.file, args.format, args.out)
