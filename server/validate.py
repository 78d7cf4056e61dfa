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
    check_index("layer", layer, db.n_layers)
    check_index("neuron", neuron, db.d_mlp)


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


def check_page(db: Database, offset: int, limit: int) -> None:
    """A page of a layer's neurons: offset within the layer, 1..LAYER_PAGE_MAX rows."""
    if not 0 <= offset < max(db.d_mlp, 1):
        raise out_of_range("offset", offset, db.d_mlp)
    if not 1 <= limit <= LAYER_PAGE_MAX:
        raise ParameterError(422, "limit", f"limit {limit} is outside 1..{LAYER_PAGE_MAX}", f"1..{LAYER_PAGE_MAX}")


def parse_neuron_ref(text: str, db: Database, parameter: str = "to") -> tuple[int, int]:
    """'31.9634' (also '31/9634', '31 9634', '31:9634') to a checked (layer, neuron)."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*[./: ]\s*(\d{1,12})\s*", text or "")
    if not m:
        raise ParameterError(422, parameter, f"{text[:40]!r} is not layer.neuron, e.g. 3.117", "layer.neuron")
    layer, neuron = int(m.group(1)), int(m.group(2))
    return check_index("layer", layer, db.n_layers), check_index("neuron", neuron, db.d_mlp)


COMPARE_MIN, COMPARE_MAX = 2, 4
# One neuron of a comparison: layer.neuron (or the jump box's layer/neuron, layer:neuron, layer neuron).
_LISTED_NEURON = r" *[0-9]{1,9} *[./: ] *[0-9]{1,12} *"
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
    valid = f"{COMPARE_MIN} to {COMPARE_MAX} layer.neuron, comma-separated, e.g. 3.117,5.2"
    if not COMPARE_MIN <= len(parts) <= COMPARE_MAX:
        raise ParameterError(422, parameter, f"{len(parts)} neuron{'' if len(parts) == 1 else 's'} given; "
                             f"compare takes {COMPARE_MIN} to {COMPARE_MAX}", valid)
    if not re.fullmatch(NEURONS_PATTERN, text):
        bad = next((p for p in parts if not re.fullmatch(_LISTED_NEURON, p)), None)
        raise ParameterError(422, parameter, f"{text[:40]!r}: one comma between neurons" if bad is None
                             else f"{bad[:40]!r} is not layer.neuron, e.g. 3.117", valid)
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
