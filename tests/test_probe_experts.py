"""The probe on mixture-of-experts models: expert neurons read and switched off like dense ones.

Reads are checked against what the recorder wrote (examples and windows, NaN where a token went to other
experts); ablations against an independent computation: a fresh Hugging Face model with a hook on the MoE
block that adds what the changed neuron writes, computed in float64 from the block's input, the router's own
outputs and the expert's weights.
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from gluscope.probe.answers import Limits, plan_ablate, plan_activations, plan_fire
from gluscope.probe.forward import Passes
from gluscope.probe.loaded import load_for
from gluscope.probe_protocol import AblateRequest, ActivationsRequest, FireRequest
from gluscope.schema import HOOKS
from gluscope.server.db import open_databases

from . import recordings
from .test_moe_bruteforce import _expert_parts, _router, moe_model, record

pytestmark = pytest.mark.integration

UNLIMITED = Limits(max_tokens=10_000, max_neurons=10_000)
ARCHS = ("olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss")
_LOADED: dict = {}


@pytest.fixture(scope="module", params=ARCHS)
def probe_model(request):
    if request.param not in _LOADED:
        (db,) = open_databases([record(request.param)]).values()
        lm = load_for(db, "cpu")
        _LOADED[request.param] = (request.param, lm, Passes(lm))
    return _LOADED[request.param]


def run(passes, plan):
    return plan.finish(passes.run(plan.rows))


def test_values_on_corpus_texts_equal_the_recorded_examples_and_windows(probe_model):
    arch, lm, passes = probe_model
    address = lm.db.experts.address
    con = duckdb.connect(str(lm.db.path), read_only=True)
    raw = [json.loads(line)["text"] for line in recordings.corpus("distinct").read_text().splitlines()]
    checked = nan = 0
    for text_id, source_index, token_ids in con.execute(
            "SELECT text_id, source_index, token_ids FROM texts ORDER BY text_id LIMIT 4").fetchall():
        examples = con.execute("SELECT layer, neuron, hook, value, position FROM examples WHERE text_id = ? "
                               "AND neuron % 5 = 0", [text_id]).fetchall()
        windows = con.execute("SELECT layer, neuron, window_start, x_gate, x_in FROM windows WHERE text_id = ? "
                              "AND neuron % 5 = 0", [text_id]).fetchall()
        neurons = sorted({(e[0], e[1]) for e in examples} | {(w[0], w[1]) for w in windows})
        body = run(passes, plan_activations(lm, ActivationsRequest(
            text=raw[source_index], neurons=",".join(address(l, n) for l, n in neurons)), UNLIMITED))
        assert [t["token_id"] for t in body["tokens"]][:len(token_ids)] == list(token_ids)
        got = {(n["layer"], n["neuron"]): n["values"] for n in body["neurons"]}
        for layer, neuron, hook, value, position in examples:
            assert got[layer, neuron][HOOKS[hook]][position] == pytest.approx(value, rel=1e-5, abs=1e-6)
            checked += 1
        for layer, neuron, start, x_gate, x_in in windows:
            for name, bits in (("hook_pre", x_gate), ("hook_pre_linear", x_in)):
                mine = np.array([np.nan if v is None else v
                                 for v in got[layer, neuron][name][start:start + len(bits)]], np.float32)
                stored = np.asarray(bits, np.int16).view(np.float16).astype(np.float32)
                assert (np.isnan(mine) == np.isnan(stored)).all(), (arch, layer, neuron)  # routed elsewhere
                nan += int(np.isnan(stored).sum())
                np.testing.assert_allclose(mine.astype(np.float16).astype(np.float32), stored, rtol=2 ** -10,
                                           atol=1e-6)
    con.close()
    assert checked > 50 and nan > 0


def test_neurons_that_fire_include_expert_neurons_routed_here_only(probe_model):
    arch, lm, passes = probe_model
    text = "def add(x, y):\n    return x + y"
    body = run(passes, plan_fire(lm, FireRequest(text=text, position=5, top=6), UNLIMITED))
    listed = [(n["layer"], n["neuron"]) for q in body["quadrants"] for n in q["neurons"]]
    assert listed
    everyone = run(passes, plan_activations(lm, ActivationsRequest(text=text, neurons=",".join(
        lm.db.experts.address(layer, n) for layer, n in listed)), UNLIMITED))
    for n in everyone["neurons"]:  # every listed neuron saw the token: its expert was chosen there
        assert n["values"]["hook_post"][5] is not None


def _edited_logits(model_dir, ids: torch.Tensor, layer: int, neuron: int, factor: float, units) -> torch.Tensor:
    """Log-probabilities of a fresh HF model whose neuron's hook_post is multiplied by `factor` at every token but
    BOS where its expert saw the token: a hook on the MoE block adds (factor - 1) * hook_post * router weight
    * w_out, all from the block's input, the router's own outputs and the weights, in float64."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    block = model.model.layers[layer].mlp
    (expert, shared, first, _), = [u for u in units if u[2] <= neuron < u[2] + u[3]]
    j = neuron - first
    b_gate = b_in = limit = None
    if expert is not None and not shared:
        parts, biases, limit = _expert_parts(block.experts)
        w_gate, w_in, w_out = parts[expert][0][j], parts[expert][1][j], parts[expert][2][:, j]
        if biases is not None:
            b_gate, b_in = biases[expert][0][j], biases[expert][1][j]
    else:
        mlp = block if expert is None else next(getattr(block, n) for n in ("shared_expert", "shared_experts")
                                                if hasattr(block, n))
        w_gate, w_in, w_out = (mlp.gate_proj.weight[j].double(), mlp.up_proj.weight[j].double(),
                               mlp.down_proj.weight[:, j].double())
    seen = {}
    if expert is not None and not shared:
        _router(block).register_forward_hook(lambda m, a, out: seen.update(index=out[2], weight=out[1]))

    def add(module, args, output):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        g, u = x @ w_gate, x @ w_in
        if limit is None:
            post = torch.nn.functional.silu(g) * u
        else:  # gpt-oss's clamped SwiGLU
            g, u = (g + b_gate).clamp(max=limit), (u + b_in).clamp(-limit, limit) + 1
            post = g * torch.sigmoid(1.702 * g) * u
        if expert is not None and not shared:
            weight = (seen["weight"].double() * (seen["index"] == expert)).sum(1)   # 0 where routed elsewhere
        elif getattr(block, "shared_expert_gate", None) is not None and expert is not None:
            weight = torch.sigmoid(x @ block.shared_expert_gate.weight[0].double())
        else:
            weight = torch.ones_like(g)
        delta = (factor - 1.0) * post * weight
        delta[0] = 0.0  # BOS is never edited
        if isinstance(output, tuple):  # gpt-oss's block returns (its output, the router's scores)
            return (add(module, args, output[0]), *output[1:])
        return output + (delta[:, None] * w_out[None, :]).to(output.dtype).view(output.shape)

    block.register_forward_hook(add)
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits[0].double(), -1)


@pytest.mark.parametrize("mode, factor", [("zero", 0.0), ("scale", 2.5)])
def test_switching_an_expert_neuron_off_equals_editing_its_down_projection(probe_model, mode, factor):
    arch, lm, passes = probe_model
    text = "The cat sat on the mat, and then it sat again."
    con = duckdb.connect(str(lm.db.path), read_only=True)
    units = {layer: [(e, s, f, n) for e, s, f, n in con.execute(
        "SELECT expert, shared, first_neuron, n_neurons FROM experts WHERE layer = ? ORDER BY expert",
        [layer]).fetchall()] for layer in range(lm.model.n_layers)}
    con.close()
    picks = []
    for layer in range(lm.model.n_layers):
        if units[layer]:
            picks.append((layer, units[layer][1][2] + 3))                     # a routed expert's neuron
            picks += [(layer, u[2] + 1) for u in units[layer] if u[1]]        # a shared expert's
        else:
            picks.append((layer, 2))                                          # a dense layer's
            units[layer] = [(None, False, 0, lm.model.layer_width(layer))]
    for layer, neuron in picks:
        body = run(passes, plan_ablate(lm, AblateRequest(
            text=text, neurons=lm.db.experts.address(layer, neuron), mode=mode, factor=factor), UNLIMITED))
        ids = torch.tensor([[t["token_id"] for t in body["tokens"]]])
        want = _edited_logits(moe_model(arch), ids, layer, neuron, factor, units[layer])
        reference = AutoModelForCausalLM.from_pretrained(moe_model(arch), dtype=torch.float32).eval()
        with torch.no_grad():
            clean = torch.log_softmax(reference(ids).logits[0].double(), -1)
        kl = (clean.exp() * (clean - want)).sum(-1).clamp_min(0)
        got = {c["position"]: c["kl"] for c in body["positions"]}
        # Float32 logits of two computations (an added output against a changed weight): a KL of 1e-4 carries
        # rounding of about 1e-7; a wrong weight or a missed token would be off by its own size.
        assert max(float(kl.max()), max(got.values())) > 1e-5, (arch, layer, neuron)  # the edit changes something
        for t in range(ids.shape[1]):
            assert got[t] == pytest.approx(float(kl[t]), rel=2e-3, abs=1e-6), (arch, layer, neuron, t)
        assert body["neurons"][0]["edited"] >= 0


def test_through_the_server_expert_neurons_are_probed_by_their_address(probe_model):
    """The server forwards an expert neuron's address; its JSON equals the probe's own answer and its page links
    each neuron by address."""
    from starlette.testclient import TestClient

    from gluscope.probe.app import create_probe_app
    from gluscope.probe.batcher import Batcher
    from gluscope.server.app import create_app

    from .processes import served_in_thread

    arch, lm, _ = probe_model
    m = lm.db.id
    layer = lm.model.n_layers - 1
    address = lm.db.experts.address(layer, 40)
    assert address.count(".") == 2
    text = "The cat sat on the mat."
    with served_in_thread(create_probe_app({m: lm}, UNLIMITED, Batcher())) as probe, \
            TestClient(create_app([lm.db.path], probe=probe), raise_server_exceptions=False) as c:
        params = {"text": text, "neurons": address}
        body = c.get(f"/api/models/{m}/probe/activations", params=params)
        assert body.status_code == 200, body.text
        (n,) = body.json()["neurons"]
        assert (n["layer"], n["neuron"]) == (layer, 40)
        page = c.get(f"/models/{m}/probe/activations", params=params).text
        assert f'href="/models/{m}/neurons/{layer}/{address.split(".", 1)[1]}"' in page
        fire = c.get(f"/models/{m}/probe/fire", params={"text": text}).text
        assert "<textarea" in fire and "/neurons/" in fire
        ablate = c.get(f"/api/models/{m}/probe/ablate", params={**params, "mode": "zero"})
        assert ablate.status_code == 200 and ablate.json()["neurons"][0]["layer"] == layer
