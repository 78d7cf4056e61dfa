"""The CPU kernel against the tensor reducer, table by table, and how the recorder picks between them.

Both reducers see bit-identical activations (the CPU forward pass is
deterministic), so everything but float sums must match exactly: counts,
extremes, every example's text and position, and every window's float16 bits.
d_mlp 100 is not a multiple of the kernel's 16-neuron blocks, and 150 texts of
mixed lengths make the top-k lists fill, evict and reorder many times.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from gluscope.cli import main as gluscope_main
from gluscope.errors import UserError
from gluscope.recorder import kernel_reducer
from gluscope.recorder.record import choose_reducer

from . import recordings
from .brute_force import require_kernel

pytestmark = pytest.mark.integration

TABLES = {  # table -> (key columns, float columns compared with a tolerance)
    "neurons": ("layer, neuron", ()),
    "value_stats": ("layer, neuron, quadrant, hook", ("mean",)),
    "examples": ("layer, neuron, quadrant, hook, rank", ()),
    "windows": ("layer, neuron, text_id, position", ()),
    "histograms": ("layer, neuron, quadrant, hook", ()),
    "density": ("layer, neuron, gate_bin", ()),
    "intervals": ("layer, neuron, quadrant, interval", ()),
    "samples": ("layer, neuron, quadrant, kind, interval, rank", ()),
}


@pytest.fixture(scope="module")
def model_and_corpus() -> tuple[Path, Path]:
    return recordings.model("llama", d_mlp=100, n_layers=2, seed=3, extra_tokens=()), recordings.corpus("random")


OPTIONS = ("--max-length", "64", "--batch-size", "7", "--k", "8")


def _record(model: Path, corpus: Path, out: Path, reducer: str) -> duckdb.DuckDBPyConnection:
    """The kernel's recording is made here, under the flags the test sets; the tensor reducer's is shared."""
    if reducer == "torch":
        return duckdb.connect(str(recordings.record(model, corpus, *OPTIONS, "--reducer", "torch")), read_only=True)
    args = ["record", "--model", str(model), "--dataset", str(corpus), "--out", str(out), *recordings.CPU, *OPTIONS,
            "--reducer", reducer]
    assert gluscope_main(args) == 0
    return duckdb.connect(str(out), read_only=True)


@pytest.mark.parametrize("cxxflags", ["", "-mno-f16c"], ids=["native", "portable_float16"])
def test_kernel_and_tensor_reducers_write_the_same_database(model_and_corpus, tmp_path, monkeypatch, cxxflags):
    """Without F16C the kernel rounds windows to float16 in software; both ways must match torch's rounding."""
    require_kernel()
    if cxxflags:
        monkeypatch.setenv("GLUSCOPE_CXXFLAGS", cxxflags)
        kernel_reducer.load_kernel.cache_clear()
    model, corpus = model_and_corpus
    try:
        kernel = _record(model, corpus, tmp_path / "kernel.duckdb", "kernel")
    finally:
        kernel_reducer.load_kernel.cache_clear()
    tensor = _record(model, corpus, tmp_path / "torch.duckdb", "torch")
    for table, (keys, approx) in TABLES.items():
        a = kernel.execute(f"SELECT * FROM {table} ORDER BY {keys}").fetchdf()
        b = tensor.execute(f"SELECT * FROM {table} ORDER BY {keys}").fetchdf()
        assert len(a) == len(b) > 0, table
        for column in a.columns:
            if column in approx:
                np.testing.assert_allclose(a[column], b[column], rtol=1e-6, atol=1e-7, err_msg=f"{table}.{column}")
            else:
                assert a[column].equals(b[column]), f"{table}.{column}"
    # The lists really were contested: many more candidates than k per list.
    n_texts, k = kernel.execute("SELECT n_texts, k FROM metadata").fetchone()
    assert n_texts == 150 and kernel.execute("SELECT count(DISTINCT text_id) FROM examples").fetchone()[0] > 5 * k


def test_auto_takes_the_kernel_on_the_cpu_and_torch_elsewhere():
    require_kernel()
    assert choose_reducer(torch.device("cpu"), "auto") == "kernel"
    assert choose_reducer(torch.device("cuda"), "auto") == "torch"
    assert choose_reducer(torch.device("cpu"), "torch") == "torch"
    with pytest.raises(UserError, match="CPU only"):
        choose_reducer(torch.device("cuda"), "kernel")


def test_without_a_compiler_auto_falls_back_and_kernel_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("GLUSCOPE_CACHE", str(tmp_path))  # no kernel built earlier to find
    kernel_reducer.load_kernel.cache_clear()
    try:
        assert choose_reducer(torch.device("cpu"), "auto") == "torch"
        with pytest.raises(UserError, match="no C.. compiler"):
            choose_reducer(torch.device("cpu"), "kernel")
    finally:
        kernel_reducer.load_kernel.cache_clear()
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


def test_a_broken_compile_leaves_no_file(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "g++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("GLUSCOPE_CACHE", str(tmp_path / "cache"))
    kernel_reducer.load_kernel.cache_clear()
    try:
        with pytest.raises(UserError, match="this compiler is broken"):
            choose_reducer(torch.device("cpu"), "kernel")
    finally:
        kernel_reducer.load_kernel.cache_clear()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def _stable_top(keys: torch.Tensor, ids: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of [S, m] candidates (ids increasing along the row): the `top` largest keys, of equal keys the
    lower id first, padded with -inf and id -1: what the kernel's running tops must hold."""
    order = torch.sort(-keys, dim=1, stable=True).indices[:, :top]
    k, i = keys.gather(1, order), ids.gather(1, order)
    pad = top - k.shape[1]
    if pad > 0:
        k = torch.cat([k, torch.full((k.shape[0], pad), -torch.inf)], 1)
        i = torch.cat([i, torch.full((i.shape[0], pad), -1)], 1)
    return k, i


@pytest.mark.parametrize("R, C, top, blocks", [(37, 101, 8, 4), (300, 1000, 32, 3), (1, 16, 8, 3), (2, 5, 8, 2)])
def test_column_tops_and_abs_tops_equal_a_stable_sort_of_every_block(R, C, top, blocks):
    """The weight stage's compiled running tops (kernel_reducer.column_tops, abs_tops), merged block after block
    from strided views with many exact ties, hold what one stable sort of every entry gives."""
    require_kernel()
    generator = torch.Generator().manual_seed(R * C)
    # Multiples of 1/8 with a heavy tail: exact ties everywhere, and later blocks still enter the tops.
    products = [(torch.randn(R, C + 3, generator=generator) * 8 * (1 + b)).round()[:, :C] / 8 for b in range(blocks)]

    key0, key1 = torch.full((C, top), -torch.inf), torch.full((C, top), -torch.inf)
    id0, id1 = torch.full((C, top), -1), torch.full((C, top), -1)
    for b, p in enumerate(products):
        assert kernel_reducer.column_tops(p, key0, id0, key1, id1, first_id=100 + b * R)
    values = torch.cat(products).T                                   # [C, blocks * R], ids increasing
    ids = (100 + torch.arange(blocks * R)).expand(C, -1)
    for got_key, got_id, keys in ((key0, id0, values), (key1, id1, -values)):
        want_key, want_id = _stable_top(keys, ids, top)
        assert torch.equal(got_key, want_key) and torch.equal(got_id, want_id)

    rows = (torch.full((R, top), -torch.inf), torch.full((R, top), -1), torch.full((R, top), torch.nan))
    cols = (torch.full((C, top), -torch.inf), torch.full((C, top), -1), torch.full((C, top), torch.nan))
    for b, p in enumerate(products):
        assert kernel_reducer.abs_tops(p, rows, b * C, cols, 7 + b * R)
    for (key, idx, val), values, ids in (
            (rows, torch.cat(products, 1), torch.arange(blocks * C).expand(R, -1)),
            (cols, torch.cat(products).T, (7 + torch.arange(blocks * R)).expand(C, -1))):
        want_key, want_id = _stable_top(values.abs(), ids, top)
        assert torch.equal(key, want_key) and torch.equal(idx, want_id)
        held = values.gather(1, torch.sort(-values.abs(), dim=1, stable=True).indices[:, :top])
        assert torch.equal(val[:, :held.shape[1]], held) and bool(val[:, held.shape[1]:].isnan().all())
