"""What each view shows, as JSON-ready dicts (or, for a list of examples, arrays): one function per view.

The JSON API, the `.json` twin of every page, the page itself and its htmx
fragment are all made from what these return, so they cannot disagree.
The shapes are declared in responses.py, which /openapi.json documents.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from gluscope.schema import GEOMETRY, HOOKS, POST_SIGNS, QUADRANT_SLUGS, QUADRANTS, WEIGHT_KINDS
from gluscope.server import queries
from gluscope.server.db import Database, Vocabulary
from gluscope.server.errors import ParameterError
from gluscope.server.validate import (check_choice, check_index, check_neuron, check_page, hook_code,
                                      quadrant_code)
from gluscope.server.windows import neuron_examples, window_key, window_values

MODEL_FIELDS = ("model_name", "model_source", "model_revision", "weights_file", "quantization", "architecture", "act_fn", "n_layers", "d_model", "d_mlp",
                "vocab_size", "dtype", "dataset", "text_column", "max_length", "n_texts", "n_tokens", "k",
                "window_before", "window_after", "refactor_glu", "weight_convention", "created_at",
                "tool_version", "schema_version")
LAYER_ORDERS = ("asc", "desc")


def _num(x: Any) -> float | None:
    """A float for JSON: None for NULL, NaN or infinity (JSON has no such numbers)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _json_floats(values: np.ndarray) -> list[float | None]:
    """A float32 row as JSON numbers: None where NaN or infinite (JSON has neither)."""
    row = values.tolist()
    return row if np.isfinite(values).all() else [v if math.isfinite(v) else None for v in row]


def model_info(db: Database) -> dict[str, Any]:
    info: dict[str, Any] = {"id": db.id}
    for name in MODEL_FIELDS:
        value = db.meta.get(name)
        info[name] = value.isoformat() if hasattr(value, "isoformat") else value
    info["file"] = db.path.name
    return info


def models_data(registry: dict[str, Database]) -> dict[str, Any]:
    return {"models": [model_info(db) for db in registry.values()]}


def model_data(db: Database) -> dict[str, Any]:
    rows = db.query(queries.LAYER_SUMMARY, {"n_tokens": max(int(db.meta["n_tokens"]), 1)})
    layers = [{"layer": r[0], "n_neurons": r[1],
               "frequency": {slug: _num(r[2 + q]) for q, slug in enumerate(QUADRANT_SLUGS)},
               "frac_flipped": _num(r[6])} for r in rows]
    return {**model_info(db), "layers": layers}


def neuron_data(db: Database, layer: int, neuron: int) -> dict[str, Any]:
    check_neuron(db, layer, neuron)
    t = db.neurons
    counts = t.counts[layer, neuron]
    if counts[0] < 0:  # a neuron the recorder never wrote
        raise ParameterError(404, "neuron", f"neuron {layer}.{neuron} is not in this database", None)
    return neuron_summary(db, layer, neuron, counts.tolist(), bool(t.flipped[layer, neuron]),
                          [t.geometry[name][layer, neuron] for name in GEOMETRY],
                          t.stat_min[layer, neuron].tolist(), t.stat_max[layer, neuron].tolist(),
                          t.stat_mean[layer, neuron].tolist())


def neuron_summary(db: Database, layer: int, neuron: int, counts: list[int], flipped: bool, geometry: list,
                   mins: list[list], maxs: list[list], means: list[list]) -> dict[str, Any]:
    """A neuron's summary body (responses.NeuronSummary) from its counts (QUADRANTS order), its geometry
    (GEOMETRY order) and its stats [quadrant][hook], wherever they were read."""
    n_tokens = int(db.meta["n_tokens"])
    quadrants = []
    for q, (label, slug) in enumerate(zip(QUADRANTS, QUADRANT_SLUGS)):
        count = int(counts[q])
        quadrants.append({
            "quadrant": label, "slug": slug, "count": count,
            "frequency": count / n_tokens if n_tokens else None,
            "stats": {hook: {"min": _num(mins[q][h]), "max": _num(maxs[q][h]), "mean": _num(means[q][h])}
                      for h, hook in enumerate(HOOKS)},
        })
    weights = {"flipped": bool(flipped), **{name: _num(g) for name, g in zip(GEOMETRY, geometry)}}
    return {"model": db.id, "layer": layer, "neuron": neuron, "n_tokens": n_tokens,
            "quadrants": quadrants, "weights": weights}


def weight_tokens_data(db: Database, layer: int, neuron: int) -> dict[str, Any]:
    """The tokens the neuron's weights point at (schema.sql, weight_tokens), by kind, most extreme first.

    `writes` reads the output side by quadrant: where hook_post > 0 (gate+_in+,
    gate-_in-) the neuron promotes `out+` and suppresses `out-`; elsewhere the reverse.
    """
    check_neuron(db, layer, neuron)
    kinds: dict[str, list[dict[str, Any]]] = {k: [] for k in WEIGHT_KINDS}
    for kind, _rank, token_id, score in db.query(queries.WEIGHT_TOKENS, {"layer": layer, "neuron": neuron}):
        kinds[WEIGHT_KINDS[kind]].append({"token_id": token_id, "token": db.vocab.token(token_id),
                                          "score": _num(score)})
    writes = [{"quadrant": QUADRANTS[q], "slug": QUADRANT_SLUGS[q],
               "promotes": "out+" if sign > 0 else "out-", "suppresses": "out-" if sign > 0 else "out+"}
              for q, sign in enumerate(POST_SIGNS)]
    return {"model": db.id, "layer": layer, "neuron": neuron, "tokens": kinds, "writes": writes}


@dataclass
class ExampleList:
    """One (quadrant, hook) list of a neuron's examples, most extreme first, as arrays.

    The JSON body (`to_json`), the page and the htmx fragment are all made
    from this, so they show the same examples and the same numbers.
    """

    model: str
    layer: int
    neuron: int
    quadrant: int                  # code, QUADRANTS order
    hook: int                      # code, HOOKS order
    rank: np.ndarray               # [E]
    value: np.ndarray              # [E] the ranked value at the token of interest
    text_id: np.ndarray            # [E]
    source_index: np.ndarray       # [E] row in the source dataset
    source: list[str | None]       # [E] where each text came from, when the dataset says
    position: np.ndarray           # [E] the token of interest
    window_start: np.ndarray       # [E]
    token_ids: list[np.ndarray]    # E windows of token ids
    values: np.ndarray             # [E, 4, W] float32 in HOOKS order, NaN past each window's end

    def __len__(self) -> int:
        return len(self.rank)

    def describe(self) -> dict[str, Any]:
        """Which list this is, as the JSON body names it."""
        return {"model": self.model, "layer": self.layer, "neuron": self.neuron, "quadrant": QUADRANTS[self.quadrant],
                "slug": QUADRANT_SLUGS[self.quadrant], "hook": HOOKS[self.hook]}

    def scales(self) -> dict[str, float]:
        """max |value| over every token of every window, per value: one colour scale for the list."""
        with np.errstate(all="ignore"):
            m = np.abs(self.values).max(axis=(0, 2), initial=0.0, where=np.isfinite(self.values))
        return dict(zip(HOOKS, m.tolist()))

    def head(self, i: int) -> dict[str, Any]:
        """Example i without its window: rank, the ranked value, where it is."""
        return {"rank": int(self.rank[i]), "value": _num(self.value[i]), "text_id": int(self.text_id[i]),
                "source_index": int(self.source_index[i]), "source": self.source[i],
                "position": int(self.position[i])}

    def example(self, i: int, vocab: Vocabulary) -> dict[str, Any]:
        """Example i as the API shows it: its window's tokens and all four values per token."""
        ids = self.token_ids[i].tolist()
        return {
            **self.head(i), "window_start": int(self.window_start[i]), "token_ids": ids,
            "tokens": [vocab.token(t) for t in ids],
            "activations": {h: _json_floats(self.values[i, k, :len(ids)]) for k, h in enumerate(HOOKS)},
        }

    def to_json(self, vocab: Vocabulary) -> dict[str, Any]:
        return {**self.describe(), "examples": [self.example(i, vocab) for i in range(len(self))]}


def example_list(db: Database, layer: int, neuron: int, quadrant: str, hook: str) -> ExampleList:
    check_neuron(db, layer, neuron)
    q, h = quadrant_code(quadrant), hook_code(hook)
    found = neuron_examples(db, layer, neuron)
    e, w = found.examples, found.windows
    rows = np.flatnonzero((e["quadrant"] == q) & (e["hook"] == h))
    # Each example's window; an example without one (not written by our recorder) is left out.
    wanted = window_key(e["text_id"][rows], e["position"][rows])
    at = np.searchsorted(found.window_key, wanted)
    has_window = at < len(found.window_key)
    has_window[has_window] = found.window_key[at[has_window]] == wanted[has_window]
    rows, at = rows[has_window], at[has_window]
    lengths = w["length"][at]
    values = window_values(found.x_gate, found.x_in, w["start"][at], lengths, str(db.meta["act_fn"]))
    text_id, window_start = e["text_id"][rows].astype(np.int64), w["window_start"][at].astype(np.int64)
    token_ids = [db.texts.token_ids(t, s, s + n) for t, s, n in zip(text_id.tolist(), window_start.tolist(),
                                                                     lengths.tolist())]
    return ExampleList(model=db.id, layer=layer, neuron=neuron, quadrant=q, hook=h, rank=e["rank"][rows],
                       value=e["value"][rows], text_id=text_id, source_index=db.texts.source_index[text_id],
                       source=[db.texts.source[t] for t in text_id.tolist()],
                       position=e["position"][rows].astype(np.int64), window_start=window_start,
                       token_ids=token_ids, values=values)


def text_data(db: Database, text_id: int) -> dict[str, Any]:
    check_index("text_id", text_id, db.n_texts)
    ids = db.texts.token_ids(text_id).tolist()
    return {"model": db.id, "text_id": text_id, "source_index": int(db.texts.source_index[text_id]),
            "source": db.texts.source[text_id],
            "token_ids": ids, "tokens": [db.vocab.token(i) for i in ids], "text": db.vocab.decode(ids[1:])}


def text_parts(db: Database, ids: list[int], position: int | None) -> tuple[str, str, str]:
    """The decoded text split around the marked token (the BOS at position 0 adds nothing)."""
    decode = db.vocab.decode
    if position is None or position == 0:
        return decode(ids[1:]), "", ""
    return decode(ids[1:position]), decode(ids[position:position + 1]), decode(ids[position + 1:])


def layer_data(db: Database, layer: int, sort: str = "neuron", order: str = "asc",
               offset: int = 0, limit: int = 100) -> dict[str, Any]:
    check_index("layer", layer, db.n_layers)
    check_choice("sort", sort, queries.LAYER_SORT_KEYS)
    check_choice("order", order, LAYER_ORDERS)
    check_page(db, offset, limit)
    rows = db.query(queries.layer_neurons(sort, order == "desc"), {"layer": layer, "limit": limit, "offset": offset})
    n_tokens = max(int(db.meta["n_tokens"]), 1)
    neurons = [{"neuron": r[0],
                "frequency": {slug: r[1 + q] / n_tokens for q, slug in enumerate(QUADRANT_SLUGS)},
                "flipped": bool(r[5]), **dict(zip(GEOMETRY, map(_num, r[6:])))} for r in rows]
    return {"model": db.id, "layer": layer, "n_neurons": db.d_mlp, "sort": sort, "order": order,
            "offset": offset, "limit": limit, "neurons": neurons}


def random_neuron(db: Database) -> tuple[int, int]:
    return random.randrange(db.n_layers), random.randrange(db.d_mlp)
