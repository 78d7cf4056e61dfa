"""The recorder on a mixture-of-experts model against a plain forward pass, and where the recorder's time goes.

    python -u benchmarks/bench_moe.py [--arch olmoe --layers 8 --experts 16 --top-k 2 --d-expert 512
                                       --d-model 512 --texts 64 --length 256 --batch-size 8
                                       --dense-arch olmo2 --d-shared N]

An OLMoE-shaped model of random weights is recorded through `record(...)`
with bench_recorder.py's pairing: each recorder batch is followed at once by
the plain Hugging Face forward pass over the same padded tokens, so both see
the machine at the same speed, and then by a forward pass of the recorder's
bridge whose capture hooks do nothing but end the pass where the recorder's
end it (a second bridge around a copy of the weights, since the recorder's
hooks stay on its own modules for the whole loop; its experts run the same
products_forward, handing their products to nothing). Meanwhile wrappers set
up here (the recorder itself is unchanged) time the parts of the recorder's
batch work, outside the calibration passes: the experts' forward as the
recorder runs it (experts.products_forward: the module's own computation,
which hands each expert's gate_up product over), the capture work it hands
to (or a pre-hook's, where the products are computed again instead:
routed_activations), RouterStats.route and the reducers' update calls (with
act(x_gate) inside them, and each unit's router-weighted hook_post, which
the kernel folds in the same pass).

After the run, two experts of the middle layer (the median and the busiest
by tokens routed to them in the last batch) have their reducer, copied in
its state after the last batch, handed that batch again three ways: as the
recorder hands it (its routed rows and a row map), spread to [B, T, d] with
NaN at the tokens routed elsewhere (as the recorder did before 38980b9), and
spread with every row a real value, to see what rows cost the kernel (each
with its router weights, into copies of the routed values).

With --dense-arch (default olmo2; `none` skips it) the same measurement runs
for a dense model with d_mlp = top_k x d_expert, the neurons a token passes
through in the MoE model. The database is not written (bench_recorder.py
measures that), and record()'s related neurons are computed once per model
(minutes for 65,536 neurons, no part of the loop). With two torch threads,
another busy process on this 2-core machine slows the many small tensor
operations of the hooks by up to 15 times; --threads 1 gave the same
breakdown loaded or quiet. Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_recorder, beside this file
from bench_recorder import Measured, build, measure  # noqa: E402

import gluscope.recorder.expert_capture as capture  # noqa: E402
import gluscope.recorder.experts as experts  # noqa: E402
import gluscope.recorder.record as rec  # noqa: E402
from gluscope.recorder import rules  # noqa: E402
from gluscope.recorder.kernel_reducer import ActBuffer  # noqa: E402
from gluscope.recorder.model import GatedModel, load_model  # noqa: E402
from gluscope.recorder.reducer_interface import Batch, Contribution  # noqa: E402
from gluscope.recorder.routing import RouterStats  # noqa: E402
from tests.tiny_models import make_config  # noqa: E402


class Parts:
    """Seconds and calls per label of the wrapped functions, counted only while `on` (not in the calibration)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.on = True

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*a, **kw):
            if not self.on:
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[label] += time.perf_counter() - t
                self.calls[label] += 1
        return timed


@contextmanager
def patched(obj, name: str, value) -> Iterator[None]:
    """obj.name = value while the context lasts."""
    before = obj.__dict__[name] if name in vars(obj) else None
    setattr(obj, name, value)
    try:
        yield
    finally:
        if before is None:
            delattr(obj, name)
        else:
            setattr(obj, name, before)


@contextmanager
def timed_parts(model: GatedModel, parts: Parts, reducers: list, keep: range) -> Iterator[None]:
    """Wrap the recorder's per-batch work in `parts`; `reducers` receives the recording's reducers, and those
    numbered in `keep` also keep the last batch they were handed (reducer.last: the recorder's own tensors,
    which nothing changes after the call)."""
    orig_make, orig_calibrate = rec.make_reducers, rec._calibrate

    def make_reducers(*a, **kw):
        made = orig_make(*a, **kw)
        for i, reducer in enumerate(made):
            update = parts.wrap("update", reducer.update)
            if i in keep:
                def update(*a, reducer=reducer, update=update):
                    reducer.last = a  # (x_gate, x_in, batch, rows, contribution)
                    update(*a)
            reducer.update = update
        reducers[:] = made
        return made

    def calibrate(*a, **kw):
        parts.on = False
        try:
            return orig_calibrate(*a, **kw)
        finally:
            parts.on = True

    def hooks(*a, **kw):  # a dense model's: (name, hook) per bridge hook point
        return [(name, parts.wrap("hooks", fn)) for name, fn in orig_hooks(*a, **kw)]
    orig_hooks = rec._hooks

    with ExitStack() as stack:
        stack.enter_context(patched(rec, "make_reducers", make_reducers))
        stack.enter_context(patched(rec, "_calibrate", calibrate))
        stack.enter_context(patched(rec, "_hooks", hooks))
        stack.enter_context(patched(ActBuffer, "act", parts.wrap("act", ActBuffer.act)))
        if model.layouts is not None:
            for obj, name, label in ((capture, "routed_activations", "routed"), (RouterStats, "route", "route")):
                stack.enter_context(patched(obj, name, parts.wrap(label, getattr(obj, name))))

            def products_forward(layout, chosen, hand_off):  # the hand-off timed whole (StopAtLayerException too)
                forward = orig_products(layout, chosen, parts.wrap("hooks", parts.wrap("hand-off", hand_off)))
                return None if forward is None else parts.wrap("experts", forward)
            orig_products = capture.products_forward
            stack.enter_context(patched(capture, "products_forward", products_forward))

            def gated_mlp_forward(mlp, hand_off):  # a shared expert's or dense MLP's hand-off, likewise
                return orig_gated(mlp, parts.wrap("hooks", hand_off))
            orig_gated = getattr(capture, "gated_mlp_forward", None)
            if orig_gated is not None:  # an older recorder, measured against this one from a worktree, has none
                stack.enter_context(patched(capture, "gated_mlp_forward", gated_mlp_forward))
            for layout in model.layouts:  # a pre-hook where the products are computed again, timed whole
                for module in [m for m in (layout.experts, *layout.mlps) if m is not None]:
                    register = module.register_forward_pre_hook
                    stack.enter_context(patched(module, "register_forward_pre_hook",
                                                lambda hook, register=register, **kw: register(
                                                    parts.wrap("hooks", hook), **kw)))
        yield


def idle_forward(model: GatedModel) -> Callable[[torch.Tensor], None]:
    """The recorder's forward pass with capture that does nothing but end it where the recorder's end it: the
    experts run products_forward and the shared or dense MLPs gated_mlp_forward, handing their products to nothing
    (or, where those do not apply, a pre-hook that returns at once)."""
    bridge = model.bridge
    run_with_hooks = type(bridge).run_with_hooks.__get__(bridge)
    last = model.n_layers - 1

    def stop(*a, **kw):
        raise StopAtLayerException(torch.zeros(0))

    def nothing(*a, **kw) -> None:
        return None

    def run(tokens: torch.Tensor) -> None:
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(model.native_attention())
            if model.layouts is None:
                hooks = [(f"blocks.{last}.mlp.hook_pre_linear", stop)]
            else:
                hooks = []
                for layer, layout in enumerate(model.layouts):
                    ends = layer == last and not layout.mlps
                    if layout.experts is not None:
                        # experts.products_forward itself: timed_parts wraps the one expert_capture calls.
                        forward = experts.products_forward(layout, [], stop if ends else nothing)
                        if forward is not None:
                            stack.enter_context(capture.forward_replaced(layout.experts, forward))
                        else:
                            stack.callback(layout.experts.register_forward_pre_hook(stop if ends else nothing).remove)
                    for i, mlp in enumerate(layout.mlps):
                        ends = layer == last and i == len(layout.mlps) - 1
                        # An older recorder, measured against this one from a worktree, has no gated_mlp_forward.
                        forward = (experts.gated_mlp_forward(mlp, stop if ends else nothing)
                                   if hasattr(experts, "gated_mlp_forward") else None)
                        if forward is not None:
                            stack.enter_context(capture.forward_replaced(mlp, forward))
                        else:
                            stack.callback(mlp.register_forward_pre_hook(stop if ends else nothing).remove)
            run_with_hooks(tokens, return_type=None, fwd_hooks=hooks)
    return run


def breakdown(label: str, m: Measured, parts: Parts, idle_s: float, moe: bool) -> None:
    """Print where the recorder's batch time went."""
    s = parts.seconds
    kernel = s["update"] - s["act"]
    rows = [("HF forward (baseline)", m.baseline_s, ""),
            ("recorder, batch by batch", m.recorder_s, ""),
            ("  forward, capture hooks doing nothing", idle_s, "measured on a second bridge")]
    if moe:
        rows += [("  experts' forward, their own work", s["experts"] - s["hand-off"],
                  f"products_forward, {parts.calls['experts']} calls, the hand-off not included")]
    rows += [("  capture hooks (all of them)", s["hooks"], f"{parts.calls['hooks']} calls")]
    if moe:
        rows += [("    RouterStats.route", s["route"], f"{parts.calls['route']} calls"),
                 ("    routed_activations (x_gate, x_in again)", s["routed"],
                  f"{parts.calls['routed']} calls: pre-hooks where products_forward does not apply")]
    rows += [("    reducers' update: act(x_gate)", s["act"], f"{parts.calls['act']} calls"),
             ("    reducers' update: the kernel" + (" (+ routed values)" if moe else ""), kernel,
              f"{parts.calls['update']} calls, {1e3 * kernel / max(parts.calls['update'], 1):.2f} ms each")]
    named = sum(s[k] for k in ("route", "routed", "update"))
    rows += [("    the rest of the hooks", s["hooks"] - named,
              "row maps, router weights per row, indexing, Python" if moe else "Python"),
             ("  the rest (recorder - hooks)", m.recorder_s - s["hooks"], "the forward within the recording")]
    print(f"\n{label}: where the recorder's batch time went ({m.batches} batches, calibration not included)")
    print(f"{'':48s} {'s':>7s} {'ms/batch':>9s} {'/ forward':>9s}")
    for name, sec, note in rows:
        print(f"{name:48s} {sec:7.2f} {1e3 * sec / m.batches:9.1f} {sec / m.baseline_s:9.3f}  {note}")


def rows_cost(reducer, x_gate: torch.Tensor, x_in: torch.Tensor, batch: Batch, rows: torch.Tensor | None,
              contribution: Contribution, weight: torch.Tensor, repeats: int) -> float:
    """Median seconds of one update on a fresh copy of `reducer`'s state, its routed values into copies of
    `contribution`'s, with `weight` per row."""
    times = []
    for _ in range(repeats):
        fresh = type(reducer)(reducer.setup, reducer.buffer)
        fresh.load_state(reducer.state())
        values = Contribution(weight, contribution.value_min.clone(), contribution.value_max.clone(),
                              contribution.value_sum.clone(), contribution.value_count.clone())
        t = time.perf_counter()
        with torch.inference_mode():  # as in the recording (its act buffer is an inference tensor)
            fresh.update(x_gate, x_in, batch, rows, values)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rows_compared(reducer, repeats: int) -> None:
    """One expert's update on its last batch: as recorded, spread to [B, T, d] with NaN, spread with real rows."""
    x_gate, x_in, batch, rows, contribution = reducer.last
    B, T = batch.valid.shape
    R, d = x_gate.shape
    if R == 0:
        return
    at = rows >= 0
    nan_gate, nan_in = (torch.full((B * T, d), float("nan")) for _ in range(2))
    nan_gate[at], nan_in[at] = x_gate[rows[at]], x_in[rows[at]]
    weight = torch.zeros(B * T)
    weight[at] = contribution.weight[rows[at]]
    # Every row real: the rows routed elsewhere filled with its routed rows drawn at random.
    fill = torch.randint(0, R, (int((~at).sum()),), generator=torch.Generator().manual_seed(0))
    real_gate, real_in, real_weight = nan_gate.clone(), nan_in.clone(), weight.clone()
    real_gate[~at], real_in[~at], real_weight[~at] = x_gate[fill], x_in[fill], contribution.weight[fill]
    cases = [(f"as recorded: its {R} rows and a row map", x_gate, x_in, rows, contribution.weight, R),
             ("spread to [B, T, d], NaN where routed elsewhere", nan_gate.view(B, T, d), nan_in.view(B, T, d), None,
              weight, B * T),
             ("spread to [B, T, d], every row real", real_gate.view(B, T, d), real_in.view(B, T, d), None,
              real_weight, B * T)]
    print(f"\none expert's update (layer {reducer.setup.layer}, neurons from {reducer.setup.first_neuron}) on the "
          f"last batch, {R} of {B * T} tokens routed to it; median of {repeats}, each on a copy of its state:")
    base = None
    for name, g, i, r, w, n_rows in cases:
        sec = rows_cost(reducer, g, i, batch, r, contribution, w, repeats)
        base = base or sec
        print(f"  {name:52s} {1e3 * sec:7.2f} ms  {1e6 * sec / n_rows:6.2f} us/row  {sec / base:5.2f} of as recorded")


@contextmanager
def related_once() -> Iterator[None]:
    """record()'s related neurons computed once per model: the warm-up's and the measured run's are the same,
    and for 65,536 neurons they take minutes that are no part of the loop."""
    orig, done = rec.related_neurons, {}

    def related_neurons(model, *a, **kw):
        if id(model) not in done:
            done[id(model)] = orig(model, *a, **kw)
        return done[id(model)]

    with patched(rec, "related_neurons", related_neurons):
        yield


def run_one(args, arch: str, config, label: str) -> None:
    with related_once():
        _run_one(args, arch, config, label)


def _run_one(args, arch: str, config, label: str) -> None:
    tmp, hf, model, corpus, n_tokens, sync = build(args, config)
    idle = load_model(str(tmp / "model"), device=args.device, dtype=args.dtype, hf_model=copy.deepcopy(hf))
    with torch.inference_mode():  # its first pass is slow, as the recorder's was before build() warmed it
        idle_forward(idle)(torch.from_numpy(corpus.token_ids[0][None]).long().to(args.device))
    moe = model.layouts is not None
    neurons = sum(layout.n_neurons for layout in model.layouts) if moe else model.d_mlp * model.n_layers
    print(f"\n==== {label}: {arch}, {model.n_layers} layers, d_model {model.d_model}, "
          + (f"{model.layouts[0].n_experts} experts of {model.layouts[0].units[0].n_neurons} neurons, "
             f"top-{model.layouts[0].top_k}, " if moe else f"d_mlp {model.d_mlp}, ")
          + f"{neurons} neurons recorded; {args.texts} texts x {args.length} tokens, batch {args.batch_size}; "
          f"reducer {rec.choose_reducer(model.device, args.reducer)}, torch threads {torch.get_num_threads()}")
    print(f"load before: {os.getloadavg()[0]:.2f}")
    parts = Parts()
    reducers: list = []
    # The reducers that keep their last batch: the experts of the middle layer.
    units = len(model.layouts[0].units) if moe else 0
    keep = range(model.n_layers // 2 * units, model.n_layers // 2 * units + units)
    with timed_parts(model, parts, reducers, keep):
        m = measure(args, rec, model, hf, corpus, tmp, n_tokens, sync, rules.CALIBRATION_BATCHES,
                    extra={"forward, capture hooks doing nothing": idle_forward(idle)})
    idle_s = m.extra_s["forward, capture hooks doing nothing"]
    print(f"load after: {os.getloadavg()[0]:.2f}")
    breakdown(label, m, parts, idle_s, moe)
    print(f"recorder/forward, batch by batch: {m.recorder_s / m.baseline_s:.2f}; with the calibration passes: "
          f"{m.ratio:.2f}; idle-hooks forward/forward: {idle_s / m.baseline_s:.2f}")
    kept = [r for r in reducers[keep.start:keep.stop] if hasattr(r, "arrays")]  # the CPU kernel's reducers
    if kept:
        routed = [len(r.last[0]) for r in kept]
        print(f"\ntokens routed to each expert of layer {model.n_layers // 2} in the last batch: {routed}")
        order = np.argsort(routed, kind="stable")
        for i in dict.fromkeys([order[len(order) // 2], order[-1]]):  # a median expert, the busiest
            rows_compared(kept[i], args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="olmoe", help="an MoE architecture of tests/tiny_models.py")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-expert", type=int, default=512, help="each expert's neurons (intermediate size)")
    ap.add_argument("--d-shared", type=int, default=None,
                    help="Qwen2-MoE's shared expert's neurons (default: tests/tiny_models.py's)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512, help="model vocabulary size")
    ap.add_argument("--reducer", choices=["auto", "kernel", "torch"], default="auto")
    ap.add_argument("--compile", choices=["on", "off"], default="on", help="torch.compile the torch reducer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dense-arch", default="olmo2", help="the dense model of d_mlp = top_k x d_expert; none: skip it")
    ap.add_argument("--repeats", type=int, default=5, help="of the one-expert update comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.skip_write = True  # the loop only: the database is the same work as a dense model's (bench_recorder.py)

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
                              ).stdout.strip()

    changed = git("diff", "--name-only", "HEAD", "--", "recorder").split()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"commit: {git('rev-parse', '--short', 'HEAD')}"
          + (f" (recorder/ changed since: {', '.join(changed)})" if changed else "")
          + f"; recorder from {Path(rec.__file__).parent}")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    config = make_config(args.arch, args.vocab, d_model=args.d_model, d_mlp=args.d_expert, n_layers=args.layers,
                         n_heads=args.heads, max_positions=max(1024, args.length))
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hasattr(config, key):
            setattr(config, key, args.experts)
    config.num_experts_per_tok = args.top_k
    if args.d_shared is not None:
        if not hasattr(config, "shared_expert_intermediate_size"):
            raise SystemExit(f"--d-shared: {args.arch} has no shared_expert_intermediate_size (Qwen2-MoE has)")
        config.shared_expert_intermediate_size = args.d_shared
    run_one(args, args.arch, config, "MoE")
    if args.dense_arch != "none":
        dense = make_config(args.dense_arch, args.vocab, d_model=args.d_model, d_mlp=args.top_k * args.d_expert,
                            n_layers=args.layers, n_heads=args.heads, max_positions=max(1024, args.length))
        run_one(args, args.dense_arch, dense, "dense equivalent")
    print(f"\nuptime at the end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
