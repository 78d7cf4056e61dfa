"""`gluscope merge` of two shards against writing one whole file of the same shape, in the same run.

    python benchmarks/bench_merge.py [--layers 32 --d-mlp 11008 --texts 45734]   # OLMo-7B-0424 shape

Writes a whole synthetic database and two shards of the same corpus with
make_synthetic_db.py (the recorder's own writer), then merges the shards
with `gluscope merge`, and prints each time and the ratio merge / whole write.
Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d-mlp", type=int, default=11008)
    ap.add_argument("--texts", type=int, default=45734)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temporary folder)")
    args = ap.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="gluscope-merge-"))
    shape = ["--layers", str(args.layers), "--d-mlp", str(args.d_mlp), "--texts", str(args.texts), "--overwrite"]
    make = [sys.executable, str(HERE / "make_synthetic_db.py")]
    whole = timed([*make, "--out", str(folder / "whole.duckdb"), *shape])
    for i in range(2):
        timed([*make, "--out", str(folder / f"shard{i}.duckdb"), "--shard", f"{i}/2", *shape])
    merged = timed([sys.executable, "-m", "gluscope.cli", "merge", str(folder / "shard0.duckdb"),
                    str(folder / "shard1.duckdb"), "--out", str(folder / "merged.duckdb"), "--overwrite"])
    sizes = {name: (folder / f"{name}.duckdb").stat().st_size / 1e9 for name in ("whole", "shard0", "merged")}
    print(f"shape: {args.layers} layers x {args.d_mlp} neurons, {args.texts} texts")
    print(f"write one whole file (make_synthetic_db): {whole:7.1f} s  {sizes['whole']:.2f} GB")
    print(f"merge two shards (gluscope merge):        {merged:7.1f} s  {sizes['merged']:.2f} GB "
          f"(shards {sizes['shard0']:.2f} GB each)")
    print(f"ratio merge / write: {merged / whole:.2f}")


if __name__ == "__main__":
    main()
