"""The whole-model filter of neurons, and neurons compared side by side, as JSON-ready dicts.

Both run in a reader process (views.py): the filter scans the reader's
`neuron_facts` table (queries.neuron_facts), the comparison looks each neuron
up in the file, as data.py's functions do for one neuron.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from gluscope.schema import GEOMETRY, GEOMETRY_LABELS, HISTOGRAM_HOOKS, HOOKS, QUADRANT_SLUGS, QUADRANTS
from gluscope.server import queries
from gluscope.server.data import ExampleList, _num, neuron_summary, read_example_list
from gluscope.server.db import Database, LRUCache
from gluscope.server.errors import ParameterError
from gluscope.server.validate import (check_bounds, check_choice, check_filter_page, check_neuron, hook_code,
                                      parse_layer_range, parse_neuron_list, quadrant_code)

FILTER_ORDERS = ("asc", "desc")
# The summaries and related pairs of recently compared neuron sets, per reader process (the file never changes).
_COMPARED = LRUCache(64)
# What a comparison reads of the whole file (the value bins, whether related neurons were recorded), once.
_PER_FILE: dict[tuple[str, str], list[tuple]] = {}


def _once(db: Database, sql: str) -> list[tuple]:
    key = (str(db.path), sql)
    if key not in _PER_FILE:
        _PER_FILE[key] = db.query(sql)
    return _PER_FILE[key]


BOUND_SIDES = ("min", "max")
# Every bound a filter takes: min_<field> and max_<field> for each field of queries.FILTER_FIELDS.
BOUND_NAMES: tuple[str, ...] = tuple(f"{side}_{f}" for f in queries.FILTER_FIELDS for side in BOUND_SIDES)
# What a filter shows when it bounds and sorts by nothing: each quadrant's frequency.
DEFAULT_FIELDS = tuple(f"freq_{s}" for s in QUADRANT_SLUGS)

# Each field as a page and the API documentation name it.
FIELD_LABELS: dict[str, str] = {
    **{f"freq_{s}": f"{q} frequency" for s, q in zip(QUADRANT_SLUGS, QUADRANTS)},
    **GEOMETRY_LABELS,
    **{f"absmax_{s}": f"{q} max |hook_post|" for s, q in zip(QUADRANT_SLUGS, QUADRANTS)},
}
FIELD_HELP: dict[str, str] = {
    **{f"freq_{s}": f"the share of counted tokens in {q}, 0..1 (an expert neuron's: of the tokens routed to its "
                    "expert)" for s, q in zip(QUADRANT_SLUGS, QUADRANTS)},
    **{name: f"{GEOMETRY_LABELS[name]}, after the weight convention" for name in GEOMETRY},
    **{f"absmax_{s}": f"the largest |hook_post| over the tokens of {q} (none where it never occurred)"
       for s, q in zip(QUADRANT_SLUGS, QUADRANTS)},
}


def filter_data(db: Database, layers: str | None, bounds: dict[str, float | None], sort: str = "neuron",
                order: str | None = None, offset: int = 0, limit: int = 50,
                expert: int | None = None) -> dict[str, Any]:
    """The neurons of the layer range within every given bound, one page of them sorted, and how many match.

    Each row holds layer, neuron and the fields bounded or sorted by (each
    quadrant's frequency when there are none; an expert neuron's over the
    tokens routed to its expert). order defaults to asc for `neuron` and to
    desc for a field. expert: only the neurons of that expert in each layer
    of the range (a file with experts).
    """
    lo, hi = parse_layer_range(layers, db)
    if expert is not None:
        check_filter_expert(db, expert, lo, hi)
    check_choice("sort", sort, queries.FILTER_SORT_KEYS)
    if order is None:  # only a missing order takes the default: an empty one is refused, as the schema says
        order = "asc" if sort == "neuron" else "desc"
    check_choice("order", order, FILTER_ORDERS)
    check_bounds(bounds)
    check_filter_page(db, offset, limit)
    given = [(f, side) for f in queries.FILTER_FIELDS for side in BOUND_SIDES
             if bounds.get(f"{side}_{f}") is not None]
    shown = [f for f in queries.FILTER_FIELDS if f == sort or any(f == g for g, _ in given)] or list(DEFAULT_FIELDS)
    where = {"layer_lo": lo, "layer_hi": hi, **{f"{side}_{f}": float(bounds[f"{side}_{f}"]) for f, side in given}}
    db.temp_table("neuron_facts")
    selected = expert is not None
    rows = db.query(queries.neuron_filter(given, shown, sort, order == "desc", selected),
                    {**where, "limit": limit, "offset": offset, **({"expert": expert} if selected else {})})
    (total,) = db.query(queries.neuron_filter_count(given, selected), {**where, **({"expert": expert} if selected
                                                                                   else {})})[0]
    neurons = [{"layer": r[0], "neuron": r[1], **db.experts.ref(r[0], r[1]),
                **{f: _num(v) for f, v in zip(shown, r[2:])}} for r in rows]
    body = {"model": db.id, "layers": [lo, hi],
            "bounds": {f"{side}_{f}": where[f"{side}_{f}"] for f, side in given},
            "sort": sort, "order": order, "offset": offset, "limit": limit, "total": int(total),
            "fields": shown, "neurons": neurons}
    if db.experts.any:
        body["expert"] = expert
    return body


def check_filter_expert(db: Database, expert: int, lo: int, hi: int) -> None:
    """expert= of the filter: an expert some layer of the range has (routed or shared)."""
    most = max((len(db.experts.layers[layer].experts) for layer in range(lo, hi + 1)), default=0)
    if not most:
        where = "this model has no" if not db.experts.any else f"layers {lo}–{hi} have no"
        raise ParameterError(404, "expert", f"expert {expert}: {where} mixture-of-experts layers", None)
    if not 0 <= expert < most:
        raise ParameterError(404, "expert", f"expert {expert} does not exist in layers {lo}–{hi}; valid: "
                             f"0..{most - 1}", f"0..{most - 1}")

def filter_query(body: dict[str, Any]) -> str:
    """The query string of this filter without its offset: what a page's links add an offset to."""
    lo, hi = body["layers"]
    expert = {"expert": body["expert"]} if body.get("expert") is not None else {}
    return urlencode({"layers": f"{lo}-{hi}", **expert, **body["bounds"], "sort": body["sort"],
                      "order": body["order"], "limit": body["limit"]})


def stored_neuron_summaries(db: Database, refs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """data.neuron_data's body for each neuron, read from the file (a reader process holds no NeuronTable)."""
    for layer, neuron in refs:
        check_neuron(db, layer, neuron)
    params = {f"{part}_{i}": value for i, ref in enumerate(refs) for part, value in zip(("layer", "neuron"), ref)}
    rows = {r[0]: r[1:] for r in db.query(queries.neuron_rows(len(refs), db.experts.any, db.stated),
                                          {**params, "n_tokens": int(db.meta["n_tokens"])})}
    stats = [[[[None] * 4 for _ in QUADRANTS] for _ in range(3)] for _ in refs]  # [i][min, max, mean][q][hook]
    for i, q, h, *values in db.query(queries.neuron_value_stats(len(refs)), params):
        if 0 <= q < 4 and 0 <= h < 4:
            for k, v in enumerate(values):
                stats[i][k][q][h] = v
    routed: list[list | None] = [None] * len(refs)
    if db.experts.any:  # what each expert neuron adds to the residual stream (schema.sql, routed_values)
        experts = [i for i, ref in enumerate(refs) if db.experts.expert_at(*ref) is not None]
        sub = {f"{part}_{j}": params[f"{part}_{i}"] for j, i in enumerate(experts) for part in ("layer", "neuron")}
        for i in experts:
            routed[i] = [[None] * len(QUADRANTS) for _ in range(3)]
        for j, q, *values in db.query(queries.neuron_routed_values(len(experts)), sub) if experts else []:
            if 0 <= q < len(QUADRANTS):
                for k, v in enumerate(values):
                    routed[experts[j]][k][q] = v
    out = []
    for i, (layer, neuron) in enumerate(refs):
        if i not in rows:
            raise ParameterError(404, "neurons", f"neuron {db.experts.address(layer, neuron)} is not in this "
                                 "database", None)
        row = rows[i]  # NEURON_COLUMNS (counts, flipped, geometry), then the frequencies
        geometry = row[5:5 + len(GEOMETRY)]
        out.append(neuron_summary(db, layer, neuron, list(row[:4]), list(row[5 + len(GEOMETRY):]), row[4],
                                  list(geometry), *stats[i], routed[i]))
    return out


def related_pairs(db: Database, refs: list[tuple[int, int]]) -> dict[str, Any]:
    """The scores between these neurons that the `related` table holds, one row per (writer, reader, via).

    The file holds no weight vectors, so no score is computed here: a pair is
    listed where one neuron is among the other's 16 strongest for that via,
    and says in which of the two lists (the writer's downstream, the
    reader's upstream) it was kept.
    """
    pairs: dict[tuple, dict[str, Any]] = {}
    for r in queries.related_between(db, refs):
        downstream = r["direction"] == "downstream"
        a, b = (r["layer"], r["neuron"]), (r["other_layer"], r["other_neuron"])
        writer, reader = (a, b) if downstream else (b, a)
        pair = pairs.setdefault((writer, reader, r["via"]), {
            "writer": {"layer": writer[0], "neuron": writer[1], **db.experts.ref(*writer)},
            "reader": {"layer": reader[0], "neuron": reader[1], **db.experts.ref(*reader)},
            "via": r["via"], "score": _num(r["score"]), "downstream": False, "upstream": False})
        pair["downstream" if downstream else "upstream"] = True
    listed = sorted(pairs.values(), key=lambda p: (-abs(p["score"] or 0.0), p["writer"]["layer"],
                                                    p["writer"]["neuron"], p["reader"]["layer"],
                                                    p["reader"]["neuron"], p["via"]))
    return {"recorded": bool(_once(db, queries.RELATED_RECORDED)[0][0]), "pairs": listed}


def histogram_overlay(db: Database, refs: list[tuple[int, int]], q: int, hook: str) -> dict[str, Any] | None:
    """Each neuron's histogram of `hook` over the tokens of quadrant q, on the file's common bins (schema.sql,
    histograms), trimmed to the bins any of them fills; None where the file holds none of them (histograms
    not recorded) or the value has none (`act`)."""
    if hook not in HISTOGRAM_HOOKS:
        return None
    params = {f"{part}_{i}": value for i, ref in enumerate(refs) for part, value in zip(("layer", "neuron"), ref)}
    rows = db.query(queries.neurons_histogram(len(refs)), {**params, "quadrant": q, "hook": HOOKS.index(hook)})
    edges = db.bin_edges.get("value", [])  # bins 0 .. len(edges) - 2, checked when the file was opened
    counts = [[0] * max(len(edges) - 1, 0) for _ in refs]
    for i, b, n in rows:
        if 0 <= b < len(edges) - 1:
            counts[i][b] += int(n)
    filled = [k for k in range(len(edges) - 1) if any(c[k] for c in counts)]
    if not filled:
        return None
    lo, hi = filled[0], filled[-1] + 1
    return {"quadrant": QUADRANTS[q], "hook": hook, "edges": [_num(e) for e in edges[lo:hi + 1]],
            "counts": [c[lo:hi] for c in counts]}


def compare_data(db: Database, neurons: str, quadrant: str = "pp",
                 hook: str = "hook_post") -> tuple[dict[str, Any], list[ExampleList]]:
    """2 to 4 neurons side by side, each once: their summaries, the related scores between them, their
    histograms of the chosen (quadrant, hook) overlaid, and that list of examples of each; the body without
    the lists, and the lists."""
    refs = parse_neuron_list(neurons, db)
    q = quadrant_code(quadrant)
    hook_code(hook)  # both checked before any lookup
    # Switching the list of a comparison (its htmx fragment) looks up only the new list and histograms.
    key = (str(db.path), tuple(refs))
    cached = _COMPARED.get(key)
    if cached is None:
        cached = stored_neuron_summaries(db, refs), related_pairs(db, refs)
        _COMPARED.put(key, cached)
    summaries, related = cached
    lists = [read_example_list(db, layer, neuron, QUADRANT_SLUGS[q], hook) for layer, neuron in refs]
    body = {"model": db.id, "neurons": [{"layer": layer, "neuron": neuron, **db.experts.ref(layer, neuron)}
                                        for layer, neuron in refs],
            "quadrant": QUADRANTS[q], "slug": QUADRANT_SLUGS[q], "hook": hook,
            "summaries": summaries, "related": related,
            "histograms": histogram_overlay(db, refs, q, hook)}
    return body, lists
