"""The CPU kernel against the tensor reducer, table by table, and how the recorder picks between them.

Both reducers see bit-identical activations (the CPU forward pass is
deterministic), so everything but float sums must match exactly: counts,
extremes, every example's text and position, and every window's float16 bits.
d_mlp 100 is not a multiple of the kernel's 16-neuron blocks, and 150 texts of
mixed lengths make the top-k lists fill, evict and reorder many times.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from gluscope.cli import main as gluscope_main
from gluscope.errors import UserError
from gluscope.recorder import reduce_cpu
from gluscope.recorder.record import choose_reducer

from .conftest import corpus_texts, require_kernel, tokenizer_training_texts

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
def model_and_corpus(tmp_path_factory) -> tuple[Path, Path]:
    from gluscope.recorder.tiny_models import save_tiny_model

    tmp = tmp_path_factory.mktemp("reducers")
    model = save_tiny_model(tmp / "model", "llama", tokenizer_training_texts(), init_std=0.15, d_mlp=100,
                            n_layers=2, seed=3)
    words = " ".join(corpus_texts()).split()
    rng = np.random.default_rng(1)
    corpus = tmp / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(150):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 60)))}) + "\n")
    return model, corpus


def _record(model: Path, corpus: Path, out: Path, reducer: str) -> duckdb.DuckDBPyConnection:
    args = ["record", "--model", str(model), "--dataset", str(corpus), "--out", str(out), "--max-length", "64",
            "--batch-size", "7", "--k", "8", "--device", "cpu", "--compile", "off", "--reducer", reducer]
    assert gluscope_main(args) == 0
    return duckdb.connect(str(out), read_only=True)


@pytest.mark.parametrize("cxxflags", ["", "-mno-f16c"], ids=["native", "portable_float16"])
def test_kernel_and_tensor_reducers_write_the_same_database(model_and_corpus, tmp_path, monkeypatch, cxxflags):
    """Without F16C the kernel rounds windows to float16 in software; both ways must match torch's rounding."""
    require_kernel()
    if cxxflags:
        monkeypatch.setenv("GLUSCOPE_CXXFLAGS", cxxflags)
        reduce_cpu.load_kernel.cache_clear()
    model, corpus = model_and_corpus
    try:
        kernel = _record(model, corpus, tmp_path / "kernel.duckdb", "kernel")
    finally:
        reduce_cpu.load_kernel.cache_clear()
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
    reduce_cpu.load_kernel.cache_clear()
    try:
        assert choose_reducer(torch.device("cpu"), "auto") == "torch"
        with pytest.raises(UserError, match="no C.. compiler"):
            choose_reducer(torch.device("cpu"), "kernel")
    finally:
        reduce_cpu.load_kernel.cache_clear()
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


def test_a_broken_compile_leaves_no_file(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "g++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("GLUSCOPE_CACHE", str(tmp_path / "cache"))
    reduce_cpu.load_kernel.cache_clear()
    try:
        with pytest.raises(UserError, match="this compiler is broken"):
            choose_reducer(torch.device("cpu"), "kernel")
    finally:
        reduce_cpu.load_kernel.cache_clear()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


@pytest.mark.parametrize("shape", [(37, 101), (300, 1000), (1, 16)])
def test_beaters_find_exactly_what_torch_compare_and_nonzero_find(shape):
    """The weight stage's one-pass search for entries beating a running top (signed and |x|), against torch."""
    require_kernel()
    torch.manual_seed(0)
    R, C = shape
    padded = torch.randn(R, C + 5)
    product = padded[:, :C]  # a strided view, as top_tokens hands on
    hi, lo = torch.randn(C) + 3.5, torch.randn(C) - 3.5  # few entries beat them, as in the weight stage
    flat = torch.arange(R * C).view(R, C)
    got = reduce_cpu.beaters(product, hi, lo)
    assert got is not None
    assert torch.equal(got[0], flat[product > hi]) and torch.equal(got[1], flat[product < lo])
    row_thr, col_thr = torch.rand(R) + 2.5, torch.rand(C) + 2.5
    got = reduce_cpu.beaters_abs(product, row_thr, col_thr)
    assert got is not None
    assert torch.equal(got[0], flat[product.abs() > row_thr[:, None]])
    assert torch.equal(got[1], flat[product.abs() > col_thr[None, :]])
    # More entries than the kernel makes room for (over a 32nd, past its floor): None, so the caller takes torch's path.
    everything = reduce_cpu.beaters(product, torch.full((C,), -10.0), lo)
    if everything is not None:
        assert torch.equal(everything[0], flat.view(-1))
    if R * C >= 300 * 1000:
        assert everything is None
