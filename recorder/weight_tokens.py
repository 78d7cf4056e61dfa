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
    (top_tokens' on_product), it reduces them along the neuron axis into a
    running top per token, so the result is exact whatever the order of
    layers and blocks. Neurons are numbered globally (layer * d_mlp + neuron)
    while running. Once the running tops are full, only entries beating a
    token's current `top`-th score can enter, and after the first layer
    those are about top/seen of a block (2% at 1,536 neurons seen): they are
    picked with one comparison against the thresholds and merged through a
    small [V, candidates] topk, instead of a topk over the whole block.
    Measured on this CPU, a [1024, 49152] block of random scores: 1.65 CPU-s
    for both sides by topk, about 0.7 once the tops hold 5,000 neurons; the
    product itself costs 0.85.
    """

    DENSE = 16  # more candidates per token than this, on average or for one token: the block is reduced by topk

    def __init__(self, vocab: int, top: int = TOKEN_NEURONS, device: torch.device | str = "cpu") -> None:
        self.top = top
        # kinds 0, 2, 4 keep the largest scores, 1, 3, 5 the smallest (schema.sql, weight_kinds); scores are
        # kept multiplied by `sign` so that larger is better on both sides.
        self.sign = torch.tensor([1.0, -1.0] * 3)
        self.scores = torch.full((6, vocab, top), -torch.inf, device=device)
        self.ids = torch.full((6, vocab, top), -1, dtype=torch.int64, device=device)
        self.seen = [0] * 6  # neurons merged so far, per kind

    def reducer(self, kind: int, first_id: int) -> Callable[[int, torch.Tensor], None]:
        """An on_product for top_tokens over one layer's weight of kinds (kind, kind + 1), numbered from first_id."""
        def update(lo: int, product: torch.Tensor) -> None:
            for side in (kind, kind + 1):
                self._merge(side, product.to(self.scores.dtype), first_id + lo)
        return update

    def _merge(self, side: int, block: torch.Tensor, first: int) -> None:
        """Merge a [rows, V] block of raw scores into the running top of kind `side`."""
        scores, ids = self.scores[side], self.ids[side]
        V, rows = scores.shape[0], block.shape[0]
        positive = bool(self.sign[side] > 0)
        seen, self.seen[side] = self.seen[side], self.seen[side] + rows
        if self.top * rows > 6 * (seen + rows):  # expect over 6 candidates per token: the comparison would not pay
            self._dense(side, block, first, positive)
            return
        threshold = scores[:, -1] if positive else -scores[:, -1]
        beats = block > threshold[None, :] if positive else block < threshold[None, :]  # can enter its token's top
        row, token = beats.nonzero(as_tuple=True)
        if len(row) == 0:
            return
        per_token = torch.bincount(token, minlength=V)
        if len(row) > self.DENSE * V or int(per_token.max()) > 4 * self.DENSE:
            self._dense(side, block, first, positive)
            return
        # A few candidates per token: lay them out [V, most per token], padded with -inf.
        order = torch.sort(token, stable=True).indices
        row, token = row[order], token[order]
        slot = torch.arange(len(token), device=block.device) - (torch.cumsum(per_token, 0) - per_token)[token]
        width = int(per_token.max())
        new_scores = torch.full((V, width), -torch.inf, dtype=scores.dtype, device=block.device)
        new_ids = torch.full((V, width), -1, dtype=torch.int64, device=block.device)
        found = block[row, token]
        new_scores[token, slot] = found if positive else -found
        new_ids[token, slot] = row + first
        self._keep(side, new_scores, new_ids)

    def _dense(self, side: int, block: torch.Tensor, first: int, positive: bool) -> None:
        # Per token, along contiguous memory: a transposed copy and topk along its rows cost about
        # two thirds of a topk down the columns on this CPU.
        best = block.T.contiguous().topk(min(self.top, block.shape[0]), dim=1, largest=positive)
        self._keep(side, best.values if positive else -best.values, best.indices + first)

    def _keep(self, side: int, new_scores: torch.Tensor, new_ids: torch.Tensor) -> None:
        """The running top of kind `side` merged with [V, c] candidates (scores signed: larger is better)."""
        scores, ids = self.scores[side], self.ids[side]
        keep = torch.cat([scores, new_scores], dim=1).topk(self.top, dim=1)
        ids.copy_(torch.cat([ids, new_ids], dim=1).gather(1, keep.indices))
        scores.copy_(keep.values)

    def result(self, d_mlp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(layer [6, V, top] int16, neuron int32, score float32), most extreme first; -1 where fewer neurons exist."""
        ids = self.ids.cpu().numpy()
        layer = np.where(ids >= 0, ids // d_mlp, -1).astype(np.int16)
        neuron = np.where(ids >= 0, ids % d_mlp, -1).astype(np.int32)
        scores = (self.scores * self.sign.to(self.scores.device)[:, None, None]).float().cpu().numpy()
        return layer, neuron, scores
