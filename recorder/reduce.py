"""Per-batch reductions and the running top-k, as pure tensor code on the model's device.

A list is one (quadrant, hook) pair: list index = quadrant * 4 + hook, with the
codes of schema.sql. Within a quadrant every hook has a fixed sign (act(x) has
the sign of x for swish and GELU), so "most extreme" means the largest value
of that sign, and one masked tensor yields two quadrants at once: its maximum
belongs to the quadrant where the value is positive, its minimum to the one
where it is negative. That halves the masking work of the naive 16 masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

PP, PN, NP, NN = range(4)
POST, IN, GATE, ACT = range(4)
N_LISTS = 16

# (hook, split by the sign of, quadrant of the maximum, quadrant of the minimum)
# per masked tensor: "u" splits x_gate-signed values by the sign of x_in and vice versa.
_SPLITS = (
    (POST, "u+", PP, NP), (POST, "u-", NN, PN),
    (IN, "g+", PP, PN), (IN, "g-", NP, NN),
    (GATE, "u+", PP, NP), (GATE, "u-", PN, NN),
    (ACT, "u+", PP, NP), (ACT, "u-", PN, NN),
)


def list_signs() -> torch.Tensor:
    """+1/-1 per list: the sign every value of that (quadrant, hook) has."""
    signs = torch.empty(N_LISTS)
    for q, (gs, us) in enumerate(((1, 1), (1, -1), (-1, 1), (-1, -1))):
        signs[q * 4 + POST] = gs * us
        signs[q * 4 + IN] = us
        signs[q * 4 + GATE] = gs
        signs[q * 4 + ACT] = gs
    return signs


def reduce_batch(g: torch.Tensor, u: torch.Tensor, valid: torch.Tensor,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]):
    """Reduce one layer's activations of one batch.

    g, u: [B, T, n] float32 x_gate and x_in (after the weight convention);
    valid: [B, T] bool, False at BOS and padding.
    Returns (best, near, total, counts):
      best [B, 16, n] int64: per text and list, |value| of the most extreme
        token as float32 bits in the high half and T-1-position in the low
        half, so the maximum picks the largest magnitude and then the lowest
        position; 0 means no token of that list in the text,
      near [16, n]: the value closest to zero over the batch (+-inf: none),
      total [16, n]: the sum over the batch,
      counts [4, n]: tokens per quadrant.
    Packing the position into the key turns 16 argmax reductions, which do
    not vectorise, into integer max reductions, which do.
    """
    T = g.shape[1]
    vm = valid.unsqueeze(-1)
    a = act_fn(g)
    p = a * u
    masks = {"u+": (u > 0) & vm, "u-": (u < 0) & vm, "g+": (g > 0) & vm, "g-": (g < 0) & vm}
    values = {POST: p, IN: u, GATE: g, ACT: a}
    zero = g.new_zeros(())
    inf = g.new_full((), float("inf"))
    tie = (T - 1 - torch.arange(T, device=g.device, dtype=torch.int64)).view(1, T, 1)
    best: list = [None] * N_LISTS
    near: list = [None] * N_LISTS
    total: list = [None] * N_LISTS
    # Every reduction runs over T with output [B, n], so a compiler can fuse
    # them into few passes over g and u; the cheap fold over B comes last.
    for hook, split, q_hi, q_lo in _SPLITS:
        m = torch.where(masks[split], values[hook], zero)
        up = m.clamp(min=0)
        down = (-m).clamp(min=0)
        i_hi, i_lo = q_hi * 4 + hook, q_lo * 4 + hook
        best[i_hi] = ((up.view(torch.int32).to(torch.int64) << 32) | tie).amax(1)
        best[i_lo] = ((down.view(torch.int32).to(torch.int64) << 32) | tie).amax(1)
        near[i_hi] = torch.where(m > 0, m, inf).amin(1)
        near[i_lo] = torch.where(m < 0, m, -inf).amax(1)
        total[i_hi] = up.sum(1)
        total[i_lo] = -down.sum(1)
    counts = torch.stack([
        (masks["g+"] & masks["u+"]).sum(1), (masks["g+"] & masks["u-"]).sum(1),
        (masks["g-"] & masks["u+"]).sum(1), (masks["g-"] & masks["u-"]).sum(1),
    ]).sum(1)
    near_t = torch.stack(near, 1)                                   # [B, 16, n]
    signs = list_signs().to(g.device).view(1, N_LISTS, 1) > 0
    near_all = torch.where(signs, near_t.amin(0, keepdim=True), near_t.amax(0, keepdim=True))[0]
    return torch.stack(best, 1), near_all, torch.stack(total, 1).sum(0), counts


def unpack_best(best: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed value, position) from reduce_batch's keys; value 0 where a text has no token of a list."""
    magnitude = (best >> 32).to(torch.int32).view(torch.float32)
    position = (T - 1) - (best & 0xFFFFFFFF)
    signs = list_signs().to(best.device).view(1, N_LISTS, 1)
    return magnitude * signs, position


def example_keys(values: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """int64 sort keys: |value| first, then the lower text id; -1 where there is no example.

    |value| as float32 bits is monotonic for non-negative floats, so one integer
    comparison ranks by magnitude and breaks ties deterministically.
    """
    mag = values.abs().float().view(torch.int32).to(torch.int64)
    tie = (0xFFFFFFFF - text_ids.to(torch.int64)).view(-1, *([1] * (values.dim() - 1)))
    keys = (mag << 32) | tie
    return torch.where(values != 0, keys, torch.full_like(keys, -1))


@dataclass
class LayerState:
    """The running statistics and top-k of one layer, on the model's device."""

    keys: torch.Tensor        # [k, 16, n] int64, -1 = empty slot
    value: torch.Tensor       # [k, 16, n] float32
    text: torch.Tensor        # [k, 16, n] int32
    pos: torch.Tensor         # [k, 16, n] int32
    win_start: torch.Tensor   # [k, 16, n] int32
    win_len: torch.Tensor     # [k, 16, n] int32
    win_gate: torch.Tensor    # [k, 16, n, W] float16
    win_in: torch.Tensor      # [k, 16, n, W] float16
    counts: torch.Tensor      # [4, n] int64
    vmin: torch.Tensor        # [16, n] float32
    vmax: torch.Tensor        # [16, n] float32
    vsum: torch.Tensor        # [16, n] float64

    @classmethod
    def empty(cls, k: int, n: int, window: int, device: torch.device) -> "LayerState":
        def full(shape, value, dtype):
            return torch.full(shape, value, dtype=dtype, device=device)
        return cls(
            keys=full((k, N_LISTS, n), -1, torch.int64), value=full((k, N_LISTS, n), 0, torch.float32),
            text=full((k, N_LISTS, n), -1, torch.int32), pos=full((k, N_LISTS, n), 0, torch.int32),
            win_start=full((k, N_LISTS, n), 0, torch.int32), win_len=full((k, N_LISTS, n), 0, torch.int32),
            win_gate=full((k, N_LISTS, n, window), 0, torch.float16),
            win_in=full((k, N_LISTS, n, window), 0, torch.float16),
            counts=full((4, n), 0, torch.int64), vmin=full((N_LISTS, n), float("inf"), torch.float32),
            vmax=full((N_LISTS, n), float("-inf"), torch.float32), vsum=full((N_LISTS, n), 0, torch.float64),
        )

    def update(self, g: torch.Tensor, u: torch.Tensor, lengths: torch.Tensor, text_ids: torch.Tensor,
               reduced, before: int, after: int) -> None:
        """Fold one batch's reduction into the state; g, u are needed only for the new examples' windows."""
        best, near, total, counts = reduced
        ext, ext_pos = unpack_best(best, g.shape[1])
        self.counts += counts
        self.vsum += total.double()
        positive = (list_signs() > 0).to(ext.device).unsqueeze(1)       # [16, 1]
        # A list's extreme end comes from the texts' extremes (0: none), its
        # near-zero end from `near` (+-inf: none).
        extreme = torch.where(positive, ext.amax(0), ext.amin(0))
        extreme_max = torch.where(extreme > 0, extreme, -torch.inf)
        extreme_min = torch.where(extreme < 0, extreme, torch.inf)
        self.vmax = torch.maximum(self.vmax, torch.where(positive, extreme_max, near))
        self.vmin = torch.minimum(self.vmin, torch.where(positive, near, extreme_min))
        self._merge_examples(g, u, lengths, text_ids, ext, ext_pos, before, after)

    def _merge_examples(self, g, u, lengths, text_ids, ext, ext_pos, before, after) -> None:
        k = self.keys.shape[0]
        batch, _, n = ext.shape
        cand = example_keys(ext, text_ids)                        # [B, 16, n]
        # Only lists where some candidate beats the current k-th take part;
        # late in a run that is a small fraction, often none.
        hot = (cand > self.keys.amin(0)).any(0).flatten().nonzero().squeeze(1)   # [C] flat (list, neuron)
        if hot.numel() == 0:
            return
        old = self.keys.view(k, -1)[:, hot]                       # [k, C]
        new = cand.view(batch, -1)[:, hot]                        # [B, C]
        top = torch.cat([old, new]).topk(k, dim=0, sorted=False).indices
        chosen = torch.zeros((k + batch, hot.numel()), dtype=torch.bool, device=cand.device)
        chosen.scatter_(0, top, True)
        entering = chosen[k:]
        leaving = ~chosen[:k]
        # Pair the j-th leaving slot of a list with its j-th entering candidate.
        m = min(k, batch)
        free_slot = torch.sort(leaving.to(torch.int8), dim=0, descending=True, stable=True).indices[:m]
        new_row = torch.sort(entering.to(torch.int8), dim=0, descending=True, stable=True).indices[:m]
        pair = torch.arange(m, device=cand.device).unsqueeze(1) < entering.sum(0)   # [m, C]
        j, c = pair.nonzero(as_tuple=True)
        slot = free_slot[j, c]
        row = new_row[j, c]
        flat = hot[c]
        lst = flat // n
        neuron = flat % n
        position = ext_pos[row, lst, neuron]

        self.keys[slot, lst, neuron] = cand[row, lst, neuron]
        self.value[slot, lst, neuron] = ext[row, lst, neuron].float()
        self.text[slot, lst, neuron] = text_ids[row].to(torch.int32)
        self.pos[slot, lst, neuron] = position.to(torch.int32)

        window = self.win_gate.shape[-1]
        start = (position - before).clamp(min=0)
        end = torch.minimum(position + after + 1, lengths[row])
        t = start.unsqueeze(1) + torch.arange(window, device=cand.device)    # [E, W]
        inside = t < end.unsqueeze(1)
        t = torch.where(inside, t, torch.zeros_like(t))
        # One flat index into g and u: take() is much cheaper than indexing
        # with three broadcast index tensors.
        T = g.shape[1]
        flat = (row.unsqueeze(1) * T + t) * n + neuron.unsqueeze(1)
        zero = torch.zeros((), dtype=torch.float16, device=cand.device)
        self.win_gate[slot, lst, neuron] = torch.where(inside, g.reshape(-1).take(flat).to(torch.float16), zero)
        self.win_in[slot, lst, neuron] = torch.where(inside, u.reshape(-1).take(flat).to(torch.float16), zero)
        self.win_start[slot, lst, neuron] = start.to(torch.int32)
        self.win_len[slot, lst, neuron] = (end - start).to(torch.int32)

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(counts [4, n], vmin [16, n], vmax [16, n], vsum [16, n]) as NumPy arrays."""
        return tuple(t.cpu().numpy() for t in (self.counts, self.vmin, self.vmax, self.vsum))

    def examples(self) -> dict[str, np.ndarray]:
        """The lists most extreme first, as NumPy arrays [4, 4, n, k, ...] (text -1 marks an empty slot)."""
        ranked = {name: t.cpu().numpy() for name, t in self.ranked().items()}
        ranked["text"] = np.where(ranked.pop("keys") >= 0, ranked["text"], -1)
        return {name: np.moveaxis(a.reshape(a.shape[0], 4, 4, *a.shape[2:]), 0, 3) for name, a in ranked.items()}

    def ranked(self) -> dict[str, torch.Tensor]:
        """The top-k lists sorted most extreme first, as [k, 16, n] tensors."""
        order = self.keys.sort(dim=0, descending=True, stable=True).indices
        out = {name: getattr(self, name).gather(0, order) for name in
               ("keys", "value", "text", "pos", "win_start", "win_len")}
        idx = order.unsqueeze(-1).expand_as(self.win_gate)
        out["win_gate"] = self.win_gate.gather(0, idx)
        out["win_in"] = self.win_in.gather(0, idx)
        return out
