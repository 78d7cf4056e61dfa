"""`gluscope merge`: put the shard files of one recording together into the file a single run writes.

DuckDB is the merge engine: the shards are attached read-only and every
table is one `INSERT ... SELECT` over their union, so memory stays bounded
(DuckDB spills what does not fit) and every core is used. What makes the
result equal a single run's:

- shards hold whole batches (record.shard_batches), so each text's values
  are bit for bit the single run's, and a text lives in exactly one shard;
- a shard's top-k list holds every one of its texts that can be in the
  whole run's top-k, so ranking the union by the recorder's own order
  (|value| descending, then text_id, then position: rules of schema.sql's
  `examples`) and keeping k gives the single run's list;
- counts add up, min and max combine, and a mean is the count-weighted mean
  of the shards' means (equal to the single run's up to the last bits of
  float64, where the order of summation differs);
- the weights' tables (geometry, weight tokens, token neurons, related
  neurons) and the vocabulary are the same in every shard, and are taken
  from the first;
- the token index of the examples (example_tokens) is rebuilt from the merged
  examples, samples and texts, by the SQL that builds a single run's.
- histograms and density counts add up; the interval bounds come from the
  same calibration batches in every shard (checked equal) and are taken from
  the first; sampled examples are re-selected by the recorder's own order
  (hash, recomputed by rules.hash_of as the file stores none, then text_id,
  then position) with `QUALIFY`, as a shard's list
  holds every one of its texts that can be in the single run's list; a
  token that stays only a sample gets a sample's shorter window.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import torch

from gluscope.errors import UserError
from gluscope.recorder import rules
from gluscope.recorder.token_tops import TOKEN_NEURONS
from gluscope.recorder.writer import DatabaseWriter
from gluscope.schema import COUNT_COLUMNS

# Metadata columns in which the shards of one run differ; every other column must agree.
PER_SHARD = {"created_at", "n_texts", "n_tokens", "shard_index"}
# The same for the parts of one run (record --layers, --experts; parts.py), which each hold the whole corpus.
SELECTION = ("layer_first", "layer_last", "expert_first", "expert_last")
PER_PART = {"created_at", *SELECTION}


def _metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:
        raise UserError(f"{path}: not a readable DuckDB file ({str(e).splitlines()[0][:160]})") from None
    try:
        cur = con.execute("SELECT * FROM metadata")
        row = cur.fetchone()
        names = [d[0] for d in cur.description]
    except duckdb.Error:
        raise UserError(f"{path}: not a GLUScope database (no metadata table)") from None
    finally:
        con.close()
    if row is None:
        raise UserError(f"{path}: its metadata table is empty")
    return dict(zip(names, row))


def is_part(meta: dict[str, Any]) -> bool:
    return any(meta.get(column) is not None for column in SELECTION)


def check_shards(paths: list[Path]) -> list[dict[str, Any]]:
    """The shards' metadata, in shard order, once every file is checked to be one shard of one run."""
    if len(paths) < 1:
        raise UserError("give the shard files to merge")
    metas = [_metadata(p) for p in paths]
    if all(meta.get("shard_count") is None for meta in metas) and any(is_part(meta) for meta in metas):
        return check_parts(paths, metas)
    for path, meta in zip(paths, metas):
        if meta.get("shard_count") is None:
            raise UserError(f"{path} is a whole recording, not a shard (record shards with --shard I/N)")
    first_path, first = paths[0], metas[0]
    for path, meta in zip(paths[1:], metas[1:]):
        for column in first:
            if column not in PER_SHARD and meta.get(column) != first[column]:
                raise UserError(f"{path} and {first_path} are not shards of one run: their {column} differs "
                                f"({meta.get(column)!r} against {first[column]!r})")
    count = first["shard_count"]
    seen: dict[int, Path] = {}
    for path, meta in zip(paths, metas):
        index = meta["shard_index"]
        if index in seen:
            raise UserError(f"{path} and {seen[index]} are both shard {index}/{count}")
        seen[index] = path
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise UserError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(f'{i}/{count}' for i in missing)} "
                        f"of {count} {'are' if len(missing) > 1 else 'is'} missing")
    order = sorted(range(len(paths)), key=lambda i: metas[i]["shard_index"])
    paths[:] = [paths[i] for i in order]
    return [metas[i] for i in order]


def check_parts(paths: list[Path], metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts' metadata, once every file is checked to be a part of one run (whether they cover the model
    exactly once is checked on their tables, in merge)."""
    first_path, first = paths[0], metas[0]
    for path, meta in zip(paths, metas):
        if not is_part(meta):
            raise UserError(f"{path} is a whole recording, not a part (record parts with --layers, --experts)")
        for column in first:
            if column not in PER_PART and meta.get(column) != first[column]:
                raise UserError(f"{path} and {first_path} are not parts of one run: their {column} differs "
                                f"({meta.get(column)!r} against {first[column]!r})")
    return metas


def _check_cover(con: duckdb.DuckDBPyConnection, n: int, n_layers: int) -> None:
    """Every neuron of every layer in exactly one part."""
    union = " UNION ALL ".join(f"SELECT {i} AS part, layer, neuron FROM shard{i}.neurons" for i in range(n))
    twice = con.execute(f"SELECT layer, neuron FROM ({union}) GROUP BY ALL HAVING count(*) > 1 LIMIT 1").fetchall()
    if twice:
        raise UserError(f"the parts overlap: neuron {twice[0][0]}.{twice[0][1]} is in more than one")
    widths = " UNION ALL ".join(f"SELECT layer, n_neurons FROM shard{i}.layers" for i in range(n))
    short = con.execute(f"""SELECT w.layer, w.n_neurons, coalesce(c.n, 0) FROM (SELECT DISTINCT * FROM ({widths})) w
                            LEFT JOIN (SELECT layer, count(*) AS n FROM ({union}) GROUP BY layer) c USING (layer)
                            WHERE coalesce(c.n, 0) <> w.n_neurons ORDER BY w.layer LIMIT 1""").fetchall()
    layers = con.execute(f"SELECT count(DISTINCT layer) FROM ({widths})").fetchall()[0][0]
    if short or layers != n_layers:
        where = (f"layer {short[0][0]} has {short[0][2]} of its {short[0][1]} neurons" if short
                 else f"they hold {layers} of the {n_layers} layers")
        raise UserError(f"the parts do not cover the model: {where}; record the missing part with --layers/--experts")


def merge(paths: list[Path], out: Path, overwrite: bool = False) -> Path:
    """Merge the shard files `paths` into `out` (written atomically); return `out`."""
    paths = [Path(p) for p in paths]
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if any(p.resolve() == out.resolve() for p in paths if out.exists()):
        raise UserError(f"--out {out} is one of the shards")
    metas = check_shards(paths)
    parts = is_part(metas[0])
    meta = dict(metas[0])
    meta.update(created_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), shard_index=None,
                shard_count=None)
    if parts:
        meta.update({column: None for column in SELECTION})
    else:
        meta.update(n_texts=sum(m["n_texts"] for m in metas), n_tokens=sum(m["n_tokens"] for m in metas))
    with DatabaseWriter(out, overwrite=overwrite) as writer:
        con = writer.con
        for i, path in enumerate(paths):
            con.execute(f"ATTACH '{_quote(path)}' AS shard{i} (READ_ONLY)")
        writer.write_metadata(meta)
        if parts:
            _check_cover(con, len(paths), int(meta["n_layers"]))
            statements = _part_statements(len(paths))
        else:
            _check_intervals(con, paths)
            _register_sample_hash(con, int(meta["sample_seed"]))
            statements = _statements(len(paths), int(meta["k"]), int(meta["n_random"]), int(meta["n_per_interval"]))
        for statement in statements:
            con.execute(statement)
        writer.write_example_tokens()  # last: it reads the merged examples, samples and texts
        for i in range(len(paths)):
            con.execute(f"DETACH shard{i}")
    return out


def _sum_runs(table: str, keys: str, first: str, shards: str) -> str:
    """The shards' count lists (schema.sql's histograms, density) added bin by bin, as dense lists again: one
    shard's range may end before another's starts, so the bins between get zeros."""
    return f"INSERT INTO {table} {_summed_runs(keys, first, 'counts', shards)}"


def _summed_runs(keys: str, first: str, counts: str, shards: str) -> str:
    """SELECT keys, first bin, counts: the lists `counts` starting at bin `first` of `shards`, summed per key."""
    return f"""WITH cells AS (
            SELECT {keys}, bin, sum(count) AS count
            FROM (SELECT {keys}, {first} + generate_subscripts({counts}, 1) - 1 AS bin, unnest({counts}) AS count
                  FROM ({shards}))
            GROUP BY ALL),
        spans AS (SELECT {keys}, lo, unnest(range(lo, hi + 1)) AS bin
                  FROM (SELECT {keys}, min(bin) AS lo, max(bin) AS hi FROM cells GROUP BY ALL))
        SELECT {keys}, lo::SMALLINT AS first_bin, list(coalesce(c.count, 0) ORDER BY s.bin) AS counts
        FROM spans s LEFT JOIN cells c USING ({keys}, bin)
        GROUP BY ALL ORDER BY {keys}"""


def _register_sample_hash(con: duckdb.DuckDBPyConnection, seed: int) -> None:
    """sample_hash(layer, neuron, text_id, position) in SQL: rules.hash_of, the hash the shards ranked by."""
    def sample_hash(layer: pa.Array, neuron: pa.Array, text_id: pa.Array, position: pa.Array) -> pa.Array:
        as_tensor = lambda c: torch.from_numpy(c.to_numpy(zero_copy_only=False).astype(np.int64))  # noqa: E731
        return pa.array(rules.hash_of(seed, *map(as_tensor, (layer, neuron, text_id, position))).numpy())

    bigint = duckdb.sqltype("BIGINT")
    con.create_function("sample_hash", sample_hash, [bigint] * 4, bigint, type="arrow")


def _check_intervals(con: duckdb.DuckDBPyConnection, paths: list[Path]) -> None:
    for i in range(1, len(paths)):
        differ = con.execute(f"""SELECT count(*) FROM (
            (SELECT * FROM shard0.intervals EXCEPT ALL SELECT * FROM shard{i}.intervals)
            UNION ALL (SELECT * FROM shard{i}.intervals EXCEPT ALL SELECT * FROM shard0.intervals))""").fetchall()[0][0]
        if differ:
            raise UserError(f"{paths[i]} and {paths[0]} are not shards of one run: {differ} rows of their "
                            f"interval bounds differ")


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def _statements(n: int, k: int, n_random: int, n_per_interval: int) -> list[str]:
    def union(table: str, columns: str = "*") -> str:
        return " UNION ALL ".join(f"SELECT {columns} FROM shard{i}.{table}" for i in range(n))

    counts = ", ".join(f"sum({c}) AS {c}" for c in COUNT_COLUMNS)
    count_of = "CASE v.quadrant " + " ".join(f"WHEN {q} THEN n.{c}" for q, c in enumerate(COUNT_COLUMNS)) + " END"
    per_shard_stats = " UNION ALL ".join(
        f"SELECT v.*, {count_of} AS n_quadrant FROM shard{i}.value_stats v JOIN shard{i}.neurons n USING (layer, neuron)"
        for i in range(n))
    return [
        "INSERT INTO vocab SELECT * FROM shard0.vocab ORDER BY token_id",
        f"INSERT INTO texts SELECT * FROM ({union('texts')}) ORDER BY text_id",
        f"""INSERT INTO neurons BY NAME
            SELECT g.* EXCLUDE ({", ".join(COUNT_COLUMNS)}), c.* EXCLUDE (layer, neuron)
            FROM shard0.neurons g JOIN (SELECT layer, neuron, {counts} FROM ({union('neurons')}) GROUP BY ALL) c
                 USING (layer, neuron)
            ORDER BY layer, neuron""",
        f"""INSERT INTO value_stats
            SELECT layer, neuron, quadrant, hook, min(min), max(max),
                   sum(mean * n_quadrant) FILTER (WHERE n_quadrant > 0) / nullif(sum(n_quadrant), 0)
            FROM ({per_shard_stats}) GROUP BY ALL ORDER BY layer, neuron, quadrant, hook""",
        f"""INSERT INTO examples
            SELECT layer, neuron, quadrant, hook, (row_number() OVER w - 1) AS rank, value, text_id, position
            FROM ({union('examples')})
            WINDOW w AS (PARTITION BY layer, neuron, quadrant, hook ORDER BY abs(value) DESC, text_id, position)
            QUALIFY row_number() OVER w <= {k}
            ORDER BY layer, neuron, quadrant, hook, rank""",
        f"""INSERT INTO samples
            SELECT layer, neuron, quadrant, kind, interval, (row_number() OVER w - 1) AS rank, text_id,
                   position, x_gate, x_in, act
            FROM ({union('samples')})
            WINDOW w AS (PARTITION BY layer, neuron, quadrant, kind, interval
                         ORDER BY sample_hash(layer, neuron, text_id, position), text_id, position)
            QUALIFY row_number() OVER w <= CASE kind WHEN 0 THEN {n_random} ELSE {n_per_interval} END
            ORDER BY layer, neuron, quadrant, kind, interval, rank""",
        # A shard's window of a token that is a sample but no longer a top example is a top example's full
        # window there: cut it as the writer cuts a sample's (rules.SAMPLE_WINDOW_BEFORE / _AFTER).
        f"""INSERT INTO windows
            SELECT layer, neuron, text_id, position,
                   CASE WHEN top THEN window_start ELSE cut_start END AS window_start,
                   CASE WHEN top THEN x_gate ELSE x_gate[cut_start - window_start + 1 : cut_stop - window_start] END,
                   CASE WHEN top THEN x_in ELSE x_in[cut_start - window_start + 1 : cut_stop - window_start] END
            FROM (SELECT w.*, e.top,
                         greatest(w.window_start, w.position - {rules.SAMPLE_WINDOW_BEFORE}) AS cut_start,
                         least(w.window_start + len(w.x_gate), w.position + {rules.SAMPLE_WINDOW_AFTER + 1}) AS cut_stop
                  FROM ({union('windows')}) w
                  JOIN (SELECT layer, neuron, text_id, position, bool_or(top) AS top
                        FROM (SELECT layer, neuron, text_id, position, true AS top FROM examples
                              UNION ALL SELECT layer, neuron, text_id, position, false FROM samples)
                        GROUP BY ALL) e USING (layer, neuron, text_id, position))
            ORDER BY layer, neuron, text_id, position""",
        "INSERT INTO histogram_bins SELECT * FROM shard0.histogram_bins ORDER BY axis DESC, bin",
        _sum_runs("histograms", "layer, neuron, quadrant, hook", "first_bin", union("histograms")),
        _sum_runs("density", "layer, neuron, gate_bin", "first_in_bin", union("density")),
        "INSERT INTO intervals SELECT * FROM shard0.intervals ORDER BY layer, neuron, quadrant, interval",
        "INSERT INTO weight_tokens SELECT * FROM shard0.weight_tokens ORDER BY layer, neuron, kind, rank",
        "INSERT INTO token_neurons SELECT * FROM shard0.token_neurons ORDER BY token_id, kind, rank",
        "INSERT INTO related SELECT * FROM shard0.related ORDER BY layer, neuron, direction, via, rank",
        # Mixture-of-experts: counts and sums add up, the weight histograms bin by bin, the top texts merge like
        # the examples, and the imbalance follows from the merged counts.
        f"""INSERT INTO experts
            WITH runs AS ({_summed_runs("layer, expert", "weight_first_bin", "weight_counts", union("experts"))}),
            sums AS (SELECT layer, expert, sum(tokens) AS tokens, sum(weight_sum) AS weight_sum
                     FROM ({union('experts')}) GROUP BY ALL)
            SELECT e.layer, e.expert, e.shared, e.first_neuron, e.n_neurons, s.tokens, s.weight_sum,
                   r.first_bin, r.counts
            FROM shard0.experts e JOIN sums s USING (layer, expert) LEFT JOIN runs r USING (layer, expert)
            ORDER BY layer, expert""",
        f"""INSERT INTO layers
            SELECT l.layer, l.n_neurons, l.n_experts, l.top_k, l.router,
                   (SELECT CASE WHEN sum(e.tokens) > 0 THEN max(e.tokens) / avg(e.tokens) END
                    FROM experts e WHERE e.layer = l.layer AND NOT e.shared)
            FROM shard0.layers l ORDER BY layer""",
        f"""INSERT INTO expert_tokens
            SELECT layer, expert, token_id, sum(tokens), sum(weight_sum) FROM ({union('expert_tokens')})
            GROUP BY ALL ORDER BY layer, expert, token_id""",
        f"""INSERT INTO expert_examples
            SELECT layer, expert, (row_number() OVER w - 1) AS rank, weight, text_id, position
            FROM ({union('expert_examples')})
            WINDOW w AS (PARTITION BY layer, expert ORDER BY weight DESC, text_id, position)
            QUALIFY row_number() OVER w <= {k}
            ORDER BY layer, expert, rank""",
        f"""INSERT INTO routed_values
            SELECT layer, neuron, quadrant, min(min), max(max),
                   sum(mean * n_quadrant) FILTER (WHERE n_quadrant > 0) / nullif(sum(n_quadrant), 0)
            FROM ({" UNION ALL ".join(
                f"SELECT r.*, {count_of.replace('v.', 'r.')} AS n_quadrant FROM shard{i}.routed_values r "
                f"JOIN shard{i}.neurons n USING (layer, neuron)" for i in range(n))})
            GROUP BY ALL ORDER BY layer, neuron, quadrant""",
    ]


# The tables each part holds for its own neurons, with their order.
PER_NEURON = {
    "neurons": "layer, neuron", "value_stats": "layer, neuron, quadrant, hook",
    "examples": "layer, neuron, quadrant, hook, rank", "samples": "layer, neuron, quadrant, kind, interval, rank",
    "windows": "layer, neuron, text_id, position", "histograms": "layer, neuron, quadrant, hook",
    "density": "layer, neuron, gate_bin", "intervals": "layer, neuron, quadrant, interval",
    "weight_tokens": "layer, neuron, kind, rank", "related": "layer, neuron, direction, via, rank",
    "routed_values": "layer, neuron, quadrant",
    # The router's tables are written by each layer's lead part only (parts.py).
    "experts": "layer, expert", "expert_tokens": "layer, expert, token_id", "expert_examples": "layer, expert, rank",
}


def _part_statements(n: int) -> list[str]:
    """Parts hold disjoint neurons of the same texts: their tables go together as they are, but for `layers`
    (every part of a layer has its row) and token_neurons (each part's best neurons per token, ranked again)."""
    def union(table: str) -> str:
        return " UNION ALL ".join(f"SELECT * FROM shard{i}.{table}" for i in range(n))

    return [
        "INSERT INTO vocab SELECT * FROM shard0.vocab ORDER BY token_id",
        "INSERT INTO texts SELECT * FROM shard0.texts ORDER BY text_id",
        "INSERT INTO histogram_bins SELECT * FROM shard0.histogram_bins ORDER BY axis DESC, bin",
        *(f"INSERT INTO {table} SELECT * FROM ({union(table)}) ORDER BY {key}" for table, key in PER_NEURON.items()),
        f"INSERT INTO layers SELECT DISTINCT * FROM ({union('layers')}) ORDER BY layer",
        # kinds 0, 2, 4 keep the largest scores, 1, 3, 5 the smallest; equal scores in the order of their neurons.
        f"""INSERT INTO token_neurons
            SELECT token_id, kind, (row_number() OVER w - 1) AS rank, layer, neuron, score
            FROM ({union('token_neurons')})
            WINDOW w AS (PARTITION BY token_id, kind
                         ORDER BY CASE WHEN kind % 2 = 0 THEN -score ELSE score END, layer, neuron)
            QUALIFY row_number() OVER w <= {TOKEN_NEURONS}
            ORDER BY token_id, kind, rank""",
    ]
