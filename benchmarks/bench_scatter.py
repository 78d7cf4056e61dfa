"""Cost of the §5.1 scatter as a server-rendered PNG, against the JSON of the same points (what a client-side
plotting library would have to fetch and draw), measured in the same run.

    python benchmarks/bench_scatter.py                 # 11,008 points (OLMo-7B's d_mlp) and 30,000
    python benchmarks/bench_scatter.py --points 5000 --repeat 50

Points are drawn like a real layer's: frequencies of x_gate > 0 spread over [0, 1], cos(w_in, w_out)
correlated with them. Times are the median of --repeat renders.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import orjson

from gluscope.server import plots


def median_ms(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="11008,30000")
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'points':>8}{'PNG ms':>9}{'PNG KB':>9}{'JSON ms':>9}{'JSON KB':>9}{'ms ratio':>10}{'size ratio':>12}")
    for n in (int(v) for v in args.points.split(",")):
        x = rng.beta(2, 2, n)
        y = -0.3 * (x - 0.5) + rng.normal(0, 0.08, n)
        neuron = np.arange(n)

        def png() -> bytes:
            return plots.scatter_png(x, y, plots.scatter_frame(x, y, x_range=(-0.02, 1.02)))

        def json() -> bytes:  # the scatter's JSON twin, as data.Scatter.to_json builds it
            return orjson.dumps({"neuron": neuron.tolist(), "freq_gate_pos": x.astype(np.float64).tolist(),
                                 "cos_in_out": y.astype(np.float64).tolist()})

        png_ms, image = median_ms(png, args.repeat)
        json_ms, body = median_ms(json, args.repeat)
        print(f"{n:>8,}{png_ms:>9.1f}{len(image) / 1024:>9.1f}{json_ms:>9.1f}{len(body) / 1024:>9.1f}"
              f"{png_ms / json_ms:>10.2f}{len(image) / len(body):>12.3f}")


if __name__ == "__main__":
    main()
