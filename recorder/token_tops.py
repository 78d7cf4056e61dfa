"""Top tokens of a weight read through an embedding or unembedding matrix: top-k by block maxima.

For n neurons and a vocabulary of V tokens the products form an [n, V]
matrix per layer, three times over, and `topk` over each full row, twice
(largest and smallest), cost as much as the matmul itself on the CPU (see
docs/performance.md). Rows are instead cut into blocks of `BLOCK`
tokens: the `top` largest entries of a row lie in its `top` blocks with the
largest maxima (an entry in any other block is beaten by those `top` block
maxima), so one vectorised max per block and two small `topk`s give the
same entries as a full `topk`.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from gluscope.recorder.kernel_reducer import column_tops

BLOCK = 64   # tokens per block of a row
ROWS = 1024  # neurons per product: bounds the [ROWS, V] product in memory


def top_tokens(weight: torch.Tensor, matrix: torch.Tensor, top: int,
               on_product: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row w of `weight` [n, d]: the `top` largest and smallest entries of w @ `matrix` [d, V].

    Returns (ids [2, n, top] int64, scores [2, n, top]): index 0 the largest
    first, index 1 the smallest first. `on_product(first_row, product)` sees
    each [rows, V] product before it is reduced (TokenNeurons reduces it
    along the other axis), so the matmul is done once for both tables.
    """
    n = weight.shape[0]
    V = matrix.shape[1]
    top = min(top, V)
    padded = math.ceil(V / BLOCK) * BLOCK
    if padded != V:
        matrix = torch.cat([matrix, matrix.new_zeros(matrix.shape[0], padded - V)], dim=1)
    ids = torch.empty(2, n, top, dtype=torch.int64)
    scores = torch.empty(2, n, top, dtype=matrix.dtype)
    for lo in range(0, n, ROWS):
        hi = min(n, lo + ROWS)
        product = weight[lo:hi] @ matrix                   # one [ROWS, V] product alive at a time
        if on_product is not None:
            on_product(lo, product[:, :V])
        for side, sign in ((0, 1.0), (1, -1.0)):
            if padded != V:
                product[:, V:] = -torch.inf * sign         # padding never wins
            blocks = product.view(hi - lo, padded // BLOCK, BLOCK)
            extreme = blocks.amax(dim=2) if sign > 0 else blocks.amin(dim=2)
            chosen = (extreme * sign).topk(min(top, extreme.shape[1]), dim=1).indices
            rows = chosen.shape[0]
            values = blocks.gather(1, chosen[:, :, None].expand(rows, chosen.shape[1], BLOCK)).reshape(rows, -1)
            token = (chosen[:, :, None] * BLOCK + torch.arange(BLOCK)).reshape(rows, -1)
            best = (values * sign).topk(top, dim=1)
            ids[side, lo:hi] = token.gather(1, best.indices)
            scores[side, lo:hi] = best.values * sign
    return ids, scores


TOKEN_NEURONS = 32  # neurons kept per token and kind (schema.sql, token_neurons)


class TokenNeurons:
    """For every token and weight kind, the `top` neurons of the whole model with the most extreme score.

    The transpose of weight_tokens: fed the same [rows, V] products
    (top_tokens' on_product), it reduces them along the neuron axis into a
    running top per token, so the result is exact whatever the order of
    layers and blocks. Neurons are numbered globally (layer * d_mlp + neuron)
    while running.
    """

    def __init__(self, vocab: int, top: int = TOKEN_NEURONS, device: torch.device | str = "cpu") -> None:
        self.top = top
        # kinds 0, 2, 4 keep the largest scores, 1, 3, 5 the smallest (schema.sql, weight_kinds); scores are
        # kept multiplied by `sign` so that larger is better on both sides.
        self.sign = torch.tensor([1.0, -1.0] * 3)
        self.scores = torch.full((6, vocab, top), -torch.inf, device=device)
        self.ids = torch.full((6, vocab, top), -1, dtype=torch.int64, device=device)

    def reducer(self, kind: int, first_id: int) -> Callable[[int, torch.Tensor], None]:
        """An on_product for top_tokens over one layer's weight of kinds (kind, kind + 1), numbered from first_id."""
        def update(lo: int, product: torch.Tensor) -> None:
            # One compiled pass merges the product into both tops (kernel_reducer.column_tops); torch's path below
            # (on a GPU, or without the kernel) takes a topk per token and merges it.
            if column_tops(product, self.scores[kind], self.ids[kind], self.scores[kind + 1], self.ids[kind + 1],
                           first_id + lo):
                return
            for side in (kind, kind + 1):
                positive = bool(self.sign[side] > 0)
                # Per token, along contiguous memory: a transposed copy and topk along its rows cost less than a
                # topk down the columns on the CPU (see docs/performance.md).
                per_token = product.T.contiguous().to(self.scores.dtype)     # [V, rows]
                best = per_token.topk(min(self.top, per_token.shape[1]), dim=1, largest=positive)
                self._keep(side, best.values if positive else -best.values, best.indices + first_id + lo)
        return update

    def _keep(self, side: int, new_scores: torch.Tensor, new_ids: torch.Tensor) -> None:
        """The running top of kind `side` merged with [V, c] candidates (scores signed: larger is better)."""
        scores, ids = self.scores[side], self.ids[side]
        keep = torch.cat([scores, new_scores], dim=1).topk(self.top, dim=1)
        ids.copy_(torch.cat([ids, new_ids], dim=1).gather(1, keep.indices))
        scores.copy_(keep.values)

    def result(self, d_mlp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(layer [6, V, top] int16, neuron int32, score float32), most extreme first; -1 where fewer neurons exist."""
        # Equal scores in the order of their neurons, however the blocks arrived.
        order = torch.sort(self.ids, dim=2, stable=True).indices
        order = order.gather(2, torch.sort(self.scores.gather(2, order), dim=2, descending=True, stable=True).indices)
        self.ids, self.scores = self.ids.gather(2, order), self.scores.gather(2, order)
        ids = self.ids.cpu().numpy()
        layer = np.where(ids >= 0, ids // d_mlp, -1).astype(np.int16)
        neuron = np.where(ids >= 0, ids % d_mlp, -1).astype(np.int32)
        scores = (self.scores * self.sign.to(self.scores.device)[:, None, None]).float().cpu().numpy()
        return layer, neuron, scores
