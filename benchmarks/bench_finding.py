"""What the tables that find neurons add to the recorder's weight pass, against the weight tokens alone.

    python benchmarks/bench_finding.py --model ~/.cache/gluscope/gguf/<sha256>   # the demo's SmolLM2-135M, converted
    python benchmarks/bench_finding.py --random --layers 2 --d-model 4096 --d-mlp 11008 --vocab 50304 \\
        --full-layers 32                                                       # OLMo-7B shape, 2 of 32 layers

Times, in one run and on the same weights: the weight tokens as recorded
before (the baseline), the weight tokens with token_neurons fed the same
products, and the related neurons. With --full-layers, extrapolates to a
model of that many layers: the weight pass scales with the layers, the
related neurons with the layer pairs L(L-1)/2. Not a test.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from gluscope.recorder.related import related_neurons
from gluscope.recorder.token_tops import TokenNeurons
from gluscope.recorder.weights import layer_weights


@dataclass
class RandomWeights:
    """Random weights of a gated model's shape, with what the weight pass reads of a GatedModel (no model runs)."""

    n_layers: int
    d_model: int
    d_mlp: int
    vocab: int
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.W_E = torch.randn(self.vocab, self.d_model, generator=g)
        self.W_U = torch.randn(self.d_model, self.vocab, generator=g)
        self.layers = [tuple(torch.randn(self.d_mlp, self.d_model, generator=g) for _ in range(3))
                       for _ in range(self.n_layers)]
        self.gains = [1.0 + 0.1 * torch.randn(self.d_model, generator=g) for _ in range(self.n_layers)]

    def embeddings(self):
        return self.W_E, self.W_U

    def token_count(self) -> int:
        return self.vocab

    def mlp_weights(self, layer: int):
        return self.layers[layer]

    def mlp_input_gain(self, layer: int) -> torch.Tensor:
        return self.gains[layer]


def timed(fn):
    """(CPU seconds of this process, the result): on a machine others share, CPU time, not the wall clock,
    is what the work costs (the wall clock also counts the time others' processes ran)."""
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a saved model folder (loaded through TransformerBridge)")
    ap.add_argument("--random", action="store_true", help="random weights of the shape below instead")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-mlp", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--full-layers", type=int, default=None, help="extrapolate to this many layers")
    ap.add_argument("--first-layers", type=int, default=None,
                    help="with --model: time only its first N layers (then --full-layers extrapolates)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.random:
        model = RandomWeights(args.layers, args.d_model, args.d_mlp, args.vocab)
        name = f"random {args.layers} x {args.d_mlp} neurons, d_model {args.d_model}, vocab {args.vocab}"
    else:
        from gluscope.recorder.model import load_model
        model = load_model(args.model, device="cpu")
        if args.first_layers:
            import dataclasses
            model = dataclasses.replace(model, n_layers=min(args.first_layers, model.n_layers))
        name = f"{args.model} ({model.n_layers} x {model.d_mlp} neurons, vocab {model.token_count()})"
    L, n, d, V = model.n_layers, model.d_mlp, model.d_model, model.token_count()
    print(f"{name}, {torch.get_num_threads()} threads")

    base, weights = timed(lambda: layer_weights(model, True))
    tn = TokenNeurons(V)
    with_tn, _ = timed(lambda: layer_weights(model, True, token_neurons=tn))
    rel, _ = timed(lambda: related_neurons(model, [w.sign for w in weights]))
    print("(CPU seconds of this process, all threads)")
    pairs = L * (L - 1) // 2
    flops = pairs * 2 * 2 * n * n * d
    print(f"weight tokens (baseline)                 {base:8.1f} s  1.00")
    print(f"weight tokens + token_neurons             {with_tn:8.1f} s  {with_tn / base:.2f}  "
          f"(token_neurons alone: {with_tn - base:.1f} s)")
    print(f"related neurons ({pairs} layer pairs)  {rel:8.1f} s  {rel / base:.2f}  "
          f"({flops / 1e12:.2f} TFLOP, {flops / rel / 1e9:.0f} GFLOP per CPU-second)")
    if args.full_layers:
        F = args.full_layers
        full_pairs = F * (F - 1) // 2
        per_layer_tn = (with_tn - base) / L
        per_pair = rel / max(pairs, 1)
        full_flops = full_pairs * 2 * 2 * n * n * d
        print(f"extrapolated to {F} layers: weight tokens {base / L * F:.0f} s, token_neurons +{per_layer_tn * F:.0f} s, "
              f"related {per_pair * full_pairs:.0f} s ({full_pairs} pairs, {full_flops / 1e15:.2f} PFLOP) CPU-seconds")


if __name__ == "__main__":
    main()
