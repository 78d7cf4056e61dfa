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

from gluscope.recorder.reduce_cpu import beaters

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


def rows_of_hits(at: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
                 fill: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse candidates for running tops, one row per top they are offered to: candidate i goes to top at[i].

    Returns (tops, values [len(tops), width], ids [len(tops), width]): the distinct tops in increasing order
    and their candidates in the order given, padded with `fill` (ids -1), ready to be merged by a topk along
    rows. Shared by TokenNeurons and related.related_neurons.
    """
    order = torch.argsort(at, stable=True)
    at, values, ids = at[order], values[order], ids[order]
    tops, counts = torch.unique_consecutive(at, return_counts=True)
    group = torch.repeat_interleave(torch.arange(tops.numel(), device=at.device), counts)
    rank = torch.arange(at.numel(), device=at.device) - (torch.cumsum(counts, 0) - counts)[group]
    width = int(counts.max())
    padded = torch.full((tops.numel(), width), fill, dtype=values.dtype, device=at.device)
    padded_ids = torch.full((tops.numel(), width), -1, dtype=torch.int64, device=at.device)
    padded[group, rank], padded_ids[group, rank] = values, ids
    return tops, padded, padded_ids


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
            sides = (kind, kind + 1)
            worst = [self.scores[side][:, -1] for side in sides]  # sorted tops: the entry a newcomer must beat
            if all(bool(torch.isfinite(w).all()) for w in worst):
                # Kind + 1 keeps the smallest scores, stored negated: beating it is product < -worst.
                found = beaters(product, worst[0], -worst[1])
                if found is not None:
                    for side, flat in zip(sides, found):
                        self._merge_beating(side, product, flat // product.shape[1], flat % product.shape[1],
                                            first_id + lo)
                    return
            for side, w in zip(sides, worst):
                positive = bool(self.sign[side] > 0)
                if bool(torch.isfinite(w).all()):
                    mask = product > w[None, :] if positive else product < -w[None, :]
                    row, token = mask.nonzero(as_tuple=True)
                    self._merge_beating(side, product, row, token, first_id + lo)
                    continue
                # Per token, along contiguous memory: a transposed copy and topk along its rows cost about two
                # thirds of a topk down the columns on this CPU.
                per_token = product.T.contiguous().to(self.scores.dtype)     # [V, rows]
                best = per_token.topk(min(self.top, per_token.shape[1]), dim=1, largest=positive)
                self._keep(side, best.values if positive else -best.values, best.indices + first_id + lo)
        return update

    def _merge_beating(self, side: int, product: torch.Tensor, row: torch.Tensor, token: torch.Tensor,
                       first_id: int) -> None:
        """Merge the entries (row, token) of product [rows, V] that beat their token's running worst.

        Once every token's top is full, few entries of a layer beat it (about top * rows / neurons seen so
        far per token), so finding those (one pass of reduce_cpu.beaters, or a compare and a nonzero) and
        merging them replaces the transposed copy and its topk, which cost several times as much; the result
        is the same, as any other entry would be dropped by the merge. row, token: row-major order.
        """
        if row.numel() == 0:
            return
        positive = bool(self.sign[side] > 0)
        value = product[row, token].to(self.scores.dtype)
        tokens, scores, ids = rows_of_hits(token, value if positive else -value, row + first_id, -torch.inf)
        keep = torch.cat([self.scores[side][tokens], scores], dim=1).topk(self.top, dim=1)
        self.ids[side][tokens] = torch.cat([self.ids[side][tokens], ids], dim=1).gather(1, keep.indices)
        self.scores[side][tokens] = keep.values

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
