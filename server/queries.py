"""Every SQL statement the server runs. Parameters are named ($layer, ...) and always bound, never formatted
in; prepared statements take positional ones ($1, ...), which only ever receive integers.

Lookups filter on (layer, neuron) first: the recorder inserts every table
ordered by (layer, neuron), so DuckDB's zonemaps skip all row groups but one.
"""

from __future__ import annotations

from collections.abc import Sequence

from gluscope.schema import COUNT_COLUMNS, GATE_POS_SLUGS, GEOMETRY, IN_POS_SLUGS, QUADRANT_SLUGS

# What a neuron's row holds besides its key: the quadrant counts, the flip and the weight geometry.
NEURON_COLUMNS = ", ".join((*COUNT_COLUMNS, "flipped", *GEOMETRY))

# A neuron's tokens with x_gate > 0, as a sum of its counts in `neurons`: what pages and the API documentation
# write for the frequency of x_gate > 0 of the paper's §5.1 analysis (frequency(GATE_POS_SLUGS)).
GATE_POS_COUNT = " + ".join(f"count_{s}" for s in GATE_POS_SLUGS)


# --- a neuron's frequencies ---------------------------------------------------------
# Every page, sort, filter and export reads a neuron's frequencies through frequency(): its counts over its
# tokens, or, in an import whose frequencies give no exact count (its counts NULL: the paper's 20M-token
# dataset), the frequencies its layout states (imported_frequencies). `stated` says whether the file has any
# (Database.stated, from STATED when it is opened): a recording has none, and its statements then join nothing.
# Not always joined: even an empty imported_frequencies makes a layer page's and the comparison's statements
# several times slower at a 7B model's size (docs/performance.md); only an import pays for the join.
STATED = "SELECT EXISTS (SELECT 1 FROM imported_frequencies)"


def imported_by_neuron(where: str = "TRUE") -> str:
    """imported_frequencies as one row per neuron, a column per quadrant (imported_pp ...), of the rows `where`
    selects (a condition on layer and neuron: the table is sorted by them, so the zonemaps prune the rest)."""
    stated = ", ".join(f"any_value(frequency) FILTER (WHERE quadrant = {q}) AS imported_{s}"
                       for q, s in enumerate(QUADRANT_SLUGS))
    return f"(SELECT layer, neuron, {stated} FROM imported_frequencies WHERE {where} GROUP BY layer, neuron)"


def with_imported(stated: bool, relation: str = "neurons n", where: str = "TRUE") -> str:
    """The FROM clause frequency() reads: `relation` (neurons as n, perhaps joined to experts) and, in a file
    with stated frequencies, each neuron's as i; `where` narrows those as the statement narrows n."""
    if not stated:
        return relation
    return f"{relation} LEFT JOIN {imported_by_neuron(where)} i ON i.layer = n.layer AND i.neuron = n.neuron"


def frequency(slugs: Sequence[str], tokens: str, stated: bool) -> str:
    """A neuron's frequency of these quadrants together (one slug: of that quadrant), a DOUBLE over
    with_imported()'s n and i: its counts over `tokens`, the tokens its statistics are over; where a count is
    NULL, the sum of the frequencies its import states. The counts are summed before dividing, as they always
    were, so that a recording's numbers stay what they were to the last bit."""
    counts = f"({' + '.join(f'n.count_{s}' for s in slugs)}) / {tokens}"
    if not stated:
        return counts
    given = " + ".join(f"i.imported_{s}::DOUBLE" for s in slugs)
    unknown = " OR ".join(f"n.count_{s} IS NULL" for s in slugs)
    return f"(CASE WHEN {unknown} THEN {given} ELSE {counts} END)"


def frequencies(tokens: str, stated: bool) -> str:
    """Each quadrant's frequency(), as freq_pp ... freq_nn."""
    return ", ".join(f"{frequency([s], tokens, stated)} AS freq_{s}" for s in QUADRANT_SLUGS)


TABLES = "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'"

METADATA = "SELECT * FROM metadata"

VOCAB = "SELECT token, token_bytes FROM vocab ORDER BY token_id"

# Each layer's width and router, and the experts of mixture-of-experts layers: a few rows per layer, read once
# per process when the file is opened (experts.Experts).
LAYERS = "SELECT layer, n_neurons, n_experts, top_k, router, imbalance FROM layers ORDER BY layer"
EXPERTS = """
SELECT layer, expert, shared, first_neuron, n_neurons, tokens, weight_sum, weight_first_bin, weight_counts
FROM experts
ORDER BY layer, expert
"""

# Loaded once at startup (its size: see docs/performance.md): a lookup in the
# table itself would scan the one row group the token ids live in.
TEXT_LENGTHS = "SELECT source_index, source, n_tokens FROM texts ORDER BY text_id"
# All token ids, text after text. The recorder inserts texts in text_id order
# and DuckDB preserves insertion order without ORDER BY (its default), so this
# streams as flat integers: no per-text lists, no pyarrow in the server.
TEXT_TOKENS = "SELECT unnest(token_ids) AS token_id FROM texts"

# The per-neuron summary (counts, frequencies, geometry, 16 stats) of every neuron is loaded
# once at startup (its size: see docs/performance.md): the neuron page and its
# JSON then never wait on the file.
def neurons(moe: bool, stated: bool) -> str:
    """Every neuron's row and its frequencies (freq_pp ...), each over its own tokens in a file with experts."""
    relation, tokens = (NEURONS_WITH_EXPERTS, tokens_of(NEURON_TOKENS)) if moe else ("neurons n", NEURON_TOKENS)
    return (f"SELECT n.layer, n.neuron, {NEURON_COLUMNS}, {frequencies(tokens, stated)} "
            f"FROM {with_imported(stated, relation)}")


# A dense neuron's denominator where its own summary is read (neurons, neuron_rows), given $n_tokens: no
# frequency where nothing was counted.
NEURON_TOKENS = "nullif($n_tokens, 0)"

VALUE_STATS = "SELECT layer, neuron, quadrant, hook, min, max, mean FROM value_stats"
# What expert neurons add to the residual stream (router weight x hook_post), loaded beside value_stats.
ROUTED_VALUES = "SELECT layer, neuron, quadrant, min, max, mean FROM routed_values"
# The value of each top list's first example: within a quadrant every value of a hook has one sign, so the
# extreme is max or min, whichever is larger in magnitude (as rank 0 is the largest |value|); an import knows
# only the extreme, the other is NULL.
LIST_EXTREMES = """
SELECT layer, neuron, quadrant, hook, CASE WHEN abs(max) >= abs(min) OR min IS NULL THEN max ELSE min END AS extreme
FROM value_stats
"""

# A neuron's examples, all 16 lists, and its windows (stored once per text and
# position), in one statement: the examples are the rows with part 0, and
# each window's tokens follow as rows of part 1 (unnest), matched in NumPy.
# The server reads a whole neuron at once and keeps it for the neuron's other
# lists. Why this shape (docs/performance.md has the numbers):
# one statement instead of two saves a round trip through DuckDB's Python API;
# a join or an ORDER BY in SQL costs more than sorting in NumPy (windows.py);
# one row per token is cheaper than a list per window, for which NumPy builds
# an array object; and the statement is prepared once per connection.
def _examples_part(sample_columns: bool) -> str:
    # With the samples (NEURON_EXAMPLES_AND_SAMPLES) every row has their two FLOAT columns; without, the top
    # lists' statement reads and converts no more than before.
    extra, nulls = (", NULL::FLOAT AS s_gate, NULL::FLOAT AS s_in", ", NULL, NULL") if sample_columns else ("", "")
    return f"""
SELECT 0::TINYINT AS part, quadrant, hook, rank, value, text_id, coalesce(position, -1)::SMALLINT AS position,
       NULL::INTEGER AS window_start, NULL::SMALLINT AS x_gate, NULL::SMALLINT AS x_in{extra}
FROM examples
WHERE layer = $1 AND neuron = $2
UNION ALL
SELECT 1::TINYINT, NULL, NULL, NULL, NULL, text_id, position, window_start, unnest(x_gate), unnest(x_in){nulls}
FROM windows
WHERE layer = $1 AND neuron = $2
"""


# A neuron's random and interval examples (samples), as rows of part 2 in the columns above: kind in `hook`,
# interval in `window_start`, act in `value`, x_gate and x_in in s_gate and s_in. Their windows are among the
# neuron's windows; the intervals their lists draw from are in memory (Database.neuron_intervals).
_SAMPLES_PART = """
SELECT 2::TINYINT AS part, quadrant, kind AS hook, rank, act AS value, text_id, position,
       interval::INTEGER AS window_start, NULL::SMALLINT AS x_gate, NULL::SMALLINT AS x_in,
       x_gate AS s_gate, x_in AS s_in
FROM samples
WHERE layer = $1 AND neuron = $2
"""
NEURON_EXAMPLES = _examples_part(sample_columns=False)
# A sampled list of a neuron not in memory reads both in one statement (one round trip, not two); one in memory
# without its samples (its top lists came first) reads the samples alone.
NEURON_EXAMPLES_AND_SAMPLES = _examples_part(sample_columns=True) + "UNION ALL" + _SAMPLES_PART
NEURON_SAMPLES = _SAMPLES_PART

# A neuron's histograms (part 0: quadrant, hook, bin) and its joint density (part 1: gate_bin as `a`, in_bin as
# `b`), one row per bin of the stored count lists (zeros too): what its distribution plots show besides the
# intervals (in memory), in one lookup of two tables.
def _bin_of_count(first: str) -> str:
    """The bin of each element of a row's count list (schema.sql's histograms and density), beside unnest(counts)."""
    return f"({first} + generate_subscripts(counts, 1) - 1)::SMALLINT"


NEURON_DISTRIBUTION = f"""
SELECT 0::TINYINT AS part, quadrant, hook, {_bin_of_count("first_bin")} AS a,
       NULL::SMALLINT AS b, unnest(counts) AS count
FROM histograms
WHERE layer = $1 AND neuron = $2
UNION ALL
SELECT 1::TINYINT, NULL, NULL, gate_bin, {_bin_of_count("first_in_bin")}, unnest(counts)
FROM density
WHERE layer = $1 AND neuron = $2
"""

# Every neuron's intervals of |hook_post|, read once per process (Database.neuron_intervals).
INTERVALS = "SELECT layer, neuron, quadrant, interval, lo, hi FROM intervals"

# Statements each connection prepares once, by name (Database.prepared_columns).
PREPARED = {"neuron_examples": NEURON_EXAMPLES, "neuron_examples_and_samples": NEURON_EXAMPLES_AND_SAMPLES,
            "neuron_samples": NEURON_SAMPLES, "neuron_distribution": NEURON_DISTRIBUTION}

# The fixed bins of histograms and density (a few hundred rows), read once per process.
HISTOGRAM_BINS = "SELECT axis, bin, lo, hi FROM histogram_bins ORDER BY axis, bin"

WEIGHT_TOKENS = """
SELECT kind, rank, token_id, score
FROM weight_tokens
WHERE layer = $layer AND neuron = $neuron
ORDER BY kind, rank
"""

# Texts as their dataset gave them (NULL: decode the token ids): an import's, for its examples without a
# position and for the text page (data.whole_texts).
TEXT_STRINGS = "SELECT text_id, text FROM texts WHERE list_contains($text_ids, text_id)"
# The same for the texts $lo .. $hi: an export's shard of texts (a list of its many ids to look up would cost a
# comparison per id and text).
TEXT_STRINGS_BETWEEN = "SELECT text_id, text FROM texts WHERE text_id BETWEEN $lo AND $hi"

# Mean frequency of each quadrant per layer, for the model page, and the paper's §5.1 analysis: the Pearson
# correlation, across the layer's neurons, between the frequency of x_gate > 0 and cos(w_in, w_out).
def layer_summary(moe: bool, stated: bool) -> str:
    """Per layer its neurons, each quadrant's mean frequency, the share flipped and the §5.1 r; in a file with
    experts each neuron's frequencies are over its own tokens (tokens_of)."""
    relation, tokens = (NEURONS_WITH_EXPERTS, tokens_of()) if moe else ("neurons n", "$n_tokens")
    return f"""
SELECT n.layer,
       count(*) AS n_neurons,
       {", ".join(f"avg({frequency([s], tokens, stated)}) AS freq_{s}" for s in QUADRANT_SLUGS)},
       avg(flipped::INTEGER) AS frac_flipped,
       corr({frequency(GATE_POS_SLUGS, tokens, stated)}, cos_in_out) AS r_gate_pos_cos_in_out
FROM {with_imported(stated, relation)}
GROUP BY n.layer
ORDER BY n.layer
"""


# Sort keys a layer table may be ordered by: a column, or the quadrants whose frequency() it sorts by. The
# ORDER BY clause is picked from this fixed mapping, never built from the request.
LAYER_SORT_KEYS: dict[str, str | tuple[str, ...]] = {
    "neuron": "n.neuron",
    **{f"freq_{s}": (s,) for s in QUADRANT_SLUGS},
    "freq_gate_pos": GATE_POS_SLUGS, "freq_in_pos": IN_POS_SLUGS,
    **{name: name for name in GEOMETRY},
}


def layer_neurons(sort: str, descending: bool, moe: bool, stated: bool) -> str:
    """One page of a layer's neurons ordered by a key of LAYER_SORT_KEYS (ties by neuron): neuron, each
    quadrant's frequency over $n_tokens, flipped, the geometry.

    moe: a layer with experts, whose neurons' frequencies are each over its own tokens (tokens_of), the neurons
    restricted to $lo .. $hi (one expert's, or the whole layer's).
    """
    direction = "DESC" if descending else "ASC"
    relation, tokens, within = (NEURONS_WITH_EXPERTS, tokens_of(), " AND n.neuron BETWEEN $lo AND $hi") if moe \
        else ("neurons n", "$n_tokens", "")
    key = LAYER_SORT_KEYS[sort]
    if isinstance(key, tuple):
        key = frequency(key, tokens, stated)
    return f"""
SELECT n.neuron, {frequencies(tokens, stated)}, flipped, {", ".join(GEOMETRY)}
FROM {with_imported(stated, relation, "layer = $layer")}
WHERE n.layer = $layer{within}
ORDER BY {key} {direction}, n.neuron
LIMIT $limit OFFSET $offset
"""


# --- the whole-model filter and the comparison --------------------------------

# Each field a whole-model filter may bound or sort by, as the SQL expression
# over `neuron_facts` that computes it (DOUBLE, so a bound is compared with no
# rounding of the request's number to float32). The field names come from
# this fixed mapping, never from the request:
# - freq_<slug>: frequency(), over metadata.n_tokens (the frequency a neuron page shows; an expert neuron's over
#   its expert's tokens, in a file with experts);
# - the weight geometry (schema.GEOMETRY);
# - absmax_<slug>: the largest |hook_post| over the quadrant's tokens, from
#   value_stats (hook 0): within a quadrant hook_post has one sign, so it is
#   max or -min; NULL where the quadrant never occurred.
FILTER_FIELDS: dict[str, str] = {
    **{f"freq_{s}": f"freq_{s}" for s in QUADRANT_SLUGS},
    **{name: f"{name}::DOUBLE" for name in GEOMETRY},
    **{f"absmax_{s}": f"absmax_{s}::DOUBLE" for s in QUADRANT_SLUGS},
}
FILTER_SORT_KEYS: tuple[str, ...] = ("neuron", *FILTER_FIELDS)  # "neuron": by (layer, neuron)

# Per neuron, the largest |hook_post| recorded in each quadrant (absmax_pp ...), for the neuron facts.
ABSMAX_BY_NEURON = f"""(
    SELECT layer, neuron,
           {", ".join(f"max(greatest(abs(min), abs(max))) FILTER (WHERE quadrant = {q}) AS absmax_{s}"
                      for q, s in enumerate(QUADRANT_SLUGS))}
    FROM value_stats
    WHERE hook = 0
    GROUP BY layer, neuron
)"""

# The facts every filter reads, one row per neuron, built once per connection
# as a temporary table (a read-only file accepts those). Why: the largest
# |hook_post| lives in value_stats, 16 rows per neuron, and joining it to
# `neurons` (or aggregating it) per request cost many times a scan of this
# table for one page and a count of the matches. It costs one aggregation
# when a reader starts and some memory per reader (the measurements, with
# benchmarks/bench_filter.py: see docs/performance.md).
def neuron_facts(moe: bool, stated: bool) -> str:
    """The facts of a file's neurons; with experts, each neuron's frequencies over its own tokens, and its
    expert."""
    relation, tokens = ("neurons n", "(SELECT greatest(n_tokens, 1) FROM metadata)")
    if moe:
        relation, tokens = NEURONS_WITH_EXPERTS, tokens_of(tokens)
    return f"""
CREATE TEMP TABLE IF NOT EXISTS neuron_facts AS
SELECT n.layer, n.neuron,{" e.expert," if moe else ""}
       {frequencies(tokens, stated)},
       {", ".join(f"n.{name}" for name in GEOMETRY)},
       {", ".join(f"v.absmax_{s}" for s in QUADRANT_SLUGS)}
FROM {with_imported(stated, relation)}
LEFT JOIN {ABSMAX_BY_NEURON} v ON v.layer = n.layer AND v.neuron = n.neuron
ORDER BY n.layer, n.neuron
"""


# --- mixture-of-experts layers ----------------------------------------------------
# An expert neuron's statistics are over the tokens routed to its expert, so its frequencies are its counts over
# experts.tokens, a dense neuron's over metadata.n_tokens. A layer's experts tile its neurons in order (schema.sql,
# experts), so a neuron's expert is the one of its layer with the largest first_neuron <= neuron: an ASOF join,
# one merge of the two sorted tables. Only a file with experts joins them (a statement's moe=True); a dense
# file's statements read `neurons n` alone.
NEURONS_WITH_EXPERTS = "neurons n ASOF LEFT JOIN experts e ON n.layer = e.layer AND n.neuron >= e.first_neuron"


def tokens_of(n_tokens: str = "$n_tokens") -> str:
    """A neuron's denominator over NEURONS_WITH_EXPERTS: its expert's tokens (NULL when none was routed to it:
    no frequency), or n_tokens for a dense neuron."""
    return f"(CASE WHEN e.expert IS NULL THEN {n_tokens} ELSE nullif(e.tokens, 0) END)"


# Temporary tables each connection builds once, by name (Database.temp_table): a file with experts' neuron_facts
# also says each neuron's expert, for the filter's expert=.
def temp_tables(moe: bool, stated: bool) -> dict[str, str]:
    return {"neuron_facts": neuron_facts(moe, stated)}


# A recording's (benchmarks/bench_filter.py builds it).
NEURON_FACTS = neuron_facts(moe=False, stated=False)


def neuron_filter(bounds: list[tuple[str, str]], shown: list[str], sort: str, descending: bool,
                  expert: bool = False) -> str:
    """One page of the neurons of layers $layer_lo..$layer_hi within these bounds (neuron_filter_count counts them).

    bounds: (field, "min" or "max") pairs of FILTER_FIELDS, each compared with
    the bound parameter $min_<field> or $max_<field>; shown: the fields
    returned after layer and neuron. NULLs (a quadrant that never occurred)
    match no bound and sort last either way; ties go to (layer, neuron).
    Returns layer, neuron, then the shown fields. expert: only the neurons of expert $expert (a file with
    experts: its temp_tables).
    """
    columns = "".join(f", {FILTER_FIELDS[f]} AS {f}" for f in shown)
    key = "" if sort == "neuron" else f"{FILTER_FIELDS[sort]} {'DESC' if descending else 'ASC'} NULLS LAST, "
    tie = "DESC" if sort == "neuron" and descending else "ASC"
    return f"""
SELECT layer, neuron{columns}
FROM neuron_facts
WHERE {_filter_where(bounds, expert)}
ORDER BY {key}layer {tie}, neuron {tie}
LIMIT $limit OFFSET $offset
"""


# The number of matches, by a statement of its own: count(*) OVER () in the page's statement (a window over
# every match) cost several times as much on the OLMo-7B shape (see docs/performance.md).
def neuron_filter_count(bounds: list[tuple[str, str]], expert: bool = False) -> str:
    return f"SELECT count(*) FROM neuron_facts WHERE {_filter_where(bounds, expert)}"


def _filter_where(bounds: list[tuple[str, str]], expert: bool = False) -> str:
    where = ["layer BETWEEN $layer_lo AND $layer_hi"] + (["expert = $expert"] if expert else [])
    where += [f"{FILTER_FIELDS[f]} {'>=' if side == 'min' else '<='} ${side}_{f}" for f, side in bounds]
    return " AND ".join(where)


# Each of n neurons' row and 16 value_stats rows ($layer_0, $neuron_0 ..), for views that run in a reader
# (which holds no NeuronTable): the comparison. One lookup per neuron in a UNION ALL, each pruned to its
# row group, in one statement per table: 2 statements for 4 neurons instead of 8.
def neuron_rows(n: int, moe: bool, stated: bool) -> str:
    """Each neuron's NEURON_COLUMNS and its frequencies, as neurons() gives them."""
    relation, tokens = (NEURONS_WITH_EXPERTS, tokens_of(NEURON_TOKENS)) if moe else ("neurons n", NEURON_TOKENS)

    def one(i: int) -> str:
        return (f"SELECT {i} AS i, {NEURON_COLUMNS}, {frequencies(tokens, stated)} "
                f"FROM {with_imported(stated, relation, f'layer = $layer_{i} AND neuron = $neuron_{i}')} "
                f"WHERE n.layer = $layer_{i} AND n.neuron = $neuron_{i}")
    return "\nUNION ALL\n".join(one(i) for i in range(n))


def neuron_value_stats(n: int) -> str:
    return "\nUNION ALL\n".join(f"SELECT {i} AS i, quadrant, hook, min, max, mean FROM value_stats "
                                 f"WHERE layer = $layer_{i} AND neuron = $neuron_{i}" for i in range(n))




def neuron_routed_values(n: int) -> str:
    """routed_values' rows of n expert neurons ($layer_0, $neuron_0 ..), as neuron_value_stats reads value_stats."""
    return "\nUNION ALL\n".join(f"SELECT {i} AS i, quadrant, min, max, mean FROM routed_values "
                                 f"WHERE layer = $layer_{i} AND neuron = $neuron_{i}" for i in range(n))


def neurons_histogram(n: int) -> str:
    """One (quadrant $quadrant, hook $hook) histogram of each of n neurons ($layer_0, $neuron_0 ..), as
    (i, bin, count) rows, one lookup per neuron."""
    return "\nUNION ALL\n".join(f"SELECT {i} AS i, {_bin_of_count('first_bin')} AS bin, "
                                 f"unnest(counts) AS count FROM histograms WHERE layer = $layer_{i} AND "
                                 f"neuron = $neuron_{i} AND quadrant = $quadrant AND hook = $hook"
                                 for i in range(n))


# Whether the file holds related neurons at all (a file may have been written before they were recorded).
RELATED_RECORDED = "SELECT EXISTS (SELECT 1 FROM related)"

# --- finding neurons: by token, and related neurons ---------------------------

# A token's neurons from the weights (schema.sql, token_neurons): at most 32
# rows, one range of the table, which is sorted by token_id.
TOKEN_NEURONS = """
SELECT token_id, layer, neuron, score
FROM token_neurons
WHERE token_id = $token_id AND kind = $kind AND layer BETWEEN $lo AND $hi
ORDER BY rank
"""


def example_tokens_search(n: int) -> str:
    """The lists whose examples hold any of n tokens ($t0 ...) in one role, filtered, best first.

    Ranked by matches, then by how early in its list the first match sits
    (best_rank), then the top lists before the random and interval ones
    (the first example of a top list is the neuron's most extreme: the value
    shown needs no lookup, Database.top_example_value), then by layer,
    neuron, quadrant and hook. Each token's rows in the layer range
    are one range of example_tokens' sorted keys, which the zonemaps find;
    a UNION ALL of one range per token keeps that pruning. An example holds
    one token per role, so summing over the tokens counts the list's examples
    that hold any of them; one token needs no sum, and a top-N over its rows
    costs less than a hash aggregate (see docs/performance.md). Optional
    filters are NULL when not given.
    """
    def rows(i: int) -> str:
        def key(layer: str) -> str:
            return f"example_token_key($t{i}, $role, example_list({layer}, 0, 0, 0, $d_mlp), $n_layers, $d_mlp)"
        return f"SELECT * FROM example_token_rows({key('$lo')}, {key('$hi + 1')}, $n_layers, $d_mlp)"

    filters = """($quadrant IS NULL OR quadrant = $quadrant)
      AND ($hook IS NULL OR hook = $hook)
      AND ($kind IS NULL OR kind = $kind)"""
    order = "ORDER BY matches DESC, best_rank, kind, layer, neuron, quadrant, hook\nLIMIT $limit"
    if n == 1:
        return f"""
SELECT layer, neuron, quadrant, hook, kind, matches::INTEGER AS matches, best_rank
FROM ({rows(0)})
WHERE {filters}
{order}
"""
    return f"""
SELECT * FROM (
    SELECT layer, neuron, quadrant, hook, kind, sum(matches)::INTEGER AS matches, min(best_rank) AS best_rank
    FROM ({" UNION ALL ".join(rows(i) for i in range(n))})
    WHERE {filters}
    GROUP BY layer, neuron, quadrant, hook, kind
)
{order}
"""


def example_values_sql(kinds: list[int]) -> str:
    """The values of examples (kind 0) and samples (1 random, 2 interval: hook_post), one per kind given, as
    (i, value): example i is at layer $l{i}, neuron $n{i}, quadrant $q{i}, hook $h{i} (examples) and place $r{i}
    in its list (schema.sql, example_tokens.best_rank). One lookup each, joined by UNION ALL: each is pruned
    to its neuron's row group by the zonemaps."""
    def one(i: int, kind: int) -> str:
        at = f"layer = $l{i} AND neuron = $n{i} AND quadrant = $q{i}"
        if kind == 0:
            return f"SELECT {i} AS i, value FROM examples WHERE {at} AND hook = $h{i} AND rank = $r{i}"
        place = f"kind = {kind - 1} AND interval * $n_per_interval + rank = $r{i}" if kind == 2 else \
            f"kind = {kind - 1} AND rank = $r{i}"
        return f"SELECT {i}, act * x_in FROM samples WHERE {at} AND {place}"
    return " UNION ALL ".join(one(i, kind) for i, kind in enumerate(kinds))


# A neuron's related neurons (schema.sql, related), both directions and both vias.
RELATED = """
SELECT direction, via, rank, other_layer, other_neuron, score
FROM related
WHERE layer = $layer AND neuron = $neuron
ORDER BY direction, via, rank
"""


def related_between_sql(n: int) -> str:
    """The stored scores from each of n neurons ($l0, $n0 ... ) to any other of them.

    One lookup per neuron joined by UNION ALL, not one OR of n conditions:
    each branch is pruned to the neuron's row group by the zonemaps.
    """
    pairs = ", ".join(f"($l{i}, $n{i})" for i in range(n))
    branches = " UNION ALL ".join(
        f"SELECT layer, neuron, direction, via, other_layer, other_neuron, score FROM related "
        f"WHERE layer = $l{i} AND neuron = $n{i}" for i in range(n))
    return f"""
SELECT * FROM ({branches})
WHERE (other_layer, other_neuron) IN (SELECT * FROM (VALUES {pairs}))
ORDER BY layer, neuron, direction, via, abs(score) DESC
"""


def related_between(db, neurons: list[tuple[int, int]]) -> list[dict]:
    """What `related` holds between these neurons (for /compare): one dict per stored (A, B, direction, via).

    Only the top 16 per neuron, direction and via are recorded, so a pair
    missing here scored below every one of A's stored neighbours. Each
    connection appears once per direction it was kept in: A -> B downstream of
    A (row of A) and, if also in B's top 16, upstream of B (row of B).
    Keys: layer, neuron, other_layer, other_neuron, direction ("downstream" |
    "upstream"), via ("gate" | "in": the reading neuron's weights), score.
    """
    from gluscope.schema import RELATED_DIRECTIONS, RELATED_VIA

    unique = list(dict.fromkeys((int(l), int(n)) for l, n in neurons))
    if len(unique) < 2:
        return []
    params = {}
    for i, (layer, neuron) in enumerate(unique):
        params[f"l{i}"], params[f"n{i}"] = layer, neuron
    rows = db.query(related_between_sql(len(unique)), params)
    return [{"layer": r[0], "neuron": r[1], "direction": RELATED_DIRECTIONS[r[2]], "via": RELATED_VIA[r[3]],
             "other_layer": r[4], "other_neuron": r[5], "score": float(r[6])} for r in rows]


# One layer's neurons as the points of the §5.1 scatter: frequency of x_gate > 0 against cos(w_in, w_out).
def layer_scatter(moe: bool, stated: bool) -> str:
    relation, tokens = (NEURONS_WITH_EXPERTS, tokens_of()) if moe else ("neurons n", "$n_tokens")
    gate_pos = frequency(GATE_POS_SLUGS, tokens, stated)
    return f"""
SELECT n.neuron, {gate_pos} AS freq_gate_pos, cos_in_out,
       corr({gate_pos}, cos_in_out) OVER () AS r
FROM {with_imported(stated, relation, "layer = $layer")}
WHERE n.layer = $layer
ORDER BY n.neuron
"""


# --- the experts of a layer, and one expert ---------------------------------------

# The tokens each routed expert of layer $layer received most: per expert the first $n by count, by summed
# router weight and by share (tokens x top_k over the token's routed tokens in the layer, i.e. over its count in
# the corpus: schema.sql, expert_tokens), the last among tokens that occur at least $min_count times (a token
# seen once has a share of 1 at top_k experts). One pass over the layer's rows; read once per process and layer
# (data.layer_experts).
EXPERT_TOP_TOKENS = """
SELECT expert, token_id, tokens, weight_sum, share, occurrences, by_count, by_weight, by_share
FROM (
    SELECT *,
           row_number() OVER (PARTITION BY expert ORDER BY tokens DESC, token_id) AS by_count,
           row_number() OVER (PARTITION BY expert ORDER BY weight_sum DESC, token_id) AS by_weight,
           row_number() OVER (PARTITION BY expert ORDER BY occurrences >= $min_count DESC, share DESC,
                              tokens DESC, token_id) AS by_share
    FROM (
        SELECT expert, token_id, tokens, weight_sum,
               tokens * $top_k / sum(tokens) OVER (PARTITION BY token_id) AS share,
               sum(tokens) OVER (PARTITION BY token_id) / $top_k AS occurrences
        FROM expert_tokens
        WHERE layer = $layer
    )
)
WHERE by_count <= $n OR by_weight <= $n OR (by_share <= $n AND occurrences >= $min_count)
ORDER BY expert, token_id
"""

# One routed expert's examples: the texts where its router weight was largest (schema.sql, expert_examples).
EXPERT_EXAMPLES = """
SELECT rank, weight, text_id, position
FROM expert_examples
WHERE layer = $layer AND expert = $expert
ORDER BY rank
"""
