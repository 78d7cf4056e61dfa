"""What a reducer is: one layer's activations of one batch in, one finished layer out.

Two implementations: `tensor_reducer.TensorReducer` (tensor code, any device) and
`kernel_reducer.KernelReducer` (a compiled C++ pass, CPU only). Both take the same
`LayerSetup` and the same `update` arguments, hand over a `ReducedLayer` in
one layout, and `finish_layer` turns that into the writer's
`LayerStatistics`, so signs, NaNs, means and window bounds are applied once.

A new per-neuron statistic goes: its parameters, if both reducers need them
(bin edges, say), into rules.py, whose c_header() hands them to the kernel;
its per-batch reduction into tensor_reducer.py (reduce_batch and TensorReducer) and
kernels/reduce_cpu.cpp (with one STATE row in kernel_reducer.py, and its tensor
named in TensorReducer.STATE: checkpoints save what these declare); one
ReducedLayer field here and its conversion in finish_layer; one
LayerStatistics field and its rows in writer.py; its table in schema.sql.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import numpy as np
import torch

from gluscope.errors import UserError
from gluscope.recorder import rules
from gluscope.recorder.rules import LIST_SIGNS_NP, N_HOOKS, N_QUADRANTS, window_bounds
from gluscope.recorder.writer import LayerStatistics


@dataclass(frozen=True)
class LayerSetup:
    """What one layer's reducer is built with."""

    k: int                     # examples kept per list
    before: int                # window tokens before and after an example
    after: int
    sign: torch.Tensor         # [n] float32 +-1 on the model's device: the weight convention, applied to x_in
    act_fn: Callable[..., torch.Tensor]
    text_lengths: np.ndarray   # [n_texts] int64 tokens per text, BOS included: the windows' bounds
    layer: int = 0             # with seed, what the sampling hash of this layer's neurons is salted with
    seed: int = 0
    first_neuron: int = 0      # the first neuron's number in the layer (an expert's reducer holds a slice of it)
    # [n, 4, 3] float32 b1 < b2 < b3 of each (neuron, quadrant), from the calibration (rules.interval_bounds);
    # None: rules.DEFAULT_BOUNDS everywhere.
    bounds: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.sign.shape[0])

    @property
    def interval_bounds(self) -> np.ndarray:
        if self.bounds is not None:
            return np.ascontiguousarray(self.bounds, dtype=np.float32)
        return np.broadcast_to(np.array(rules.DEFAULT_BOUNDS, np.float32), (self.n, N_QUADRANTS, 3)).copy()

    @property
    def window(self) -> int:
        return self.before + self.after + 1


@dataclass(frozen=True)
class Batch:
    """The texts of one forward pass, right-padded to the longest."""

    lengths: np.ndarray        # [B] int64, BOS included
    text_ids: np.ndarray       # [B] int64
    lengths_t: torch.Tensor    # the same two on the model's device
    text_ids_t: torch.Tensor
    valid: torch.Tensor        # [B, T] bool on the device: False at BOS and padding

    @classmethod
    def of(cls, lengths: np.ndarray, text_ids: np.ndarray, device: torch.device) -> "Batch":
        lengths = lengths.astype(np.int64)
        text_ids = text_ids.astype(np.int64)
        lengths_t = torch.from_numpy(lengths).to(device)
        positions = torch.arange(int(lengths.max()), device=device)
        return cls(lengths, text_ids, lengths_t, torch.from_numpy(text_ids).to(device),
                   (positions >= 1) & (positions < lengths_t[:, None]))


@dataclass(frozen=True)
class Contribution:
    """What a unit's neurons add to the layer's output, router weight * hook_post (x_in in the weight convention),
    folded by the unit's reducer in its pass over the unit's tokens: per (neuron, quadrant) its min, max, sum and
    count over the counted tokens, into the unit's slices of its layer's running values (routing.RouterStats),
    updated in place."""

    weight: torch.Tensor       # float32 router weight per row of x_gate: [R] an expert's rows, or [B * T] per token
    value_min: torch.Tensor    # [n, 4] float32, inf where no token yet
    value_max: torch.Tensor    # [n, 4] float32, -inf where no token yet
    value_sum: torch.Tensor    # [n, 4] float64
    value_count: torch.Tensor  # [n, 4] int64


@dataclass
class ReducedLayer:
    """A reducer's totals for one layer, neuron-major, as magnitudes: finish_layer applies each list's sign.

    n = neurons, L = 16 lists (rules.list_index), k = examples per list, W = window slots.
    """

    counts: np.ndarray     # [n, 4] int64 tokens per quadrant
    near: np.ndarray       # [n, L] float32: the smallest |value| of the list; inf: none
    total: np.ndarray      # [n, L] float64: the sum of |value|
    top_mag: np.ndarray    # [n, L, k] float32 |value| of the examples, most extreme first
    top_text: np.ndarray   # [n, L, k] int32, -1: an empty slot
    top_pos: np.ndarray    # [n, L, k] int32
    win_gate: np.ndarray   # [n, L, k, W] float16 x_gate around each example, from its window's start
    win_in: np.ndarray     # [n, L, k, W] float16 x_in (after the weight convention)
    # Distributions; S = rules.SAMPLE_SLOTS per quadrant: the random list, then each interval's list.
    hist: np.ndarray       # [n, 4, 3, HIST_SLOTS] int64 by slot (rules.HIST_SLOTS), hooks as rules.HIST_HOOKS
    density: np.ndarray    # [n, 44, 44] int64 (x_gate bin, x_in bin)
    samp_hash: np.ndarray  # [n, 4, S] int64, sorted within each list, smallest first
    samp_text: np.ndarray  # [n, 4, S] int32, -1: an empty slot
    samp_pos: np.ndarray   # [n, 4, S] int32
    samp_gate: np.ndarray  # [n, 4, S] float32 the token's x_gate, x_in (after the convention) and act
    samp_in: np.ndarray
    samp_act: np.ndarray
    samp_win_gate: np.ndarray  # [n, 4, S, W] float16
    samp_win_in: np.ndarray


class LayerReducer(Protocol):
    """One layer's running statistics; built from a LayerSetup."""

    def update(self, x_gate: torch.Tensor, x_in: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None,
               contribution: Contribution | None = None) -> None:
        """Fold one batch: x_gate and x_in [B, T, n] as the hooks give them (x_in before the weight convention).

        An expert's reducer is handed only its tokens: x_gate and x_in [R, n] and `rows` [B * T], the row of
        each token of the batch (-1: routed to other experts), which no statistic counts. With `contribution`
        (an MoE layer's unit) it also folds the router-weighted hook_post of the same tokens."""

    def finish(self) -> LayerStatistics:
        """The layer's statistics, via finish_layer."""

    def state(self) -> dict[str, np.ndarray | torch.Tensor]:
        """The running state, by the names the reducer declares (a checkpoint saves this)."""

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from a state() saved earlier by a reducer of the same kind and setup."""


def checked_state(state: Mapping[str, np.ndarray], name: str, like: np.ndarray | torch.Tensor) -> np.ndarray:
    """state[name] as an array of `like`'s shape and dtype; ValueError naming the field otherwise."""
    if name not in state:
        raise ValueError(f"the saved state lacks {name}")
    value = np.asarray(state[name])
    dtype = torch.empty(0, dtype=like.dtype).numpy().dtype if isinstance(like, torch.Tensor) else like.dtype
    if value.shape != tuple(like.shape) or value.dtype != dtype:
        raise ValueError(f"the saved {name} is {value.dtype}{list(value.shape)}, "
                         f"this reducer's is {dtype}{list(like.shape)}")
    return value


def finish_layer(r: ReducedLayer, setup: LayerSetup) -> LayerStatistics:
    """Signs, empty quadrants (NaN), means and window bounds, the same for every reducer.

    A list's extreme end is its first example; its near-zero end is `near`.
    A list whose tokens all had the value 0 has no example: both ends are that 0.
    """
    n = r.counts.shape[0]
    signs = LIST_SIGNS_NP
    has = r.top_text >= 0
    has_near = np.isfinite(r.near)
    near = np.where(has_near, r.near, np.inf) * signs
    extreme = np.where(has[:, :, 0], r.top_mag[:, :, 0], np.where(has_near, r.near, -np.inf)) * signs
    per_list_count = np.repeat(r.counts, N_HOOKS, axis=1)
    empty = per_list_count == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = r.total * signs / per_list_count

    def qhn(a: np.ndarray) -> np.ndarray:  # [n, L, ...] -> [4, 4, n, ...], a view
        return np.moveaxis(a.reshape(n, N_QUADRANTS, N_HOOKS, *a.shape[2:]), 0, 2)

    def stat(a: np.ndarray, dtype) -> np.ndarray:
        return qhn(np.where(empty, np.nan, a).astype(dtype))

    lengths = setup.text_lengths[np.where(has, r.top_text, 0)]
    start, stop = window_bounds(r.top_pos.astype(np.int64), lengths, setup.before, setup.after)
    s_has = r.samp_text >= 0
    s_start, s_stop = window_bounds(r.samp_pos.astype(np.int64), setup.text_lengths[np.where(s_has, r.samp_text, 0)],
                                    setup.before, setup.after)
    # astype keeps the memory order (order="K"), so the writer's neuron-major
    # view of neuron-major arrays needs no copy.
    return LayerStatistics(
        counts=np.ascontiguousarray(r.counts.T),
        value_min=stat(np.where(signs > 0, near, extreme), np.float32),
        value_max=stat(np.where(signs > 0, extreme, near), np.float32),
        value_mean=stat(mean, np.float64),
        example_value=qhn((np.where(has, r.top_mag, 0) * signs[None, :, None]).astype(np.float32)),
        example_text=qhn(r.top_text),
        example_pos=qhn(r.top_pos.astype(np.int16)),
        window_start=qhn(np.where(has, start, 0).astype(np.int16)),
        window_len=qhn(np.where(has, stop - start, 0).astype(np.int16)),
        window_gate=qhn(r.win_gate),
        window_in=qhn(r.win_in),
        histograms=histogram_bins_of_slots(r.hist),
        density=r.density,
        bounds=setup.interval_bounds,
        sample_hash=np.where(s_has, r.samp_hash, -1),
        sample_text=np.where(s_has, r.samp_text, -1).astype(np.int32),
        sample_pos=np.where(s_has, r.samp_pos, 0).astype(np.int16),
        sample_gate=np.where(s_has, r.samp_gate, 0).astype(np.float32),
        sample_in=np.where(s_has, r.samp_in, 0).astype(np.float32),
        sample_act=np.where(s_has, r.samp_act, 0).astype(np.float32),
        sample_window_start=np.where(s_has, s_start, 0).astype(np.int16),
        sample_window_len=np.where(s_has, s_stop - s_start, 0).astype(np.int16),
        sample_window_gate=r.samp_win_gate,
        sample_window_in=r.samp_win_in,
    )


def histogram_bins_of_slots(hist: np.ndarray) -> np.ndarray:
    """[n, 4, 3, HIST_SLOTS] counts by slot -> [n, 4, 3, VALUE_BINS] by signed bin (bin = 58 + sign * slot)."""
    mid = rules.VALUE_MAG_BINS
    out = np.zeros((*hist.shape[:3], rules.VALUE_BINS), np.int64)
    for q in range(N_QUADRANTS):
        for h, hook in enumerate(rules.HIST_HOOKS):
            if rules.LIST_SIGNS[rules.list_index(q, hook)] > 0:
                out[:, q, h, mid:] = hist[:, q, h, :mid]  # slot 58 is never reached: v >= 0 has bin >= 58
            else:
                out[:, q, h, :mid + 1] = hist[:, q, h, ::-1]
    return out


REDUCERS = ("auto", "kernel", "torch")


def choose_reducer(device: torch.device, reducer: str) -> str:
    """"kernel" (the compiled C++ pass, CPU only) or "torch" (tensor_reducer.py's tensor code, any device)."""
    if reducer not in REDUCERS:
        raise UserError(f"--reducer {reducer!r} is not one of {', '.join(REDUCERS)}")
    if reducer == "torch" or device.type != "cpu":
        if reducer == "kernel":
            raise UserError(f"--reducer kernel runs on the CPU only, not on {device}")
        return "torch"
    from gluscope.recorder.kernel_reducer import KernelUnavailable, kernel_available, load_kernel
    if reducer == "kernel":
        try:
            load_kernel()
        except (KernelUnavailable, OSError) as e:
            raise UserError(f"--reducer kernel: the CPU kernel cannot be built here ({e})") from None
        return "kernel"
    return "kernel" if kernel_available() else "torch"


def make_reducers(kind: str, setups: list[LayerSetup], compiled: bool = False) -> list[LayerReducer]:
    """One reducer per layer: kind "kernel" or "torch" (compiled with torch.compile if `compiled`)."""
    if kind == "kernel":
        from gluscope.recorder.kernel_reducer import ActBuffer, KernelReducer
        buffer = ActBuffer()  # one for all layers: a fresh [B, T, n] tensor per layer costs page faults
        return [KernelReducer(setup, buffer) for setup in setups]
    from gluscope.recorder.tensor_reducer import TensorReducer
    return [TensorReducer(setup, compiled) for setup in setups]
