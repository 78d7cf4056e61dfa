"""Mixture-of-experts layers: where each expert's gated neurons are, their weights, and what the router chose.

In transformers 5 an MoE block's routed experts are one module holding fused
3-D parameters (gate_up_proj [E, 2 d, d_model], down_proj [E, d_model, d]),
so no expert's x_gate or x_in is ever a module output that a hook could
read, and TransformerLens's MoE bridge names only the block's input and
output. What every supported block does share is the call
`experts(hidden_states [N, d_model], top_k_index [N, k], top_k_weights [N, k])`:
the block's input and the router's decision exactly as the model computed
them. While the recorder runs, that module's forward is `products_forward`:
the module's own computation, step by step, that hands each expert's gate_up
product (x_gate and x_in of the tokens routed to it) to the recorder before
finishing as the module does, so that each product is computed once. Where
the module runs an implementation that is not reproduced here, a forward
pre-hook takes the call's arguments instead and the products are computed
again from the experts' weight slices (`routed_activations`, which the probe
uses too). Shared experts and the dense layers of an MoE model are gated MLP
modules (gate_proj, up_proj, down_proj); they run `gated_mlp_forward`, which
hands their products over in the same way (a class it does not know keeps a
pre-hook that computes them again).

gpt-oss lays its experts out otherwise (gate_up_proj [E, d_model, 2 d] with
gate and up columns interleaved, biases) and computes a clamped SwiGLU:
`(clamp(up, ±limit) + 1) · quick_gelu(clamp(gate, max=limit))`. We record
what that code computes: x_gate is the clamped gate, x_in the clamped up
plus one, act is x·σ(1.702x) (`ClampedSwiGLU`).

A layer's neurons are numbered expert after expert (schema.sql, experts):
the routed experts first, then the shared ones, each a `Unit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from gluscope.errors import UserError
from gluscope.schema import QUICK_GELU_ALPHA


@dataclass(frozen=True)
class Unit:
    """One gated MLP of a layer: a routed expert, a shared expert, or the layer's dense MLP."""

    expert: int | None      # the expert's number in the layer; None: a dense layer's MLP
    shared: bool
    first_neuron: int       # its neurons are first_neuron .. first_neuron + n_neurons - 1 of the layer
    n_neurons: int


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's experts (GptOssExperts._apply_gate): x_gate = clamp(gate, max=limit), x_in = clamp(up, ±limit) + 1,
    and act(x_gate) = x_gate·σ(1.702 x_gate), the activation named quick_gelu (gluscope.schema.ACT_FNS).

    The +1 is why the weight convention cannot apply: negating w_in and w_out negates up, not clamp(up) + 1.
    """

    limit: float

    ACT_FN = "quick_gelu"


@dataclass
class LayerLayout:
    """A layer's units and the modules they are read from."""

    units: list[Unit]
    n_experts: int = 0          # routed experts; 0: a dense layer
    top_k: int = 0
    router: str | None = None   # the router's class and how it weighs (schema.sql, layers.router)
    experts: torch.nn.Module | None = None       # the fused routed experts
    mlps: list[torch.nn.Module] = field(default_factory=list)  # per non-routed unit: its gated MLP module
    shared_gate: torch.nn.Module | None = None   # Qwen2-MoE: sigmoid(shared_expert_gate(x)) scales the shared expert
    clamped: ClampedSwiGLU | None = None         # gpt-oss: its experts' layout and clamped SwiGLU

    @property
    def n_neurons(self) -> int:
        return sum(u.n_neurons for u in self.units)

    @property
    def routed(self) -> list[Unit]:
        return self.units[:self.n_experts]

    @property
    def direct(self) -> list[Unit]:
        """The units every token passes through: the dense MLP, or the shared experts."""
        return self.units[self.n_experts:]

    def unit_weights(self, unit: Unit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_gate, w_in, w_out) of one unit, each [n_neurons, d_model] float32, one row per neuron."""
        if unit.expert is not None and unit.expert < self.n_experts:
            d = unit.n_neurons
            gate_up = self.experts.gate_up_proj[unit.expert].detach()
            down = self.experts.down_proj[unit.expert].detach()
            if self.clamped is not None:  # [d_model, 2 d], gate and up columns interleaved; down [d, d_model]
                return gate_up[:, ::2].T.float(), gate_up[:, 1::2].T.float(), down.float()
            return gate_up[:d].float(), gate_up[d:].float(), down.T.float()
        mlp = self.mlps[self.units.index(unit) - self.n_experts]
        return (mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float(),
                mlp.down_proj.weight.detach().T.float())

    def weights_of(self, units: Sequence[Unit]) -> torch.Tensor:
        """w_out of these units' neurons, [neurons, d_model] float32, in the model's own convention."""
        return torch.cat([self.unit_weights(u)[2] for u in units])

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_gate, w_in, w_out) of the whole layer in its neuron numbering."""
        parts = [self.unit_weights(u) for u in self.units]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


def original(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face module a TransformerBridge component wraps (the module itself when it wraps none)."""
    while getattr(module, "original_component", None) is not None:
        module = module.original_component
    return module


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))


def _router_description(router: torch.nn.Module) -> str:
    """The router's class and how its weights come about, read off the module (schema.sql, layers.router)."""
    name = type(router).__name__
    if name.startswith("GptOss"):
        return f"{name}, softmax over the top-k logits (with the router's bias)"
    parts = [name, "sigmoid scores, top-k within the best groups" if hasattr(router, "e_score_correction_bias")
             else "softmax"]
    # Mixtral's router always renormalises; the others say so in norm_topk_prob.
    renormalised = getattr(router, "norm_topk_prob", name.startswith("Mixtral"))
    parts.append("top-k weights renormalised to sum 1" if renormalised else "top-k weights as the softmax gave them")
    scale = getattr(router, "routed_scaling_factor", None)
    if scale not in (None, 1, 1.0):
        parts.append(f"times {scale:g}")
    return ", ".join(parts)


def layer_layouts(hf_model, name: str) -> list[LayerLayout] | None:
    """Every layer's layout when the model has a mixture-of-experts layer, else None (a dense model).

    Raises a one-line UserError naming what is missing where an MoE block is laid out otherwise.
    """
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if layers is None:
        return None
    arch = type(original(hf_model)).__name__
    blocks = [original(original(layer).mlp) if hasattr(original(layer), "mlp") else None for layer in layers]
    if not any(b is not None and hasattr(b, "experts") for b in blocks):
        _refuse_experts_elsewhere(original(layers[0]), name, arch)
        return None
    layouts = []
    for index, block in enumerate(blocks):
        if block is None:
            raise UserError(f"--model {name} ({arch}): layer {index} has no `mlp` module GLUScope can read")
        if not hasattr(block, "experts"):
            if not _is_gated_mlp(block):
                raise UserError(f"--model {name} ({arch}): layer {index}'s MLP ({type(block).__name__}) is neither "
                                "a gated MLP nor a mixture of experts")
            n = block.gate_proj.weight.shape[0]
            layouts.append(LayerLayout([Unit(None, False, 0, n)], mlps=[block]))
            continue
        experts = original(block.experts)
        clamped = _clamped_swiglu(experts, name, arch)
        if clamped is None and not _fused_gate_first(experts):
            raise UserError(
                f"--model {name} ({arch}): its experts ({type(experts).__name__}) are not laid out as GLUScope reads "
                "them (fused gate_up_proj [experts, 2 * d, d_model] without biases, gate rows first, and down_proj "
                "[experts, d_model, d]; or gpt-oss's interleaved gate_up_proj [experts, d_model, 2 * d] with biases "
                "and a clamped SwiGLU)")
        E = experts.gate_up_proj.shape[0]
        d = experts.gate_up_proj.shape[2 if clamped else 1] // 2
        units = [Unit(e, False, e * d, d) for e in range(E)]
        mlps = []
        for attr in ("shared_expert", "shared_experts"):
            shared = getattr(block, attr, None)
            if shared is None:
                continue
            shared = original(shared)
            if not _is_gated_mlp(shared):
                raise UserError(f"--model {name} ({arch}): layer {index}'s {attr} is not a gated MLP")
            units.append(Unit(len(units), True, sum(u.n_neurons for u in units), shared.gate_proj.weight.shape[0]))
            mlps.append(shared)
        shared_gate = getattr(block, "shared_expert_gate", None)
        router = original(getattr(block, "gate", None) or getattr(block, "router"))
        layouts.append(LayerLayout(units, n_experts=E, top_k=int(router.top_k), router=_router_description(router),
                                   experts=experts, mlps=mlps,
                                   shared_gate=original(shared_gate) if shared_gate is not None else None,
                                   clamped=clamped))
    return layouts


def _refuse_experts_elsewhere(layer: torch.nn.Module, name: str, arch: str) -> None:
    """One line where a decoder layer holds a mixture of experts somewhere other than `mlp.experts` (GraniteMoe's
    block_sparse_moe, JetMoe's): such a model is gated, but no layout here reads it."""
    for attr, child in layer.named_children():
        child = original(child)
        if attr != "mlp" and (hasattr(child, "experts") or hasattr(child, "router")):
            raise UserError(
                f"--model {name} ({arch}): its mixture of experts ({type(child).__name__}, at `{attr}`) is not laid "
                "out as GLUScope reads experts: an `mlp.experts` module with fused gate_up_proj and down_proj, as in "
                "OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and gpt-oss")


def _fused_gate_first(experts: torch.nn.Module) -> bool:
    """gate_up_proj [E, 2 d, d_model] (gate rows, then up rows) and down_proj [E, d_model, d], without biases."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3 and isinstance(down, torch.Tensor)
            and down.dim() == 3 and not hasattr(experts, "gate_up_proj_bias")
            and down.shape[-1] * 2 == gate_up.shape[1])


def _clamped_swiglu(experts: torch.nn.Module, name: str, arch: str) -> ClampedSwiGLU | None:
    """gpt-oss's layout (GptOssExperts), else None; one line where it is that layout with another activation."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3 and isinstance(down, torch.Tensor)
            and down.dim() == 3 and hasattr(experts, "gate_up_proj_bias") and hasattr(experts, "limit")
            and down.shape[1] * 2 == gate_up.shape[2]):
        return None
    alpha = float(getattr(experts, "alpha", math.nan))
    if alpha != QUICK_GELU_ALPHA:
        raise UserError(f"--model {name} ({arch}): its experts' SwiGLU has alpha {alpha:g}; GLUScope computes "
                        f"gpt-oss's x·σ({QUICK_GELU_ALPHA}x) only")
    return ClampedSwiGLU(limit=float(experts.limit))


Routed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""One routed expert's tokens: (rows [n_e] int64, each row's token in the call's flat numbering; slots [n_e] int64,
its place in the token's top k; x_gate [n_e, d]; x_in [n_e, d]), row i of x_gate and x_in being token rows[i]'s."""

HandOff = Callable[[torch.Tensor, torch.Tensor, list[Routed]], None]
"""Takes an experts call's top_k_index [N, k], top_k_weights [N, k] and the Routed of the experts asked for."""


def experts_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states, top_k_index, top_k_weights) of a call of the fused experts, by position or by any of the
    names the supported classes give them (gpt-oss: router_indices, routing_weights)."""
    params = list(args) + [kwargs[name] for name in ("hidden_states", "top_k_index", "top_k_weights",
                                                       "router_indices", "routing_weights") if name in kwargs]
    hidden, index, weights = params[:3]
    return hidden, index, weights


def routed_activations(hidden: torch.Tensor, top_k_index: torch.Tensor, layout: LayerLayout,
                       chosen: Sequence[int] | None = None) -> list[Routed]:
    """Per routed expert e of the layer (of `chosen`, default all) its Routed, rows ascending, computed again from
    the expert's weights: the products the model's experts compute, for the same tokens (in the model's dtype,
    on its device), up to the last bits where its implementation orders the rows otherwise."""
    experts, n_experts = layout.experts, layout.n_experts
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # token-major input: each expert's rows come out ascending
    counts = torch.bincount(flat, minlength=n_experts + 1)[:n_experts].tolist()
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    k = top_k_index.shape[1]
    out = []
    for e in (range(n_experts) if chosen is None else chosen):
        count = counts[e]
        picked = order[starts[e]:starts[e] + count]
        rows, slots = picked // k, picked % k
        if not count:
            x_gate = x_in = hidden.new_zeros((0, layout.units[e].n_neurons))
        elif layout.clamped is not None:
            x_gate, x_in = _clamped_split(hidden[rows] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e],
                                          layout.clamped.limit)
        else:
            x_gate, x_in = F.linear(hidden[rows], experts.gate_up_proj[e]).chunk(2, dim=-1)
        out.append((rows, slots, x_gate, x_in))
    return out


def _clamped_split(gate_up: torch.Tensor, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's x_gate and x_in from its gate_up product (bias added), in the operations GptOssExperts._apply_gate
    uses."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    return gate.clamp(min=None, max=limit), up.clamp(min=-limit, max=limit) + 1


# The classes whose eager forward (their own `forward`, which use_experts_implementation dispatches to under
# "eager") is the loop that _eager_forward reproduces, as read in transformers 5's modeling files. Another class of
# the same tensor layout may loop otherwise, so it keeps the pre-hook.
EAGER_LOOPS = frozenset({"OlmoeExperts", "MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts",
                         "DeepseekV3Experts", "GptOssExperts"})


def forward_implementation(experts: torch.nn.Module) -> str | None:
    """"grouped_mm" or "eager": the computation the module's forward runs, where products_forward reproduces it;
    None where it does not, and the recorder computes the products again (routed_activations).

    transformers 5 decorates the experts classes with use_experts_implementation, whose forward picks the function
    named by config._experts_implementation ("grouped_mm" unless the model was loaded with another). Not
    reproduced: "batched_mm" (one GEMV per token and slot), the GPU kernels ("deepgemm", "sonicmoe", FP8), any
    implementation registered by the user, expert parallelism (its sentinel rows) and a norm after each expert.
    """
    try:
        from transformers.integrations import moe
    except ImportError:
        return None
    config = getattr(experts, "config", None)
    # A forward set on the instance (by another library) is not the class's: it is left to run.
    if (config is None or "forward" in vars(experts) or getattr(type(experts).forward, "__wrapped__", None) is None
            or getattr(experts, "_is_expert_parallel", True) or getattr(experts, "has_post_expert_norm", True)
            or not getattr(experts, "has_gate", False)):
        return None
    # The weights as the layout (layer_layouts) reads them: gate rows first without biases, or gpt-oss's
    # interleaved, transposed columns with biases.
    clamped = hasattr(experts, "gate_up_proj_bias")
    if (getattr(experts, "is_concatenated", None), getattr(experts, "is_transposed", None),
            getattr(experts, "has_bias", None)) != (not clamped, clamped, clamped):
        return None
    name = config._experts_implementation
    if (name == "grouped_mm" and moe.ALL_EXPERTS_FUNCTIONS.get(name) is moe.grouped_mm_experts_forward
            and hasattr(moe, "_grouped_linear")):  # the helper it calls, which _grouped_forward calls too
        return name
    if name == "eager" and "eager" not in moe.ALL_EXPERTS_FUNCTIONS and type(experts).__name__ in EAGER_LOOPS:
        return name
    return None


def products_forward(layout: LayerLayout, chosen: Sequence[int], hand_off: HandOff) -> Callable | None:
    """A forward for layout.experts that computes what the module's own does, bit for bit, and hands the Routed of
    the experts `chosen` (rows in the order the module computes them) to hand_off once every expert's gate_up
    product is computed, before any is finished; None where the module's implementation is not reproduced
    (forward_implementation). An exception from hand_off leaves the call there.
    """
    implementation = forward_implementation(layout.experts)
    if implementation == "grouped_mm":
        return _grouped_forward(layout, list(chosen), hand_off)
    if implementation == "eager":
        return _eager_forward(layout, list(chosen), hand_off)
    return None


def _grouped_forward(layout: LayerLayout, chosen: list[int], hand_off: HandOff) -> Callable:
    """transformers.integrations.moe.grouped_mm_experts_forward, its steps in its order and through its own
    _grouped_linear, without the parts for expert parallelism and a post-expert norm (forward_implementation)."""
    from transformers.integrations.moe import _grouped_linear

    experts, E = layout.experts, layout.n_experts

    def forward(*args, **kwargs) -> torch.Tensor:
        hidden, index, weights = experts_call(args, kwargs)
        k, n_tokens, d_model = index.size(-1), hidden.size(0), hidden.size(-1)
        # Its own sort, not a stable one: ties come out in another order, and a GEMM's last bits depend on which
        # of its rows a token is in (measured on the CPU with 40 tokens).
        expert_ids, perm = torch.sort(index.reshape(-1))
        rows = perm // k
        selected = hidden[rows]
        weights_g = weights.reshape(-1)[perm]
        histc_input = expert_ids.float() if hidden.device.type in ("cpu", "mps") else expert_ids.int()
        offsets = torch.cumsum(torch.histc(histc_input, bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)
        bias = experts.gate_up_proj_bias[expert_ids] if experts.has_bias else None
        gate_up = _grouped_linear(selected, experts.gate_up_proj, offsets, bias=bias,
                                  is_transposed=experts.is_transposed)
        ends = offsets.tolist()
        hand_off(index, weights, [_routed(layout, gate_up, rows, perm % k, ends[e - 1] if e else 0, ends[e])
                                  for e in chosen])
        out = experts._apply_gate(gate_up)
        bias = experts.down_proj_bias[expert_ids] if experts.has_bias else None
        out = _grouped_linear(out, experts.down_proj, offsets, bias=bias, is_transposed=experts.is_transposed)
        out = out * weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=hidden.device)
        return out[inv_perm].view(n_tokens, k, d_model).sum(dim=1).to(hidden.dtype)
    return forward


def _routed(layout: LayerLayout, gate_up: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, start: int,
            end: int) -> Routed:
    """The Routed of the expert whose product is gate_up[start:end] (x_gate, x_in: views where the layout allows)."""
    part = gate_up[start:end]
    if layout.clamped is not None:
        x_gate, x_in = _clamped_split(part, layout.clamped.limit)
    else:
        x_gate, x_in = part.chunk(2, dim=-1)
    return rows[start:end], slots[start:end], x_gate, x_in


# The gated MLP classes of MoE models (a shared expert, a dense layer's MLP) whose forward is
# down_proj(act_fn(gate_proj(x)) * up_proj(x)), as read in transformers 5's modeling files. Another class may compute
# otherwise, so it keeps the pre-hook that computes gate_proj and up_proj again.
GATED_MLPS = frozenset({"OlmoeMLP", "Qwen2MoeMLP", "Qwen3MoeMLP", "DeepseekV3MLP"})

MlpHandOff = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Takes a gated MLP call's input x and its gate_proj(x) and up_proj(x)."""


def gated_mlp_forward(mlp: torch.nn.Module, hand_off: MlpHandOff) -> Callable | None:
    """A forward for a shared expert's or an MoE model's dense MLP that computes what the module's own does, bit for
    bit, and hands (x, gate_proj(x), up_proj(x)) to hand_off before finishing: each product computed once, as
    products_forward does for the routed experts. None for a class not in GATED_MLPS, or a forward already set on
    the instance. An exception from hand_off leaves the call there."""
    if type(mlp).__name__ not in GATED_MLPS or "forward" in vars(mlp):
        return None

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        hand_off(x, gate, up)
        return mlp.down_proj(mlp.act_fn(gate) * up)
    return forward


def _eager_forward(layout: LayerLayout, chosen: list[int], hand_off: HandOff) -> Callable:
    """The experts class's own loop (OlmoeExperts.forward and the others of EAGER_LOOPS; GptOssExperts.forward), in
    two passes over the experts it hits: every gate_up product, then each expert's rest, in the same order."""
    experts, E, clamped = layout.experts, layout.n_experts, layout.clamped is not None

    def forward(*args, **kwargs) -> torch.Tensor:
        hidden, index, weights = experts_call(args, kwargs)
        out = torch.zeros_like(hidden)
        with torch.no_grad():
            # gpt-oss's one_hot has no class for the sentinel index E; the others' has.
            expert_mask = F.one_hot(index, num_classes=E if clamped else E + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        products = {}
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == E:
                continue
            slots, rows = torch.where(expert_mask[expert_idx])
            state = hidden[rows]
            if clamped:
                gate_up = state @ experts.gate_up_proj[expert_idx] + experts.gate_up_proj_bias[expert_idx]
            else:
                gate_up = F.linear(state, experts.gate_up_proj[expert_idx])
            products[int(expert_idx)] = (expert_idx, rows, slots, gate_up)
        empty = index.new_zeros(0)
        hand_off(index, weights, [
            _routed(layout, products[e][3], products[e][1], products[e][2], 0, len(products[e][1]))
            if e in products else (empty, empty, *(hidden.new_zeros((0, layout.units[e].n_neurons)),) * 2)
            for e in chosen])
        for expert_idx, rows, slots, gate_up in products.values():
            if clamped:
                h = experts._apply_gate(gate_up)
                h = h @ experts.down_proj[expert_idx] + experts.down_proj_bias[expert_idx]
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                h = F.linear(experts.act_fn(gate) * up, experts.down_proj[expert_idx])
            h = h * weights[rows, slots, None]
            out.index_add_(0, rows, h.to(out.dtype))
        return out
    return forward
