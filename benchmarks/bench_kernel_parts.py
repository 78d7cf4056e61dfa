"""The CPU kernel alone on one random layer batch, with parts of the distributions (#11) switched off.

    python benchmarks/bench_kernel_parts.py "histograms,density,sampling" "" "density,sampling"

Each argument is a GLUSCOPE_BENCH_SKIP value (the parts switched off); for each, prints the min and median
process time of 12 updates of one [8, 512, 1408] layer batch on one thread. Not a test.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from gluscope.recorder.model import activation_function
from gluscope.recorder.reducer import Batch, LayerSetup, make_reducers

B, T, N = 8, 512, 1408


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x_gate, x_in = torch.randn(B, T, N), torch.randn(B, T, N)
    setup = LayerSetup(k=16, before=24, after=2, sign=torch.ones(N), act_fn=activation_function("silu"),
                       text_lengths=np.full(12 * B, T))
    for skip in sys.argv[1:]:
        os.environ["GLUSCOPE_BENCH_SKIP"] = skip  # read when a reducer is built
        (reducer,) = make_reducers("kernel", [setup])
        times = []
        for i in range(12):
            batch = Batch.of(np.full(B, T), np.arange(i * B, (i + 1) * B), torch.device("cpu"))
            t = time.process_time()
            reducer.update(x_gate, x_in, batch)
            times.append(time.process_time() - t)
        print(f"skip {skip!r:32s} min {min(times) * 1000:.0f} ms, median {np.median(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
