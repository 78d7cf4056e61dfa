"""The recording: the weights first, then the corpus batch by batch through one reducer per layer, then the file.

Each part reads alone: `_hooks` (what the forward pass hands a reducer),
`_run` (the loop over batches) and `_write` (finishing every layer into the
database). The reducers themselves are in reducer.py, reduce.py and
reduce_cpu.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException

import gluscope
from gluscope.recorder.corpus import Corpus
from gluscope.recorder import rules
from gluscope.recorder.model import GatedModel
from gluscope.recorder.reduce import Calibration, enabled_distributions
from gluscope.recorder.reducer import Batch, LayerReducer, LayerSetup, choose_reducer, make_reducers
from gluscope.recorder.vocab import vocabulary
from gluscope.recorder.weights import LayerWeights, layer_weights
from gluscope.recorder.writer import DatabaseWriter, LayerResult
from gluscope.schema import SCHEMA_VERSION

__all__ = ["record", "choose_reducer"]

log = logging.getLogger("gluscope.record")

COMPILE_AUTO_TOKENS = 1_000_000


def record(model: GatedModel, corpus: Corpus, out: Path, *, dataset: str, batch_size: int = 8, k: int = 16,
           window_before: int = 24, window_after: int = 2, refactor_glu: bool = True, compile: str = "auto",
           reducer: str = "auto", overwrite: bool = False, progress: bool = True,
           shard: tuple[int, int] | None = None, sample_seed: int = 0,
           calibration_batches: int = rules.CALIBRATION_BATCHES) -> Path:
    """Record every neuron of every layer over `corpus` into the database `out`; return its path.

    shard: (index, count) records only that shard's batches (see shard_batches), with
    the texts' global ids; `gluscope merge` puts the shards together.

    reducer: "kernel" folds each batch with the C++ pass of reduce_cpu.py (CPU
    only), "torch" with reduce.py's tensor code (compiled per `compile`);
    "auto" takes the kernel on the CPU where it builds.

    sample_seed seeds the hash that picks the sampled examples; the intervals of |hook_post| they are drawn
    from are calibrated on the whole run's first `calibration_batches` batches (rules.interval_bounds), so
    every shard computes the same bounds.
    """
    lengths = corpus.lengths
    batches = shard_batches(lengths, batch_size, shard)
    mine = np.sort(np.concatenate(batches)) if batches else np.zeros(0, np.int64)
    n_counted = int((lengths[mine] - 1).sum())
    weights = layer_weights(model, refactor_glu, progress)
    kind = choose_reducer(model.device, reducer)
    # Compiling costs 20-60 s once; it pays on long runs.
    compiled = compile == "on" or (compile == "auto" and n_counted >= COMPILE_AUTO_TOKENS)
    calibration = _batches(lengths, batch_size)[:calibration_batches]
    if "calibration" not in enabled_distributions():  # the benchmark's measurement without it
        calibration = []
    bounds = _calibrate(model, corpus, calibration, weights, progress)
    setups = [LayerSetup(k=k, before=window_before, after=window_after, sign=w.sign, act_fn=model.act_fn,
                         text_lengths=lengths, layer=layer, seed=sample_seed, bounds=bounds[layer])
              for layer, w in enumerate(weights)]
    reducers = make_reducers(kind, setups, compiled)

    started = time.perf_counter()
    _run(model, corpus, batches, reducers, progress)
    elapsed = time.perf_counter() - started
    log.info("recorded %d tokens in %.1f s (%.0f tokens/s, %s reduction)", n_counted, elapsed,
             n_counted / max(elapsed, 1e-9), kind)

    tokens_text, tokens_bytes = vocabulary(model.tokenizer, model.vocab_size)
    meta = _metadata(model, corpus, dataset, vocab_size=len(tokens_text), texts=mine, batch_size=batch_size,
                     shard=shard, k=k, window_before=window_before, window_after=window_after,
                     refactor_glu=refactor_glu, sample_seed=sample_seed, calibration_batches=len(calibration))
    with DatabaseWriter(out, overwrite=overwrite) as writer:
        writer.write_metadata(meta)
        writer.write_histogram_bins()
        writer.write_vocab(tokens_text, tokens_bytes)
        writer.write_texts(corpus.source_index[mine], [corpus.token_ids[i] for i in mine], text_ids=mine,
                           sources=None if corpus.sources is None else [corpus.sources[i] for i in mine])
        _write_layers(writer, reducers, weights, progress)
    return Path(out)


def _calibrate(model: GatedModel, corpus: Corpus, batches: list[np.ndarray], weights: list[LayerWeights],
               progress: bool) -> list[np.ndarray | None]:
    """Per layer, the interval bounds [n, 4, 3] from a pass over `batches` (None: the defaults, no batches)."""
    if not batches:
        return [None] * len(weights)
    calibrations = [Calibration(w.sign, model.act_fn) for w in weights]
    log.info("calibrating the intervals of |hook_post| on %d batches", len(batches))
    _run(model, corpus, batches, calibrations, progress, desc="calibrating")
    return [c.bounds() for c in calibrations]


def _hooks(reducers: list[LayerReducer], current: dict) -> list[tuple[str, Callable]]:
    """Per layer, hook_pre keeps x_gate until hook_pre_linear of the same MLP hands both to the layer's reducer.

    After the last layer's x_in the pass ends: the rest of that MLP, the final
    norm and the [B, T, vocab] logits are not needed. The bridge's own
    stop_at_layer=k stops only at block k's input, so stop_at_layer=n_layers
    would run all of that; raising its StopAtLayerException here ends the
    pass the same way, and run_with_hooks returns normally.
    """
    last = len(reducers) - 1

    def on_gate(x_gate: torch.Tensor, hook) -> None:
        current["x_gate"] = x_gate

    def on_in_of(layer: int) -> Callable:
        def on_in(x_in: torch.Tensor, hook) -> None:
            reducers[layer].update(current.pop("x_gate"), x_in, current["batch"])
            if layer == last:
                raise StopAtLayerException(x_in)
        return on_in

    hooks = []
    for layer in range(len(reducers)):
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


def _progress(total_tokens: int, enabled: bool, desc: str = "recording"):
    from tqdm.auto import tqdm
    return tqdm(total=total_tokens, unit="tok", unit_scale=True, disable=not enabled, smoothing=0.05,
                desc=desc, dynamic_ncols=True)


def _run(model: GatedModel, corpus: Corpus, batches: list[np.ndarray], reducers: list[LayerReducer],
         progress: bool, desc: str = "recording") -> None:
    """Every text of `batches` through the model once, right-padded, each layer's activations to its reducer."""
    current: dict = {}  # shared by the hooks of one forward pass
    hooks = _hooks(reducers, current)
    lengths = corpus.lengths
    pad_id = int(corpus.token_ids[0][0])
    bar = _progress(sum(int((lengths[text_ids] - 1).sum()) for text_ids in batches), progress, desc)
    with torch.inference_mode(), model.native_attention():
        for text_ids in batches:
            batch_lengths = lengths[text_ids]
            tokens = np.full((len(text_ids), int(batch_lengths.max())), pad_id, dtype=np.int64)
            for row, i in enumerate(text_ids):
                tokens[row, :batch_lengths[row]] = corpus.token_ids[i]
            current["batch"] = Batch.of(batch_lengths, text_ids, model.device)
            # Right padding needs no attention mask in a causal model: real
            # tokens never attend to the pads after them.
            model.bridge.run_with_hooks(torch.from_numpy(tokens).to(model.device), return_type=None,
                                        fwd_hooks=hooks)
            bar.update(int((batch_lengths - 1).sum()))
    bar.close()


def _write_layers(writer: DatabaseWriter, reducers: list[LayerReducer], weights: list[LayerWeights],
                  progress: bool = False) -> None:
    from tqdm.auto import tqdm

    for layer, w in tqdm(list(enumerate(weights)), desc="writing", unit="layer", disable=not progress,
                         dynamic_ncols=True):
        writer.write_layer(layer, LayerResult(**vars(reducers[layer].finish()), **w.result_fields()))
        reducers[layer] = None  # free its memory before the next layer's finishing copies
    reducers.clear()


def _metadata(model: GatedModel, corpus: Corpus, dataset: str, *, vocab_size: int, texts: np.ndarray,
              batch_size: int, shard: tuple[int, int] | None, k: int, window_before: int, window_after: int,
              refactor_glu: bool, sample_seed: int, calibration_batches: int) -> dict:
    lengths = corpus.lengths
    return {
        "schema_version": SCHEMA_VERSION,
        "tool_version": gluscope.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
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
