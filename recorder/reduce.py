"""The reducer as tensor code on the model's device: reduce_batch per batch, TensorReducer across batches.

Within a list every value has one sign (rules.LIST_SIGNS), so "most extreme"
means the largest |value|, and one masked tensor yields two lists at once: its
positive part belongs to the quadrant where the value is positive, its
negative part to the one where it is negative. That halves the masking work
of the naive 16 masks.
"""

from __future__ import annotations

from functools import cache
from typing import Callable, Mapping

import numpy as np
import torch

from gluscope.recorder.reducer import Batch, LayerSetup, ReducedLayer, checked_state, finish_layer
from gluscope.recorder.rules import (ACT, LIST_SIGNS, N_HOOKS, N_LISTS, N_QUADRANTS, POST, QUADRANT_SIGNS, X_GATE, X_IN,
                                     key_magnitude, list_index, magnitude_key, position_tie, text_tie, tie_position,
                                     window_bounds)
from gluscope.recorder.writer import LayerStatistics


def _splits() -> tuple[tuple[int, tuple[str, int], int, int], ...]:
    """Per masked tensor: (hook, (the variable whose sign masks it, that sign), list of its positive part, list of
    its negative part). A hook's values are split by the sign of the variable that leaves their own sign open."""
    splits = []
    for hook in range(N_HOOKS):
        for var, axis in (("x_in", 1), ("x_gate", 0)):
            groups = [[q for q in range(N_QUADRANTS) if QUADRANT_SIGNS[q][axis] == s] for s in (1, -1)]
            signs = [sorted(LIST_SIGNS[list_index(q, hook)] for q in group) for group in groups]
            if all(pair == [-1, 1] for pair in signs):
                for s, group in zip((1, -1), groups):
                    hi, lo = sorted(group, key=lambda q: -LIST_SIGNS[list_index(q, hook)])
                    splits.append((hook, (var, s), list_index(hi, hook), list_index(lo, hook)))
                break
        else:
            raise AssertionError(f"no variable splits hook {hook} into a positive and a negative list")
    return tuple(splits)


_SPLITS = _splits()


def reduce_batch(x_gate: torch.Tensor, x_in: torch.Tensor, valid: torch.Tensor,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]):
    """Reduce one layer's activations of one batch.

    x_gate, x_in: [B, T, n] float32 (x_in after the weight convention);
    valid: [B, T] bool, False at BOS and padding.
    Returns (best, near, total, counts):
      best [B, 16, n] int64: per text and list, the key (rules.magnitude_key)
        of its most extreme token with the position as tie-breaker, so the
        maximum picks the largest |value| and then the lowest position; 0
        means no token of that list in the text,
      near [16, n]: the smallest |value| over the batch (inf: none),
      total [16, n]: the sum of |value| over the batch,
      counts [4, n]: tokens per quadrant.
    Packing the position into the key turns 16 argmax reductions, which do
    not vectorise, into integer max reductions, which do.
    """
    T = x_gate.shape[1]
    vm = valid.unsqueeze(-1)
    a = act_fn(x_gate)
    values = {POST: a * x_in, X_IN: x_in, X_GATE: x_gate, ACT: a}
    masks = {(var, s): ((v > 0) if s > 0 else (v < 0)) & vm
             for var, v in (("x_in", x_in), ("x_gate", x_gate)) for s in (1, -1)}
    in_quadrant = [masks[("x_gate", gs)] & masks[("x_in", us)] for gs, us in QUADRANT_SIGNS]
    zero = x_gate.new_zeros(())
    inf = x_gate.new_full((), float("inf"))
    tie = position_tie(torch.arange(T, device=x_gate.device, dtype=torch.int64), T).view(1, T, 1)
    best: list = [None] * N_LISTS
    near: list = [None] * N_LISTS
    total: list = [None] * N_LISTS
    # Every reduction runs over T with output [B, n], so a compiler can fuse
    # them into few passes over x_gate and x_in; the cheap fold over B comes last.
    for hook, split, i_hi, i_lo in _SPLITS:
        m = torch.where(masks[split], values[hook], zero)
        for i, part in ((i_hi, m.clamp(min=0)), (i_lo, (-m).clamp(min=0))):
            best[i] = magnitude_key(part, tie).amax(1)
            # The quadrant's mask, not part > 0: a value that underflowed to 0 is the list's near end.
            near[i] = torch.where(in_quadrant[i // N_HOOKS], part, inf).amin(1)
            total[i] = part.sum(1)
    counts = torch.stack([mask.sum(1) for mask in in_quadrant]).sum(1)
    return torch.stack(best, 1), torch.stack(near, 1).amin(0), torch.stack(total, 1).sum(0), counts


def unpack_best(best: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(|value|, position) from reduce_batch's keys; |value| 0 where a text has no token of a list."""
    return key_magnitude(best), tie_position(best, T)


def example_keys(magnitude: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """int64 sort keys of examples across texts: |value| first, then the lower text id; -1 where there is none."""
    tie = text_tie(text_ids).view(-1, *([1] * (magnitude.dim() - 1)))
    keys = magnitude_key(magnitude.float(), tie)
    return torch.where(magnitude != 0, keys, torch.full_like(keys, -1))


@cache
def _compiled_reduce_batch() -> Callable:
    # One fused kernel instead of ~70 passes over [B, T, d_mlp]; dynamic
    # shapes because length-bucketed batches differ in T.
    return torch.compile(reduce_batch, dynamic=True)


class TensorReducer:
    """A LayerReducer as tensors on the model's device. Lists are [k, 16, n], slots unordered until finish."""

    # The attributes that hold the running state: a checkpoint saves and restores exactly these
    # (state/load_state), so a new statistic's tensor is checkpointed by naming it here.
    STATE = ("keys", "magnitude", "text", "pos", "win_gate", "win_in", "counts", "near", "total")

    def __init__(self, setup: LayerSetup, compiled: bool = False) -> None:
        self.setup = setup
        self.reduce_fn = _compiled_reduce_batch() if compiled else reduce_batch
        k, n, window, device = setup.k, setup.n, setup.window, setup.sign.device

        def full(shape, value, dtype):
            return torch.full(shape, value, dtype=dtype, device=device)
        self.keys = full((k, N_LISTS, n), -1, torch.int64)     # -1: an empty slot
        self.magnitude = full((k, N_LISTS, n), 0, torch.float32)
        self.text = full((k, N_LISTS, n), -1, torch.int32)
        self.pos = full((k, N_LISTS, n), 0, torch.int32)
        self.win_gate = full((k, N_LISTS, n, window), 0, torch.float16)
        self.win_in = full((k, N_LISTS, n, window), 0, torch.float16)
        self.counts = full((N_QUADRANTS, n), 0, torch.int64)
        self.near = full((N_LISTS, n), float("inf"), torch.float32)
        self.total = full((N_LISTS, n), 0, torch.float64)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.STATE}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        for name in self.STATE:
            like = getattr(self, name)
            setattr(self, name, torch.from_numpy(checked_state(state, name, like)).to(like.device))

    def update(self, x_gate: torch.Tensor, x_in: torch.Tensor, batch: Batch) -> None:
        x_gate = x_gate.float()
        x_in = x_in.float() * self.setup.sign
        best, near, total, counts = self.reduce_fn(x_gate, x_in, batch.valid, self.setup.act_fn)
        magnitude, position = unpack_best(best, x_gate.shape[1])
        self.counts += counts
        self.total += total.double()
        self.near = torch.minimum(self.near, near)
        self._merge_examples(x_gate, x_in, batch, magnitude, position)

    def _merge_examples(self, x_gate: torch.Tensor, x_in: torch.Tensor, batch: Batch, magnitude: torch.Tensor,
                        position: torch.Tensor) -> None:
        k = self.keys.shape[0]
        n_texts, _, n = magnitude.shape
        cand = example_keys(magnitude, batch.text_ids_t)          # [B, 16, n]
        # Only lists where some candidate beats the current k-th take part;
        # late in a run that is a small fraction, often none.
        hot = (cand > self.keys.amin(0)).any(0).flatten().nonzero().squeeze(1)   # [C] flat (list, neuron)
        if hot.numel() == 0:
            return
        old = self.keys.view(k, -1)[:, hot]                       # [k, C]
        new = cand.view(n_texts, -1)[:, hot]                      # [B, C]
        top = torch.cat([old, new]).topk(k, dim=0, sorted=False).indices
        chosen = torch.zeros((k + n_texts, hot.numel()), dtype=torch.bool, device=cand.device)
        chosen.scatter_(0, top, True)
        entering = chosen[k:] & (new >= 0)  # an empty candidate may outrank an empty slot, but fills nothing
        leaving = ~chosen[:k]
        # Pair the j-th leaving slot of a list with its j-th entering candidate.
        m = min(k, n_texts)
        free_slot = torch.sort(leaving.to(torch.int8), dim=0, descending=True, stable=True).indices[:m]
        new_row = torch.sort(entering.to(torch.int8), dim=0, descending=True, stable=True).indices[:m]
        pair = torch.arange(m, device=cand.device).unsqueeze(1) < entering.sum(0)   # [m, C]
        j, c = pair.nonzero(as_tuple=True)
        slot = free_slot[j, c]
        row = new_row[j, c]
        flat = hot[c]
        lst = flat // n
        neuron = flat % n
        at = position[row, lst, neuron]

        self.keys[slot, lst, neuron] = cand[row, lst, neuron]
        self.magnitude[slot, lst, neuron] = magnitude[row, lst, neuron]
        self.text[slot, lst, neuron] = batch.text_ids_t[row].to(torch.int32)
        self.pos[slot, lst, neuron] = at.to(torch.int32)

        start, stop = window_bounds(at, batch.lengths_t[row], self.setup.before, self.setup.after)
        t = start.unsqueeze(1) + torch.arange(self.setup.window, device=cand.device)    # [E, W]
        inside = t < stop.unsqueeze(1)
        t = torch.where(inside, t, torch.zeros_like(t))
        # One flat index into x_gate and x_in: take() is much cheaper than
        # indexing with three broadcast index tensors.
        T = x_gate.shape[1]
        flat = (row.unsqueeze(1) * T + t) * n + neuron.unsqueeze(1)
        zero = torch.zeros((), dtype=torch.float16, device=cand.device)
        for window, values in ((self.win_gate, x_gate), (self.win_in, x_in)):
            window[slot, lst, neuron] = torch.where(inside, values.reshape(-1).take(flat).to(torch.float16), zero)

    def finish(self) -> LayerStatistics:
        order = self.keys.sort(dim=0, descending=True, stable=True).indices

        def ranked(t: torch.Tensor) -> np.ndarray:  # [k, 16, n, ...] -> [n, 16, k, ...] most extreme first
            index = order.view(*order.shape, *([1] * (t.dim() - 3))).expand_as(t)
            return t.gather(0, index).cpu().numpy().swapaxes(0, 2)
        keys = ranked(self.keys)
        return finish_layer(ReducedLayer(
            counts=self.counts.cpu().numpy().T, near=self.near.cpu().numpy().T, total=self.total.cpu().numpy().T,
            top_mag=ranked(self.magnitude), top_text=np.where(keys >= 0, ranked(self.text), -1),
            top_pos=ranked(self.pos), win_gate=ranked(self.win_gate), win_in=ranked(self.win_in),
        ), self.setup)
