"""Two builds of the CPU kernel in one process, alternating update by update on the same random layer batch.

    python benchmarks/bench_kernel_ab.py OLD.cpp NEW.cpp                                   # two sources
    BFLAGS=-mprefer-vector-width=256 python benchmarks/bench_kernel_ab.py K.cpp K.cpp      # two flag sets

A and B are each compiled (with AFLAGS / BFLAGS added to the build's flags) and loaded side by side; each
pair of updates runs A then B or B then A, so both see the machine at the same speed, and the ratio B/A is
taken per pair. Process time, one thread, [8, 512, 1408] float32, every distribution on. Not a test.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gluscope.recorder.model import activation_function
from gluscope.recorder.reducer_interface import Batch, LayerSetup, make_reducers
from gluscope.recorder import kernel_reducer

B, T, N = 8, 512, 1408


def main() -> None:
    torch.set_num_threads(1)
    dlls = {}
    for name, src, flags in (("A", sys.argv[1], os.environ.get("AFLAGS", "")),
                             ("B", sys.argv[2], os.environ.get("BFLAGS", ""))):
        kernel_reducer.SOURCE = Path(src)
        os.environ["GLUSCOPE_CXXFLAGS"] = flags
        dlls[name] = kernel_reducer.load_kernel.__wrapped__()  # past the cache: one build per (source, flags)
    torch.manual_seed(0)
    x_gate, x_in = torch.randn(B, T, N), torch.randn(B, T, N)
    reps = int(os.environ.get("REPS", "16"))
    setup = LayerSetup(k=16, before=24, after=2, sign=torch.ones(N), act_fn=activation_function("silu"),
                       text_lengths=np.full(reps * 2 * B + B, T))
    reducers = {name: make_reducers("kernel", [setup])[0] for name in dlls}
    times: dict[str, list[float]] = {name: [] for name in dlls}
    for i in range(reps):
        for name in (("A", "B") if i % 2 == 0 else ("B", "A")):
            kernel_reducer.load_kernel = lambda name=name: dlls[name]  # what KernelReducer.update calls
            batch = Batch.of(np.full(B, T), np.arange(i * B, (i + 1) * B), torch.device("cpu"))
            t = time.process_time()
            reducers[name].update(x_gate, x_in, batch)
            times[name].append(time.process_time() - t)
    for name, arg in (("A", sys.argv[1]), ("B", sys.argv[2])):
        flags = os.environ.get(f"{name}FLAGS", "")
        print(f"{name} {arg} {flags}: min {min(times[name]) * 1e3:.1f} ms, median {np.median(times[name]) * 1e3:.1f} ms")
    r = np.array(times["B"]) / np.array(times["A"])
    print(f"B/A per pair: median {np.median(r):.3f}, min {r.min():.3f}, max {r.max():.3f} over {reps} pairs")


if __name__ == "__main__":
    main()
