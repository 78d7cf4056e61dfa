"""Every SQL statement the server runs. Parameters are named ($layer, ...) and always bound, never formatted
in; prepared statements take positional ones ($1, ...), which only ever receive integers.

Lookups filter on (layer, neuron) first: the recorder inserts every table
ordered by (layer, neuron), so DuckDB's zonemaps skip all row groups but one.
"""

from __future__ import annotations

TABLES = "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'"

METADATA = "SELECT * FROM metadata"

VOCAB = "SELECT token, token_bytes FROM vocab ORDER BY token_id"

# Loaded once at startup: 20M token ids of a 45k-text corpus are about 80 MB,
# and a lookup in the table itself would scan the one row group they live in.
TEXT_LENGTHS = "SELECT source_index, n_tokens FROM texts ORDER BY text_id"
# All token ids, text after text. The recorder inserts texts in text_id order
# and DuckDB preserves insertion order without ORDER BY (its default), so this
# streams as flat integers: no per-text lists, no pyarrow in the server.
TEXT_TOKENS = "SELECT unnest(token_ids) AS token_id FROM texts"

# The per-neuron summary (counts, geometry, 16 stats) of every neuron is loaded
# once at startup, about 100 MB for a 7B model: the neuron page and its JSON
# then never wait on the file.
NEURONS = """
SELECT layer, neuron, count_pp, count_pn, count_np, count_nn, flipped,
       cos_gate_in, cos_gate_out, cos_in_out, norm_gate, norm_in, norm_out
FROM neurons
"""

VALUE_STATS = "SELECT layer, neuron, quadrant, hook, min, max, mean FROM value_stats"

# A neuron's examples, all 16 lists, and its windows (stored once per text and
# position), in one statement: the examples are the rows with part 0, and
# each window's tokens follow as rows of part 1 (unnest), matched in NumPy.
# The server reads a whole neuron at once and keeps it for the neuron's other
# sections. Measured on the OLMo-7B-shaped file, interleaved, per lookup:
# - two plain scans 3.75 ms, one UNION ALL 2.57 (each round trip through
#   DuckDB's Python API costs about a millisecond); a join in SQL costs as
#   much as the two scans, and an ORDER BY about 1 ms more (data.py sorts);
# - windows as one row per token 3.30 ms, as lists 4.19 (NumPy builds an
#   array object per list);
# - prepared ($1 = layer, $2 = neuron): 3.8 against 4.7 ms unprepared.
NEURON_EXAMPLES = """
SELECT 0::TINYINT AS part, quadrant, hook, rank, value, text_id, position,
       NULL::INTEGER AS window_start, NULL::SMALLINT AS g, NULL::SMALLINT AS i
FROM examples
WHERE layer = $1 AND neuron = $2
UNION ALL
SELECT 1::TINYINT, NULL, NULL, NULL, NULL, text_id, position, window_start, unnest(x_gate), unnest(x_in)
FROM windows
WHERE layer = $1 AND neuron = $2
"""

# Statements each connection prepares once, by name (Database.prepared_columns).
PREPARED = {"neuron_examples": NEURON_EXAMPLES}

WEIGHT_TOKENS = """
SELECT kind, rank, token_id, score
FROM weight_tokens
WHERE layer = $layer AND neuron = $neuron
ORDER BY kind, rank
"""

# Mean frequency of each quadrant per layer, for the model page.
LAYER_SUMMARY = """
SELECT layer,
       count(*) AS n_neurons,
       avg(count_pp / $n_tokens) AS freq_pp,
       avg(count_pn / $n_tokens) AS freq_pn,
       avg(count_np / $n_tokens) AS freq_np,
       avg(count_nn / $n_tokens) AS freq_nn,
       avg(flipped::INTEGER) AS frac_flipped
FROM neurons
GROUP BY layer
ORDER BY layer
"""

# Sort keys a layer table may be ordered by; the ORDER BY clause is picked from
# this fixed mapping, never built from the request.
LAYER_SORT_KEYS = {
    "neuron": "neuron",
    "freq_pp": "count_pp", "freq_pn": "count_pn", "freq_np": "count_np", "freq_nn": "count_nn",
    "freq_gate_pos": "count_pp + count_pn", "freq_in_pos": "count_pp + count_np",
    "cos_gate_in": "cos_gate_in", "cos_gate_out": "cos_gate_out", "cos_in_out": "cos_in_out",
    "norm_gate": "norm_gate", "norm_in": "norm_in", "norm_out": "norm_out",
}


def layer_neurons(sort: str, descending: bool) -> str:
    """One page of a layer's neurons ordered by a key of LAYER_SORT_KEYS (ties by neuron)."""
    key = LAYER_SORT_KEYS[sort]
    direction = "DESC" if descending else "ASC"
    return f"""
SELECT neuron, count_pp, count_pn, count_np, count_nn, flipped,
       cos_gate_in, cos_gate_out, cos_in_out, norm_gate, norm_in, norm_out
FROM neurons
WHERE layer = $layer
ORDER BY {key} {direction}, neuron
LIMIT $limit OFFSET $offset
"""
