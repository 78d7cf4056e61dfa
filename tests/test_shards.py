"""Shards and merge: `record --shard I/N` and `gluscope merge` give the file a single run writes; so does torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from gluscope.recorder import rules

from . import recordings
from .brute_force import sample_hash
from .processes import assert_user_error, free_port

# Every table and its key; metadata is compared apart (created_at differs by design).
TABLES = {
    "texts": "text_id",
    "vocab": "token_id",
    "neurons": "layer, neuron",
    "value_stats": "layer, neuron, quadrant, hook",
    "examples": "layer, neuron, quadrant, hook, rank",
    "windows": "layer, neuron, text_id, position",
    "weight_tokens": "layer, neuron, kind, rank",
    "token_neurons": "token_id, kind, rank",
    "related": "layer, neuron, direction, via, rank",
    "example_tokens": "key",
    "histogram_bins": "axis, bin",
    "histograms": "layer, neuron, quadrant, hook",
    "density": "layer, neuron, gate_bin",
    "intervals": "layer, neuron, quadrant, interval",
    "samples": "layer, neuron, quadrant, kind, interval, rank",
    "layers": "layer",
}
# Mixture-of-experts files only; the columns of sums over tokens compare within float rounding, apart.
MOE_TABLES = {
    "experts": "layer, expert",
    "expert_tokens": "layer, expert, token_id",
    "expert_examples": "layer, expert, rank",
    "routed_values": "layer, neuron, quadrant",
}
SUMS = {"value_stats": "mean", "routed_values": "mean", "experts": "weight_sum", "expert_tokens": "weight_sum"}
OPTIONS = ("--max-length", "40", "--batch-size", "3", "--k", "4")


@pytest.fixture(scope="module")
def single(tiny_llama, corpus_file) -> Path:
    return recordings.record(tiny_llama, corpus_file, *OPTIONS)


@pytest.fixture(scope="module")
def shards(tiny_llama, corpus_file) -> list[Path]:
    return [recordings.record(tiny_llama, corpus_file, *OPTIONS, "--shard", f"{i}/3") for i in range(3)]


def assert_same_recording(got: Path, want: Path) -> None:
    """Every table equal row for row; means within 1e-12 relative; metadata equal but for its creation time."""
    con = duckdb.connect(str(got), read_only=True)
    con.execute(f"ATTACH '{want}' AS want (READ_ONLY)")
    moe = con.execute("SELECT count(*) FROM want.experts").fetchone()[0] > 0
    for table, key in {**TABLES, **(MOE_TABLES if moe else {})}.items():
        columns = f"* EXCLUDE ({SUMS[table]})" if table in SUMS else "*"
        n = con.execute(f"SELECT count(*) FROM want.{table}").fetchone()[0]
        assert n > 0 and n == con.execute(f"SELECT count(*) FROM {table}").fetchone()[0], table
        differ = con.execute(f"""SELECT count(*) FROM (
            (SELECT {columns} FROM {table} EXCEPT ALL SELECT {columns} FROM want.{table})
            UNION ALL (SELECT {columns} FROM want.{table} EXCEPT ALL SELECT {columns} FROM {table}))""").fetchone()[0]
        assert differ == 0, f"{table}: {differ} rows differ"
        if table in SUMS:
            sums = con.execute(f"""SELECT a.{SUMS[table]}, b.{SUMS[table]} FROM {table} a JOIN want.{table} b
                                   USING ({key}) ORDER BY ALL""").fetchall()
            a = np.array([m[0] if m[0] is not None else np.nan for m in sums])
            b = np.array([m[1] if m[1] is not None else np.nan for m in sums])
            assert (np.isnan(a) == np.isnan(b)).all(), table
            np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=1e-12, atol=0, err_msg=table)
    got_meta = con.execute("SELECT * EXCLUDE (created_at) FROM metadata").fetchall()
    want_meta = con.execute("SELECT * EXCLUDE (created_at) FROM want.metadata").fetchall()
    assert got_meta == want_meta
    con.close()


@pytest.mark.integration
def test_shards_hold_whole_batches_with_global_text_ids(shards, single):
    con = duckdb.connect(str(single), read_only=True)
    n_texts, n_tokens = con.execute("SELECT n_texts, n_tokens FROM metadata").fetchone()
    all_ids = {i for (i,) in con.execute("SELECT text_id FROM texts").fetchall()}
    con.close()
    seen, tokens = set(), 0
    for i, path in enumerate(shards):
        con = duckdb.connect(str(path), read_only=True)
        assert con.execute("SELECT shard_index, shard_count FROM metadata").fetchone() == (i, 3)
        ids = {t for (t,) in con.execute("SELECT text_id FROM texts").fetchall()}
        tokens += con.execute("SELECT n_tokens FROM metadata").fetchone()[0]
        con.close()
        assert ids and not ids & seen
        seen |= ids
    assert seen == all_ids and tokens == n_tokens and len(seen) == n_texts


@pytest.mark.integration
def test_merged_shards_equal_the_single_run(shards, single, tmp_path):
    from gluscope.cli import main as gluscope_main

    out = tmp_path / "merged.duckdb"
    # Any order of the files on the command line.
    assert gluscope_main(["merge", str(shards[2]), str(shards[0]), str(shards[1]), "--out", str(out)]) == 0
    assert_same_recording(out, single)


@pytest.mark.integration
def test_mixture_of_experts_shards_merge_to_the_single_run(tmp_path):
    """Expert neurons, router counts, weight histograms, token counts, top texts and routed values add up."""
    from gluscope.cli import main as gluscope_main

    from .test_moe_bruteforce import record

    corpus = recordings.corpus("distinct")
    single = record("qwen2_moe", "kernel", True, corpus, "--k", "4")
    parts = [record("qwen2_moe", "kernel", True, corpus, "--k", "4", "--shard", f"{i}/2") for i in range(2)]
    out = tmp_path / "merged.duckdb"
    assert gluscope_main(["merge", str(parts[1]), str(parts[0]), "--out", str(out)]) == 0
    assert_same_recording(out, single)


@pytest.mark.integration
@pytest.mark.parametrize("arch, option, ranges", [("qwen2_moe", "--experts", ("3-5", "0-2")),
                                                  ("deepseek_v3", "--layers", ("1-2", "0"))])
def test_a_run_recorded_in_parts_merges_to_the_single_run(arch, option, ranges, tmp_path, gluscope_here):
    """Parts by experts (the shared expert goes with experts 0-2) and by layers (a dense layer, then MoE layers):
    every table, token_neurons' ranks and the related lists included, as the single run writes them."""
    from gluscope.cli import main as gluscope_main

    from .test_moe_bruteforce import record

    corpus = recordings.corpus("distinct")
    single = record(arch, "kernel", True, corpus, "--k", "4")
    parts = [record(arch, "kernel", True, corpus, "--k", "4", option, r) for r in ranges]
    con = duckdb.connect(str(parts[0]), read_only=True)
    assert con.execute("SELECT count(*) FROM neurons").fetchone()[0] < duckdb.connect(
        str(single), read_only=True).execute("SELECT count(*) FROM neurons").fetchone()[0]
    con.close()
    out = tmp_path / "merged.duckdb"
    assert gluscope_main(["merge", *map(str, parts), "--out", str(out)]) == 0
    assert_same_recording(out, single)
    # A part is not served alone; one part alone, or the same part twice, is not merged; nothing is written.
    from gluscope.server.db import DatabaseFileError, open_databases
    with pytest.raises(DatabaseFileError, match="a part of a recording .*; merge its parts"):
        open_databases([parts[0]])
    for given, says in (([parts[0]], "do not cover the model"), ([parts[0], parts[0]], "overlap")):
        r = gluscope_here("merge", *map(str, given), "--out", str(tmp_path / "bad.duckdb"))
        assert_user_error(r, says)
        assert not (tmp_path / "bad.duckdb").exists()


@pytest.mark.integration
def test_merge_refuses_what_is_not_one_run(shards, single, tiny_llama, corpus_file, tmp_path, gluscope_here):
    out = tmp_path / "never.duckdb"
    assert_user_error(gluscope_here("merge", str(shards[0]), str(shards[1]), "--out", str(out)), "shard 2/3", "missing")
    assert_user_error(gluscope_here("merge", str(shards[0]), str(shards[0]), str(shards[1]), "--out", str(out)),
                      "both shard 0/3")
    assert_user_error(gluscope_here("merge", str(single), str(shards[0]), "--out", str(out)), "whole recording")
    other = recordings.record(tiny_llama, corpus_file, *OPTIONS, "--shard", "1/3", "--k", "5")
    assert_user_error(gluscope_here("merge", str(shards[0]), str(other), str(shards[2]), "--out", str(out)),
                      "not shards of one run", "their k differs")
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"\0" * 5000)
    assert_user_error(gluscope_here("merge", str(junk), "--out", str(out)), "not a readable DuckDB file")
    assert_user_error(gluscope_here("merge", str(tmp_path / "missing.duckdb"), "--out", str(out)), "no such file")
    assert not out.exists()
    for bad in ("3/3", "x", "1/0", "-1/2"):
        assert_user_error(gluscope_here("record", "--model", str(tiny_llama), "--dataset", str(corpus_file),
                                        "--out", str(out), *recordings.CPU, *OPTIONS, "--shard", bad), "--shard")


@pytest.mark.system
@pytest.mark.slow
def test_torchrun_on_two_cpu_processes_equals_the_single_run(single, tiny_llama, corpus_file, tmp_path):
    pytest.importorskip("torch.distributed.run")
    out = tmp_path / "torchrun.duckdb"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(free_port()), "-m", "gluscope", "record", "--model", str(tiny_llama), "--dataset",
                        str(corpus_file), "--out", str(out), *recordings.CPU, *OPTIONS],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "merged 2 shards" in r.stdout
    assert_same_recording(out, single)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torchrun.duckdb"]


@pytest.mark.unit
def test_the_merge_recomputes_the_documented_sample_hash():
    """merge ranks samples by rules.hash_of (the file stores no hash): schema.sql's formula, row by row."""
    rng = np.random.default_rng(3)
    seed = 1234567
    cols = [torch.from_numpy(rng.integers(0, hi, 500)) for hi in (40, 70000, 2 ** 20, 4096)]
    got = rules.hash_of(seed, *cols).tolist()
    assert got == [sample_hash(seed, *(int(c[i]) for c in cols)) for i in range(500)]
