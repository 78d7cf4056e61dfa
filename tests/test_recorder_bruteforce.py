"""The recorder's database against an independent brute-force computation.

The reference runs the plain Hugging Face model (no TransformerLens, no
batching, no padding) one text at a time, captures x_gate and x_in with
forward hooks on the projections, and walks every token of a few neurons in
Python. Texts start with distinct first tokens, so no two texts share a
context and exact ties between texts cannot arise.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gluscope.schema import HOOKS, QUADRANTS

from . import recordings
from .brute_force import DENSITY_CELLS, HISTOGRAM_CELLS, require_kernel, sample_hash

pytestmark = pytest.mark.integration

MAX_LENGTH = 40
NEURONS = (0, 7, 50, 95)
ARCHS = ("llama", "gemma", "phi3")


@pytest.fixture(scope="module")
def distinct_corpus() -> Path:
    return recordings.corpus("distinct")


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request) -> tuple[str, Path]:
    return request.param, recordings.model(request.param)


def _silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def _gelu_tanh(x: float) -> float:
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _mlp_modules(model):
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):
            d = mlp.gate_up_proj.weight.shape[0] // 2
            w = mlp.gate_up_proj.weight
            yield mlp, "fused", w[:d], w[d:], mlp.down_proj.weight
        else:
            yield mlp, "split", mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def brute_force(model_dir: Path, texts: list[np.ndarray], refactor: bool, k: int = 16):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    act_name = getattr(model.config, "hidden_activation", None) or model.config.hidden_act
    act = _gelu_tanh if "tanh" in act_name else _silu
    mods = list(_mlp_modules(model))
    signs = []
    for _, _, wg, wi, _ in mods:
        dots = (wg.double() * wi.double()).sum(1)
        signs.append(torch.where(dots < 0, -1.0, 1.0) if refactor else torch.ones_like(dots))

    captured: dict = {}

    def hook_for(layer, kind, which):
        def hook(module, inputs, output):
            if kind == "fused":
                d = output.shape[-1] // 2
                captured[(layer, "g")] = output[0, :, :d].detach()
                captured[(layer, "u")] = output[0, :, d:].detach()
            else:
                captured[(layer, which)] = output[0].detach()
        return hook

    handles = []
    for layer, (mlp, kind, *_rest) in enumerate(mods):
        if kind == "fused":
            handles.append(mlp.gate_up_proj.register_forward_hook(hook_for(layer, kind, None)))
        else:
            handles.append(mlp.gate_proj.register_forward_hook(hook_for(layer, kind, "g")))
            handles.append(mlp.up_proj.register_forward_hook(hook_for(layer, kind, "u")))

    n_layers = len(mods)
    acts = {}    # (layer, text_id) -> (g, u) as float32 numpy [T, d_mlp]
    with torch.no_grad():
        for text_id, ids in enumerate(texts):
            model(torch.from_numpy(np.asarray(ids, dtype=np.int64))[None])
            for layer in range(n_layers):
                g = captured[(layer, "g")].numpy()
                u = (captured[(layer, "u")] * signs[layer].float()).numpy()
                acts[(layer, text_id)] = (g, u)
    for handle in handles:
        handle.remove()
    stats, tops, per_text = statistics_of(acts, texts, {layer: NEURONS for layer in range(n_layers)}, act, k)
    return stats, tops, per_text, acts, n_layers


def statistics_of(acts: dict, texts: list[np.ndarray], neurons: dict[int, tuple[int, ...]], act, k: int):
    """Per (layer, neuron, quadrant, hook): count, sum, min and max; the top-k texts; every text's best token.

    acts[(layer, text_id)] = (x_gate, x_in after the convention) [T, n]; NaN marks a token the neuron never saw
    (an expert's token routed elsewhere). Walks every token in Python.
    """
    stats = {}   # (layer, neuron, q, h) -> dict
    per_text = {}  # (layer, neuron, q, h) -> list of (|v|, text_id, pos, v)
    for text_id, ids in enumerate(texts):
        for layer, chosen in neurons.items():
            g, u = acts[(layer, text_id)]
            for neuron in chosen:
                best = {}
                for pos in range(1, len(ids)):
                    x_g, x_i = float(g[pos, neuron]), float(u[pos, neuron])
                    if x_g == 0 or x_i == 0 or math.isnan(x_g):
                        continue
                    q = (0 if x_i > 0 else 1) if x_g > 0 else (2 if x_i > 0 else 3)
                    a = act(x_g)
                    values = {"hook_post": a * x_i, "hook_pre_linear": x_i, "hook_pre": x_g, "act": a}
                    for h, v in values.items():
                        s = stats.setdefault((layer, neuron, q, h), {"n": 0, "sum": 0.0, "min": math.inf, "max": -math.inf})
                        s["n"] += 1
                        s["sum"] += v
                        s["min"] = min(s["min"], v)
                        s["max"] = max(s["max"], v)
                        if v != 0 and abs(v) > best.get((q, h), (0.0,))[0]:
                            best[(q, h)] = (abs(v), pos, v)
                for (q, h), (mag, pos, v) in best.items():
                    per_text.setdefault((layer, neuron, q, h), []).append((mag, text_id, pos, v))
    tops = {key: sorted(cands, key=lambda c: (-c[0], c[1]))[:k] for key, cands in per_text.items()}
    return stats, tops, per_text


TIE = 1e-5


def _assert_same_top(examples, want, candidates, where) -> None:
    """Identical (text_id, position) in identical order, except among values equal within TIE.

    Float rounding decides between such near-ties (swish has a flat minimum
    near x = -1.28, so act in gate- quadrants has many), and a batched and an
    unbatched forward pass round differently.
    """
    assert len(examples) == len(want), where
    for e, c in zip(examples, want):
        assert abs(e[1]) == pytest.approx(c[0], abs=TIE, rel=TIE), where
        tied = [t for t in candidates if abs(t[0] - c[0]) <= TIE * max(1.0, c[0])]
        if len(tied) == 1:
            assert (e[2], e[3]) == (c[1], c[2]), where
        else:
            assert e[2] in {t[1] for t in tied}, where


def _record(model_dir: Path, corpus: Path, refactor: bool, reducer: str) -> Path:
    return recordings.record(model_dir, corpus, "--max-length", str(MAX_LENGTH), "--batch-size", "5",
                             "--reducer", reducer, *([] if refactor else ["--no-refactor-glu"]))


def _f16(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.int16).view(np.float16).astype(np.float32)


# Both reducers: the C++ kernel the CPU uses and the tensor code GPUs use.
@pytest.mark.parametrize("reducer", ["kernel", "torch"])
@pytest.mark.parametrize("refactor", [True, False], ids=["refactor_glu", "raw_weights"])
def test_database_matches_brute_force(arch_model, distinct_corpus, refactor, reducer):
    if reducer == "kernel":
        require_kernel()
    arch, model_dir = arch_model
    out = _record(model_dir, distinct_corpus, refactor, reducer)
    con = duckdb.connect(str(out), read_only=True)
    meta = con.execute("SELECT n_texts, n_tokens, refactor_glu, k, window_before, window_after FROM metadata").fetchone()
    n_texts, n_tokens, refactor_flag, k, before, after = meta
    assert refactor_flag is refactor

    # Texts: BOS first, truncated, in the seeded shuffle order, source rows kept.
    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = [json.loads(line)["text"] for line in distinct_corpus.read_text().splitlines()]
    order = np.random.default_rng(0).permutation(len(raw))
    rows = con.execute("SELECT text_id, source_index, token_ids FROM texts ORDER BY text_id").fetchall()
    assert [r[0] for r in rows] == list(range(n_texts)) and n_texts == len(raw)
    texts = []
    for (text_id, source, ids), src in zip(rows, order):
        assert source == src
        expected = [tok.bos_token_id] + tok(raw[src], add_special_tokens=False)["input_ids"][:MAX_LENGTH - 1]
        assert ids == expected
        texts.append(np.array(ids))
    assert n_tokens == sum(len(t) - 1 for t in texts)

    stats, tops, cands, acts, n_layers = brute_force(model_dir, texts, refactor, k)
    _check_distributions(con, model_dir, texts, acts, n_layers)
    check_neurons(con, stats, tops, cands, acts, texts, {layer: NEURONS for layer in range(n_layers)}, arch)

    _check_weight_tokens(con, model_dir, refactor)

    # The weight convention: after refactor_glu every cos(w_gate, w_in) >= 0.
    cos_min = con.execute("SELECT min(cos_gate_in) FROM neurons").fetchone()[0]
    flipped = con.execute("SELECT count(*) FILTER (WHERE flipped) FROM neurons").fetchone()[0]
    if refactor:
        assert cos_min >= 0 and flipped > 0
    else:
        assert cos_min < 0 and flipped == 0
    con.close()


def check_neurons(con, stats: dict, tops: dict, cands: dict, acts: dict, texts: list[np.ndarray],
                  neurons: dict[int, tuple[int, ...]], where) -> None:
    """Counts, value_stats, the top examples and their windows of `neurons` against statistics_of's."""
    before, after = con.execute("SELECT window_before, window_after FROM metadata").fetchone()
    for layer, chosen in neurons.items():
        for neuron in chosen:
            counts = con.execute("SELECT count_pp, count_pn, count_np, count_nn FROM neurons WHERE layer=? AND neuron=?",
                                 [layer, neuron]).fetchone()
            for q in range(4):
                expected_n = stats.get((layer, neuron, q, "hook_pre"), {"n": 0})["n"]
                assert counts[q] == expected_n, (where, layer, neuron, QUADRANTS[q])
                for h_code, h in enumerate(HOOKS):
                    got = con.execute("SELECT min, max, mean FROM value_stats WHERE layer=? AND neuron=? AND quadrant=? AND hook=?",
                                      [layer, neuron, q, h_code]).fetchone()
                    s = stats.get((layer, neuron, q, h))
                    if s is None:
                        assert got == (None, None, None)
                        continue
                    assert got[0] == pytest.approx(s["min"], abs=1e-5, rel=1e-5)
                    assert got[1] == pytest.approx(s["max"], abs=1e-5, rel=1e-5)
                    assert got[2] == pytest.approx(s["sum"] / s["n"], abs=1e-5, rel=1e-5)

                    examples = con.execute(
                        "SELECT e.rank, e.value, e.text_id, e.position, w.window_start, w.x_gate, w.x_in "
                        "FROM examples e JOIN windows w USING (layer, neuron, text_id, position) "
                        "WHERE e.layer=? AND e.neuron=? AND e.quadrant=? AND e.hook=? ORDER BY e.rank",
                        [layer, neuron, q, h_code]).fetchall()
                    want = tops.get((layer, neuron, q, h), [])
                    _assert_same_top(examples, want, cands.get((layer, neuron, q, h), []), (where, layer, neuron, q, h))
                    for e, c in zip(examples, want):
                        text_id, pos, start = e[2], e[3], e[4]
                        assert start == max(0, pos - before)
                        end = min(pos + after + 1, len(texts[text_id]))
                        g, u = acts[(layer, text_id)]
                        np.testing.assert_allclose(_f16(e[5]), g[start:end, neuron], rtol=2e-3, atol=2e-3)
                        np.testing.assert_allclose(_f16(e[6]), u[start:end, neuron], rtol=2e-3, atol=2e-3)


def _check_weight_tokens(con, model_dir: Path, refactor: bool) -> None:
    """weight_tokens against the plain HF embedding and unembedding matrices."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    check_weight_tokens(con, model, {layer: (wg, wi, wo, NEURONS) for layer, (_, _, wg, wi, wo)
                                     in enumerate(_mlp_modules(model))}, refactor)


def check_weight_tokens(con, model, weights: dict, refactor: bool) -> None:
    """weight_tokens of chosen neurons: weights[layer] = (w_gate [n, d], w_in [n, d], w_out [d, n], neurons)."""
    W_E = model.get_input_embeddings().weight.detach().double()      # [vocab, d]
    W_U = model.get_output_embeddings().weight.detach().double()     # [vocab, d]
    for layer, (wg, wi, wo, neurons) in weights.items():
        for neuron in neurons:
            g, i, o = (w.detach().double() for w in (wg[neuron], wi[neuron], wo[:, neuron]))
            s = -1.0 if refactor and float(g @ i) < 0 else 1.0
            expected = {0: W_U @ (s * o), 2: W_E @ g, 4: W_E @ (s * i)}
            rows = con.execute("SELECT kind, token_id, score FROM weight_tokens WHERE layer=? AND neuron=? "
                               "ORDER BY kind, rank", [layer, neuron]).fetchall()
            for kind, scores in expected.items():
                for offset, largest in ((0, True), (1, False)):
                    got = [(t, sc) for k, t, sc in rows if k == kind + offset]
                    want = scores.topk(len(got), largest=largest)
                    assert [t for t, _ in got] == want.indices.tolist(), (layer, neuron, kind + offset)
                    np.testing.assert_allclose([sc for _, sc in got], want.values.numpy(), rtol=1e-5, atol=1e-6)


# ---- Distributions, from the same hooked activations, one text at a time. ----

def _value_edges() -> list[float]:
    """Inner edges of the 'value' magnitude bins as schema.sql states them: 2^e and 1.5 * 2^e, 2^-16 .. 2^12."""
    edges = []
    for e in range(-16, 13):
        edges += [2.0 ** e, 1.5 * 2.0 ** e]
    return edges[:-1]


def _density_edges() -> list[float]:
    """The 'density' magnitude edges: 2^-12, 2^-10, ... 2^8."""
    return [2.0 ** e for e in range(-12, 9, 2)]


def _signed_edges(magnitude: list[float]) -> list[float]:
    """All finite edges of the signed bins, increasing: bin i holds edges[i-1] <= v < edges[i]."""
    return [-m for m in reversed(magnitude)] + [0.0] + magnitude


def _bin(v: float, edges: list[float]) -> int:
    return sum(1 for e in edges if v >= e)


def _near_edge(v: float, edges: list[float]) -> bool:
    """Values this close to an edge may fall on either side in a batched pass (see _assert_same_top)."""
    return any(abs(v - e) <= TIE * max(abs(e), 1e-30) for e in edges if e != 0)


def _bounds(mags: list[float], default: tuple[float, float, float]) -> tuple[float, float, float]:
    """b1 < b2 < b3 as schema.sql and rules.py define them, by counting."""
    edges = _value_edges()
    if not mags:
        return default
    index = []
    for percent in (50, 90, 99):
        first = next((i for i, e in enumerate(edges) if sum(m < e for m in mags) * 100 >= percent * len(mags)),
                     len(edges) - 1)
        index.append(first if not index else max(first, index[-1] + 1))
    for i in (2, 1, 0):
        index[i] = min(index[i], len(edges) - 1 - (2 - i))
    return tuple(edges[i] for i in index)


def _check_distributions(con, model_dir: Path, texts: list[np.ndarray], acts: dict, n_layers: int,
                         neurons: dict[int, tuple[int, ...]] | None = None, act=None) -> None:
    """Histograms, density, intervals, samples and their windows of `neurons` (per layer; default NEURONS).
    act: the gate's activation (default: the one the model's config names)."""
    if act is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        act_name = getattr(model.config, "hidden_activation", None) or model.config.hidden_act
        act = _gelu_tanh if "tanh" in act_name else _silu
    neurons = neurons or {layer: NEURONS for layer in range(n_layers)}
    seed, n_random, n_per, calib, batch_size = con.execute(
        "SELECT sample_seed, n_random, n_per_interval, calibration_batches, batch_size FROM metadata").fetchone()
    assert (n_random, n_per, calib) == (8, 4, 4)

    value_edges, density_edges = _signed_edges(_value_edges()), _signed_edges(_density_edges())
    for axis, edges in (("value", value_edges), ("density", density_edges)):
        rows = con.execute("SELECT bin, lo, hi FROM histogram_bins WHERE axis = ? ORDER BY bin", [axis]).fetchall()
        assert rows == [(i, lo, hi) for i, (lo, hi) in enumerate(zip([None, *edges], [*edges, None]))]

    # The calibration: the run's first batches, longest texts first (record._batches).
    lengths = np.array([len(t) for t in texts])
    calibration = set(np.argsort(-lengths, kind="stable")[:calib * batch_size].tolist())
    for layer, chosen in neurons.items():
        for neuron in chosen:
            tokens = []  # (q, text_id, pos, x_gate, x_in, act, post)
            for text_id in range(len(texts)):
                g, u = acts[(layer, text_id)]
                for pos in range(1, len(texts[text_id])):
                    x_g, x_i = g[pos, neuron], u[pos, neuron]
                    if x_g == 0 or x_i == 0 or np.isnan(x_g):
                        continue
                    q = (0 if x_i > 0 else 1) if x_g > 0 else (2 if x_i > 0 else 3)
                    a = np.float32(act(float(x_g)))
                    tokens.append((q, text_id, pos, float(x_g), float(x_i), float(a), float(np.float32(a * x_i))))
            where = (layer, neuron)

            # Histograms: exact, but for values within TIE of an edge, which may sit in the neighbouring bin.
            got = {(q, h, b): c for q, h, b, c in con.execute(
                f"SELECT quadrant, hook, bin, count FROM {HISTOGRAM_CELLS} WHERE layer = ? AND neuron = ? "
                "AND count > 0", where).fetchall()}
            for q in range(4):
                for h, column in ((0, 6), (1, 4), (2, 3)):  # hook_post, hook_pre_linear, hook_pre
                    values = [t[column] for t in tokens if t[0] == q]
                    _assert_counts({b: got.get((q, h, b), 0) for b in range(116)}, values, value_edges, where + (q, h))
            got_d = {(gb, ib): c for gb, ib, c in con.execute(
                f"SELECT gate_bin, in_bin, count FROM {DENSITY_CELLS} WHERE layer = ? AND neuron = ? AND count > 0",
                where).fetchall()}
            want_d: dict = {}
            for t in tokens:
                cell = (_bin(t[3], density_edges), _bin(t[4], density_edges))
                want_d[cell] = want_d.get(cell, 0) + 1
            if got_d != want_d:
                assert sum(got_d.values()) == sum(want_d.values()) and any(
                    _near_edge(t[3], density_edges) or _near_edge(t[4], density_edges) for t in tokens), where

            # Intervals from the calibration texts.
            got_b = con.execute("SELECT quadrant, interval, lo, hi FROM intervals WHERE layer = ? AND neuron = ? "
                                "ORDER BY quadrant, interval", where).fetchall()
            assert len(got_b) == 16
            everything = [abs(t[6]) for t in tokens if t[1] in calibration]
            bounds = {}
            for q in range(4):
                mags = [abs(t[6]) for t in tokens if t[0] == q and t[1] in calibration]
                bounds[q] = _bounds(mags or everything, (2.0 ** -4, 2.0 ** -2, 1.0))
                assert [(lo, hi) for qq, _, lo, hi in got_b if qq == q] == list(
                    zip((0.0, *bounds[q]), (*bounds[q], None))), where + (q,)

            # Samples: per text the token of smallest hash, across texts the smallest, ties to lower ids.
            got_s = con.execute(
                "SELECT quadrant, kind, interval, rank, text_id, position, x_gate, x_in, act FROM samples "
                "WHERE layer = ? AND neuron = ? ORDER BY quadrant, kind, interval, rank", where).fetchall()
            want_s = []
            for q in range(4):
                lo_hi = list(zip((0.0, *bounds[q]), (*bounds[q], math.inf)))
                for kind, interval, size, keep in [(0, 0, n_random, lambda t: True)] + [
                        (1, i, n_per, lambda t, lo=lo, hi=hi: lo <= abs(t[6]) < hi) for i, (lo, hi) in enumerate(lo_hi)]:
                    best: dict = {}
                    for t in tokens:
                        if t[0] == q and keep(t):
                            key = (sample_hash(seed, layer, neuron, t[1], t[2]), t[2])
                            if t[1] not in best or key < best[t[1]][0]:
                                best[t[1]] = (key, t)
                    chosen = sorted(((key[0], text_id, t) for text_id, (key, t) in best.items()),
                                    key=lambda c: (c[0], c[1]))[:size]
                    want_s += [(q, kind, interval, rank, t[1], t[2], t[3], t[4], t[5])
                               for rank, (_, _, t) in enumerate(chosen)]
            assert [r[:6] for r in got_s] == [w[:6] for w in want_s], where
            np.testing.assert_allclose([r[6:] for r in got_s], [w[6:] for w in want_s], rtol=1e-5, atol=1e-5)
            assert len(want_s) > 0
            # Every sample has its window, of at most 8 tokens before and 2 after unless it is a top example too.
            windows = con.execute(
                "SELECT s.text_id, s.position, w.window_start, w.x_gate, w.x_in, "
                "       EXISTS (SELECT 1 FROM examples e WHERE e.layer = s.layer AND e.neuron = s.neuron "
                "               AND e.text_id = s.text_id AND e.position = s.position) "
                "FROM samples s JOIN windows w USING (layer, neuron, text_id, position) "
                "WHERE s.layer = ? AND s.neuron = ?", where).fetchall()
            assert len(windows) == len(got_s)
            for text_id, pos, start, wg, wi, is_top in windows:
                g, u = acts[(layer, text_id)]
                if not is_top:
                    assert start == max(0, pos - 8) and start + len(wg) == min(pos + 3, len(texts[text_id]))
                np.testing.assert_allclose(_f16(wg), g[start:start + len(wg), neuron], rtol=2e-3, atol=2e-3)
                np.testing.assert_allclose(_f16(wi), u[start:start + len(wi), neuron], rtol=2e-3, atol=2e-3)


def _assert_counts(got: dict[int, int], values: list[float], edges: list[float], where) -> None:
    """Counts per bin equal the reference's; a value within TIE of an edge may count in either neighbour."""
    sure: dict[int, int] = {}
    loose: dict[int, int] = {}
    for v in values:
        b = _bin(v, edges)
        if _near_edge(v, edges):
            for nb in (b - 1, b, b + 1):
                loose[nb] = loose.get(nb, 0) + 1
        else:
            sure[b] = sure.get(b, 0) + 1
    assert sum(got.values()) == len(values), where
    for b, c in got.items():
        assert sure.get(b, 0) <= c <= sure.get(b, 0) + loose.get(b, 0), (where, b)


def test_the_file_names_its_weights_and_tokenizer_by_fingerprint(distinct_corpus):
    """The fingerprints a process that loads the model again checks: one per model, whatever the run's options,
    equal to the loaded model's, and the vocabulary's computed here from tokenizer.json alone."""
    from tokenizers import Tokenizer

    from gluscope.recorder.checkpoint import weights_fingerprint
    from gluscope.recorder.model import load_model

    seen = {}
    for arch in ARCHS:
        model_dir = recordings.model(arch)
        found = set()
        for refactor in (True, False):
            for reducer in ("kernel", "torch"):
                con = duckdb.connect(str(_record(model_dir, distinct_corpus, refactor, reducer)), read_only=True)
                found.add(con.execute("SELECT weights_fingerprint, tokenizer_fingerprint FROM metadata").fetchone())
                con.close()
        assert len(found) == 1, (arch, found)  # neither the weight convention nor the reducer changes them
        ((weights, vocabulary),) = found
        assert weights == weights_fingerprint(load_model(str(model_dir), device="cpu")), arch
        vocab = sorted(Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(with_added_tokens=True).items(),
                       key=lambda kv: kv[1])
        assert vocabulary == hashlib.sha1(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16], arch
        seen[arch] = weights
    assert len(set(seen.values())) == len(ARCHS)  # three models, three fingerprints
