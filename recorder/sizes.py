"""How large a recording's database will be, known before anything is recorded, and whether its disk can hold it.

The estimate adds up schema.sql's tables from what decides their rows: per
neuron its example lists, samples and their windows (which depend on k, the
window and how many texts the neuron sees) and the rows every neuron has;
per token of the corpus its texts; per vocabulary entry token_neurons; and
for a mixture-of-experts layer the router's tables. The bytes each row takes
on disk are measured constants (BYTES below). It needs the model's shape, not
its weights: `gluscope record` reads a model folder's config.json
(shape_from_config) and checks before it loads the model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gluscope.errors import UserError
from gluscope.recorder import rules

# Bytes per row on disk, table by table, with DuckDB's compression and 64 KiB blocks (writer.BLOCK_SIZE), measured by
#   python benchmarks/fit_sizes.py /work/demo/demo.duckdb TINY... SYN...
# over the demo's recording (30 x 1,536 neurons, 15,877 tokens), three of the tests' tiny recordings, and
# benchmarks/make_synthetic_db.py's files of 4 and 8 layers of the OLMo-7B shape and 2 and 4 layers of the OLMoE
# shape, 20M tokens each (commands and output: benchmarks/results/moe-size-2026-12-06.txt). Each is the mean over
# the files in which the table fills at least 8 blocks; expert_examples, experts and layers, a few rows per expert
# or layer, are rounded up guesses. The ratios are of the real recordings only, counted over them together: how a
# neuron's lists overlap is the activations', and make_synthetic_db's candidates overlap more.
BYTES = {
    "neurons": 32.5,
    "weight_tokens": 6.8,         # 60 rows per neuron: 10 tokens for each of 6 kinds
    "value_stats": 16.2,          # 16 rows per neuron
    "intervals": 8.6,             # 16 rows per neuron
    "histograms_neuron": 762.0,   # per neuron: up to 12 lists of counts
    "density_neuron": 776.0,      # per neuron: 10 to 30 rows of counts, more for more tokens
    "related": 6.6,               # 64 rows per neuron, 32 in the first and the last layer
    "examples": 7.7,
    "samples": 15.2,
    "window_row": 5.6,            # a window row's key columns; each window token adds 4 (x_gate, x_in float16),
    "window_nan_token": 2.2,      # or this where an expert neuron's window holds NaN (a token routed elsewhere)
    "example_tokens": 2.6,
    "token_neurons": 6.7,         # 6 kinds x 32 rows per vocabulary entry
    "vocab": 12.0,
    "text_token": 2.1,            # token_ids, per token of the corpus (BOS included)
    "expert_tokens": 8.7,
    "routed_values": 17.2,        # 4 rows per neuron of a mixture-of-experts layer
    "expert_examples": 16.0,
    "experts": 64.0,
    "layers": 32.0,
}
# Of the top examples, the share of distinct (neuron, text, position) that get a window; of the samples, the share
# that get one of their own (not already a top example's); rows of example_tokens per example or sample.
DISTINCT_TOP = 0.73
DISTINCT_SAMPLE = 0.56
EXAMPLE_TOKENS_PER_ENTRY = 1.67
# The file beyond its tables' blocks: DuckDB's headers and metadata, and blocks freed by its checkpoints.
FILE_OVERHEAD = 0.05
BLOCK = 65536
# The writer checkpoints its write-ahead log every 1 GB (writer.DatabaseWriter); until then the log sits beside
# the temporary file.
WAL_BYTES = 1 << 30
TOKEN_NEURONS_TOP = 32  # neurons per token and kind (token_tops.py)
WEIGHT_TOKENS_TOP = 10
# The 'value' shares of a quadrant's tokens in the intervals of |hook_post| (rules.CALIBRATION_PERCENTS).
INTERVAL_SHARES = np.diff([0, *rules.CALIBRATION_PERCENTS, 100]) / 100


@dataclass(frozen=True)
class LayerShape:
    neurons: int             # every neuron of the layer: routed experts' and shared ones' together
    experts: int = 0         # routed experts; 0: a dense MLP
    expert_neurons: int = 0  # neurons per routed expert
    top_k: int = 0           # experts each token is routed to


@dataclass(frozen=True)
class ModelShape:
    layers: tuple[LayerShape, ...]
    vocab_size: int

    @property
    def neurons(self) -> int:
        return sum(layer.neurons for layer in self.layers)

    def describe(self) -> str:
        """'16 layers × 65,536 neurons', or where widths differ '61 layers: 3 × 18,432, 58 × 526,336 neurons'."""
        runs: list[list[int]] = []
        for layer in self.layers:
            if runs and runs[-1][1] == layer.neurons:
                runs[-1][0] += 1
            else:
                runs.append([1, layer.neurons])
        if len(runs) == 1:
            return f"{len(self.layers)} layers × {runs[0][1]:,} neurons"
        return f"{len(self.layers)} layers: " + ", ".join(f"{n} × {w:,}" for n, w in runs) + " neurons"


def shape_from_config(config: dict) -> ModelShape:
    """The layers of a Hugging Face config.json: dense, or mixture-of-experts as OLMoE, Mixtral, Qwen2/3-MoE and
    DeepSeek-V3 declare them (routed experts, their width, shared experts, dense layers among them)."""
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    n_layers = int(config["num_hidden_layers"])
    dense = int(config.get("intermediate_size") or 0)
    experts = next((int(config[key]) for key in ("num_experts", "num_local_experts", "n_routed_experts",
                                                 "moe_num_experts")
                    if isinstance(config.get(key), int) and config[key] > 1), 0)
    layers = []
    for i in range(n_layers):
        if not experts or not _is_moe_layer(config, i):
            layers.append(LayerShape(dense))
            continue
        width = int(config.get("moe_intermediate_size") or dense)
        shared = (int(config.get("shared_expert_intermediate_size") or 0)      # Qwen2-MoE
                  or int(config.get("n_shared_experts") or 0) * width)         # DeepSeek-V3
        layers.append(LayerShape(experts * width + shared, experts, width, int(config.get("num_experts_per_tok") or 1)))
    return ModelShape(tuple(layers), int(config.get("vocab_size") or 0))


def _is_moe_layer(config: dict, i: int) -> bool:
    if i < int(config.get("first_k_dense_replace") or 0):  # DeepSeek-V2/V3: dense first layers
        return False
    if i % int(config.get("moe_layer_freq") or 1):
        return False
    if i in (config.get("mlp_only_layers") or ()):          # Qwen2/3-MoE
        return False
    return (i + 1) % int(config.get("decoder_sparse_step") or 1) == 0


def shape_from_folder(folder: Path) -> ModelShape | None:
    """shape_from_config of a model folder's config.json; None where it says too little (no layers, no width)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        shape = shape_from_config(config)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return shape if shape.vocab_size and all(layer.neurons for layer in shape.layers) else None


def shape_from_model(model) -> ModelShape:
    """The shape of a loaded recorder.model.GatedModel (a hub name or a GGUF file, whose config is not at hand)."""
    layouts = getattr(model, "layouts", None) or [None] * model.n_layers
    layers = []
    for i, layout in enumerate(layouts):
        if layout is not None and layout.n_experts:
            layers.append(LayerShape(layout.n_neurons, layout.n_experts, layout.routed[0].n_neurons, layout.top_k))
        else:
            layers.append(LayerShape(layout.n_neurons if layout is not None else model.d_mlp))
    return ModelShape(tuple(layers), model.token_count())


# ---- rows ---------------------------------------------------------------------------------------------------

def _texts_with(counted: np.ndarray, p: float) -> float:
    """Expected texts holding at least one of their counted tokens in a set that takes each token with chance p."""
    return float(np.sum(-np.expm1(counted * np.log1p(-min(p, 1 - 1e-12)))))


def _window_tokens(counted: np.ndarray, before: int, after: int) -> float:
    """Mean window length over every counted token: min(p, before) + min(L-1-p, after) + 1 at position p."""
    m = counted.astype(np.float64)  # positions 1 .. m
    left = np.where(m <= before, m * (m + 1) / 2, before * (before + 1) / 2 + (m - before) * before)
    j = m - 1  # tokens after position p: 0 .. m-1
    right = np.where(j <= after, j * (j + 1) / 2, after * (after + 1) / 2 + (j - after) * after)
    total = m.sum()
    return float((left.sum() + right.sum() + total) / total) if total else 0.0


def _neuron_bytes(counted: np.ndarray, share: float, k: int, top_len: float, sample_len: float) -> dict[str, float]:
    """Bytes of one neuron's rows that depend on what it sees: a share of the counted tokens (1 dense, top_k / experts
    for a routed expert's), spread over the four quadrants alike."""
    quadrant_texts = _texts_with(counted, share / 4)
    top = rules.N_LISTS * min(k, quadrant_texts)
    samples = rules.N_QUADRANTS * (min(rules.N_RANDOM, quadrant_texts) + sum(
        min(rules.N_PER_INTERVAL, _texts_with(counted, share / 4 * s)) for s in INTERVAL_SHARES))
    return {
        "examples": top * BYTES["examples"],
        "samples": samples * BYTES["samples"],
        "windows": (top * DISTINCT_TOP * _window_bytes(top_len, share)
                    + samples * DISTINCT_SAMPLE * _window_bytes(sample_len, share)),
        "example_tokens": (top + samples) * EXAMPLE_TOKENS_PER_ENTRY * BYTES["example_tokens"],
    }


def _window_bytes(length: float, share: float) -> float:
    """A window row of `length` tokens: its own token is the neuron's, each other one with chance `share`, and the
    rest hold NaN."""
    own = min(length, 1 + (length - 1) * share)
    return BYTES["window_row"] + 4 * own + BYTES["window_nan_token"] * (length - own)


@dataclass
class Estimate:
    tables: dict[str, float]   # bytes per table, before rounding to blocks
    total: int                 # the file: tables rounded to blocks, headers and DuckDB's overhead


def estimate(shape: ModelShape, lengths: np.ndarray, *, k: int = 16, window_before: int = 24, window_after: int = 2,
             distinct_tokens: int | None = None) -> Estimate:
    """The database's size in bytes for this shape, these texts (their lengths, BOS included) and options.

    distinct_tokens: how many vocabulary entries the corpus holds (default: as many as it can), for expert_tokens,
    whose rows are at most layers x routed experts x distinct tokens; the estimate takes that bound.
    """
    lengths = np.asarray(lengths, np.int64)
    counted = np.maximum(lengths - 1, 0)
    n_tokens = int(counted.sum())
    top_len = _window_tokens(counted, window_before, window_after)
    sample_len = _window_tokens(counted, min(window_before, rules.SAMPLE_WINDOW_BEFORE),
                                min(window_after, rules.SAMPLE_WINDOW_AFTER))
    tables: dict[str, float] = {}

    def add(table: str, size: float) -> None:
        tables[table] = tables.get(table, 0.0) + size

    per_share: dict[float, dict[str, float]] = {}
    n_layers = len(shape.layers)
    for layer in shape.layers:
        routed = layer.experts * layer.expert_neurons
        for neurons, share in ((layer.neurons - routed, 1.0), (routed, layer.top_k / max(layer.experts, 1))):
            if not neurons:
                continue
            if share not in per_share:
                per_share[share] = _neuron_bytes(counted, share, k, top_len, sample_len)
            for table, size in per_share[share].items():
                add(table, neurons * size)
        n = layer.neurons
        add("neurons", n * BYTES["neurons"])
        add("weight_tokens", n * 6 * WEIGHT_TOKENS_TOP * BYTES["weight_tokens"])
        add("value_stats", n * rules.N_LISTS * BYTES["value_stats"])
        add("intervals", n * rules.N_QUADRANTS * rules.N_INTERVALS * BYTES["intervals"])
        add("histograms", n * BYTES["histograms_neuron"])
        add("density", n * BYTES["density_neuron"])
        add("related", n * 64 * (n_layers - 1) / n_layers * BYTES["related"] if n_layers > 1 else 0.0)
        if layer.experts:
            add("routed_values", n * rules.N_QUADRANTS * BYTES["routed_values"])
            add("experts", (layer.experts + 1) * BYTES["experts"])
            add("expert_examples", layer.experts * k * BYTES["expert_examples"])
            tokens = min(shape.vocab_size, n_tokens) if distinct_tokens is None else distinct_tokens
            add("expert_tokens", layer.experts * tokens * BYTES["expert_tokens"])
    add("texts", int(lengths.sum()) * BYTES["text_token"])
    add("vocab", shape.vocab_size * BYTES["vocab"])
    add("token_neurons", shape.vocab_size * 6 * min(TOKEN_NEURONS_TOP, shape.neurons) * BYTES["token_neurons"])
    add("layers", n_layers * BYTES["layers"])
    # Every table with a row takes whole blocks; the code tables (quadrants, hooks, weight_kinds, histogram_bins)
    # and metadata one each.
    blocks = sum(-(-size // BLOCK) for size in tables.values() if size > 0) + 5
    return Estimate(tables, int(blocks * BLOCK * (1 + FILE_OVERHEAD)))


def checkpoint_bytes(shape: ModelShape, *, k: int = 16, window_before: int = 24, window_after: int = 2) -> int:
    """A checkpoint of the running state (checkpoint.py): every neuron's reducer arrays as kernel_reducer.STATE
    declares them, and each mixture-of-experts layer's counts and weight sums per (expert, token), int64 and float64
    (routing.RouterStats)."""
    import ctypes
    import math

    from gluscope.recorder.kernel_reducer import STATE

    # One neuron's dimensions, as KernelReducer sizes them.
    dims = {"n": 1, "Q": rules.N_QUADRANTS, "L": rules.N_LISTS, "k": k, "W": window_before + window_after + 1,
            "H": rules.N_HIST_HOOKS, "S": rules.HIST_SLOTS, "D": rules.DENSITY_BINS, "R": rules.SAMPLE_SLOTS}
    per_neuron = sum(ctypes.sizeof(ctype) * math.prod(dims[d] for d in names.split()) for _, ctype, names, _ in STATE)
    router = sum(layer.experts * shape.vocab_size * 16 for layer in shape.layers)
    return shape.neurons * per_neuron + router


# ---- the check ----------------------------------------------------------------------------------------------

def free_bytes(folder: Path) -> int:
    """Free space for an unprivileged writer in `folder`, or, before output_lock creates it, in its nearest existing
    parent."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def human(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def token_count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def check_disk(out: Path, shape: ModelShape, lengths: np.ndarray, *, k: int, window_before: int, window_after: int,
               checkpoints: bool, distinct_tokens: int | None = None, check: bool = True) -> int:
    """Print the expected size of `out`; raise a one-line UserError when its folder has too little free space.

    While the file is written its folder holds it, DuckDB's write-ahead log (up to WAL_BYTES) and, when the run
    checkpoints, the last checkpoint; while a checkpoint is replaced, two checkpoints. Returns the estimate.
    """
    size = estimate(shape, lengths, k=k, window_before=window_before, window_after=window_after,
                    distinct_tokens=distinct_tokens).total
    counted = int(np.maximum(np.asarray(lengths) - 1, 0).sum())
    print(f"expected database size: about {human(size)} ({shape.describe()}, {token_count(counted)} tokens)",
          flush=True)
    if not check:
        return size
    saved = checkpoint_bytes(shape, k=k, window_before=window_before, window_after=window_after) if checkpoints else 0
    needed = max(size + min(size, WAL_BYTES) + saved, 2 * saved)
    free = free_bytes(Path(out).parent)
    if free < needed:
        why = f"the database about {human(size)}, its write-ahead log" + (
            f", and a checkpoint of the running state of {human(saved)}, two while one replaces the other "
            "(--checkpoint-every 0 writes none)" if saved else "")
        raise UserError(f"--out {out}: its folder has {human(free)} free, but recording needs about {human(needed)} "
                        f"there ({why}); free some space, write elsewhere, or pass --no-size-check")
    return size
