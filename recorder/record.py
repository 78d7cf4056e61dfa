"""The recording loop: stream a corpus through a gated model and reduce every batch as it goes."""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import gluscope
from gluscope.errors import UserError
from gluscope.recorder.corpus import Corpus
from gluscope.recorder.model import GatedModel
from gluscope.recorder.reduce import LayerState, reduce_batch
from gluscope.recorder.vocab import vocabulary
from gluscope.recorder.weight_tokens import top_tokens
from gluscope.recorder.writer import DatabaseWriter, LayerResult
from gluscope.schema import SCHEMA_VERSION

log = logging.getLogger("gluscope.record")

COMPILE_AUTO_TOKENS = 1_000_000


class _StopForward(Exception):
    """Raised after the last layer's MLP: the final norm and unembedding are not needed."""


def weight_geometry(w_gate: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                    refactor_glu: bool) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Per neuron sign s (the paper's refactor_glu) and the cosines and norms after applying it.

    Rows are neurons. Multiplying w_in and w_out by s leaves the model's
    function unchanged and makes cos(w_gate, w_in) >= 0.
    """
    dot = (w_gate * w_in).sum(1)
    sign = torch.where(dot < 0, -1.0, 1.0) if refactor_glu else torch.ones_like(dot)
    w_in = w_in * sign[:, None]
    w_out = w_out * sign[:, None]
    norms = {name: w.norm(dim=1) for name, w in (("gate", w_gate), ("in", w_in), ("out", w_out))}

    def cos(a, b, na, nb):
        return (a * b).sum(1) / (norms[na] * norms[nb]).clamp_min(1e-30)

    geometry = {
        "cos_gate_in": cos(w_gate, w_in, "gate", "in"),
        "cos_gate_out": cos(w_gate, w_out, "gate", "out"),
        "cos_in_out": cos(w_in, w_out, "in", "out"),
        "norm_gate": norms["gate"], "norm_in": norms["in"], "norm_out": norms["out"],
    }
    return sign, {k: v.float().cpu().numpy() for k, v in geometry.items()}


WEIGHT_TOKENS = 10


def weight_tokens(w_gate: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, sign: torch.Tensor,
                  W_E: torch.Tensor, W_U: torch.Tensor, top: int = WEIGHT_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Top tokens of +-w_out.W_U, +-w_gate.W_E and +-w_in.W_E per neuron (kinds 0..5 of schema.sql).

    w_in and w_out are flipped by `sign` first, so the tables follow the
    recorded weight convention.
    """
    n = w_gate.shape[0]
    top = min(top, W_E.shape[0])
    ids = np.zeros((6, n, top), dtype=np.int32)
    scores = np.zeros((6, n, top), dtype=np.float32)
    w_in = w_in * sign[:, None]
    w_out = w_out * sign[:, None]
    for kind, weight, matrix in ((0, w_out, W_U), (2, w_gate, W_E.T), (4, w_in, W_E.T)):
        best_ids, best_scores = top_tokens(weight, matrix.contiguous(), top)
        ids[kind:kind + 2] = best_ids.cpu().numpy()
        scores[kind:kind + 2] = best_scores.float().cpu().numpy()
    return ids, scores


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


def _progress(total_tokens: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total_tokens, unit="tok", unit_scale=True, disable=not enabled, smoothing=0.05,
                desc="recording", dynamic_ncols=True)


def choose_reducer(device: torch.device, reducer: str) -> str:
    """"kernel" (the compiled C++ pass, CPU only) or "torch" (reduce.py's tensor code, any device)."""
    if reducer not in ("auto", "kernel", "torch"):
        raise UserError(f"--reducer {reducer!r} is not one of auto, kernel, torch")
    if reducer == "torch" or device.type != "cpu":
        if reducer == "kernel":
            raise UserError(f"--reducer kernel runs on the CPU only, not on {device}")
        return "torch"
    from gluscope.recorder.reduce_cpu import KernelUnavailable, kernel_available, load_kernel
    if reducer == "kernel":
        try:
            load_kernel()
        except (KernelUnavailable, OSError) as e:
            raise UserError(f"--reducer kernel: the CPU kernel cannot be built here ({e})") from None
        return "kernel"
    return "kernel" if kernel_available() else "torch"


def record(model: GatedModel, corpus: Corpus, out: Path, *, dataset: str, batch_size: int = 8, k: int = 16,
           window_before: int = 24, window_after: int = 2, refactor_glu: bool = True, compile: str = "auto",
           reducer: str = "auto", overwrite: bool = False, progress: bool = True,
           shard: tuple[int, int] | None = None) -> Path:
    """Record every neuron of every layer over `corpus` into the database `out`; return its path.

    shard: (index, count) records only that shard's batches (see shard_batches), with
    the texts' global ids; `gluscope merge` puts the shards together.

    reducer: "kernel" folds each batch with the C++ pass of reduce_cpu.py (CPU
    only), "torch" with reduce.py's tensor code (compiled per `compile`);
    "auto" takes the kernel on the CPU where it builds.
    """
    device = model.device
    n_layers, d_mlp = model.n_layers, model.d_mlp
    window = window_before + window_after + 1
    lengths = corpus.lengths
    batches = shard_batches(lengths, batch_size, shard)
    mine = np.sort(np.concatenate(batches)) if batches else np.zeros(0, np.int64)
    n_counted = int((lengths[mine] - 1).sum())

    signs, geometries, token_tables = [], [], []
    W_E, W_U = model.embeddings()
    for layer in range(n_layers):
        weights = model.mlp_weights(layer)
        sign, geometry = weight_geometry(*weights, refactor_glu)
        signs.append(sign.to(device))
        geometries.append(geometry)
        token_tables.append(weight_tokens(*weights, sign, W_E, W_U))
    del W_E, W_U

    act_fn = model.act_fn
    reducer = choose_reducer(device, reducer)
    batch: dict = {}  # shared by the hooks of one forward pass

    def on_gate(x: torch.Tensor, hook) -> None:
        batch["g"] = x

    if reducer == "kernel":
        from gluscope.recorder.reduce_cpu import CpuLayerState
        states = [CpuLayerState(k, d_mlp, window) for _ in range(n_layers)]
        act_buffer = torch.empty(0)

        def make_on_in(layer: int):
            def on_in(x: torch.Tensor, hook) -> None:
                nonlocal act_buffer
                g = batch.pop("g").float()
                if act_buffer.numel() < g.numel():
                    act_buffer = torch.empty(g.numel())
                # A reused buffer: a fresh [B, T, d_mlp] tensor per layer costs page faults.
                act = act_fn(g, out=act_buffer[:g.numel()].view(g.shape))
                states[layer].update(g, x, act, signs[layer], batch["lengths_np"], batch["text_ids_np"],
                                     window_before, window_after)
                if layer == n_layers - 1:
                    raise _StopForward
            return on_in
    else:
        reduce_fn: Callable = reduce_batch
        if compile == "on" or (compile == "auto" and n_counted >= COMPILE_AUTO_TOKENS):
            # One fused kernel instead of ~70 passes over [B, T, d_mlp]; dynamic
            # shapes because length-bucketed batches differ in T.
            reduce_fn = torch.compile(reduce_batch, dynamic=True)
        states = [LayerState.empty(k, d_mlp, window, device) for _ in range(n_layers)]

        def make_on_in(layer: int):
            def on_in(x: torch.Tensor, hook) -> None:
                g = batch.pop("g").float()
                u = x.float() * signs[layer]
                reduced = reduce_fn(g, u, batch["valid"], act_fn)
                states[layer].update(g, u, batch["lengths"], batch["text_ids"], reduced, window_before,
                                     window_after)
                if layer == n_layers - 1:
                    raise _StopForward
            return on_in

    hooks = []
    for layer in range(n_layers):
        hooks.append((f"blocks.{layer}.mlp.hook_pre", on_gate))
        hooks.append((f"blocks.{layer}.mlp.hook_pre_linear", make_on_in(layer)))

    pad_id = int(corpus.token_ids[0][0])
    bar = _progress(n_counted, progress)
    started = time.perf_counter()
    with torch.inference_mode(), model.native_attention():
        for idx in batches:
            lens = lengths[idx]
            T = int(lens.max())
            tokens = np.full((len(idx), T), pad_id, dtype=np.int64)
            for row, i in enumerate(idx):
                tokens[row, :lens[row]] = corpus.token_ids[i]
            tok = torch.from_numpy(tokens).to(device)
            len_t = torch.from_numpy(lens).to(device)
            positions = torch.arange(T, device=device)
            # Right padding needs no attention mask in a causal model: real
            # tokens never attend to the pads after them.
            batch.update(
                valid=(positions >= 1) & (positions < len_t[:, None]),
                lengths=len_t,
                text_ids=torch.from_numpy(idx.astype(np.int64)).to(device),
                lengths_np=lens.astype(np.int64),
                text_ids_np=idx.astype(np.int64),
            )
            try:
                model.bridge.run_with_hooks(tok, return_type=None, fwd_hooks=hooks)
            except _StopForward:
                pass
            bar.update(int((lens - 1).sum()))
    bar.close()
    elapsed = time.perf_counter() - started
    log.info("recorded %d tokens in %.1f s (%.0f tokens/s, %s reduction)", n_counted, elapsed,
             n_counted / max(elapsed, 1e-9), reducer)

    tokens_text, tokens_bytes = vocabulary(model.tokenizer, model.vocab_size)
    meta = {
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
        "n_layers": n_layers,
        "d_model": model.d_model,
        "d_mlp": d_mlp,
        "vocab_size": len(tokens_text),
        "dtype": str(model.dtype).removeprefix("torch."),
        "dataset": dataset,
        "text_column": corpus.info.get("text_column"),
        "max_length": int(corpus.info.get("max_length", int(lengths.max()))),
        "bos_token_id": int(corpus.token_ids[0][0]),
        "n_texts": len(mine),
        "n_tokens": n_counted,
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
    }
    with DatabaseWriter(out, overwrite=overwrite) as writer:
        writer.write_metadata(meta)
        writer.write_vocab(tokens_text, tokens_bytes)
        writer.write_texts(corpus.source_index[mine], [corpus.token_ids[i] for i in mine], text_ids=mine,
                           sources=None if corpus.sources is None else [corpus.sources[i] for i in mine])
        for layer in range(n_layers):
            writer.write_layer(layer, _layer_result(states[layer], signs[layer], geometries[layer], token_tables[layer]))
            states[layer] = None  # free device memory as we go
    return Path(out)


def _layer_result(state, sign: torch.Tensor, geometry: dict[str, np.ndarray],
                  tokens: tuple[np.ndarray, np.ndarray]) -> LayerResult:
    """A finished LayerState or CpuLayerState as the writer's arrays."""
    counts, vmin, vmax, vsum = state.totals()
    n = counts.shape[1]
    ex = state.examples()
    per_list_count = np.repeat(counts, 4, axis=0).reshape(16, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = vsum / per_list_count
    empty = per_list_count == 0
    # astype keeps the memory order (order="K"), so the writer's neuron-major
    # view of these arrays needs no copy.
    return LayerResult(
        counts=counts,
        value_min=np.where(empty, np.nan, vmin).reshape(4, 4, n).astype(np.float32),
        value_max=np.where(empty, np.nan, vmax).reshape(4, 4, n).astype(np.float32),
        value_mean=np.where(empty, np.nan, mean).reshape(4, 4, n),
        example_value=ex["value"],
        example_text=ex["text"],
        example_pos=ex["pos"].astype(np.int16),
        window_start=ex["win_start"].astype(np.int16),
        window_len=ex["win_len"].astype(np.int16),
        window_gate=ex["win_gate"],
        window_in=ex["win_in"],
        geometry=geometry,
        flipped=(sign < 0).cpu().numpy(),
        token_ids=tokens[0],
        token_scores=tokens[1],
    )
