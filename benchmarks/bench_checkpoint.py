"""One checkpoint of a recording (`record --checkpoint-every`): its size, its write and its load, against writing
the same number of bytes in one piece, in the same run.

    python benchmarks/bench_checkpoint.py                            # SmolLM2-135M shape (the demo): 30 x 1536
    python benchmarks/bench_checkpoint.py --layers 2 --d-mlp 11008   # 2 of OLMo-7B's 32 layers

A checkpoint's size depends only on the shape (layers, neurons, k, window),
not on the weights, so the reducers are the recorder's own, built for that
shape and fed one batch of random activations per layer. Not a test:
nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gluscope.recorder.checkpoint import load_checkpoint, save_checkpoint
from gluscope.recorder.model import activation_function
from gluscope.recorder.reducer_interface import Batch, LayerSetup, make_reducers


def raw_write(path: Path, n_bytes: int) -> float:
    """The baseline: the same number of bytes written in one piece and fsynced."""
    data = np.random.default_rng(0).integers(0, 255, n_bytes, dtype=np.uint8)
    started = time.perf_counter()
    with path.open("wb") as f:
        f.write(data.data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d-mlp", type=int, default=1536)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--window", type=int, default=27, help="window slots: before + after + 1 (default 24 + 2 + 1)")
    ap.add_argument("--reducer", choices=["kernel", "torch"], default="kernel")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="gluscope-checkpoint-"))
    folder.mkdir(parents=True, exist_ok=True)

    B, T, n = 4, 64, args.d_mlp
    lengths = np.full(B, T, np.int64)
    gen = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    setups = [LayerSetup(k=args.k, before=args.window - 3, after=2, sign=sign, act_fn=activation_function("silu"),
                         text_lengths=lengths) for _ in range(args.layers)]
    reducers = make_reducers(args.reducer, setups)
    batch = Batch.of(lengths, np.arange(B, dtype=np.int64), torch.device("cpu"))
    for reducer in reducers:
        reducer.update(torch.randn(B, T, n, generator=gen), torch.randn(B, T, n, generator=gen), batch)

    path = folder / "bench.duckdb.checkpoint"
    started = time.perf_counter()
    size = save_checkpoint(path, {"bench": True}, 1, reducers)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    checkpoint = load_checkpoint(path)
    for layer, reducer in enumerate(reducers):
        reducer.load_state(checkpoint.layer_state(layer))
    checkpoint.close()
    load_s = time.perf_counter() - started
    baseline_s = raw_write(folder / "raw.bin", size)
    path.unlink()
    (folder / "raw.bin").unlink()

    print(f"shape: {args.layers} layers x {n} neurons, k {args.k}, window {args.window}, {args.reducer} reducer")
    print(f"checkpoint: {size / 1e6:9.1f} MB  ({size / args.layers / 1e6:.1f} MB per layer)")
    print(f"write (save_checkpoint, fsynced):        {write_s:6.2f} s")
    print(f"load (load_checkpoint + load_state):     {load_s:6.2f} s")
    print(f"baseline: the same bytes in one write:   {baseline_s:6.2f} s")
    print(f"ratio checkpoint write / baseline: {write_s / baseline_s:.2f}")


if __name__ == "__main__":
    main()
