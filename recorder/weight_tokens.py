"""Top tokens of a weight read through an embedding or unembedding matrix: top-k by block maxima.

For n neurons and a vocabulary of V tokens the products form an [n, V]
matrix (46,080 x 49,152 for SmolLM2-135M, three times over), and `topk`
over each full row, twice (largest and smallest), cost about as much as the
matmul itself on the CPU. Rows are instead cut into blocks of `BLOCK`
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
    (top_tokens' on_product), it reduces them along the neuron axis and
    merges each block's top into a running top per token, so the result is
    exact whatever the order of layers and blocks. Neurons are numbered
    globally (layer * d_mlp + neuron) while running.
    """

    def __init__(self, vocab: int, top: int = TOKEN_NEURONS, device: torch.device | str = "cpu") -> None:
        self.top = top
        # kinds 0, 2, 4 keep the largest scores, 1, 3, 5 the smallest (schema.sql, weight_kinds).
        self.largest = torch.tensor([True, False] * 3)
        fill = torch.where(self.largest, -torch.inf, torch.inf)
        self.scores = fill[:, None, None].expand(6, vocab, top).clone().to(device)
        self.ids = torch.full((6, vocab, top), -1, dtype=torch.int64, device=device)

    def reducer(self, kind: int, first_id: int) -> Callable[[int, torch.Tensor], None]:
        """An on_product for top_tokens over one layer's weight of kinds (kind, kind + 1), numbered from first_id."""
        def update(lo: int, product: torch.Tensor) -> None:
            # Per token, along contiguous memory: on the CPU a transposed copy and topk along its rows
            # cost 1.65 s for both sides of a [1024, 49152] block, topk down the columns 2.5 s.
            per_token = product.T.contiguous()                      # [V, rows]
            k = min(self.top, per_token.shape[1])
            for side in (kind, kind + 1):
                largest = bool(self.largest[side])
                best = per_token.topk(k, dim=1, largest=largest)    # [V, k]: this block's best neurons per token
                scores = torch.cat([self.scores[side], best.values.to(self.scores.dtype)], dim=1)
                ids = torch.cat([self.ids[side], best.indices + (first_id + lo)], dim=1)
                keep = scores.topk(self.top, dim=1, largest=largest)
                self.scores[side] = keep.values
                self.ids[side] = ids.gather(1, keep.indices)
        return update

    def result(self, d_mlp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(layer [6, V, top] int16, neuron int32, score float32), most extreme first; -1 where fewer neurons exist."""
        ids = self.ids.cpu().numpy()
        layer = np.where(ids >= 0, ids // d_mlp, -1).astype(np.int16)
        neuron = np.where(ids >= 0, ids % d_mlp, -1).astype(np.int32)
        return layer, neuron, self.scores.float().cpu().numpy()
