"""The forward pass of a mixture-of-experts model: each expert's neurons to its own reducer.

The capture goes on the Hugging Face modules themselves (experts.py says why
not on the bridge's hook points). Each layer's fused experts run
experts.products_forward while the recording lasts, which hands over each
expert's gate_up product as the module computes it; where the module's
implementation is not reproduced there, a pre-hook computes the products
again (routed_activations). The shared experts and dense MLPs run
experts.gated_mlp_forward likewise (or a pre-hook that computes gate_proj
and up_proj again). A routed expert's reducer is handed x_gate and
x_in of its own tokens only, [R, d], with the row of each token of the batch
(-1: routed elsewhere): the kernel walks just those rows, the tensor code
spreads them to [B, T, d] with NaN elsewhere. NaN is in no quadrant, so no
statistic counts those tokens, and the windows around its examples show
them as NaN ("not routed here").
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from gluscope.recorder.experts import (HandOff, LayerLayout, MlpHandOff, Routed, Unit, experts_call,
                                       gated_mlp_forward, products_forward, routed_activations)
from gluscope.recorder.reducer_interface import LayerReducer
from gluscope.recorder.routing import RouterStats


def units_of(layouts: Sequence[LayerLayout]) -> list[tuple[int, Unit]]:
    """Every (layer, unit) in recording order: one reducer each."""
    return [(layer, unit) for layer, layout in enumerate(layouts) for unit in layout.units]


@contextmanager
def expert_hooks(layouts: Sequence[LayerLayout], reducers: Mapping[tuple[int, int], LayerReducer], current: dict,
                 stats: Sequence[RouterStats | None] | None = None) -> Iterator[None]:
    """Hooks on the layers' modules, and each fused experts module's forward replaced by products_forward, while
    the model runs (all as they were again after): reducers[(layer, unit.first_neuron)] gets that unit's
    activations (units without a reducer, another part's, are handed nothing).

    current["batch"] is the pass's Batch and current["tokens"] its token ids [B, T]. With `stats` (per layer;
    None for a dense layer or one not recorded) the router's choices are folded too, and each unit's reducer
    folds its routed contribution (reducer_interface.Contribution) in its own pass. After the last layer
    recorded, the pass stops (StopAtLayerException, which the bridge's run_with_hooks catches). Each reducer
    applies its own activation function and weight convention (LayerSetup).
    """
    stats = stats or [None] * len(layouts)
    used = [layer for layer in range(len(layouts))
            if stats[layer] is not None or any((layer, u.first_neuron) in reducers for u in layouts[layer].units)]
    last = max(used)
    calls = int(layouts[last].experts is not None) + len(layouts[last].mlps)

    def finished(layer: int) -> None:
        if layer == last:
            current["calls"] = current.get("calls", 0) + 1
            if current["calls"] == calls:
                current["calls"] = 0
                raise StopAtLayerException(torch.zeros(0))

    def on_experts(layer: int, mine: list[Unit]) -> HandOff:
        """What takes the products of the experts `mine`, the layer's routed units that have a reducer."""
        def take(index: torch.Tensor, weights: torch.Tensor, routed: list[Routed]) -> None:
            batch = current["batch"]
            B, T = batch.valid.shape
            layer_stats = stats[layer]
            if layer_stats is not None:
                layer_stats.route(index, weights, batch, current["tokens"])
            for unit, (rows, slots, x_gate, x_in) in zip(mine, routed):
                row_map = torch.full((B * T,), -1, dtype=torch.int64, device=rows.device)
                row_map[rows] = torch.arange(len(rows), device=rows.device)
                reducer = reducers[(layer, unit.first_neuron)]
                if layer_stats is None:
                    reducer.update(x_gate, x_in, batch, row_map)
                else:
                    reducer.update(x_gate, x_in, batch, row_map, layer_stats.contribution(unit, weights[rows, slots]))
            finished(layer)
        return take

    def on_mlp(layer: int, i: int) -> MlpHandOff:
        """What takes the input and products of the layer's i-th direct unit (the dense MLP or a shared expert)."""
        layout = layouts[layer]
        unit = layout.direct[i]
        index = layout.n_experts + i
        reducer = reducers.get((layer, unit.first_neuron))  # None: another part's unit

        def take(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None:
            if reducer is not None:
                batch = current["batch"]
                B, T = batch.valid.shape
                x_gate = gate.float().reshape(B, T, -1)
                x_in = up.float().reshape(B, T, -1)
                layer_stats = stats[layer]
                if layer_stats is None:
                    reducer.update(x_gate, x_in, batch)
                else:
                    shared_gate = layout.shared_gate
                    weight = (torch.sigmoid(shared_gate(x.reshape(B * T, -1)).float()).reshape(-1)
                              if shared_gate is not None else x_gate.new_ones(B * T))
                    layer_stats.direct_weights(index, weight, batch)
                    reducer.update(x_gate, x_in, batch, None, layer_stats.contribution(unit, weight))
            finished(layer)
        return take

    with ExitStack() as stack:
        stack.callback(current.pop, "calls", None)
        for layer in used:
            layout = layouts[layer]
            if layout.experts is not None:
                mine = [u for u in layout.routed if (layer, u.first_neuron) in reducers]
                chosen, take = [u.expert for u in mine], on_experts(layer, mine)
                forward = products_forward(layout, chosen, take)
                if forward is not None:
                    stack.enter_context(forward_replaced(layout.experts, forward))
                else:
                    stack.callback(layout.experts.register_forward_pre_hook(
                        recomputing(layout, chosen, take), with_kwargs=True).remove)
            for i, mlp in enumerate(layout.mlps):
                take = on_mlp(layer, i)
                forward = gated_mlp_forward(mlp, take)
                if forward is not None:
                    stack.enter_context(forward_replaced(mlp, forward))
                else:
                    stack.callback(mlp.register_forward_pre_hook(recomputing_mlp(take), with_kwargs=True).remove)
        yield


def recomputing(layout: LayerLayout, chosen: Sequence[int], take: HandOff) -> Callable:
    """A forward pre-hook on layout.experts that hands `take` the products of the experts `chosen`, computed again
    from their weights: for a module whose implementation products_forward does not reproduce."""
    def hook(module, args, kwargs) -> None:
        hidden, index, weights = experts_call(args, kwargs)
        take(index, weights, routed_activations(hidden, index, layout, chosen))
    return hook


def recomputing_mlp(take: MlpHandOff) -> Callable:
    """A forward pre-hook on a gated MLP whose forward gated_mlp_forward does not reproduce, that hands `take` its
    input and its products computed again."""
    def hook(module, args, kwargs) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        take(x, module.gate_proj(x), module.up_proj(x))
    return hook


@contextmanager
def forward_replaced(module: torch.nn.Module, forward: Callable) -> Iterator[None]:
    """module.forward is `forward` while the context lasts, and what it was again after, whatever ends it (an
    exception, KeyboardInterrupt): module.__call__ still runs the module's hooks around it."""
    own = vars(module).get("forward")  # an instance's own forward, set by someone else; usually none
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
