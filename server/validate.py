"""Checking a request's arguments against one database: a ParameterError (404 or 422) names what is wrong.

FastAPI has checked each argument's type by the time these run; they check
ranges and names, which depend on the file.
"""

from __future__ import annotations

import math
import re

from gluscope.schema import HOOKS, QUADRANT_SLUGS, QUADRANTS
from gluscope.server.db import Database
from gluscope.server.errors import ParameterError, not_one_of, out_of_range

LAYER_PAGE_MAX = 1000
FILTER_PAGE_MAX = 500


def get_model(registry: dict[str, Database], model: str) -> Database:
    try:
        return registry[model]
    except KeyError:
        raise not_one_of("model", model, sorted(registry), status=404) from None


def check_index(parameter: str, value: int, stop: int) -> int:
    if not 0 <= value < stop:
        raise out_of_range(parameter, value, stop)
    return value


def check_neuron(db: Database, layer: int, neuron: int) -> None:
    """A flat neuron index within the layer's own width (experts.py: a layer may be narrower than d_mlp)."""
    check_index("layer", layer, db.n_layers)
    check_index("neuron", neuron, db.experts.width(layer))


# The path segment after the layer in a neuron's URL: N (a dense neuron) or E.I (expert E's neuron I). The schema
# publishes this pattern and neuron_index matches with it ([0-9], not \d: see LAYERS_PATTERN).
NEURON_PATTERN = r"^[0-9]+(?:\.[0-9]+)?$"
NEURON_VALID = "a neuron index N, or expert.index E.I in a mixture-of-experts layer"


def neuron_index(db: Database, layer: int, segment: str | int, parameter: str = "neuron") -> int:
    """A neuron's URL segment (NEURON_PATTERN) in `layer` to its checked flat index (experts.py). An integer (a
    server of dense files parses the segment as one: views.neuron_parameter) is a bare index."""
    check_index("layer", layer, db.n_layers)
    if isinstance(segment, int):
        return flat_neuron(db, layer, segment, parameter)
    text = str(segment)
    if not re.fullmatch(NEURON_PATTERN, text):
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise ParameterError(422, parameter, f"neuron must be a whole number (or expert.index in a "
                             f"mixture-of-experts layer), not {shown!r}", NEURON_VALID)
    first, _, second = text.partition(".")
    if not second:
        return flat_neuron(db, layer, _bounded(first), parameter)
    return expert_neuron(db, layer, _bounded(first), _bounded(second), parameter)


def _bounded(digits: str) -> int:
    """Digits as an int; a number of more than 18 digits (out of any range) as 10**18, whatever its length."""
    return int(digits) if len(digits) <= 18 else 10 ** 18


def flat_neuron(db: Database, layer: int, neuron: int, parameter: str = "neuron") -> int:
    """A bare neuron index: the neuron in a dense layer. In a mixture-of-experts layer a neuron is addressed by
    expert and index, and a bare index is a 404 that names the neuron's address (docs/json-api.md)."""
    layout = db.experts.layers[layer]
    if not layout.moe:
        check_index("neuron", neuron, layout.n_neurons)
        return neuron
    e = layout.expert_at(neuron)
    if e is None:
        raise ParameterError(404, parameter, f"neuron {layer}.{neuron} does not exist: layer {layer} has "
                             f"{len(layout.experts)} experts; address a neuron as layer.expert.index", _experts(layout))
    address = db.experts.address(layer, neuron)
    segment = address.split(".", 1)[1]
    raise ParameterError(404, parameter, f"layer {layer} is a mixture-of-experts layer: its neuron {neuron} is "
                         f"{address} ({e.label}, neuron {neuron - e.first_neuron}), at /neurons/{layer}/{segment}",
                         segment)


def expert_neuron(db: Database, layer: int, expert: int, index: int, parameter: str = "neuron") -> int:
    """Neuron `index` of `expert` in `layer` to its flat index, checked."""
    e = check_expert(db, layer, expert, parameter)
    if not 0 <= index < e.n_neurons:
        raise ParameterError(404, parameter, f"neuron {layer}.{expert}.{index} does not exist: {e.label} of "
                             f"layer {layer} has neurons 0..{e.n_neurons - 1}", f"0..{e.n_neurons - 1}")
    return db.experts.flat(layer, expert, index)


def _experts(layout) -> str:
    return f"expert 0..{len(layout.experts) - 1}, then an index within it"


def check_expert(db: Database, layer: int, expert: int, parameter: str = "expert"):
    """An expert of a mixture-of-experts layer (experts.Expert); 404 in a dense layer or out of range."""
    check_index("layer", layer, db.n_layers)
    layout = db.experts.layers[layer]
    if not layout.moe:
        raise ParameterError(404, parameter, f"layer {layer} has no experts (a dense MLP of {layout.n_neurons} "
                             f"neurons, addressed {layer}.N)", None)
    if not 0 <= expert < len(layout.experts):
        valid = f"0..{len(layout.experts) - 1}"
        raise ParameterError(404, parameter, f"expert {expert} does not exist in layer {layer}; valid: {valid}", valid)
    return layout.experts[expert]


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


def check_choice(parameter: str, value: str, choices) -> str:
    if value not in choices:
        raise not_one_of(parameter, value, list(choices))
    return value


def check_page(db: Database, offset: int, limit: int, rows: int | None = None) -> None:
    """A page of a layer's neurons (or of `rows` of them, one expert's): offset within them, 1..LAYER_PAGE_MAX rows."""
    rows = db.d_mlp if rows is None else rows
    if not 0 <= offset < max(rows, 1):
        raise out_of_range("offset", offset, rows)
    if not 1 <= limit <= LAYER_PAGE_MAX:
        raise ParameterError(422, "limit", f"limit {limit} is outside 1..{LAYER_PAGE_MAX}", f"1..{LAYER_PAGE_MAX}")


def parse_neuron_ref(text: str, db: Database, parameter: str = "to") -> tuple[int, int]:
    """'31.9634' (also '31/9634', '31 9634', '31:9634'), or an expert neuron's '3.6.61' (layer.expert.index, the
    same separators), to a checked (layer, flat neuron index)."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*[./: ]\s*(\d{1,12})(?:\s*[./: ]\s*(\d{1,12}))?\s*", text or "")
    if not m:
        raise ParameterError(422, parameter, f"{text[:40]!r} is not layer.neuron (or layer.expert.index), e.g. "
                             "3.117", "layer.neuron or layer.expert.index")
    layer = check_index("layer", int(m.group(1)), db.n_layers)
    if m.group(3) is None:
        return layer, flat_neuron(db, layer, int(m.group(2)), parameter)
    return layer, expert_neuron(db, layer, int(m.group(2)), int(m.group(3)), parameter)


COMPARE_MIN, COMPARE_MAX = 2, 4
# One neuron of a comparison: layer.neuron (or the jump box's layer/neuron, layer:neuron, layer neuron).
_LISTED_NEURON = r" *[0-9]{1,9} *[./: ] *[0-9]{1,12}(?: *[./: ] *[0-9]{1,12})? *"
# COMPARE_MIN..COMPARE_MAX of them, comma-separated; a trailing comma is what a form that offered "3.117, " for
# one more neuron may send. The schema publishes this pattern and parse_neuron_list matches with it (spaces,
# not \s, and [0-9], not \d, for the reasons given at LAYERS_PATTERN).
NEURONS_PATTERN = (rf"^{_LISTED_NEURON}(?:,{_LISTED_NEURON}){{{COMPARE_MIN - 1},{COMPARE_MAX - 1}}}"
                   r"(?:, *)?$")


def parse_neuron_list(text: str, db: Database, parameter: str = "neurons") -> list[tuple[int, int]]:
    """'3.117,5.2' (NEURONS_PATTERN) to checked (layer, neuron) pairs in the order given, each once.

    A neuron named twice is shown once, not refused: the schema's pattern cannot say "distinct", and comparing
    a neuron with itself asks nothing wrong. So `0.1,0.1` is a comparison of one neuron.
    """
    text = text or ""
    parts = [p for p in text.split(",") if p.strip()]
    valid = f"{COMPARE_MIN} to {COMPARE_MAX} layer.neuron (or layer.expert.index), comma-separated, e.g. 3.117,5.2"
    if not COMPARE_MIN <= len(parts) <= COMPARE_MAX:
        raise ParameterError(422, parameter, f"{len(parts)} neuron{'' if len(parts) == 1 else 's'} given; "
                             f"compare takes {COMPARE_MIN} to {COMPARE_MAX}", valid)
    if not re.fullmatch(NEURONS_PATTERN, text):
        bad = next((p for p in parts if not re.fullmatch(_LISTED_NEURON, p)), None)
        raise ParameterError(422, parameter, f"{text[:40]!r}: one comma between neurons" if bad is None
                             else f"{bad[:40]!r} is not layer.neuron (or layer.expert.index), e.g. 3.117", valid)
    return list(dict.fromkeys(parse_neuron_ref(p, db, parameter) for p in parts))


# A range of layers, "A-B" (inclusive), "A", or blank for every layer: the schema publishes this pattern and
# parse_layer_range matches with it, so what the API documents and what it takes cannot drift apart. Spaces
# only, not \s, which JSON Schema's regular expressions and Python's read differently; [0-9], not \d, which
# Python reads as any Unicode digit; an en dash as the pages print a range.
LAYERS_PATTERN = r"^ *(?:([0-9]{1,9}) *(?:[-–] *([0-9]{1,9}) *)?)?$"


def parse_layer_range(text: str | None, db: Database, parameter: str = "layers") -> tuple[int, int]:
    """'20-29' (or '29-20', the same layers; or '7'; or blank: every layer) to a checked inclusive (first, last)."""
    last = db.n_layers - 1
    m = re.fullmatch(LAYERS_PATTERN, text or "")
    if not m:
        raise ParameterError(422, parameter, f"{text[:40]!r} is not a layer range such as 20-29 or 5",
                             f"A-B or A within 0..{last}")
    if m.group(1) is None:
        return 0, last
    a = int(m.group(1))
    b = a if m.group(2) is None else int(m.group(2))
    # A range typed backwards names the same layers: a schema pattern cannot say A <= B, so no refusal.
    lo, hi = min(a, b), max(a, b)
    if hi > last:
        raise ParameterError(404, parameter, f"layer {hi} does not exist; valid: 0..{last}", f"0..{last}")
    return lo, hi


# The intervals of |hook_post| per (neuron, quadrant) are 0..3 in every file (schema.sql, intervals; the
# recorder's rules.N_INTERVALS), so an interval outside them is refused before any file is read.
INTERVAL_MAX = 3


def example_interval(kind: str, interval: int | None) -> int | None:
    """The interval a list of this kind reads: interval= only picks one of kind=interval, and is ignored
    for the other kinds (a link that switches kind may keep it, and the schema cannot tie one parameter to
    another); outside 0..INTERVAL_MAX it is refused whatever the kind, as the schema's range says."""
    if interval is None:
        return None
    if not 0 <= interval <= INTERVAL_MAX:
        raise ParameterError(422, "interval", f"interval {interval} is outside 0..{INTERVAL_MAX}",
                             f"0..{INTERVAL_MAX}")
    return interval if kind == "interval" else None


def check_bounds(bounds: dict[str, float | None]) -> None:
    """Bounds named min_<field> / max_<field> are finite.

    A minimum above its maximum is not refused: no value lies between them, so the filter matches no neuron,
    which is what the bounds say (the schema cannot tie one parameter to another).
    """
    for name, value in bounds.items():
        if value is not None and not math.isfinite(value):
            raise ParameterError(422, name, f"{name} must be a finite number, not {value}", "a finite number")


def check_filter_page(db: Database, offset: int, limit: int) -> None:
    """A page of a whole-model filter: offset 0..(neurons in the model), 1..FILTER_PAGE_MAX rows."""
    n = db.n_layers * db.d_mlp
    if not 0 <= offset <= n:  # 404 as for a layer page's offset: a row that does not exist
        raise out_of_range("offset", offset, n + 1)
    if not 1 <= limit <= FILTER_PAGE_MAX:
        raise ParameterError(422, "limit", f"limit {limit} is outside 1..{FILTER_PAGE_MAX}", f"1..{FILTER_PAGE_MAX}")
