"""The probe against independent computations: recorded values, and ablations done by a plain Hugging Face hook.

The probe loads the model a file was recorded from (probe/loaded.py) and runs
it with TransformerLens hooks (probe/forward.py). Here its values for texts
of the corpus must equal the file's (examples at their positions, windows
within float16), for SwiGLU and GEGLU models and both weight conventions; and
its interventions must give the logits of a fresh transformers model whose
own hook edits down_proj's input at the same tokens.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from gluscope.errors import UserError
from gluscope.probe.answers import Limits, plan_ablate, plan_activations, plan_fire
from gluscope.probe.batcher import Batcher, QueueFull
from gluscope.probe.forward import Passes
from gluscope.probe.loaded import load_for
from gluscope.probe_protocol import AblateRequest, ActivationsRequest, FireRequest
from gluscope.schema import HOOKS, QUADRANT_SIGNS, QUADRANT_SLUGS
from gluscope.server.db import open_databases
from gluscope.server.errors import ParameterError

from . import recordings
from .test_recorder_bruteforce import MAX_LENGTH, _mlp_modules

pytestmark = pytest.mark.integration

ARCHS = ("llama", "gemma")   # SwiGLU and GEGLU, each with split gate and up projections
UNLIMITED = Limits(max_tokens=10_000, max_neurons=10_000)


def _recording(arch: str, refactor: bool) -> Path:
    # The options of test_recorder_bruteforce's torch-reducer recordings, so the files are shared.
    return recordings.record(recordings.model(arch), recordings.corpus("distinct"), "--max-length", str(MAX_LENGTH),
                             "--batch-size", "5", "--reducer", "torch", *([] if refactor else ["--no-refactor-glu"]))


_LOADED: dict = {}


def loaded(arch: str, refactor: bool):
    """(LoadedModel, Passes) of a recording, once per test process."""
    key = (arch, refactor)
    if key not in _LOADED:
        (db,) = open_databases([_recording(arch, refactor)]).values()
        lm = load_for(db, "cpu")
        _LOADED[key] = (lm, Passes(lm))
    return _LOADED[key]


def run(lm, passes, plan):
    return plan.finish(passes.run(plan.rows))


@pytest.fixture(scope="module", params=[(a, r) for a in ARCHS for r in (True, False)],
                ids=[f"{a}-{'refactor_glu' if r else 'raw_weights'}" for a in ARCHS for r in (True, False)])
def probe_model(request):
    return loaded(*request.param)


# --- the probe reproduces the file ------------------------------------------------------------

def test_values_on_corpus_texts_equal_the_recorded_examples_and_windows(probe_model):
    lm, passes = probe_model
    con = duckdb.connect(str(lm.db.path), read_only=True)
    raw = [json.loads(line)["text"] for line in recordings.corpus("distinct").read_text().splitlines()]
    texts = con.execute("SELECT text_id, source_index, token_ids FROM texts ORDER BY text_id LIMIT 6").fetchall()
    checked = 0
    for text_id, source_index, token_ids in texts:
        examples = con.execute("SELECT layer, neuron, hook, value, position FROM examples WHERE text_id = ?",
                               [text_id]).fetchall()
        windows = con.execute("SELECT layer, neuron, window_start, x_gate, x_in FROM windows WHERE text_id = ?",
                              [text_id]).fetchall()
        neurons = sorted({(e[0], e[1]) for e in examples} | {(w[0], w[1]) for w in windows})
        body = run(lm, passes, plan_activations(lm, ActivationsRequest(
            text=raw[source_index], neurons=",".join(f"{l}.{n}" for l, n in neurons)), UNLIMITED))
        # The recorder cut the text at max_length; a causal model's values before the cut do not see the rest.
        ids = [t["token_id"] for t in body["tokens"]]
        assert ids[:len(token_ids)] == list(token_ids)
        got = {(n["layer"], n["neuron"]): n["values"] for n in body["neurons"]}
        for layer, neuron, hook, value, position in examples:
            assert got[layer, neuron][HOOKS[hook]][position] == pytest.approx(value, rel=1e-5, abs=1e-6)
            checked += 1
        for layer, neuron, start, x_gate, x_in in windows:
            for name, bits in (("hook_pre", x_gate), ("hook_pre_linear", x_in)):
                mine = np.asarray(got[layer, neuron][name][start:start + len(bits)], np.float32)
                stored = np.asarray(bits, np.int16).view(np.float16).astype(np.float32)
                # float16 of the same float32 (equal within 1e-6 absolute, as the examples): one float16 step
                # apart where rounding sits on an edge, and as many subnormal steps as 1e-6 spans near zero
                np.testing.assert_allclose(mine.astype(np.float16).astype(np.float32), stored, rtol=2 ** -10, atol=1e-6)
    con.close()
    assert checked > 50


def test_quadrants_and_relative_values_follow_the_recorded_maxima(probe_model):
    lm, passes = probe_model
    body = run(lm, passes, plan_activations(lm, ActivationsRequest(text="The cat sat on the mat again.",
                                                                   neurons="1.7"), UNLIMITED))
    (n,) = body["neurons"]
    assert n["quadrants"][0] is None  # BOS is in no quadrant
    stats = lm.db.neurons
    for t, label in enumerate(n["quadrants"][1:], start=1):
        g, x = n["values"]["hook_pre"][t], n["values"]["hook_pre_linear"][t]
        q = QUADRANT_SIGNS.index((int(np.sign(g)), int(np.sign(x))))
        assert label == body["neurons"][0]["recorded"][q]["quadrant"]
        best = max(abs(stats.stat_min[1, 7, q, 0]), abs(stats.stat_max[1, 7, q, 0]))
        assert n["relative"][t] == pytest.approx(abs(n["values"]["hook_post"][t]) / best, rel=1e-5)


def test_neurons_that_fire_equal_a_ranking_of_every_neuron(probe_model):
    lm, passes = probe_model
    text = "def add(x, y):\n    return x + y"
    body = run(lm, passes, plan_fire(lm, FireRequest(text=text, position=5, top=4), UNLIMITED))
    everyone = run(lm, passes, plan_activations(lm, ActivationsRequest(
        text=text, neurons=",".join(f"{l}.{n}" for l in range(lm.model.n_layers) for n in range(lm.model.d_mlp))),
        UNLIMITED))
    for q, listed in enumerate(body["quadrants"]):
        ranked = sorted(((n["relative"][5], n["layer"], n["neuron"]) for n in everyone["neurons"]
                         if n["quadrants"][5] == listed["quadrant"] and n["relative"][5] is not None),
                        key=lambda r: (-r[0], r[1], r[2]))
        assert [(n["layer"], n["neuron"]) for n in listed["neurons"]] == [(l, n) for _, l, n in ranked[:4]]
        for got, (rel, _, _) in zip(listed["neurons"], ranked):
            assert got["relative"] == pytest.approx(rel, rel=1e-5)


# --- interventions against a plain Hugging Face hook --------------------------------------------

def reference_logits(model_dir: Path, ids: list[int], edits: dict[int, list[int]], mode: str, quadrant: int | None,
                     amount: float, refactor: bool) -> torch.Tensor:
    """Logits of a fresh transformers model whose forward pre-hook on down_proj edits hook_post of `edits`
    (layer -> neurons) at every token but BOS, or where the neuron is in `quadrant`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    handles = []
    for layer, (mlp, kind, w_gate, w_in, _) in enumerate(_mlp_modules(model)):
        if layer not in edits:
            continue
        assert kind == "split"
        sign = torch.where((w_gate.double() * w_in.double()).sum(1) < 0, -1.0, 1.0).float() if refactor \
            else torch.ones(w_gate.shape[0])
        seen = {}
        handles.append(mlp.gate_proj.register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("g", o)))
        handles.append(mlp.up_proj.register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("u", o)))

        def edit(module, inputs, seen=seen, sign=sign, neurons=edits[layer]):
            (h,) = inputs
            h = h.clone()
            for n in neurons:
                g, x = seen["g"][0, 1:, n], seen["u"][0, 1:, n] * sign[n]
                if quadrant is None:
                    where = torch.ones_like(g, dtype=torch.bool)
                else:
                    gs, us = QUADRANT_SIGNS[quadrant]
                    where = (torch.sign(g) == gs) & (torch.sign(x) == us)
                old = h[0, 1:, n]
                new = {"zero": torch.zeros_like(old), "scale": old * amount,
                       "clamp": torch.full_like(old, amount) * sign[n]}[mode]
                h[0, 1:, n] = torch.where(where, new, old)
            return (h,)
        handles.append(mlp.down_proj.register_forward_pre_hook(edit))
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0]
    for h in handles:
        h.remove()
    return out


CASES = [("zero", None, None), ("zero", "nn", None), ("zero", "pp", None), ("scale", "pn", 2.5),
         ("clamp", "np", 0.7), ("clamp", None, -1.25)]


@pytest.mark.parametrize("mode,quadrant,amount", CASES)
def test_an_ablation_gives_the_logits_of_an_independent_hook(probe_model, mode, quadrant, amount):
    lm, passes = probe_model
    text = "Once upon a time the cat sat on the mat, and once again it sat there."
    req = AblateRequest(text=text, neurons="0.7,1.50,1.95,0.3", mode=mode, quadrant=quadrant,
                        factor=amount if mode == "scale" else 0.0, value=amount if mode == "clamp" else 0.0)
    plan = plan_ablate(lm, req, UNLIMITED)
    clean, edited = passes.run(plan.rows)
    ids = plan.rows[0].ids
    folder = Path(str(lm.db.meta["model_source"]))
    refactor = bool(lm.db.meta["refactor_glu"])
    q = None if quadrant is None else QUADRANT_SLUGS.index(quadrant)
    want_clean = reference_logits(folder, ids, {}, mode, q, amount or 0.0, refactor)
    want = reference_logits(folder, ids, {0: [7, 3], 1: [50, 95]}, mode, q, amount or 0.0, refactor)
    torch.testing.assert_close(clean.logits, want_clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(edited.logits, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(clean.logits, edited.logits)  # the edit did something the reference also did


def test_a_quadrant_ablation_changes_nothing_before_its_first_token_in_the_quadrant(probe_model):
    lm, passes = probe_model
    text = "Once upon a time the cat sat on the mat, and once again it sat there."
    acts = run(lm, passes, plan_activations(lm, ActivationsRequest(text=text, neurons="0.7"), UNLIMITED))
    labels = acts["neurons"][0]["quadrants"]
    # The quadrant whose first token comes latest: the longest stretch the ablation must leave alone.
    slug, first = max(((s, labels.index(lab)) for s, lab in zip(QUADRANT_SLUGS, acts["neurons"][0]["recorded"])
                       for lab in [lab["quadrant"]] if lab in labels), key=lambda p: p[1])
    assert first > 1
    plan = plan_ablate(lm, AblateRequest(text=text, neurons="0.7", quadrant=slug), UNLIMITED)
    clean, edited = passes.run(plan.rows)
    torch.testing.assert_close(edited.logits[:first], clean.logits[:first], atol=0, rtol=0)
    assert not torch.equal(edited.logits[first], clean.logits[first])
    body = plan.finish([clean, edited])
    label = acts["neurons"][0]["recorded"][QUADRANT_SLUGS.index(slug)]["quadrant"]
    assert body["neurons"][0]["edited"] == labels.count(label)
    assert min(p["kl"] for p in body["positions"] if p["position"] < first) == 0.0


def test_ablation_answer_holds_probabilities_kl_and_the_target():
    lm, passes = loaded("llama", True)
    plan = plan_ablate(lm, AblateRequest(text="the cat sat on the mat", neurons="1.5", target=" the"), UNLIMITED)
    clean, edited = passes.run(plan.rows)
    body = plan.finish([clean, edited])
    before, after = torch.log_softmax(clean.logits.double(), -1), torch.log_softmax(edited.logits.double(), -1)
    kl = (before.exp() * (before - after)).sum(-1)
    ids = plan.rows[0].ids
    (the,) = lm.model.tokenizer(" the", add_special_tokens=False)["input_ids"]
    assert [p["kl"] for p in body["positions"]] == sorted((p["kl"] for p in body["positions"]), reverse=True)
    for p in body["positions"]:
        t = p["position"]
        assert p["kl"] == pytest.approx(float(kl[t]), abs=1e-12)
        assert p["target"]["token_id"] == the and p["target"]["after"] == pytest.approx(float(after[t, the]))
        assert [b["token_id"] for b in p["before"]] == before[t].topk(10).indices.tolist()
        if t + 1 < len(ids):
            assert p["next"]["before"] == pytest.approx(float(before[t, ids[t + 1]]))
        for c in p["lost"]:
            assert c["after"] < c["before"]


# --- bad requests ---------------------------------------------------------------------------------

BAD = [
    (ActivationsRequest, {"text": "", "neurons": "0.1"}, 422, "text"),
    (ActivationsRequest, {"text": "   ", "neurons": "0.1"}, 422, "text"),
    (ActivationsRequest, {"text": "word " * 40, "neurons": "0.1"}, 422, "text"),
    (ActivationsRequest, {"text": "hi", "neurons": "7.1"}, 404, "layer"),
    (ActivationsRequest, {"text": "hi", "neurons": "0.96"}, 404, "neuron"),
    (ActivationsRequest, {"text": "hi", "neurons": "0.1,zero"}, 422, "neurons"),
    (ActivationsRequest, {"text": "hi", "neurons": ",".join(f"0.{i % 96}" for i in range(10_000))}, 422, "neurons"),
    (AblateRequest, {"text": "hi", "neurons": "0.1", "quadrant": "zz"}, 422, "quadrant"),
    (AblateRequest, {"text": "hi", "neurons": "0.1", "mode": "off"}, 422, "mode"),
    (AblateRequest, {"text": "hi", "neurons": "0.1", "mode": "scale", "factor": float("nan")}, 422, "factor"),
    (AblateRequest, {"text": "hi", "neurons": "0.1", "mode": "scale", "factor": float("inf")}, 422, "factor"),
    (AblateRequest, {"text": "hi", "neurons": "0.1", "mode": "clamp", "value": float("-inf")}, 422, "value"),
    (AblateRequest, {"text": "hi", "neurons": "0.1", "position": -1}, 422, "position"),
    (FireRequest, {"text": "hi there", "position": 0}, 422, "position"),
    (FireRequest, {"text": "hi there", "layers": "0-9"}, 404, "layers"),
    (FireRequest, {"text": "hi there", "top": 0}, 422, "top"),
]


@pytest.mark.parametrize("request_model,fields,status,parameter", BAD,
                         ids=[f"{r.__name__}-{p}-{i}" for i, (r, _, _, p) in enumerate(BAD)])
def test_a_bad_request_names_its_parameter(request_model, fields, status, parameter):
    lm, _ = loaded("llama", True)
    plan = {ActivationsRequest: plan_activations, FireRequest: plan_fire, AblateRequest: plan_ablate}[request_model]
    with pytest.raises(ParameterError) as e:
        plan(lm, request_model(**fields), Limits(max_tokens=32, max_neurons=64))
    assert (e.value.status, e.value.parameter) == (status, parameter), e.value.message
    if parameter in ("text", "neurons") and "limit" in e.value.message:
        assert any(str(n) in e.value.message for n in (32, 64))


def test_the_probe_refuses_a_model_whose_fingerprint_differs(tmp_path):
    path = recordings.copy_of(_recording("llama", True), tmp_path)
    con = duckdb.connect(str(path))
    con.execute("UPDATE metadata SET weights_fingerprint = '0123456789abcdef0123456789abcdef'")
    con.close()
    (db,) = open_databases([path]).values()
    with pytest.raises(UserError, match="another model: its weights fingerprint differs"):
        load_for(db, "cpu")


# --- the queue: bounded, with deadlines, batching what waits ----------------------------------------

def test_the_queue_refuses_when_full_times_out_and_batches_what_waits():
    import asyncio

    lm, passes = loaded("llama", True)
    plans = [plan_activations(lm, ActivationsRequest(text=f"the cat number {i} sat", neurons="1.5"), UNLIMITED)
             for i in range(4)]
    alone = [run(lm, passes, p) for p in plans]
    batcher = Batcher(queue_size=3, timeout_s=20.0)

    async def scenario():
        passes.lock.acquire()  # the model is busy: the worker takes one request and waits for the lock
        tasks = [asyncio.create_task(batcher.answer(passes, plans[0]))]
        await asyncio.sleep(0.01)
        while batcher.waiting:  # until the worker holds it
            await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(batcher.answer(passes, p)) for p in plans[1:]]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as full:
            await batcher.answer(passes, plans[0])
        assert full.value.status == 503 and full.value.retry_after >= 1
        passes.lock.release()
        return await asyncio.gather(*tasks)

    try:
        answers = asyncio.run(scenario())
    finally:
        if passes.lock.locked():
            passes.lock.release()
    for got, want in zip(answers, alone):
        np.testing.assert_allclose(got["neurons"][0]["values"]["hook_post"], want["neurons"][0]["values"]["hook_post"],
                                   rtol=1e-5, atol=1e-6)
    assert batcher.stats.sizes == {1: 1, 3: 1}  # the three that waited shared one pass

    slow = Batcher(timeout_s=0.2)

    async def too_slow():
        passes.lock.acquire()
        try:
            with pytest.raises(ParameterError) as late:
                await slow.answer(passes, plans[0])
            assert late.value.status == 504
        finally:
            passes.lock.release()
    asyncio.run(too_slow())
    batcher.close()
    slow.close()


def test_a_gguf_recording_loads_from_the_cached_conversion_when_the_file_is_gone(tmp_path):
    from gluscope.recorder.gguf import convert
    from gluscope.probe.loaded import candidate_sources

    gguf = recordings.gguf(recordings.model("llama"))
    path = recordings.copy_of(recordings.record(gguf, recordings.corpus("standard"), "--max-length", "24"), tmp_path)
    folder = convert(gguf)  # where the recording put it (cached by content: no work when it is there)
    con = duckdb.connect(str(path))
    con.execute("UPDATE metadata SET model_source = '/gone/elsewhere/tiny-llama.F32.gguf'")
    con.close()
    (db,) = open_databases([path]).values()
    assert candidate_sources(db.meta, None)[0] == str(folder)
    lm = load_for(db, "cpu")
    body = run(lm, Passes(lm), plan_activations(lm, ActivationsRequest(text="the cat", neurons="1.3"), UNLIMITED))
    assert body["neurons"][0]["values"]["hook_post"][1] is not None
