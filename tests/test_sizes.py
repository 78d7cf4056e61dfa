"""recorder/sizes.py: the expected size against real recordings, the shapes it reads from config.json against the
loaded models', and `gluscope record` printing the size and refusing a folder too small for it.

The refusals write to a real 1 MB tmpfs mounted for the test (root only; elsewhere those tests skip): the one
measurement of the disk, shutil.disk_usage, is the real one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pytest

from gluscope.cli import main as gluscope_main
from gluscope.recorder import sizes

from . import recordings
from .tiny_models import MOE_ARCHITECTURES

# How far the estimate may be from a real file. These tiny files come within 20 %: they are mostly whole 64 KiB
# blocks of small tables, the estimate's least exact part. The 1.4 GB demo recording comes within 5 %
# (benchmarks/fit_sizes.py).
TOLERANCE = 0.35

# Recordings other tests make too (the same arguments share one file): max length 48 and 40, k 16 and 4, two and three
# layers, and two mixture-of-experts layouts (every layer routed; a dense first layer and a shared expert).
RECORDED = {
    "2 layers, k 16": (lambda: recordings.model("llama"),
                       ("--source-column", "source", "--max-length", "48", "--batch-size", "4")),   # conftest.py
    "3 layers": (lambda: recordings.model("llama", n_layers=3, perturb_norms=True),
                 ("--max-length", "40", "--batch-size", "4")),                                      # test_finding.py
    "k 4": (lambda: recordings.model("llama"),
            ("--max-length", "40", "--batch-size", "3", "--k", "4")),                                 # test_shards.py
    "OLMoE": (lambda: recordings.model("olmoe", d_mlp=32, n_layers=2), ("--max-length", "40")),  # test_moe_server.py
    "DeepSeek-V3": (lambda: recordings.model("deepseek_v3", d_mlp=32, n_layers=3), ("--max-length", "40")),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", RECORDED)
def test_estimate_is_near_the_recorded_file(name):
    make_model, options = RECORDED[name]
    model = make_model()
    path = recordings.record(model, recordings.corpus(), *options)
    con = duckdb.connect(str(path), read_only=True)
    k, before, after = con.execute("SELECT k, window_before, window_after FROM metadata").fetchone()
    lengths = np.array([n for (n,) in con.execute("SELECT n_tokens FROM texts ORDER BY text_id").fetchall()])
    con.close()
    estimate = sizes.estimate(sizes.shape_from_folder(model), lengths, k=k, window_before=before, window_after=after)
    real = path.stat().st_size
    assert abs(estimate.total / real - 1) <= TOLERANCE, (estimate.total, real, estimate.tables)


# Published configs (the keys sizes.py reads) and the neurons per layer they mean.
CONFIGS = {
    "OLMoE-1B-7B-0924": ({"num_hidden_layers": 16, "intermediate_size": 1024, "num_experts": 64,
                          "num_experts_per_tok": 8, "vocab_size": 50304}, [65536] * 16),
    "Mixtral-8x7B": ({"num_hidden_layers": 32, "intermediate_size": 14336, "num_local_experts": 8,
                      "num_experts_per_tok": 2, "vocab_size": 32000}, [8 * 14336] * 32),
    "Qwen1.5-MoE-A2.7B": ({"num_hidden_layers": 24, "intermediate_size": 5632, "moe_intermediate_size": 1408,
                           "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
                           "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936},
                          [60 * 1408 + 5632] * 24),
    "Qwen3-30B-A3B, layer 0 dense": ({"num_hidden_layers": 48, "intermediate_size": 6144, "moe_intermediate_size": 768,
                                      "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
                                      "mlp_only_layers": [0], "vocab_size": 151936}, [6144] + [128 * 768] * 47),
    "DeepSeek-V3": ({"num_hidden_layers": 61, "intermediate_size": 18432, "moe_intermediate_size": 2048,
                     "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
                     "first_k_dense_replace": 3, "moe_layer_freq": 1, "vocab_size": 129280},
                    [18432] * 3 + [257 * 2048] * 58),
    "OLMo-7B-0424, dense": ({"num_hidden_layers": 32, "intermediate_size": 11008, "vocab_size": 50304}, [11008] * 32),
}


@pytest.mark.unit
@pytest.mark.parametrize("name", CONFIGS)
def test_shape_from_published_configs(name):
    config, widths = CONFIGS[name]
    shape = sizes.shape_from_config(config)
    assert [layer.neurons for layer in shape.layers] == widths
    assert shape.vocab_size == config["vocab_size"]


@pytest.mark.integration
@pytest.mark.parametrize("arch", [*MOE_ARCHITECTURES, "llama"])
def test_shape_from_config_is_the_loaded_models(arch):
    """What config.json says before the model is loaded is what the loaded model's layers hold."""
    from gluscope.recorder.model import load_model

    folder = recordings.model(arch)
    assert sizes.shape_from_folder(folder) == sizes.shape_from_model(load_model(str(folder), device="cpu"))


@pytest.mark.unit
def test_an_expert_neuron_costs_at_most_a_dense_one():
    """On the paper's 20M tokens an expert neuron's lists fill from its routed tokens as a dense neuron's do, and the
    NaN in its windows (neighbours routed elsewhere) take less room; the router's tables add less than that saves."""
    lengths = np.full(20_000, 1001)
    shapes = {"dense": CONFIGS["OLMo-7B-0424, dense"][0], "moe": CONFIGS["OLMoE-1B-7B-0924"][0]}
    est = {name: sizes.estimate(sizes.shape_from_config(config), lengths) for name, config in shapes.items()}
    neurons = {"dense": 32 * 11008, "moe": 16 * 65536}
    per_neuron = {name: {t: size / neurons[name] for t, size in e.tables.items()} for name, e in est.items()}
    assert per_neuron["moe"]["examples"] == pytest.approx(per_neuron["dense"]["examples"])
    assert per_neuron["moe"]["samples"] == pytest.approx(per_neuron["dense"]["samples"])
    assert per_neuron["moe"]["windows"] < per_neuron["dense"]["windows"]
    assert est["moe"].total / neurons["moe"] <= est["dense"].total / neurons["dense"]
    bound = 16 * 64 * 50304 * sizes.BYTES["expert_tokens"]  # layers x experts x distinct tokens
    assert est["moe"].tables["expert_tokens"] == pytest.approx(bound)


# --- gluscope record on a disk too small -----------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB tmpfs: smaller than any recording."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mounting a 1 MB tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def expected_line(model: Path, lengths: np.ndarray) -> str:
    shape = sizes.shape_from_folder(model)
    size = sizes.estimate(shape, lengths).total
    tokens = int((lengths - 1).sum())
    return f"expected database size: about {sizes.human(size)} (2 layers × 96 neurons, {tokens:,} tokens)"


@pytest.mark.integration
def test_record_refuses_before_loading_the_model(tiny_llama, corpus_file, small_disk, tmp_path, capsys):
    """A model folder and a corpus folder: the size is known before the model loads. This folder holds the config and
    the tokenizer but no weights, so only a check made before loading can answer."""
    from gluscope.recorder.corpus import load_corpus

    corpus = tmp_path / "corpus"
    assert gluscope_main(["dataset", str(corpus_file), "--tokenizer", str(tiny_llama), "--out", str(corpus)]) == 0
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_llama, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    capsys.readouterr()
    out = small_disk / "runs" / "a.duckdb"
    assert gluscope_main(["record", "--model", str(no_weights), "--dataset", str(corpus), "--out", str(out),
                          *recordings.CPU]) == 2
    printed = capsys.readouterr()
    assert printed.out.strip() == expected_line(tiny_llama, load_corpus(corpus).lengths)
    (error,) = printed.err.strip().splitlines()
    assert error.startswith(f"gluscope record: error: --out {out}: its folder has 1.0 MB free"), error
    assert "--no-size-check" in error
    assert list(small_disk.iterdir()) == []  # not even the folder `runs`


@pytest.mark.integration
def test_record_refuses_once_the_texts_are_tokenized(tiny_llama, corpus_file, small_disk, capsys):
    """Texts to tokenize: the size is known once the model's tokenizer has cut them, still before any recording."""
    out = small_disk / "a.duckdb"
    assert gluscope_main(["record", "--model", str(tiny_llama), "--dataset", str(corpus_file), "--out", str(out),
                          "--max-length", "48", *recordings.CPU]) == 2
    printed = capsys.readouterr()
    line = next(line for line in printed.out.splitlines() if line.startswith("expected database size"))
    con = duckdb.connect(str(recordings.record(tiny_llama, corpus_file, *RECORDED["2 layers, k 16"][1])),
                         read_only=True)  # the same texts, recorded
    lengths = np.array([n for (n,) in con.execute("SELECT n_tokens FROM texts").fetchall()])
    con.close()
    assert line == expected_line(tiny_llama, lengths)
    assert "its folder has 1.0 MB free" in printed.err.strip().splitlines()[-1]
    assert list(small_disk.iterdir()) == []


@pytest.mark.integration
def test_no_size_check_records_until_the_disk_is_full(tiny_llama, corpus_file, small_disk, capsys):
    """--no-size-check goes on; the write then fails on the full disk, and still leaves nothing."""
    out = small_disk / "a.duckdb"
    assert gluscope_main(["record", "--model", str(tiny_llama), "--dataset", str(corpus_file), "--out", str(out),
                          "--max-length", "24", "--max-tokens", "300", "--no-size-check", *recordings.CPU]) == 2
    printed = capsys.readouterr()
    assert "expected database size: about" in printed.out
    assert f"cannot write {out}" in printed.err.strip().splitlines()[-1]
    assert list(small_disk.iterdir()) == []
