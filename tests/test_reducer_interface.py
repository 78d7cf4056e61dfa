"""The reducers' shared parts: the rules against schema.sql, the kernel's argument struct against the compiler,
both reducers on the same hand-made batch through the one interface, and what the recorder assumes of the bridge.
"""

from __future__ import annotations

import dataclasses

import duckdb
import numpy as np
import pytest
import torch

from gluscope.recorder import kernel_reducer, rules
from gluscope.recorder.corpus import Corpus
from gluscope.recorder.model import activation_function, load_model
from gluscope.recorder.reducer_interface import Batch, LayerSetup, make_reducers
from gluscope.schema import schema_sql

from .brute_force import require_kernel

pytestmark = pytest.mark.integration


def test_rules_follow_the_code_tables_of_schema_sql():
    con = duckdb.connect()
    con.execute(schema_sql())
    quadrants = con.execute("SELECT gate_sign, in_sign FROM quadrants ORDER BY quadrant").fetchall()
    hooks = dict(con.execute("SELECT name, hook FROM hooks").fetchall())
    assert [tuple(q) for q in quadrants] == list(rules.QUADRANT_SIGNS)
    assert (rules.POST, rules.X_IN, rules.X_GATE, rules.ACT) == (
        hooks["hook_post"], hooks["hook_pre_linear"], hooks["hook_pre"], hooks["act"])


def test_the_compiled_argument_struct_is_the_one_ctypes_declares():
    require_kernel()
    dll = kernel_reducer.load_kernel()
    size, offsets = kernel_reducer.ReduceArgs.layout()
    compiled = (kernel_reducer.ctypes.c_int64 * len(offsets))()
    assert dll.gluscope_reduce_args_layout(compiled) == size
    assert list(compiled) == offsets


def test_a_kernel_that_lays_the_struct_out_otherwise_is_refused(monkeypatch, tmp_path):
    """Packing structs to 4 bytes drops the padding after the last int32 field: the check must notice."""
    require_kernel()
    monkeypatch.setenv("GLUSCOPE_CXXFLAGS", "-fpack-struct=4")
    monkeypatch.setenv("GLUSCOPE_CACHE", str(tmp_path))
    kernel_reducer.load_kernel.cache_clear()
    try:
        with pytest.raises(kernel_reducer.KernelUnavailable, match="ReduceArgs"):
            kernel_reducer.load_kernel()
    finally:
        kernel_reducer.load_kernel.cache_clear()


def _tied_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """x_gate, x_in [5, 9, 20] where text 3 repeats text 1 and position 5 repeats position 2 in every text,
    so ties between texts and between positions decide many examples; some values are exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    x_gate = torch.randn(5, 9, 20, generator=gen)
    x_in = torch.randn(5, 9, 20, generator=gen)
    for x in (x_gate, x_in):
        x[3] = x[1]
        x[:, 5] = x[:, 2]
    x_gate[0, 3, :4] = 0.0
    x_in[2, 4, 4:8] = 0.0
    # Neuron 19 is always in gate+_in+, where its hook_post act(x_gate) * x_in underflows to 0.
    x_gate[:, :, 19] = 1e-30
    x_in[:, :, 19] = 1e-30
    # Neuron 17 is always in gate-_in+ (its sign is +1), where act(x_gate) underflows to -0: hook_post 0 in a
    # quadrant whose hook_post is otherwise negative.
    x_gate[:, :, 17] = -200.0
    x_in[:, :, 17] = 1.0
    return x_gate, x_in, np.array([9, 8, 9, 8, 7])


def test_both_reducers_finish_the_same_statistics_and_break_ties_as_the_rules_say():
    require_kernel()
    x_gate, x_in, lengths = _tied_batch()
    sign = torch.where(torch.arange(20) % 3 == 0, -1.0, 1.0)
    setup = LayerSetup(k=3, before=2, after=1, sign=sign, act_fn=activation_function("silu"),
                       text_lengths=lengths)
    batch = Batch.of(lengths, np.arange(5), torch.device("cpu"))
    finished = {}
    for kind in ("kernel", "torch"):
        (reducer,) = make_reducers(kind, [setup])
        reducer.update(x_gate, x_in, batch)
        finished[kind] = reducer.finish()
    kernel, tensor = finished["kernel"], finished["torch"]
    for field in dataclasses.fields(kernel):
        a, b = getattr(kernel, field.name), getattr(tensor, field.name)
        if field.name == "value_mean":
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=field.name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=field.name)

    pp, post = 0, rules.POST
    assert kernel.counts[pp, 19] == (lengths - 1).sum()
    assert kernel.value_min[pp, post, 19] == kernel.value_max[pp, post, 19] == 0
    assert (kernel.example_text[pp, post, 19] == -1).all()

    # Distributions: counts per quadrant add up; the underflowed hook_post sits in the bin [0, 2^-16).
    np_, n_tokens = 2, (lengths - 1).sum()
    assert (kernel.histograms.sum(-1) == kernel.counts.T[:, :, None]).all()
    assert kernel.histograms[17, np_, 0, rules.VALUE_MAG_BINS] == n_tokens
    assert kernel.density.sum((1, 2)).tolist() == kernel.counts.sum(0).tolist()
    # 5 texts for 8 random slots: every text once, then empty slots.
    assert sorted(kernel.sample_text[17, np_, :5].tolist()) == list(range(5))
    assert (kernel.sample_text[17, np_, 5:rules.N_RANDOM] == -1).all()

    text, pos = kernel.example_text, kernel.example_pos
    assert (text >= 0).sum() > 100
    assert not (pos == 5).any()  # position 2 carries the same values and wins
    # Wherever text 3 is an example, its twin text 1 ranks just above it.
    q, h, n, rank = np.nonzero(text == 3)
    assert len(q) > 0 and (rank > 0).all()
    assert (text[q, h, n, rank - 1] == 1).all()
    assert np.array_equal(kernel.example_value[q, h, n, rank - 1], kernel.example_value[q, h, n, rank])


def _model_and_tokens(tiny_llama):
    model = load_model(str(tiny_llama), device="cpu")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.vocab_size, (3, 17), generator=gen)
    tokens[:, 0] = 0
    return model, tokens


def test_native_attention_computes_what_the_bridge_computes_without_its_attention_hooks(tiny_llama):
    """native_attention depends on bridge internals (blocks[i].attn.original_component, instance attributes
    shadowing forward); if the bridge changes under it, the values or the silence of hook_pattern break here."""
    model, tokens = _model_and_tokens(tiny_llama)
    seen: dict[str, torch.Tensor] = {}
    pattern_calls = []

    def keep(x, hook):
        seen[hook.name] = x.clone()

    hooks = [(f"blocks.{layer}.mlp.{name}", keep) for layer in range(model.n_layers)
             for name in ("hook_pre", "hook_pre_linear")]
    hooks.append(("blocks.0.attn.hook_pattern", lambda x, hook: pattern_calls.append(hook.name)))
    with torch.inference_mode():
        model.bridge.run_with_hooks(tokens, return_type=None, fwd_hooks=hooks)
        bridge_values, seen = seen, {}
        assert len(pattern_calls) == 1
        with model.native_attention():
            model.bridge.run_with_hooks(tokens, return_type=None, fwd_hooks=hooks)
        assert len(pattern_calls) == 1, "the bridge's own attention ran: native_attention no longer swaps it out"
        assert seen.keys() == bridge_values.keys() and len(seen) == 2 * model.n_layers
        for name, value in seen.items():
            torch.testing.assert_close(value, bridge_values[name], rtol=1e-4, atol=1e-5, msg=name)
        model.bridge.run_with_hooks(tokens, return_type=None, fwd_hooks=hooks)
    assert len(pattern_calls) == 2  # and leaving the context restores the bridge's attention


def test_the_pass_ends_after_the_last_layers_x_in(tiny_llama, tmp_path):
    from gluscope.recorder.record import record

    model, tokens = _model_and_tokens(tiny_llama)
    ran = []
    for module in (model.bridge.ln_final, model.bridge.unembed):
        module.register_forward_hook(lambda module, args, out: ran.append(type(module).__name__))
    with torch.inference_mode():
        model.bridge(tokens)
    assert len(ran) == 2  # the watch sees a full pass
    ran.clear()
    corpus = Corpus(np.arange(3), [row.numpy().astype(np.int32) for row in tokens], {"max_length": 17})
    record(model, corpus, tmp_path / "stopped.duckdb", dataset="test", compile="off", progress=False)
    assert ran == []
    con = duckdb.connect(str(tmp_path / "stopped.duckdb"), read_only=True)
    last = model.n_layers - 1
    assert con.execute("SELECT count(*) FROM examples WHERE layer = ?", [last]).fetchall()[0][0] > 0
