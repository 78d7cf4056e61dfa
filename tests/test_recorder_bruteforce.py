"""The recorder's database against an independent brute-force computation.

The reference runs the plain Hugging Face model (no TransformerLens, no
batching, no padding) one text at a time, captures x_gate and x_in with
forward hooks on the projections, and walks every token of a few neurons in
Python. Texts start with distinct first tokens, so no two texts share a
context and exact ties between texts cannot arise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gluscope.cli import main as gluscope_main
from gluscope.schema import HOOKS, QUADRANTS

from .conftest import corpus_texts, require_kernel

MAX_LENGTH = 40
NEURONS = (0, 7, 50, 95)
ARCHS = ("llama", "gemma", "phi3")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def distinct_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bf") / "corpus.jsonl"
    with path.open("w") as f:
        for letter, text in zip(LETTERS, corpus_texts()):
            f.write(json.dumps({"text": f"{letter} {text}"}) + "\n")
    return path


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory) -> tuple[str, Path]:
    from .conftest import make_model
    return request.param, make_model(tmp_path_factory, request.param)


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
    stats = {}   # (layer, neuron, q, h) -> dict
    per_text = {}  # (layer, neuron, q, h) -> list of (|v|, text_id, pos, v)
    acts = {}    # (layer, text_id) -> (g, u) as float32 numpy [T, d_mlp]
    with torch.no_grad():
        for text_id, ids in enumerate(texts):
            model(torch.from_numpy(np.asarray(ids, dtype=np.int64))[None])
            for layer in range(n_layers):
                g = captured[(layer, "g")].numpy()
                u = (captured[(layer, "u")] * signs[layer].float()).numpy()
                acts[(layer, text_id)] = (g, u)
                for neuron in NEURONS:
                    best = {}
                    for pos in range(1, len(ids)):
                        x_g, x_i = float(g[pos, neuron]), float(u[pos, neuron])
                        if x_g == 0 or x_i == 0:
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
    for handle in handles:
        handle.remove()
    tops = {key: sorted(cands, key=lambda c: (-c[0], c[1]))[:k] for key, cands in per_text.items()}
    return stats, tops, per_text, acts, n_layers


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


def _record(model_dir: Path, corpus: Path, out: Path, refactor: bool, reducer: str) -> None:
    args = ["record", "--model", str(model_dir), "--dataset", str(corpus), "--out", str(out),
            "--max-length", str(MAX_LENGTH), "--batch-size", "5", "--device", "cpu", "--compile", "off",
            "--reducer", reducer]
    if not refactor:
        args.append("--no-refactor-glu")
    assert gluscope_main(args) == 0


def _f16(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.int16).view(np.float16).astype(np.float32)


# Both reducers: the C++ kernel the CPU uses and the tensor code GPUs use.
@pytest.mark.parametrize("reducer", ["kernel", "torch"])
@pytest.mark.parametrize("refactor", [True, False], ids=["refactor_glu", "raw_weights"])
def test_database_matches_brute_force(arch_model, distinct_corpus, tmp_path, refactor, reducer):
    if reducer == "kernel":
        require_kernel()
    arch, model_dir = arch_model
    out = tmp_path / f"{arch}.duckdb"
    _record(model_dir, distinct_corpus, out, refactor, reducer)
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
    for layer in range(n_layers):
        for neuron in NEURONS:
            counts = con.execute("SELECT count_pp, count_pn, count_np, count_nn FROM neurons WHERE layer=? AND neuron=?",
                                 [layer, neuron]).fetchone()
            for q in range(4):
                expected_n = stats.get((layer, neuron, q, "hook_pre"), {"n": 0})["n"]
                assert counts[q] == expected_n, (layer, neuron, QUADRANTS[q])
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
                    _assert_same_top(examples, want, cands.get((layer, neuron, q, h), []), (arch, layer, neuron, q, h))
                    for e, c in zip(examples, want):
                        text_id, pos, start = e[2], e[3], e[4]
                        assert start == max(0, pos - before)
                        end = min(pos + after + 1, len(texts[text_id]))
                        g, u = acts[(layer, text_id)]
                        np.testing.assert_allclose(_f16(e[5]), g[start:end, neuron], rtol=2e-3, atol=2e-3)
                        np.testing.assert_allclose(_f16(e[6]), u[start:end, neuron], rtol=2e-3, atol=2e-3)

    _check_weight_tokens(con, model_dir, refactor)

    # The weight convention: after refactor_glu every cos(w_gate, w_in) >= 0.
    cos_min = con.execute("SELECT min(cos_gate_in) FROM neurons").fetchone()[0]
    flipped = con.execute("SELECT count(*) FILTER (WHERE flipped) FROM neurons").fetchone()[0]
    if refactor:
        assert cos_min >= 0 and flipped > 0
    else:
        assert cos_min < 0 and flipped == 0
    con.close()


def _check_weight_tokens(con, model_dir: Path, refactor: bool) -> None:
    """weight_tokens against the plain HF embedding and unembedding matrices."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    W_E = model.get_input_embeddings().weight.detach().double()      # [vocab, d]
    W_U = model.get_output_embeddings().weight.detach().double()     # [vocab, d]
    for layer, (_, _, wg, wi, wo) in enumerate(_mlp_modules(model)):
        for neuron in NEURONS:
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
