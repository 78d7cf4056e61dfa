"""The CPU kernel alone on one random layer batch, with parts of the distributions switched off.

    python benchmarks/bench_kernel_parts.py "histograms,density,sampling" "" "density,sampling"

Each argument is a comma-separated list of the parts switched off (of kernel_reducer.PARTS, set on the
reducer from here); for each, prints the min and median process time of 12 updates of one
[8, 512, 1408] layer batch on one thread. Not a test.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from gluscope.recorder.kernel_reducer import PARTS
from gluscope.recorder.model import activation_function
from gluscope.recorder.reducer_interface import Batch, LayerSetup, make_reducers

B, T, N = 8, 512, 1408


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x_gate, x_in = torch.randn(B, T, N), torch.randn(B, T, N)
    setup = LayerSetup(k=16, before=24, after=2, sign=torch.ones(N), act_fn=activation_function("silu"),
                       text_lengths=np.full(12 * B, T))
    for skip in sys.argv[1:]:
        off = {name for name in skip.split(",") if name}
        if not off <= set(PARTS):
            raise SystemExit(f"unknown parts {sorted(off - set(PARTS))}; the parts are {', '.join(PARTS)}")
        (reducer,) = make_reducers("kernel", [setup])
        # What KernelReducer.update hands the kernel: every part but those switched off.
        reducer.parts = sum(bit for name, bit in PARTS.items() if name not in off)
        times = []
        for i in range(12):
            batch = Batch.of(np.full(B, T), np.arange(i * B, (i + 1) * B), torch.device("cpu"))
            t = time.process_time()
            reducer.update(x_gate, x_in, batch)
            times.append(time.process_time() - t)
        print(f"skip {skip!r:32s} min {min(times) * 1000:.0f} ms, median {np.median(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
