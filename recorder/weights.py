"""What the weights alone say about each neuron: the weight convention's sign, geometry and tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gluscope.recorder.token_tops import TokenNeurons, top_tokens


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
                  W_E_T: torch.Tensor, W_U: torch.Tensor, top: int = WEIGHT_TOKENS,
                  token_neurons: TokenNeurons | None = None, first_id: int = 0,
                  kept: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top tokens of +-w_out.W_U, +-w_gate.W_E and +-w_in.W_E per neuron (kinds 0..5 of schema.sql).

    W_E_T is W_E transposed, [d_model, vocab], contiguous like W_U, so that
    every product reads its matrix row by row. w_in and w_out are flipped by
    `sign` first, so the tables follow the recorded weight convention.
    `token_neurons`, if given, is fed the same products (this layer's neurons
    numbered from first_id), for the token_neurons table; only the rows `kept` ([n] bool; default all) feed it.
    """
    n = w_gate.shape[0]
    top = min(top, W_E_T.shape[1])
    ids = np.zeros((6, n, top), dtype=np.int32)
    scores = np.zeros((6, n, top), dtype=np.float32)
    w_in = w_in * sign[:, None]
    w_out = w_out * sign[:, None]
    for kind, weight, matrix in ((0, w_out, W_U), (2, w_gate, W_E_T), (4, w_in, W_E_T)):
        reduce = token_neurons.reducer(kind, first_id) if token_neurons is not None else None
        if reduce is not None and kept is not None and not kept.all():
            reduce = _rows_only(reduce, kept)
        best_ids, best_scores = top_tokens(weight, matrix, top, reduce)
        ids[kind:kind + 2] = best_ids.cpu().numpy()
        scores[kind:kind + 2] = best_scores.float().cpu().numpy()
    return ids, scores


def _rows_only(reduce, kept: np.ndarray):
    """An on_product that hands `reduce` only the kept rows of each product, in runs of consecutive rows, so each
    row keeps its number and its exact products (another part of the run records the others)."""
    def update(lo: int, product: torch.Tensor) -> None:
        rows = kept[lo:lo + product.shape[0]]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], rows.astype(np.int8), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            reduce(lo + int(start), product[start:stop])
    return update


@dataclass
class LayerWeights:
    """One layer's weight statistics, computed before the recording."""

    sign: torch.Tensor               # [n] float32 +-1 on the model's device: the weight convention
    geometry: dict[str, np.ndarray]  # weight_geometry's cosines and norms
    token_ids: np.ndarray            # [6, n, t] weight_tokens
    token_scores: np.ndarray

    def result_fields(self, neurons: slice = slice(None)) -> dict:
        """This layer's part of a writer.LayerResult, or of its `neurons` (an expert's)."""
        return {"geometry": {name: values[neurons] for name, values in self.geometry.items()},
                "flipped": (self.sign[neurons] < 0).cpu().numpy(),
                "token_ids": self.token_ids[:, neurons], "token_scores": self.token_scores[:, neurons]}


def layer_weights(model, refactor_glu: bool, progress: bool = False,
                  token_neurons: TokenNeurons | None = None, kept: list[np.ndarray] | None = None
                  ) -> list[LayerWeights]:
    """LayerWeights of every layer of a GatedModel; `token_neurons` (if given) gathers the whole model's.

    kept: per layer, the neurons a part of the run records (parts.py): a layer without any gets its signs and
    geometry but no weight tokens, and only kept neurons feed token_neurons."""
    from tqdm.auto import tqdm

    W_E, W_U = model.embeddings()
    # Laid out once for every layer's products: [d_model, vocab], contiguous.
    W_E_T, W_U = W_E.T.contiguous(), W_U.contiguous()
    del W_E
    layers = []
    for layer in tqdm(range(model.n_layers), desc="weight tokens", unit="layer", disable=not progress,
                      dynamic_ncols=True):
        weights = model.mlp_weights(layer)
        sign, geometry = weight_geometry(*weights, refactor_glu)
        mine = None if kept is None else kept[layer]
        if mine is not None and not mine.any():
            n = weights[0].shape[0]
            tokens = (np.zeros((6, n, 0), np.int32), np.zeros((6, n, 0), np.float32))
        else:
            tokens = weight_tokens(*weights, sign, W_E_T, W_U, token_neurons=token_neurons,
                                   first_id=layer * model.d_mlp, kept=mine)
        layers.append(LayerWeights(sign.to(model.device), geometry, *tokens))
    return layers
