"""The recording: the weights first, then the corpus batch by batch through one reducer per layer, then the file.

Each part reads alone: `_hooks` (what the forward pass hands a reducer),
`_run` (the loop over batches), `_write_layers` (finishing every layer's
reducer into the database) and `_write_finding` (the tables that find
neurons, written last). The reducers themselves are in reducer_interface.py,
tensor_reducer.py and kernel_reducer.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException

import gluscope
from gluscope.errors import UserError
from gluscope.recorder.checkpoint import (Checkpoint, CheckpointSchedule, checkpoint_path, describe_run,
                                          difference, load_checkpoint, save_checkpoint, weights_fingerprint)
from gluscope.recorder.corpus import Corpus, tokenizer_fingerprint
from gluscope.recorder import rules
from gluscope.recorder.expert_capture import expert_hooks
from gluscope.recorder.experts import Unit
from gluscope.recorder.model import GatedModel
from gluscope.recorder.parts import Selection
from gluscope.recorder.routing import RouterStats
from gluscope.recorder.tensor_reducer import Calibration
from gluscope.recorder.reducer_interface import Batch, LayerReducer, LayerSetup, choose_reducer, make_reducers
from gluscope.recorder.related import RelatedNeurons, related_neurons
from gluscope.recorder.vocab import vocabulary
from gluscope.recorder.token_tops import TokenNeurons
from gluscope.recorder.weights import LayerWeights, layer_weights
from gluscope.recorder.writer import DatabaseWriter, LayerResult
from gluscope.schema import SCHEMA_VERSION

__all__ = ["record", "choose_reducer"]

log = logging.getLogger("gluscope.record")

COMPILE_AUTO_TOKENS = 1_000_000


def record(model: GatedModel, corpus: Corpus, out: Path, *, dataset: str, batch_size: int = 8, k: int = 16,
           window_before: int = 24, window_after: int = 2, refactor_glu: bool = True, compile: str = "auto",
           reducer: str = "auto", overwrite: bool = False, progress: bool = True,
           shard: tuple[int, int] | None = None, checkpoint_every: float | None = None,
           resume: bool = False, sample_seed: int = 0,
           calibration_batches: int = rules.CALIBRATION_BATCHES, selection: Selection = Selection()) -> Path:
    """Record every neuron of every layer over `corpus` into the database `out`; return its path.

    shard: (index, count) records only that shard's batches (see shard_batches), with
    the texts' global ids; `gluscope merge` puts the shards together.

    checkpoint_every: minutes between checkpoints beside `out` (checkpoint.py); 0: none;
    None: CheckpointSchedule's default. resume: go on from that checkpoint, which must
    describe this very run. The checkpoint is removed once `out` is complete.

    reducer: "kernel" folds each batch with the C++ pass of kernel_reducer.py (CPU
    only), "torch" with tensor_reducer.py's tensor code (compiled per `compile`);
    "auto" takes the kernel on the CPU where it builds.

    selection: the layers and routed experts this part records (parts.py); `gluscope merge` joins the parts.

    sample_seed seeds the hash that picks the sampled examples; the intervals of |hook_post| they are drawn
    from are calibrated on the whole run's first `calibration_batches` batches (rules.interval_bounds), so
    every shard computes the same bounds.
    """
    if refactor_glu and not model.weight_convention_applies:
        log.info("raw weights: the weight convention cannot apply to %s, whose experts add 1 to a clamped x_in",
                 model.architecture)
        refactor_glu = False
    lengths = corpus.lengths
    batches = shard_batches(lengths, batch_size, shard)
    mine = np.sort(np.concatenate(batches)) if batches else np.zeros(0, np.int64)
    n_counted = int((lengths[mine] - 1).sum())
    kind = choose_reducer(model.device, reducer)
    # Compiling costs a fixed time once (see docs/performance.md); it pays on long runs.
    compiled = compile == "on" or (compile == "auto" and n_counted >= COMPILE_AUTO_TOKENS)
    calibration = _batches(lengths, batch_size)[:calibration_batches]
    tokens_text, tokens_bytes = vocabulary(model.tokenizer, model.vocab_size)
    meta = _metadata(model, corpus, dataset, vocab_size=len(tokens_text), texts=mine, batch_size=batch_size,
                     shard=shard, k=k, window_before=window_before, window_after=window_after,
                     refactor_glu=refactor_glu, sample_seed=sample_seed, calibration_batches=len(calibration))
    meta.update(selection.metadata())
    run = describe_run(meta, reducer=kind, compiled=compiled, device=model.device.type,
                       shard=f"{shard[0]}/{shard[1]}" if shard else None, n_batches=len(batches))
    saved = checkpoint_path(out)
    # Checked before the weights' tokens, which take a minute for a large vocabulary.
    checkpoint = _checkpoint_of(saved, run) if resume else None

    t = time.perf_counter()
    units = model_units(model, selection)
    kept = _kept_rows(model, units)
    token_neurons = TokenNeurons(model.token_count(), device=model.device)
    weights = layer_weights(model, refactor_glu, progress, token_neurons, kept)
    log.info("weight tokens and token neurons in %.1f s", time.perf_counter() - t)
    t = time.perf_counter()
    related = related_neurons(model, [w.sign for w in weights], progress=progress,
                              kept=None if selection.whole else kept)
    log.info("related neurons in %.1f s", time.perf_counter() - t)
    # Recomputed on a resume: the same batches give the same bounds.
    bounds = _calibrate(model, corpus, calibration, weights, units, progress)
    setups = [LayerSetup(k=k, before=window_before, after=window_after, sign=weights[layer].sign[_span(unit)],
                         act_fn=model.act_fn, text_lengths=lengths, layer=layer, seed=sample_seed, bounds=bounds[i],
                         first_neuron=unit.first_neuron)
              for i, (layer, unit) in enumerate(units)]
    reducers = make_reducers(kind, setups, compiled)
    routers = ([RouterStats(layout, len(tokens_text), k, model.device)
                if layout.n_experts and selection.has_layer(layer) else None
                for layer, layout in enumerate(model.layouts)] if model.layouts else [])
    # What a checkpoint holds, in this order: every unit's reducer, then every MoE layer's router statistics.
    stateful = [*reducers, *(r for r in routers if r is not None)]
    first = _resume(checkpoint, stateful) if checkpoint else 0
    schedule = CheckpointSchedule(checkpoint_every, sum(int((lengths[b] - 1).sum()) for b in batches[first:]))

    def after_batch(done: int, tokens: int) -> None:
        if done < len(batches) and schedule.due(tokens):
            began = time.perf_counter()
            size = save_checkpoint(saved, run, done, stateful)
            schedule.written()
            log.info("checkpoint after batch %d of %d: %.1f MB in %.2f s", done, len(batches), size / 1e6,
                     time.perf_counter() - began)

    started = time.perf_counter()
    _run(model, corpus, batches, reducers, progress, first, after_batch, routers=routers, units=units)
    elapsed = time.perf_counter() - started
    log.info("recorded %d tokens in %.1f s (%.0f tokens/s, %s reduction)", n_counted, elapsed,
             n_counted / max(elapsed, 1e-9), kind)

    meta["created_at"] = _now()
    with DatabaseWriter(out, overwrite=overwrite) as writer:
        writer.write_metadata(meta)
        writer.write_histogram_bins()
        writer.write_vocab(tokens_text, tokens_bytes)
        writer.write_texts(corpus.source_index[mine], [corpus.token_ids[i] for i in mine], text_ids=mine,
                           sources=None if corpus.sources is None else [corpus.sources[i] for i in mine])
        _write_layers(writer, reducers, weights, units, progress)
        _write_routing(writer, model, routers, selection)
        _write_finding(writer, token_neurons, related, model.d_mlp)
    saved.unlink(missing_ok=True)
    return Path(out)


def _checkpoint_of(saved: Path, run: dict) -> Checkpoint:
    """The checkpoint `saved`, once it is known to be of this very run (else one line saying how it differs)."""
    checkpoint = load_checkpoint(saved)
    differs = difference(checkpoint.run, run)
    if differs:
        checkpoint.close()
        raise UserError(f"--resume: {differs}")
    return checkpoint


def _resume(checkpoint: Checkpoint, stateful: list) -> int:
    """Load the checkpoint into the reducers (and routers); return the first batch left to do."""
    try:
        for layer, reducer in enumerate(stateful):
            try:
                reducer.load_state(checkpoint.layer_state(layer))
            except (ValueError, KeyError) as e:
                raise UserError(f"--resume: checkpoint {checkpoint.path} does not fit this run "
                                f"(part {layer}: {e})") from None
    finally:
        checkpoint.close()
    log.info("resuming from %s: %d of %d batches were done", checkpoint.path, checkpoint.next_batch,
             checkpoint.run["n_batches"])
    return checkpoint.next_batch


def model_units(model: GatedModel, selection: Selection = Selection()) -> list[tuple[int, Unit]]:
    """Every (layer, unit) the recording has one reducer for: each layer's MLP, or each expert of an MoE model;
    those of `selection` only."""
    if model.layouts is None:
        return [(layer, Unit(None, False, 0, model.d_mlp)) for layer in range(model.n_layers)
                if selection.has_layer(layer)]
    return [(layer, unit) for layer, layout in enumerate(model.layouts) for unit in layout.units
            if selection.has(layer, unit, layout.n_experts)]


def _kept_rows(model: GatedModel, units: list[tuple[int, Unit]]) -> list[np.ndarray]:
    """Per layer, [n] bool: the neurons this run records."""
    kept = [np.zeros(model.layer_width(layer), bool) for layer in range(model.n_layers)]
    for layer, unit in units:
        kept[layer][_span(unit)] = True
    return kept


def _span(unit: Unit) -> slice:
    return slice(unit.first_neuron, unit.first_neuron + unit.n_neurons)


def _calibrate(model: GatedModel, corpus: Corpus, batches: list[np.ndarray], weights: list[LayerWeights],
               units: list[tuple[int, Unit]], progress: bool) -> list[np.ndarray | None]:
    """Per unit, the interval bounds [n, 4, 3] from a pass over `batches` (None: the defaults, no batches)."""
    if not batches:
        return [None] * len(units)
    calibrations = [Calibration(weights[layer].sign[_span(unit)], model.act_fn) for layer, unit in units]
    log.info("calibrating the intervals of |hook_post| on %d batches", len(batches))
    _run(model, corpus, batches, calibrations, progress, desc="calibrating", units=units)
    return [c.bounds() for c in calibrations]


def _hooks(reducers: dict[int, LayerReducer], current: dict) -> list[tuple[str, Callable]]:
    """Per layer, hook_pre keeps x_gate until hook_pre_linear of the same MLP hands both to the layer's reducer.

    After the last layer's x_in the pass ends: the rest of that MLP, the final
    norm and the [B, T, vocab] logits are not needed. The bridge's own
    stop_at_layer=k stops only at block k's input, so stop_at_layer=n_layers
    would run all of that; raising its StopAtLayerException here ends the
    pass the same way, and run_with_hooks returns normally.
    """
    last = max(reducers)

    def on_gate(x_gate: torch.Tensor, hook) -> None:
        current["x_gate"] = x_gate

    def on_in_of(layer: int) -> Callable:
        def on_in(x_in: torch.Tensor, hook) -> None:
            reducers[layer].update(current.pop("x_gate"), x_in, current["batch"])
            if layer == last:
                raise StopAtLayerException(x_in)
        return on_in

    hooks = []
    for layer in reducers:
        hooks.append((f"blocks.{layer}.mlp.hook_pre", on_gate))
        hooks.append((f"blocks.{layer}.mlp.hook_pre_linear", on_in_of(layer)))
    return hooks


def _batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Texts of similar length together, longest first so memory peaks (and fails) early."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def shard_batches(lengths: np.ndarray, batch_size: int, shard: tuple[int, int] | None) -> list[np.ndarray]:
    """The batches shard (index, count) records: every count-th batch of the whole run's, from the index-th.

    Shards take whole batches, not texts, so every text runs in the same
    padded batch as in a single run: its activations are then bit for bit
    the single run's, and merged shards give the single run's examples.
    """
    batches = _batches(lengths, batch_size)
    if shard is None:
        return batches
    index, count = shard
    return batches[index::count]


def _progress(total_tokens: int, enabled: bool, initial: int = 0, desc: str = "recording"):
    from tqdm.auto import tqdm
    return tqdm(total=total_tokens, initial=initial, unit="tok", unit_scale=True, disable=not enabled,
                smoothing=0.05, desc=desc, dynamic_ncols=True)


def _run(model: GatedModel, corpus: Corpus, batches: list[np.ndarray], reducers: list[LayerReducer],
         progress: bool, first: int = 0, after_batch: Callable[[int, int], None] | None = None,
         desc: str = "recording", routers: list[RouterStats | None] | None = None,
         units: list[tuple[int, Unit]] | None = None) -> None:
    """Every text of batches[first:] through the model once, right-padded, each unit's activations to its reducer
    (and, with `routers`, each MoE layer's routing to its RouterStats).
    reducers[i] is units[i]'s (default: one per layer of a dense model).

    after_batch(batches done, tokens done since `first`) runs between batches, when every reducer holds whole batches.
    """
    current: dict = {}  # shared by the hooks of one forward pass
    units = units if units is not None else model_units(model)
    if model.layouts is None:
        hooks, capture = _hooks({layer: r for (layer, _), r in zip(units, reducers)}, current), contextlib.nullcontext()
    else:
        by_unit = {(layer, unit.first_neuron): r for (layer, unit), r in zip(units, reducers)}
        hooks, capture = [], expert_hooks(model.layouts, by_unit, current, routers)
    lengths = corpus.lengths
    pad_id = int(corpus.token_ids[0][0])
    counted = [int((lengths[text_ids] - 1).sum()) for text_ids in batches]
    done = 0
    # The bar as a context: an interrupt closes it before the one-line message, which then is the last line.
    with _progress(sum(counted), progress, initial=sum(counted[:first]), desc=desc) as bar, torch.inference_mode(), \
            model.native_attention(), capture:
        for b in range(first, len(batches)):
            text_ids = batches[b]
            batch_lengths = lengths[text_ids]
            tokens = np.full((len(text_ids), int(batch_lengths.max())), pad_id, dtype=np.int64)
            for row, i in enumerate(text_ids):
                tokens[row, :batch_lengths[row]] = corpus.token_ids[i]
            current["batch"] = Batch.of(batch_lengths, text_ids, model.device)
            current["tokens"] = torch.from_numpy(tokens).to(model.device)
            # Right padding needs no attention mask in a causal model: real
            # tokens never attend to the pads after them.
            model.bridge.run_with_hooks(current["tokens"], return_type=None, fwd_hooks=hooks)
            bar.update(counted[b])
            done += counted[b]
            if after_batch is not None:
                after_batch(b + 1, done)


def _write_layers(writer: DatabaseWriter, reducers: list[LayerReducer], weights: list[LayerWeights],
                  units: list[tuple[int, Unit]], progress: bool = False) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=len(units), desc="writing", unit="layer" if len(units) == len(weights) else "expert",
              disable=not progress, dynamic_ncols=True) as bar:
        for i, (layer, unit) in enumerate(units):
            writer.write_layer(layer, LayerResult(**vars(reducers[i].finish()), **weights[layer].result_fields(
                _span(unit))), first_neuron=unit.first_neuron)
            reducers[i] = None  # free its memory before the next unit's finishing copies
            bar.update()
    reducers.clear()


def _write_routing(writer: DatabaseWriter, model: GatedModel, routers: list[RouterStats | None],
                   selection: Selection = Selection()) -> None:
    """The `layers` table (the layers recorded), and every MoE layer's experts, their tokens and examples (by the
    layer's lead part), and the routed values of the experts recorded."""
    if model.layouts is None:
        writer.write_layers([(layer, model.d_mlp, 0, 0, None, None) for layer in range(model.n_layers)
                             if selection.has_layer(layer)])
        return
    rows = []
    for layer, (layout, router) in enumerate(zip(model.layouts, routers)):
        if not selection.has_layer(layer):
            continue
        imbalance = None
        if router is not None:
            result = router.result()
            routed = result.tokens[:layout.n_experts]
            imbalance = float(routed.max() / routed.mean()) if routed.sum() else None
            units = [(u.expert, u.shared, u.first_neuron, u.n_neurons) for u in layout.units]
            recorded = [selection.has(layer, u, layout.n_experts) for u in layout.units]
            writer.write_experts(layer, units, result, lead=selection.leads(layer), recorded=recorded)
        rows.append((layer, layout.n_neurons, layout.n_experts, layout.top_k, layout.router, imbalance))
    writer.write_layers(rows)


def _write_finding(writer: DatabaseWriter, token_neurons: TokenNeurons, related: RelatedNeurons, d_mlp: int) -> None:
    """The tables that find neurons: by token from the weights and from the examples, and related."""
    writer.write_token_neurons(*token_neurons.result(d_mlp))
    writer.write_related(related.other_layer, related.other_neuron, related.score)
    writer.write_example_tokens()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _metadata(model: GatedModel, corpus: Corpus, dataset: str, *, vocab_size: int, texts: np.ndarray,
              batch_size: int, shard: tuple[int, int] | None, k: int, window_before: int, window_after: int,
              refactor_glu: bool, sample_seed: int, calibration_batches: int) -> dict:
    lengths = corpus.lengths
    return {
        "schema_version": SCHEMA_VERSION,
        "tool_version": gluscope.__version__,
        "created_at": _now(),
        "model_name": model.name,
        "model_source": model.source or model.name,
        "model_revision": model.revision,
        "weights_file": model.gguf.file if model.gguf else None,
        "weights_sha256": model.gguf.sha256 if model.gguf else None,
        "quantization": model.gguf.quantization if model.gguf else None,
        "architecture": model.architecture,
        "act_fn": model.act_fn_name,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "d_mlp": model.d_mlp,
        "vocab_size": vocab_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "dataset": dataset,
        "text_column": corpus.info.get("text_column"),
        "max_length": int(corpus.info.get("max_length", int(lengths.max()))),
        "bos_token_id": int(corpus.token_ids[0][0]),
        "n_texts": len(texts),
        "n_tokens": int((lengths[texts] - 1).sum()),
        "batch_size": batch_size,
        "corpus_fingerprint": corpus.fingerprint(),
        "weights_fingerprint": weights_fingerprint(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(model.tokenizer),
        "shard_index": shard[0] if shard else None,
        "shard_count": shard[1] if shard else None,
        "k": k,
        "window_before": window_before,
        "window_after": window_after,
        "refactor_glu": refactor_glu,
        "weight_convention": (
            "refactor_glu: w_in and w_out of each neuron multiplied by sign(w_gate . w_in), so cos(w_gate, w_in) >= 0"
            if refactor_glu else "raw weights as published"
        ),
        "sample_seed": sample_seed,
        "n_random": rules.N_RANDOM,
        "n_per_interval": rules.N_PER_INTERVAL,
        "calibration_batches": calibration_batches,
    }
