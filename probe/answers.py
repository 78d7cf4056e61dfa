"""The three answers: a request checked and turned into forward-pass rows, and the rows' results into a body.

Each `plan_*` checks a request against the database and the limits (a
ParameterError names what is wrong, in the server's one error shape) and
returns a Plan: the rows to run and the function that makes the body of
their results (gluscope/probe_protocol.py describes the bodies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from gluscope.probe.forward import Edit, Read, Row, RowResult
from gluscope.probe.loaded import LoadedModel
from gluscope.probe_protocol import (ABLATION_MODES, CHANGED_TOKENS, FIRE_TOP_MAX, MAX_NEURONS, MAX_TOKENS, TOP_TOKENS,
                                     AblateRequest, ActivationsRequest, FireRequest, blank)
from gluscope.recorder.tensor_reducer import quadrant_codes
from gluscope.schema import HOOKS, QUADRANT_SLUGS, QUADRANTS
from gluscope.server.db import COUNT_NOT_KNOWN
from gluscope.server.errors import ParameterError, not_one_of
from gluscope.server.neuron_search import vocabulary_index
from gluscope.server.validate import parse_layer_range, parse_neuron_ref, quadrant_code


@dataclass(frozen=True)
class Limits:
    max_tokens: int = MAX_TOKENS
    max_neurons: int = MAX_NEURONS


@dataclass
class Plan:
    rows: list[Row]
    finish: Callable[[list[RowResult]], dict[str, Any]]


# --- checking a request ---------------------------------------------------------

def tokenize(lm: LoadedModel, text: str, limits: Limits) -> list[int]:
    """The text's ids with BOS first, as the recorder tokenizes a corpus text."""
    if blank(text):
        raise ParameterError(422, "text", "text is empty", "1 or more characters")
    # A text far longer than the limit cannot fit; cut it before the tokenizer spends time on it.
    ids = lm.model.tokenizer(text[:64 * (limits.max_tokens + 1)], add_special_tokens=False)["input_ids"]
    if len(ids) > limits.max_tokens:
        raise ParameterError(422, "text", f"the text has more than {limits.max_tokens} tokens, this probe's limit "
                             "per text", f"at most {limits.max_tokens} tokens")
    if not ids:
        raise ParameterError(422, "text", "the text has no tokens", "1 or more tokens")
    return [lm.bos, *ids]


def parse_neurons(lm: LoadedModel, text: str, limits: Limits) -> list[tuple[int, int]]:
    """'3.117,5.2' to distinct checked (layer, neuron) pairs in the order given, at most the neuron limit."""
    parts = [p for p in (text or "").split(",") if p.strip()]
    valid = f"1 to {limits.max_neurons} layer.neuron, comma-separated, e.g. 3.117,5.2"
    if not parts:
        raise ParameterError(422, "neurons", "no neuron given", valid)
    if len(parts) > limits.max_neurons:
        raise ParameterError(422, "neurons", f"{len(parts)} neurons given, more than this probe's limit of "
                             f"{limits.max_neurons} per request", valid)
    found = [parse_neuron_ref(p, lm.db, "neurons") for p in parts]
    return list(dict.fromkeys(found))  # a neuron named twice is the same neuron


def check_position(position: int | None, n: int, first: int = 0) -> int:
    """A position of a text of n tokens (BOS included), first..n-1; None, or one past the end: the last.

    Past the end is the last token rather than an error: a link or a form cannot know how many tokens a
    text will have, and the answer says which position it took.
    """
    if position is None or position >= n:
        return n - 1
    if position < first:
        valid = f"{first}..{n - 1}"
        why = " (0 is BOS, which no statistic counts)" if first == 1 and position == 0 else ""
        raise ParameterError(422, "position", f"position {position} is not a token of this text{why}; valid: "
                             f"{valid}", valid)
    return position


def finite(parameter: str, value: float) -> float:
    if not math.isfinite(value):
        raise ParameterError(422, parameter, f"{parameter} must be a finite number, not {value}", "a finite number")
    return float(value)


def target_token(lm: LoadedModel, target: str) -> int | None:
    """A vocabulary entry by its text (' again'), else the first token the text tokenizes to (the answer names
    the token taken); None for a text of no token."""
    exact = vocabulary_index(lm.db.vocab).find(target, loose=False)
    if exact:
        return exact[0]
    ids = lm.model.tokenizer(target[:200], add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else None


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _tokens(lm: LoadedModel, ids: list[int]) -> list[dict[str, Any]]:
    return [{"token_id": i, "token": lm.db.vocab.token(i)} for i in ids]


def _values(lm: LoadedModel, x_gate: torch.Tensor, x_in: torch.Tensor) -> dict[str, torch.Tensor]:
    """All four values from x_gate and x_in (in the convention), as the recorder computes them: float32."""
    act = lm.model.act_fn(x_gate)
    return {"hook_post": act * x_in, "hook_pre_linear": x_in, "hook_pre": x_gate, "act": act}


# --- 1. a neuron on your text --------------------------------------------------------

def plan_activations(lm: LoadedModel, req: ActivationsRequest, limits: Limits) -> Plan:
    ids = tokenize(lm, req.text, limits)
    neurons = parse_neurons(lm, req.neurons, limits)
    layers = sorted({layer for layer, _ in neurons})
    per_layer = {layer: [n for l, n in neurons if l == layer] for layer in layers}
    reads = [Read(layer, torch.tensor(per_layer[layer])) for layer in layers]
    maxima = lm.max_abs

    def finish(results: list[RowResult]) -> dict[str, Any]:
        (r,) = results
        out = []
        for layer, neuron in neurons:
            j = per_layer[layer].index(neuron)
            g, x = r.x_gate[layer][:, j], r.x_in[layer][:, j]
            values = _values(lm, g, x)
            q = quadrant_codes(g, x)
            q[0] = -1  # BOS: in no quadrant, as when recording
            best = maxima[layer, neuron]  # [4, hooks]
            post = values["hook_post"].abs().numpy()
            relative = [None if c < 0 or not best[c, 0] > 0 else float(post[t] / best[c, 0])
                        for t, c in enumerate(q.tolist())]
            counts = lm.db.neurons.counts[layer, neuron]
            with np.errstate(all="ignore"):
                scales = np.nanmax(np.where(np.isnan(best), -np.inf, best), axis=0)
            out.append({
                "layer": layer, "neuron": neuron,
                "values": {h: [_num(v) for v in values[h].tolist()] for h in HOOKS},
                "quadrants": [None if c < 0 else QUADRANTS[c] for c in q.tolist()],
                "relative": relative,
                "recorded": [{"quadrant": QUADRANTS[c], "slug": QUADRANT_SLUGS[c],
                              "count": None if counts[c] == COUNT_NOT_KNOWN else int(counts[c]),
                              "max_abs": _num(float(best[c, 0]))} for c in range(len(QUADRANTS))],
                "scales": {h: float(s) if np.isfinite(s) else 0.0 for h, s in zip(HOOKS, scales.tolist())},
            })
        return {"model": lm.id, "text": req.text, "tokens": _tokens(lm, ids), "neurons": out}

    return Plan([Row(ids, reads=reads)], finish)


# --- 2. the neurons that fire here ----------------------------------------------------

def plan_fire(lm: LoadedModel, req: FireRequest, limits: Limits) -> Plan:
    ids = tokenize(lm, req.text, limits)
    position = check_position(req.position, len(ids), first=1)
    if len(ids) < 2:
        raise ParameterError(422, "text", "the text has no token after BOS", "1 or more tokens")
    first, last = parse_layer_range(req.layers, lm.db)
    if not 1 <= req.top <= FIRE_TOP_MAX:
        raise ParameterError(422, "top", f"top {req.top} is outside 1..{FIRE_TOP_MAX}", f"1..{FIRE_TOP_MAX}")
    layers = list(range(first, last + 1))
    maxima = lm.max_abs[first:last + 1, :, :, 0]  # [L, N, 4] of hook_post

    def finish(results: list[RowResult]) -> dict[str, Any]:
        (r,) = results
        g = torch.stack([r.x_gate[layer] for layer in layers])  # [L, N]
        x = torch.stack([r.x_in[layer] for layer in layers])
        values = {h: v.numpy() for h, v in _values(lm, g, x).items()}
        q = quadrant_codes(g, x).numpy()
        post = np.abs(values["hook_post"])
        quadrants = []
        for c in range(len(QUADRANTS)):
            inside = q == c
            scale = maxima[:, :, c]
            ranked = inside & (scale > 0)
            with np.errstate(all="ignore"):
                relative = np.where(ranked, post / scale, -np.inf)
            flat = relative.ravel()
            k = min(req.top, int(ranked.sum()))
            best = np.argpartition(-flat, k - 1)[:k] if k else np.zeros(0, np.int64)
            best = best[np.lexsort((best, -flat[best]))]
            neurons = []
            for i in best.tolist():
                li, n = divmod(i, post.shape[1])
                neurons.append({"layer": first + li, "neuron": n,
                                **{name: float(values[h][li, n]) for name, h in
                                   (("x_gate", "hook_pre"), ("x_in", "hook_pre_linear"), ("act", "act"),
                                    ("hook_post", "hook_post"))},
                                "recorded_max_abs": float(scale[li, n]), "relative": float(flat[i])})
            quadrants.append({"quadrant": QUADRANTS[c], "slug": QUADRANT_SLUGS[c], "in_quadrant": int(inside.sum()),
                              "unrecorded": int((inside & ~(scale > 0)).sum()), "neurons": neurons})
        return {"model": lm.id, "text": req.text, "tokens": _tokens(lm, ids), "position": position,
                "layers": [first, last], "quadrants": quadrants}

    return Plan([Row(ids, reads=[Read(layer, position=position) for layer in layers])], finish)


# --- 3. switch it off, or one quadrant of it ---------------------------------------------

def plan_ablate(lm: LoadedModel, req: AblateRequest, limits: Limits) -> Plan:
    ids = tokenize(lm, req.text, limits)
    neurons = parse_neurons(lm, req.neurons, limits)
    if req.mode not in ABLATION_MODES:
        raise not_one_of("mode", req.mode, list(ABLATION_MODES))
    amount = 0.0
    if req.mode == "scale":
        amount = finite("factor", req.factor)
    elif req.mode == "clamp":
        amount = finite("value", req.value)
    quadrant = quadrant_code(req.quadrant) if req.quadrant not in (None, "") else None
    positions = range(len(ids)) if req.position is None else [check_position(req.position, len(ids))]
    target = target_token(lm, req.target) if req.target not in (None, "") else None
    layers = sorted({layer for layer, _ in neurons})
    per_layer = {layer: [n for l, n in neurons if l == layer] for layer in layers}
    edits = [Edit(layer, torch.tensor(per_layer[layer]), req.mode, quadrant, amount) for layer in layers]
    vocab_size = len(lm.db.vocab)

    def top(logp: torch.Tensor) -> list[dict[str, Any]]:
        values, idx = logp[:vocab_size].topk(min(TOP_TOKENS, vocab_size))
        return [{"token_id": i, "token": lm.db.vocab.token(i), "prob": _num(math.exp(v))}
                for v, i in zip(values.tolist(), idx.tolist())]

    def logprobs(token_id: int, before: torch.Tensor, after: torch.Tensor) -> dict[str, Any]:
        return {"token_id": token_id, "token": lm.db.vocab.token(token_id),
                "before": _num(float(before[token_id])), "after": _num(float(after[token_id]))}

    def moved(p_before: torch.Tensor, p_after: torch.Tensor, sign: int) -> list[dict[str, Any]]:
        delta = (p_after - p_before)[:vocab_size] * sign
        values, idx = delta.topk(min(CHANGED_TOKENS, vocab_size))
        return [{"token_id": i, "token": lm.db.vocab.token(i), "before": _num(float(p_before[i])),
                 "after": _num(float(p_after[i]))}
                for v, i in zip(values.tolist(), idx.tolist()) if v > 0]

    def finish(results: list[RowResult]) -> dict[str, Any]:
        clean, edited = results
        before = torch.log_softmax(clean.logits.double(), -1)
        after = torch.log_softmax(edited.logits.double(), -1)
        kl = (before.exp() * (before - after)).sum(-1).clamp_min(0.0)
        changes = []
        for t in positions:
            changes.append({
                "position": t, "token": lm.db.vocab.token(ids[t]), "kl": _num(float(kl[t])),
                "next": logprobs(ids[t + 1], before[t], after[t]) if t + 1 < len(ids) else None,
                "target": None if target is None else logprobs(target, before[t], after[t]),
                "before": top(before[t]), "after": top(after[t]),
                "lost": moved(before[t].exp(), after[t].exp(), -1), "gained": moved(before[t].exp(), after[t].exp(), 1),
            })
        changes.sort(key=lambda c: (-math.inf if c["kl"] is None else -c["kl"], c["position"]))
        counts = {(layer, n): int(edited.edited[layer][j]) if layer in edited.edited else 0
                  for layer in layers for j, n in enumerate(per_layer[layer])}
        return {"model": lm.id, "text": req.text, "tokens": _tokens(lm, ids), "mode": req.mode,
                "quadrant": None if quadrant is None else QUADRANTS[quadrant],
                "factor": amount if req.mode == "scale" else None, "value": amount if req.mode == "clamp" else None,
                "neurons": [{"layer": layer, "neuron": n, "edited": counts[layer, n]} for layer, n in neurons],
                "positions": changes}

    return Plan([Row(ids, logits=True), Row(ids, edits=edits, logits=True)], finish)


PLANS = {"activations": plan_activations, "fire": plan_fire, "ablate": plan_ablate}
