"""What the router of one mixture-of-experts layer did over the corpus, and what its experts' neurons added.

`RouterStats` folds each batch's routing (the experts chosen per token and
their weights, as the experts module received them) into per-expert counts,
weight sums, weight histograms, per-token counts and the texts of largest
weight; and holds each expert neuron's routed contribution, router weight
times hook_post, as per-quadrant min, max and sum, which the unit's reducer
folds in its own pass over the unit's tokens (`contribution`). Only counted
tokens enter (no BOS, no padding). Its state is plain tensors, so a
checkpoint saves it like a reducer's, and shards add up (the top texts merge
like the examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from gluscope.recorder import rules
from gluscope.recorder.experts import LayerLayout, Unit
from gluscope.recorder.reducer_interface import Batch, Contribution, checked_state
from gluscope.recorder.rules import N_QUADRANTS


@dataclass
class RouterResult:
    """One layer's router statistics, ready for the writer (schema.sql: experts, expert_tokens, expert_examples,
    routed_values)."""

    tokens: np.ndarray          # [U] int64 counted tokens per unit (routed, then shared: every token)
    weight_sum: np.ndarray      # [U] float64
    weight_hist: np.ndarray     # [U, VALUE_BINS] int64 by 'value' bin
    token_counts: np.ndarray    # [E, V] int64 per routed expert and token id
    token_weights: np.ndarray   # [E, V] float64
    top_weight: np.ndarray      # [E, k] float32, descending; -1 where empty
    top_text: np.ndarray        # [E, k] int64, -1 where empty
    top_pos: np.ndarray         # [E, k] int64
    value_min: np.ndarray       # [n, 4] float32 router weight * hook_post; NaN where the quadrant is empty
    value_max: np.ndarray       # [n, 4] float32
    value_sum: np.ndarray       # [n, 4] float64
    value_count: np.ndarray     # [n, 4] int64


class RouterStats:
    """The running router statistics of one MoE layer."""

    STATE = ("tokens", "weight_sum", "weight_hist", "token_counts", "token_weights", "top_weight", "top_text",
             "top_pos", "value_min", "value_max", "value_sum", "value_count")

    def __init__(self, layout: LayerLayout, vocab_size: int, k: int, device: torch.device) -> None:
        self.layout = layout
        U, E, n = len(layout.units), layout.n_experts, layout.n_neurons
        self.vocab_size = vocab_size
        self.k = k
        z = dict(device=device)
        self.tokens = torch.zeros(U, dtype=torch.int64, **z)
        self.weight_sum = torch.zeros(U, dtype=torch.float64, **z)
        self.weight_hist = torch.zeros(U * rules.VALUE_BINS, dtype=torch.int64, **z)
        self.token_counts = torch.zeros(E * vocab_size, dtype=torch.int64, **z)
        self.token_weights = torch.zeros(E * vocab_size, dtype=torch.float64, **z)
        self.top_weight = torch.full((E, k), -1.0, **z)
        self.top_text = torch.full((E, k), -1, dtype=torch.int64, **z)
        self.top_pos = torch.zeros((E, k), dtype=torch.int64, **z)
        self.value_min = torch.full((n, N_QUADRANTS), float("inf"), **z)
        self.value_max = torch.full((n, N_QUADRANTS), -float("inf"), **z)
        self.value_sum = torch.zeros((n, N_QUADRANTS), dtype=torch.float64, **z)
        self.value_count = torch.zeros((n, N_QUADRANTS), dtype=torch.int64, **z)

    def route(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, batch: Batch,
              token_ids: torch.Tensor) -> None:
        """Fold one batch's routing: indices and weights [B * T, k], token_ids [B * T]."""
        E, V = self.layout.n_experts, self.vocab_size
        valid = batch.valid.reshape(-1)
        index = top_k_index[valid].reshape(-1)
        weight = top_k_weights[valid].reshape(-1).float()
        ids = token_ids.reshape(-1)[valid].repeat_interleave(top_k_index.shape[1])
        inside = index < E
        index, weight, ids = index[inside], weight[inside], ids[inside]
        self.tokens[:E] += torch.bincount(index, minlength=E)[:E]
        self.weight_sum[:E] += torch.bincount(index, weights=weight.double(), minlength=E)[:E]
        self.weight_hist += torch.bincount(index * rules.VALUE_BINS + rules.value_bin(weight),
                                           minlength=self.weight_hist.numel())
        cell = index * V + ids.clamp(0, V - 1)
        self.token_counts += torch.bincount(cell, minlength=E * V)
        self.token_weights += torch.bincount(cell, weights=weight.double(), minlength=E * V)
        self._offer_texts(top_k_index, top_k_weights, batch)

    def _offer_texts(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, batch: Batch) -> None:
        """Per text and expert its largest router weight (the lowest position on ties), into the top k texts."""
        E = self.layout.n_experts
        B, T = batch.valid.shape
        grid = torch.full((B * T, E + 1), -1.0, device=top_k_weights.device)
        grid.scatter_(1, top_k_index.clamp(max=E), top_k_weights.float())
        grid = torch.where(batch.valid.reshape(-1, 1), grid[:, :E], -1.0).view(B, T, E)
        best, pos = grid.max(1)  # the first maximal position (torch's documented rule)
        weight = torch.cat([self.top_weight, best.T], 1)          # [E, k + B]
        text = torch.cat([self.top_text, batch.text_ids_t.unsqueeze(0).expand(E, B)], 1)
        position = torch.cat([self.top_pos, pos.T], 1)
        # Largest weight first, then the lower text id: sort by text id, then stably by weight.
        by_text = torch.argsort(torch.where(text >= 0, text, torch.iinfo(torch.int64).max), dim=1, stable=True)
        weight, text, position = (a.gather(1, by_text) for a in (weight, text, position))
        order = torch.argsort(-weight, dim=1, stable=True)[:, :self.k]
        self.top_weight, self.top_text, self.top_pos = (a.gather(1, order) for a in (weight, text, position))
        self.top_text = torch.where(self.top_weight > 0, self.top_text, -1)
        self.top_weight = torch.where(self.top_weight > 0, self.top_weight, -1.0)

    def direct_weights(self, unit_index: int, weight: torch.Tensor, batch: Batch) -> None:
        """A unit every token passes through (a shared expert): its weight per token [B * T] (its gate, or 1)."""
        valid = batch.valid.reshape(-1)
        w = weight.reshape(-1)[valid].float()
        self.tokens[unit_index] += int(valid.sum())
        self.weight_sum[unit_index] += w.double().sum()
        self.weight_hist[unit_index * rules.VALUE_BINS:(unit_index + 1) * rules.VALUE_BINS] += torch.bincount(
            rules.value_bin(w), minlength=rules.VALUE_BINS)

    def contribution(self, unit: Unit, weight: torch.Tensor) -> Contribution:
        """Where unit's reducer folds its neurons' router weight * hook_post: `weight` per row it is handed ([R] an
        expert's rows, [B * T] a shared expert's tokens), into the unit's slices of the running values."""
        span = slice(unit.first_neuron, unit.first_neuron + unit.n_neurons)
        return Contribution(weight.float(), self.value_min[span], self.value_max[span], self.value_sum[span],
                            self.value_count[span])

    def state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.STATE}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        for name in self.STATE:
            like = getattr(self, name)
            setattr(self, name, torch.from_numpy(checked_state(state, name, like).copy()).to(like.device))

    def result(self) -> RouterResult:
        E, V = self.layout.n_experts, self.vocab_size
        empty = self.value_count == 0
        return RouterResult(
            tokens=self.tokens.cpu().numpy(), weight_sum=self.weight_sum.cpu().numpy(),
            weight_hist=self.weight_hist.view(-1, rules.VALUE_BINS).cpu().numpy(),
            token_counts=self.token_counts.view(E, V).cpu().numpy(),
            token_weights=self.token_weights.view(E, V).cpu().numpy(),
            top_weight=self.top_weight.cpu().numpy(), top_text=self.top_text.cpu().numpy(),
            top_pos=self.top_pos.cpu().numpy(),
            value_min=torch.where(empty, float("nan"), self.value_min).cpu().numpy(),
            value_max=torch.where(empty, float("nan"), self.value_max).cpu().numpy(),
            value_sum=self.value_sum.cpu().numpy(), value_count=self.value_count.cpu().numpy())
