"""`gluscope import-gluscope`: the recording, exported in the paper's layout and imported again, served.

The expected numbers are read from the original recording's tables with plain SQL; the import is checked
through the real server's JSON and pages, and (with --model, the tiny Llama) its examples' positions against
the recording's own.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import duckdb
import pytest

from gluscope.cli import main
from gluscope.schema import HOOKS, QUADRANT_SLUGS, QUADRANTS


def run(*args: str) -> int:
    return main(["import-gluscope", *args])


@pytest.fixture(scope="module")
def exported(recorded_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "export"
    assert main(["export", str(recorded_db), "--format", "gluscope-hf", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "imported.duckdb"
    assert run(str(exported), "--texts", str(exported / "texts"), "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def located(exported, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("located") / "located.duckdb"
    assert run(str(exported), "--texts", str(exported / "texts"), "--out", str(out), "--model", str(tiny_llama)) == 0
    return out


def client_of(path):
    from starlette.testclient import TestClient

    from gluscope.server.app import create_app
    return TestClient(create_app([path]), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def imported_client(imported):
    with client_of(imported) as c:
        yield c


def a_neuron(con) -> tuple[int, int]:
    return con.execute("SELECT layer, neuron FROM neurons ORDER BY layer DESC, neuron LIMIT 1 OFFSET 3").fetchone()


@pytest.mark.integration
def test_the_neuron_json_has_the_recordings_frequencies_means_and_extremes(imported_client, con):
    layer, neuron = a_neuron(con)
    n_tokens = con.execute("SELECT n_tokens FROM metadata").fetchone()[0]
    counts = con.execute(f"SELECT count_pp, count_pn, count_np, count_nn FROM neurons "
                         f"WHERE layer = {layer} AND neuron = {neuron}").fetchone()
    stats = {(q, h): (lo, hi, mean) for q, h, lo, hi, mean in con.execute(
        f"SELECT quadrant, hook, min, max, mean FROM value_stats WHERE layer = {layer} AND neuron = {neuron}").fetchall()}
    c = imported_client
    model = c.get("/api/models").json()["models"][0]
    assert model["imported_from"].startswith("gluscope-hf: ") and model["bos_counted"] is False
    body = c.get(f"/api/models/{model['id']}/neurons/{layer}/{neuron}").json()
    assert body["n_tokens"] == n_tokens
    for q, quadrant in enumerate(body["quadrants"]):
        assert quadrant["count"] == counts[q]
        assert quadrant["frequency"] == pytest.approx(counts[q] / n_tokens, rel=1e-6)
        for h, hook in enumerate(HOOKS):
            lo, hi, mean = stats[q, h]
            got = quadrant["stats"][hook]
            if mean is None:
                assert got["mean"] is None
                continue
            assert got["mean"] == pytest.approx(mean, rel=1e-6, abs=1e-30)
            if hook == "act" and QUADRANTS[q].startswith("gate+"):  # the layout keeps no list of it there
                assert got["min"] is None and got["max"] is None
            elif hi > 0:
                assert got["max"] == pytest.approx(hi, rel=1e-6) and got["min"] is None
            else:
                assert got["min"] == pytest.approx(lo, rel=1e-6) and got["max"] is None


@pytest.mark.integration
def test_the_examples_are_the_recordings_texts_with_their_values(imported_client, con):
    layer, neuron = a_neuron(con)
    expected = con.execute(f"""SELECT quadrant, hook, list(text_id ORDER BY rank), list(value ORDER BY rank)
                               FROM examples WHERE layer = {layer} AND neuron = {neuron} AND value <> 0
                               GROUP BY ALL""").fetchall()
    c = imported_client
    model = c.get("/api/models").json()["models"][0]["id"]
    base = f"/api/models/{model}/neurons/{layer}/{neuron}/examples"
    for q, h, ids, values in expected:
        if HOOKS[h] == "act" and QUADRANTS[q].startswith("gate+"):
            continue
        body = c.get(f"{base}?quadrant={QUADRANT_SLUGS[q]}&hook={HOOKS[h]}").json()
        assert [e["text_id"] for e in body["examples"]] == ids
        assert [e["value"] for e in body["examples"]] == pytest.approx(values, rel=1e-6)
        assert all(e["position"] is None and e["text"] for e in body["examples"])
    page = c.get(f"/models/{model}/neurons/{layer}/{neuron}/examples?quadrant=pp&hook=hook_pre")
    assert page.status_code == 200 and "position not known" in page.text
    assert c.get(f"/models/{model}/neurons/{layer}/{neuron}").status_code == 200


@pytest.mark.integration
def test_with_the_model_the_examples_get_the_recordings_positions(located, con):
    expected = con.execute("SELECT layer, neuron, quadrant, hook, rank, text_id, position FROM examples "
                           "WHERE value <> 0 AND NOT (hook = 3 AND quadrant < 2) "
                           "ORDER BY ALL").fetchall()
    imp = duckdb.connect(str(located), read_only=True)
    try:
        got = imp.execute("SELECT layer, neuron, quadrant, hook, rank, text_id, position FROM examples "
                          "ORDER BY ALL").fetchall()
        meta = imp.execute("SELECT located_with, examples_located FROM metadata").fetchone()
    finally:
        imp.close()
    assert got == expected
    assert meta[1] == len(expected)
    layer, neuron = a_neuron(con)
    with client_of(located) as c:
        model = c.get("/api/models").json()["models"][0]["id"]
        page = c.get(f"/models/{model}/neurons/{layer}/{neuron}/examples?quadrant=pp&hook=hook_pre")
        assert page.status_code == 200 and "focus" in page.text and "position not known" not in page.text


@pytest.mark.integration
@pytest.mark.parametrize("case", ["missing", "no parquet", "columns", "index", "exists", "model"])
def test_user_errors_are_one_line_and_leave_nothing(case, exported, tmp_path, capsys, recorded_db):
    hf, texts, out, extra = exported, exported / "texts", tmp_path / "out.duckdb", []
    if case == "missing":
        hf = tmp_path / "nowhere"
    elif case == "no parquet":
        hf = tmp_path / "empty"
        hf.mkdir()
    elif case == "columns":
        texts = exported / "data"  # the neurons have no input_ids
    elif case == "index":
        texts = tmp_path / "few"
        texts.mkdir()
        duckdb.sql(f"COPY (SELECT * FROM read_parquet('{exported}/texts/*.parquet') LIMIT 2) "
                   f"TO '{texts}/t.parquet' (FORMAT parquet)")
    elif case == "exists":
        shutil.copy(recorded_db, out)
    elif case == "model":
        extra = ["--model", str(tmp_path / "no-model")]
    before = out.read_bytes() if out.exists() else None
    assert run(str(hf), "--texts", str(texts), "--out", str(out), *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gluscope import-gluscope: error: "), err
    assert (out.read_bytes() if out.exists() else None) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.integration
def test_frequencies_of_the_original_convention_count_the_bos(imported, exported, tmp_path, con):
    """A texts dataset without text_id (dolma-small) is the original's: n_tokens counts every token."""
    texts = tmp_path / "texts"
    texts.mkdir()
    duckdb.sql(f"COPY (SELECT input_ids, text FROM read_parquet('{exported}/texts/*.parquet')) "
               f"TO '{texts}/t.parquet' (FORMAT parquet)")
    out = tmp_path / "orig.duckdb"
    assert run(str(exported / "data"), "--texts", str(texts), "--out", str(out)) == 0
    n_texts, n_tokens = con.execute("SELECT n_texts, n_tokens FROM metadata").fetchone()
    imp = duckdb.connect(str(out), read_only=True)
    try:
        assert imp.execute("SELECT n_tokens, bos_counted FROM metadata").fetchone() == (n_tokens + n_texts, True)
        assert not math.isnan(imp.execute("SELECT sum(frequency) FROM imported_frequencies").fetchone()[0])
    finally:
        imp.close()


@pytest.mark.integration
@pytest.mark.parametrize("route", ["", "/histograms", "/tokens", "/related", "/examples?quadrant=nn&hook=act&kind=random"])
def test_every_neuron_route_of_an_import_answers(imported_client, con, route):
    layer, neuron = a_neuron(con)
    model = imported_client.get("/api/models").json()["models"][0]["id"]
    for prefix in ("/api/models", "/models"):
        assert imported_client.get(f"{prefix}/{model}/neurons/{layer}/{neuron}{route}").status_code == 200, prefix
    assert imported_client.get(f"/models/{model}").status_code == 200


@pytest.mark.system
def test_the_cli_imports_without_importing_torch(exported, tmp_path):
    code = ("import sys; sys.argv = ['gluscope', *sys.argv[1:]]; from gluscope.cli import main; rc = main(); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    out = tmp_path / "x.duckdb"
    subprocess.run([sys.executable, "-c", code, "import-gluscope", str(exported), "--texts", str(exported / "texts"),
                    "--out", str(out)], check=True, capture_output=True)
    assert out.is_file()
