"""One pure function per view: validated arguments in, a JSON-ready dict out.

The JSON API, the `.json` twin of every page, the page itself and its htmx
fragments all call the same function here, so they cannot disagree.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from gluscope.schema import HOOKS, QUADRANT_SLUGS, QUADRANTS
from gluscope.server import queries
from gluscope.server.db import Database
from gluscope.server.errors import ParameterError, not_one_of, out_of_range

LAYER_PAGE_MAX = 1000
MODEL_FIELDS = ("model_name", "model_revision", "architecture", "act_fn", "n_layers", "d_model", "d_mlp",
                "vocab_size", "dtype", "dataset", "text_column", "max_length", "n_texts", "n_tokens", "k",
                "window_before", "window_after", "refactor_glu", "weight_convention", "created_at",
                "tool_version", "schema_version")
WEIGHT_FIELDS = ("flipped", "cos_gate_in", "cos_gate_out", "cos_in_out", "norm_gate", "norm_in", "norm_out")


# --- validation -----------------------------------------------------------

def get_model(registry: dict[str, Database], model: str) -> Database:
    try:
        return registry[model]
    except KeyError:
        raise not_one_of("model", model, sorted(registry), status=404) from None


def check_index(parameter: str, value: int, stop: int) -> int:
    if not 0 <= value < stop:
        raise out_of_range(parameter, value, stop)
    return value


def quadrant_code(value: str) -> int:
    """A quadrant slug (pp) or label (gate+_in+) to its code."""
    if value in QUADRANT_SLUGS:
        return QUADRANT_SLUGS.index(value)
    if value in QUADRANTS:
        return QUADRANTS.index(value)
    raise not_one_of("quadrant", value, list(QUADRANT_SLUGS))


def hook_code(value: str, parameter: str = "hook") -> int:
    if value in HOOKS:
        return HOOKS.index(value)
    raise not_one_of(parameter, value, list(HOOKS))


def parse_neuron_ref(text: str, db: Database) -> tuple[int, int]:
    """'31.9634' (also '31/9634', '31 9634', '31:9634') to a checked (layer, neuron)."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*[./: ]\s*(\d{1,12})\s*", text or "")
    if not m:
        raise ParameterError(422, "to", f"{text[:40]!r} is not layer.neuron, e.g. 3.117", "layer.neuron")
    layer, neuron = int(m.group(1)), int(m.group(2))
    return check_index("layer", layer, db.n_layers), check_index("neuron", neuron, db.d_mlp)


# --- numbers ---------------------------------------------------------------

def _num(x: Any) -> float | None:
    """A float for JSON: None for NULL, NaN or infinity (JSON has no such numbers)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


_erf = np.frompyfunc(math.erf, 1, 1)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


ACT_FNS = {
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "swish": lambda x: x / (1.0 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64)),
    "gelu_python": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64)),
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x / (1.0 + np.exp(-1.702 * x)),
    "relu": lambda x: np.maximum(x, 0.0),
}


def window_arrays(x_gate: np.ndarray, x_in: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                  act_fn: str) -> np.ndarray:
    """All four values per token of many windows, from their stored float16 bit patterns.

    x_gate and x_in hold the windows' bits one after another; window j is
    [starts[j], starts[j] + lengths[j]). Returns [windows, 4 (HOOKS order),
    longest window] float32, NaN past each window's end: a section's windows
    cost one NumPy pass, and the JSON body and both HTML renderings read the
    same numbers.
    """
    lengths = np.asarray(lengths, np.int64)
    width = int(lengths.max(initial=0))
    inside = np.arange(width) < lengths[:, None]
    at = np.where(inside, np.asarray(starts, np.int64)[:, None] + np.arange(width), 0)
    bits = np.zeros((2, len(lengths), width), np.int16)
    if len(x_gate):
        bits[0] = np.where(inside, np.asarray(x_gate, np.int16)[at], 0)
        bits[1] = np.where(inside, np.asarray(x_in, np.int16)[at], 0)
    gate, inn = bits.view(np.float16).astype(np.float64)
    fn = ACT_FNS.get(act_fn)
    with np.errstate(all="ignore"):
        act = fn(gate).astype(np.float32) if fn else np.full(gate.shape, np.nan, np.float32)
        post = (act.astype(np.float64) * inn).astype(np.float32)
    values = np.stack([post, inn.astype(np.float32), gate.astype(np.float32), act], axis=1)
    values[~np.broadcast_to(inside[:, None, :], values.shape)] = np.nan
    return values


def _json_floats(values: np.ndarray) -> list[float | None]:
    """A float32 row as JSON numbers: None where NaN or infinite (JSON has neither)."""
    row = values.tolist()
    return row if np.isfinite(values).all() else [v if math.isfinite(v) else None for v in row]


# --- views -----------------------------------------------------------------

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
    check_index("layer", layer, db.n_layers)
    check_index("neuron", neuron, db.d_mlp)
    t = db.neurons
    counts = t.counts[layer, neuron]
    if counts[0] < 0:  # a neuron the recorder never wrote
        raise ParameterError(404, "neuron", f"neuron {layer}.{neuron} is not in this database", None)
    mins, maxs, means = t.stat_min[layer, neuron].tolist(), t.stat_max[layer, neuron].tolist(), t.stat_mean[layer, neuron].tolist()
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
    weights = {"flipped": bool(t.flipped[layer, neuron]),
               **{name: _num(t.geometry[name][layer, neuron]) for name in WEIGHT_FIELDS[1:]}}
    return {"model": db.id, "layer": layer, "neuron": neuron, "n_tokens": n_tokens,
            "quadrants": quadrants, "weights": weights}


WEIGHT_KINDS = ("out+", "out-", "gate+", "gate-", "in+", "in-")


def weight_tokens_data(db: Database, layer: int, neuron: int) -> dict[str, Any]:
    """The tokens the neuron's weights point at (schema.sql, weight_tokens), by kind, most extreme first.

    `writes` reads the output side by quadrant: where hook_post > 0 (gate+_in+,
    gate-_in-) the neuron promotes `out+` and suppresses `out-`; elsewhere the reverse.
    """
    check_index("layer", layer, db.n_layers)
    check_index("neuron", neuron, db.d_mlp)
    kinds: dict[str, list[dict[str, Any]]] = {k: [] for k in WEIGHT_KINDS}
    for kind, _rank, token_id, score in db.query(queries.WEIGHT_TOKENS, {"layer": layer, "neuron": neuron}):
        kinds[WEIGHT_KINDS[kind]].append({"token_id": token_id, "token": db.token(token_id), "score": _num(score)})
    writes = [{"quadrant": QUADRANTS[q], "slug": QUADRANT_SLUGS[q],
               "promotes": "out+" if q in (0, 3) else "out-", "suppresses": "out-" if q in (0, 3) else "out+"}
              for q in range(4)]
    return {"model": db.id, "layer": layer, "neuron": neuron, "tokens": kinds, "writes": writes}


@dataclass
class NeuronExamples:
    """One neuron's 16 lists and the windows they point at, as NumPy columns read from the file."""

    examples: dict[str, np.ndarray]  # quadrant, hook, rank, value, text_id, position; by (quadrant, hook, rank)
    windows: dict[str, np.ndarray]   # text_id, position, window_start, start, length; by (text_id, position)
    x_gate: np.ndarray               # every window's float16 bits, one window after another (start, length)
    x_in: np.ndarray
    window_key: np.ndarray           # text_id << 16 | position per window, ascending


def _window_key(text_id: np.ndarray, position: np.ndarray) -> np.ndarray:
    return (text_id.astype(np.int64) << 16) | position.astype(np.int64)


def _take(columns: dict[str, np.ndarray], order: np.ndarray) -> dict[str, np.ndarray]:
    return {name: column[order] for name, column in columns.items()}


EXAMPLE_COLUMNS = ("quadrant", "hook", "rank", "value", "text_id", "position")
WINDOW_COLUMNS = ("text_id", "position", "window_start")


def neuron_examples(db: Database, layer: int, neuron: int) -> NeuronExamples:
    """All examples of a neuron, from the cache or from one scan of each table (sorted here, not by DuckDB)."""
    cached = db.examples.get((layer, neuron))
    if cached is not None:
        return cached
    found = {name: np.ma.getdata(column) for name, column in
             db.prepared_columns("neuron_examples", layer, neuron).items()}
    is_example = found["part"] == 0
    e = {name: found[name][is_example] for name in EXAMPLE_COLUMNS}
    examples = _take(e, np.lexsort((e["rank"], e["hook"], e["quadrant"])))
    # Window rows come one per token, each window's tokens together and in order (unnest).
    is_token = ~is_example
    token_key = _window_key(found["text_id"][is_token], found["position"][is_token])
    first = np.flatnonzero(np.r_[True, token_key[1:] != token_key[:-1]]) if len(token_key) else np.zeros(0, np.int64)
    key = token_key[first]
    order = np.argsort(key, kind="stable")
    if len(key) and (np.diff(key[order]) == 0).any():
        raise RuntimeError("DuckDB returned a window's tokens apart: the query's unnest order changed")
    w = {name: found[name][is_token][first] for name in WINDOW_COLUMNS}
    w["start"], w["length"] = first, np.diff(np.r_[first, len(token_key)])
    result = NeuronExamples(examples=examples, windows=_take(w, order), window_key=key[order],
                            x_gate=found["g"][is_token].astype(np.int16), x_in=found["i"][is_token].astype(np.int16))
    db.examples.put((layer, neuron), result)
    return result


@dataclass
class Section:
    """One (quadrant, hook) list of a neuron, most extreme first, as arrays.

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
    position: np.ndarray           # [E] the token of interest
    window_start: np.ndarray       # [E]
    token_ids: list[np.ndarray]    # E windows of token ids
    values: np.ndarray             # [E, 4, W] float32 in HOOKS order, NaN past each window's end

    def __len__(self) -> int:
        return len(self.rank)

    def scales(self) -> dict[str, float]:
        """max |value| over every token of every window, per value: one colour scale for the section."""
        with np.errstate(all="ignore"):
            m = np.abs(self.values).max(axis=(0, 2), initial=0.0, where=np.isfinite(self.values))
        return dict(zip(HOOKS, m.tolist()))

    def head(self, i: int) -> dict[str, Any]:
        """Example i without its window: rank, the ranked value, where it is."""
        return {"rank": int(self.rank[i]), "value": _num(self.value[i]), "text_id": int(self.text_id[i]),
                "source_index": int(self.source_index[i]), "position": int(self.position[i])}

    def example(self, i: int, db: Database) -> dict[str, Any]:
        """Example i as the API shows it: its window's tokens and all four values per token."""
        ids = self.token_ids[i].tolist()
        return {
            **self.head(i), "window_start": int(self.window_start[i]), "token_ids": ids,
            "tokens": [db.token(t) for t in ids],
            "activations": {h: _json_floats(self.values[i, k, :len(ids)]) for k, h in enumerate(HOOKS)},
        }

    def to_json(self, db: Database) -> dict[str, Any]:
        return {"model": self.model, "layer": self.layer, "neuron": self.neuron, "quadrant": QUADRANTS[self.quadrant],
                "slug": QUADRANT_SLUGS[self.quadrant], "hook": HOOKS[self.hook],
                "examples": [self.example(i, db) for i in range(len(self))]}


def examples_section(db: Database, layer: int, neuron: int, quadrant: str, hook: str) -> Section:
    check_index("layer", layer, db.n_layers)
    check_index("neuron", neuron, db.d_mlp)
    q, h = quadrant_code(quadrant), hook_code(hook)
    found = neuron_examples(db, layer, neuron)
    e, w = found.examples, found.windows
    rows = np.flatnonzero((e["quadrant"] == q) & (e["hook"] == h))
    # Each example's window; an example without one (not written by our recorder) is left out.
    wanted = _window_key(e["text_id"][rows], e["position"][rows])
    at = np.searchsorted(found.window_key, wanted)
    has_window = at < len(found.window_key)
    has_window[has_window] = found.window_key[at[has_window]] == wanted[has_window]
    rows, at = rows[has_window], at[has_window]
    lengths = w["length"][at]
    values = window_arrays(found.x_gate, found.x_in, w["start"][at], lengths, str(db.meta["act_fn"]))
    text_id, window_start = e["text_id"][rows].astype(np.int64), w["window_start"][at].astype(np.int64)
    token_ids = [db.texts.token_ids(t, s, s + n) for t, s, n in zip(text_id.tolist(), window_start.tolist(),
                                                                     lengths.tolist())]
    return Section(model=db.id, layer=layer, neuron=neuron, quadrant=q, hook=h, rank=e["rank"][rows],
                   value=e["value"][rows], text_id=text_id, source_index=db.texts.source_index[text_id],
                   position=e["position"][rows].astype(np.int64), window_start=window_start,
                   token_ids=token_ids, values=values)


def text_data(db: Database, text_id: int) -> dict[str, Any]:
    check_index("text_id", text_id, db.n_texts)
    ids = db.texts.token_ids(text_id).tolist()
    return {"model": db.id, "text_id": text_id, "source_index": int(db.texts.source_index[text_id]),
            "token_ids": ids, "tokens": [db.token(i) for i in ids], "text": db.decode(ids[1:])}


def layer_data(db: Database, layer: int, sort: str = "neuron", order: str = "asc",
               offset: int = 0, limit: int = 100) -> dict[str, Any]:
    check_index("layer", layer, db.n_layers)
    if sort not in queries.LAYER_SORT_KEYS:
        raise not_one_of("sort", sort, list(queries.LAYER_SORT_KEYS))
    if order not in ("asc", "desc"):
        raise not_one_of("order", order, ["asc", "desc"])
    if not 0 <= offset < max(db.d_mlp, 1):
        raise out_of_range("offset", offset, db.d_mlp)
    if not 1 <= limit <= LAYER_PAGE_MAX:
        raise ParameterError(422, "limit", f"limit {limit} is outside 1..{LAYER_PAGE_MAX}", f"1..{LAYER_PAGE_MAX}")
    rows = db.query(queries.layer_neurons(sort, order == "desc"), {"layer": layer, "limit": limit, "offset": offset})
    n_tokens = max(int(db.meta["n_tokens"]), 1)
    neurons = [{"neuron": r[0],
                "frequency": {slug: r[1 + q] / n_tokens for q, slug in enumerate(QUADRANT_SLUGS)},
                **dict(zip(WEIGHT_FIELDS, (bool(r[5]), *map(_num, r[6:]))))} for r in rows]
    return {"model": db.id, "layer": layer, "n_neurons": db.d_mlp, "sort": sort, "order": order,
            "offset": offset, "limit": limit, "neurons": neurons}


def random_neuron(db: Database) -> tuple[int, int]:
    return random.randrange(db.n_layers), random.randrange(db.d_mlp)
