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

import torch

BLOCK = 64   # tokens per block of a row
ROWS = 1024  # neurons per product: bounds the [ROWS, V] product in memory


def top_tokens(weight: torch.Tensor, matrix: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row w of `weight` [n, d]: the `top` largest and smallest entries of w @ `matrix` [d, V].

    Returns (ids [2, n, top] int64, scores [2, n, top]): index 0 the largest
    first, index 1 the smallest first.
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
