"""Checking a request's arguments against one database: a ParameterError (404 or 422) names what is wrong.

FastAPI has checked each argument's type by the time these run; they check
ranges and names, which depend on the file.
"""

from __future__ import annotations

import re

from gluscope.schema import HOOKS, QUADRANT_SLUGS, QUADRANTS
from gluscope.server.db import Database
from gluscope.server.errors import ParameterError, not_one_of, out_of_range

LAYER_PAGE_MAX = 1000


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


def parse_neuron_ref(text: str, db: Database) -> tuple[int, int]:
    """'31.9634' (also '31/9634', '31 9634', '31:9634') to a checked (layer, neuron)."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*[./: ]\s*(\d{1,12})\s*", text or "")
    if not m:
        raise ParameterError(422, "to", f"{text[:40]!r} is not layer.neuron, e.g. 3.117", "layer.neuron")
    layer, neuron = int(m.group(1)), int(m.group(2))
    return check_index("layer", layer, db.n_layers), check_index("neuron", neuron, db.d_mlp)
