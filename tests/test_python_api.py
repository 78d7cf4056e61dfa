"""The Python API (gluscope.open, gluscope/api.py) against the file's tables read with plain SQL and against the
server's JSON for the same neuron; its notebook HTML against the pages, and against the pages' XSS corpus."""

from __future__ import annotations

import re
import subprocess
import sys

import duckdb
import numpy as np
import pytest

import gluscope
from gluscope.api import ArgumentError, DatabaseFileError
from gluscope.errors import UserError
from gluscope.schema import COUNT_COLUMNS, GEOMETRY, HOOKS, QUADRANTS

from . import recordings
from .test_probe_http import HOSTILE

pytestmark = pytest.mark.integration

STATS = ("min", "max", "mean")
# What would make an output reach for a server or run something: a URL, a form target, htmx, a script.
SERVER_OR_SCRIPT = re.compile(r'\s(?:href|src|action|hx-[\w-]+)=|<script|<link|@import|url\(', re.I)


@pytest.fixture(scope="module")
def rec(recorded_db):
    with gluscope.open(recorded_db) as r:
        yield r


def _nan(values) -> np.ndarray:
    """JSON numbers as the API has them: null is NaN."""
    return np.array([np.nan if v is None else v for v in values], np.float64)


def test_the_neuron_table_is_the_files_neurons_and_value_stats(rec, con):
    table = rec.neurons()
    n_tokens, = con.execute("SELECT n_tokens FROM metadata").fetchone()
    neurons = con.execute(f"SELECT layer, neuron, {', '.join(COUNT_COLUMNS)}, flipped, {', '.join(GEOMETRY)} "
                          "FROM neurons ORDER BY layer, neuron").df()
    assert table[["layer", "neuron"]].values.tolist() == neurons[["layer", "neuron"]].values.tolist()
    for label, column in zip(QUADRANTS, COUNT_COLUMNS):
        np.testing.assert_array_equal(table[f"{label} count"], neurons[column])
        np.testing.assert_allclose(table[f"{label} frequency"], neurons[column] / n_tokens, rtol=1e-12)
    for name in ("flipped", *GEOMETRY):
        np.testing.assert_array_equal(table[name], neurons[name])
    keys = table.set_index(["layer", "neuron"]).index
    stats = con.execute("SELECT layer, neuron, quadrant, hook, min, max, mean FROM value_stats").df()
    for (q, h), rows in stats.groupby(["quadrant", "hook"]):
        expected = rows.set_index(["layer", "neuron"]).reindex(keys)
        for stat in STATS:
            np.testing.assert_array_equal(table[f"{QUADRANTS[q]} {HOOKS[h]} {stat}"].to_numpy(np.float64),
                                          expected[stat].to_numpy(np.float64))
    assert rec.neurons(1).equals(table[table.layer == 1].reset_index(drop=True))


def test_metadata_layers_and_a_neuron_are_the_servers_json(rec, client, model_id):
    body = client.get(f"/api/models/{model_id}").json()
    assert rec.metadata().to_dict() == {k: v for k, v in body.items() if k != "layers"}
    layers = rec.layers()
    for got, want in zip(layers.to_dict("records"), body["layers"]):
        assert got["layer"] == want["layer"] and got["r_gate_pos_cos_in_out"] == want["r_gate_pos_cos_in_out"]
        assert [got[f"{q} frequency"] for q in QUADRANTS] == list(want["frequency"].values())
    n = rec.neuron(1, 3)
    want = client.get(f"/api/models/{model_id}/neurons/1/3").json()
    summary = n.summary()
    assert summary.index.tolist() == list(QUADRANTS)
    for q in want["quadrants"]:
        row = summary.loc[q["quadrant"]]
        assert row["count"] == q["count"] and row["frequency"] == q["frequency"]
        for hook in HOOKS:
            np.testing.assert_array_equal(row[[f"{hook} {s}" for s in STATS]].to_numpy(np.float64),
                                          _nan(q["stats"][hook][s] for s in STATS))
    assert n.weights().to_dict() == want["weights"]
    assert rec.neurons(1).set_index("neuron").loc[3, "cos_in_out"] == pytest.approx(want["weights"]["cos_in_out"])


@pytest.mark.parametrize("quadrant,hook,kind", [("gate+_in+", "hook_post", "top"), ("nn", "act", "top"),
                                                 ("gate-_in+", "hook_post", "random"), ("pn", "hook_pre", "interval")])
def test_examples_are_the_servers_list(rec, client, model_id, quadrant, hook, kind):
    ex = rec.neuron(1, 3).examples(quadrant, hook, kind)
    want = client.get(f"/api/models/{model_id}/neurons/1/3/examples",
                      params={"quadrant": quadrant, "hook": hook, "kind": kind}).json()
    frame = ex.frame
    assert (ex.quadrant, ex.hook, ex.kind) == (want["quadrant"], want["hook"], want["kind"])
    assert len(frame) == len(want["examples"]) > 0
    texts = {}
    for row, e in zip(frame.to_dict("records"), want["examples"]):
        for key in ("rank", "value", "text_id", "source_index", "source", "position", "window_start"):
            assert row[key] == e[key], key
        assert row["window_tokens"] == e["tokens"]
        assert row["token"] == e["tokens"][e["position"] - e["window_start"]]
        for h in HOOKS:
            np.testing.assert_array_equal(row[f"window_{h}"], _nan(e["activations"][h]))
        if kind == "interval":
            lo, hi = e["interval"]
            assert (row["interval_lo"], row["interval_hi"]) == (lo, np.inf if hi is None else hi)
        if row["text_id"] not in texts:
            texts[row["text_id"]] = client.get(f"/api/models/{model_id}/texts/{row['text_id']}").json()["text"]
        # A window may cut a character's bytes at its ends, which then decode to U+FFFD.
        assert row["text"] == texts[row["text_id"]] and (row["window"] in row["text"] or "\ufffd" in row["window"])
    if kind == "interval":
        one = rec.neuron(1, 3).examples(quadrant, hook, kind, interval=1).frame
        assert set(one["interval"]) == {1} and len(one) == (frame["interval"] == 1).sum()


def test_histograms_are_the_files_histograms(rec, con, client, model_id):
    h = rec.neuron(1, 3).histograms("hook_post")
    bins = con.execute("""
        SELECT quadrant, first_bin + generate_subscripts(counts, 1) - 1 AS bin, unnest(counts) AS count
        FROM histograms WHERE layer = 1 AND neuron = 3 AND hook = 0""").df().merge(
        con.execute("SELECT bin, lo, hi FROM histogram_bins WHERE axis = 'value'").df(), on="bin")
    got = h.frame[h.frame["count"] > 0].reset_index(drop=True)
    want = bins[bins["count"] > 0].sort_values(["quadrant", "bin"]).reset_index(drop=True)
    assert got["quadrant"].tolist() == [QUADRANTS[q] for q in want["quadrant"]]
    assert got["bin"].tolist() == want["bin"].tolist() and got["count"].tolist() == want["count"].tolist()
    np.testing.assert_array_equal(got["lo"], want["lo"].fillna(-np.inf))
    np.testing.assert_array_equal(got["hi"], want["hi"].fillna(np.inf))
    counts = con.execute(f"SELECT {', '.join(COUNT_COLUMNS)} FROM neurons WHERE layer = 1 AND neuron = 3").fetchone()
    assert h.frame.groupby("quadrant", sort=False)["count"].sum().tolist() == list(counts)
    density, = con.execute("SELECT sum(list_sum(counts)) FROM density WHERE layer = 1 AND neuron = 3").fetchone()
    assert h.density["count"].sum() == density == sum(counts)
    intervals = con.execute("SELECT quadrant, interval, lo, hi FROM intervals WHERE layer = 1 AND neuron = 3 "
                            "ORDER BY quadrant, interval").fetchall()
    assert [(QUADRANTS[q], i, lo, np.inf if hi is None else hi) for q, i, lo, hi in intervals] == \
        list(h.intervals[["quadrant", "interval", "lo", "hi"]].itertuples(index=False, name=None))
    body = client.get(f"/api/models/{model_id}/neurons/1/3/histograms").json()
    assert h.intervals["count"].tolist() == [i["count"] for q in body["quadrants"] for i in q["intervals"]]


def test_tokens_related_and_search_are_the_servers_json(rec, client, model_id):
    api = f"/api/models/{model_id}"
    n = rec.neuron(1, 3)
    tokens = client.get(f"{api}/neurons/1/3/tokens").json()["tokens"]
    assert n.tokens().to_dict("records") == [{"kind": kind, "rank": rank, **t} for kind, rows in tokens.items()
                                             for rank, t in enumerate(rows)]
    related = client.get(f"{api}/neurons/1/3/related").json()
    assert n.related().to_dict("records") == [{"layer": r["layer"], "neuron": r["neuron"], "direction": d,
                                               "via": r["via"], "score": r["score"]}
                                              for d in ("downstream", "upstream") for r in related[d]]
    for params in ({"token": " the"}, {"token": "the", "loose": True, "side": "examples", "quadrant": "gate+_in-"}):
        want = client.get(f"{api}/search/tokens", params=params).json()["results"]
        got = rec.search(**params).to_dict("records")
        assert got == [{k: v for k, v in hit.items() if k != "slug"} for hit in want] and got


def test_what_a_user_gets_wrong_is_one_line_with_the_servers_message(rec, client, model_id, tmp_path):
    api = f"/api/models/{model_id}/neurons"
    n = rec.neuron(1, 3)
    cases = [(lambda: rec.neuron(2, 0), f"{api}/2/0"), (lambda: rec.neuron(1, 96), f"{api}/1/96"),
             (lambda: n.examples("zz"), f"{api}/1/3/examples?quadrant=zz&hook=hook_post"),
             (lambda: n.examples("pp", "post"), f"{api}/1/3/examples?quadrant=pp&hook=post"),
             (lambda: n.examples("pp", kind="best"), f"{api}/1/3/examples?quadrant=pp&hook=hook_post&kind=best"),
             (lambda: n.histograms("act"), f"{api}/1/3/histograms?hook=act"),
             (lambda: rec.search("no such token"), f"/api/models/{model_id}/search/tokens?token=no such token")]
    for call, url in cases:
        with pytest.raises(ArgumentError) as e:
            call()
        assert str(e.value) == client.get(url).json()["error"]["message"]
    not_duckdb, not_gluscope = tmp_path / "notes.duckdb", tmp_path / "other.duckdb"
    not_duckdb.write_text("just text\n")
    duckdb.connect(str(not_gluscope)).execute("CREATE TABLE t (x INTEGER)").close()
    for path, says in ((tmp_path / "missing.duckdb", "does not exist"), (tmp_path, "is not a file"),
                       (not_duckdb, "not a DuckDB file"), (not_gluscope, "not a GLUScope database")):
        with pytest.raises(DatabaseFileError) as e:
            gluscope.open(path)
        assert isinstance(e.value, UserError) and says in str(e.value) and "\n" not in str(e.value)


def test_notebook_html_is_the_pages_and_self_contained(rec, client, model_id, script_list):
    layer, neuron, slug, hook = script_list
    base = f"/models/{model_id}/neurons/{layer}/{neuron}"
    n = rec.neuron(layer, neuron)
    outputs = {"neuron": n._repr_html_(), "examples": n.examples(slug, hook)._repr_html_(),
               "histograms": n.histograms()._repr_html_()}
    for name, html in outputs.items():
        assert html.startswith('<div class="gluscope-notebook"') and "<style>" in html, name
        assert not SERVER_OR_SCRIPT.search(html), (name, SERVER_OR_SCRIPT.search(html))
    # The same colours and hover values (each token's title), Figure 1 and SVG as the pages.
    snippets = re.compile(r'<div class="snippet">.*?</div>', re.S)
    page = client.get(f"{base}/examples", params={"quadrant": slug, "hook": hook}).text
    assert snippets.findall(outputs["examples"]) == snippets.findall(page) != []
    assert "&lt;script&gt;" in outputs["examples"]
    summary = re.compile(r'<section class="summary">.*?</section>', re.S)
    assert summary.findall(outputs["neuron"]) == summary.findall(client.get(base).text) != []
    svg = re.compile(r"<svg.*?</svg>", re.S)
    page_svg = [re.sub(r' href="[^"]*"', "", s) for s in svg.findall(client.get(f"{base}/histograms").text)]
    assert svg.findall(outputs["histograms"]) == page_svg != []


def test_notebook_html_escapes_the_xss_corpus(recorded_db, tmp_path, script_list):
    """Every token, every source and the model's name made the pages' hostile texts: none of them is markup."""
    path = recordings.copy_of(recorded_db, tmp_path)
    con = duckdb.connect(str(path))
    con.execute("UPDATE vocab SET token = list_extract($h, token_id % len($h) + 1) || token", {"h": HOSTILE})
    con.execute("UPDATE texts SET source = $s", {"s": HOSTILE[1]})
    con.execute("UPDATE metadata SET model_name = $m", {"m": HOSTILE[2]})
    con.close()
    layer, neuron, slug, hook = script_list
    with gluscope.open(path) as r:
        n = r.neuron(layer, neuron)
        html = n._repr_html_() + n.examples(slug, hook)._repr_html_() + n.histograms()._repr_html_()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # in a token
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in html  # a source
    assert "&#34;&gt;&lt;svg onload=alert(3)&gt;" in html  # the model's name
    assert "<script" not in html and "<img src=x" not in html and "<svg onload" not in html


def test_gluscope_imports_pandas_and_the_server_only_when_opening(recorded_db):
    code = ("import sys, gluscope\n"
            "assert 'pandas' not in sys.modules and 'gluscope.server' not in sys.modules\n"
            f"n = gluscope.open({str(recorded_db)!r}).neuron(1, 3)\n"
            "n.examples('pp')._repr_html_(), n.histograms()._repr_html_()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def moe_db():
    """The tiny DeepSeek-V3 of tests/test_moe_server.py (a dense first layer, routed and shared experts)."""
    from .test_moe_bruteforce import moe_model

    return recordings.record(moe_model("deepseek_v3"), recordings.corpus(), "--max-length", "40")


def test_a_file_with_experts_addresses_neurons_as_the_server(moe_db):
    """Neuron I of expert E is L.E.I, its frequencies are over the tokens routed to E (the file's `experts`)."""
    con = duckdb.connect(str(moe_db), read_only=True)
    first, tokens = con.execute("SELECT first_neuron, tokens FROM experts WHERE layer = 1 AND expert = 2").fetchone()
    counts = con.execute(f"SELECT {', '.join(COUNT_COLUMNS)} FROM neurons WHERE layer = 1 AND neuron = $n",
                         {"n": first + 5}).fetchone()
    routed = con.execute("SELECT quadrant, max FROM routed_values WHERE layer = 1 AND neuron = $n ORDER BY quadrant",
                         {"n": first + 5}).fetchall()
    con.close()
    with gluscope.open(moe_db) as r:
        n = r.neuron(1, 2, 5)
        assert (n.address, n.neuron) == ("1.2.5", first + 5)
        summary = n.summary()
        assert summary["frequency"].tolist() == [c / tokens for c in counts]
        np.testing.assert_array_equal(summary["routed max"].to_numpy(np.float32), [m for _, m in routed])
        row = r.neurons(1, expert=2).set_index("address").loc["1.2.5"]
        assert (row["neuron"], row["expert"], row["expert_neuron"], row["counted_tokens"]) == (first + 5, 2, 5, tokens)
        assert [row[f"{q} frequency"] for q in QUADRANTS] == [c / tokens for c in counts]
        assert r.neurons(0)["expert"].isna().all() and len(r.neurons(expert=8)) == 2 * 32
        with pytest.raises(ArgumentError, match=r"its neuron \d+ is 1\.2\.5 \(expert 2, neuron 5\)"):
            r.neuron(1, first + 5)
        examples = n.examples("pp")
        # A window token routed to another expert has neither x_gate nor x_in: NaN, shown uncoloured (class nr).
        gates, ins = (np.concatenate(examples.frame[f"window_{h}"]) for h in ("hook_pre", "hook_pre_linear"))
        assert np.isnan(gates).any() and (np.isnan(gates) == np.isnan(ins)).all()
        assert 'class="t nr' in examples._repr_html_()
