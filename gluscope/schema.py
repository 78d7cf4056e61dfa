"""Names and codes shared by the recorder and the server; the tables themselves are in schema.sql.

Both sides import these, and tests/test_schema.py checks them against the
code tables and columns that schema.sql creates, so a name is spelled once.
"""

from importlib import resources

SCHEMA_VERSION = 8  # 8: imports of the paper's layout: metadata imported_from, bos_counted, located_with, examples_located; imported_frequencies; texts.text; NULL counts, geometry and example positions. 7: layers, experts, expert_tokens, expert_examples, routed_values (mixture-of-experts). 6: metadata weights_fingerprint, tokenizer_fingerprint. 5: example_tokens keyed by one integer, without best_value. 4: density bins of two octaves; samples without hash. 3: histograms, density, intervals, samples, token_neurons, related; metadata sample_seed, n_random, n_per_interval, calibration_batches. 2: model_source, weights_file, weights_sha256, quantization, batch_size, corpus_fingerprint, shard_index, shard_count; texts.source

# Code order is the column order of the paper's Figure 1.
QUADRANTS: tuple[str, ...] = ("gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-")
QUADRANT_SLUGS: tuple[str, ...] = ("pp", "pn", "np", "nn")
# (sign of x_gate, sign of x_in) per quadrant code.
QUADRANT_SIGNS: tuple[tuple[int, int], ...] = ((1, 1), (1, -1), (-1, 1), (-1, -1))
# The sign of hook_post = act(x_gate) * x_in in each quadrant: every activation
# in ACT_FNS has the sign of its argument, so it is the product of the two signs.
POST_SIGNS: tuple[int, ...] = tuple(g * i for g, i in QUADRANT_SIGNS)
# neurons.count_pp ... count_nn, in quadrant code order.
COUNT_COLUMNS: tuple[str, ...] = tuple(f"count_{slug}" for slug in QUADRANT_SLUGS)
# The quadrants where x_gate > 0 and where x_in > 0, by slug: a neuron's frequency of x_gate > 0
# (freq_gate_pos, the x axis of the paper's §5.1 scatter) is the share of tokens in the first.
GATE_POS_SLUGS: tuple[str, ...] = tuple(s for s, (g, _) in zip(QUADRANT_SLUGS, QUADRANT_SIGNS) if g > 0)
IN_POS_SLUGS: tuple[str, ...] = tuple(s for s, (_, i) in zip(QUADRANT_SLUGS, QUADRANT_SIGNS) if i > 0)

# TransformerLens's hook names (blocks.L.mlp.hook_post ...), and `act`, which is
# no hook: act_fn(x_gate), the gate's activation, before it multiplies x_in.
HOOKS: tuple[str, ...] = ("hook_post", "hook_pre_linear", "hook_pre", "act")

# Hooks with a histogram (histograms.hook): `act` has none, it follows x_gate.
HISTOGRAM_HOOKS: tuple[str, ...] = ("hook_post", "hook_pre_linear", "hook_pre")

# samples.kind codes.
SAMPLE_KINDS: tuple[str, ...] = ("random", "interval")
# samples.kind and the examples endpoint's kind=: `top` is the examples table.
EXAMPLE_KINDS: tuple[str, ...] = ("top", *SAMPLE_KINDS)

# example_tokens.role codes: the token of interest itself, or the token right after it.
EXAMPLE_ROLES: tuple[str, ...] = ("focus", "next")
# example_tokens' list sources (schema.sql, example_list): a top list's hook code, then SAMPLE_SOURCE +
# samples.kind for a sampled list; schema.sql's key macros count EXAMPLE_SOURCES of them (tests/test_schema.py).
SAMPLE_SOURCE = len(HOOKS)
EXAMPLE_SOURCES = SAMPLE_SOURCE + len(SAMPLE_KINDS)

# related.direction and related.via codes.
RELATED_DIRECTIONS: tuple[str, ...] = ("downstream", "upstream")
RELATED_VIA: tuple[str, ...] = ("gate", "in")

# weight_tokens.kind codes (schema.sql, weight_kinds).
WEIGHT_KINDS: tuple[str, ...] = ("out+", "out-", "gate+", "gate-", "in+", "in-")

# The weight geometry columns of `neurons` (after the weight convention), in column order, and how pages and
# the API documentation write each.
GEOMETRY_LABELS: dict[str, str] = {
    "cos_gate_in": "cos(w_gate, w_in)", "cos_gate_out": "cos(w_gate, w_out)", "cos_in_out": "cos(w_in, w_out)",
    "norm_gate": "‖w_gate‖", "norm_in": "‖w_in‖", "norm_out": "‖w_out‖",
}
GEOMETRY: tuple[str, ...] = tuple(GEOMETRY_LABELS)

# The activation names a config may give (metadata.act_fn) -> the function
# they stand for. The recorder computes these with torch, the server with
# NumPy; neither accepts a name outside this table.
ACT_FNS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",                    # exact, with erf
    "gelu_pytorch_tanh": "gelu_tanh",  # the tanh approximation
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",        # x·σ(QUICK_GELU_ALPHA x): gpt-oss's experts (recorder/experts.py)
}
QUICK_GELU_ALPHA = 1.702


def schema_sql() -> str:
    """The DDL that creates an empty GLUScope database."""
    return resources.files("gluscope").joinpath("schema.sql").read_text()
