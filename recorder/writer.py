"""The only code that writes a GLUScope database.

Everything arrives as NumPy arrays and goes in as Arrow tables, one bulk
INSERT per table and layer, ordered by (layer, neuron) so that a lookup of
one neuron touches few row groups. The file is built under a temporary name
and renamed when complete, so a crash or a bad input never leaves a
half-written database where the server would pick it up.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from gluscope.schema import COUNT_COLUMNS, GEOMETRY, HOOKS, QUADRANTS, SAMPLE_SOURCE, schema_sql

if TYPE_CHECKING:
    from gluscope.recorder.routing import RouterResult

N_Q, N_H = len(QUADRANTS), len(HOOKS)


@dataclass
class LayerStatistics:
    """What a reducer finishes for one layer (reducer_interface.finish_layer). Shapes: n = d_mlp, k = examples per list,
    W = window slots. Quadrant and hook axes follow the codes in schema.sql.
    """

    counts: np.ndarray        # [4, n] int64
    value_min: np.ndarray     # [4, 4, n] float32, NaN where the quadrant is empty
    value_max: np.ndarray     # [4, 4, n] float32
    value_mean: np.ndarray    # [4, 4, n] float64
    example_value: np.ndarray  # [4, 4, n, k] float32
    example_text: np.ndarray   # [4, 4, n, k] int32, -1 marks an empty slot
    example_pos: np.ndarray    # [4, 4, n, k] int16
    window_start: np.ndarray   # [4, 4, n, k] int16
    window_len: np.ndarray     # [4, 4, n, k] int16
    window_gate: np.ndarray    # [4, 4, n, k, W] float16
    window_in: np.ndarray      # [4, 4, n, k, W] float16
    # Distributions (neuron-major). S = rules.SAMPLE_SLOTS per quadrant: N_RANDOM random, then N_PER_INTERVAL
    # per interval, each list ranked from the smallest hash.
    histograms: np.ndarray     # [n, 4, 3, 116] int64 by 'value' bin; hooks as schema.HISTOGRAM_HOOKS
    density: np.ndarray        # [n, 24, 24] int64 by 'density' bin of (x_gate, x_in)
    bounds: np.ndarray         # [n, 4, 3] float32 b1 < b2 < b3 of |hook_post|
    sample_hash: np.ndarray    # [n, 4, S] int64, -1 with sample_text where a slot is empty
    sample_text: np.ndarray    # [n, 4, S] int32
    sample_pos: np.ndarray     # [n, 4, S] int16
    sample_gate: np.ndarray    # [n, 4, S] float32
    sample_in: np.ndarray      # [n, 4, S] float32
    sample_act: np.ndarray     # [n, 4, S] float32
    sample_window_start: np.ndarray  # [n, 4, S] int16
    sample_window_len: np.ndarray    # [n, 4, S] int16
    sample_window_gate: np.ndarray   # [n, 4, S, W] float16
    sample_window_in: np.ndarray     # [n, 4, S, W] float16


@dataclass
class LayerResult(LayerStatistics):
    """Everything recorded for one layer: the reducer's statistics and what the weights say."""

    geometry: dict[str, np.ndarray]  # gluscope.schema.GEOMETRY: [n] each
    flipped: np.ndarray        # [n] bool
    token_ids: np.ndarray | None = None     # [6, n, t] int32: weight_tokens by kind (schema.sql)
    token_scores: np.ndarray | None = None  # [6, n, t] float32


def _list_array(flat: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _sample_windows(r: LayerStatistics) -> tuple[np.ndarray, ...]:
    """The samples' windows cut to rules.SAMPLE_WINDOW_BEFORE / _AFTER around each token: (start, len, x_gate, x_in),
    the values shifted to the front of their slots. A token that is also a top example keeps its full window."""
    from gluscope.recorder import rules  # torch: the paper-layout import writes through here without it
    start = r.sample_window_start.astype(np.int64)
    stop = start + r.sample_window_len
    pos = r.sample_pos.astype(np.int64)
    new_start = np.maximum(start, pos - rules.SAMPLE_WINDOW_BEFORE)
    new_stop = np.minimum(stop, pos + rules.SAMPLE_WINDOW_AFTER + 1)
    w_slots = r.sample_window_gate.shape[-1]
    slot = (new_start - start)[..., None] + np.arange(w_slots)
    inside = np.arange(w_slots) < (new_stop - new_start)[..., None]
    slot = np.where(inside, slot, 0)

    def cut(a: np.ndarray) -> np.ndarray:
        return np.where(inside, np.take_along_axis(a, slot, -1), 0).astype(a.dtype)
    return new_start, np.maximum(new_stop - new_start, 0), cut(r.sample_window_gate), cut(r.sample_window_in)


def dense_runs(counts: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray, pa.ListArray]:
    """Each row of counts' last axis that has a count, as (index of the row, first non-zero bin, the counts from
    there to the last non-zero bin, zeros inside kept): how schema.sql's histograms and density store them."""
    rows = counts.reshape(-1, counts.shape[-1])
    nonzero = rows != 0
    has = np.flatnonzero(nonzero.any(1))
    nonzero = nonzero[has]
    width = rows.shape[1]
    first = nonzero.argmax(1)
    stop = width - nonzero[:, ::-1].argmax(1)
    inside = (np.arange(width) >= first[:, None]) & (np.arange(width) < stop[:, None])
    offsets = np.concatenate([[0], np.cumsum(stop - first)]).astype(np.int32)
    values = pa.array(rows[has][inside].astype(np.int64))
    return np.unravel_index(has, counts.shape[:-1]), first, pa.ListArray.from_arrays(pa.array(offsets), values)


BLOCK_SIZE = 65536

# The metadata columns that only an import (recorder/paper_import.py) sets, as a recording has them.
RECORDED_METADATA: dict[str, Any] = {"imported_from": None, "bos_counted": False, "located_with": None,
                                     "examples_located": None}

EXAMPLE_TOKENS_MEMORY = os.environ.get("GLUSCOPE_WRITE_MEMORY", "4GB")

# The activation-side token index (schema.sql, example_tokens), in SQL over
# what is already in the file, so a recording and a merge build it alike.
# DuckDB lists are 1-based: the token at position p is token_ids[p + 1], the
# next one token_ids[p + 2] (NULL past the text's end). Samples list one
# value per quadrant, not per hook: they are indexed as hook_post.
EXAMPLE_TOKENS = f"""
INSERT INTO example_tokens
WITH listed AS (
    SELECT layer, neuron, quadrant, hook AS source, rank AS place, text_id, position FROM examples
    WHERE position IS NOT NULL  -- an import's examples that no replay located have no token
    UNION ALL
    SELECT layer, neuron, quadrant, {SAMPLE_SOURCE} + kind, interval * (SELECT n_per_interval FROM metadata) + rank,
           text_id, position
    FROM samples
), tokens AS (
    SELECT l.*, t.token_ids[l.position + 1] AS focus, t.token_ids[l.position + 2] AS next
    FROM listed l JOIN texts t USING (text_id)
), roles AS (
    SELECT focus AS token_id, 0 AS role, * EXCLUDE (focus, next) FROM tokens
    UNION ALL
    SELECT next, 1, * EXCLUDE (focus, next) FROM tokens WHERE next IS NOT NULL
)
SELECT example_token_key(token_id, role, example_list(layer, neuron, quadrant, source, m.d_mlp), m.n_layers, m.d_mlp)
           AS key,
       count(*) AS matches, min(place) AS best_rank
FROM roles, (SELECT n_layers, d_mlp FROM metadata) m
GROUP BY key
ORDER BY key
"""


INSERTS_AHEAD = 8  # tables waiting for the inserting thread: about one layer's


class _Inserter:
    """Bulk inserts on one background thread, in the order given.

    DuckDB runs an INSERT without holding the GIL, so while it writes one
    layer's tables the recorder prepares the next layer's arrays. The first
    error stops the inserting and is raised by the next put or drain.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.queue: queue.Queue = queue.Queue(maxsize=INSERTS_AHEAD)
        self.error: BaseException | None = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._run, name="gluscope-insert", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                if self.error is None and not self.cancelled:
                    insert(self.con, *item)
            except BaseException as e:  # noqa: BLE001 - handed to the writer's thread
                self.error = e
            finally:
                self.queue.task_done()

    def put(self, table: str, data: pa.Table) -> None:
        self._raise()
        self.queue.put((table, data))

    def drain(self) -> None:
        """Wait until every table put so far is inserted; raise the first error."""
        self.queue.join()
        self._raise()

    def close(self, cancel: bool = False) -> None:
        """Stop the thread once the tables put are inserted, or (cancel) at once, dropping them."""
        if cancel:
            self.cancelled = True
            self.con.interrupt()
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


class DatabaseWriter:
    """Writes one database file; use as a context manager so failures clean up.

    Tables go in through a background thread (_Inserter); `con` waits for it, so any statement run on the
    connection sees every table written before.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists; pass --overwrite to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.tmp_path.unlink(missing_ok=True)
        # 64 KiB blocks instead of DuckDB's 256 KiB: the server's lookups of one
        # neuron load every block they touch, so smaller blocks mean less to
        # read and check per request, at no cost in file size (measured: see
        # docs/performance.md).
        self._con = None
        self._inserter: _Inserter | None = None
        try:
            # A checkpoint after every 1 GB of changes instead of DuckDB's 16 MB: at the default one ran inside
            # nearly every layer's inserts, and writing the layers took longer (see docs/performance.md).
            self._con = duckdb.connect(str(self.tmp_path), config={"default_block_size": str(BLOCK_SIZE),
                                                                   "checkpoint_threshold": "1GB"})
            self._con.execute(schema_sql())
            self._inserter = _Inserter(self._con)
        except BaseException:  # an interrupt here would otherwise leave the new file behind: no __exit__ runs
            self.abort()
            raise

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The file's connection, once every queued insert is done."""
        self._inserter.drain()
        return self._con

    def __enter__(self) -> "DatabaseWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    def _insert(self, table: str, data: pa.Table) -> None:
        self._inserter.put(table, data)

    def write_metadata(self, meta: dict[str, Any]) -> None:
        """The one metadata row; the import's columns default to RECORDED_METADATA."""
        meta = {**RECORDED_METADATA, **meta}
        columns = [row[0] for row in self.con.execute("DESCRIBE metadata").fetchall()]
        missing = set(columns) - set(meta)
        if missing:
            raise ValueError(f"metadata lacks {sorted(missing)}")
        placeholders = ", ".join("?" for _ in columns)
        self.con.execute(f"INSERT INTO metadata ({', '.join(columns)}) VALUES ({placeholders})",
                         [meta[c] for c in columns])

    def write_texts(self, source_index: np.ndarray, token_ids: Sequence[np.ndarray],
                    text_ids: np.ndarray | None = None, sources: Sequence[str | None] | None = None,
                    texts: Sequence[str | None] | None = None) -> None:
        """Texts with their ids (default 0..n-1; a shard's are the whole corpus's), and an import's strings."""
        lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
        flat = np.concatenate(token_ids).astype(np.int32) if len(token_ids) else np.zeros(0, np.int32)
        self._insert("texts", pa.table({
            "text_id": pa.array(np.asarray(np.arange(len(token_ids)) if text_ids is None else text_ids, np.int32)),
            "source_index": pa.array(np.asarray(source_index, dtype=np.int64)),
            "source": pa.array(list(sources) if sources is not None else [None] * len(token_ids), pa.string()),
            "n_tokens": pa.array(lengths.astype(np.int32)),
            "token_ids": _list_array(flat, lengths),
            "text": pa.array(list(texts) if texts is not None else [None] * len(token_ids), pa.string()),
        }))

    def write_rows(self, table: str, columns: dict[str, Any]) -> None:
        """Rows of any table from whole columns (NumPy arrays, Arrow arrays or lists; None is NULL), matched by
        name: for a source other than the reducers (the paper-layout import), in (layer, neuron) order."""
        self._insert(table, pa.table(columns))

    def write_vocab(self, tokens: Sequence[str], token_bytes: Sequence[bytes]) -> None:
        self._insert("vocab", pa.table({
            "token_id": pa.array(np.arange(len(tokens), dtype=np.int32)),
            "token": pa.array(list(tokens), pa.string()),
            "token_bytes": pa.array(list(token_bytes), pa.binary()),
        }))

    def write_layer(self, layer: int, r: LayerResult, first_neuron: int = 0) -> None:
        """One layer's neurons, or (first_neuron) one expert's, numbered from first_neuron in the layer."""
        n = r.counts.shape[1]
        k = r.example_value.shape[-1]
        neuron = np.arange(first_neuron, first_neuron + n, dtype=np.int32)

        self._insert("neurons", pa.table({
            "layer": pa.array(np.full(n, layer, np.int16)),
            "neuron": pa.array(neuron),
            **{column: pa.array(r.counts[q].astype(np.int64)) for q, column in enumerate(COUNT_COLUMNS)},
            "flipped": pa.array(r.flipped.astype(bool)),
            **{name: pa.array(r.geometry[name].astype(np.float32)) for name in GEOMETRY},
        }))

        if r.token_ids is not None:
            kinds, _, t = r.token_ids.shape
            grid_t = np.indices((n, kinds, t), dtype=np.int32).reshape(3, -1)
            self._insert("weight_tokens", pa.table({
                "layer": pa.array(np.full(n * kinds * t, layer, np.int16)),
                "neuron": pa.array(grid_t[0] + first_neuron),
                "kind": pa.array(grid_t[1].astype(np.int8)),
                "rank": pa.array(grid_t[2].astype(np.int8)),
                "token_id": pa.array(np.moveaxis(r.token_ids, 1, 0).reshape(-1).astype(np.int32)),
                "score": pa.array(np.moveaxis(r.token_scores, 1, 0).reshape(-1).astype(np.float32)),
            }))

        # [q, h, n] -> rows ordered by (neuron, quadrant, hook)
        def by_neuron(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.moveaxis(a, 2, 0)).reshape(-1)

        q_idx, h_idx = np.meshgrid(np.arange(N_Q, dtype=np.int8), np.arange(N_H, dtype=np.int8), indexing="ij")
        self._insert("value_stats", pa.table({
            "layer": pa.array(np.full(n * 16, layer, np.int16)),
            "neuron": pa.array(np.repeat(neuron, 16)),
            "quadrant": pa.array(np.tile(q_idx.reshape(-1), n)),
            "hook": pa.array(np.tile(h_idx.reshape(-1), n)),
            "min": pa.array(by_neuron(r.value_min).astype(np.float32), from_pandas=True),
            "max": pa.array(by_neuron(r.value_max).astype(np.float32), from_pandas=True),
            "mean": pa.array(by_neuron(r.value_mean).astype(np.float64), from_pandas=True),
        }))

        # Examples: [q, h, n, k] -> [n, q, h, k], empty slots dropped.
        def ex(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.moveaxis(a, 2, 0)).reshape(-1, *a.shape[4:])

        text = ex(r.example_text)
        keep = text >= 0
        shape = (n, N_Q, N_H, k)
        grid = np.indices(shape, dtype=np.int32).reshape(4, -1)
        self._insert("examples", pa.table({
            "layer": pa.array(np.full(int(keep.sum()), layer, np.int16)),
            "neuron": pa.array(grid[0][keep] + first_neuron),
            "quadrant": pa.array(grid[1][keep].astype(np.int8)),
            "hook": pa.array(grid[2][keep].astype(np.int8)),
            "rank": pa.array(grid[3][keep].astype(np.int8)),
            "value": pa.array(ex(r.example_value)[keep].astype(np.float32)),
            "text_id": pa.array(text[keep].astype(np.int32)),
            "position": pa.array(ex(r.example_pos)[keep].astype(np.int16)),
        }))

        self._write_distributions(layer, r, first_neuron)

        # Windows: one per distinct (neuron, text, position), of the top examples and the samples; the same
        # token is often in several lists (act and hook_pre always agree for gate+).
        s_text = r.sample_text.reshape(-1)
        s_keep = s_text >= 0
        w_slots = r.window_gate.shape[-1]
        s_neuron = np.repeat(neuron, r.sample_text[0].size)[s_keep].astype(np.int64)
        all_neuron = np.concatenate([grid[0][keep].astype(np.int64) + first_neuron, s_neuron])
        all_text = np.concatenate([text[keep].astype(np.int64), s_text[s_keep].astype(np.int64)])
        pos = np.concatenate([ex(r.example_pos)[keep].astype(np.int64), r.sample_pos.reshape(-1)[s_keep]])
        key = (all_neuron << 44) | (all_text << 16) | pos
        _, first = np.unique(key, return_index=True)  # sorted by key = by (neuron, text, position)

        def both(top: np.ndarray, sample: np.ndarray) -> np.ndarray:
            return np.concatenate([ex(top)[keep], sample.reshape(-1, *sample.shape[3:])[s_keep]])[first]
        s_start, s_len, s_gate, s_in = _sample_windows(r)
        lengths = both(r.window_len, s_len).astype(np.int64)
        slot_ok = np.arange(w_slots)[None, :] < lengths[:, None]
        gate = both(r.window_gate, s_gate)
        x_in = both(r.window_in, s_in)
        self._insert("windows", pa.table({
            "layer": pa.array(np.full(len(first), layer, np.int16)),
            "neuron": pa.array(all_neuron[first].astype(np.int32)),
            "text_id": pa.array(all_text[first].astype(np.int32)),
            "position": pa.array(pos[first].astype(np.int16)),
            "window_start": pa.array(both(r.window_start, s_start).astype(np.int16)),
            "x_gate": _list_array(gate.astype(np.float16).view(np.int16)[slot_ok], lengths),
            "x_in": _list_array(x_in.astype(np.float16).view(np.int16)[slot_ok], lengths),
        }))

    def write_layers(self, rows: Sequence[tuple[int, int, int, int, str | None, float | None]]) -> None:
        """The `layers` table: (layer, n_neurons, n_experts, top_k, router, imbalance) per layer."""
        columns = list(zip(*rows)) if rows else [[]] * 6
        self._insert("layers", pa.table({
            "layer": pa.array(np.asarray(columns[0], np.int16)),
            "n_neurons": pa.array(np.asarray(columns[1], np.int32)),
            "n_experts": pa.array(np.asarray(columns[2], np.int32)),
            "top_k": pa.array(np.asarray(columns[3], np.int32)),
            "router": pa.array(list(columns[4]), pa.string()),
            "imbalance": pa.array(list(columns[5]), pa.float64()),
        }))

    def write_experts(self, layer: int, units: Sequence[tuple[int, bool, int, int]], r: "RouterResult",
                      lead: bool = True, recorded: Sequence[bool] | None = None) -> None:
        """One MoE layer's experts, expert_tokens, expert_examples and routed_values (schema.sql) from its
        routing.RouterResult; units: (expert, shared, first_neuron, n_neurons) in the layer's order.

        A part of a run (parts.py) writes the router's tables only where it `lead`s the layer, and the routed
        values of the units it `recorded`."""
        self._write_routed_values(layer, units, r, recorded)
        if lead:
            self._write_router(layer, units, r)

    def _write_router(self, layer: int, units: Sequence[tuple[int, bool, int, int]], r: "RouterResult") -> None:
        U = len(units)
        (rows, first, counts) = dense_runs(r.weight_hist)
        first_bin = np.full(U, -1, np.int64)
        first_bin[rows[0]] = first
        by_unit = {int(u): counts[i].as_py() for i, u in enumerate(rows[0])}
        self._insert("experts", pa.table({
            "layer": pa.array(np.full(U, layer, np.int16)),
            "expert": pa.array(np.array([u[0] for u in units], np.int16)),
            "shared": pa.array([bool(u[1]) for u in units]),
            "first_neuron": pa.array(np.array([u[2] for u in units], np.int32)),
            "n_neurons": pa.array(np.array([u[3] for u in units], np.int32)),
            "tokens": pa.array(r.tokens.astype(np.int64)),
            "weight_sum": pa.array(r.weight_sum.astype(np.float64)),
            "weight_first_bin": pa.array([int(b) if b >= 0 else None for b in first_bin], pa.int16()),
            "weight_counts": pa.array([by_unit.get(i) for i in range(U)], pa.list_(pa.int64())),
        }))
        expert, token = np.nonzero(r.token_counts)
        self._insert("expert_tokens", pa.table({
            "layer": pa.array(np.full(len(expert), layer, np.int16)),
            "expert": pa.array(expert.astype(np.int16)),
            "token_id": pa.array(token.astype(np.int32)),
            "tokens": pa.array(r.token_counts[expert, token].astype(np.int64)),
            "weight_sum": pa.array(r.token_weights[expert, token].astype(np.float64)),
        }))
        expert, rank = np.nonzero(r.top_text >= 0)
        self._insert("expert_examples", pa.table({
            "layer": pa.array(np.full(len(expert), layer, np.int16)),
            "expert": pa.array(expert.astype(np.int16)),
            "rank": pa.array(rank.astype(np.int8)),
            "weight": pa.array(r.top_weight[expert, rank].astype(np.float32)),
            "text_id": pa.array(r.top_text[expert, rank].astype(np.int32)),
            "position": pa.array(r.top_pos[expert, rank].astype(np.int16)),
        }))

    def _write_routed_values(self, layer: int, units: Sequence[tuple[int, bool, int, int]], r: "RouterResult",
                             recorded: Sequence[bool] | None) -> None:
        n = r.value_count.shape[0]
        keep = np.ones(n, bool)
        if recorded is not None:
            for (_, _, first, width), on in zip(units, recorded):
                keep[first:first + width] = on
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(r.value_count > 0, r.value_sum / r.value_count, np.nan)
        grid = np.indices((n, N_Q)).reshape(2, -1)
        rows = keep[grid[0]]
        self._insert("routed_values", pa.table({
            "layer": pa.array(np.full(int(rows.sum()), layer, np.int16)),
            "neuron": pa.array(grid[0][rows].astype(np.int32)),
            "quadrant": pa.array(grid[1][rows].astype(np.int8)),
            "min": pa.array(r.value_min.reshape(-1)[rows].astype(np.float32), from_pandas=True),
            "max": pa.array(r.value_max.reshape(-1)[rows].astype(np.float32), from_pandas=True),
            "mean": pa.array(mean.reshape(-1)[rows], from_pandas=True),
        }))

    def write_token_neurons(self, layer: np.ndarray, neuron: np.ndarray, score: np.ndarray) -> None:
        self._insert("token_neurons", token_neurons_table(layer, neuron, score))

    def write_related(self, other_layer: np.ndarray, other_neuron: np.ndarray, score: np.ndarray) -> None:
        self._insert("related", related_table(other_layer, other_neuron, score))

    def write_example_tokens(self) -> None:
        """example_tokens from the examples, samples and texts already written (the last table: see EXAMPLE_TOKENS)."""
        # Its join, aggregate and sort spill to disk past the memory limit. At DuckDB's default (80% of RAM) it
        # grew on the 7B shape until the kernel killed it beside other processes (see docs/performance.md).
        self.con.execute(f"SET memory_limit = '{EXAMPLE_TOKENS_MEMORY}'")
        self.con.execute(EXAMPLE_TOKENS)

    def _write_distributions(self, layer: int, r: LayerStatistics, first_neuron: int = 0) -> None:
        """histograms, density, intervals and samples: only non-zero counts and filled slots."""
        from gluscope.recorder import rules  # torch, as in _sample_windows
        n = r.histograms.shape[0]
        keys, first, counts = dense_runs(r.histograms)  # keys: (neuron, quadrant, hook index)
        self._insert("histograms", pa.table({
            "layer": pa.array(np.full(len(first), layer, np.int16)),
            "neuron": pa.array(keys[0].astype(np.int32) + first_neuron),
            "quadrant": pa.array(keys[1].astype(np.int8)),
            "hook": pa.array(np.array(rules.HIST_HOOKS, np.int8)[keys[2]]),
            "first_bin": pa.array(first.astype(np.int16)),
            "counts": counts,
        }))
        keys, first, counts = dense_runs(r.density)  # keys: (neuron, gate_bin)
        self._insert("density", pa.table({
            "layer": pa.array(np.full(len(first), layer, np.int16)),
            "neuron": pa.array(keys[0].astype(np.int32) + first_neuron),
            "gate_bin": pa.array(keys[1].astype(np.int16)),
            "first_in_bin": pa.array(first.astype(np.int16)),
            "counts": counts,
        }))
        b = r.bounds.astype(np.float32)
        lo = np.concatenate([np.zeros((n, N_Q, 1), np.float32), b], -1).reshape(-1)
        hi = np.concatenate([b, np.full((n, N_Q, 1), np.nan, np.float32)], -1).reshape(-1)
        grid = np.indices((n, N_Q, rules.N_INTERVALS)).reshape(3, -1)
        self._insert("intervals", pa.table({
            "layer": pa.array(np.full(grid.shape[1], layer, np.int16)),
            "neuron": pa.array(grid[0].astype(np.int32) + first_neuron),
            "quadrant": pa.array(grid[1].astype(np.int8)),
            "interval": pa.array(grid[2].astype(np.int8)),
            "lo": pa.array(lo),
            "hi": pa.array(hi, from_pandas=True),
        }))
        text = r.sample_text.reshape(-1)
        keep = text >= 0
        grid = np.indices(r.sample_text.shape).reshape(3, -1)[:, keep]
        slot = grid[2]
        is_interval = slot >= rules.N_RANDOM
        within = slot - rules.N_RANDOM
        self._insert("samples", pa.table({
            "layer": pa.array(np.full(int(keep.sum()), layer, np.int16)),
            "neuron": pa.array(grid[0].astype(np.int32) + first_neuron),
            "quadrant": pa.array(grid[1].astype(np.int8)),
            "kind": pa.array(is_interval.astype(np.int8)),
            "interval": pa.array(np.where(is_interval, within // rules.N_PER_INTERVAL, 0).astype(np.int8)),
            "rank": pa.array(np.where(is_interval, within % rules.N_PER_INTERVAL, slot).astype(np.int8)),
            "text_id": pa.array(text[keep].astype(np.int32)),
            "position": pa.array(r.sample_pos.reshape(-1)[keep].astype(np.int16)),
            "x_gate": pa.array(r.sample_gate.reshape(-1)[keep].astype(np.float32)),
            "x_in": pa.array(r.sample_in.reshape(-1)[keep].astype(np.float32)),
            "act": pa.array(r.sample_act.reshape(-1)[keep].astype(np.float32)),
        }))

    def write_histogram_bins(self) -> None:
        """The fixed bins of `histograms` and `density` (rules.py): the same in every file."""
        from gluscope.recorder import rules  # torch, as in _sample_windows
        rows = [(axis, i, lo, hi) for axis, edges in (("value", rules.value_magnitude_edges()),
                                                       ("density", rules.density_magnitude_edges()))
                for i, (lo, hi) in enumerate(rules.signed_bin_edges(edges))]
        self._insert("histogram_bins", pa.table({
            "axis": pa.array([r[0] for r in rows], pa.string()),
            "bin": pa.array(np.array([r[1] for r in rows], np.int16)),
            "lo": pa.array([r[2] for r in rows], pa.float64()),
            "hi": pa.array([r[3] for r in rows], pa.float64()),
        }))

    def finish(self) -> Path:
        try:
            self.con.execute("CHECKPOINT")
            self._inserter.close()
            self._con.close()
        except BaseException:  # a failed insert surfaces here: leave nothing half-written behind
            self.abort()
            raise
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        try:
            if self._inserter is not None:
                self._inserter.close(cancel=True)
            if self._con is not None:
                self._con.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)
            Path(str(self.tmp_path) + ".wal").unlink(missing_ok=True)


def insert(con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
    """One bulk INSERT of an Arrow table, its columns matched by name."""
    con.register("_batch", data)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _batch")
    finally:
        con.unregister("_batch")


def _flat(a: np.ndarray, axis: int, to: int) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, axis, to)).reshape(-1)


def token_neurons_table(layer: np.ndarray, neuron: np.ndarray, score: np.ndarray) -> pa.Table:
    """token_neurons from [6 kinds, V, top] arrays (token_tops.TokenNeurons.result), rows ordered by
    (token_id, kind, rank) so that a token's rows are contiguous; slots with layer -1 are left out."""
    kinds, V, top = layer.shape
    grid = np.indices((V, kinds, top), dtype=np.int32).reshape(3, -1)
    keep = _flat(layer, 1, 0) >= 0
    return pa.table({
        "token_id": pa.array(grid[0][keep]),
        "kind": pa.array(grid[1][keep].astype(np.int8)),
        "rank": pa.array(grid[2][keep].astype(np.int8)),
        "layer": pa.array(_flat(layer, 1, 0)[keep].astype(np.int16)),
        "neuron": pa.array(_flat(neuron, 1, 0)[keep].astype(np.int32)),
        "score": pa.array(_flat(score, 1, 0)[keep].astype(np.float32)),
    })


def related_table(other_layer: np.ndarray, other_neuron: np.ndarray, score: np.ndarray) -> pa.Table:
    """related from [L, direction, via, n, top] arrays (related.RelatedNeurons), rows ordered by (layer, neuron,
    direction, via, rank); slots with other_layer -1 are left out."""
    shape = np.moveaxis(other_layer, 3, 1).shape
    grid = np.indices(shape, dtype=np.int32).reshape(len(shape), -1)
    keep = _flat(other_layer, 3, 1) >= 0
    return pa.table({
        "layer": pa.array(grid[0][keep].astype(np.int16)),
        "neuron": pa.array(grid[1][keep]),
        "direction": pa.array(grid[2][keep].astype(np.int8)),
        "via": pa.array(grid[3][keep].astype(np.int8)),
        "rank": pa.array(grid[4][keep].astype(np.int8)),
        "other_layer": pa.array(_flat(other_layer, 3, 1)[keep].astype(np.int16)),
        "other_neuron": pa.array(_flat(other_neuron, 3, 1)[keep].astype(np.int32)),
        "score": pa.array(_flat(score, 3, 1)[keep].astype(np.float32)),
    })
