"""Recording a large model in parts: `record --layers A-B` and `--experts A-B`, which `gluscope merge` combines.

A part records the neurons of some layers and, in mixture-of-experts layers,
of some routed experts; the shared experts and the dense layers go with the
part whose experts start at 0 (its "lead" part, which also writes the
layer's router tables: the routing is the model's, the same in every part).
Every part runs the whole corpus, so parts and shards are two ways of
splitting one run: by neurons and by texts. Memory and time of the reduction
are per neuron, so a part of a tenth of the experts needs about a tenth of
the reducers' memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gluscope.errors import UserError
from gluscope.recorder.experts import Unit

RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class Selection:
    """The layers and routed experts a part records, each an inclusive range; None: all."""

    layers: tuple[int, int] | None = None
    experts: tuple[int, int] | None = None

    @property
    def whole(self) -> bool:
        return self.layers is None and self.experts is None

    def has_layer(self, layer: int) -> bool:
        return self.layers is None or self.layers[0] <= layer <= self.layers[1]

    def leads(self, layer: int) -> bool:
        """Whether this part records the layer's shared experts or dense MLP, and its router tables."""
        return self.has_layer(layer) and (self.experts is None or self.experts[0] == 0)

    def has(self, layer: int, unit: Unit, n_experts: int) -> bool:
        if not self.has_layer(layer):
            return False
        routed = unit.expert is not None and unit.expert < n_experts
        return self.experts[0] <= unit.expert <= self.experts[1] if routed and self.experts else self.leads(layer)

    def metadata(self) -> dict[str, int | None]:
        """schema.sql's metadata columns that say which part a file is."""
        layers, experts = self.layers or (None, None), self.experts or (None, None)
        return {"layer_first": layers[0], "layer_last": layers[1],
                "expert_first": experts[0], "expert_last": experts[1]}

    def describe(self) -> str:
        return ", ".join(f"{name} {r[0]}-{r[1]}" for name, r in (("layers", self.layers), ("experts", self.experts))
                         if r is not None) or "everything"


def parse_range(option: str, text: str | None) -> tuple[int, int] | None:
    """`A-B` or `A` as an inclusive range; None for None. One-line UserError otherwise."""
    if text is None:
        return None
    found = RANGE.match(text.strip())
    if not found:
        raise UserError(f"{option} {text!r}: give A-B (inclusive) or one number A")
    lo, hi = int(found[1]), int(found[2] if found[2] is not None else found[1])
    if hi < lo:
        lo, hi = hi, lo
    return lo, hi


def check_selection(selection: Selection, n_layers: int, n_experts: list[int], name: str) -> None:
    """Refuse in one line a selection the model does not have."""
    if selection.layers is not None and selection.layers[1] >= n_layers:
        raise UserError(f"--layers {selection.layers[0]}-{selection.layers[1]}: {name} has layers 0-{n_layers - 1}")
    if selection.experts is not None:
        chosen = [e for layer, e in enumerate(n_experts) if selection.has_layer(layer) and e]
        if not chosen:
            raise UserError(f"--experts: {name} has no mixture-of-experts layer among the layers recorded")
        if selection.experts[1] >= min(chosen):
            raise UserError(f"--experts {selection.experts[0]}-{selection.experts[1]}: {name}'s MoE layers have "
                            f"experts 0-{min(chosen) - 1}")
