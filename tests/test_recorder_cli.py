"""`gluscope dataset` and `gluscope record` as a user runs them: outputs, and every bad input."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest

from gluscope.recorder.corpus import load_corpus

from gluscope.cli import main as gluscope_main

from . import recordings
from .processes import assert_user_error, run_cli


@pytest.mark.integration
def test_dataset_then_record_from_folder(tiny_llama, corpus_file, tmp_path):
    folder = tmp_path / "ds"
    assert gluscope_main(["dataset", str(corpus_file), "--tokenizer", str(tiny_llama), "--out", str(folder),
                          "--max-length", "16", "--max-tokens", "200", "--seed", "3"]) == 0
    corpus = load_corpus(folder)
    lengths = corpus.lengths
    assert lengths.max() <= 16 and (lengths >= 2).all()
    assert lengths.sum() >= 200 and lengths[:-1].sum() < 200  # stops at the first text that reaches max-tokens
    assert all(t[0] == 0 for t in corpus.token_ids)  # BOS first
    assert len(set(corpus.source_index.tolist())) == corpus.n_texts
    expected_rows = np.random.default_rng(3).permutation(len(corpus_file.read_text().splitlines()))
    assert corpus.source_index.tolist() == expected_rows[:corpus.n_texts].tolist()

    out = tmp_path / "from-folder.duckdb"
    assert gluscope_main(["record", "--model", str(tiny_llama), "--dataset", str(folder), "--out", str(out),
                          "--device", "cpu"]) == 0
    con = duckdb.connect(str(out), read_only=True)
    n_texts, n_tokens, max_length = con.execute("SELECT n_texts, n_tokens, max_length FROM metadata").fetchone()
    assert (n_texts, n_tokens, max_length) == (corpus.n_texts, int((lengths - 1).sum()), 16)
    stored = con.execute("SELECT source_index FROM texts ORDER BY text_id").fetchall()
    assert [s for (s,) in stored] == corpus.source_index.tolist()


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["olmo", "olmo2", "mistral", "qwen2", "gemma2"])
def test_other_gated_architectures_record(arch, corpus_file):
    out = recordings.record(recordings.model(arch), corpus_file, "--max-length", "24", "--max-tokens", "300")
    con = duckdb.connect(str(out), read_only=True)
    n_tokens, n_layers, d_mlp = con.execute("SELECT n_tokens, n_layers, d_mlp FROM metadata").fetchone()
    totals = con.execute("SELECT max(count_pp + count_pn + count_np + count_nn), count(*) FROM neurons").fetchone()
    assert totals == (n_tokens, n_layers * d_mlp)  # random weights: no exact zeros
    assert con.execute("SELECT count(*) FROM examples").fetchone()[0] > 0


@pytest.mark.integration
def test_text_files_and_parquet_sources(tiny_llama, tmp_path):
    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(3):
        (txt / f"{i}.txt").write_text(f"document {i}\nwith two lines\n")
    assert gluscope_main(["dataset", str(txt), "--tokenizer", str(tiny_llama), "--out", str(tmp_path / "a")]) == 0
    assert load_corpus(tmp_path / "a").n_texts == 3  # one text per file, not per line

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["first text", "second text"]}), tmp_path / "t.parquet")
    assert gluscope_main(["dataset", str(tmp_path / "t.parquet"), "--text-column", "body", "--tokenizer",
                          str(tiny_llama), "--out", str(tmp_path / "b")]) == 0
    assert load_corpus(tmp_path / "b").n_texts == 2


@pytest.mark.integration
def test_not_gated_model_is_refused(corpus_file, tmp_path, gluscope_here):
    gpt2 = recordings.model("gpt2")
    out = tmp_path / "gpt2.duckdb"
    r = gluscope_here("record", "--model", str(gpt2), "--dataset", str(corpus_file), "--out", str(out))
    assert_user_error(r, "no gated MLP")
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


@pytest.mark.system
def test_unknown_model_path(corpus_file, tmp_path):
    """As a user's shell sees a refusal: a process of its own, exit status 2, one line (the other refusals run
    in this process)."""
    r = run_cli("record", "--model", str(tmp_path / "no-such-model"), "--dataset", str(corpus_file),
                "--out", str(tmp_path / "x.duckdb"))
    assert_user_error(r, "no such folder")
    assert r.returncode == 2


@pytest.mark.integration
@pytest.mark.parametrize("k, words", [("0", "--k must be at least 1"), ("129", "--k must be at most 128")])
def test_a_list_length_out_of_range_is_refused(tiny_llama, corpus_file, tmp_path, k, words, gluscope_here):
    out = tmp_path / "x.duckdb"
    r = gluscope_here("record", "--model", str(tiny_llama), "--dataset", str(corpus_file), "--out", str(out),
                      "--k", k)
    assert_user_error(r, words)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary


@pytest.mark.integration
def test_folder_that_is_not_a_model(corpus_file, tmp_path, gluscope_here):
    r = gluscope_here("record", "--model", str(tmp_path), "--dataset", str(corpus_file),
                      "--out", str(tmp_path / "x.duckdb"))
    assert_user_error(r, "config.json")


@pytest.mark.integration
def test_missing_text_column(tiny_llama, corpus_file, tmp_path, gluscope_here):
    out = tmp_path / "x.duckdb"
    r = gluscope_here("record", "--model", str(tiny_llama), "--dataset", str(corpus_file), "--out", str(out),
                      "--text-column", "body")
    assert_user_error(r, "no column 'body'", "--text-column")
    assert not out.exists()


@pytest.mark.integration
def test_empty_dataset(tiny_llama, tmp_path, gluscope_here):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    out = tmp_path / "x.duckdb"
    r = gluscope_here("record", "--model", str(tiny_llama), "--dataset", str(empty), "--out", str(out))
    assert_user_error(r, "nothing to record")
    assert not out.exists()


@pytest.mark.integration
def test_missing_dataset(tiny_llama, tmp_path, gluscope_here):
    r = gluscope_here("record", "--model", str(tiny_llama), "--dataset", str(tmp_path / "nope.jsonl"),
                      "--out", str(tmp_path / "x.duckdb"))
    assert_user_error(r, "no such file")


@pytest.mark.integration
def test_existing_output_needs_overwrite(tiny_llama, corpus_file, tmp_path, gluscope_here):
    out = tmp_path / "exists.duckdb"
    out.write_bytes(b"precious")
    args = ["record", "--model", str(tiny_llama), "--dataset", str(corpus_file), "--out", str(out),
            "--max-tokens", "100"]
    assert_user_error(gluscope_here(*args), "already exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    r = gluscope_here(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert duckdb.connect(str(out), read_only=True).execute("SELECT n_texts FROM metadata").fetchone()[0] > 0


@pytest.mark.integration
def test_corpus_of_another_tokenizer_is_refused(tiny_llama, corpus_file, tmp_path, gluscope_here):
    other = recordings.copy_of(recordings.model("gemma"), tmp_path / "model")  # its tokenizer changes below
    folder = tmp_path / "ds"
    assert gluscope_main(["dataset", str(corpus_file), "--tokenizer", str(other), "--out", str(folder)]) == 0
    # Same training texts, so the vocabularies only differ if the tokenizers do: plant a difference.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    assert gluscope_main(["dataset", str(corpus_file), "--tokenizer", str(other), "--out", str(folder),
                          "--overwrite"]) == 0
    r = gluscope_here("record", "--model", str(tiny_llama), "--dataset", str(folder),
                      "--out", str(tmp_path / "x.duckdb"))
    assert_user_error(r, "another tokenizer")


@pytest.mark.integration
def test_a_mixture_of_experts_layout_glu_scope_cannot_read_is_refused_plainly(corpus_file, tmp_path, gluscope_here):
    """GraniteMoe keeps its experts elsewhere than `mlp.experts`, in other tensors: one line naming what GLUScope
    reads instead, and no output left behind."""
    model = recordings.model("granitemoe", d_model=32, d_mlp=16, n_layers=1)
    out = tmp_path / "out.duckdb"
    r = gluscope_here("record", "--model", str(model), "--dataset", str(corpus_file), "--out", str(out))
    assert_user_error(r, "GraniteMoeMoE, at `block_sparse_moe`", "mlp.experts", "gate_up_proj")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_a_model_too_large_for_the_gpu_is_refused_before_loading(tiny_llama):
    import torch

    from gluscope.errors import UserError
    from gluscope.recorder.model import refuse_if_too_large, weight_count

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    # Tied tensors are saved once: count each storage once.
    assert weight_count(tiny_llama) == sum({p.data_ptr(): p.numel() for p in model.state_dict().values()}.values())
    need = weight_count(tiny_llama) * 2
    refuse_if_too_large("tiny", tiny_llama, torch.bfloat16, need)  # fits exactly
    with pytest.raises(UserError, match="more than the GPU's"):
        refuse_if_too_large("tiny", tiny_llama, torch.bfloat16, need - 1)

