"""Every SQL statement the server runs. Parameters are named ($layer, ...) and always bound, never formatted
in; prepared statements take positional ones ($1, ...), which only ever receive integers.

Lookups filter on (layer, neuron) first: the recorder inserts every table
ordered by (layer, neuron), so DuckDB's zonemaps skip all row groups but one.
"""

from __future__ import annotations

from gluscope.schema import COUNT_COLUMNS, GEOMETRY, QUADRANT_SLUGS

# What a neuron's row holds besides its key: the quadrant counts, the flip and the weight geometry.
NEURON_COLUMNS = ", ".join((*COUNT_COLUMNS, "flipped", *GEOMETRY))

TABLES = "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'"

METADATA = "SELECT * FROM metadata"

VOCAB = "SELECT token, token_bytes FROM vocab ORDER BY token_id"

# Loaded once at startup: 20M token ids of a 45k-text corpus are about 80 MB,
# and a lookup in the table itself would scan the one row group they live in.
TEXT_LENGTHS = "SELECT source_index, source, n_tokens FROM texts ORDER BY text_id"
# All token ids, text after text. The recorder inserts texts in text_id order
# and DuckDB preserves insertion order without ORDER BY (its default), so this
# streams as flat integers: no per-text lists, no pyarrow in the server.
TEXT_TOKENS = "SELECT unnest(token_ids) AS token_id FROM texts"

# The per-neuron summary (counts, geometry, 16 stats) of every neuron is loaded
# once at startup, about 100 MB for a 7B model: the neuron page and its JSON
# then never wait on the file.
NEURONS = f"SELECT layer, neuron, {NEURON_COLUMNS} FROM neurons"

VALUE_STATS = "SELECT layer, neuron, quadrant, hook, min, max, mean FROM value_stats"

# A neuron's examples, all 16 lists, and its windows (stored once per text and
# position), in one statement: the examples are the rows with part 0, and
# each window's tokens follow as rows of part 1 (unnest), matched in NumPy.
# The server reads a whole neuron at once and keeps it for the neuron's other
# lists. Why this shape (the README's Performance section has the numbers):
# one statement instead of two saves a round trip through DuckDB's Python API;
# a join or an ORDER BY in SQL costs more than sorting in NumPy (windows.py);
# one row per token is cheaper than a list per window, for which NumPy builds
# an array object; and the statement is prepared once per connection.
NEURON_EXAMPLES = """
SELECT 0::TINYINT AS part, quadrant, hook, rank, value, text_id, position,
       NULL::INTEGER AS window_start, NULL::SMALLINT AS x_gate, NULL::SMALLINT AS x_in
FROM examples
WHERE layer = $1 AND neuron = $2
UNION ALL
SELECT 1::TINYINT, NULL, NULL, NULL, NULL, text_id, position, window_start, unnest(x_gate), unnest(x_in)
FROM windows
WHERE layer = $1 AND neuron = $2
"""

# A neuron's random and interval examples (samples) and its intervals of |hook_post|, in one statement: samples
# are part 0, intervals part 1. Their windows are in `windows`, which NEURON_EXAMPLES reads whole. hook_post is
# act * x_in in float32 (both columns are FLOAT), as the recorder computes it.
NEURON_SAMPLES = """
SELECT 0::TINYINT AS part, quadrant, kind, interval, rank, text_id, position,
       x_gate, x_in, act, (act * x_in)::FLOAT AS hook_post, NULL::FLOAT AS lo, NULL::FLOAT AS hi
FROM samples
WHERE layer = $1 AND neuron = $2
UNION ALL
SELECT 1::TINYINT, quadrant, NULL, interval, NULL, NULL, NULL, NULL, NULL, NULL, NULL, lo, hi
FROM intervals
WHERE layer = $1 AND neuron = $2
"""

# A neuron's histograms (part 0: quadrant, hook, bin), its joint density (part 1: gate_bin as `a`, in_bin as
# `b`) and its intervals (part 2: quadrant, interval as `a`, lo, hi): everything its distribution plots
# show, in one lookup of three tables.
NEURON_DISTRIBUTION = """
SELECT 0::TINYINT AS part, quadrant, hook, bin AS a, NULL::SMALLINT AS b, count, NULL::FLOAT AS lo, NULL::FLOAT AS hi
FROM histograms
WHERE layer = $1 AND neuron = $2
UNION ALL
SELECT 1::TINYINT, NULL, NULL, gate_bin, in_bin, count, NULL, NULL
FROM density
WHERE layer = $1 AND neuron = $2
UNION ALL
SELECT 2::TINYINT, quadrant, NULL, interval, NULL, NULL, lo, hi
FROM intervals
WHERE layer = $1 AND neuron = $2
"""

# Statements each connection prepares once, by name (Database.prepared_columns).
PREPARED = {"neuron_examples": NEURON_EXAMPLES, "neuron_samples": NEURON_SAMPLES,
            "neuron_distribution": NEURON_DISTRIBUTION}

# The fixed bins of histograms and density (a few hundred rows), read once per process.
HISTOGRAM_BINS = "SELECT axis, bin, lo, hi FROM histogram_bins ORDER BY axis, bin"

WEIGHT_TOKENS = """
SELECT kind, rank, token_id, score
FROM weight_tokens
WHERE layer = $layer AND neuron = $neuron
ORDER BY kind, rank
"""

# Mean frequency of each quadrant per layer, for the model page, and the paper's §5.1 analysis: the Pearson
# correlation, across the layer's neurons, between the frequency of x_gate > 0 and cos(w_in, w_out).
LAYER_SUMMARY = f"""
SELECT layer,
       count(*) AS n_neurons,
       {", ".join(f"avg({c} / $n_tokens) AS freq_{s}" for c, s in zip(COUNT_COLUMNS, QUADRANT_SLUGS))},
       avg(flipped::INTEGER) AS frac_flipped,
       corr((count_pp + count_pn) / $n_tokens, cos_in_out) AS r_gate_pos_cos_in_out
FROM neurons
GROUP BY layer
ORDER BY layer
"""

# Sort keys a layer table may be ordered by; the ORDER BY clause is picked from
# this fixed mapping, never built from the request.
LAYER_SORT_KEYS = {
    "neuron": "neuron",
    **{f"freq_{s}": c for s, c in zip(QUADRANT_SLUGS, COUNT_COLUMNS)},
    "freq_gate_pos": "count_pp + count_pn", "freq_in_pos": "count_pp + count_np",
    **{name: name for name in GEOMETRY},
}


def layer_neurons(sort: str, descending: bool) -> str:
    """One page of a layer's neurons ordered by a key of LAYER_SORT_KEYS (ties by neuron)."""
    key = LAYER_SORT_KEYS[sort]
    direction = "DESC" if descending else "ASC"
    return f"""
SELECT neuron, {NEURON_COLUMNS}
FROM neurons
WHERE layer = $layer
ORDER BY {key} {direction}, neuron
LIMIT $limit OFFSET $offset
"""


# One layer's neurons as the points of the §5.1 scatter: frequency of x_gate > 0 against cos(w_in, w_out).
LAYER_SCATTER = """
SELECT neuron, (count_pp + count_pn) / $n_tokens AS freq_gate_pos, cos_in_out,
       corr((count_pp + count_pn) / $n_tokens, cos_in_out) OVER () AS r
FROM neurons
WHERE layer = $layer
ORDER BY neuron
"""
