"""`gluscope import-gluscope`: the recording, exported in the paper's layout and imported again, served.

The expected numbers are read from the original recording's tables with plain SQL, or, for an import whose
counts are not known, from the layout's Parquet files; the import is checked through the real server's JSON
and pages and the Python API, and (with --model, the tiny Llama) its examples' positions against the
recording's own.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from markupsafe import escape

import gluscope
from gluscope.cli import main
from gluscope.recorder.paper_import import EXACT_COUNT_TOKENS
from gluscope.schema import GATE_POS_SLUGS, HOOKS, QUADRANT_SLUGS, QUADRANTS


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


@pytest.fixture(scope="module")
def stated(exported, tmp_path_factory):
    """An import whose counts are not known, as the paper's 20M-token dataset arrives: texts of the original's
    convention (input_ids and text, no text_id) with more tokens than a float32 frequency gives a count of
    exactly; here the export's texts and one long text after them, which no list names."""
    folder = tmp_path_factory.mktemp("stated")
    texts = pq.read_table(exported / "texts", columns=["input_ids", "text"])
    long = pa.table({"input_ids": pa.array([np.ones(EXACT_COUNT_TOKENS, np.int32)], texts.schema.field(0).type),
                     "text": ["a text as long as the denominator needs"]}, schema=texts.schema)
    (folder / "texts").mkdir()
    pq.write_table(pa.concat_tables([texts, long]), folder / "texts" / "t.parquet")
    out = folder / "stated.duckdb"
    assert run(str(exported), "--texts", str(folder / "texts"), "--out", str(out)) == 0
    imp = duckdb.connect(str(out), read_only=True)
    try:
        assert imp.execute("SELECT count(*) FROM neurons WHERE count_pp IS NOT NULL").fetchone() == (0,)
    finally:
        imp.close()
    return out


@pytest.fixture(scope="module")
def stated_client(stated):
    with client_of(stated) as c:
        yield c


@pytest.fixture(scope="module")
def layout_frequencies(exported) -> dict[tuple[int, int], list[float]]:
    """Each neuron's four Q_freq as the layout's Parquet files state them, read apart from the import."""
    columns = ", ".join(f'"{q}_freq"' for q in QUADRANTS)
    rows = duckdb.sql(f"SELECT layer, neuron, {columns} FROM read_parquet('{exported}/data/*.parquet')").fetchall()
    return {(layer, neuron): list(freqs) for layer, neuron, *freqs in rows}


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


def by_slug(freqs: list[float]) -> dict[str, float]:
    return dict(zip(QUADRANT_SLUGS, freqs))


def pct(x: float) -> str:
    """A frequency as the pages print it (render.pct)."""
    return f"{100 * x:.2f}%"


@pytest.mark.integration
def test_without_counts_the_layer_and_model_show_the_layouts_frequencies(stated_client, layout_frequencies):
    c = stated_client
    model = c.get("/api/models").json()["models"][0]["id"]
    n_layers = 1 + max(layer for layer, _ in layout_frequencies)
    body = c.get(f"/api/models/{model}").json()
    for row in body["layers"]:
        expected = np.array([f for (layer, _), f in layout_frequencies.items() if layer == row["layer"]], np.float64)
        assert list(row["frequency"].values()) == pytest.approx(expected.mean(axis=0).tolist(), rel=1e-12)
    page = c.get(f"/models/{model}").text
    assert all(pct(f) in page for row in body["layers"] for f in row["frequency"].values())
    for layer in range(n_layers):
        mine = {n: f for (lay, n), f in layout_frequencies.items() if lay == layer}
        neurons = c.get(f"/api/models/{model}/layers/{layer}?limit={len(mine)}").json()["neurons"]
        assert {n["neuron"]: n["frequency"] for n in neurons} == {n: by_slug(f) for n, f in mine.items()}
        # A sort by a frequency orders by the layout's numbers, ties by neuron; x_gate > 0 is two quadrants' sum.
        for sort, key in (("freq_np", lambda f: f[2]), ("freq_gate_pos", lambda f: f[0] + f[1])):
            got = c.get(f"/api/models/{model}/layers/{layer}?sort={sort}&order=desc&limit=10").json()["neurons"]
            assert [n["neuron"] for n in got] == sorted(mine, key=lambda n: (-key(mine[n]), n))[:10]
        top = c.get(f"/api/models/{model}/layers/{layer}?sort=freq_pp&order=desc&limit=5").json()["neurons"]
        page = c.get(f"/models/{model}/layers/{layer}?sort=freq_pp&order=desc&limit=5")
        assert page.status_code == 200 and "import-note" in page.text
        assert all(pct(x) in page.text for n in top for x in n["frequency"].values())
        scatter = c.get(f"/api/models/{model}/layers/{layer}/scatter").json()
        assert scatter["freq_gate_pos"] == [sum(mine[n][QUADRANT_SLUGS.index(s)] for s in GATE_POS_SLUGS)
                                            for n in scatter["neuron"]]
    layer, neuron = next(iter(layout_frequencies))
    summary = c.get(f"/api/models/{model}/neurons/{layer}/{neuron}").json()
    assert [q["frequency"] for q in summary["quadrants"]] == layout_frequencies[layer, neuron]


@pytest.mark.integration
def test_without_counts_the_filter_and_the_comparison_use_the_layouts_frequencies(stated_client,
                                                                                    layout_frequencies):
    c = stated_client
    model = c.get("/api/models").json()["models"][0]["id"]
    bound = float(np.median([f[0] for f in layout_frequencies.values()]))
    body = c.get(f"/api/models/{model}/neurons?min_freq_pp={bound}&sort=freq_nn&limit=500").json()
    expected = sorted(((key, f) for key, f in layout_frequencies.items() if f[0] >= bound),
                      key=lambda kf: (-kf[1][3], kf[0]))
    assert body["total"] == len(expected)
    assert [((n["layer"], n["neuron"]), n["freq_pp"], n["freq_nn"]) for n in body["neurons"]] == \
        [(key, f[0], f[3]) for key, f in expected]
    page = c.get(f"/models/{model}/neurons?min_freq_pp={bound}&sort=freq_nn&limit=5").text
    assert all(pct(f[3]) in page for _, f in expected[:5])
    (a, fa), (b, fb) = expected[:2]
    refs = f"{a[0]}.{a[1]},{b[0]}.{b[1]}"
    summaries = c.get(f"/api/models/{model}/compare?neurons={refs}").json()["summaries"]
    assert [[q["frequency"] for q in s["quadrants"]] for s in summaries] == [fa, fb]
    assert all(q["count"] is None for s in summaries for q in s["quadrants"])
    page = c.get(f"/models/{model}/compare?neurons={refs}")
    assert page.status_code == 200 and "count not known" in page.text and pct(fa[0]) in page.text


@pytest.mark.integration
def test_without_counts_the_python_api_has_the_layouts_frequencies(stated, layout_frequencies):
    with gluscope.open(stated) as db:
        table = db.neurons()
        layers = db.layers()
        summary = db.neuron(*next(iter(layout_frequencies))).summary()
    keys = list(zip(table["layer"], table["neuron"]))
    assert sorted(keys) == sorted(layout_frequencies)
    for q, label in enumerate(QUADRANTS):
        assert table[f"{label} frequency"].tolist() == [layout_frequencies[k][q] for k in keys]
        assert table[f"{label} count"].isna().all()
    means = np.array([[layout_frequencies[k] for k in keys if k[0] == layer] for layer in layers["layer"]])
    np.testing.assert_allclose(layers[[f"{q} frequency" for q in QUADRANTS]].to_numpy(), means.mean(axis=1),
                               rtol=1e-12)
    assert summary["frequency"].tolist() == layout_frequencies[next(iter(layout_frequencies))]


@pytest.mark.integration
def test_a_text_of_an_import_without_a_model_is_its_datasets_text(imported_client, imported, exported,
                                                                  planted_script_text_id):
    ((text,),) = duckdb.sql(f"SELECT text FROM read_parquet('{exported}/texts/*.parquet') "
                            f"WHERE text_id = {planted_script_text_id}").fetchall()
    assert "<script>" in text
    c = imported_client
    model = c.get("/api/models").json()["models"][0]["id"]
    assert c.get(f"/api/models/{model}/texts/{planted_script_text_id}").json()["text"] == text
    for query in ("", "?position=3"):
        page = c.get(f"/models/{model}/texts/{planted_script_text_id}{query}").text
        decoded = re.search(r'<div class="decoded">(.*?)</div>', page, re.S).group(1)
        assert decoded == str(escape(text)) and "<script>alert" not in page
        assert "import-note" in page and "tokens are not known" in page
    with gluscope.open(imported) as db:
        layer, neuron = db.neurons().loc[0, ["layer", "neuron"]].tolist()
        frame = db.neuron(int(layer), int(neuron)).examples("pp", "hook_pre").frame
    texts = dict(duckdb.sql(f"SELECT text_id, text FROM read_parquet('{exported}/texts/*.parquet')").fetchall())
    assert len(frame) and frame["text"].tolist() == [texts[t] for t in frame["text_id"]]


@pytest.mark.integration
def test_without_counts_an_export_keeps_the_layouts_frequencies(stated, layout_frequencies, tmp_path):
    """The export's neurons (its texts, one of 2^23 tokens, would only cost time)."""
    from gluscope.paper_layout import MACROS, write_summary
    from gluscope.server.db import open_database

    db = open_database(stated, neuron_table=False)
    try:
        db.con.execute(MACROS)
        write_summary(db, tmp_path)
    finally:
        db.con.close()
    columns = ", ".join(f'"{q}_freq"' for q in QUADRANTS)
    rows = duckdb.sql(f"SELECT layer, neuron, {columns} FROM read_parquet('{tmp_path}/*.parquet')").fetchall()
    assert {(layer, neuron): list(freqs) for layer, neuron, *freqs in rows} == layout_frequencies


@pytest.mark.integration
def test_the_histograms_of_an_import_say_it_has_none_with_the_neuron_pages_frequencies(
        imported_client, stated_client, stated, layout_frequencies, client, model_id):
    from gluscope.server.responses import Histograms

    (layer, neuron), freqs = next(iter(layout_frequencies.items()))
    for c, counts_known in ((stated_client, False), (imported_client, True)):
        model = c.get("/api/models").json()["models"][0]["id"]
        base = f"/models/{model}/neurons/{layer}/{neuron}"
        body = c.get(f"/api{base}/histograms").json()
        Histograms.model_validate(body)
        summary = c.get(f"/api{base}").json()["quadrants"]
        assert body["distributions_known"] is False
        assert body["density"]["counts"] == [] and all(
            v["edges"] == [] and all(n == [] for n in v["counts"].values()) for v in body["values"].values())
        assert [(q["count"], q["frequency"], q["intervals"]) for q in body["quadrants"]] == \
            [(q["count"], q["frequency"], []) for q in summary]
        assert [q["frequency"] for q in body["quadrants"]] == (pytest.approx(freqs, rel=1e-6) if counts_known
                                                                else freqs)
        assert all((q["count"] is None) != counts_known for q in body["quadrants"])
        for headers in ({}, {"HX-Request": "true"}):
            page = c.get(f"{base}/histograms", headers=headers)
            assert page.status_code == 200 and "has no distributions" in page.text
            assert "no tokens" not in page.text and all(pct(q["frequency"]) in page.text for q in summary)
            assert ("count not known" in page.text) != counts_known
    with gluscope.open(stated) as db:
        found = db.neuron(layer, neuron).histograms()
    assert found.known is False and found.frame.empty and found.density.empty and found.intervals.empty
    assert "none" in repr(found) and "has no distributions" in found._repr_html_()
    recorded = client.get(f"/api/models/{model_id}/neurons/{layer}/{neuron}/histograms").json()
    assert "distributions_known" not in recorded and recorded["values"]["hook_post"]["edges"]


@pytest.mark.integration
def test_an_export_of_an_import_without_a_model_has_its_datasets_texts(imported, exported, tmp_path):
    with duckdb.connect(str(imported), read_only=True) as imp:
        assert imp.execute("SELECT count(*) FROM vocab").fetchone() == (0,)  # nothing to decode the ids with
    out = tmp_path / "again"
    assert main(["export", str(imported), "--format", "gluscope-hf", "--out", str(out)]) == 0
    columns = "text_id, text, input_ids, source_index"
    original = duckdb.sql(f"SELECT {columns} FROM read_parquet('{exported}/texts/*.parquet') ORDER BY text_id")
    again = duckdb.sql(f"SELECT {columns} FROM read_parquet('{out}/texts/*.parquet') ORDER BY text_id")
    assert again.fetchall() == original.fetchall()


@pytest.mark.integration
def test_the_python_apis_examples_without_a_position_have_no_token(imported, located):
    with gluscope.open(imported) as db:
        layer, neuron = db.neurons().loc[0, ["layer", "neuron"]].tolist()
        frame = db.neuron(int(layer), int(neuron)).examples("pp", "hook_pre").frame
    assert len(frame) and str(frame["position"].dtype) == "Int64" and str(frame["window_start"].dtype) == "Int64"
    assert frame["position"].isna().all() and frame["window_start"].isna().all()
    assert frame["token"].isna().all() and frame["window"].isna().all()
    assert all(len(tokens) == 0 for tokens in frame["window_tokens"]) and frame["text"].str.len().gt(0).all()
    with gluscope.open(located) as db:  # every example located: positions and tokens as in a recording
        frame = db.neuron(int(layer), int(neuron)).examples("pp", "hook_pre").frame
        ids = [db._db.texts.token_ids(t)[p] for t, p in zip(frame["text_id"], frame["position"])]
        assert frame["token"].tolist() == [db._db.vocab.token(int(i)) for i in ids]
    assert len(frame) and frame["position"].dtype == np.int64 and frame["window"].str.len().gt(0).all()


@pytest.mark.integration
def test_the_probe_scales_an_import_without_counts_by_its_stated_frequencies(located, tmp_path):
    """A located import whose counts are NULL (as the paper's 20M-token dataset imports with --model): the probe
    loads its model and ranks by the lists' extremes where the stated frequency is not 0; its counts are not
    known, not -2."""
    from gluscope.probe.answers import Limits, plan_activations
    from gluscope.probe.forward import Passes
    from gluscope.probe.loaded import load_for, recorded_max_abs
    from gluscope.probe_protocol import ActivationsRequest
    from gluscope.server.db import open_database, open_databases
    from gluscope.server.probe_views import activations_context
    from gluscope.server.render import templates

    path = tmp_path / "located.duckdb"
    shutil.copy(located, path)
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE neurons SET count_pp = NULL, count_pn = NULL, count_np = NULL, count_nn = NULL")
    known = open_database(located)
    try:
        expected = recorded_max_abs(known.neurons)
    finally:
        known.con.close()
    (db,) = open_databases([path]).values()
    lm = load_for(db, "cpu")
    np.testing.assert_array_equal(lm.max_abs, expected)
    assert (lm.max_abs > 0).any()
    layer, neuron = a_neuron(db.con)
    plan = plan_activations(lm, ActivationsRequest(text="The cat sat on the mat again.",
                                                   neurons=f"{layer}.{neuron}"), Limits())
    body = plan.finish(Passes(lm).run(plan.rows))
    (n,) = body["neurons"]
    assert [q["count"] for q in n["recorded"]] == [None] * 4
    assert [q["max_abs"] for q in n["recorded"]] == [None if np.isnan(m) else pytest.approx(float(m))
                                                     for m in expected[layer, neuron, :, 0]]
    assert any(r is not None for r in n["relative"])
    html = templates.env.get_template("_probe_activations.html").render(
        {"info": {"id": db.id}, "form": {}, "result": activations_context(body, db)})
    assert "not known" in html
    db.con.close()


@pytest.mark.integration
def test_the_probe_refuses_an_import_without_a_model_in_one_line(imported):
    """Such a file has no model fingerprint to check a model against: the refusal says it is an import and how
    to make one the probe can load."""
    from gluscope.errors import UserError
    from gluscope.probe.loaded import load_for
    from gluscope.server.db import open_databases

    (db,) = open_databases([imported]).values()
    try:
        with pytest.raises(UserError, match=r"an import of the paper's layout made without --model .*--model M"):
            load_for(db, "cpu")
    finally:
        db.con.close()
