"""The router-weighted hook_post that each reducer folds in its own pass (reducer_interface.Contribution): the CPU
kernel against the tensor code, for an expert's compact rows and for a shared expert's every token."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gluscope.recorder.model import activation_function
from gluscope.recorder.reducer_interface import Batch, Contribution, LayerSetup, make_reducers

from .brute_force import require_kernel

pytestmark = pytest.mark.unit

B, T, N = 5, 9, 20
LENGTHS = np.array([9, 8, 9, 6, 7])


def _setup() -> LayerSetup:
    sign = torch.where(torch.arange(N) % 3 == 0, -1.0, 1.0)
    return LayerSetup(k=3, before=2, after=1, sign=sign, act_fn=activation_function("silu"), text_lengths=LENGTHS)


def _empty() -> Contribution:
    return Contribution(torch.empty(0), torch.full((N, 4), torch.inf), torch.full((N, 4), -torch.inf),
                        torch.zeros((N, 4), dtype=torch.float64), torch.zeros((N, 4), dtype=torch.int64))


def _expert_rows(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_gate, x_in [R, N] as the column halves of one product (as an expert's are), and the row map [B * T] of a
    random half of the tokens, BOS and padding among them; some values exactly zero."""
    routed = torch.sort(torch.randperm(B * T, generator=gen)[:B * T // 2]).values
    gate_up = torch.randn(len(routed), 2 * N, generator=gen)
    gate_up[3, :4] = 0.0
    gate_up[5, N + 4:N + 8] = 0.0
    rows = torch.full((B * T,), -1)
    rows[routed] = torch.arange(len(routed))
    x_gate, x_in = gate_up.chunk(2, dim=-1)
    return x_gate, x_in, rows


@pytest.mark.parametrize("compact", [True, False], ids=["expert_rows", "every_token"])
def test_the_kernel_folds_the_routed_values_as_the_tensor_code_does(compact):
    require_kernel()
    gen = torch.Generator().manual_seed(1)
    batch = Batch.of(LENGTHS, np.arange(B), torch.device("cpu"))
    if compact:
        x_gate, x_in, rows = _expert_rows(gen)
    else:
        x_gate, x_in, rows = torch.randn(B, T, N, generator=gen), torch.randn(B, T, N, generator=gen), None
    weight = torch.rand(x_gate.shape[0] if compact else B * T, generator=gen)
    folded, finished = {}, {}
    for kind in ("kernel", "torch"):
        values = dataclasses.replace(_empty(), weight=weight)
        (reducer,) = make_reducers(kind, [_setup()])
        for _ in range(2):  # the second batch continues the running values
            reducer.update(x_gate, x_in, batch, rows, values)
        folded[kind], finished[kind] = values, reducer.finish()
    kernel, tensor = folded["kernel"], folded["torch"]
    for name in ("value_min", "value_max", "value_count"):
        assert torch.equal(getattr(kernel, name), getattr(tensor, name)), name
    torch.testing.assert_close(kernel.value_sum, tensor.value_sum, rtol=1e-6, atol=0)
    # Each token is counted in its quadrant, as the reducer's own counts are.
    assert torch.equal(kernel.value_count.T, torch.from_numpy(finished["kernel"].counts))
    assert int(kernel.value_count.sum()) > 0


def test_the_routed_values_leave_the_kernels_own_statistics_as_they_were():
    require_kernel()
    x_gate, x_in, rows = _expert_rows(torch.Generator().manual_seed(2))
    batch = Batch.of(LENGTHS, np.arange(B), torch.device("cpu"))
    finished = []
    for values in (None, dataclasses.replace(_empty(), weight=torch.rand(x_gate.shape[0]))):
        (reducer,) = make_reducers("kernel", [_setup()])
        reducer.update(x_gate, x_in, batch, rows, values)
        finished.append(reducer.finish())
    for field in dataclasses.fields(finished[0]):
        np.testing.assert_array_equal(getattr(finished[0], field.name), getattr(finished[1], field.name),
                                      err_msg=field.name)
