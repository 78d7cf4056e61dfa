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


def parse_neuron_list(text: str, db: Database, parameter: str = "neurons") -> list[tuple[int, int]]:
    """'3.117,5.2' to 2..4 distinct checked (layer, neuron) pairs, in the order given."""
    parts = [p for p in (text or "").split(",") if p.strip()]
    valid = f"{COMPARE_MIN} to {COMPARE_MAX} distinct layer.neuron, comma-separated, e.g. 3.117,5.2"
    if not COMPARE_MIN <= len(parts) <= COMPARE_MAX:
        raise ParameterError(422, parameter, f"{len(parts)} neuron{'' if len(parts) == 1 else 's'} given; "
                             f"compare takes {COMPARE_MIN} to {COMPARE_MAX}", valid)
    found = [parse_neuron_ref(p, db, parameter) for p in parts]
    if len(set(found)) < len(found):
        twice = next(f for f in found if found.count(f) > 1)
        raise ParameterError(422, parameter, f"neuron {twice[0]}.{twice[1]} is given twice", valid)
    return found


def parse_layer_range(text: str | None, db: Database, parameter: str = "layers") -> tuple[int, int]:
    """'20-29' (or '7', or nothing: every layer) to a checked inclusive (first, last)."""
    if text is None or not text.strip():
        return 0, db.n_layers - 1
    m = re.fullmatch(r"\s*(\d{1,9})\s*(?:[-–]\s*(\d{1,9})\s*)?", text)
    valid = f"A-B or A with 0 <= A <= B <= {db.n_layers - 1}"
    if not m:
        raise ParameterError(422, parameter, f"{text[:40]!r} is not a layer range such as 20-29", valid)
    lo = int(m.group(1))
    hi = lo if m.group(2) is None else int(m.group(2))
    if lo > hi:
        raise ParameterError(422, parameter, f"layer range {lo}-{hi} is out of order (first > last)", valid)
    for layer in (lo, hi):
        if layer >= db.n_layers:
            raise ParameterError(404, parameter, f"layer {layer} does not exist; valid: 0..{db.n_layers - 1}",
                                 f"0..{db.n_layers - 1}")
    return lo, hi


def check_bounds(bounds: dict[str, float | None]) -> None:
    """Bounds named min_<field> / max_<field>: finite, and no minimum above its maximum."""
    for name, value in bounds.items():
        if value is not None and not math.isfinite(value):
            raise ParameterError(422, name, f"{name} must be a finite number, not {value}", "a finite number")
    for name, low in bounds.items():
        if name.startswith("min_") and low is not None:
            high = bounds.get("max_" + name[4:])
            if high is not None and low > high:
                raise ParameterError(422, name, f"bounds out of order: {name} {low:g} > max_{name[4:]} {high:g}",
                                     f"at most max_{name[4:]} ({high:g})")


def check_filter_page(db: Database, offset: int, limit: int) -> None:
    """A page of a whole-model filter: offset 0..(neurons in the model), 1..FILTER_PAGE_MAX rows."""
    n = db.n_layers * db.d_mlp
    if not 0 <= offset <= n:  # 404 as for a layer page's offset: a row that does not exist
        raise out_of_range("offset", offset, n + 1)
    if not 1 <= limit <= FILTER_PAGE_MAX:
        raise ParameterError(422, "limit", f"limit {limit} is outside 1..{FILTER_PAGE_MAX}", f"1..{FILTER_PAGE_MAX}")
