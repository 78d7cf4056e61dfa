"""One forward pass over several texts, each with its own reads and edits of gated neurons.

A Row is one text (BOS first) and what to do with it: which layers' x_gate
and x_in to keep (all neurons at one position, or some neurons at every
position), which neurons to edit in hook_post (the input of the MLP's down
projection), and whether the logits are needed. Rows are right-padded into
one batch: in a causal model a token never attends to a later one, so the
padding changes nothing at a row's own positions and needs no mask.

The hooks are added to the model once (Passes); between passes they do
nothing. Reads follow the recorder's rule: x_gate and x_in in float32, x_in
times the weight convention's sign.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from gluscope.probe.loaded import LoadedModel
from gluscope.recorder.tensor_reducer import quadrant_codes


@dataclass(frozen=True)
class Edit:
    """Change some neurons' hook_post in one layer: at every token but BOS, or only where a neuron is in
    `quadrant`. zero: 0; scale: times `amount`; clamp: `amount` (in the weight convention)."""

    layer: int
    neurons: torch.Tensor          # [k] int64
    mode: str
    quadrant: int | None = None
    amount: float = 0.0


@dataclass(frozen=True)
class Read:
    """Keep x_gate and x_in of a layer: of `neurons` at every position, or of every neuron at `position`."""

    layer: int
    neurons: torch.Tensor | None = None   # [k] int64; None: all
    position: int | None = None           # None: every position


@dataclass
class Row:
    ids: list[int]
    reads: list[Read] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    logits: bool = False


@dataclass
class RowResult:
    x_gate: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> float32 CPU, [T, k] or [N]
    x_in: dict[int, torch.Tensor] = field(default_factory=dict)     # (in the weight convention)
    edited: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [k] tokens edited per neuron
    logits: torch.Tensor | None = None                               # [T, vocab] float32 CPU


class Passes:
    """Runs batches of Rows through one loaded model; one pass at a time (the caller's thread holds the lock)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.lock = threading.Lock()
        self._rows: list[Row] | None = None
        self._results: list[RowResult] = []
        self._gate: torch.Tensor | None = None   # this layer's x_gate and x_in, while its MLP runs
        self._in: torch.Tensor | None = None
        self._stop_after = -1
        bridge = self.model.bridge
        for layer in range(self.model.n_layers):
            bridge.hook_dict[f"blocks.{layer}.mlp.hook_pre"].add_hook(self._on_gate, is_permanent=True)
            bridge.hook_dict[f"blocks.{layer}.mlp.hook_pre_linear"].add_hook(self._in_hook(layer), is_permanent=True)
            bridge.hook_dict[f"blocks.{layer}.mlp.hook_post"].add_hook(self._post_hook(layer), is_permanent=True)

    def run(self, rows: list[Row]) -> list[RowResult]:
        """Each row's reads, edit counts and logits, from one forward pass over all of them."""
        lengths = [len(r.ids) for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.loaded.bos, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r.ids)] = torch.as_tensor(r.ids, dtype=torch.long)
        wants_logits = any(r.logits for r in rows)
        with self.lock, torch.inference_mode(), self.model.native_attention():
            self._rows = rows
            self._results = [RowResult() for _ in rows]
            # Without logits the pass ends after the last layer any row reads (StopAtLayerException, caught
            # by the bridge's forward), skipping the rest of the model and the unembedding.
            self._stop_after = -1 if wants_logits else max((rd.layer for r in rows for rd in r.reads), default=0)
            try:
                out = self.model.bridge(ids.to(self.model.device), return_type="logits")
            finally:
                self._rows, self._gate, self._in = None, None, None
            results = self._results
        if wants_logits:
            for i, r in enumerate(rows):
                if r.logits:
                    results[i].logits = out[i, :lengths[i]].float().cpu()
        return results

    # --- hooks -----------------------------------------------------------------

    def _on_gate(self, x_gate: torch.Tensor, hook) -> None:
        if self._rows is not None:
            self._gate = x_gate

    def _in_hook(self, layer: int):
        def on_in(x_in: torch.Tensor, hook) -> None:
            if self._rows is None:
                return
            self._in = x_in
            sign = self.loaded.signs[layer]
            for i, (row, result) in enumerate(zip(self._rows, self._results)):
                for rd in row.reads:
                    if rd.layer != layer:
                        continue
                    g, x, s = self._gate[i, :len(row.ids)], x_in[i, :len(row.ids)], sign
                    if rd.position is not None:
                        g, x = g[rd.position], x[rd.position]
                    if rd.neurons is not None:
                        g, x, s = g[..., rd.neurons], x[..., rd.neurons], sign[rd.neurons]
                    result.x_gate[layer] = g.float().cpu()
                    result.x_in[layer] = (x.float() * s).cpu()
            if layer == self._stop_after:
                raise StopAtLayerException(x_in)
        return on_in

    def _post_hook(self, layer: int):
        def on_post(post: torch.Tensor, hook) -> torch.Tensor | None:
            if self._rows is None or not any(e.layer == layer for r in self._rows for e in r.edits):
                return None
            post = post.clone()
            sign = self.loaded.signs[layer]
            for i, (row, result) in enumerate(zip(self._rows, self._results)):
                n = len(row.ids)
                for e in row.edits:
                    if e.layer != layer:
                        continue
                    cols = e.neurons.to(post.device)
                    h = post[i, 1:n][:, cols]
                    s = sign[cols].to(h.dtype)
                    if e.quadrant is None:
                        where = torch.ones_like(h, dtype=torch.bool)
                    else:
                        x_in = self._in[i, 1:n][:, cols] * s
                        where = quadrant_codes(self._gate[i, 1:n][:, cols], x_in) == e.quadrant
                    if e.mode == "zero":
                        new = torch.zeros_like(h)
                    elif e.mode == "scale":
                        new = h * e.amount
                    else:  # clamp: amount is hook_post in the convention; the model's is sign times that
                        new = (e.amount * s).expand_as(h)
                    post[i, 1:n, cols] = torch.where(where, new, h)
                    result.edited[layer] = result.edited.get(layer, 0) + where.sum(0).cpu()
            return post
        return on_post
