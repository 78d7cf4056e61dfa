"""Recorder time against a plain forward pass of the same Hugging Face model, on the same tokens.

    python benchmarks/bench_recorder.py [--layers 8 --d-model 512 --d-mlp 1408 --texts 256 --length 512]
    python benchmarks/bench_recorder.py --variants all,-histograms,-density,-sampling,-calibration,none

Prints seconds, tokens/s and the ratio to the baseline for: the HF causal
LM's forward pass without hooks (the baseline), the recorder's forward pass
with its reductions, the recorder's whole loop, and the loop plus writing the
database. With --variants, the measurement repeats back to back with
parts of the distributions switched off (`-histograms`: all but the
histograms; `none`: none of histograms, density, sampling, calibration), so
each part's cost is the difference to `all`. They are switched off from here:
the reducers' `parts` and record()'s calibration_batches. The calibration's
forward passes count as recorder time without a baseline of their own. The
baseline runs batch by batch right after the recorder's pass on the same
tokens, so both see the machine at the same speed: this machine's speed
drifts by up to a third over minutes. Not a test: nothing here passes or
fails.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.tiny_models
from tests.tiny_models import make_config, train_tokenizer  # noqa: E402

from gluscope.recorder import rules  # noqa: E402
from gluscope.recorder.corpus import Corpus  # noqa: E402
from gluscope.recorder.kernel_reducer import PARTS, KernelReducer  # noqa: E402
from gluscope.recorder.model import GatedModel, load_model  # noqa: E402
from gluscope.recorder.record import choose_reducer, record  # noqa: E402
from gluscope.recorder.tensor_reducer import DISTRIBUTIONS, TensorDistributions  # noqa: E402

# What a variant may switch off: the reducers' distributions, and the calibration pass before the recording.
SWITCHES = (*DISTRIBUTIONS, "calibration")


def switch_off(parts: set[str]) -> int:
    """Switch `parts` off in both reducers (their class attributes); return the calibration batches to run."""
    TensorDistributions.parts = frozenset(DISTRIBUTIONS) - parts
    KernelReducer.parts = sum(bit for name, bit in PARTS.items() if name not in parts)
    return 0 if "calibration" in parts else rules.CALIBRATION_BATCHES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-mlp", type=int, default=1408)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reducer", choices=["auto", "kernel", "torch"], default="auto",
                    help="auto: the C++ kernel on the CPU, the tensor code on a GPU")
    ap.add_argument("--compile", choices=["on", "off"], default="on", help="torch.compile the torch reducer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vocab", type=int, default=512, help="model vocabulary size")
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--skip-write", action="store_true", help="time the loop only (the database of a 7B model takes minutes)")
    ap.add_argument("--variants", default="all", help="comma-separated: all, none, or -PART for PART in "
                    "histograms, density, sampling, calibration (that part switched off)")
    args = ap.parse_args()

    config = make_config(args.arch, args.vocab, d_model=args.d_model, d_mlp=args.d_mlp, n_layers=args.layers,
                         n_heads=args.heads, max_positions=max(1024, args.length))
    if args.kv_heads:
        config.num_key_value_heads = args.kv_heads
    tmp, hf, model, corpus, n_tokens, sync = build(args, config)

    import gluscope.recorder.record as rec

    print(f"model: {args.arch} d_model={args.d_model} layers={args.layers} d_mlp={args.d_mlp} "
          f"{args.dtype} on {args.device}; {args.texts} texts x {args.length} tokens, batch {args.batch_size}, "
          f"reducer={choose_reducer(torch.device(args.device), args.reducer)}, compile={args.compile}, "
          f"torch threads={torch.get_num_threads()}")
    summary = []
    for variant in args.variants.split(","):
        skip = {"all": [], "none": list(SWITCHES)}.get(variant, [variant.removeprefix("-")])
        if not set(skip) <= set(SWITCHES):
            raise SystemExit(f"unknown variant {variant!r}")
        calibration_batches = switch_off(set(skip))
        print(f"\n== variant {variant} (switched off: {', '.join(skip) or 'nothing'})")
        summary.append((variant, measure(args, rec, model, hf, corpus, tmp, n_tokens, sync, calibration_batches)))
    switch_off(set())
    if len(summary) > 1:
        print("\nsummary: recorder/forward (forward and reductions, calibration included), steady state")
        for variant, measured in summary:
            print(f"  {variant:14s} {measured.ratio:5.3f}  {measured.steady:5.3f}")


def build(args, config) -> tuple[Path, torch.nn.Module, GatedModel, Corpus, int, Callable[[], None]]:
    """Random weights of `config` and the recorder's model around a copy of them, warmed up; a random corpus.

    Reads args.vocab, texts, length, device, dtype, batch_size, compile and reducer. Returns (a temporary
    folder, the plain HF model, the recorder's model, the corpus, its counted tokens, a device sync).
    """
    tmp = Path(tempfile.mkdtemp(prefix="gluscope-bench-"))
    words = [f"w{i}" for i in range(600)]
    # Only config and tokenizer go to disk; the random weights are built where
    # they run, so a 7B-shaped model costs no 14 GB write.
    tokenizer = train_tokenizer([" ".join(words)] * 4, vocab_size=512)
    model_dir = tmp / "model"
    config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    token_ids = [np.concatenate([[0], rng.integers(3, args.vocab, args.length - 1)]).astype(np.int32)
                 for _ in range(args.texts)]
    corpus = Corpus(np.arange(args.texts), token_ids, {"max_length": args.length})
    n_tokens = args.texts * (args.length - 1)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    with torch.device(args.device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        hf(torch.from_numpy(token_ids[0][None]).long().to(args.device))  # warm-up
    # The bridge wraps the modules of the model it is given (and forces eager
    # attention on it), so the baseline keeps an untouched copy of the weights.
    model = load_model(str(model_dir), device=args.device, dtype=args.dtype, hf_model=copy.deepcopy(hf))
    # Compile (or build the CPU kernel) once outside the measurement, as a long run amortises it.
    record(model, Corpus(corpus.source_index[:2], token_ids[:2], corpus.info), tmp / "warm.duckdb",
           dataset="bench", batch_size=2, compile=args.compile, reducer=args.reducer, progress=False)
    return tmp, hf, model, corpus, n_tokens, sync


class Measured(NamedTuple):
    ratio: float                # recorder/forward, calibration included
    steady: float               # recorder/forward over the last quarter of the batches
    recorder_s: float           # the recorder's passes, batch by batch (calibration not included)
    baseline_s: float
    calibration_s: float
    extra_s: dict[str, float]   # per label of `extra`
    batches: int


def measure(args, rec, model, hf, corpus, tmp, n_tokens, sync, calibration_batches: int,
            extra: dict[str, Callable[[torch.Tensor], None]] | None = None) -> Measured:
    """One recording with its paired baseline; prints the table, returns its totals.

    extra: {label: run(tokens)}, each run and timed on the same padded tokens right after each batch's
    baseline (not in the calibration), and printed as a row of its own.
    """
    orig_writer = rec.DatabaseWriter
    orig_calibrate = rec._calibrate
    marks: dict[str, float] = {}
    calibrating = [False]

    class LoopDone(Exception):
        pass

    class TimedWriter(orig_writer):  # marks where the loop ends and writing begins
        def __init__(self, *a, **kw):
            sync()
            marks["loop"] = time.perf_counter()
            if args.skip_write:
                raise LoopDone
            super().__init__(*a, **kw)

    def timed_calibrate(*a, **kw):
        calibrating[0] = True
        try:
            return orig_calibrate(*a, **kw)
        finally:
            calibrating[0] = False

    # Each recorder batch is followed at once by the baseline's forward pass on
    # the same padded tokens, so both see the machine at the same speed: this
    # machine drifts by up to a third over minutes, which alternating whole
    # passes did not cancel (one run's rounds gave 1.29 and 1.73).
    pairs: list[tuple[float, float]] = []
    calibration_s = [0.0]
    extra = extra or {}
    extra_s = dict.fromkeys(extra, 0.0)
    run_with_hooks = model.bridge.__class__.run_with_hooks.__get__(model.bridge)

    def paired(tokens, *a, **kw):
        sync()
        t = time.perf_counter()
        try:
            return run_with_hooks(tokens, *a, **kw)
        finally:
            sync()
            recorder_s = time.perf_counter() - t
            if calibrating[0]:  # no baseline: a plain run has no calibration
                calibration_s[0] += recorder_s
            else:
                t = time.perf_counter()
                with torch.inference_mode():
                    hf(tokens)
                sync()
                pairs.append((recorder_s, time.perf_counter() - t))
                for label, run in extra.items():
                    t = time.perf_counter()
                    run(tokens)
                    sync()
                    extra_s[label] += time.perf_counter() - t

    model.bridge.__dict__["run_with_hooks"] = paired  # the bridge forwards attribute writes to its model
    rec.DatabaseWriter = TimedWriter
    rec._calibrate = timed_calibrate
    sync()
    t0 = time.perf_counter()
    try:
        record(model, corpus, tmp / "bench.duckdb", dataset="bench", batch_size=args.batch_size,
               compile=args.compile, reducer=args.reducer, progress=False, overwrite=True, checkpoint_every=0,
               calibration_batches=calibration_batches)
    except LoopDone:
        pass
    finally:
        rec.DatabaseWriter = orig_writer
        rec._calibrate = orig_calibrate
    total_s = time.perf_counter() - t0
    recorder_s, baseline_s = (sum(x) for x in zip(*pairs))
    # The loop also ran the baseline (and the extras); what remains is the recorder's own loop.
    loop_s = marks["loop"] - t0 - baseline_s - sum(extra_s.values())
    write_s = total_s - (marks["loop"] - t0)

    rows = [
        ("HF forward, causal LM (baseline), batch by batch", baseline_s),
        ("recorder forward and reductions, batch by batch", recorder_s),
        ("calibration passes", calibration_s[0]),
        ("recorder loop (all of it)", loop_s),
        *extra_s.items(),
    ]
    if not args.skip_write:
        rows.append(("recorder end to end (loop + database)", loop_s + write_s))
    for name, sec in rows:
        print(f"{name:50s} {sec:8.2f} s {n_tokens / max(sec, 1e-9):8.0f} tok/s  ratio {sec / baseline_s:5.2f}")
    ratios = sorted(r / b for r, b in pairs)
    print(f"per-batch ratios: min {ratios[0]:.2f}, median {statistics.median(ratios):.2f}, max {ratios[-1]:.2f} "
          f"over {len(ratios)} batches")
    # Steady state: the top-k lists have filled and few candidates enter them any more.
    last = pairs[len(pairs) - max(1, len(pairs) // 4):]
    rec_last, base_last = (sum(x) for x in zip(*last))
    print(f"last quarter ({len(last)} batches, steady state): recorder/forward {rec_last / base_last:.2f}, "
          f"{sum(1 for _ in last) * args.batch_size * (args.length - 1) / rec_last:.0f} tok/s")
    if not args.skip_write:
        print(f"database: {(tmp / 'bench.duckdb').stat().st_size / 1e6:.1f} MB")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB on {torch.cuda.get_device_name()}")
    return Measured((recorder_s + calibration_s[0]) / baseline_s, rec_last / base_last, recorder_s, baseline_s,
                    calibration_s[0], extra_s, len(pairs))


if __name__ == "__main__":
    main()
