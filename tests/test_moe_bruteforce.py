"""Mixture-of-experts recordings against an independent brute force.

The reference runs the plain Hugging Face model one text at a time, reads
each MoE block's input with a pre-hook on the block and the routing from
the model's own router outputs (a hook on the router module), and computes
every expert's x_gate and x_in for the tokens routed to it from the
expert's weights in float64. Nothing of the recorder is used: not its
experts.py layout, not its hooks on the experts module.

gpt-oss's experts are computed as its code says, written out here: columns
of gate_up_proj interleaved, biases added, x_gate = clamp(gate, max=limit),
x_in = clamp(up, ±limit) + 1, act(x) = x·σ(1.702x); no weight convention.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from . import recordings
from .brute_force import require_kernel
from .test_recorder_bruteforce import (MAX_LENGTH, _assert_counts, _check_distributions, _signed_edges, _silu,
                                       _value_edges, check_neurons, check_weight_tokens, statistics_of)
from .tiny_models import MOE_ARCHITECTURES

pytestmark = pytest.mark.integration

D_EXPERT = 32
# Every architecture records once with the kernel and the weight convention and once with the tensor reducer and
# raw weights; OLMoE also in the two other combinations, so both reducers meet both conventions.
RUNS = [(arch, "kernel", True) for arch in MOE_ARCHITECTURES] + [(arch, "torch", False) for arch in MOE_ARCHITECTURES] \
    + [("olmoe", "torch", True), ("olmoe", "kernel", False)]


def moe_model(arch: str) -> Path:
    return recordings.model(arch, d_mlp=D_EXPERT, n_layers=3 if arch == "deepseek_v3" else 2)


def record(arch: str, reducer: str = "kernel", refactor: bool = True, corpus: Path | None = None, *more: str) -> Path:
    return recordings.record(moe_model(arch), corpus or recordings.corpus("distinct"), "--max-length",
                             str(MAX_LENGTH), "--batch-size", "5", "--reducer", reducer,
                             *([] if refactor else ["--no-refactor-glu"]), *more)


def _router(block):
    if not hasattr(block, "experts"):
        return None
    return getattr(block, "gate", None) or block.router


def _quick_gelu(x: float) -> float:
    return x / (1.0 + math.exp(-1.702 * x))


def act_of(arch: str):
    return _quick_gelu if arch == "gpt_oss" else _silu


def _expert_parts(experts) -> tuple[list[tuple], list[tuple] | None, float | None]:
    """Per expert (w_gate [d, d_model], w_in [d, d_model], w_out [d_model, d]) in float64; gpt-oss's biases per expert
    (b_gate, b_in) and its clamp, else None."""
    gate_up, down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
    if not hasattr(experts, "gate_up_proj_bias"):
        d = down.shape[-1]
        return [(gate_up[e, :d], gate_up[e, d:], down[e]) for e in range(gate_up.shape[0])], None, None
    bias = experts.gate_up_proj_bias.detach().double()
    parts = [(gate_up[e][:, 0::2].T, gate_up[e][:, 1::2].T, down[e].T) for e in range(gate_up.shape[0])]
    return parts, [(b[0::2], b[1::2]) for b in bias], float(experts.limit)


def reference(model_dir: Path, texts: list[np.ndarray], refactor: bool):
    """Per layer its units and weights, and per (layer, text) x_gate, x_in (NaN: not routed), router weights."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = []  # per layer: dict(units=[(expert, shared, first, n)], wg, wi, wo [d, n] float64, E, shared_gate)
    for layer in model.model.layers:
        block = layer.mlp
        parts, units = [], []
        E, biases, limit = 0, None, None
        if hasattr(block, "experts"):
            parts, biases, limit = _expert_parts(block.experts)
            E = len(parts)
        mlps = [getattr(block, name) for name in ("shared_expert", "shared_experts") if hasattr(block, name)]
        if not hasattr(block, "experts"):
            mlps = [block]
        for mlp in mlps:
            parts.append((mlp.gate_proj.weight.detach().double(), mlp.up_proj.weight.detach().double(),
                          mlp.down_proj.weight.detach().double()))
        first = 0
        for i, (wg, _, _) in enumerate(parts):
            units.append((i if (E or hasattr(block, "experts")) else None, i >= E and E > 0, first, wg.shape[0]))
            first += wg.shape[0]
        wg = torch.cat([p[0] for p in parts])
        wi = torch.cat([p[1] for p in parts])
        wo = torch.cat([p[2] for p in parts], 1)
        flip = refactor and limit is None  # the +1 of gpt-oss's x_in leaves no convention to apply
        sign = torch.where((wg * wi).sum(1) < 0, -1.0, 1.0).double() if flip else torch.ones(wg.shape[0]).double()
        shared_gate = getattr(block, "shared_expert_gate", None)
        layers.append(dict(units=units, wg=wg, wi=wi, wo=wo, sign=sign, E=E, limit=limit,
                           bg=None if biases is None else torch.cat([b[0] for b in biases]),
                           bi=None if biases is None else torch.cat([b[1] for b in biases]),
                           shared_gate=None if shared_gate is None else shared_gate.weight.detach().double()))

    captured: dict = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i: captured.__setitem__((i, "x"), a[0].detach().reshape(-1, a[0].shape[-1]))))
        router = _router(layer.mlp)
        if router is not None:
            handles.append(router.register_forward_hook(
                lambda m, a, out, i=i: captured.__setitem__((i, "route"), (out[2].detach(), out[1].detach()))))
    acts, routes = {}, {}
    with torch.no_grad():
        for text_id, ids in enumerate(texts):
            model(torch.from_numpy(np.asarray(ids, dtype=np.int64))[None])
            for i, L in enumerate(layers):
                x = captured[(i, "x")].double()
                g = x @ L["wg"].T
                u = (x @ L["wi"].T) * L["sign"]
                if L["limit"] is not None:
                    g = (g + L["bg"]).clamp(max=L["limit"])
                    u = (u + L["bi"]).clamp(-L["limit"], L["limit"]) + 1
                weight = torch.ones_like(g)
                if L["E"]:
                    index, w = captured[(i, "route")]
                    routed = torch.zeros_like(g, dtype=torch.bool)
                    for expert, shared, first, n in L["units"]:
                        if shared:
                            routed[:, first:first + n] = True
                            if L["shared_gate"] is not None:
                                weight[:, first:first + n] = torch.sigmoid(x @ L["shared_gate"].T)
                            continue
                        hit = (index == expert)
                        routed[:, first:first + n] = hit.any(1, keepdim=True)
                        weight[:, first:first + n] = (w.double() * hit).sum(1, keepdim=True)
                    g = torch.where(routed, g, math.nan)
                    u = torch.where(routed, u, math.nan)
                    routes[(i, text_id)] = (index.numpy(), w.double().numpy())
                acts[(i, text_id)] = (g.numpy(), u.numpy(), weight.numpy())
    for handle in handles:
        handle.remove()
    return layers, acts, routes


def chosen_neurons(layers: list[dict]) -> dict[int, tuple[int, ...]]:
    """Per layer: the first routed expert's first neuron, a neuron inside the last routed expert, a shared expert's
    neuron; or two neurons of a dense layer."""
    chosen = {}
    for i, L in enumerate(layers):
        units = L["units"]
        if not L["E"]:
            chosen[i] = (0, units[0][3] - 1)
            continue
        last = units[L["E"] - 1]
        picks = [0, last[2] + 17]
        picks += [u[2] + 3 for u in units if u[1]]
        chosen[i] = tuple(picks)
    return chosen


def _texts(con) -> list[np.ndarray]:
    return [np.array(ids) for (ids,) in con.execute("SELECT token_ids FROM texts ORDER BY text_id").fetchall()]


@pytest.mark.parametrize("arch, reducer, refactor", RUNS)
def test_expert_neurons_match_brute_force(arch, reducer, refactor):
    if reducer == "kernel":
        require_kernel()
    out = record(arch, reducer, refactor)
    con = duckdb.connect(str(out), read_only=True)
    texts = _texts(con)
    k = con.execute("SELECT k FROM metadata").fetchone()[0]
    layers, acts, routes = reference(moe_model(arch), texts, refactor)
    neurons = chosen_neurons(layers)
    two = {key: (g, u) for key, (g, u, _) in acts.items()}
    stats, tops, cands = statistics_of(two, texts, neurons, act_of(arch), k)
    check_neurons(con, stats, tops, cands, two, texts, neurons, arch)
    _check_distributions(con, moe_model(arch), texts, two, len(layers), neurons, act_of(arch))
    _check_layout(con, layers)
    _check_router(con, layers, routes, texts, k)
    _check_routed_values(con, acts, texts, neurons, act_of(arch))
    model = AutoModelForCausalLM.from_pretrained(moe_model(arch), dtype=torch.float32)
    check_weight_tokens(con, model, {i: (L["wg"], L["wi"], L["wo"], neurons[i]) for i, L in enumerate(layers)},
                        refactor and arch != "gpt_oss")
    if arch == "gpt_oss":
        assert con.execute("SELECT act_fn, refactor_glu FROM metadata").fetchone() == ("quick_gelu", False)
    for i, L in enumerate(layers):  # the geometry after the convention
        for neuron in neurons[i]:
            g, w_in, w_out = L["wg"][neuron], L["wi"][neuron] * L["sign"][neuron], L["wo"][:, neuron] * L["sign"][neuron]
            got = con.execute("SELECT cos_gate_in, cos_in_out, norm_out, flipped FROM neurons WHERE layer = ? AND "
                              "neuron = ?", [i, neuron]).fetchone()
            cos = torch.nn.functional.cosine_similarity
            np.testing.assert_allclose(got[:3], [float(cos(g, w_in, 0)), float(cos(w_in, w_out, 0)),
                                                 float(w_out.norm())], rtol=1e-5, atol=1e-6)
            assert got[3] == bool(L["sign"][neuron] < 0)
    con.close()


def _check_layout(con, layers: list[dict]) -> None:
    rows = con.execute("SELECT layer, n_neurons, n_experts, top_k FROM layers ORDER BY layer").fetchall()
    assert [r[:3] for r in rows] == [(i, int(L["wg"].shape[0]), L["E"]) for i, L in enumerate(layers)]
    assert con.execute("SELECT d_mlp FROM metadata").fetchone()[0] == max(L["wg"].shape[0] for L in layers)
    got = con.execute("SELECT layer, expert, shared, first_neuron, n_neurons FROM experts ORDER BY layer, expert").fetchall()
    assert got == [(i, *u) for i, L in enumerate(layers) if L["E"] for u in L["units"]]
    for i, L in enumerate(layers):
        width = con.execute("SELECT count(*), max(neuron) FROM neurons WHERE layer = ?", [i]).fetchone()
        assert width == (L["wg"].shape[0], L["wg"].shape[0] - 1)
        related = con.execute("SELECT max(other_neuron) FILTER (WHERE other_layer = ?), "
                              "max(neuron) FILTER (WHERE layer = ?) FROM related", [i, i]).fetchone()
        assert all(r is None or r < L["wg"].shape[0] for r in related)


def _check_router(con, layers: list[dict], routes: dict, texts: list[np.ndarray], k: int) -> None:
    edges = _signed_edges(_value_edges())
    n_tokens = sum(len(t) - 1 for t in texts)
    for i, L in enumerate(layers):
        if not L["E"]:
            continue
        E = L["E"]
        tokens = np.zeros(E, np.int64)
        weight = np.zeros(E)
        per_token: dict = {}
        weights_of: list[list[float]] = [[] for _ in range(E)]
        best: list[list] = [[] for _ in range(E)]
        for text_id, ids in enumerate(texts):
            index, w = routes[(i, text_id)]
            top = {}
            for pos in range(1, len(ids)):
                for slot in range(index.shape[1]):
                    e, v = int(index[pos, slot]), float(w[pos, slot])
                    tokens[e] += 1
                    weight[e] += v
                    weights_of[e].append(v)
                    cell = per_token.setdefault((e, int(ids[pos])), [0, 0.0])
                    cell[0] += 1
                    cell[1] += v
                    if v > top.get(e, (-1.0,))[0]:
                        top[e] = (v, pos)
            for e, (v, pos) in top.items():
                best[e].append((v, text_id, pos))
        got = con.execute("SELECT expert, tokens, weight_sum, weight_first_bin, weight_counts FROM experts "
                          "WHERE layer = ? AND NOT shared ORDER BY expert", [i]).fetchall()
        assert [r[1] for r in got] == tokens.tolist(), i
        np.testing.assert_allclose([r[2] for r in got], weight, rtol=1e-5)
        for e, (_, _, _, first, counts) in enumerate(got):
            _assert_counts({first + j: c for j, c in enumerate(counts or [])}, weights_of[e], edges, (i, e))
        shared = con.execute("SELECT tokens, weight_sum FROM experts WHERE layer = ? AND shared", [i]).fetchall()
        assert all(t == n_tokens for t, _ in shared)
        imbalance = con.execute("SELECT imbalance FROM layers WHERE layer = ?", [i]).fetchone()[0]
        assert imbalance == pytest.approx(tokens.max() / tokens.mean())
        rows = con.execute("SELECT expert, token_id, tokens, weight_sum FROM expert_tokens WHERE layer = ? "
                           "ORDER BY expert, token_id", [i]).fetchall()
        assert [(e, t, c) for e, t, c, _ in rows] == [(e, t, c[0]) for (e, t), c in sorted(per_token.items())]
        np.testing.assert_allclose([r[3] for r in rows], [c[1] for _, c in sorted(per_token.items())], rtol=1e-5)
        for e in range(E):
            want = sorted(best[e], key=lambda b: (-b[0], b[1]))[:k]
            got_e = con.execute("SELECT weight, text_id, position FROM expert_examples WHERE layer = ? AND expert = ? "
                                "ORDER BY rank", [i, e]).fetchall()
            assert [(t, p) for _, t, p in got_e] == [(t, p) for _, t, p in want], (i, e)
            np.testing.assert_allclose([w for w, _, _ in got_e], [w for w, _, _ in want], rtol=1e-5)


def _check_routed_values(con, acts: dict, texts: list[np.ndarray], neurons: dict, act) -> None:
    for layer, chosen in neurons.items():
        for neuron in chosen:
            per_q: dict = {}
            for text_id, ids in enumerate(texts):
                g, u, w = acts[(layer, text_id)]
                for pos in range(1, len(ids)):
                    x_g, x_i = g[pos, neuron], u[pos, neuron]
                    if np.isnan(x_g) or x_g == 0 or x_i == 0:
                        continue
                    q = (0 if x_i > 0 else 1) if x_g > 0 else (2 if x_i > 0 else 3)
                    per_q.setdefault(q, []).append(act(x_g) * x_i * w[pos, neuron])
            rows = con.execute("SELECT quadrant, min, max, mean FROM routed_values WHERE layer = ? AND neuron = ? "
                               "ORDER BY quadrant", [layer, neuron]).fetchall()
            experts = con.execute("SELECT count(*) FROM experts WHERE layer = ?", [layer]).fetchone()[0]
            if not experts:
                assert rows == []
                continue
            for q, lo, hi, mean in rows:
                values = per_q.get(q)
                if not values:
                    assert (lo, hi, mean) == (None, None, None)
                    continue
                np.testing.assert_allclose([lo, hi, mean], [min(values), max(values), np.mean(values)],
                                           rtol=1e-4, atol=1e-6)
