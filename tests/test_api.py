"""The JSON API against a database recorded by the real recorder from a tiny model, served by the real app.

Expected values are read from the database file itself with plain SQL, so a
test fails when the server misreads, mislabels or reorders anything.
"""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pytest
from starlette.testclient import TestClient

from gluscope.schema import HOOKS, QUADRANT_SLUGS, QUADRANTS
from gluscope.server.app import create_app
from gluscope.server.db import open_databases

from .recordings import corpus_source, corpus_texts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def meta(con):
    cur = con.execute("SELECT * FROM metadata")
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def close(a, b, rel=1e-6) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def test_models_lists_the_metadata(client, meta, model_id):
    body = client.get("/api/models").json()
    (m,) = body["models"]
    for key in ("model_name", "n_layers", "d_mlp", "n_texts", "n_tokens", "act_fn", "k", "refactor_glu",
                "dataset", "weight_convention", "window_before", "window_after"):
        assert m[key] == meta[key], key
    assert m["id"] == model_id and model_id.replace("-", "").isalnum()
    assert m["created_at"] == meta["created_at"].isoformat()


def test_model_id_is_stable_and_distinct_for_two_files(recorded_db, tmp_path):
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(recorded_db.read_bytes())
    first = open_databases([recorded_db])
    both = open_databases([recorded_db, copy])
    again = open_databases([recorded_db, copy])
    assert len(both) == 2 and list(both) == list(again)
    assert list(first)[0] in list(both)[0]


@pytest.mark.parametrize("layer,neuron", [(0, 0), (0, 17), (1, 95), (1, 42)])
def test_neuron_summary_equals_database(client, con, meta, model_id, layer, neuron):
    body = client.get(f"/api/models/{model_id}/neurons/{layer}/{neuron}").json()
    assert (body["model"], body["layer"], body["neuron"], body["n_tokens"]) == (model_id, layer, neuron, meta["n_tokens"])
    counts = con.execute("SELECT count_pp, count_pn, count_np, count_nn FROM neurons WHERE layer = ? AND neuron = ?",
                         [layer, neuron]).fetchone()
    assert [q["quadrant"] for q in body["quadrants"]] == list(QUADRANTS)
    assert [q["slug"] for q in body["quadrants"]] == list(QUADRANT_SLUGS)
    stats = {(q, h): (mn, mx, mean) for q, h, mn, mx, mean in con.execute(
        "SELECT quadrant, hook, min, max, mean FROM value_stats WHERE layer = ? AND neuron = ?", [layer, neuron]).fetchall()}
    for qi, q in enumerate(body["quadrants"]):
        assert q["count"] == counts[qi]
        assert q["frequency"] == pytest.approx(counts[qi] / meta["n_tokens"])
        assert list(q["stats"]) == list(HOOKS)
        for hi, hook in enumerate(HOOKS):
            mn, mx, mean = stats[(qi, hi)]
            got = q["stats"][hook]
            assert close(got["min"], mn) and close(got["max"], mx) and close(got["mean"], mean), (qi, hook)
    assert sum(q["count"] for q in body["quadrants"]) <= meta["n_tokens"]
    geom = con.execute("SELECT flipped, cos_gate_in, cos_in_out FROM neurons WHERE layer = ? AND neuron = ?",
                       [layer, neuron]).fetchone()
    assert body["weights"]["flipped"] == geom[0]
    assert close(body["weights"]["cos_gate_in"], geom[1]) and close(body["weights"]["cos_in_out"], geom[2])


def _f16(bits) -> np.ndarray:
    return np.asarray(bits, np.int16).view(np.float16).astype(np.float64)


@pytest.mark.parametrize("slug", QUADRANT_SLUGS)
@pytest.mark.parametrize("hook", HOOKS)
def test_examples_equal_database(client, con, model_id, slug, hook):
    layer, neuron = 1, 7
    q, h = QUADRANT_SLUGS.index(slug), HOOKS.index(hook)
    body = client.get(f"/api/models/{model_id}/neurons/{layer}/{neuron}/examples",
                      params={"quadrant": slug, "hook": hook}).json()
    assert (body["quadrant"], body["hook"]) == (QUADRANTS[q], hook)
    rows = con.execute(
        "SELECT e.rank, e.value, e.text_id, e.position, w.window_start, w.x_gate, w.x_in, t.source_index, t.token_ids "
        "FROM examples e JOIN windows w USING (layer, neuron, text_id, position) JOIN texts t USING (text_id) "
        "WHERE layer = ? AND neuron = ? AND quadrant = ? AND hook = ? ORDER BY rank", [layer, neuron, q, h]).fetchall()
    vocab = [t for (t,) in con.execute("SELECT token FROM vocab ORDER BY token_id").fetchall()]
    assert len(body["examples"]) == len(rows) > 0
    values = [ex["value"] for ex in body["examples"]]
    assert [abs(v) for v in values] == sorted((abs(v) for v in values), reverse=True)  # most extreme first
    for ex, (rank, value, text_id, position, start, gate, inn, source_index, token_ids) in zip(body["examples"], rows):
        assert (ex["rank"], ex["text_id"], ex["position"], ex["window_start"], ex["source_index"]) == \
               (rank, text_id, position, start, source_index)
        assert close(ex["value"], value)
        ids = token_ids[start:start + len(gate)]
        assert ex["token_ids"] == ids and ex["tokens"] == [vocab[i] for i in ids]
        g, x = _f16(gate), _f16(inn)
        acts = {k: np.array(v, dtype=np.float64) for k, v in ex["activations"].items()}
        assert list(acts) == list(HOOKS) and all(len(v) == len(ids) for v in acts.values())
        np.testing.assert_allclose(acts["hook_pre"], g, rtol=1e-6)
        np.testing.assert_allclose(acts["hook_pre_linear"], x, rtol=1e-6)
        np.testing.assert_allclose(acts["act"], silu(g), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(acts["hook_post"], silu(g) * x, rtol=1e-5, atol=1e-7)
        # The window holds the token of interest in this quadrant, with (to float16 precision) the listed value.
        i = position - start
        assert np.sign(g[i]) == (1 if slug[0] == "p" else -1) and np.sign(x[i]) == (1 if slug[1] == "p" else -1)
        assert acts[hook][i] == pytest.approx(value, rel=2e-2, abs=2e-3)


def test_empty_quadrant_has_count_zero_and_nulls(tmp_path):
    # The tiny model's every neuron sees all four quadrants, so make one that never does with the real writer.
    from benchmarks.make_synthetic_db import main as make_synthetic

    path = tmp_path / "synthetic.duckdb"
    make_synthetic(["--out", str(path), "--layers", "1", "--d-mlp", "200", "--texts", "60", "--vocab-size", "500"])
    con = duckdb.connect(str(path), read_only=True)
    layer, neuron, q = con.execute("SELECT 0, neuron, 0 FROM neurons WHERE count_pp = 0 UNION ALL "
                                   "SELECT 0, neuron, 1 FROM neurons WHERE count_pn = 0 LIMIT 1").fetchone()
    con.close()
    with TestClient(create_app([path])) as c:
        model = c.get("/api/models").json()["models"][0]["id"]
        body = c.get(f"/api/models/{model}/neurons/{layer}/{neuron}").json()
        empty = body["quadrants"][q]
        assert empty["count"] == 0 and empty["frequency"] == 0
        assert all(v is None for s in empty["stats"].values() for v in s.values())
        ex = c.get(f"/api/models/{model}/neurons/{layer}/{neuron}/examples",
                   params={"quadrant": QUADRANT_SLUGS[q], "hook": "hook_post"})
        assert ex.status_code == 200 and ex.json()["examples"] == []


def test_text_is_decoded_from_stored_ids(client, con, meta, model_id, planted_script_text_id):
    originals = corpus_texts()
    for text_id in (0, planted_script_text_id, meta["n_texts"] - 1):
        body = client.get(f"/api/models/{model_id}/texts/{text_id}").json()
        source_index, token_ids = con.execute("SELECT source_index, token_ids FROM texts WHERE text_id = ?",
                                              [text_id]).fetchone()
        assert body["text_id"] == text_id and body["source_index"] == source_index
        assert body["token_ids"] == token_ids and token_ids[0] == meta["bos_token_id"]
        assert len(body["tokens"]) == len(token_ids)
        # Texts are truncated at max_length tokens, so the decoded text starts its source text.
        assert body["text"] and originals[source_index].startswith(body["text"])
    planted = client.get(f"/api/models/{model_id}/texts/{planted_script_text_id}").json()
    assert "<script>" in planted["tokens"] and "<script>" in planted["text"]


@pytest.mark.parametrize("page,api", [
    ("/models/{m}/neurons/1/3.json", "/api/models/{m}/neurons/1/3"),
    ("/models/{m}/neurons/0/5/examples.json?quadrant=nn&hook=act", "/api/models/{m}/neurons/0/5/examples?quadrant=nn&hook=act"),
    ("/models/{m}/texts/2.json", "/api/models/{m}/texts/2"),
    ("/models/{m}.json", "/api/models/{m}"),
    ("/models/{m}/layers/1.json?sort=cos_in_out&order=desc", "/api/models/{m}/layers/1?sort=cos_in_out&order=desc"),
    ("/.json", "/api/models"),
])
def test_every_page_has_a_json_twin(client, model_id, page, api):
    twin, direct = client.get(page.format(m=model_id)), client.get(api.format(m=model_id))
    assert twin.status_code == direct.status_code == 200
    assert twin.headers["content-type"].startswith("application/json")
    assert twin.json() == direct.json()
    html_url = page.format(m=model_id).replace(".json", "", 1) if page != "/.json" else "/"
    negotiated = client.get(html_url, headers={"Accept": "application/json"})
    assert negotiated.headers["content-type"].startswith("application/json") and negotiated.json() == direct.json()
    html = client.get(html_url)
    assert html.headers["content-type"].startswith("text/html")
    assert 'rel="alternate"' in html.headers["link"] and "HX-Request" in html.headers["vary"]


def test_layer_table_sorts_and_pages(client, con, model_id):
    body = client.get(f"/api/models/{model_id}/layers/1", params={"sort": "freq_nn", "order": "desc", "limit": 10,
                                                                  "offset": 5}).json()
    expected = [n for (n,) in con.execute("SELECT neuron FROM neurons WHERE layer = 1 ORDER BY count_nn DESC, neuron "
                                          "LIMIT 10 OFFSET 5").fetchall()]
    assert [n["neuron"] for n in body["neurons"]] == expected


def test_quadrant_label_is_accepted_where_a_slug_is(client, model_id):
    by_slug = client.get(f"/api/models/{model_id}/neurons/0/1/examples", params={"quadrant": "pn", "hook": "hook_pre"})
    by_label = client.get(f"/api/models/{model_id}/neurons/0/1/examples", params={"quadrant": "gate+_in-", "hook": "hook_pre"})
    assert by_slug.json() == by_label.json()


# (url, status, parameter named in the error, a fragment of `valid`)
ERRORS = [
    ("/api/models/nope", 404, "model", "{m}"),
    ("/api/models/nope/neurons/0/0", 404, "model", "{m}"),
    ("/api/models/{m}/neurons/2/0", 404, "layer", "0..1"),
    ("/api/models/{m}/neurons/-1/0", 404, "layer", "0..1"),
    ("/api/models/{m}/neurons/0/96", 404, "neuron", "0..95"),
    ("/api/models/{m}/neurons/0/99999999999999999999", 404, "neuron", "0..95"),
    ("/api/models/{m}/neurons/x/0", 422, "layer", "integer"),
    ("/api/models/{m}/neurons/0/1.5", 422, "neuron", "integer"),
    ("/api/models/{m}/neurons/0/0/examples?quadrant=pp", 422, "hook", None),
    ("/api/models/{m}/neurons/0/0/examples?hook=act", 422, "quadrant", None),
    ("/api/models/{m}/neurons/0/0/examples?quadrant=gate+_in+&hook=act", 422, "quadrant", "pp"),
    ("/api/models/{m}/neurons/0/0/examples?quadrant=pp&hook=swish", 422, "hook", "hook_pre_linear"),
    ("/api/models/{m}/neurons/0/96/examples?quadrant=pp&hook=act", 404, "neuron", "0..95"),
    ("/api/models/{m}/texts/42", 404, "text_id", "0..41"),
    ("/api/models/{m}/texts/-3", 404, "text_id", "0..41"),
    ("/api/models/{m}/texts/abc", 422, "text_id", "integer"),
    ("/api/models/{m}/layers/1?sort=bogus", 422, "sort", "cos_in_out"),
    ("/api/models/{m}/layers/1?limit=0", 422, "limit", "1..1000"),
    ("/api/nothing-here", 404, None, None),
]


@pytest.mark.parametrize("url,status,parameter,valid", ERRORS)
def test_errors_name_the_parameter_and_its_valid_range(client, model_id, url, status, parameter, valid):
    r = client.get(url.format(m=model_id))
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"status", "parameter", "message", "valid"}
    assert err["status"] == status and err["parameter"] == parameter and err["message"]
    if valid is not None:
        assert valid.format(m=model_id) in str(err["valid"])


def test_openapi_documents_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/models", "/api/models/{model}/neurons/{layer}/{neuron}",
                 "/api/models/{model}/neurons/{layer}/{neuron}/examples", "/api/models/{model}/texts/{text_id}"):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_weight_tokens_equal_the_database(client, con, model_id):
    body = client.get(f"/api/models/{model_id}/neurons/1/7/tokens").json()
    rows = con.execute("SELECT kind, token_id, score FROM weight_tokens WHERE layer = 1 AND neuron = 7 "
                       "ORDER BY kind, rank").fetchall()
    kinds = ("out+", "out-", "gate+", "gate-", "in+", "in-")
    for code, name in enumerate(kinds):
        want = [(t, s) for k, t, s in rows if k == code]
        got = body["tokens"][name]
        assert [x["token_id"] for x in got] == [t for t, _ in want] and len(want) > 0
        assert all(close(x["score"], s) for x, (_, s) in zip(got, want))
        scores = [x["score"] for x in got]
        assert scores == sorted(scores, reverse=name.endswith("+"))
    by_quadrant = {w["quadrant"]: (w["promotes"], w["suppresses"]) for w in body["writes"]}
    assert by_quadrant == {"gate+_in+": ("out+", "out-"), "gate+_in-": ("out-", "out+"),
                           "gate-_in+": ("out-", "out+"), "gate-_in-": ("out+", "out-")}


@pytest.mark.parametrize("url, status, parameter", [
    ("/api/models/{m}/neurons/1/96/tokens", 404, "neuron"),
    ("/api/models/{m}/neurons/9/0/tokens", 404, "layer"),
    ("/api/models/{m}/neurons/x/0/tokens", 422, "layer"),
])
def test_weight_tokens_errors(client, model_id, url, status, parameter):
    r = client.get(url.format(m=model_id))
    assert r.status_code == status and r.json()["error"]["parameter"] == parameter


def test_neuron_page_loads_weight_tokens_lazily(client, model_id):
    page = client.get(f"/models/{model_id}/neurons/1/7").text
    assert f'hx-get="/models/{model_id}/neurons/1/7/tokens"' in page
    fragment = client.get(f"/models/{model_id}/neurons/1/7/tokens", headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.text and "promotes" in fragment.text


def test_a_neurons_examples_are_read_once_for_all_its_sections(client, model_id):
    """The first section of a neuron reads the whole neuron; its other sections come from memory.

    The view runs here on the test's own registry, as a reader process runs it.
    """
    import json

    from gluscope.server.views import run_view

    def examples_body(registry, kind, model, layer, neuron, quadrant, hook, colour):
        return run_view(registry, "examples", model, kind,
                        {"layer": layer, "neuron": neuron, "quadrant": quadrant, "hook": hook, "kind": "top",
                        "interval": None, "colour": colour})

    registry = client.app.state.registry
    db = registry[model_id]
    first = json.loads(examples_body(registry, "json", model_id, 0, 11, "pp", "act", None))
    cached = db.examples.get((0, 11))
    assert cached is not None
    other = json.loads(examples_body(registry, "json", model_id, 0, 11, "nn", "hook_post", None))
    assert db.examples.get((0, 11)) is cached
    # Identical to what the server's reader process answers from its own cache and file connection.
    url = f"/api/models/{model_id}/neurons/0/11/examples"
    assert client.get(url, params={"quadrant": "nn", "hook": "hook_post"}).json() == other
    assert client.get(url, params={"quadrant": "pp", "hook": "act"}).json() == first


def test_lru_cache_evicts_the_least_recently_used():
    from gluscope.server.db import LRUCache

    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    empty = LRUCache(0)
    empty.put("a", 1)
    assert empty.get("a") is None


def test_every_example_and_text_says_where_its_text_came_from(client, con, model_id):
    """`record --source-column source` keeps each text's source; examples, texts and the page show it."""

    stored = dict(con.execute("SELECT text_id, source FROM texts").fetchall())
    rows = dict(con.execute("SELECT text_id, source_index FROM texts").fetchall())
    assert all(stored[t] == corpus_source(rows[t]) for t in stored)
    body = client.get(f"/api/models/{model_id}/neurons/1/3/examples", params={"quadrant": "nn", "hook": "act"}).json()
    assert body["examples"] and all(ex["source"] == stored[ex["text_id"]] for ex in body["examples"])
    text = client.get(f"/api/models/{model_id}/texts/5").json()
    assert text["source"] == stored[5]
    page = client.get(f"/models/{model_id}/neurons/1/3/examples", params={"quadrant": "nn", "hook": "act"}).text
    assert stored[body["examples"][0]["text_id"]] in page
    info = client.get(f"/api/models/{model_id}").json()
    assert info["model_source"] and info["weights_file"] is None and info["quantization"] is None
