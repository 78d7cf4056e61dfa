"""Write a synthetic GLUScope database of a real model's shape, through the recorder's own writer.

    python benchmarks/make_synthetic_db.py --out data/synthetic.duckdb            # OLMo-7B-0424 shape
    python benchmarks/make_synthetic_db.py --out /tmp/tiny.duckdb --layers 2 --d-mlp 64 --texts 50
    python benchmarks/make_synthetic_db.py --out data/moe.duckdb --layers 16 --experts 64 --expert-neurons 1024
                                                                                  # OLMoE-1B-7B shape

A mixture-of-experts shape numbers each layer's neurons expert after expert
(schema.sql, experts); each expert's neurons see only the tokens routed to it
(top-k of the experts per token), their windows hold NaN at the neighbours
routed elsewhere, and the router's tables (layers, experts, expert_tokens,
expert_examples, routed_values) are filled through the writer too.

The statistics are random but consistent with each other, so the server shows
what it would show for a recorded model: every example's value is the value
its window holds at the token of interest (act and hook_post derived from
x_gate and x_in as the server derives them), the lists of one quadrant overlap
the way real top-k lists do (act and hook_pre rank alike where x_gate > 0),
min/max/mean agree with the examples, and a few quadrants never occur.
Text 0 holds a planted `<script>` token, and the first example of layer 0,
neuron 0 sits on it, so the page that must escape it is easy to find.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from gluscope.recorder import rules
from gluscope.recorder.writer import (EXAMPLE_TOKENS, EXAMPLE_TOKENS_MEMORY, DatabaseWriter, LayerResult, insert,
                                      related_table, token_neurons_table)
from gluscope.schema import GEOMETRY, QUADRANT_SIGNS, SCHEMA_VERSION
from gluscope.server.activations import activation

SIGNS = np.array(QUADRANT_SIGNS, dtype=np.float32)  # (gate, in) per quadrant code
PLANTED = ["Hello", ",", " world", "\n", "<script>", "alert", "(1)", "</script>", "\n\n", "\t", "done", "."]


def make_vocab(size: int, rng: np.random.Generator) -> tuple[list[str], list[bytes]]:
    """Printable made-up tokens, whitespace and markup included; id 0 is the BOS/EOS token."""
    special = ["<|endoftext|>", " ", "\n", "\n\n", "\t", "  ", " the", " of", "ing", "&amp;", '"', "é", "日本",
               "\u00a0", "🙂"] + PLANTED
    tokens = list(dict.fromkeys(special))
    seen = set(tokens)
    consonants, vowels = list("bcdfghklmnprstvwz"), list("aeiouy")
    while len(tokens) < size:
        n = int(rng.integers(1, 4))
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(n))
        word = (" " if rng.random() < 0.6 else "") + (word.capitalize() if rng.random() < 0.1 else word)
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    tokens = tokens[:size]
    token_bytes = [t.encode() if i else b"" for i, t in enumerate(tokens)]  # BOS contributes no text
    return tokens, token_bytes


def make_texts(n_texts: int, max_length: int, vocab: list[str], rng: np.random.Generator):
    """Token id arrays (BOS first); a fifth of them truncated at max_length, like a real corpus."""
    lengths = np.where(rng.random(n_texts) < 0.2, max_length,
                       rng.integers(min(8, max_length), max(9, max_length * 9 // 16), n_texts))
    lengths = np.clip(lengths, 2, max_length).astype(np.int64)
    flat = rng.integers(1, len(vocab), int(lengths.sum()), dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat[offsets[:-1]] = 0  # BOS
    planted = [0] + [vocab.index(t) for t in PLANTED]
    m = min(len(planted), int(lengths[0]))
    flat[:m] = planted[:m]
    return np.split(flat, offsets[1:-1]), lengths


def make_layer(layer: int, n: int, k: int, n_candidates: int, lengths: np.ndarray, n_tokens: int,
               window_before: int, window_after: int, refactor_glu: bool, rng: np.random.Generator,
               vocab_size: int = 50280, routed: float = 1.0, plant: bool | None = None) -> LayerResult:
    """Random statistics for one layer: per (quadrant, neuron), candidate tokens from which each list takes its top k.

    An expert's neurons (routed < 1, the share of tokens routed to the expert) see n_tokens tokens, and their
    windows hold NaN where a neighbour was not routed to the expert, as schema.sql says. plant: put the planted
    <script> example at neuron 0 (default: in layer 0).
    """
    plant = layer == 0 if plant is None else plant
    n_texts = len(lengths)
    c = min(n_candidates, n_texts)
    k_eff = min(k, c)
    W = window_before + window_after + 1

    # Candidate tokens, distinct texts within each (quadrant, neuron).
    step = n_texts // c
    text = (rng.integers(0, step, (4, n, c)) + np.arange(c) * step).astype(np.int64)
    L = lengths[text]
    pos = 1 + (rng.random((4, n, c)) * (L - 1)).astype(np.int64)
    if plant and n:  # the planted <script> token: neuron 0's strongest gate+_in+ example
        text[0, 0, 0] = 0
        pos[0, 0, 0] = min(PLANTED.index("<script>") + 1, int(lengths[0]) - 1)
    start = np.maximum(pos - window_before, 0)
    wlen = np.minimum(pos + window_after, L - 1) - start + 1

    scale_g = rng.lognormal(0.0, 0.3, (1, n, 1)).astype(np.float32)
    scale_i = rng.lognormal(0.0, 0.3, (1, n, 1)).astype(np.float32)
    gate = (rng.standard_normal((4, n, c, W), dtype=np.float32) * scale_g[..., None]).astype(np.float16)
    inn = (rng.standard_normal((4, n, c, W), dtype=np.float32) * scale_i[..., None]).astype(np.float16)
    if routed < 1:  # an expert's window: NaN at the neighbours routed elsewhere (the token itself is set below)
        away = rng.random(gate.shape, dtype=np.float32) >= routed
        gate[away] = inn[away] = np.float16(np.nan)
        del away
    focal_g = (SIGNS[:, 0, None, None] * (0.5 + rng.exponential(1.5, (4, n, c)).astype(np.float32)) * scale_g)
    focal_i = (SIGNS[:, 1, None, None] * (0.5 + rng.exponential(1.5, (4, n, c)).astype(np.float32)) * scale_i)
    if plant and n:
        focal_g[0, 0, 0], focal_i[0, 0, 0] = 1.5 * focal_g[0, 0].max(), 1.5 * focal_i[0, 0].max()
    focal_g, focal_i = focal_g.astype(np.float16), focal_i.astype(np.float16)
    off = (pos - start)[..., None]
    np.put_along_axis(gate, off, focal_g[..., None], axis=3)
    np.put_along_axis(inn, off, focal_i[..., None], axis=3)

    xg, xi = focal_g.astype(np.float32), focal_i.astype(np.float32)
    act = activation("silu")(xg)
    values = np.stack([act * xi, xi, xg, act], axis=1)  # [q, h, n, c] in hook code order
    order = np.argsort(-np.abs(values), axis=-1, kind="stable")[..., :k_eff]

    def pick(a: np.ndarray) -> np.ndarray:  # [q, n, c, ...] -> [q, h, n, k, ...]
        a = a[:, None]
        idx = order.reshape(order.shape + (1,) * (a.ndim - 4))
        return np.take_along_axis(a, idx, axis=3)

    def pad(a: np.ndarray, fill) -> np.ndarray:
        if k_eff == k:
            return a
        out = np.full(a.shape[:3] + (k,) + a.shape[4:], fill, a.dtype)
        out[:, :, :, :k_eff] = a
        return out

    example_value = pad(np.take_along_axis(values, order, axis=-1), 0)
    example_text = pad(pick(text).astype(np.int32), -1)

    counts = np.floor(rng.dirichlet(np.ones(4), n).T * n_tokens).astype(np.int64)
    counts = np.maximum(counts, c)
    empty = rng.random((4, n)) < 0.02
    empty[:, 0] = False
    counts[empty] = 0
    example_text[empty[:, None, :, None].repeat(4, 1).repeat(k, 3)] = -1

    top = example_value[..., 0]
    near_zero = top * rng.uniform(0.0, 0.01, top.shape).astype(np.float32)
    value_min = np.minimum(top, near_zero)
    value_max = np.maximum(top, near_zero)
    value_mean = (top * rng.uniform(0.05, 0.3, top.shape)).astype(np.float64)
    for a in (value_min, value_max, value_mean):
        a[np.broadcast_to(empty[:, None, :], a.shape)] = np.nan

    distributions = make_distributions(counts, lengths, window_before, window_after, rng, routed)

    geometry = {
        "cos_gate_in": rng.uniform(0.0 if refactor_glu else -1.0, 1.0, n),
        "cos_gate_out": rng.uniform(-0.3, 0.3, n),
        "cos_in_out": rng.uniform(-0.5, 0.5, n),
        **{f"norm_{w}": rng.lognormal(0.0, 0.2, n) for w in ("gate", "in", "out")},
    }
    return LayerResult(
        counts=counts, value_min=value_min, value_max=value_max, value_mean=value_mean,
        example_value=example_value, example_text=example_text,
        example_pos=pad(pick(pos).astype(np.int16), 0),
        window_start=pad(pick(start).astype(np.int16), 0),
        window_len=pad(pick(wlen).astype(np.int16), 0),
        window_gate=pad(pick(gate), 0), window_in=pad(pick(inn), 0),
        **distributions,
        geometry={name: geometry[name].astype(np.float32) for name in GEOMETRY},
        flipped=rng.random(n) < 0.5,
        # Weight tokens: 10 per kind, scores sorted as the recorder stores them.
        token_ids=rng.integers(0, vocab_size, (6, n, 10), dtype=np.int32),
        token_scores=(np.sort(rng.random((6, n, 10), dtype=np.float32), axis=-1)[..., ::-1]
                      * np.array([1, -1, 1, -1, 1, -1], np.float32).reshape(6, 1, 1)),
    )


def write_finding_tables(con, n_layers: int, d_mlp: int, vocab_size: int, rng: np.random.Generator) -> None:
    """The tables that find neurons at the file's shape: token_neurons (32 random neurons per token
    and kind, scores sorted as recorded), related (16 per neuron, direction and via, in other layers) and the
    examples' token index, built by the recorder's own SQL from the file's examples and texts."""
    top = 32
    ids = rng.integers(0, n_layers * d_mlp, (6, vocab_size, top))
    scores = np.sort(rng.random((6, vocab_size, top), dtype=np.float32), axis=-1)[..., ::-1]
    scores *= np.array([1, -1, 1, -1, 1, -1], np.float32).reshape(6, 1, 1)
    insert(con, "token_neurons", token_neurons_table((ids // d_mlp).astype(np.int16), (ids % d_mlp).astype(np.int32),
                                                     scores))
    del ids, scores
    for layer in range(n_layers):  # one layer's rows at a time: 32 layers at once would hold 1.4 GB of arrays
        shape = (1, 2, 2, d_mlp, 16)
        other_layer = np.full(shape, -1, np.int16)
        if layer + 1 < n_layers:  # downstream: later layers
            other_layer[:, 0] = rng.integers(layer + 1, n_layers, other_layer[:, 0].shape)
        if layer > 0:             # upstream: earlier layers
            other_layer[:, 1] = rng.integers(0, layer, other_layer[:, 1].shape)
        score = (np.sort(rng.random(shape, dtype=np.float32), axis=-1)[..., ::-1]
                 * rng.choice(np.array([-1, 1], np.float32), shape))
        table = related_table(other_layer, rng.integers(0, d_mlp, shape).astype(np.int32), score)
        # related_table numbers the layers of its arrays from 0: these rows are layer `layer`'s.
        at = table.schema.get_field_index("layer")
        insert(con, "related", table.set_column(at, "layer", pa.array(np.full(table.num_rows, layer, np.int16))))
    con.execute(f"SET memory_limit = '{EXAMPLE_TOKENS_MEMORY}'")  # as the recorder builds it (writer.py)
    con.execute(EXAMPLE_TOKENS)


def add_finding_tables(path: Path, seed: int = 0) -> None:
    """write_finding_tables into an existing synthetic file (written by main without them, e.g. by another
    checkout), so the growth they cost is measured on the same file."""
    import duckdb

    from gluscope.schema import schema_sql
    con = duckdb.connect(str(path))
    tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    for ddl in schema_sql().split(";"):
        name = ddl.split("CREATE TABLE", 1)[1].split("(", 1)[0].strip() if "CREATE TABLE" in ddl else None
        if name and name not in tables:
            con.execute(ddl)
    for table in ("token_neurons", "related", "example_tokens"):
        con.execute(f"DELETE FROM {table}")
    ((n_layers, d_mlp, vocab_size),) = con.execute("SELECT n_layers, d_mlp, vocab_size FROM metadata").fetchall()
    write_finding_tables(con, n_layers, d_mlp, vocab_size, np.random.default_rng([seed, 12]))
    con.execute("CHECKPOINT")
    con.close()


# --- mixture-of-experts layers ---------------------------------------------------------------

# Per token, how its routing spreads over the experts: Dirichlet(ROUTING_CONCENTRATION) preferences, so a token
# goes mostly to a few experts (as real routers send a token id to a few favourites) but, over its hundreds of
# occurrences, reaches most of them. expert_tokens gets a row per (expert, token) that occurred.
ROUTING_CONCENTRATION = 0.5


def route_tokens(token_counts: np.ndarray, n_experts: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """[E, V] routed occurrences per (expert, token): each occurrence of token t goes to top_k distinct experts,
    expert e with probability q_te (<= 1, summing to top_k over e) from the token's preferences."""
    V = len(token_counts)
    p = rng.dirichlet(np.full(n_experts, ROUTING_CONCENTRATION), V)
    q = top_k * p
    for _ in range(8):  # water-filling: no expert takes a token more often than it occurs
        over = q > 1
        excess = (q - 1).clip(min=0).sum(1, keepdims=True)
        q = np.where(over, 1.0, q)
        room = np.where(over, 0.0, q)
        q = np.where(over, 1.0, q + excess * room / np.maximum(room.sum(1, keepdims=True), 1e-12))
    return rng.binomial(token_counts[:, None], np.clip(q, 0, 1)).T.astype(np.int64)


def router_weight_histogram(tokens: np.ndarray, n_experts: int, rng: np.random.Generator) -> np.ndarray:
    """[U, VALUE_BINS] counts of router weights on the 'value' bins, summing to each unit's tokens: softmax weights
    around 2^-3.5 for the routed experts (as OLMoE's top-8, not renormalised, are), 1 for a shared one."""
    import torch

    draws = rng.lognormal(np.log(0.09), 0.6, (len(tokens), 4096)).clip(max=1.0).astype(np.float32)
    draws[n_experts:] = 1.0
    bins = rules.value_bin(torch.from_numpy(draws)).numpy()
    hist = np.stack([np.bincount(b, minlength=rules.VALUE_BINS) for b in bins]).astype(np.float64)
    out = np.floor(hist / 4096 * tokens[:, None]).astype(np.int64)
    out[np.arange(len(tokens)), hist.argmax(1)] += tokens - out.sum(1)
    return out


def write_moe_layer(w: DatabaseWriter, layer: int, args: argparse.Namespace, lengths: np.ndarray, own: np.ndarray,
                    n_tokens: int, token_counts: np.ndarray, rng: np.random.Generator) -> tuple:
    """One mixture-of-experts layer through the writer: each routed expert's neurons (written one expert at a time,
    each seeing only its routed tokens), the shared expert's, and the router's tables. lengths: the texts of this
    file (own: their ids). Returns the layer's row of `layers`."""
    from gluscope.recorder.routing import RouterResult

    E, d, top_k, shared = args.experts, args.expert_neurons, args.top_k, args.shared_neurons
    routed = route_tokens(token_counts, E, top_k, rng)                  # [E, V]
    tokens = np.concatenate([routed.sum(1), [n_tokens] if shared else []]).astype(np.int64)
    units = [(e, False, e * d, d) for e in range(E)] + ([(E, True, E * d, shared)] if shared else [])
    n = E * d + shared
    value_min, value_max = np.full((n, 4), np.nan, np.float32), np.full((n, 4), np.nan, np.float32)
    value_sum, value_count = np.zeros((n, 4)), np.zeros((n, 4), np.int64)
    for (expert, is_shared, first, width), unit_tokens in zip(units, tokens):
        r = make_layer(layer, width, args.k, args.candidates, lengths, int(unit_tokens), args.window_before,
                       args.window_after, True, rng, args.vocab_size,
                       routed=1.0 if is_shared else top_k / E, plant=layer == 0 and first == 0)
        # Router weight * hook_post over each quadrant's tokens: hook_post's own statistics times a typical weight.
        weight = np.ones(width, np.float32) if is_shared else rng.lognormal(np.log(0.09), 0.3, width).astype(np.float32)
        span = slice(first, first + width)
        value_min[span] = (r.value_min[:, 0] * weight).T
        value_max[span] = (r.value_max[:, 0] * weight).T
        value_count[span] = r.counts.T
        value_sum[span] = np.nan_to_num(r.value_mean[:, 0] * weight).T * r.counts.T
        r.example_text = np.where(r.example_text >= 0, own[np.maximum(r.example_text, 0)], -1).astype(np.int32)
        r.sample_text = np.where(r.sample_text >= 0, own[np.maximum(r.sample_text, 0)], -1).astype(np.int32)
        w.write_layer(layer, r, first_neuron=first)
        del r
    texts = np.stack([rng.choice(len(lengths), args.k, replace=False) for _ in range(E)])
    w.write_experts(layer, units, RouterResult(
        tokens=tokens,
        weight_sum=tokens * np.concatenate([rng.uniform(0.08, 0.12, E), [1.0] if shared else []]),
        weight_hist=router_weight_histogram(tokens, E, rng),
        token_counts=routed,
        token_weights=routed * rng.lognormal(np.log(0.09), 0.3, routed.shape),
        top_weight=np.sort(rng.uniform(0.3, 0.9, (E, args.k)).astype(np.float32), 1)[:, ::-1],
        top_text=own[texts],
        top_pos=(1 + rng.random((E, args.k)) * (lengths[texts] - 1)).astype(np.int64),
        value_min=value_min, value_max=value_max, value_sum=value_sum, value_count=value_count))
    return (layer, n, E, top_k, f"synthetic: softmax over {E} experts, top {top_k}",
            float(tokens[:E].max() / tokens[:E].mean()))


def _bump(shape: tuple[int, ...], offsets: np.ndarray, sigma: float, counts: np.ndarray) -> np.ndarray:
    """counts [...] spread over len(offsets) bins as a discretised normal: [..., len(offsets)] int64 summing to counts."""
    w = np.exp(-offsets.astype(np.float64) ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    out = np.floor(counts[..., None] * w).astype(np.int64)
    out[..., len(offsets) // 2] += counts - out.sum(-1)
    return out


def make_distributions(counts: np.ndarray, lengths: np.ndarray, window_before: int, window_after: int,
                       rng: np.random.Generator, routed: float = 1.0) -> dict[str, np.ndarray]:
    """Histograms, density, interval bounds and samples shaped like a real recording's (rules.py's bins).

    Per (neuron, quadrant, hook) the values span about 14 octaves around a random centre, as hooked
    activations over millions of tokens do, so about 29 'value' bins and 9 x 9 'density' cells per quadrant
    hold a count; every filled quadrant has all 24 samples.
    """
    n = counts.shape[1]
    mid_v, mid_d = rules.VALUE_MAG_BINS, rules.DENSITY_MAG_BINS
    per_q = counts.T  # [n, 4]
    hist = np.zeros((n, 4, 3, rules.VALUE_BINS), np.int64)
    off = np.arange(-14, 15)
    centre = rng.integers(20, 38, (n, 4, 3))
    spread = _bump((n, 4, 3), off, 4.0, np.repeat(per_q[:, :, None], 3, 2))   # [n, 4, 3, 29]
    mag = np.clip(centre[..., None] + off, 0, mid_v - 1)
    sign = np.array([[rules.LIST_SIGNS[rules.list_index(q, h)] for h in rules.HIST_HOOKS] for q in range(4)])
    signed = np.where(sign[None, :, :, None] > 0, mid_v + mag, mid_v - 1 - mag)
    idx = np.indices(signed.shape)
    np.add.at(hist, (idx[0], idx[1], idx[2], signed), spread)

    # The same spread in octaves as the histograms (about 15 around a centre), on the density's wider bins.
    density = np.zeros((n, 2 * mid_d, 2 * mid_d), np.int64)
    per_bin = rules.DENSITY_OCTAVES_PER_BIN
    reach = -(-7 // per_bin)  # ceil(7 / per_bin) bins each side of the centre
    off_d = np.arange(-reach, reach + 1)
    gate_c, in_c = rng.integers(6 // per_bin, 16 // per_bin, (n, 4)), rng.integers(6 // per_bin, 16 // per_bin, (n, 4))
    g_w = _bump((n, 4), off_d, 2.5 / per_bin, per_q)                            # [n, 4, cells per axis]
    cells = np.floor(g_w[..., :, None] * _bump((n, 4), off_d, 2.5 / per_bin, np.full((n, 4), 10 ** 6))[..., None, :]
                     / 10 ** 6).astype(np.int64)                               # [n, 4, per axis, per axis]
    g_sign, i_sign = SIGNS[:, 0], SIGNS[:, 1]
    gm = np.clip(gate_c[..., None] + off_d, 0, mid_d - 1)
    im = np.clip(in_c[..., None] + off_d, 0, mid_d - 1)
    gb = np.where(g_sign[None, :, None] > 0, mid_d + gm, mid_d - 1 - gm)[..., :, None]
    ib = np.where(i_sign[None, :, None] > 0, mid_d + im, mid_d - 1 - im)[..., None, :]
    gb, ib = np.broadcast_arrays(gb, ib)
    np.add.at(density, (np.arange(n)[:, None, None, None], gb, ib), cells)

    edges = rules.value_magnitude_edges()
    b1 = rng.integers(20, 40, (n, 4))
    b2 = b1 + rng.integers(2, 5, (n, 4))
    b3 = b2 + rng.integers(2, 5, (n, 4))
    bounds = edges[np.stack([b1, b2, b3], -1)].astype(np.float32)

    S, W = rules.SAMPLE_SLOTS, window_before + window_after + 1
    n_texts = len(lengths)
    text = rng.integers(0, n_texts, (n, 4, S)).astype(np.int32)
    text[per_q == 0] = -1
    L = lengths[np.maximum(text, 0)]
    pos = (1 + rng.random((n, 4, S)) * (L - 1)).astype(np.int64)
    start = np.maximum(pos - window_before, 0)
    stop = np.minimum(pos + window_after + 1, L)
    hashes = np.sort(rng.integers(0, 2 ** 31, (n, 4, S)), -1)  # each list sorted: close enough for size
    xg = (SIGNS[None, :, 0, None] * rng.exponential(1.0, (n, 4, S))).astype(np.float32)
    xi = (SIGNS[None, :, 1, None] * rng.exponential(1.0, (n, 4, S))).astype(np.float32)
    win_g = rng.standard_normal((n, 4, S, W), dtype=np.float32).astype(np.float16)
    win_i = rng.standard_normal((n, 4, S, W), dtype=np.float32).astype(np.float16)
    if routed < 1:  # NaN where a neighbour was routed elsewhere, as in make_layer; the sampled token is routed
        away = (rng.random(win_g.shape, dtype=np.float32) >= routed) & (np.arange(W) != (pos - start)[..., None])
        win_g[away] = win_i[away] = np.float16(np.nan)
        del away
    # Both kinds keep the tokens of smallest hash, so an interval's list starts with the random examples that
    # fall in it (rules.py): about 7 of the 16 interval examples are random ones, whose windows the writer
    # stores once. Each random example lies in interval i with the calibration's share of tokens.
    share = np.array([0.5, 0.4, 0.09, 0.01])
    R, P = rules.N_RANDOM, rules.N_PER_INTERVAL
    label = rng.choice(len(share), (n, 4, R), p=share)
    for i in range(len(share)):
        inside = label == i
        order = np.cumsum(inside, -1) * inside  # 1, 2, ... for the random examples in interval i
        for j in range(P):
            has = order == j + 1                   # [n, 4, R]: the (j+1)-th such example, if any
            nq, qq, rr = np.nonzero(has)
            slot = R + i * P + j
            for a in (text, pos, hashes, xg, xi, win_g, win_i):
                a[nq, qq, slot] = a[nq, qq, rr]
    L = lengths[np.maximum(text, 0)]
    start = np.maximum(pos - window_before, 0)
    stop = np.minimum(pos + window_after + 1, L)
    return dict(
        histograms=hist, density=density, bounds=bounds,
        sample_hash=np.where(text >= 0, hashes, -1), sample_text=text, sample_pos=pos.astype(np.int16),
        sample_gate=xg, sample_in=xi, sample_act=activation("silu")(xg).astype(np.float32),
        sample_window_start=start.astype(np.int16), sample_window_len=(stop - start).astype(np.int16),
        sample_window_gate=win_g, sample_window_in=win_i,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--d-mlp", type=int, default=11008)
    p.add_argument("--texts", type=int, default=45734)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50280)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--candidates", type=int, default=40,
                   help="distinct tokens per (neuron, quadrant) the four lists choose from (default: 40)")
    p.add_argument("--window-before", type=int, default=24)
    p.add_argument("--window-after", type=int, default=2)
    p.add_argument("--experts", type=int, default=0,
                   help="routed experts per layer: a mixture-of-experts shape of --expert-neurons each, instead of "
                        "a dense MLP of --d-mlp (default: 0, dense)")
    p.add_argument("--expert-neurons", type=int, default=1024, help="neurons per routed expert (default: 1024)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token (default: 8)")
    p.add_argument("--shared-neurons", type=int, default=0,
                   help="neurons of a shared expert after the routed ones (default: 0, none)")
    p.add_argument("--model-name", default=None,
                   help="default: synthetic/OLMo-7B-0424-shape, or synthetic/OLMoE-1B-7B-0924-shape with --experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="write shard I of N of this corpus (texts I, I+N, ...), for `gluscope merge`")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--finding-only", action="store_true",
                   help="add the tables that find neurons (token_neurons, related, example_tokens) to the existing "
                        "--out file instead of writing a new one, and print the growth")
    args = p.parse_args(argv)
    if args.model_name is None:
        args.model_name = "synthetic/OLMoE-1B-7B-0924-shape" if args.experts else "synthetic/OLMo-7B-0424-shape"
    d_mlp = args.experts * args.expert_neurons + args.shared_neurons if args.experts else args.d_mlp
    if args.finding_only:
        t0, before = time.perf_counter(), args.out.stat().st_size
        add_finding_tables(args.out, args.seed)
        after = args.out.stat().st_size
        print(f"{args.out}: {before / 1e9:.2f} GB -> {after / 1e9:.2f} GB (+{(after - before) / 1e9:.2f} GB) "
              f"in {time.perf_counter() - t0:.0f} s")
        return

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    tokens, token_bytes = make_vocab(args.vocab_size, rng)
    texts, lengths = make_texts(args.texts, args.max_length, tokens, rng)
    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
    own = np.arange(args.texts) if shard is None else np.arange(shard[0], args.texts, shard[1])
    rng = np.random.default_rng([args.seed, *(shard or ())])  # each shard's statistics its own
    n_tokens = int((lengths[own] - 1).sum())
    meta = {
        "schema_version": SCHEMA_VERSION, "tool_version": "synthetic",
        "created_at": datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0),
        "model_name": args.model_name, "model_source": "synthetic", "model_revision": None,
        "weights_file": None, "weights_sha256": None, "quantization": None,
        "architecture": "OlmoeForCausalLM" if args.experts else "OlmoForCausalLM",
        "act_fn": "silu", "n_layers": args.layers, "d_model": 2048 if args.experts else 4096, "d_mlp": d_mlp,
        "vocab_size": args.vocab_size, "dtype": "float32", "dataset": "synthetic random tokens",
        "text_column": "text", "max_length": args.max_length, "bos_token_id": 0, "n_texts": len(own),
        "n_tokens": n_tokens, "batch_size": 1, "corpus_fingerprint": f"synthetic {args.seed} {args.texts}",
        "weights_fingerprint": "synthetic", "tokenizer_fingerprint": "synthetic",
        "layer_first": None, "layer_last": None, "expert_first": None, "expert_last": None,  # every layer and expert
        "shard_index": shard[0] if shard else None, "shard_count": shard[1] if shard else None, "k": args.k, "window_before": args.window_before,
        "window_after": args.window_after, "refactor_glu": True,
        "weight_convention": "w_in and w_out of each neuron are multiplied by sign(w_gate . w_in), "
                             "so cos(w_gate, w_in) >= 0; the model computes the same function.",
        "sample_seed": 0, "n_random": rules.N_RANDOM, "n_per_interval": rules.N_PER_INTERVAL,
        "calibration_batches": rules.CALIBRATION_BATCHES,
    }
    write_s = 0.0  # the writer's own time; making the random statistics is not part of a recording
    with DatabaseWriter(args.out, overwrite=args.overwrite) as w:
        w.write_metadata(meta)
        w.write_vocab(tokens, token_bytes)
        w.write_texts(own * 3, [texts[i] for i in own], text_ids=own)
        w.write_histogram_bins()
        layer_rows = []
        # Counted tokens per vocabulary entry, which the routers split among the experts.
        token_counts = np.bincount(np.concatenate([texts[i][1:] for i in own]), minlength=args.vocab_size)
        for layer in range(args.layers):
            t = time.perf_counter()
            if args.experts:  # made and written expert by expert, so the time is both
                layer_rows.append(write_moe_layer(w, layer, args, lengths[own], own, n_tokens, token_counts, rng))
                write_s += time.perf_counter() - t
                print(f"layer {layer} made and written in {time.perf_counter() - t:.1f} s", flush=True)
                continue
            r = make_layer(layer, args.d_mlp, args.k, args.candidates, lengths[own], n_tokens,
                           args.window_before, args.window_after, True, rng, args.vocab_size)
            r.example_text = np.where(r.example_text >= 0, own[np.maximum(r.example_text, 0)], -1).astype(np.int32)
            r.sample_text = np.where(r.sample_text >= 0, own[np.maximum(r.sample_text, 0)], -1).astype(np.int32)
            made = time.perf_counter()
            w.write_layer(layer, r)
            layer_rows.append((layer, d_mlp, 0, 0, None, None))
            write_s += time.perf_counter() - made
            print(f"layer {layer} made in {made - t:.1f} s, written in {time.perf_counter() - made:.1f} s", flush=True)
        w.write_layers(layer_rows)
        t = time.perf_counter()
        write_finding_tables(w.con, args.layers, d_mlp, args.vocab_size, np.random.default_rng([args.seed, 12]))
        write_s += time.perf_counter() - t
        print(f"token_neurons, related and example_tokens written in {time.perf_counter() - t:.1f} s", flush=True)
    size = args.out.stat().st_size
    con = duckdb.connect(str(args.out), read_only=True)
    for table, in con.execute("SELECT DISTINCT table_name FROM duckdb_tables() ORDER BY ALL").fetchall():
        rows = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
        print(f"  {table:16s} {rows:>13,d} rows")
    con.close()
    shape = f"{d_mlp}"
    if args.experts:
        shared = f" + {args.shared_neurons} shared" if args.shared_neurons else ""
        shape = f"{args.experts} experts x {args.expert_neurons}{shared} = {d_mlp}"
    print(f"{args.out}: {size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s, of which writing layers {write_s:.0f} s "
          f"({args.layers} layers x {shape} neurons, {args.texts} texts, {n_tokens} tokens; "
          f"{size / (args.layers * d_mlp):,.0f} bytes per neuron)")


if __name__ == "__main__":
    main()
