"""The reducer as tensor code on the model's device: reduce_batch per batch, TensorReducer across batches.

Within a list every value has one sign (rules.LIST_SIGNS), so "most extreme"
means the largest |value|, and one masked tensor yields two lists at once: its
positive part belongs to the quadrant where the value is positive, its
negative part to the one where it is negative. That halves the masking work
of the naive 16 masks.

The distributions are TensorDistributions: histograms and density as
one bincount each over flat (neuron, quadrant, hook, bin) indices, and per
text the token of smallest sample hash in each (quadrant, interval) as one
scatter_reduce, merged into sample lists like the top-k lists. Calibration
(the interval bounds) is shared by both reducers, so it lives here alone.
"""

from __future__ import annotations

from functools import cache
from typing import Callable, Mapping

import numpy as np
import torch

from gluscope.recorder import rules
from gluscope.recorder.reducer_interface import (Batch, Contribution, LayerSetup, ReducedLayer, checked_state,
                                                finish_layer)
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


# The distributions' parts, each of which reduce_distributions computes only when asked (all, in a recording).
DISTRIBUTIONS = ("histograms", "density", "sampling")


INT64_MAX = torch.iinfo(torch.int64).max


def spread_rows(x_gate: torch.Tensor, x_in: torch.Tensor, batch: Batch, rows: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [B, T, n]: as given, or an expert's compact rows (LayerReducer.update) with NaN at the tokens routed
    elsewhere: NaN is in no quadrant, so every statistic leaves those out, and windows show them as NaN."""
    if rows is None:
        return x_gate.float(), x_in.float()
    B, T = batch.valid.shape
    routed = rows >= 0

    def spread(x: torch.Tensor) -> torch.Tensor:
        full = torch.full((B * T, x.shape[1]), torch.nan, device=x.device)
        full[routed] = x.float()[rows[routed]]
        return full.view(B, T, -1)
    return spread(x_gate), spread(x_in)


def quadrant_codes(x_gate: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """The quadrant code of every (x_gate, x_in in the convention) pair, any shape; -1 where either is zero or NaN.

    The code is 2 * (x_gate < 0) + (x_in < 0), as the kernel computes it: one pass instead of a masked pass per
    quadrant (the codes' order is checked against QUADRANT_SIGNS below)."""
    member = ((x_gate > 0) | (x_gate < 0)) & ((x_in > 0) | (x_in < 0))
    code = (x_gate < 0).to(torch.int64) * 2 + (x_in < 0).to(torch.int64)
    return torch.where(member, code, -1)


assert all(2 * (g < 0) + (i < 0) == code for code, (g, i) in enumerate(QUADRANT_SIGNS)), "quadrant_codes' formula"


def fold_contribution(x_gate: torch.Tensor, x_in: torch.Tensor, batch: Batch, rows: torch.Tensor | None,
                      contribution: Contribution, setup: LayerSetup) -> None:
    """A unit's router weight * hook_post into contribution's running values, from x_gate, x_in and rows as
    LayerReducer.update takes them: one scatter per statistic over flat (neuron, quadrant) cells."""
    n = x_gate.shape[-1]
    x_gate = x_gate.float().reshape(-1, n)
    x_in = x_in.float().reshape(-1, n) * setup.sign
    values = setup.act_fn(x_gate) * x_in * contribution.weight.float().unsqueeze(1)
    q = torch.where(_counted_rows(batch, rows, x_gate.shape[0]).unsqueeze(1), quadrant_codes(x_gate, x_in), -1)
    inside = q >= 0
    cell = ((torch.arange(n, device=q.device) * N_QUADRANTS).unsqueeze(0) + q)[inside]
    values = values[inside]
    contribution.value_min.view(-1).scatter_reduce_(0, cell, values, "amin")
    contribution.value_max.view(-1).scatter_reduce_(0, cell, values, "amax")
    contribution.value_sum.view(-1).index_add_(0, cell, values.double())
    contribution.value_count.view(-1).index_add_(0, cell, torch.ones_like(cell))


def _counted_rows(batch: Batch, rows: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """[n_rows] bool: which rows of x_gate are counted tokens (not BOS, not padding)."""
    valid = batch.valid.reshape(-1)
    if rows is None:
        return valid
    routed = rows >= 0
    counted = torch.zeros(n_rows, dtype=torch.bool, device=valid.device)
    counted[rows[routed]] = valid[routed]
    return counted


def quadrant_of(x_gate: torch.Tensor, x_in: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, T, n] int64 quadrant code of every token; -1: in none (a zero sign, BOS or padding)."""
    return torch.where(valid.unsqueeze(-1), quadrant_codes(x_gate, x_in), -1)


def reduce_distributions(x_gate: torch.Tensor, x_in: torch.Tensor, act: torch.Tensor, valid: torch.Tensor,
                         bounds: torch.Tensor, hashes: torch.Tensor, parts: frozenset = frozenset(DISTRIBUTIONS)
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One batch's histograms, density and per-text sample candidates.

    x_gate, x_in, act [B, T, n] float32 (x_in after the weight convention); bounds [4, 3, n] float32;
    hashes [B, T, n] int64 (rules.sample_hash). Returns (hist [n * 4 * 3 * HIST_SLOTS] int64,
    density [n * 44 * 44] int64, cand [B, 4 + 16, n] int64): cand holds per text the key hash << 32 | position
    of the token of smallest hash, then lower position, for each quadrant (the random lists) and each
    (quadrant, interval) (the interval lists); INT64_MAX: none.
    """
    B, T, n = x_gate.shape
    device = x_gate.device
    q = quadrant_of(x_gate, x_in, valid)
    inside = q >= 0
    qc = q.clamp(min=0)
    neuron = torch.arange(n, device=device)
    post = act * x_in
    hist = density = cand = None
    if "histograms" in parts:
        n_cells = n * N_QUADRANTS * rules.N_HIST_HOOKS * rules.HIST_SLOTS
        flats = []
        for h, (hook, v) in enumerate(zip(rules.HIST_HOOKS, (post, x_in, x_gate))):
            signs = torch.tensor([LIST_SIGNS[list_index(c, hook)] for c in range(N_QUADRANTS)], device=device)
            slot = signs[qc] * (rules.value_bin(v) - rules.VALUE_MAG_BINS)
            flat = ((neuron * N_QUADRANTS + qc) * rules.N_HIST_HOOKS + h) * rules.HIST_SLOTS + slot
            flats.append(torch.where(inside, flat, n_cells).flatten())
        hist = torch.bincount(torch.cat(flats), minlength=n_cells + 1)[:n_cells]
    if "density" in parts:
        d = rules.DENSITY_BINS
        flat = (neuron * d + rules.density_bin(x_gate)) * d + rules.density_bin(x_in)
        density = torch.bincount(torch.where(inside, flat, n * d * d).flatten(), minlength=n * d * d + 1)[:n * d * d]
    if "sampling" in parts:
        p = post.abs().view(B * T, n)
        interval = sum((p >= bounds[:, j, :].gather(0, qc.view(B * T, n))).to(torch.int64) for j in range(3))
        n_cells = N_QUADRANTS * rules.N_INTERVALS
        cell = torch.where(inside, qc * rules.N_INTERVALS + interval.view(B, T, n), n_cells)
        positions = torch.arange(T, device=device).view(1, T, 1)
        key = (hashes << 32) | positions
        per_cell = torch.full((B, n_cells + 1, n), INT64_MAX, dtype=torch.int64, device=device)
        per_cell.scatter_reduce_(1, cell, key.expand(B, T, n), reduce="amin")
        per_cell = per_cell[:, :n_cells]
        cand = torch.cat([per_cell.view(B, N_QUADRANTS, rules.N_INTERVALS, n).amin(2), per_cell], 1)
    return hist, density, cand


class Calibration:
    """Counts of |hook_post| per (neuron, quadrant) on the 'value' magnitude bins, over the calibration batches.

    One implementation for both reducers, so that they share the interval bounds bit for bit.
    """

    def __init__(self, sign: torch.Tensor, act_fn: Callable) -> None:
        self.sign = sign
        self.act_fn = act_fn
        self.counts = torch.zeros(sign.shape[0] * N_QUADRANTS * rules.VALUE_MAG_BINS, dtype=torch.int64,
                                  device=sign.device)

    def update(self, x_gate: torch.Tensor, x_in: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None) -> None:
        x_gate, x_in = spread_rows(x_gate, x_in, batch, rows)
        x_in = x_in * self.sign
        n = x_gate.shape[-1]
        q = quadrant_of(x_gate, x_in, batch.valid)
        mag = rules.value_magnitude_bin((self.act_fn(x_gate) * x_in).abs())
        flat = (torch.arange(n, device=x_gate.device) * N_QUADRANTS + q.clamp(min=0)) * rules.VALUE_MAG_BINS + mag
        size = self.counts.numel()
        self.counts += torch.bincount(torch.where(q >= 0, flat, size).flatten(), minlength=size + 1)[:size]

    def bounds(self) -> np.ndarray:
        """[n, 4, 3] float32 (rules.interval_bounds)."""
        return rules.interval_bounds(self.counts.view(-1, N_QUADRANTS, rules.VALUE_MAG_BINS).cpu().numpy())


@cache
def _compiled_reduce_batch() -> Callable:
    # One fused kernel instead of ~70 passes over [B, T, d_mlp]; dynamic
    # shapes because length-bucketed batches differ in T.
    return torch.compile(reduce_batch, dynamic=True)


class TensorReducer:
    """A LayerReducer as tensors on the model's device. Lists are [k, lists, n], slots unordered until finish.

    A list set is a dict of tensors of one shape [k, L, n, ...] that ranks by an int64 key, largest first, -1
    for an empty slot: the top-k lists here ([k, 16, n]), the sampled examples in TensorDistributions.
    """

    # The attributes that hold the running state: a checkpoint saves and restores exactly these
    # (state/load_state), so a new statistic's tensor is checkpointed by naming it here. An attribute is a
    # tensor, a list set (dict of tensors) or an object with a STATE of its own.
    STATE = ("top", "counts", "near", "total", "distributions")
    DERIVED: tuple[str, ...] = ()  # tensors made from the setup alone, which no batch changes

    def __init__(self, setup: LayerSetup, compiled: bool = False) -> None:
        self.setup = setup
        self.reduce_fn = _compiled_reduce_batch() if compiled else reduce_batch
        n, device = setup.n, setup.sign.device
        # The whole state of the layer (a checkpoint saves these tensors, and those of self.distributions).
        self.top = new_lists(setup, setup.k, N_LISTS, magnitude=torch.float32)
        self.counts = torch.zeros((N_QUADRANTS, n), dtype=torch.int64, device=device)
        self.near = torch.full((N_LISTS, n), float("inf"), dtype=torch.float32, device=device)
        self.total = torch.zeros((N_LISTS, n), dtype=torch.float64, device=device)
        self.distributions = TensorDistributions(setup)

    def state(self) -> dict[str, torch.Tensor]:
        return state_tensors(self)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        for name, like in state_tensors(self).items():
            like.copy_(torch.from_numpy(checked_state(state, name, like)))  # in place: the flat view is the state

    def update(self, x_gate: torch.Tensor, x_in: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None,
               contribution: Contribution | None = None) -> None:
        if contribution is not None:
            fold_contribution(x_gate, x_in, batch, rows, contribution, self.setup)
        x_gate, x_in = spread_rows(x_gate, x_in, batch, rows)
        x_in = x_in * self.setup.sign
        best, near, total, counts = self.reduce_fn(x_gate, x_in, batch.valid, self.setup.act_fn)
        magnitude, position = unpack_best(best, x_gate.shape[1])
        self.counts += counts
        self.total += total.double()
        self.near = torch.minimum(self.near, near)
        cand = example_keys(magnitude, batch.text_ids_t)          # [B, 16, n]
        _merge_lists(self.top, cand, position, batch, x_gate, x_in, self.setup, at_candidate={"magnitude": magnitude})
        self.distributions.update(x_gate, x_in, None, batch)

    def finish(self) -> LayerStatistics:
        top = _ranked(self.top)
        return finish_layer(ReducedLayer(
            counts=self.counts.cpu().numpy().T, near=self.near.cpu().numpy().T, total=self.total.cpu().numpy().T,
            top_mag=top["magnitude"], top_text=np.where(top["keys"] >= 0, top["text"], -1),
            top_pos=top["pos"], win_gate=top["win_gate"], win_in=top["win_in"],
            **self.distributions.finish(),
        ), self.setup)


def state_tensors(obj) -> dict[str, torch.Tensor]:
    """The tensors of obj.STATE by flat name ("top.keys", "distributions.hist" ...), for checkpoints."""
    out: dict[str, torch.Tensor] = {}
    for name in obj.STATE:
        value = getattr(obj, name)
        if isinstance(value, torch.Tensor):
            out[name] = value
        else:
            inner = value if isinstance(value, dict) else state_tensors(value)
            out.update({f"{name}.{key}": tensor for key, tensor in inner.items()})
    return out


def new_lists(setup: LayerSetup, k: int, n_lists: int, **extra) -> dict[str, torch.Tensor]:
    """An empty list set of k slots for n_lists lists of every neuron, with windows and `extra` values."""
    shape, device = (k, n_lists, setup.n), setup.sign.device

    def full(shape, value, dtype):
        return torch.full(shape, value, dtype=dtype, device=device)
    return {"keys": full(shape, -1, torch.int64), "text": full(shape, -1, torch.int32),
            "pos": full(shape, 0, torch.int32), "win_gate": full((*shape, setup.window), 0, torch.float16),
            "win_in": full((*shape, setup.window), 0, torch.float16),
            **{name: full(shape, 0, dtype) for name, dtype in extra.items()}}


class TensorDistributions:
    """Histograms, density and sampled examples of one layer, as tensors on the model's device.

    Sample lists: `random` [N_RANDOM, 4, n] and `interval` [N_PER_INTERVAL, 16, n] (list quadrant * 4 +
    interval), keyed so that the smallest hash, then the lower text id, ranks first.
    """

    STATE = ("random", "interval", "hist", "density")  # as TensorReducer.STATE
    DERIVED = ("bounds", "salt")
    # The parts update computes: all. A class attribute, so that a benchmark can narrow it from outside to
    # measure what each part costs (a file recorded so lacks those tables' rows).
    parts: frozenset = frozenset(DISTRIBUTIONS)

    def __init__(self, setup: LayerSetup) -> None:
        self.setup = setup
        n, device = setup.n, setup.sign.device
        self.bounds = torch.from_numpy(setup.interval_bounds).to(device).permute(1, 2, 0).contiguous()  # [4, 3, n]
        self.salt = rules.neuron_salt(setup.seed, setup.layer, n, device, setup.first_neuron)
        samples = {"gate": torch.float32, "in": torch.float32, "act": torch.float32}
        # The state:
        self.random = new_lists(setup, rules.N_RANDOM, N_QUADRANTS, **samples)
        self.interval = new_lists(setup, rules.N_PER_INTERVAL, N_QUADRANTS * rules.N_INTERVALS, **samples)
        self.hist = torch.zeros(n * N_QUADRANTS * rules.N_HIST_HOOKS * rules.HIST_SLOTS, dtype=torch.int64,
                                device=device)
        self.density = torch.zeros(n * rules.DENSITY_BINS ** 2, dtype=torch.int64, device=device)

    def update(self, x_gate: torch.Tensor, x_in: torch.Tensor, act: torch.Tensor | None, batch: Batch) -> None:
        """x_gate, x_in [B, T, n] float32, x_in after the weight convention; act = act_fn(x_gate) if known."""
        if not self.parts:
            return
        if act is None:
            act = self.setup.act_fn(x_gate)
        T = x_gate.shape[1]
        hashes = rules.sample_hash(rules.token_hash(self.setup.seed, batch.text_ids_t,
                                                    torch.arange(T, device=x_gate.device)), self.salt)
        hist, density, per_text = reduce_distributions(x_gate, x_in, act, batch.valid, self.bounds, hashes,
                                                       self.parts)
        if hist is not None:
            self.hist += hist
        if density is not None:
            self.density += density
        if per_text is None:
            return
        some = per_text != INT64_MAX
        keys = torch.where(some, ((0x7FFFFFFF - (per_text >> 32)) << 32) | text_tie(batch.text_ids_t).view(-1, 1, 1),
                           -1)
        position = torch.where(some, per_text & 0xFFFFFFFF, 0)
        at_token = {"gate": x_gate, "in": x_in, "act": act}
        for lists, part in ((self.random, slice(0, N_QUADRANTS)), (self.interval, slice(N_QUADRANTS, None))):
            _merge_lists(lists, keys[:, part], position[:, part], batch, x_gate, x_in, self.setup, at_token=at_token)

    def finish(self) -> dict[str, np.ndarray]:
        """The distribution fields of ReducedLayer."""
        n = self.setup.n
        random, interval = _ranked(self.random), _ranked(self.interval)

        def samples(name: str) -> np.ndarray:  # -> [n, 4, SAMPLE_SLOTS, ...]
            ivl = interval[name]  # [n, 16, N_PER_INTERVAL, ...]
            ivl = ivl.reshape(n, N_QUADRANTS, rules.N_INTERVALS * rules.N_PER_INTERVAL, *ivl.shape[3:])
            return np.concatenate([random[name], ivl], axis=2)
        keys = samples("keys")
        return dict(
            hist=self.hist.view(n, N_QUADRANTS, rules.N_HIST_HOOKS, rules.HIST_SLOTS).cpu().numpy(),
            density=self.density.view(n, rules.DENSITY_BINS, rules.DENSITY_BINS).cpu().numpy(),
            samp_hash=np.where(keys >= 0, 0x7FFFFFFF - (keys >> 32), -1),
            samp_text=np.where(keys >= 0, samples("text"), -1), samp_pos=samples("pos"),
            samp_gate=samples("gate"), samp_in=samples("in"), samp_act=samples("act"),
            samp_win_gate=samples("win_gate"), samp_win_in=samples("win_in"))


def _ranked(lists: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A list set's tensors [k, L, n, ...] -> NumPy [n, L, k, ...], largest key first."""
    order = lists["keys"].sort(dim=0, descending=True, stable=True).indices

    def ranked(t: torch.Tensor) -> np.ndarray:
        index = order.view(*order.shape, *([1] * (t.dim() - 3))).expand_as(t)
        return t.gather(0, index).cpu().numpy().swapaxes(0, 2)
    return {name: ranked(t) for name, t in lists.items()}


def _merge_lists(lists: dict[str, torch.Tensor], cand: torch.Tensor, position: torch.Tensor, batch: Batch,
                 x_gate: torch.Tensor, x_in: torch.Tensor, setup: LayerSetup,
                 at_candidate: dict[str, torch.Tensor] | None = None,
                 at_token: dict[str, torch.Tensor] | None = None) -> None:
    """Fold one batch's candidates (keys cand [B, L, n], -1: none; their positions) into a list set.

    Entering candidates bring their text, position and window, and the values of `at_candidate` ([B, L, n],
    taken at the candidate) and `at_token` ([B, T, n], taken at its token).
    """
    keys = lists["keys"]
    k = keys.shape[0]
    n_texts, _, n = cand.shape
    # Only lists where some candidate beats the current k-th take part;
    # late in a run that is a small fraction, often none.
    hot = (cand > keys.amin(0)).any(0).flatten().nonzero().squeeze(1)   # [C] flat (list, neuron)
    if hot.numel() == 0:
        return
    old = keys.view(k, -1)[:, hot]                            # [k, C]
    new = cand.reshape(n_texts, -1)[:, hot]                   # [B, C]
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

    keys[slot, lst, neuron] = cand[row, lst, neuron]
    lists["text"][slot, lst, neuron] = batch.text_ids_t[row].to(torch.int32)
    lists["pos"][slot, lst, neuron] = at.to(torch.int32)
    for name, values in (at_candidate or {}).items():
        lists[name][slot, lst, neuron] = values[row, lst, neuron]

    T = x_gate.shape[1]
    for name, values in (at_token or {}).items():
        lists[name][slot, lst, neuron] = values.reshape(-1).take((row * T + at) * n + neuron)
    start, stop = window_bounds(at, batch.lengths_t[row], setup.before, setup.after)
    t = start.unsqueeze(1) + torch.arange(setup.window, device=cand.device)    # [E, W]
    inside = t < stop.unsqueeze(1)
    t = torch.where(inside, t, torch.zeros_like(t))
    # One flat index into x_gate and x_in: take() is much cheaper than
    # indexing with three broadcast index tensors.
    flat = (row.unsqueeze(1) * T + t) * n + neuron.unsqueeze(1)
    zero = torch.zeros((), dtype=torch.float16, device=cand.device)
    for name, values in (("win_gate", x_gate), ("win_in", x_in)):
        lists[name][slot, lst, neuron] = torch.where(inside, values.reshape(-1).take(flat).to(torch.float16), zero)
