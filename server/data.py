"""What each view shows, as JSON-ready dicts (or, for a list of examples, arrays): one function per view.

The JSON API, the `.json` twin of every page, the page itself and its htmx
fragment are all made from what these return, so they cannot disagree.
The shapes are declared in responses.py, which /openapi.json documents.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gluscope.schema import (EXAMPLE_KINDS, GEOMETRY, HISTOGRAM_HOOKS, HOOKS, POST_SIGNS, QUADRANT_SLUGS, QUADRANTS,
                             SAMPLE_KINDS, WEIGHT_KINDS)
from gluscope.server import plots, queries
from gluscope.server.db import COUNT_NOT_KNOWN, NO_ROW, Database, Vocabulary
from gluscope.server.errors import ParameterError
from gluscope.server.experts import Expert
from gluscope.server.responses import ModelInfo
from gluscope.server.validate import (check_choice, check_expert, check_index, check_neuron, check_page, hook_code,
                                      quadrant_code)
from gluscope.server.windows import neuron_examples, window_key, window_values

# The metadata columns a model's body shows: the fields responses.ModelInfo declares, but for the id URLs use
# and the file's name (tests/test_schema.py checks each is a column of schema.sql's metadata).
MODEL_FIELDS: tuple[str, ...] = tuple(name for name in ModelInfo.model_fields if name not in ("id", "file"))
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
    """The model and its layers' summary. It reads every neuron's row, and the file never changes: computed
    once per process (at 16 clients it otherwise cost more than an examples list: see docs/performance.md)."""
    found = db.derived.get("model")
    if found is None:
        found = _model_data(db)
        db.derived.put("model", found)
    return found


def _model_data(db: Database) -> dict[str, Any]:
    rows = db.query(queries.layer_summary(db.experts.any, db.stated), {"n_tokens": max(int(db.meta["n_tokens"]), 1)})
    layers = [{"layer": r[0], "n_neurons": r[1],
               "frequency": {slug: _num(r[2 + q]) for q, slug in enumerate(QUADRANT_SLUGS)},
               "frac_flipped": _num(r[6]), "r_gate_pos_cos_in_out": _num(r[7]),
               **layer_router(db, r[0])} for r in rows]
    return {**model_info(db), "layers": layers}


def layer_router(db: Database, layer: int) -> dict[str, Any]:
    """A layer's experts and router (schema.sql, layers), in a file with experts: what its bodies add."""
    if not db.experts.any:
        return {}
    lay = db.experts.layers[layer] if 0 <= layer < db.n_layers else None
    if lay is None:
        return {"n_experts": 0, "n_shared_experts": 0, "top_k": 0, "router": None, "imbalance": None}
    return {"n_experts": lay.n_experts, "n_shared_experts": len(lay.shared), "top_k": lay.top_k,
            "router": lay.router, "imbalance": _num(lay.imbalance)}


def expert_summary(db: Database, e: Expert) -> dict[str, Any]:
    """One expert's router statistics: how many counted tokens it received and with what weight."""
    n_tokens = int(db.meta["n_tokens"])
    return {"layer": e.layer, "expert": e.expert, "shared": e.shared, "first_neuron": e.first_neuron,
            "n_neurons": e.n_neurons, "tokens": e.tokens, "share": e.tokens / n_tokens if n_tokens else None,
            "weight_sum": _num(e.weight_sum), "mean_weight": _num(e.mean_weight)}


def neuron_data(db: Database, layer: int, neuron: int) -> dict[str, Any]:
    check_neuron(db, layer, neuron)
    t = db.neurons
    counts = t.counts[layer, neuron]
    if counts[0] == NO_ROW:  # a neuron the recorder never wrote
        raise ParameterError(404, "neuron", f"neuron {db.experts.address(layer, neuron)} is not in this database",
                             None)
    routed = None
    if t.routed is not None and db.experts.expert_at(layer, neuron) is not None:
        routed = [a[layer, neuron].tolist() for a in t.routed]
    return neuron_summary(db, layer, neuron, [None if c == COUNT_NOT_KNOWN else c for c in counts.tolist()],
                          t.frequency[layer, neuron].tolist(), bool(t.flipped[layer, neuron]),
                          [t.geometry[name][layer, neuron] for name in GEOMETRY], t.stat_min[layer, neuron].tolist(),
                          t.stat_max[layer, neuron].tolist(), t.stat_mean[layer, neuron].tolist(), routed)


def neuron_summary(db: Database, layer: int, neuron: int, counts: list[int | None], frequencies: list[float | None],
                   flipped: bool, geometry: list, mins: list[list], maxs: list[list], means: list[list],
                   routed: list[list] | None = None) -> dict[str, Any]:
    """A neuron's summary body (responses.NeuronSummary) from its counts and frequencies (QUADRANTS order, the
    latter as queries.frequency() defines them), its geometry (GEOMETRY order) and its stats [quadrant][hook],
    wherever they were read; for an expert neuron also its routed values ([min, max, mean][quadrant],
    schema.sql routed_values).

    An expert neuron's frequencies are over the tokens routed to its expert (experts.Experts.tokens); in a
    file with experts the body says so (counted_tokens), names the expert (router) and adds each quadrant's
    routed values.
    """
    n_tokens = int(db.meta["n_tokens"])
    tokens = db.experts.tokens(layer, neuron, n_tokens)
    moe = db.experts.any
    quadrants = []
    for q, (label, slug) in enumerate(zip(QUADRANTS, QUADRANT_SLUGS)):
        quadrants.append({
            "quadrant": label, "slug": slug, "count": None if counts[q] is None else int(counts[q]),
            "frequency": _num(frequencies[q]),
            "stats": {hook: {"min": _num(mins[q][h]), "max": _num(maxs[q][h]), "mean": _num(means[q][h])}
                      for h, hook in enumerate(HOOKS)},
        })
        if moe:
            quadrants[-1]["routed"] = None if routed is None else {
                "min": _num(routed[0][q]), "max": _num(routed[1][q]), "mean": _num(routed[2][q])}
    weights = {name: _num(g) for name, g in zip(GEOMETRY, geometry)}
    # An import without a model knows no weights: neither their geometry nor whether they were flipped.
    weights = {"flipped": None if all(v is None for v in weights.values()) else bool(flipped), **weights}
    body = {"model": db.id, "layer": layer, "neuron": neuron, **db.experts.ref(layer, neuron), "n_tokens": n_tokens,
            "quadrants": quadrants, "weights": weights}
    if moe:
        e = db.experts.expert_at(layer, neuron)
        body["counted_tokens"] = tokens
        body["router"] = None if e is None else {**expert_summary(db, e), **layer_router(db, layer)}
    return body


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
    return {"model": db.id, "layer": layer, "neuron": neuron, **db.experts.ref(layer, neuron), "tokens": kinds,
            "writes": writes}


@dataclass
class ExampleList:
    """One list of a neuron's examples, as arrays: the top-k of a (quadrant, hook), most extreme first, or the
    quadrant's random or interval samples (schema.sql, samples), each showing the value of `hook`.

    The JSON body (`to_json`), the page and the htmx fragment are all made
    from this, so they show the same examples and the same numbers.
    """

    model: str
    layer: int
    neuron: int
    quadrant: int                  # code, QUADRANTS order
    hook: int                      # code, HOOKS order
    rank: np.ndarray               # [E]
    value: np.ndarray              # [E] the hook's value at the token of interest
    text_id: np.ndarray            # [E]
    source_index: np.ndarray       # [E] row in the source dataset
    source: list[str | None]       # [E] where each text came from, when the dataset says
    position: np.ndarray           # [E] the token of interest
    window_start: np.ndarray       # [E]
    token_ids: list[np.ndarray]    # E windows of token ids
    values: np.ndarray             # [E, 4, W] float32 in HOOKS order, NaN past each window's end
    kind: int = 0                  # code, EXAMPLE_KINDS order
    interval: np.ndarray | None = None  # [E] each example's interval, for kind interval
    bounds: dict[int, tuple[float | None, float | None]] = field(default_factory=dict)  # interval -> (lo, hi)
    selected: int | None = None    # the one interval asked for, if any
    ref: dict[str, Any] = field(default_factory=dict)  # experts.Experts.ref: the neuron's expert and address
    texts: dict[int, str] = field(default_factory=dict)  # the whole text of each example without a position
    not_routed: str | None = None  # an expert neuron's: what its windows' NaN tokens were ("not routed to expert 3")

    def __len__(self) -> int:
        return len(self.rank)

    def describe(self) -> dict[str, Any]:
        """Which list this is, as the JSON body names it."""
        return {"model": self.model, "layer": self.layer, "neuron": self.neuron, **self.ref,
                "quadrant": QUADRANTS[self.quadrant],
                "slug": QUADRANT_SLUGS[self.quadrant], "hook": HOOKS[self.hook], "kind": EXAMPLE_KINDS[self.kind],
                "interval": self.selected,
                "intervals": [{"interval": i, "lo": lo, "hi": hi} for i, (lo, hi) in self.bounds.items()]}

    def colour(self, colour: str | None = None) -> str:
        """The value that colours the tokens: `colour` (checked), by default the list's own."""
        return HOOKS[self.hook if colour is None else hook_code(colour, "colour")]

    def scales(self) -> dict[str, float]:
        """max |value| over every token of every window, per value: one colour scale for the list."""
        with np.errstate(all="ignore"):
            m = np.abs(self.values).max(axis=(0, 2), initial=0.0, where=np.isfinite(self.values))
        return dict(zip(HOOKS, m.tolist()))

    def head(self, i: int) -> dict[str, Any]:
        """Example i without its window: rank, the value, where it is (and its interval's bounds)."""
        out = {"rank": int(self.rank[i]), "value": _num(self.value[i]), "text_id": int(self.text_id[i]),
               "source_index": int(self.source_index[i]), "source": self.source[i],
               "position": int(self.position[i]) if self.position[i] >= 0 else None}
        if self.interval is not None:
            out["interval"] = list(self.bounds[int(self.interval[i])])
        return out

    def example(self, i: int, vocab: Vocabulary) -> dict[str, Any]:
        """Example i as the API shows it: its window's tokens and all four values per token."""
        ids = self.token_ids[i].tolist()
        at_text = self.position[i] < 0
        return {
            **self.head(i), "window_start": None if at_text else int(self.window_start[i]), "token_ids": ids,
            **({"text": self.texts[int(self.text_id[i])]} if at_text else {}),
            "tokens": [vocab.token(t) for t in ids],
            "activations": {h: _json_floats(self.values[i, k, :len(ids)]) for k, h in enumerate(HOOKS)},
        }

    def to_json(self, vocab: Vocabulary) -> dict[str, Any]:
        return {**self.describe(), "examples": [self.example(i, vocab) for i in range(len(self))]}


# Where a sample's value of each hook is (HOOKS order): samples store x_gate, x_in and act; hook_post is
# act * x_in in float32, as the recorder computes it (windows._samples).
SAMPLE_VALUE_COLUMNS = ("hook_post", "x_in", "x_gate", "act")


def read_example_list(db: Database, layer: int, neuron: int, quadrant: str, hook: str, kind: str = "top",
                      interval: int | None = None) -> ExampleList:
    """One list of a neuron's examples, read from the file (or the neuron's cached rows): the top list of
    (quadrant, hook), or the quadrant's random or interval samples showing `hook`."""
    check_neuron(db, layer, neuron)
    found_list = _read_example_list(db, layer, neuron, quadrant, hook, kind, interval)
    found_list.ref = db.experts.ref(layer, neuron)
    e = db.experts.expert_at(layer, neuron)
    if e is not None and not e.shared:  # a shared expert sees every token
        found_list.not_routed = f"not routed to expert {e.expert}"
    return found_list


def _read_example_list(db: Database, layer: int, neuron: int, quadrant: str, hook: str, kind: str,
                       interval: int | None) -> ExampleList:
    q, h = quadrant_code(quadrant), hook_code(hook)
    check_choice("kind", kind, EXAMPLE_KINDS)
    if interval is not None and kind != "interval":
        raise ParameterError(422, "interval", f"interval={interval} picks one interval of kind=interval, "
                             f"not of kind={kind}", "kind=interval")
    if kind == "top":
        found = neuron_examples(db, layer, neuron)
        e = found.examples
        rows = np.flatnonzero((e["quadrant"] == q) & (e["hook"] == h))
        return _with_windows(db, found, layer, neuron, q, h, e["rank"][rows], e["value"][rows],
                             e["text_id"][rows], e["position"][rows])
    found = neuron_examples(db, layer, neuron, with_samples=True)
    s, iv = found.samples, db.neuron_intervals(layer, neuron)
    code = SAMPLE_KINDS.index(kind)
    mine = iv["quadrant"] == q
    bounds = {int(i): (_num(lo), _num(hi)) for i, lo, hi in zip(iv["interval"][mine], iv["lo"][mine], iv["hi"][mine])}
    keep = (s["quadrant"] == q) & (s["kind"] == code)
    if interval is not None:
        if interval not in bounds:
            valid = f"0..{max(bounds)}" if bounds else "none (this quadrant has no intervals)"
            raise ParameterError(404, "interval", f"interval {interval} does not exist for {QUADRANTS[q]}; "
                                 f"valid: {valid}", valid)
        keep &= s["interval"] == interval
    rows = np.flatnonzero(keep)
    found_list = _with_windows(db, found, layer, neuron, q, h, s["rank"][rows], s[SAMPLE_VALUE_COLUMNS[h]][rows],
                               s["text_id"][rows], s["position"][rows],
                               s["interval"][rows] if kind == "interval" else None)
    found_list.kind = EXAMPLE_KINDS.index(kind)
    if kind == "interval":
        found_list.bounds, found_list.selected = bounds, interval
        if found_list.interval is not None and not np.isin(found_list.interval, list(bounds)).all():
            raise ParameterError(503, None, f"{db.path.name}: a sample of {layer}.{neuron} names an interval "
                                 "the intervals table does not hold; the file is damaged")
    return found_list


def _with_windows(db: Database, found, layer: int, neuron: int, q: int, h: int, rank: np.ndarray,
                  value: np.ndarray, text_id: np.ndarray, position: np.ndarray,
                  interval: np.ndarray | None = None) -> ExampleList:
    """The examples at these tokens, with their windows; one without a window (never from our recorder)
    is left out, but for an imported example without a position (-1), which comes with its whole text."""
    wanted = window_key(text_id, position)
    at = np.searchsorted(found.window_key, wanted)
    has_window = at < len(found.window_key)
    has_window[has_window] = found.window_key[at[has_window]] == wanted[has_window]
    at_text = position < 0
    at = np.where(has_window, np.minimum(at, len(found.window_key) - 1), -1)
    has_window |= at_text
    at = at[has_window]
    w = found.windows

    def per_example(column: str, missing: int) -> np.ndarray:
        """w[column] of each example's window; `missing` for an example at text level (at -1: no window)."""
        if not len(w[column]):
            return np.full(len(at), missing, np.int64)
        return np.where(at >= 0, w[column][np.maximum(at, 0)], missing)

    lengths = per_example("length", 0)
    values = window_values(found.x_gate, found.x_in, per_example("start", 0), lengths, str(db.meta["act_fn"]))
    text_id = text_id[has_window].astype(np.int64)
    window_start = per_example("window_start", -1).astype(np.int64)
    token_ids = [db.texts.token_ids(t, s, s + n) for t, s, n in zip(text_id.tolist(), window_start.tolist(),
                                                                     lengths.tolist())]
    return ExampleList(model=db.id, layer=layer, neuron=neuron, quadrant=q, hook=h, rank=rank[has_window],
                       value=value[has_window], text_id=text_id, source_index=db.texts.source_index[text_id],
                       source=[db.texts.source[t] for t in text_id.tolist()],
                       position=position[has_window].astype(np.int64), window_start=window_start,
                       token_ids=token_ids, values=values,
                       interval=None if interval is None else interval[has_window],
                       texts=whole_texts(db, text_id[at_text[has_window]]))


def whole_texts(db: Database, text_ids: np.ndarray) -> dict[int, str]:
    """Each text as whole_text gives it."""
    if not len(text_ids):
        return {}
    ids = sorted(set(text_ids.tolist()))
    # Only an import stores its texts (schema.sql, texts.text): a recording's are decoded, without a query.
    stored = dict(db.query(queries.TEXT_STRINGS, {"text_ids": ids})) if db.meta.get("imported_from") else {}
    return {t: whole_text(db, t, stored.get(t)) for t in ids}


def whole_text(db: Database, text_id: int, stored: str | None) -> str:
    """A text as its dataset gave it (`stored`, its texts.text: an import's), else decoded from its tokens after
    the BOS: what every page, the Python API and an export show as a text."""
    return stored if stored is not None else db.vocab.decode(db.texts.token_ids(text_id, start=1))


def histograms_data(db: Database, layer: int, neuron: int) -> dict[str, Any]:
    """A neuron's histograms (per value and quadrant), joint density and intervals of |hook_post|.

    Each value's bins are trimmed to the run from the first to the last bin
    that holds a token in any quadrant (`first_bin` says where it starts in
    histogram_bins), and the density's axes likewise: edges has one more
    entry than counts, or both are empty when the neuron counted no token.
    """
    check_neuron(db, layer, neuron)
    cached = db.distributions.get((layer, neuron))
    if cached is None:
        cached = _histograms_data(db, layer, neuron)
        db.distributions.put((layer, neuron), cached)
    return cached


def _histograms_data(db: Database, layer: int, neuron: int) -> dict[str, Any]:
    raw = db.prepared_columns("neuron_distribution", layer, neuron)
    c = {name: np.ma.getdata(column) for name, column in raw.items()}
    part = c["part"]
    edges = db.bin_edges.get("value", [])
    n_bins = max(len(edges) - 1, 0)
    hooks = [HOOKS.index(name) for name in HISTOGRAM_HOOKS]
    hist = np.zeros((len(QUADRANTS), len(HISTOGRAM_HOOKS), n_bins), np.int64)
    sel = part == 0
    q, hk, b, n = (c[k][sel].astype(np.int64) for k in ("quadrant", "hook", "a", "count"))
    ok = (q >= 0) & (q < len(QUADRANTS)) & np.isin(hk, hooks) & (b >= 0) & (b < n_bins)
    np.add.at(hist, (q[ok], np.searchsorted(hooks, hk[ok]), b[ok]), n[ok])

    values = {}
    for k, name in enumerate(HISTOGRAM_HOOKS):
        first, stop = _nonempty(hist[:, k].sum(axis=0))
        values[name] = {"first_bin": first, "edges": edges[first:stop + 1] if stop > first else [],
                        "counts": {label: hist[qi, k, first:stop].tolist() for qi, label in enumerate(QUADRANTS)}}

    d_edges = db.bin_edges.get("density", [])
    nd = max(len(d_edges) - 1, 0)
    grid = np.zeros((nd, nd), np.int64)
    sel = part == 1
    gi, ii, n = (c[k][sel].astype(np.int64) for k in ("a", "b", "count"))
    ok = (gi >= 0) & (gi < nd) & (ii >= 0) & (ii < nd)
    np.add.at(grid, (gi[ok], ii[ok]), n[ok])
    g0, g1 = _nonempty(grid.sum(axis=1))
    i0, i1 = _nonempty(grid.sum(axis=0))
    density = {"first_gate_bin": g0, "first_in_bin": i0,
               "gate_edges": d_edges[g0:g1 + 1] if g1 > g0 else [], "in_edges": d_edges[i0:i1 + 1] if i1 > i0 else [],
               "counts": grid[g0:g1, i0:i1].tolist()}

    n_tokens = int(db.meta["n_tokens"])
    tokens = db.experts.tokens(layer, neuron, n_tokens)  # an expert neuron's: those routed to its expert
    known = distributions_known(db)
    if known:
        # A recording's histograms hold every counted token once per value (schema.sql: a quadrant's counts sum
        # to its count in `neurons`): their sums are the neuron page's counts, with no lookup of its row.
        counts: list[int | None] = hist[:, 0].sum(axis=1).tolist()
        frequencies = [c / tokens if tokens else None for c in counts]
    else:  # empty histograms would say 0: the neuron page's numbers instead, the layout's own where no count is
        counts, frequencies = neuron_frequencies(db, layer, neuron)
    iv = db.neuron_intervals(layer, neuron)
    bounds = [(q, i, lo, None if np.isnan(hi) else hi) for q, i, lo, hi in
              zip(iv["quadrant"].tolist(), iv["interval"].tolist(), iv["lo"].tolist(), iv["hi"].tolist())]
    post = HISTOGRAM_HOOKS.index("hook_post")
    magnitudes = _bin_magnitudes(edges)
    quadrants = []
    for qi, (label, slug) in enumerate(zip(QUADRANTS, QUADRANT_SLUGS)):
        intervals = [{"interval": i, "lo": _num(lo), "hi": _num(hi), "count": _interval_count(hist[qi, post], magnitudes, lo, hi)}
                     for qq, i, lo, hi in bounds if qq == qi]
        quadrants.append({"quadrant": label, "slug": slug, "count": counts[qi], "frequency": frequencies[qi],
                          "intervals": intervals})
    body = {"model": db.id, "layer": layer, "neuron": neuron, **db.experts.ref(layer, neuron), "n_tokens": n_tokens,
            **({} if known else {"distributions_known": False}),
            "values": values, "density": density, "quadrants": quadrants}
    if db.experts.any:
        body["counted_tokens"] = tokens
    return body


def distributions_known(db: Database) -> bool:
    """Whether the file holds its neurons' distributions (histograms, density, intervals): an import of the
    paper's layout has none, as the layout has none."""
    return db.meta.get("imported_from") is None


def neuron_frequencies(db: Database, layer: int, neuron: int) -> tuple[list[int | None], list[float | None]]:
    """A neuron's count and frequency of each quadrant as its page gives them (queries.frequency: None where a
    count is not known, an import's stated frequency), read from the file (a reader holds no NeuronTable)."""
    rows = db.query(queries.neuron_rows(1, db.experts.any, db.stated),
                    {"layer_0": layer, "neuron_0": neuron, "n_tokens": int(db.meta["n_tokens"])})
    if not rows:  # a neuron the writer left out: nothing is known of it
        return [None] * len(QUADRANTS), [None] * len(QUADRANTS)
    row = rows[0][1:]  # NEURON_COLUMNS (the counts first), then the frequencies
    return ([None if c is None else int(c) for c in row[:len(QUADRANTS)]],
            [_num(f) for f in row[-len(QUADRANTS):]])


def _nonempty(counts: np.ndarray) -> tuple[int, int]:
    """[first, stop) of the run from the first to the last non-zero entry; (0, 0) when all are zero."""
    nz = np.flatnonzero(counts)
    return (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)


def _bin_magnitudes(edges: list[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """Each signed bin's range of |value|: (inner, outer), outer inf for an open bin."""
    e = np.array([np.nan if v is None else v for v in edges], np.float64)
    a, b = np.abs(e[:-1]), np.abs(e[1:])
    open_lo, open_hi = np.isnan(e[:-1]), np.isnan(e[1:])
    inner = np.where(open_lo, b, np.where(open_hi, a, np.minimum(a, b)))
    outer = np.where(open_lo | open_hi, np.inf, np.maximum(a, b))
    return inner, outer


def _interval_count(counts: np.ndarray, magnitudes: tuple[np.ndarray, np.ndarray], lo: float,
                    hi: float | None) -> int | None:
    """Tokens with |hook_post| in [lo, hi), from the histogram: exact, since interval bounds are bin edges
    (schema.sql); None where a bound falls inside a bin that holds tokens."""
    if not len(counts):
        return 0
    inner, outer = magnitudes
    top = np.inf if hi is None else hi
    inside = (inner >= lo) & (outer <= top)
    straddles = ((inner < lo) & (outer > lo)) | ((inner < top) & (outer > top))
    if (counts[straddles] > 0).any():
        return None
    return int(counts[inside].sum())


def text_data(db: Database, text_id: int) -> dict[str, Any]:
    """One text: its token ids and tokens, and the text as whole_texts gives it."""
    check_index("text_id", text_id, db.n_texts)
    ids = db.texts.token_ids(text_id).tolist()
    return {"model": db.id, "text_id": text_id, "source_index": int(db.texts.source_index[text_id]),
            "source": db.texts.source[text_id], "token_ids": ids, "tokens": [db.vocab.token(i) for i in ids],
            "text": whole_texts(db, np.array([text_id]))[text_id]}


def tokens_known(db: Database) -> bool:
    """Whether the file has a vocabulary to decode its token ids with: an import without --model has none."""
    return len(db.vocab) > 0


def text_parts(db: Database, body: dict[str, Any], position: int | None) -> tuple[str, str, str]:
    """A text body (text_data) split around the marked token (the BOS at position 0 adds nothing); the body's
    text whole where no token is marked (none can be where the tokens are not known: tokens_known)."""
    ids, decode = body["token_ids"], db.vocab.decode
    if position is None or position == 0:
        return body["text"], "", ""
    return decode(ids[1:position]), decode(ids[position:position + 1]), decode(ids[position + 1:])


def layer_data(db: Database, layer: int, sort: str = "neuron", order: str = "asc",
               offset: int = 0, limit: int = 100, expert: int | None = None) -> dict[str, Any]:
    """One page of a layer's neurons (or of one expert's, `expert`), sorted.

    In a mixture-of-experts layer each neuron's frequencies are over the tokens routed to its expert, and the
    sort by a frequency follows them; the body adds the layer's experts (layer_experts) in a file with experts.
    """
    check_index("layer", layer, db.n_layers)
    e = None if expert is None else check_expert(db, layer, expert)
    check_choice("sort", sort, queries.LAYER_SORT_KEYS)
    check_choice("order", order, LAYER_ORDERS)
    width = db.experts.width(layer) if e is None else e.n_neurons
    check_page(db, offset, limit, width)
    page = {"layer": layer, "limit": limit, "offset": offset, "n_tokens": max(int(db.meta["n_tokens"]), 1)}
    if db.experts.is_moe(layer):
        lo = 0 if e is None else e.first_neuron
        rows = db.query(queries.layer_neurons(sort, order == "desc", True, db.stated),
                        {**page, "lo": lo, "hi": lo + width - 1})
    else:
        rows = db.query(queries.layer_neurons(sort, order == "desc", False, db.stated), page)
    neurons = [{"neuron": r[0], **db.experts.ref(layer, r[0]),
                "frequency": {slug: _num(r[1 + q]) for q, slug in enumerate(QUADRANT_SLUGS)},
                "flipped": bool(r[5]), **dict(zip(GEOMETRY, map(_num, r[6:6 + len(GEOMETRY)])))}
               for r in rows]
    body = {"model": db.id, "layer": layer, "n_neurons": width, "sort": sort, "order": order,
            "offset": offset, "limit": limit, "neurons": neurons}
    if db.experts.any:
        body.update(expert=expert, **layer_experts(db, layer))
    return body


# Tokens listed per expert and list (by count, by weight, by share), and the fewest occurrences in the corpus a
# token needs to be ranked by share (a token seen once has a share of 1 at every expert it went to).
EXPERT_TOP_TOKENS = 12
SHARE_MIN_OCCURRENCES = 5


def layer_experts(db: Database, layer: int) -> dict[str, Any]:
    """A layer's router (schema.sql, layers) and each expert's statistics with the tokens it received most:
    read once per process and layer (Database.derived). Empty lists for a dense layer."""
    found = db.derived.get(("experts", layer))
    if found is None:
        found = _layer_experts(db, layer)
        db.derived.put(("experts", layer), found)
    return found


def _layer_experts(db: Database, layer: int) -> dict[str, Any]:
    lay = db.experts.layers[layer]
    top: dict[int, dict[str, list]] = {e.expert: {"count": [], "weight": [], "share": []} for e in lay.experts}
    if lay.routed:
        rows = db.query(queries.EXPERT_TOP_TOKENS, {"layer": layer, "top_k": max(lay.top_k, 1),
                                                    "n": EXPERT_TOP_TOKENS, "min_count": SHARE_MIN_OCCURRENCES})
        ranked: dict[int, dict[str, list]] = {e: {"count": [], "weight": [], "share": []} for e in top}
        for expert, token_id, tokens, weight_sum, share, occurrences, by_count, by_weight, by_share in rows:
            if expert not in ranked:
                continue  # a row of an expert `experts` does not hold: never from our recorder
            entry = {"token_id": int(token_id), "token": db.vocab.token(int(token_id)), "tokens": int(tokens),
                     "weight_sum": _num(weight_sum), "mean_weight": _num(weight_sum / tokens) if tokens else None,
                     "share": _num(share), "occurrences": _num(occurrences)}
            for name, rank in (("count", by_count), ("weight", by_weight), ("share", by_share)):
                if rank <= EXPERT_TOP_TOKENS and (name != "share" or (occurrences or 0) >= SHARE_MIN_OCCURRENCES):
                    ranked[expert][name].append((rank, entry))
        top = {e: {name: [entry for _, entry in sorted(lists[name], key=lambda x: x[0])] for name in lists}
               for e, lists in ranked.items()}
    experts = [{**expert_summary(db, e), "top_tokens": top[e.expert]} for e in lay.experts]
    return {**layer_router(db, layer), "experts": experts}


def expert_data(db: Database, layer: int, expert: int, sort: str = "neuron", order: str = "asc",
                offset: int = 0, limit: int = 100) -> dict[str, Any]:
    """One expert of a mixture-of-experts layer: its router statistics, the distribution of its router weight,
    the tokens it received most, the texts where its weight was largest, and one page of its neurons."""
    e = check_expert(db, layer, expert)
    neurons = layer_data(db, layer, sort, order, offset, limit, expert)
    summary = next(x for x in layer_experts(db, layer)["experts"] if x["expert"] == expert)
    return {"model": db.id, **summary, **layer_router(db, layer), "weights": _weight_histogram(db, e),
            "examples": _expert_examples(db, layer, e),
            **{k: neurons[k] for k in ("sort", "order", "offset", "limit", "neurons")},
            "n_neurons": e.n_neurons}


def _weight_histogram(db: Database, e: Expert) -> dict[str, Any]:
    """The expert's router weight on the 'value' bins of histogram_bins, as a neuron's histograms give a value."""
    edges = db.bin_edges.get("value", [])
    counts = list(e.weight_counts or ())
    first = e.weight_first_bin or 0
    if not counts or not 0 <= first or first + len(counts) > len(edges) - 1:
        return {"first_bin": 0, "edges": [], "counts": []}
    return {"first_bin": first, "edges": edges[first:first + len(counts) + 1], "counts": counts}


def _expert_examples(db: Database, layer: int, e: Expert) -> list[dict[str, Any]]:
    """The texts where the expert's router weight was largest, each as a window around that token (the
    metadata's window), without values: the file keeps the weight at that token only."""
    if e.shared:
        return []
    before, after = int(db.meta["window_before"]), int(db.meta["window_after"])
    out = []
    for rank, weight, text_id, position in db.query(queries.EXPERT_EXAMPLES, {"layer": layer, "expert": e.expert}):
        if not 0 <= text_id < db.n_texts:
            continue  # never from our recorder
        start = max(position - before, 0)
        ids = db.texts.token_ids(text_id, start, position + after + 1).tolist()
        out.append({"rank": int(rank), "weight": _num(weight), "text_id": int(text_id),
                    "source_index": int(db.texts.source_index[text_id]), "source": db.texts.source[text_id],
                    "position": int(position), "window_start": start, "token_ids": ids,
                    "tokens": [db.vocab.token(t) for t in ids]})
    return out


@dataclass
class Scatter:
    """One layer's neurons as the points of the paper's §5.1 scatter, and where they land on its image."""

    layer: int
    neuron: np.ndarray         # [N]
    freq_gate_pos: np.ndarray  # [N] the frequency of x_gate > 0 (queries.frequency of GATE_POS_SLUGS)
    cos_in_out: np.ndarray     # [N]
    r: float | None            # Pearson correlation of the two, by DuckDB's corr()
    frame: plots.ScatterFrame
    address: list[str] | None = None  # [N] each neuron's address, in a file with experts

    def to_json(self, model: str) -> dict[str, Any]:
        body = {"model": model, "layer": self.layer, "n_neurons": len(self.neuron), "r": self.r,
                "neuron": self.neuron.tolist(), "freq_gate_pos": _json_floats(self.freq_gate_pos),
                "cos_in_out": _json_floats(self.cos_in_out)}
        if self.address is not None:
            body["address"] = self.address
        return body

    def nearest(self, x: float, y: float) -> int | None:
        """The neuron whose dot is nearest to pixel (x, y) of the image."""
        px, py = self.frame.to_pixels(self.freq_gate_pos, self.cos_in_out)
        i = plots.nearest(px, py, x, y)
        return None if i < 0 else int(self.neuron[i])


# The frequency axis is the same for every layer, so that layers compare at a glance.
SCATTER_X_RANGE = (-0.02, 1.02)


def scatter(db: Database, layer: int) -> Scatter:
    """A layer's scatter, read once per process and layer (Database.derived)."""
    check_index("layer", layer, db.n_layers)
    cached = db.derived.get(("scatter", layer))
    if cached is None:
        cached = _scatter(db, layer)
        db.derived.put(("scatter", layer), cached)
    return cached


def scatter_png(db: Database, layer: int) -> bytes:
    """The layer's scatter as a PNG (plots.scatter_png), drawn once per process and layer."""
    found = scatter(db, layer)
    png = db.derived.get(("png", layer))
    if png is None:
        png = plots.scatter_png(found.freq_gate_pos, found.cos_in_out, found.frame)
        db.derived.put(("png", layer), png)
    return png


def _scatter(db: Database, layer: int) -> Scatter:
    found = db.con.execute(queries.layer_scatter(db.experts.is_moe(layer), db.stated),
                           {"layer": layer, "n_tokens": max(int(db.meta["n_tokens"]), 1)}).fetchnumpy()
    x = np.ma.filled(np.ma.asarray(found["freq_gate_pos"], np.float64), np.nan)
    y = np.ma.filled(np.ma.asarray(found["cos_in_out"], np.float64), np.nan)
    r = found["r"]
    neuron = np.asarray(found["neuron"], np.int64)
    return Scatter(layer=layer, neuron=neuron, freq_gate_pos=x, cos_in_out=y,
                   r=_num(r[0]) if len(r) and not np.ma.is_masked(r[0]) else None,
                   frame=plots.scatter_frame(x, y, x_range=SCATTER_X_RANGE),
                   address=[db.experts.address(layer, n) for n in neuron.tolist()] if db.experts.any else None)


def random_neuron(db: Database) -> tuple[int, int]:
    layer = random.randrange(db.n_layers)
    return layer, random.randrange(db.experts.width(layer))
