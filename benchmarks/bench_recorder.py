"""Recorder time against a plain forward pass of the same Hugging Face model, on the same tokens.

    python benchmarks/bench_recorder.py [--layers 8 --d-model 512 --d-mlp 1408 --texts 256 --length 512]

Prints seconds and tokens/s for the HF model's forward without hooks (the
baseline; also the base model without the unembedding, which the recorder
skips) and for `record()` (its loop, and in the last round the loop plus
writing the database). Baseline and recorder passes alternate, and each round
gives its own ratio, since this machine's speed drifts. Not a test: nothing
here passes or fails.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from gluscope.recorder.corpus import Corpus
from gluscope.recorder.model import load_model
from gluscope.recorder.record import choose_reducer, record
from gluscope.recorder.tiny_models import make_config, train_tokenizer


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
    ap.add_argument("--rounds", type=int, default=3, help="alternating baseline and recorder passes (default: 3)")
    ap.add_argument("--vocab", type=int, default=512, help="model vocabulary size")
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--skip-write", action="store_true", help="time the loop only (the database of a 7B model takes minutes)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gluscope-bench-"))
    words = [f"w{i}" for i in range(600)]
    # Only config and tokenizer go to disk; the random weights are built where
    # they run, so a 7B-shaped model costs no 14 GB write.
    tokenizer = train_tokenizer([" ".join(words)] * 4, vocab_size=512)
    config = make_config(args.arch, args.vocab, d_model=args.d_model, d_mlp=args.d_mlp, n_layers=args.layers,
                         n_heads=args.heads, max_positions=max(1024, args.length))
    if args.kv_heads:
        config.num_key_value_heads = args.kv_heads
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
    batches = [torch.from_numpy(np.stack(token_ids[i:i + args.batch_size])).long().to(args.device)
               for i in range(0, args.texts, args.batch_size)]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    def full():
        with torch.inference_mode():
            for b in batches:
                hf(b)

    def base():
        with torch.inference_mode():
            for b in batches:
                hf.model(b)

    timed(lambda: hf.model(batches[0][:1]))  # warm-up
    base_s = timed(base)
    # The bridge wraps the modules of the model it is given (and forces eager
    # attention on it), so the baseline keeps an untouched copy of the weights.
    model = load_model(str(model_dir), device=args.device, dtype=args.dtype, hf_model=copy.deepcopy(hf))
    # Compile (or build the CPU kernel) once outside the measurement, as a long run amortises it.
    record(model, Corpus(corpus.source_index[:2], token_ids[:2], corpus.info), tmp / "warm.duckdb",
           dataset="bench", batch_size=2, compile=args.compile, reducer=args.reducer, progress=False)

    import gluscope.recorder.record as rec
    orig_writer = rec.DatabaseWriter

    class LoopDone(Exception):
        pass

    def recorder_pass(write: bool) -> tuple[float, float | None]:
        """(loop seconds, loop and database seconds or None)."""
        marks = {}

        class TimedWriter(orig_writer):  # marks where the loop ends and writing begins
            def __init__(self, *a, **kw):
                sync()
                marks["loop"] = time.perf_counter()
                if not write:
                    raise LoopDone
                super().__init__(*a, **kw)

        rec.DatabaseWriter = TimedWriter
        sync()
        t0 = time.perf_counter()
        try:
            record(model, corpus, tmp / "bench.duckdb", dataset="bench", batch_size=args.batch_size,
                   compile=args.compile, reducer=args.reducer, progress=False, overwrite=True)
        except LoopDone:
            pass
        finally:
            rec.DatabaseWriter = orig_writer
        total = time.perf_counter() - t0
        return marks["loop"] - t0, (total if write else None)

    # Baseline and recorder alternate, and each round gives its own ratio: on a
    # shared machine the speed drifts over minutes, and a baseline measured
    # once at the start would carry that drift into the ratio.
    print(f"model: {args.arch} d_model={args.d_model} layers={args.layers} d_mlp={args.d_mlp} "
          f"{args.dtype} on {args.device}; {args.texts} texts x {args.length} tokens, batch {args.batch_size}, "
          f"reducer={choose_reducer(torch.device(args.device), args.reducer)}, compile={args.compile}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"HF forward, base model (no unembedding), once: {base_s:.2f} s")
    loop_ratios, total_ratios = [], []
    for r in range(args.rounds):
        full_s = timed(full)
        write = not args.skip_write and r == args.rounds - 1
        loop_s, total_s = recorder_pass(write)
        loop_ratios.append(loop_s / full_s)
        line = (f"round {r + 1}: baseline (HF causal LM forward) {full_s:7.2f} s {n_tokens / full_s:7.0f} tok/s | "
                f"recorder loop {loop_s:7.2f} s {n_tokens / loop_s:7.0f} tok/s, ratio {loop_s / full_s:5.2f}")
        if total_s is not None:
            total_ratios.append(total_s / full_s)
            line += f" | loop + database {total_s:7.2f} s, ratio {total_s / full_s:5.2f}"
        print(line, flush=True)
    print(f"recorder loop / baseline, median over {args.rounds} rounds: {statistics.median(loop_ratios):.2f}")
    if total_ratios:
        print(f"recorder end to end / baseline (last round): {total_ratios[-1]:.2f}; "
              f"database {(tmp / 'bench.duckdb').stat().st_size / 1e6:.1f} MB")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
