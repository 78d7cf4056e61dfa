"""The recorder's weight stage (weight tokens with token neurons, then related neurons) at two commits, alternating.

    python benchmarks/bench_weight_stage.py --model FOLDER --baseline REV [--runs 2] [--layers N]

FOLDER is a model folder the recorder loads (the demo's converted SmolLM2 sits in
$GLUSCOPE_CACHE/gguf/*/). The baseline is REV's recorder/ (git archive into a
temporary folder); the candidate is this checkout's. Each run is a fresh
process of one of them, A B B A ..., so both see the machine at the same speed;
the ratios B/A are per adjacent pair. Both must give the same tables: the
script checks that too. Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def stage(recorder: str, model_dir: str, layers: int | None, out: str) -> None:
    """One run, in this process: gluscope.recorder loaded from `recorder`, the tables saved to `out` (.npz)."""
    import gluscope.recorder

    gluscope.recorder.__path__ = [recorder]  # every gluscope.recorder.* import below comes from there
    import torch

    from gluscope.recorder.model import load_model
    from gluscope.recorder.related import related_neurons
    from gluscope.recorder.token_tops import TokenNeurons
    from gluscope.recorder.weights import layer_weights

    model = load_model(model_dir, device="cpu", dtype="float32")
    if layers:
        model.n_layers = layers
    t0 = time.perf_counter()
    token_neurons = TokenNeurons(model.token_count())
    weights = layer_weights(model, True, token_neurons=token_neurons)
    t1 = time.perf_counter()
    related = related_neurons(model, [w.sign for w in weights])
    t2 = time.perf_counter()
    layer, neuron, score = token_neurons.result(model.d_mlp)
    np.savez(out, tn_score=score, tn_layer=layer, tn_neuron=neuron, rel_score=related.score,
             wt_ids=np.stack([w.token_ids for w in weights]), wt_scores=np.stack([w.token_scores for w in weights]))
    print(json.dumps({"weight_tokens": t1 - t0, "related": t2 - t1, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--baseline", required=True, help="git revision whose recorder/ is A")
    parser.add_argument("--runs", type=int, default=2, help="runs of each (default: 2)")
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers")
    parser.add_argument("--_stage", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._stage:
        return stage(args._stage[0], args.model, args.layers, args._stage[1])
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "recorder"],
                                 check=True, capture_output=True).stdout
        tarfile.open(fileobj=BytesIO(archive)).extractall(tmp, filter="data")
        sources = {"A": str(Path(tmp) / "recorder"), "B": str(ROOT / "recorder")}
        order = [("A", "B") if i % 2 == 0 else ("B", "A") for i in range(args.runs)]
        times: dict[str, list[dict]] = {"A": [], "B": []}
        for pair in order:
            for name in pair:
                out = str(Path(tmp) / f"{name}.npz")
                extra = ["--layers", str(args.layers)] if args.layers else []
                done = subprocess.run([sys.executable, __file__, "--model", args.model, "--baseline", args.baseline,
                                       *extra, "--_stage", sources[name], out], check=True, capture_output=True,
                                      text=True)
                times[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(name, times[name][-1], flush=True)
        a, b = (np.load(str(Path(tmp) / f"{n}.npz")) for n in "AB")
        # Equal scores may be kept in another order (or, at a top's last place, another neuron with that score).
        differ = {k: int((~((a[k] == b[k]) | (np.isnan(a[k]) & np.isnan(b[k])) if a[k].dtype.kind == "f"
                             else a[k] == b[k])).sum()) for k in a.files}
        print("entries that differ:", differ, "of", {k: a[k].size for k in a.files})
        print("|related score| the same:", bool(np.array_equal(np.abs(a["rel_score"]), np.abs(b["rel_score"]),
                                                                equal_nan=True)))
        for part in ("weight_tokens", "related"):
            ratios = [tb[part] / ta[part] for ta, tb in zip(times["A"], times["B"])]
            print(f"{part}: A {np.median([t[part] for t in times['A']]):.1f} s, "
                  f"B {np.median([t[part] for t in times['B']]):.1f} s, B/A per pair "
                  + ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
