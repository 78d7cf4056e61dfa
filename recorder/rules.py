"""The rules every reducer follows, defined once: the 16 lists and their signs, how ties break, how keys pack,
where windows fall.

tensor_reducer.py's tensor code calls these functions; the C++ kernel gets the same
constants through the header `c_header()` writes (kernel_reducer.py puts it in
front of the kernel's source), so the two reducers cannot drift apart
silently. tests/test_reducers.py checks that they agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from gluscope.schema import HISTOGRAM_HOOKS, HOOKS, QUADRANT_SIGNS, QUADRANTS

N_QUADRANTS = len(QUADRANTS)
N_HOOKS = len(HOOKS)
N_LISTS = N_QUADRANTS * N_HOOKS

# Hook codes of schema.sql. `act` is act_fn(x_gate): no hook of its own, but a list like the others.
POST, X_IN, X_GATE, ACT = (HOOKS.index(name) for name in ("hook_post", "hook_pre_linear", "hook_pre", "act"))

# QUADRANT_SIGNS: quadrant code -> (sign of x_gate, sign of x_in). Signs are strict: a token with x_gate == 0
# or x_in == 0 is in no quadrant.


def list_index(quadrant: int, hook: int) -> int:
    """A list is one (quadrant, hook) pair."""
    return quadrant * N_HOOKS + hook


def _hook_sign(hook: int, gate_sign: int, in_sign: int) -> int:
    # act(x) has the sign of x for swish and GELU, so act follows x_gate.
    return {POST: gate_sign * in_sign, X_IN: in_sign, X_GATE: gate_sign, ACT: gate_sign}[hook]


# The sign every value of a list has. Reducers rank and store |value|; the sign is applied when a layer is finished.
LIST_SIGNS: tuple[int, ...] = tuple(
    _hook_sign(h, *QUADRANT_SIGNS[q]) for q in range(N_QUADRANTS) for h in range(N_HOOKS))
LIST_SIGNS_NP = np.array(LIST_SIGNS, dtype=np.float32)

# Ranking. Within a text, a list's candidate is its token of largest |value|,
# ties to the lower position; across texts, a list keeps the k candidates of
# largest |value|, ties to the lower text id. Both comparisons are one integer
# comparison of a key: |value|'s float32 bits (monotonic for non-negative
# floats) above KEY_SHIFT, and below it a tie-breaker that is larger for the
# one that wins. An empty slot's key is -1.
KEY_SHIFT = 32
TIE_MASK = 0xFFFFFFFF


def magnitude_key(magnitude: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """int64 keys from float32 magnitudes (>= 0) and tie-breakers (0 .. TIE_MASK)."""
    return (magnitude.view(torch.int32).to(torch.int64) << KEY_SHIFT) | tie


def key_magnitude(key: torch.Tensor) -> torch.Tensor:
    return (key >> KEY_SHIFT).to(torch.int32).view(torch.float32)


def position_tie(position: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The lower position wins."""
    return (seq_len - 1) - position


def tie_position(key: torch.Tensor, seq_len: int) -> torch.Tensor:
    return (seq_len - 1) - (key & TIE_MASK)


def text_tie(text_ids: torch.Tensor) -> torch.Tensor:
    """The lower text id wins."""
    return TIE_MASK - text_ids.to(torch.int64)


def window_bounds(position, length, before: int, after: int):
    """[start, stop) of the window around `position` in a text of `length` tokens: `before` tokens before it and
    `after` after it, clipped to the text. Takes NumPy arrays or tensors."""
    return (position - before).clip(min=0), (position + after + 1).clip(max=length)


# ---- Distributions: histograms, density, sampled examples, intervals. ----

# Histogram bins of schema.sql's `histogram_bins`, read off a float32's bits u (sign bit clear). 'value': two per
# octave, edges 2^e and 1.5 * 2^e: (u >> 22) is 2 * exponent + the top mantissa bit, so magnitude bin
# clamp((u >> 22) - VALUE_SHIFT, 0, VALUE_MAG_BINS - 1) holds [0, 2^-16), [2^-16, 1.5 * 2^-16), ... [2^12, inf).
# 'density': one per two octaves, edges 2^-12, 2^-10, ... 2^8: clamp(((u >> 23) - DENSITY_SHIFT) >> 1, 0,
# DENSITY_MAG_BINS - 1) holds [0, 2^-12), [2^-12, 2^-10), ... [2^8, inf). Two octaves, not one: a neuron's values
# span many octaves on each axis, so per-octave cells were a large share of a 7B-shaped file (see
# docs/performance.md); the 1-D histograms keep two bins per octave for the detail.
# A signed bin (the stored `bin`, increasing in v): v >= 0 (also -0.0) is MAG_BINS + magbin(bits(v)); v < 0 is
# MAG_BINS - 1 - magbin(bits(-v) - 1), the predecessor float, so that bin i holds lo <= v < hi for negative v too.
VALUE_LOW_EXP, VALUE_HIGH_EXP = -16, 12
DENSITY_LOW_EXP, DENSITY_HIGH_EXP = -12, 8
VALUE_MAG_BINS = 2 * (VALUE_HIGH_EXP - VALUE_LOW_EXP) + 2      # 58
DENSITY_OCTAVES_PER_BIN = 2
DENSITY_MAG_BINS = (DENSITY_HIGH_EXP - DENSITY_LOW_EXP) // DENSITY_OCTAVES_PER_BIN + 2   # 12
VALUE_SHIFT = 2 * (127 + VALUE_LOW_EXP) - 1                    # 221
DENSITY_SHIFT = (127 + DENSITY_LOW_EXP) - DENSITY_OCTAVES_PER_BIN  # 113
DENSITY_GROUP_SHIFT = DENSITY_OCTAVES_PER_BIN.bit_length() - 1  # log2: the kernel's shift
VALUE_BINS, DENSITY_BINS = 2 * VALUE_MAG_BINS, 2 * DENSITY_MAG_BINS
# Hooks with a histogram, in schema.HISTOGRAM_HOOKS order (the codes of `hooks`).
HIST_HOOKS: tuple[int, ...] = tuple(HOOKS.index(name) for name in HISTOGRAM_HOOKS)
N_HIST_HOOKS = len(HIST_HOOKS)
# Within a (quadrant, hook) every value has the list's sign s (hook_post may also be +-0), so a reducer keeps
# HIST_SLOTS counts: slot = s * (bin - VALUE_MAG_BINS), 0 .. 58 (a negative list's slot 0 is the value 0).
HIST_SLOTS = VALUE_MAG_BINS + 1


def value_magnitude_edges() -> np.ndarray:
    """The VALUE_MAG_BINS - 1 inner edges of the magnitude bins: 2^-16, 1.5 * 2^-16, 2^-15, ... 2^12."""
    m = np.arange(VALUE_MAG_BINS - 1)
    return np.ldexp(np.where(m % 2 == 1, 1.5, 1.0), VALUE_LOW_EXP + m // 2)


def density_magnitude_edges() -> np.ndarray:
    return np.ldexp(1.0, np.arange(DENSITY_LOW_EXP, DENSITY_HIGH_EXP + 1, DENSITY_OCTAVES_PER_BIN))


def signed_bin_edges(magnitude_edges: np.ndarray) -> list[tuple[float | None, float | None]]:
    """(lo, hi) of each signed bin, lo <= v < hi, None for an open end: the rows of `histogram_bins`."""
    e = [None, *(-magnitude_edges[::-1]).tolist(), 0.0, *magnitude_edges.tolist(), None]
    return list(zip(e[:-1], e[1:]))


def _bits(v: torch.Tensor) -> torch.Tensor:
    """float32 -> its bits as int64, sign bit cleared (|v|, and -0.0 -> 0)."""
    return v.view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def _signed_bin(v: torch.Tensor, shift: int, octave_shift: int, mag_bins: int, group_shift: int = 0) -> torch.Tensor:
    u = _bits(v)
    pred = (u - 1).clamp(min=0)  # only used where v < 0, where u >= 1
    mag = (((u >> octave_shift) - shift) >> group_shift).clamp(0, mag_bins - 1)
    mag_pred = (((pred >> octave_shift) - shift) >> group_shift).clamp(0, mag_bins - 1)
    return torch.where(v >= 0, mag_bins + mag, mag_bins - 1 - mag_pred)


def value_bin(v: torch.Tensor) -> torch.Tensor:
    """Signed 'value' bin (0 .. 115) of float32 values, as int64."""
    return _signed_bin(v, VALUE_SHIFT, 22, VALUE_MAG_BINS)


def density_bin(v: torch.Tensor) -> torch.Tensor:
    """Signed 'density' bin (0 .. 23) of float32 values, as int64."""
    return _signed_bin(v, DENSITY_SHIFT, 23, DENSITY_MAG_BINS, DENSITY_GROUP_SHIFT)


def value_magnitude_bin(m: torch.Tensor) -> torch.Tensor:
    """Magnitude 'value' bin (0 .. 57) of float32 magnitudes m >= 0: what the calibration counts."""
    return ((_bits(m) >> 22) - VALUE_SHIFT).clamp(0, VALUE_MAG_BINS - 1)


# Sampled examples. Every (layer, neuron, text_id, position) has a 31-bit hash:
#   token_hash = fmix32(fmix32(seed ^ text_id) ^ position)      (per token, shared by all neurons)
#   salt       = fmix32(fmix32(seed ^ layer) ^ neuron)          (per neuron)
#   hash       = (((token_hash ^ salt) * GOLDEN) mod 2^32) >> 1
# fmix32 is MurmurHash3's 32-bit finalizer; seed, text_id, layer and neuron enter as their low 32 bits. The
# per-token cost is one xor, one multiply and one shift. A list keeps the tokens of smallest hash: per text its
# token of smallest hash (ties: the lower position), across texts the smallest (ties: the lower text_id).
GOLDEN = 0x9E3779B1
FMIX_C1, FMIX_C2 = 0x85EBCA6B, 0xC2B2AE35
MASK32 = 0xFFFFFFFF
N_RANDOM = 8          # random examples per (neuron, quadrant)
N_INTERVALS = 4       # intervals of |hook_post| per (neuron, quadrant)
N_PER_INTERVAL = 4    # examples per interval
# Sample slots of one quadrant: the random list, then the interval lists, each ranked from smallest hash.
SAMPLE_SLOTS = N_RANDOM + N_INTERVALS * N_PER_INTERVAL
HASH_EMPTY = 0x7FFFFFFF + 1  # above every 31-bit hash
# A sampled example's stored window is shorter than a top example's (at most this many tokens before and after
# it, within window_before and window_after): the 96 samples per neuron would otherwise grow a 7B-shaped file
# by gigabytes (see docs/performance.md).
SAMPLE_WINDOW_BEFORE, SAMPLE_WINDOW_AFTER = 8, 2


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for int64 tensors h in [0, 2^32): in two halves, so no int64 product overflows."""
    return ((h & 0xFFFF) * c + (((h >> 16) * c) & 0xFFFF) * 65536) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def token_hash(seed: int, text_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, T] int64 from text_ids [B] and positions [T]."""
    t = fmix32((text_ids.to(torch.int64) & MASK32) ^ (seed & MASK32))
    return fmix32(t.unsqueeze(1) ^ positions.to(torch.int64).unsqueeze(0))


def neuron_salt(seed: int, layer: int, n: int, device=None, first: int = 0) -> torch.Tensor:
    """[n] int64: the salts of neurons first .. first + n - 1 of the layer."""
    s = fmix32(torch.tensor((seed ^ layer) & MASK32, dtype=torch.int64, device=device))
    return fmix32(s ^ torch.arange(first, first + n, dtype=torch.int64, device=device))


def sample_hash(token_hash_: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """[..., n] 31-bit hashes (int64) from token hashes [...] and neuron salts [n]."""
    return _mul32(token_hash_.unsqueeze(-1) ^ salt, GOLDEN) >> 1


def hash_of(seed: int, layer: torch.Tensor, neuron: torch.Tensor, text_id: torch.Tensor,
            position: torch.Tensor) -> torch.Tensor:
    """The same 31-bit hashes, one per row of equal-shaped int64 tensors: what merge ranks samples by
    (`samples` stores no hash; this recomputes it)."""
    token = fmix32(fmix32((text_id & MASK32) ^ (seed & MASK32)) ^ position)
    salt = fmix32(fmix32(((layer & MASK32) ^ (seed & MASK32))) ^ neuron)
    return _mul32(token ^ salt, GOLDEN) >> 1


# Intervals of |hook_post| per (neuron, quadrant): [0, b1), [b1, b2), [b2, b3), [b3, inf). The calibration
# histograms |hook_post| of the run's first CALIBRATION_BATCHES batches per (neuron, quadrant) on the 'value'
# magnitude bins; b_i is the smallest inner edge E (value_magnitude_edges) with (count of tokens with |post| < E)
# >= CALIBRATION_PERCENTS[i] % of the quadrant's calibration tokens, then made strictly increasing (b2 at least the
# edge after b1, b3 after b2; pushed down from the top edge if they run out). A quadrant without calibration tokens
# uses the neuron's histogram over all quadrants; a neuron without any uses DEFAULT_BOUNDS.
CALIBRATION_BATCHES = 4
CALIBRATION_PERCENTS = (50, 90, 99)
DEFAULT_BOUNDS = (2.0 ** -4, 2.0 ** -2, 1.0)


def interval_bounds(hist: np.ndarray) -> np.ndarray:
    """[n, 4, 3] float32 bounds b1 < b2 < b3 from calibration counts [n, 4, VALUE_MAG_BINS] of |hook_post|."""
    hist = np.asarray(hist, dtype=np.int64)
    n = hist.shape[0]
    total = hist.sum(-1)                                          # [n, 4]
    whole = hist.sum(1, keepdims=True)                            # [n, 1, bins]
    use = np.where((total > 0)[..., None], hist, whole)
    use_total = use.sum(-1)                                       # [n, 4]
    below = np.cumsum(use, -1)[..., :-1]                          # tokens < edge m+1, m = 0 .. 56: [n, 4, 57]
    top = VALUE_MAG_BINS - 2                                      # index of the last inner edge
    index = np.empty((n, N_QUADRANTS, 3), np.int64)
    for i, percent in enumerate(CALIBRATION_PERCENTS):
        reached = below * 100 >= percent * use_total[..., None]
        first = np.where(reached.any(-1), reached.argmax(-1), top)
        index[..., i] = first if i == 0 else np.maximum(first, index[..., i - 1] + 1)
    for i in (2, 1, 0):
        index[..., i] = np.minimum(index[..., i], top - (2 - i))
    none = (use_total == 0)[..., None]
    edges = value_magnitude_edges()
    index = np.where(none, np.searchsorted(edges, DEFAULT_BOUNDS), index)
    return edges[index].astype(np.float32)


def c_header() -> str:
    """These rules as C++ constants, for the kernel."""
    gate, in_ = zip(*QUADRANT_SIGNS)
    hooks = {"POST": POST, "X_IN": X_IN, "X_GATE": X_GATE, "ACT": ACT}
    lines = [
        "// Generated by recorder/rules.py (c_header): edit the Python, not this.",
        f"constexpr int N_QUADRANTS = {N_QUADRANTS};",
        f"constexpr int N_HOOKS = {N_HOOKS};",
        f"constexpr int N_LISTS = {N_LISTS};",
        *(f"constexpr int HOOK_{name} = {code};" for name, code in hooks.items()),
        f"constexpr int QUADRANT_GATE_SIGN[N_QUADRANTS] = {{{', '.join(map(str, gate))}}};",
        f"constexpr int QUADRANT_IN_SIGN[N_QUADRANTS] = {{{', '.join(map(str, in_))}}};",
        f"constexpr int KEY_SHIFT = {KEY_SHIFT};",
        f"constexpr int64_t TIE_MASK = {TIE_MASK:#x};",
        f"constexpr int VALUE_MAG_BINS = {VALUE_MAG_BINS};",
        f"constexpr int VALUE_SHIFT = {VALUE_SHIFT};",
        f"constexpr int DENSITY_MAG_BINS = {DENSITY_MAG_BINS};",
        f"constexpr int DENSITY_SHIFT = {DENSITY_SHIFT};",
        f"constexpr int DENSITY_GROUP_SHIFT = {DENSITY_GROUP_SHIFT};",
        f"constexpr int N_HIST_HOOKS = {N_HIST_HOOKS};",
        f"constexpr int HIST_HOOK[N_HIST_HOOKS] = {{{', '.join(map(str, HIST_HOOKS))}}};",
        f"constexpr int HIST_SLOTS = {HIST_SLOTS};",
        f"constexpr int LIST_SIGN[N_LISTS] = {{{', '.join(map(str, LIST_SIGNS))}}};",
        f"constexpr uint32_t GOLDEN = {GOLDEN:#x}u;",
        f"constexpr uint32_t FMIX_C1 = {FMIX_C1:#x}u;",
        f"constexpr uint32_t FMIX_C2 = {FMIX_C2:#x}u;",
        f"constexpr int N_RANDOM = {N_RANDOM};",
        f"constexpr int N_INTERVALS = {N_INTERVALS};",
        f"constexpr int N_PER_INTERVAL = {N_PER_INTERVAL};",
        f"constexpr int SAMPLE_SLOTS = {SAMPLE_SLOTS};",
        f"constexpr uint32_t HASH_EMPTY = {HASH_EMPTY:#x}u;",
    ]
    return "\n".join(lines) + "\n"
