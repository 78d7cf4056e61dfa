"""The fused experts' forward while the recorder runs (experts.products_forward): the module's own computation, each
expert's gate_up product computed once and handed to the recorder.

Against the Hugging Face module itself: its output and the whole model's logits are equal bit for bit
(torch.equal) for every MoE architecture of tests/tiny_models.py, under the implementation transformers runs by
default (grouped_mm) and under the class's own loop (eager), with calls where an expert gets no tokens. What is
handed over is checked against the products computed again from the weights (routed_activations); where the
implementation is not reproduced (batched_mm) the recorder keeps the pre-hook that recomputes them. The shared
experts and dense MLPs of MoE models (experts.gated_mlp_forward) likewise.
"""

from __future__ import annotations

import importlib
from contextlib import ExitStack, contextmanager
from functools import cache
from typing import Iterator

import numpy as np
import pytest
import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException
from transformers import AutoModelForCausalLM

from gluscope.recorder.expert_capture import expert_hooks, forward_replaced
from gluscope.recorder.experts import (GATED_MLPS, LayerLayout, Routed, forward_implementation, gated_mlp_forward,
                                       layer_layouts, products_forward, routed_activations)
from gluscope.recorder.reducer_interface import Batch
from gluscope.recorder.tensor_reducer import spread_rows

from .test_moe_bruteforce import moe_model
from .tiny_models import MOE_ARCHITECTURES, make_config

pytestmark = pytest.mark.integration

IMPLEMENTATIONS = ("grouped_mm", "eager")


@cache
def hf_model(arch: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(moe_model(arch), dtype=torch.float32).eval()


@contextmanager
def implementation(model: torch.nn.Module, name: str) -> Iterator[list[LayerLayout]]:
    """The model running its experts as `name` says; its MoE layers' layouts."""
    before = model.config._experts_implementation
    model.set_experts_implementation(name)
    try:
        yield [layout for layout in layer_layouts(model, "tiny") if layout.experts is not None]
    finally:
        model.set_experts_implementation(before)


def tokens(model: torch.nn.Module, B: int, T: int, seed: int) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0
    return ids


def call_without_expert_0(layout: LayerLayout, n_tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    """An experts call (hidden [N, d_model], top_k_index [N, k], top_k_weights [N, k]) that routes no token to
    expert 0 and many to each other."""
    gen = torch.Generator().manual_seed(seed)
    d_model = layout.experts.down_proj.shape[1 if layout.clamped is None else 2]
    hidden = torch.randn(n_tokens, d_model, generator=gen)
    index = torch.stack([1 + torch.randperm(layout.n_experts - 1, generator=gen)[:layout.top_k]
                         for _ in range(n_tokens)])
    weights = torch.softmax(torch.randn(n_tokens, layout.top_k, generator=gen), dim=-1)
    return hidden, index, weights


def check_handed(layout: LayerLayout, hidden: torch.Tensor, index: torch.Tensor, routed: list[Routed]) -> None:
    """Each (token, slot) of the call handed once, to the expert its index names, with that expert's product."""
    k = index.shape[1]
    pairs = torch.cat([rows * k + slots for rows, slots, _, _ in routed])
    assert torch.equal(torch.sort(pairs).values, torch.arange(index.numel()))
    again = routed_activations(hidden, index, layout)
    for e, ((rows, slots, x_gate, x_in), (rows2, _, x_gate2, x_in2)) in enumerate(zip(routed, again)):
        assert (index[rows, slots] == e).all()
        assert x_gate.shape == x_in.shape == (len(rows), layout.units[e].n_neurons)
        order = torch.argsort(rows)  # routed_activations' rows are ascending, the module's need not be
        assert torch.equal(rows[order], rows2)
        # Another row order in a GEMM may change the last bits; nothing more.
        torch.testing.assert_close(x_gate[order], x_gate2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_in[order], x_in2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_the_experts_module_computes_what_its_own_forward_does(arch, name):
    with implementation(hf_model(arch), name) as layouts, torch.inference_mode():
        for i, layout in enumerate(layouts):
            assert forward_implementation(layout.experts) == name
            hidden, index, weights = call_without_expert_0(layout, 37, seed=i)
            own = layout.experts(hidden, index, weights)
            handed = []
            forward = products_forward(layout, range(layout.n_experts), lambda *a: handed.append(a))
            with forward_replaced(layout.experts, forward):
                mine = layout.experts(hidden, index, weights)
            assert torch.equal(mine, own), (arch, name, i)
            assert "forward" not in vars(layout.experts)
            ((index_handed, weights_handed, routed),) = handed
            assert index_handed is index and weights_handed is weights
            assert len(routed[0][0]) == 0  # expert 0 got no tokens
            check_handed(layout, hidden, index, routed)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_the_models_logits_are_the_same_with_the_products_handed_over(arch, name):
    model = hf_model(arch)
    # Three texts, and one token alone: top-k of the experts, the others get none.
    for ids in (tokens(model, 3, 19, seed=1), tokens(model, 1, 1, seed=2)):
        with implementation(model, name) as layouts, torch.inference_mode():
            own = model(ids).logits
            handed = []
            with forward_replaced_all(layouts, handed):
                mine = model(ids).logits
        assert torch.equal(mine, own), (arch, name, ids.shape)
        assert len(handed) == len(layouts)
        if ids.numel() == 1:
            assert all(any(len(rows) == 0 for rows, *_ in routed) for routed in handed)


@contextmanager
def forward_replaced_all(layouts: list[LayerLayout], handed: list) -> Iterator[None]:
    with forward_replaced(layouts[0].experts, products_forward(layouts[0], range(layouts[0].n_experts),
                                                               lambda index, weights, routed: handed.append(routed))):
        if len(layouts) == 1:
            yield
        else:
            with forward_replaced_all(layouts[1:], handed):
                yield


class Kept:
    """A reducer that keeps what it is handed, spread to [B, T, n] with NaN at the tokens routed elsewhere."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, x_gate, x_in, batch, rows=None, contribution=None) -> None:
        self.seen.append(tuple(t.clone() for t in spread_rows(x_gate, x_in, batch, rows)))


def record_once(model: torch.nn.Module, layouts: list[LayerLayout], ids: torch.Tensor,
                check_inside=lambda: None, units: str = "routed") -> dict[tuple[int, int], Kept]:
    """One pass of the recorder's capture (expert_hooks) with a Kept per unit of the layouts' `units` ("routed" or
    "direct"); check_inside() runs within it, before the pass."""
    kept = {(layer, unit.first_neuron): Kept() for layer, layout in enumerate(layouts)
            for unit in getattr(layout, units)}
    B, T = ids.shape
    current = {"batch": Batch.of(np.full(B, T), np.arange(B), torch.device("cpu")), "tokens": ids}
    with torch.inference_mode(), expert_hooks(layouts, kept, current):
        check_inside()
        with pytest.raises(StopAtLayerException):  # after the last layer, as in the recorder's run_with_hooks
            model(ids)
    return kept


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_an_implementation_not_reproduced_keeps_the_pre_hook_that_recomputes(arch):
    model = hf_model(arch)
    ids = tokens(model, 2, 13, seed=3)
    seen = {}
    for name in ("grouped_mm", "batched_mm"):  # batched_mm: one GEMV per (token, slot), not reproduced
        with implementation(model, name):
            layouts = layer_layouts(model, "tiny")
            experts = [layout.experts for layout in layouts if layout.experts is not None]
            own = name != "batched_mm"

            def inside() -> None:
                for module in experts:
                    assert ("forward" in vars(module)) == own
                    assert len(module._forward_pre_hooks) == (not own)
            seen[name] = record_once(model, layouts, ids, inside)
            for module in experts:
                assert forward_implementation(module) == (name if own else None)
                assert "forward" not in vars(module) and not module._forward_pre_hooks
    # Nor is a forward that something else set on the instance.
    layout = next(layout for layout in layer_layouts(model, "tiny") if layout.experts is not None)
    with forward_replaced(layout.experts, layout.experts.forward):
        assert forward_implementation(layout.experts) is None
        assert products_forward(layout, [0], lambda *a: None) is None
    # Either way each expert's reducer sees its tokens' values, NaN at the others'.
    for key, kept in seen["grouped_mm"].items():
        ((gate, x_in),) = kept.seen
        ((gate2, x_in2),) = seen["batched_mm"][key].seen
        torch.testing.assert_close(gate, gate2, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(x_in, x_in2, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_the_modules_own_forward_is_back_whatever_ends_the_recording(arch):
    model = hf_model(arch)
    ids = tokens(model, 2, 11, seed=4)
    with implementation(model, "grouped_mm") as layouts_moe, torch.inference_mode():
        own = model(ids).logits
        layouts = layer_layouts(model, "tiny")

        class Interrupted:
            def update(self, *a, **kw) -> None:
                raise KeyboardInterrupt

        B, T = ids.shape
        current = {"batch": Batch.of(np.full(B, T), np.arange(B), torch.device("cpu")), "tokens": ids}
        first = layouts_moe[0]
        with pytest.raises(KeyboardInterrupt):  # in the middle of a pass, from within the experts' forward
            with expert_hooks(layouts, {(layouts.index(first), first.routed[0].first_neuron): Interrupted()},
                              current):
                model(ids)
        with pytest.raises(ValueError):  # between passes
            with expert_hooks(layouts, {(layouts.index(first), first.routed[0].first_neuron): Interrupted()},
                              current):
                raise ValueError
        for layout in layouts_moe:
            assert "forward" not in vars(layout.experts) and not layout.experts._forward_pre_hooks
        assert torch.equal(model(ids).logits, own)


# Each class of experts.GATED_MLPS, from its model's modeling file, built from that model's tiny config.
MLP_CLASSES = {"OlmoeMLP": "olmoe", "Qwen2MoeMLP": "qwen2_moe", "Qwen3MoeMLP": "qwen3_moe",
               "DeepseekV3MLP": "deepseek_v3"}


def test_every_gated_mlp_class_is_checked():
    assert set(MLP_CLASSES) == GATED_MLPS


@pytest.mark.parametrize("name", sorted(MLP_CLASSES))
def test_a_gated_mlp_computes_what_its_own_forward_does(name):
    arch = MLP_CLASSES[name]
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    torch.manual_seed(0)
    mlp = getattr(module, name)(make_config(arch, vocab_size=64, d_model=48, d_mlp=40)).eval()
    for x in (torch.randn(3, 7, 48), torch.randn(21, 48)):  # as a dense layer and a shared expert are called
        with torch.inference_mode():
            own = mlp(x)
            handed = []
            with forward_replaced(mlp, gated_mlp_forward(mlp, lambda *a: handed.append(a))):
                mine = mlp(x)
            assert torch.equal(mine, own), (name, x.shape)
            ((x_handed, gate, up),) = handed
            assert x_handed is x
            assert torch.equal(gate, mlp.gate_proj(x)) and torch.equal(up, mlp.up_proj(x))
        assert "forward" not in vars(mlp)
    # A forward that something else set on the instance is left to run.
    with forward_replaced(mlp, mlp.forward):
        assert gated_mlp_forward(mlp, lambda *a: None) is None


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_shared_experts_and_dense_layers_hand_over_their_own_products(arch):
    """The model's logits are unchanged with every shared expert and dense MLP handing its products over, and the
    recorder's capture hands each direct unit's reducer what the pre-hook that computes them again would."""
    model = hf_model(arch)
    ids = tokens(model, 2, 13, seed=5)
    layouts = layer_layouts(model, "tiny")
    mlps = [mlp for layout in layouts for mlp in layout.mlps]
    assert mlps and all(gated_mlp_forward(mlp, lambda *a: None) is not None for mlp in mlps)
    with torch.inference_mode(), ExitStack() as stack:
        own = model(ids).logits
        for mlp in mlps:
            stack.enter_context(forward_replaced(mlp, gated_mlp_forward(mlp, lambda *a: None)))
        assert torch.equal(model(ids).logits, own)
    seen = {}
    for replaced in (True, False):
        with ExitStack() as stack:
            if not replaced:  # a forward set on each instance: the capture falls back to the pre-hook
                for mlp in mlps:
                    stack.enter_context(forward_replaced(mlp, mlp.forward))

            def inside() -> None:
                for mlp in mlps:
                    assert ("forward" in vars(mlp)) and len(mlp._forward_pre_hooks) == (not replaced)
            seen[replaced] = record_once(model, layouts, ids, inside, units="direct")
        for mlp in mlps:
            assert "forward" not in vars(mlp) and not mlp._forward_pre_hooks
    assert seen[True].keys() == seen[False].keys() and len(seen[True]) == len(mlps)
    for key, kept in seen[True].items():
        ((gate, x_in),) = kept.seen
        ((gate2, x_in2),) = seen[False][key].seen
        assert torch.equal(gate, gate2) and torch.equal(x_in, x_in2), key
