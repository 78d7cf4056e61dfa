"""Mixture-of-experts layers: which expert a neuron belongs to, and how a neuron is addressed.

A layer's neurons are numbered expert after expert (schema.sql, experts): the
routed experts 0 .. n_experts-1, then the shared ones. So every table keyed by
(layer, neuron) holds expert neurons under that flat index, and the server's
SQL reads them as it reads dense neurons. People and URLs name them otherwise:

- a dense neuron's address is `L.N`, its URL `/models/M/neurons/L/N`;
- an expert neuron's address is `L.E.I` (layer, expert, index within the
  expert), its URL `/models/M/neurons/L/E.I`: the part after the layer is one
  path segment.

This module alone translates between the flat index and the address, from the
`layers` and `experts` tables, which are small and read once per file when it
is opened (db.open_database). A file without rows in `layers` (or without a
row for some layer) has dense layers of metadata.d_mlp neurons.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote


@dataclass(frozen=True)
class Expert:
    """One row of `experts`."""

    layer: int
    expert: int
    shared: bool
    first_neuron: int
    n_neurons: int
    tokens: int                          # counted tokens routed to it (shared: every counted token)
    weight_sum: float                    # its router weight summed over them
    weight_first_bin: int | None         # its router weight's histogram on the 'value' bins (schema.sql)
    weight_counts: tuple[int, ...] | None

    @property
    def mean_weight(self) -> float | None:
        return self.weight_sum / self.tokens if self.tokens else None

    @property
    def label(self) -> str:
        """How pages name it: "expert 5", or "shared expert 8" (its number follows the routed ones)."""
        return f"{'shared ' if self.shared else ''}expert {self.expert}"


@dataclass(frozen=True)
class Layer:
    """One row of `layers`, with its experts (routed first, then shared, by number)."""

    layer: int
    n_neurons: int
    n_experts: int                       # routed experts; 0: a dense MLP
    top_k: int
    router: str | None
    imbalance: float | None
    experts: tuple[Expert, ...] = ()
    _starts: tuple[int, ...] = field(default=(), repr=False)  # each expert's first_neuron, ascending

    @property
    def moe(self) -> bool:
        return bool(self.experts)

    @property
    def routed(self) -> tuple[Expert, ...]:
        return tuple(e for e in self.experts if not e.shared)

    @property
    def shared(self) -> tuple[Expert, ...]:
        return tuple(e for e in self.experts if e.shared)

    def expert_at(self, neuron: int) -> Expert | None:
        """The expert holding flat neuron `neuron` (None in a dense layer, or outside every expert)."""
        i = bisect.bisect_right(self._starts, neuron) - 1
        if i < 0:
            return None
        e = self.experts[i]
        return e if neuron < e.first_neuron + e.n_neurons else None


class LayoutError(ValueError):
    """`layers` and `experts` disagree with each other or with the metadata (db.py says which file)."""


class Experts:
    """Every layer's width and experts, and the translation between flat neuron indexes and addresses."""

    def __init__(self, n_layers: int, d_mlp: int, layer_rows: list[tuple], expert_rows: list[tuple]) -> None:
        """layer_rows: (layer, n_neurons, n_experts, top_k, router, imbalance); expert_rows: the columns of
        `experts` in schema order. Raises LayoutError where they cannot describe the file's neurons."""
        by_layer: dict[int, list[Expert]] = {}
        for row in expert_rows:
            layer, expert, shared, first, n, tokens, weight_sum, first_bin, counts = row
            by_layer.setdefault(int(layer), []).append(Expert(
                int(layer), int(expert), bool(shared), int(first), int(n), int(tokens), float(weight_sum),
                None if first_bin is None else int(first_bin),
                None if counts is None else tuple(int(c) for c in counts)))
        rows = {int(r[0]): r for r in layer_rows}
        if any(not 0 <= layer < n_layers for layer in (*rows, *by_layer)):
            raise LayoutError(f"`layers` or `experts` names a layer outside 0..{n_layers - 1}")
        self.layers: list[Layer] = []
        for layer in range(n_layers):
            _, width, n_experts, top_k, router, imbalance = rows.get(layer, (layer, d_mlp, 0, 0, None, None))
            experts = sorted(by_layer.get(layer, []), key=lambda e: e.expert)
            width, n_experts = int(width), int(n_experts)
            if not 0 < width <= d_mlp:
                raise LayoutError(f"layer {layer} has {width} neurons; metadata.d_mlp is {d_mlp}")
            if [e.expert for e in experts] != list(range(len(experts))) or \
                    [e.shared for e in experts] != [i >= n_experts for i in range(len(experts))]:
                raise LayoutError(f"the experts of layer {layer} are not 0 .. {n_experts - 1} routed, then shared")
            at = 0
            for e in experts:
                if e.first_neuron != at or e.n_neurons < 1:
                    raise LayoutError(f"expert {e.expert} of layer {layer} does not start where the one before ends")
                at += e.n_neurons
            if experts and at != width:
                raise LayoutError(f"the experts of layer {layer} hold {at} neurons, the layer {width}")
            self.layers.append(Layer(layer, width, n_experts, int(top_k), router,
                                     None if imbalance is None else float(imbalance), tuple(experts),
                                     tuple(e.first_neuron for e in experts)))
        self.any = any(layer.moe for layer in self.layers)

    def width(self, layer: int) -> int:
        """The layer's own number of neurons (metadata.d_mlp is the largest)."""
        return self.layers[layer].n_neurons

    def is_moe(self, layer: int) -> bool:
        return self.layers[layer].moe

    def expert_at(self, layer: int, neuron: int) -> Expert | None:
        return self.layers[layer].expert_at(neuron)

    def flat(self, layer: int, expert: int, index: int) -> int:
        """The flat index of neuron `index` of `expert` (both already checked)."""
        return self.layers[layer].experts[expert].first_neuron + index

    def address(self, layer: int, neuron: int) -> str:
        """`L.E.I` for an expert neuron, `L.N` for a dense one."""
        e = self.expert_at(layer, neuron) if 0 <= layer < len(self.layers) else None
        return f"{layer}.{neuron}" if e is None else f"{layer}.{e.expert}.{neuron - e.first_neuron}"

    def ref(self, layer: int, neuron: int) -> dict[str, Any]:
        """What every neuron object of a JSON body adds to its `layer` and `neuron` (the flat index) in a file
        with experts: `expert` and `expert_neuron` (null for a dense neuron) and `address`. Nothing in a file
        without experts, whose bodies stay as they were (docs/json-api.md)."""
        if not self.any:
            return {}
        e = self.expert_at(layer, neuron) if 0 <= layer < len(self.layers) else None
        if e is None:
            return {"expert": None, "expert_neuron": None, "address": f"{layer}.{neuron}"}
        index = neuron - e.first_neuron
        return {"expert": e.expert, "expert_neuron": index, "address": f"{layer}.{e.expert}.{index}"}

    def tokens(self, layer: int, neuron: int, n_tokens: int) -> int:
        """The tokens a neuron's statistics are over, the denominator of its frequencies: those routed to its
        expert, or every counted token (n_tokens) for a dense neuron."""
        e = self.expert_at(layer, neuron)
        return n_tokens if e is None else e.tokens


def address_of(neuron: dict[str, Any]) -> str:
    """A neuron object's address: its `address` (a file with experts), else `layer.neuron`. A template filter."""
    return neuron.get("address") or f"{neuron['layer']}.{neuron['neuron']}"


def neuron_href(neuron: dict[str, Any] | str, model: str, suffix: str = "") -> str:
    """The URL of a neuron's page from a neuron object or an address (`L.N` or `L.E.I`): /models/M/neurons/L/N
    or /models/M/neurons/L/E.I. A template filter (`{{ n|neuron_href(m) }}`): the address says all a URL needs."""
    address = neuron if isinstance(neuron, str) else address_of(neuron)
    layer, _, rest = address.partition(".")
    return f"/models/{quote(model)}/neurons/{layer}/{rest}{suffix}"


def expert_href(model: str, layer: int, expert: int) -> str:
    """The URL of an expert's page."""
    return f"/models/{quote(model)}/layers/{layer}/experts/{expert}"
