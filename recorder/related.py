"""Related neurons along the direct residual path: what each neuron writes that later neurons read.

score(A -> B) = cos(w_out of A, g_B * w_via of B) for B in a later layer,
where g_B is the gain of B's pre-MLP norm and via is B's gate or in weights,
all after the weight convention (schema.sql, related). For every neuron,
direction and via the recorder keeps the 16 largest |score|.

All cosines of a pair of layers are one matrix product [n, d] @ [d, n] of
unit rows, reduced along both axes at once: along B for A's downstream list,
along A for B's upstream list. Each block's top is merged into a running top
per neuron, so the result is exact and never holds more than one block of
scores. For a 7B model that is a large but plain amount of matmul work, well
suited to a GPU (the count: see docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gluscope.recorder.kernel_reducer import abs_tops
from gluscope.schema import RELATED_DIRECTIONS, RELATED_VIA

RELATED_TOP = 16
BLOCK_ELEMENTS = 1 << 24  # scores per product block (64 MB in float32): bounds memory on any device


@dataclass
class RelatedNeurons:
    """The related table as arrays [L, direction, via, n, top]; other_layer -1 where a neuron has fewer."""

    other_layer: np.ndarray   # int16
    other_neuron: np.ndarray  # int32
    score: np.ndarray         # float32


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _merge(scores: torch.Tensor, ids: torch.Tensor, new_scores: torch.Tensor, new_ids: torch.Tensor,
           top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top` entries of largest |score| among a running top and a block's candidates (rows: neurons)."""
    all_scores = torch.cat([scores, new_scores], dim=1)
    all_ids = torch.cat([ids, new_ids], dim=1)
    keep = all_scores.abs().nan_to_num(-1.0).topk(top, dim=1).indices
    return all_scores.gather(1, keep), all_ids.gather(1, keep)


def related_neurons(model, signs: list[torch.Tensor], top: int = RELATED_TOP, progress: bool = False,
                    kept: list[np.ndarray] | None = None) -> RelatedNeurons:
    """Every neuron's `top` related neurons of a GatedModel, downstream and upstream, via gate and in.

    signs: each layer's weight convention (LayerWeights.sign), applied to w_in
    and w_out. Runs on the model's device in float32. kept: per layer, the
    neurons a part of the run records (parts.py); only their lists are kept,
    and pairs of layers neither of which has one are skipped.
    """
    from tqdm.auto import tqdm

    L, n = model.n_layers, model.d_mlp
    device = model.device
    top = min(top, n * max(L - 1, 1))
    nan = torch.tensor(float("nan"), device=device)
    # [layer, direction, via, n, top]: running scores (NaN: empty) and global ids (layer * n + neuron).
    best = nan.expand(L, 2, 2, n, top).clone()
    ids = torch.full((L, 2, 2, n, top), -1, dtype=torch.int64, device=device)
    rows = max(1, min(n, BLOCK_ELEMENTS // max(n, 1)))

    widths = [model.layer_width(layer) for layer in range(L)]

    def padded(w: torch.Tensor) -> torch.Tensor:
        """A layer narrower than n (DeepSeek-V3's dense layers) as n rows: zero rows score 0, below every neuron."""
        return w if w.shape[0] == n else torch.cat([w, w.new_zeros(n - w.shape[0], w.shape[1])])

    def writes(layer: int) -> torch.Tensor:
        _, _, w_out = model.mlp_weights(layer)
        return padded(_unit(w_out.to(device) * signs[layer].to(device)[:, None]))

    def reads(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        w_gate, w_in, _ = model.mlp_weights(layer)
        gain = model.mlp_input_gain(layer).to(device)[None, :]
        return (padded(_unit(w_gate.to(device) * gain)),
                padded(_unit(w_in.to(device) * signs[layer].to(device)[:, None] * gain)))

    # The compiled merge (kernel_reducer.abs_tops) keeps |score| beside each top, sorted; torch's path finds it anew.
    key = torch.full((L, 2, 2, n, top), -torch.inf, device=device) if device.type == "cpu" else None
    bar = tqdm(total=L * (L - 1) // 2, desc="related neurons", unit="pair", disable=not progress, dynamic_ncols=True)
    written = [writes(layer) for layer in range(L)] if L * n * model.d_model <= BLOCK_ELEMENTS * 8 else None
    active = [True] * L if kept is None else [bool(k.any()) for k in kept]
    for lb in range(1, L):
        if not any(active[:lb + 1]):
            bar.update(lb)
            continue
        readers = reads(lb)
        for la in range(lb):
            if not (active[la] or active[lb]):
                bar.update(1)
                continue
            a = written[la] if written is not None else writes(la)
            for via, b in enumerate(readers):
                for lo in range(0, n, rows):
                    hi = min(n, lo + rows)
                    scores = a[lo:hi] @ b.T                       # [rows, n]: cos(A_lo.., B)
                    # Rows: downstream of A (B's of layer lb); columns: upstream of B (A's of layer la).
                    if key is not None and abs_tops(
                            scores, (key[la, 0, via, lo:hi], ids[la, 0, via, lo:hi], best[la, 0, via, lo:hi]), lb * n,
                            (key[lb, 1, via], ids[lb, 1, via], best[lb, 1, via]), la * n + lo):
                        continue
                    key = None  # the kernel is unavailable: torch's path from here on
                    down = best[la, 0, via], ids[la, 0, via]
                    up = best[lb, 1, via], ids[lb, 1, via]
                    magnitude = scores.abs()
                    k = min(top, n)
                    pick = magnitude.topk(k, dim=1).indices
                    down[0][lo:hi], down[1][lo:hi] = _merge(
                        down[0][lo:hi], down[1][lo:hi], scores.gather(1, pick), pick + lb * n, top)
                    k = min(top, hi - lo)
                    pick = magnitude.topk(k, dim=0).indices       # [k, n]
                    up[0][:], up[1][:] = _merge(up[0], up[1], scores.gather(0, pick).T, (pick + la * n + lo).T, top)
            bar.update(1)
    bar.close()
    ids_np = ids.cpu().numpy()
    if kept is not None:  # another part's neurons: their lists are that part's
        mask = np.stack([np.pad(k, (0, n - len(k))) for k in kept])      # [L, n]
        ids_np[~mask[:, None, None, :, None].repeat(2, 1).repeat(2, 2).repeat(ids_np.shape[-1], 4)] = -1
    if min(widths) < n:  # no list of a padding row, no padding row in a list
        width = np.array(widths)
        other_layer = np.clip(ids_np // n, 0, L - 1)
        ids_np[(ids_np % n) >= width[other_layer]] = -1
        ids_np[(np.arange(n)[None, :] >= width[:, None])[:, None, None, :, None].repeat(2, 1).repeat(2, 2)
               .repeat(ids_np.shape[-1], 4)] = -1
    return RelatedNeurons(other_layer=np.where(ids_np >= 0, ids_np // n, -1).astype(np.int16),
                          other_neuron=np.where(ids_np >= 0, ids_np % n, -1).astype(np.int32),
                          score=best.float().cpu().numpy())


assert RELATED_DIRECTIONS == ("downstream", "upstream") and RELATED_VIA == ("gate", "in")  # the axes above
