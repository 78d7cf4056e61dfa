"""Opening recorded databases read-only, and what is loaded from each once at startup.

Each process (the HTTP process and every reader, readers.py) opens the files
itself and runs one request at a time, so a connection is never shared
between threads.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from gluscope.errors import UserError
from gluscope.schema import ACT_FNS, COUNT_COLUMNS, GEOMETRY, QUADRANT_SLUGS, QUADRANTS, SCHEMA_VERSION, schema_sql
from gluscope.server import queries
from gluscope.server.experts import Experts, LayoutError

# Every table schema.sql creates, code tables included.
REQUIRED_TABLES = frozenset(re.findall(r"^CREATE TABLE (\w+)", schema_sql(), re.M))

# A small buffer pool keeps the server far below the file's size. One DuckDB
# thread per query: a lookup reads one row group per table, so a query has
# nothing to parallelise, and with many requests at once extra threads only
# contend (fewer fragments a second at 16 clients).
# Set after connecting, not as connect() config: DuckDB refuses a second
# connection to one file with a different config in the same process.
SETTINGS = (f"SET memory_limit = '{os.environ.get('GLUSCOPE_MEMORY_LIMIT', '512MB')}'", "SET threads = 1")


# DuckDB's file starts with three 4 KiB headers (one main, two alternating database headers) before its blocks.
HEADER_BYTES = 3 * 4096


class DatabaseFileError(UserError):
    """A file that is not a readable GLUScope database."""


@dataclass
class Texts:
    """Every text's token ids in one flat array: text i is ids[offsets[i]:offsets[i+1]]."""

    source_index: np.ndarray  # [n_texts] int64
    source: list[str | None]  # [n_texts] where each text came from, when the dataset says
    offsets: np.ndarray       # [n_texts + 1] int64
    ids: np.ndarray           # [sum of lengths] int32

    def __len__(self) -> int:
        return len(self.source_index)

    def token_ids(self, text_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        lo, hi = int(self.offsets[text_id]), int(self.offsets[text_id + 1])
        return self.ids[lo + start: hi if stop is None else min(hi, lo + stop)]


# NeuronTable.counts where a neuron has no row (the writer left it out), and where its count is NULL (an import
# whose frequencies give no exact count).
NO_ROW, COUNT_NOT_KNOWN = -1, -2


@dataclass
class NeuronTable:
    """The neurons and value_stats tables as arrays indexed [layer, neuron, ...]; NaN/NO_ROW where a row is
    missing."""

    counts: np.ndarray    # [L, N, 4] int64; NO_ROW, COUNT_NOT_KNOWN
    frequency: np.ndarray  # [L, N, 4] float64 as queries.frequency() defines it, NaN where it has none
    flipped: np.ndarray   # [L, N] bool (False where NULL: an import without weights, whose geometry is NaN)
    geometry: dict[str, np.ndarray]  # name -> [L, N] float32
    stat_min: np.ndarray  # [L, N, 4, 4] float32 (quadrant, hook)
    stat_max: np.ndarray  # [L, N, 4, 4] float32
    stat_mean: np.ndarray  # [L, N, 4, 4] float64
    # routed_values (expert neurons only: router weight x hook_post) as [L, N, 4] min, max, mean; None in a
    # file without experts.
    routed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def load(cls, con: duckdb.DuckDBPyConnection, n_layers: int, d_mlp: int, n_tokens: int, moe: bool = False,
             stated: bool = False) -> "NeuronTable":
        n = con.execute(queries.neurons(moe, stated), {"n_tokens": n_tokens}).fetchnumpy()
        ok = (n["layer"] >= 0) & (n["layer"] < n_layers) & (n["neuron"] >= 0) & (n["neuron"] < d_mlp)
        li, ni = n["layer"][ok].astype(np.int64), n["neuron"][ok].astype(np.int64)
        counts = np.full((n_layers, d_mlp, 4), NO_ROW, np.int64)
        frequency = np.full((n_layers, d_mlp, 4), np.nan, np.float64)
        for q, (column, slug) in enumerate(zip(COUNT_COLUMNS, QUADRANT_SLUGS)):
            counts[li, ni, q] = np.ma.filled(np.ma.asarray(n[column]), COUNT_NOT_KNOWN)[ok]
            frequency[li, ni, q] = np.ma.filled(np.ma.asarray(n[f"freq_{slug}"], np.float64), np.nan)[ok]
        flipped = np.zeros((n_layers, d_mlp), bool)
        flipped[li, ni] = np.ma.filled(np.ma.asarray(n["flipped"]), False)[ok]
        geometry = {}
        for name in GEOMETRY:
            geometry[name] = np.full((n_layers, d_mlp), np.nan, np.float32)
            geometry[name][li, ni] = np.ma.filled(np.ma.asarray(n[name]).astype(np.float32), np.nan)[ok]
        s = con.execute(queries.VALUE_STATS).fetchnumpy()
        ok = ((s["layer"] >= 0) & (s["layer"] < n_layers) & (s["neuron"] >= 0) & (s["neuron"] < d_mlp)
              & (s["quadrant"] >= 0) & (s["quadrant"] < 4) & (s["hook"] >= 0) & (s["hook"] < 4))
        at = tuple(s[c][ok].astype(np.int64) for c in ("layer", "neuron", "quadrant", "hook"))
        arrays = []
        for col, dtype in (("min", np.float32), ("max", np.float32), ("mean", np.float64)):
            a = np.full((n_layers, d_mlp, 4, 4), np.nan, dtype)
            values = s[col][ok]
            a[at] = values.filled(np.nan) if np.ma.isMaskedArray(values) else values
            arrays.append(a)
        routed = _load_routed_values(con, n_layers, d_mlp) if moe else None
        return cls(counts, frequency, flipped, geometry, *arrays, routed=routed)


def _load_routed_values(con: duckdb.DuckDBPyConnection, n_layers: int,
                        d_mlp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """routed_values as [layers, neurons, quadrants] min, max, mean; NaN where no row (or NULL)."""
    r = con.execute(queries.ROUTED_VALUES).fetchnumpy()
    at = tuple(np.asarray(np.ma.getdata(r[c]), np.int64) for c in ("layer", "neuron", "quadrant"))
    ok = np.all([(a >= 0) & (a < n) for a, n in zip(at, (n_layers, d_mlp, len(QUADRANTS)))], axis=0)
    out = []
    for col, dtype in (("min", np.float32), ("max", np.float32), ("mean", np.float64)):
        a = np.full((n_layers, d_mlp, len(QUADRANTS)), np.nan, dtype)
        a[tuple(x[ok] for x in at)] = np.ma.filled(np.ma.asarray(r[col]).astype(dtype), np.nan)[ok]
        out.append(a)
    return out[0], out[1], out[2]


class LRUCache:
    """A small least-recently-used map (each process runs one request at a time: no lock)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict = OrderedDict()

    def get(self, key: Any) -> Any:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)


# Neurons whose examples stay in memory as NumPy arrays (their size: see
# docs/performance.md): a researcher opens several lists of one neuron, and
# all of them together cost one lookup of the whole neuron.
EXAMPLE_CACHE_NEURONS = int(os.environ.get("GLUSCOPE_EXAMPLE_CACHE", "256"))


# Entries of Database.derived: the model page's layer summary, and per layer its scatter's points and PNG
# (their size: see docs/performance.md).
DERIVED_CACHE = 64
# Neurons whose distributions (data.histograms_data; their size: see docs/performance.md) stay in memory:
# switching the value a neuron's histograms show asks for them again.
DISTRIBUTION_CACHE_NEURONS = 64


@dataclass(eq=False)  # compared and hashed by identity: render.py keeps what it builds from one per vocabulary
class Vocabulary:
    """The vocab table: each token's string and the bytes it adds to a text."""

    tokens: list[str]         # vocab.token by id
    token_bytes: list[bytes]  # vocab.token_bytes by id

    def __len__(self) -> int:
        return len(self.tokens)

    def token(self, token_id: int) -> str:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else f"<unk {token_id}>"

    def decode(self, token_ids) -> str:
        """The text these ids spell: their bytes concatenated, decoded as UTF-8."""
        n = len(self.token_bytes)
        return b"".join(self.token_bytes[i] for i in token_ids if 0 <= i < n).decode("utf-8", errors="replace")


@dataclass
class Database:
    """One recorded model: its read-only connection and what every request needs."""

    path: Path
    id: str
    meta: dict[str, Any]
    vocab: Vocabulary
    texts: Texts
    neurons: NeuronTable | None  # None in reader processes: no view they run reads it
    con: duckdb.DuckDBPyConnection
    experts: Experts  # each layer's width and experts; neuron addresses (experts.py)
    stated: bool = False  # the file states frequencies of its own (an import's imported_frequencies): queries.STATED
    bin_edges: dict[str, list[float | None]] = field(default_factory=dict)  # histogram_bins per axis (load_bin_edges)
    examples: LRUCache = field(default_factory=lambda: LRUCache(EXAMPLE_CACHE_NEURONS), repr=False)
    # What the model page and a layer's scatter compute from whole tables (data.py): the file never changes,
    # so each is computed once per process.
    derived: LRUCache = field(default_factory=lambda: LRUCache(DERIVED_CACHE), repr=False)
    distributions: LRUCache = field(default_factory=lambda: LRUCache(DISTRIBUTION_CACHE_NEURONS), repr=False)
    _prepared: set[str] = field(default_factory=set, repr=False)
    _intervals: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _extremes: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def d_mlp(self) -> int:
        return int(self.meta["d_mlp"])

    @property
    def n_texts(self) -> int:
        return len(self.texts)

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        return self.con.execute(sql, params or {}).fetchall()

    def temp_table(self, name: str) -> None:
        """Build queries.temp_tables()[name] on this connection unless it already has it (once per process)."""
        if name not in self._prepared:
            self.con.execute(queries.temp_tables(self.experts.any, self.stated)[name])
            self._prepared.add(name)

    def load_intervals(self) -> None:
        """Read the intervals table for neuron_intervals, once per process (readers do it as they start)."""
        if self._intervals is None:
            self._intervals = _load_intervals(self.con, self.n_layers, self.d_mlp)

    def neuron_intervals(self, layer: int, neuron: int) -> dict[str, np.ndarray]:
        """The neuron's rows of `intervals`: quadrant, interval, lo, hi (float64, NaN where unbounded), by (quadrant, interval).

        The whole table is read once per process (load_intervals) and kept as two [layers, neurons, quadrants,
        intervals] float32 arrays (their size: see docs/performance.md), so that a neuron's histograms and its
        sampled lists each need one lookup of the file fewer: a point lookup costs about as much as the rows it
        finds.
        """
        self.load_intervals()
        lo, hi = (a[layer, neuron] for a in self._intervals)
        q, i = np.nonzero(~np.isnan(lo))
        return {"quadrant": q.astype(np.int8), "interval": i.astype(np.int8),
                "lo": lo[q, i].astype(np.float64), "hi": hi[q, i].astype(np.float64)}

    def load_extremes(self) -> None:
        """Read each list's most extreme value for top_example_value, once per process (readers do it as they start)."""
        if self._extremes is None:
            t = self.con.execute(queries.LIST_EXTREMES).fetchnumpy()
            at = tuple(np.asarray(np.ma.getdata(t[c]), np.int64) for c in ("layer", "neuron", "quadrant", "hook"))
            ok = np.all([(a >= 0) & (a < n) for a, n in zip(at, (self.n_layers, self.d_mlp, 4, 4))], axis=0)
            extremes = np.full((self.n_layers, self.d_mlp, 4, 4), np.nan, np.float32)
            extremes[tuple(a[ok] for a in at)] = np.ma.filled(np.ma.asarray(t["extreme"]).astype(np.float32), np.nan)[ok]
            self._extremes = extremes

    def top_example_value(self, layer: int, neuron: int, quadrant: int, hook: int) -> float:
        """The value of the first example (rank 0) of a top list: the list's most extreme value, in value_stats.

        Kept in memory as one [layers, neurons, quadrants, hooks] float32 array (its size: see
        docs/performance.md), so that the token search's usual answers, the lists whose strongest example holds
        the token, need no lookup of the examples table: each costs about as much as reading a whole neuron.
        """
        self.load_extremes()
        return float(self._extremes[layer, neuron, quadrant, hook])

    def prepared_columns(self, name: str, *args: int) -> dict[str, np.ndarray]:
        """queries.PREPARED[name] run on these integers, as one NumPy array per column (no object per value).

        DuckDB's EXECUTE takes no bound parameters, so the arguments are
        written into it: operator.index() lets only true integers through.
        """
        if name not in self._prepared:
            self.con.execute(f"PREPARE {name} AS {queries.PREPARED[name]}")
            self._prepared.add(name)
        values = ", ".join(str(operator.index(a)) for a in args)
        return self.con.execute(f"EXECUTE {name}({values})").fetchnumpy()


def _load_intervals(con: duckdb.DuckDBPyConnection, n_layers: int, d_mlp: int) -> tuple[np.ndarray, np.ndarray]:
    """The intervals table as (lo, hi) [layers, neurons, quadrants, intervals] float32; lo NaN where no row is, hi
    NaN where it is unbounded."""
    t = con.execute(queries.INTERVALS).fetchnumpy()
    layer, neuron, quadrant, interval = (np.asarray(np.ma.getdata(t[c]), np.int64)
                                         for c in ("layer", "neuron", "quadrant", "interval"))
    shape = (n_layers, d_mlp, len(QUADRANTS), int(interval.max()) + 1 if len(interval) else 0)
    lo, hi = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    ok = (layer >= 0) & (layer < n_layers) & (neuron >= 0) & (neuron < d_mlp) & (quadrant >= 0) & \
        (quadrant < len(QUADRANTS)) & (interval >= 0)
    at = (layer[ok], neuron[ok], quadrant[ok], interval[ok])
    lo[at] = np.ma.filled(np.ma.asarray(t["lo"]).astype(np.float32), np.nan)[ok]
    hi[at] = np.ma.filled(np.ma.asarray(t["hi"]).astype(np.float32), np.nan)[ok]
    return lo, hi


def load_bin_edges(con: duckdb.DuckDBPyConnection, path: Path) -> dict[str, list[float | None]]:
    """The edges of each axis of histogram_bins: bin i holds edges[i] <= v < edges[i+1], None an open end."""
    rows: dict[str, list[tuple[int, float | None, float | None]]] = {}
    for axis, b, lo, hi in con.execute(queries.HISTOGRAM_BINS).fetchall():
        rows.setdefault(axis, []).append((b, lo, hi))
    edges = {}
    for axis, bins in rows.items():
        if [b for b, _, _ in bins] != list(range(len(bins))) or any(
                bins[i][2] != bins[i + 1][1] for i in range(len(bins) - 1)):
            raise DatabaseFileError(f"{path}: histogram_bins axis {axis!r} is not one run of adjacent bins 0, 1, ...")
        edges[axis] = [lo for _, lo, _ in bins] + [bins[-1][2]]
    return edges


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "model"


def _open_checked(path: Path) -> tuple[duckdb.DuckDBPyConnection, dict[str, Any]]:
    """A read-only connection to `path` and its metadata, once the file is checked to be one GLUScope
    can serve; otherwise a DatabaseFileError naming the file and what is wrong."""
    try:
        con = duckdb.connect(str(path), read_only=True)
        for setting in SETTINGS:
            con.execute(setting)
    except duckdb.Error as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = "damaged or cut short" if "read enough bytes" in first or "Corrupt" in first else "not a DuckDB file"
        raise DatabaseFileError(f"{path}: cannot open it: {hint} ({first})") from None
    try:
        return con, _checked_metadata(con, path)
    except BaseException:
        con.close()
        raise


def _checked_metadata(con: duckdb.DuckDBPyConnection, path: Path) -> dict[str, Any]:
    _check_size(con, path)
    tables = {row[0] for row in con.execute(queries.TABLES).fetchall()}
    missing = REQUIRED_TABLES - tables
    if missing:
        raise DatabaseFileError(f"{path}: not a GLUScope database (no table {', '.join(sorted(missing))})")
    cur = con.execute(queries.METADATA)
    rows = cur.fetchall()
    if len(rows) != 1:
        raise DatabaseFileError(f"{path}: the metadata table holds {len(rows)} rows, not 1")
    meta = dict(zip([d[0] for d in cur.description], rows[0]))
    if meta["schema_version"] != SCHEMA_VERSION:
        raise DatabaseFileError(f"{path}: schema version {meta['schema_version']}, this server reads {SCHEMA_VERSION}")
    if meta.get("shard_count") is not None:
        raise DatabaseFileError(f"{path}: shard {meta['shard_index']}/{meta['shard_count']} of a recording; "
                                "merge the shards first (gluscope merge)")
    if any(meta.get(column) is not None for column in ("layer_first", "expert_first")):
        part = ", ".join(f"{name}s {meta[name + '_first']}-{meta[name + '_last']}" for name in ("layer", "expert")
                         if meta.get(name + "_first") is not None)
        raise DatabaseFileError(f"{path}: a part of a recording ({part}); merge its parts with `gluscope merge` "
                                "and serve the result")
    if meta["act_fn"] not in ACT_FNS:
        raise DatabaseFileError(f"{path}: act_fn {meta['act_fn']!r} is not an activation GLUScope computes "
                                f"({', '.join(ACT_FNS)})")
    return meta


def check_database_file(path: str | os.PathLike) -> None:
    """Raise DatabaseFileError unless `path` opens as a servable GLUScope database (a cheap look, no loading)."""
    con, _ = _open_checked(Path(path))
    con.close()


def open_database(path: str | os.PathLike, neuron_table: bool = True) -> Database:
    path = Path(path)
    con, meta = _open_checked(path)
    vocab = con.execute(queries.VOCAB).fetchall()
    lengths = con.execute(queries.TEXT_LENGTHS).fetchnumpy()
    offsets = np.zeros(len(lengths["n_tokens"]) + 1, dtype=np.int64)
    np.cumsum(lengths["n_tokens"], out=offsets[1:])
    ids = np.asarray(con.execute(queries.TEXT_TOKENS).fetchnumpy()["token_id"], dtype=np.int32)
    if len(ids) != offsets[-1]:
        raise DatabaseFileError(f"{path}: texts.n_tokens disagrees with the stored token ids")
    sources = lengths["source"]
    texts = Texts(source_index=np.asarray(lengths["source_index"], dtype=np.int64),
                  source=[None if s is None else str(s) for s in sources.tolist()] if len(sources) else [],
                  offsets=offsets, ids=ids)
    try:
        experts = Experts(int(meta["n_layers"]), int(meta["d_mlp"]), con.execute(queries.LAYERS).fetchall(),
                          con.execute(queries.EXPERTS).fetchall())
    except LayoutError as e:
        con.close()
        raise DatabaseFileError(f"{path}: {e}") from None
    stated = bool(con.execute(queries.STATED).fetchone()[0])
    neurons = NeuronTable.load(con, int(meta["n_layers"]), int(meta["d_mlp"]), int(meta["n_tokens"]), experts.any,
                               stated) if neuron_table else None
    return Database(path=path, id="", meta=meta, vocab=Vocabulary([t for t, _ in vocab], [bytes(b) for _, b in vocab]),
                    texts=texts, neurons=neurons, con=con, experts=experts, stated=stated,
                    bin_edges=load_bin_edges(con, path))


def _check_size(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """A file shorter than the blocks its own header counts was cut short (a copy or download that stopped)."""
    (row,) = con.execute("PRAGMA database_size").fetchall()
    # Used blocks, not total: DuckDB may truncate free blocks at the end of a file it wrote itself, so a
    # complete file can be shorter than total_blocks; it is never shorter than the blocks in use.
    block_size, used_blocks = int(row[2]), int(row[4])
    needed = HEADER_BYTES + block_size * used_blocks
    size = path.stat().st_size
    if size < needed:
        raise DatabaseFileError(f"{path}: cut short: {size:,} bytes where its header says {needed:,}")


def _fingerprint(meta: dict[str, Any]) -> str:
    key = "\n".join(str(meta[c]) for c in ("model_name", "model_revision", "created_at", "dataset", "n_texts"))
    return hashlib.sha1(key.encode()).hexdigest()[:6]


def open_databases(paths, neuron_table: bool = True) -> dict[str, Database]:
    """Open each file once; id = slug of the model's name, plus a hash of its metadata where names collide."""
    seen: set[Path] = set()
    dbs: list[Database] = []
    for p in paths:
        resolved = Path(p).resolve()
        if resolved not in seen:
            seen.add(resolved)
            dbs.append(open_database(p, neuron_table))
    base = [slugify(str(db.meta["model_name"]).rstrip("/").rsplit("/", 1)[-1]) for db in dbs]
    registry: dict[str, Database] = {}
    for db, slug in zip(dbs, base):
        model_id = slug if base.count(slug) == 1 else f"{slug}-{_fingerprint(db.meta)}"
        n = 2
        while model_id in registry:  # identical metadata in two files
            model_id, n = f"{model_id.rsplit('~', 1)[0]}~{n}", n + 1
        db.id = model_id
        registry[model_id] = db
    return registry
