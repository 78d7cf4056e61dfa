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
import torch.nn.functional as F
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from gluscope.probe.loaded import LoadedModel
from gluscope.recorder.experts import routed_activations
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
    """Runs batches of Rows through one loaded model; one pass at a time (the caller's thread holds the lock).

    A dense model is read at the bridge's MLP hooks. A mixture-of-experts model is read as the recorder reads
    it (recorder/expert_capture.py): at its experts module's call and its shared or dense MLPs' inputs, each
    layer's values assembled in the layer's neuron numbering with NaN at tokens routed to other experts; an
    edit of an expert neuron adds to that module's output what the changed hook_post writes (times its router
    weight), which is what editing the input of its down projection would do.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.lock = threading.Lock()
        self._rows: list[Row] | None = None
        self._results: list[RowResult] = []
        self._gate: torch.Tensor | None = None   # this layer's x_gate and x_in, while its MLP runs
        self._in: torch.Tensor | None = None
        self._stop_after = -1
        self._width = 0  # the padded length of this pass's rows
        if self.model.layouts is not None:
            self._experts = ExpertPasses(self)
            return
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
            self._width = width
            if self.model.layouts is not None:
                self._experts.begin()
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

    # --- what every layer does with its values, whichever way they were read ----

    def read(self, layer: int, x_gate: torch.Tensor, x_in: torch.Tensor) -> None:
        """Keep what the rows read of a layer: x_gate and x_in [B, T, n] as the model computes them."""
        sign = self.loaded.signs[layer]
        width = self.model.d_mlp
        for i, (row, result) in enumerate(zip(self._rows, self._results)):
            for rd in row.reads:
                if rd.layer != layer:
                    continue
                g, x, s = x_gate[i, :len(row.ids)], x_in[i, :len(row.ids)], sign
                if rd.position is not None:
                    g, x = g[rd.position], x[rd.position]
                if rd.neurons is not None:
                    g, x, s = g[..., rd.neurons], x[..., rd.neurons], sign[rd.neurons]
                g, x = g.float().cpu(), (x.float() * s).cpu()
                if rd.neurons is None and g.shape[-1] < width:  # a narrower layer: NaN, as a neuron never seen
                    pad = (0, width - g.shape[-1])
                    g, x = F.pad(g, pad, value=float("nan")), F.pad(x, pad, value=float("nan"))
                result.x_gate[layer] = g
                result.x_in[layer] = x
        if layer == self._stop_after:
            raise StopAtLayerException(x_in)

    def edited_post(self, layer: int, post: torch.Tensor, x_gate: torch.Tensor, x_in: torch.Tensor,
                    columns: torch.Tensor | None = None) -> torch.Tensor | None:
        """hook_post [B, T, n] with the rows' edits of this layer applied, or None when nothing is edited.

        columns: the layer's neuron numbers of post's last axis (an MoE unit's), default all of them. A NaN
        value (a token routed elsewhere) is never edited.
        """
        rows = self._rows
        if rows is None or not any(e.layer == layer for r in rows for e in r.edits):
            return None
        post = post.clone()
        sign = self.loaded.signs[layer]
        for i, (row, result) in enumerate(zip(rows, self._results)):
            n = len(row.ids)
            for e in row.edits:
                if e.layer != layer:
                    continue
                if columns is None:
                    cols, picked = e.neurons.to(post.device), slice(None)
                else:
                    at = {int(c): j for j, c in enumerate(columns.tolist())}
                    picked = torch.tensor([k for k, c in enumerate(e.neurons.tolist()) if c in at], dtype=torch.long)
                    if not len(picked):
                        continue
                    cols = torch.tensor([at[int(e.neurons[k])] for k in picked.tolist()], device=post.device)
                h = post[i, 1:n][:, cols]
                s = sign[e.neurons[picked] if columns is not None else e.neurons].to(post.device, h.dtype)
                where = ~torch.isnan(h)
                if e.quadrant is not None:
                    where &= quadrant_codes(x_gate[i, 1:n][:, cols], x_in[i, 1:n][:, cols] * s) == e.quadrant
                if e.mode == "zero":
                    new = torch.zeros_like(h)
                elif e.mode == "scale":
                    new = h * e.amount
                else:  # clamp: amount is hook_post in the convention; the model's is sign times that
                    new = (e.amount * s).expand_as(h)
                post[i, 1:n, cols] = torch.where(where, new, h)
                counted = result.edited.get(layer, torch.zeros(len(e.neurons), dtype=torch.long))
                counted[picked] += where.sum(0).cpu()
                result.edited[layer] = counted
        return post

    # --- the bridge's hooks (dense models) --------------------------------------

    def _on_gate(self, x_gate: torch.Tensor, hook) -> None:
        if self._rows is not None:
            self._gate = x_gate

    def _in_hook(self, layer: int):
        def on_in(x_in: torch.Tensor, hook) -> None:
            if self._rows is None:
                return
            self._in = x_in
            self.read(layer, self._gate, x_in)
        return on_in

    def _post_hook(self, layer: int):
        def on_post(post: torch.Tensor, hook) -> torch.Tensor | None:
            return self.edited_post(layer, post, self._gate, self._in)
        return on_post


class ExpertPasses:
    """The hooks of a mixture-of-experts model, on the Hugging Face modules themselves (see Passes)."""

    def __init__(self, passes: Passes) -> None:
        self.passes = passes
        self.layouts = passes.model.layouts
        self.act_fn = passes.model.act_fn
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # layer -> x_gate, x_in, weight
        self.calls: dict[int, int] = {}
        for layer, layout in enumerate(self.layouts):
            if layout.experts is not None:
                layout.experts.register_forward_pre_hook(self._on_experts_input(layer), with_kwargs=True)
                layout.experts.register_forward_hook(self._on_experts_output(layer))
            for i, mlp in enumerate(layout.mlps):
                mlp.register_forward_pre_hook(self._on_mlp_input(layer, i), with_kwargs=True)
                mlp.register_forward_hook(self._on_mlp_output(layer, i))

    def _layer(self, layer: int, device: torch.device, B: int, T: int) -> tuple[torch.Tensor, ...]:
        if layer not in self.values:
            n = self.layouts[layer].n_neurons
            nan = torch.full((B * T, n), float("nan"), device=device)
            self.values[layer] = (nan, nan.clone(), torch.ones((B * T, n), device=device))
        return self.values[layer]

    def _captured(self, layer: int) -> None:
        """A unit of the layer is read; once all are, the rows read the layer."""
        layout = self.layouts[layer]
        self.calls[layer] = self.calls.get(layer, 0) + 1
        if self.calls[layer] == int(layout.experts is not None) + len(layout.mlps):
            B, T = len(self.passes._rows), self.passes._width
            g, x, _ = self.values[layer]
            self.passes.read(layer, g.view(B, T, -1), x.view(B, T, -1))

    def _on_experts_input(self, layer: int):
        layout = self.layouts[layer]

        def hook(module, args, kwargs) -> None:
            if self.passes._rows is None:
                return
            params = list(args) + [kwargs[name] for name in ("hidden_states", "top_k_index", "top_k_weights",
                                                               "router_indices", "routing_weights") if name in kwargs]
            hidden, index, weights = params[:3]
            B, T = self._shape(hidden)
            g, x, w = self._layer(layer, hidden.device, B, T)
            for unit, (rows, slots, x_gate, x_in) in zip(layout.routed, routed_activations(
                    hidden, index, layout)):
                span = slice(unit.first_neuron, unit.first_neuron + unit.n_neurons)
                g[rows, span] = x_gate.float()
                x[rows, span] = x_in.float()
                w[rows, span] = weights[rows, slots].float().unsqueeze(1)
            self._captured(layer)
        return hook

    def _on_experts_output(self, layer: int):
        layout = self.layouts[layer]

        def hook(module, args, output: torch.Tensor) -> torch.Tensor | None:
            if self.passes._rows is None:
                return None
            g, x, w = self.values[layer]
            routed = slice(0, sum(u.n_neurons for u in layout.routed))
            return self._edited(layer, output, g[:, routed], x[:, routed], w[:, routed],
                                torch.arange(routed.stop), layout.weights_of(layout.routed))
        return hook

    def _on_mlp_input(self, layer: int, i: int):
        layout = self.layouts[layer]
        unit = layout.direct[i]

        def hook(module, args, kwargs) -> None:
            if self.passes._rows is None:
                return
            hidden = args[0] if args else next(iter(kwargs.values()))
            B, T = self._shape(hidden)
            g, x, _ = self._layer(layer, hidden.device, B, T)
            flat = hidden.reshape(B * T, -1)
            span = slice(unit.first_neuron, unit.first_neuron + unit.n_neurons)
            g[:, span] = module.gate_proj(flat).float()
            x[:, span] = module.up_proj(flat).float()
            self._captured(layer)
        return hook

    def _on_mlp_output(self, layer: int, i: int):
        layout = self.layouts[layer]
        unit = layout.direct[i]

        def hook(module, args, output: torch.Tensor) -> torch.Tensor | None:
            if self.passes._rows is None:
                return None
            g, x, w = self.values[layer]
            span = slice(unit.first_neuron, unit.first_neuron + unit.n_neurons)
            # A shared expert's gate (Qwen2-MoE) multiplies the module's output afterwards: weight 1 here.
            return self._edited(layer, output, g[:, span], x[:, span], torch.ones_like(w[:, span]),
                                torch.arange(span.start, span.stop), layout.weights_of([unit]))
        return hook

    def _shape(self, hidden: torch.Tensor) -> tuple[int, int]:
        return len(self.passes._rows), self.passes._width

    def begin(self) -> None:
        """Forget the last pass's values."""
        self.values.clear()
        self.calls.clear()

    def _edited(self, layer: int, output: torch.Tensor, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                columns: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor | None:
        """The module's output plus what the edited hook_post of its neurons writes instead (times the router's
        weight), or None without an edit here."""
        B, T = self._shape(output)
        post = self.act_fn(g) * x
        new = self.passes.edited_post(layer, post.view(B, T, -1), g.view(B, T, -1), x.view(B, T, -1), columns)
        if new is None:
            return None
        delta = torch.nan_to_num((new.view(B * T, -1) - post) * w)
        return output + (delta @ w_out.to(delta.device)).to(output.dtype).view(output.shape)
