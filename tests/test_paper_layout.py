"""`gluscope export --format gluscope-hf` against the recording's own tables and the original tool's rules.

Every expected number is read from the database with plain SQL and padded here, never through
gluscope.paper_layout; the expected column names are built here from the original's naming rule
(summary_dict_to_hf_dataset.py over the keys b_activations.py makes). The paper's Figure 4 runs as
docs/paper-layout.md prints it and must give the SQL of docs/database.md.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gluscope import paper_layout
from gluscope.cli import main

from . import recordings

ROOT = Path(__file__).resolve().parent.parent

# The original's names (utils.CASES, utils.VALUES_TO_SUMMARISE, b_activations.REDUCTIONS), its signs
# (utils.RELEVANT_SIGNS) and our codes for them (the `quadrants` and `hooks` tables: swish is `act`).
CASES = ["gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-"]
VALUES = ["hook_post", "hook_pre_linear", "hook_pre", "swish"]
OUR_HOOK = {"hook_post": 0, "hook_pre_linear": 1, "hook_pre": 2, "swish": 3}


def relevant_sign(case: str, value: str) -> int:
    gate, x_in = (1 if case.startswith("gate+") else -1), (1 if case.endswith("+") else -1)
    return {"hook_pre_linear": x_in, "hook_pre": gate, "swish": -1, "hook_post": gate * x_in}[value]


def original_keys() -> list[tuple[str, ...]]:
    """The summary dict's keys in insertion order (b_activations._get_all_neuron_acts)."""
    keys: list[tuple[str, ...]] = []
    for case in CASES:
        keys.append((case, "freq"))
        for value in VALUES:
            for reduction in ("max", "sum"):
                if not (value == "swish" and case.startswith("gate+") and reduction == "max"):
                    keys.append((case, value, reduction))
    return keys


def original_columns() -> list[str]:
    """summary_dict_to_hf_dataset.py's columns for those keys."""
    columns = ["layer", "neuron"]
    for key in original_keys():
        name = "_".join(key).replace("sum", "mean")
        columns += [f"{name}_values", f"{name}_indices"] if key[-1] == "max" else [name]
    return columns


def top_lists() -> list[tuple[str, str]]:
    return [(key[0], key[1]) for key in original_keys() if key[-1] == "max"]


def export(db: Path, out: Path) -> Path:
    assert main(["export", str(db), "--format", "gluscope-hf", "--out", str(out)]) == 0
    return out


def read(folder: Path) -> pa.Table:
    files = sorted(folder.glob("train-*-of-*.parquet"))
    assert files and all(f.name.endswith(f"-of-{len(files):05d}.parquet") for f in files), files
    return pa.concat_tables([pq.read_table(f) for f in files])


def padded(values: list[float], ids: list[int], k: int, n_texts: int) -> tuple[list[float], list[int]]:
    """A list filled up to k as docs/paper-layout.md says: value 0 at the lowest text ids outside it."""
    fillers = [t for t in range(n_texts) if t not in ids][:k - len(ids)]
    return values + [0.0] * (k - len(values)), ids + fillers


def expected_lists(con: duckdb.DuckDBPyConnection, k: int, n_texts: int) -> dict[tuple, tuple[list, list]]:
    rows = con.execute("""SELECT layer, neuron, quadrant, hook, list(value ORDER BY rank), list(text_id ORDER BY rank)
                          FROM examples GROUP BY ALL""").fetchall()
    return {tuple(r[:4]): padded(list(r[4]), list(r[5]), k, n_texts) for r in rows}


def check_neurons(con: duckdb.DuckDBPyConnection, table: pa.Table, denominators: dict[tuple, float | None]) -> None:
    """Every number of the summary against the tables: frequencies, means, top values and indices."""
    (k, n_texts) = con.execute("SELECT least(k, n_texts), n_texts FROM metadata").fetchone()
    rows = table.to_pylist()
    ordered = con.execute("SELECT layer, neuron FROM neurons ORDER BY layer, neuron").fetchall()
    assert [(r["layer"], r["neuron"]) for r in rows] == [tuple(key) for key in ordered]
    counts = {(r[0], r[1]): r[2:] for r in con.execute(
        "SELECT layer, neuron, count_pp, count_pn, count_np, count_nn FROM neurons").fetchall()}
    means = {tuple(r[:4]): r[4] for r in con.execute(
        "SELECT layer, neuron, quadrant, hook, mean FROM value_stats").fetchall()}
    lists = expected_lists(con, k, n_texts)
    for row in rows:
        key, tokens = (row["layer"], row["neuron"]), denominators[(row["layer"], row["neuron"])]
        for q, case in enumerate(CASES):
            freq = counts[key][q] / tokens if tokens else math.nan
            assert row[f"{case}_freq"] == pytest.approx(freq, rel=1e-6, nan_ok=True), (key, case)
            for value in VALUES:
                mean = means.get((*key, q, OUR_HOOK[value]))
                assert row[f"{case}_{value}_mean"] == pytest.approx(math.nan if mean is None else mean, rel=1e-6,
                                                                     abs=1e-7, nan_ok=True), (key, case, value)
        for case, value in top_lists():
            q = CASES.index(case)
            want = lists.get((*key, q, OUR_HOOK[value]), padded([], [], k, n_texts))
            got_values, got_ids = row[f"{case}_{value}_max_values"], row[f"{case}_{value}_max_indices"]
            assert got_values == pytest.approx(want[0]) and got_ids == want[1], (key, case, value)
            assert all(v * relevant_sign(case, value) >= 0 for v in got_values), (key, case, value)


@pytest.fixture(scope="module")
def exported(recorded_db, tmp_path_factory) -> Path:
    """The recording exported with shards small enough that both datasets come in several files."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(paper_layout, "NEURONS_PER_SHARD", 96)  # one layer a file
        m.setattr(paper_layout, "TOKENS_PER_SHARD", 1000)
        return export(recorded_db, tmp_path_factory.mktemp("export") / "gluscope-export")


@pytest.mark.integration
def test_the_columns_are_the_originals_with_its_dtypes(exported, con):
    table = read(exported / "data")
    assert len(list((exported / "data").iterdir())) == 2 and len(list((exported / "texts").iterdir())) > 1
    assert len(original_columns()) == 50
    assert table.column_names == original_columns()
    (k,) = con.execute("SELECT least(k, n_texts) FROM metadata").fetchone()
    for field in table.schema:
        name = field.name
        want = {"layer": pa.int64(), "neuron": pa.int64()}.get(name) or (
            pa.list_(pa.float32()) if name.endswith("_values") else
            pa.list_(pa.int64()) if name.endswith("_indices") else pa.float32())
        assert field.type == want, (name, field.type)
        if name.endswith(("_values", "_indices")):
            assert {len(x) for x in table[name].to_pylist()} == {k}, name


@pytest.mark.integration
def test_every_number_matches_the_tables(exported, con):
    (n_tokens,) = con.execute("SELECT n_tokens FROM metadata").fetchone()
    keys = con.execute("SELECT layer, neuron FROM neurons").fetchall()
    check_neurons(con, read(exported / "data"), {tuple(key): n_tokens for key in keys})


@pytest.mark.integration
def test_the_texts_are_the_recorded_texts_and_the_indices_point_into_them(exported, con):
    texts = read(exported / "texts").to_pylist()
    vocab = dict(con.execute("SELECT token_id, token_bytes FROM vocab").fetchall())
    recorded = con.execute("SELECT text_id, token_ids, source_index, source FROM texts ORDER BY text_id").fetchall()
    assert [t["text_id"] for t in texts] == list(range(len(recorded))) == [r[0] for r in recorded]
    for text, (_, ids, source_index, source) in zip(texts, recorded):
        assert text["input_ids"] == ids and text["attention_mask"] == [1] * len(ids)
        assert (text["source_index"], text["source"]) == (source_index, source)
        assert text["text"] == b"".join(vocab[i] for i in ids[1:]).decode("utf-8", errors="replace")
    schema = pq.read_schema(sorted((exported / "texts").glob("*.parquet"))[0])
    assert schema.field("input_ids").type == pa.list_(pa.int32())
    assert schema.field("attention_mask").type == pa.list_(pa.int8())
    indices = {i for name in read(exported / "data").column_names if name.endswith("_indices")
               for row in read(exported / "data")[name].to_pylist() for i in row}
    assert indices <= set(range(len(texts)))


def figure_4(recording: Path, export_dir: Path, layer: int) -> dict:
    """Run docs/paper-layout.md's Figure 4 block with only the paths and the layer filled in."""
    doc = (ROOT / "docs" / "paper-layout.md").read_text(encoding="utf-8")
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "stats.pearsonr" in b]
    for old, new in (("'recording.duckdb'", repr(str(recording))), ("'gluscope-export'", repr(str(export_dir))),
                     ("layer=15", f"layer={layer}")):
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "docs/paper-layout.md", "exec"), namespace)
    namespace["con"].close()
    return namespace


@pytest.mark.integration
def test_the_papers_figure_4_gives_the_correlation_of_the_sql(recorded_db, exported, con, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    # The SQL of docs/database.md ("Reading the file directly").
    sql = con.execute("""
        SELECT layer, corr((count_pp + count_pn) / m.n_tokens, cos_in_out) AS r, count(*) AS neurons
        FROM neurons, metadata m
        GROUP BY layer ORDER BY layer""").fetchall()
    assert len(sql) > 1
    for layer, r, _ in sql:
        found = figure_4(recorded_db, exported, layer)
        assert float(found["corr_and_p"].statistic) == pytest.approx(r, abs=1e-5), layer


@pytest.mark.integration
def test_the_documented_load_dataset_calls(exported, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    summary, texts = read(exported / "data"), read(exported / "texts")
    for neurons in (datasets.load_dataset("parquet", data_dir=str(exported)),
                    datasets.load_dataset(str(exported))):
        assert list(neurons) == ["train"] and neurons["train"].column_names == summary.column_names
        assert neurons["train"]["neuron"][:] == summary["neuron"].to_pylist()
    for loaded in (datasets.load_dataset("parquet", data_dir=str(exported / "texts")),
                   datasets.load_dataset(str(exported), "texts")):
        assert loaded["train"]["text"][:] == texts["text"].to_pylist()


@pytest.mark.integration
def test_a_mixture_of_experts_file_adds_the_expert_and_counts_its_tokens(tmp_path):
    from .test_moe_bruteforce import moe_model

    db = recordings.record(moe_model("deepseek_v3"), recordings.corpus(), "--max-length", "40")
    out = export(db, tmp_path / "moe")
    table = read(out / "data")
    original = original_columns()
    assert table.column_names == original[:2] + ["expert", "expert_neuron"] + original[2:]
    assert table.schema.field("expert").type == table.schema.field("expert_neuron").type == pa.int64()
    con = duckdb.connect(str(db), read_only=True)
    try:
        (n_tokens,) = con.execute("SELECT n_tokens FROM metadata").fetchone()
        experts = con.execute("SELECT layer, expert, first_neuron, n_neurons, tokens FROM experts").fetchall()
        widths = dict(con.execute("SELECT layer, n_neurons FROM layers").fetchall())
        assert [r["layer"] for r in table.select(["layer"]).to_pylist()] == \
            [layer for layer in sorted(widths) for _ in range(widths[layer])]
        owner = {(layer, first + i): (expert, i, tokens) for layer, expert, first, n, tokens in experts
                 for i in range(n)}
        rows = table.select(["layer", "neuron", "expert", "expert_neuron"]).to_pylist()
        assert any(r["expert"] is None for r in rows) and any(r["expert"] is not None for r in rows)
        for r in rows:
            expert, index, _ = owner.get((r["layer"], r["neuron"]), (None, None, None))
            assert (r["expert"], r["expert_neuron"]) == (expert, index), r
        denominators = {key: (owner[key][2] if key in owner else n_tokens)
                        for key in ((r["layer"], r["neuron"]) for r in rows)}
        # Lists shorter than k: check_neurons covers their filling too.
        assert con.execute("""SELECT count(*) FROM (SELECT count(*) AS n FROM examples
                                                   GROUP BY layer, neuron, quadrant, hook)
                              WHERE n < (SELECT k FROM metadata)""").fetchone()[0] > 0
        check_neurons(con, table, denominators)
    finally:
        con.close()


@pytest.mark.integration
def test_a_quadrant_without_tokens_is_zero_filled_with_nan_means(recorded_db, tmp_path):
    db = recordings.copy_of(recorded_db, tmp_path)
    con = duckdb.connect(str(db))
    con.execute("UPDATE neurons SET count_np = 0 WHERE layer = 0 AND neuron = 3")
    con.execute("DELETE FROM examples WHERE layer = 0 AND neuron = 3 AND quadrant = 2")
    con.execute("UPDATE value_stats SET min = NULL, max = NULL, mean = NULL "
                "WHERE layer = 0 AND neuron = 3 AND quadrant = 2")
    con.execute("DELETE FROM examples WHERE layer = 0 AND neuron = 3 AND quadrant = 3 AND hook = 0 AND rank >= 10")
    kept = [t for (t,) in con.execute("SELECT text_id FROM examples WHERE layer = 0 AND neuron = 3 AND quadrant = 3 "
                                      "AND hook = 0 ORDER BY rank").fetchall()]
    con.close()
    (row,) = [r for r in read(export(db, tmp_path / "out") / "data").to_pylist()
              if (r["layer"], r["neuron"]) == (0, 3)]
    assert row["gate-_in+_freq"] == 0.0
    for value in VALUES:
        assert math.isnan(row[f"gate-_in+_{value}_mean"])
        assert row[f"gate-_in+_{value}_max_values"] == [0.0] * 16
        assert row[f"gate-_in+_{value}_max_indices"] == list(range(16))
    assert row["gate-_in-_hook_post_max_values"][10:] == [0.0] * 6
    assert row["gate-_in-_hook_post_max_indices"] == kept + [t for t in range(42) if t not in kept][:6]


def _part_file(recorded_db: Path, folder: Path) -> Path:
    db = recordings.copy_of(recorded_db, folder)
    con = duckdb.connect(str(db))
    con.execute("UPDATE metadata SET layer_first = 0, layer_last = 0")
    con.close()
    return db


def _cut_short(recorded_db: Path, folder: Path) -> Path:
    data = recorded_db.read_bytes()
    (folder / "cut.duckdb").write_bytes(data[:len(data) // 2])
    return folder / "cut.duckdb"


def _not_gluscope(recorded_db: Path, folder: Path) -> Path:
    con = duckdb.connect(str(folder / "other.duckdb"))
    con.execute("CREATE TABLE t (x INTEGER)")
    con.close()
    return folder / "other.duckdb"


def _garbage(recorded_db: Path, folder: Path) -> Path:
    (folder / "notes.duckdb").write_text("not a database\n" * 1000)
    return folder / "notes.duckdb"


@pytest.mark.integration
@pytest.mark.parametrize("case, make_file, fmt, make_out, message", [
    ("missing file", lambda db, f: f / "none.duckdb", "gluscope-hf", None, "does not exist"),
    ("a folder", lambda db, f: f, "gluscope-hf", None, "is not a file"),
    ("garbage", _garbage, "gluscope-hf", None, "cannot open it"),
    ("cut short", _cut_short, "gluscope-hf", None, "cut short"),
    ("another database", _not_gluscope, "gluscope-hf", None, "not a GLUScope database"),
    ("a part", _part_file, "gluscope-hf", None, "a part of a recording"),
    ("unknown format", lambda db, f: db, "parquet", None, "unknown --format 'parquet'"),
    ("out not empty", lambda db, f: db, "gluscope-hf", "file inside", "exists and is not empty"),
    ("out is a file", lambda db, f: db, "gluscope-hf", "file", "exists and is not a folder"),
])
def test_user_errors_are_one_line_and_leave_nothing(recorded_db, tmp_path, capsys, case, make_file, fmt,
                                                    make_out, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path = make_file(recorded_db, inputs)
    out = tmp_path / "target" / "out"
    if make_out:
        out.parent.mkdir()
        if make_out == "file":
            out.write_text("x")
        else:
            out.mkdir()
            (out / "kept.txt").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    assert main(["export", str(path), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gluscope export: error: ") and message in err, err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.integration
def test_an_interrupted_export_leaves_nothing(recorded_db, tmp_path, monkeypatch, capsys):
    def interrupted(db, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(paper_layout, "write_texts", interrupted)
    out = tmp_path / "new" / "deeper" / "out"
    assert main(["export", str(recorded_db), "--format", "gluscope-hf", "--out", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_an_empty_out_folder_is_filled(recorded_db, tmp_path):
    (tmp_path / "out").mkdir()
    out = export(recorded_db, tmp_path / "out")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "data/train-00000-of-00001.parquet", "texts/train-00000-of-00001.parquet"]
    assert "refactor_glu = true" in (out / "README.md").read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.unit
@pytest.mark.parametrize("sizes, target, ranges", [
    ([96, 96], 96, [(0, 0), (1, 1)]),
    ([96, 96], 100, [(0, 1)]),
    ([3, 3, 3, 3, 3], 5, [(0, 1), (2, 3), (4, 4)]),
    ([50, 1, 1], 10, [(0, 0), (1, 2)]),
    ([], 10, []),
])
def test_shards_hold_whole_items(sizes, target, ranges):
    assert paper_layout.shard_ranges(sizes, target) == ranges


@pytest.mark.system
def test_the_cli_exports_without_importing_torch(recorded_db, tmp_path):
    code = ("import sys; from gluscope.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    subprocess.run([sys.executable, "-c", code, "export", str(recorded_db), "--format", "gluscope-hf",
                    "--out", str(tmp_path / "out")], check=True)
    with duckdb.connect(str(recorded_db), read_only=True) as con:
        (n_neurons,) = con.execute("SELECT count(*) FROM neurons").fetchone()
    assert read(tmp_path / "out" / "data").num_rows == n_neurons
