"""The whole-model filter and the comparison, against a brute force over the recorded file.

The expected neurons are computed in Python from every row of the neurons and
value_stats tables, read with plain SQL from the file the real recorder
wrote; the API, served by the real app, must return exactly them, in order.
"""

from __future__ import annotations

import math
import shutil
from contextlib import contextmanager

import duckdb
import pytest
from starlette.testclient import TestClient

from gluscope.schema import COUNT_COLUMNS, GEOMETRY, HOOKS, QUADRANT_SLUGS, QUADRANTS
from gluscope.server.app import create_app

pytestmark = pytest.mark.integration

FIELDS = ([f"freq_{s}" for s in QUADRANT_SLUGS] + list(GEOMETRY) + [f"absmax_{s}" for s in QUADRANT_SLUGS])
HX = {"HX-Request": "true"}


@pytest.fixture(scope="module")
def m(model_id):
    return model_id


@pytest.fixture(scope="module")
def facts(recorded_db) -> dict[tuple[int, int], dict[str, float | None]]:
    """Every neuron's fields, computed here from the raw rows."""
    con = duckdb.connect(str(recorded_db), read_only=True)
    try:
        (n_tokens,) = con.execute("SELECT n_tokens FROM metadata").fetchall()[0]
        neurons = con.execute(f"SELECT layer, neuron, {', '.join(COUNT_COLUMNS)}, {', '.join(GEOMETRY)} "
                              "FROM neurons").fetchall()
        stats = con.execute("SELECT layer, neuron, quadrant, hook, min, max FROM value_stats").fetchall()
    finally:
        con.close()
    out: dict[tuple[int, int], dict[str, float | None]] = {}
    for layer, neuron, *rest in neurons:
        counts, geometry = rest[:4], rest[4:]
        row: dict[str, float | None] = {f"freq_{s}": c / n_tokens for s, c in zip(QUADRANT_SLUGS, counts)}
        row.update(zip(GEOMETRY, geometry))
        row.update({f"absmax_{s}": None for s in QUADRANT_SLUGS})
        out[(layer, neuron)] = row
    for layer, neuron, quadrant, hook, lo, hi in stats:
        if hook == HOOKS.index("hook_post") and lo is not None:
            out[(layer, neuron)][f"absmax_{QUADRANT_SLUGS[quadrant]}"] = max(abs(lo), abs(hi))
    return out


@contextmanager
def served(path):
    """The real app over one file: its test client and the file's model id."""
    with TestClient(create_app([path]), raise_server_exceptions=False) as c:
        (model,) = c.get("/api/models").json()["models"]
        yield c, model["id"]


def edited_copy(recorded_db, tmp_path, name: str) -> tuple:
    """A copy of the recorded file opened for writing: a test plants known rows in it."""
    path = tmp_path / f"{name}.duckdb"
    shutil.copy(recorded_db, path)
    return path, duckdb.connect(str(path))


def brute(facts, layers=None, bounds=None, sort="neuron", order=None) -> list[tuple[int, int]]:
    bounds = bounds or {}
    lo, hi = layers or (0, max(layer for layer, _ in facts))
    order = order or ("asc" if sort == "neuron" else "desc")

    def within(row) -> bool:
        for name, bound in bounds.items():
            side, field = name.split("_", 1)
            v = row[field]
            if v is None or (v < bound if side == "min" else v > bound):
                return False
        return True

    hits = [key for key, row in facts.items() if lo <= key[0] <= hi and within(row)]
    if sort == "neuron":
        return sorted(hits, reverse=order == "desc")
    present = sorted((k for k in hits if facts[k][sort] is not None), key=lambda k: (k[0], k[1]))
    # By value in the asked order, ties by (layer, neuron) ascending; NULLs last.
    present.sort(key=lambda k: facts[k][sort], reverse=order == "desc")
    return present + sorted(k for k in hits if facts[k][sort] is None)


def median(facts, field: str) -> float:
    values = sorted(v[field] for v in facts.values() if v[field] is not None)
    return values[len(values) // 2]


def get_all(client, m, params) -> tuple[int, list[dict]]:
    body = client.get(f"/api/models/{m}/neurons", params={**params, "limit": 500}).json()
    return body["total"], body["neurons"]


def check(client, m, facts, params, layers=None, bounds=None, sort="neuron", order=None):
    total, rows = get_all(client, m, params)
    expected = brute(facts, layers, bounds, sort, order)
    assert total == len(expected) == len(rows)
    assert [(r["layer"], r["neuron"]) for r in rows] == expected
    for r in rows:
        for field in set(r) - {"layer", "neuron"}:
            assert r[field] == facts[(r["layer"], r["neuron"])][field], (r, field)  # exact: float32 widened
    return rows


def test_no_bounds_lists_every_neuron_in_order(client, m, facts):
    rows = check(client, m, facts, {})
    assert set(rows[0]) == {"layer", "neuron", *(f"freq_{s}" for s in QUADRANT_SLUGS)}


@pytest.mark.parametrize("field", FIELDS)
def test_each_bound_and_sort_equals_the_brute_force(client, m, facts, field):
    mid = median(facts, field)
    for side in ("min", "max"):
        check(client, m, facts, {f"{side}_{field}": mid}, bounds={f"{side}_{field}": mid})  # inclusive at a value
    for order in ("asc", "desc"):
        rows = check(client, m, facts, {"sort": field, "order": order}, sort=field, order=order)
        assert set(rows[0]) == {"layer", "neuron", field}


def test_a_layer_range_with_median_bounds_sorted_by_one_quadrant(client, m, facts):
    """Layers 1-1, gate-_in- frequency >= its median, cos(w_in, w_out) <= its median, by that quadrant's
    largest |hook_post|: the tiny model's version of "layers 20-29, gate-_in- >= 20 %, cos <= -0.5"."""
    bounds = {"min_freq_nn": median(facts, "freq_nn"), "max_cos_in_out": median(facts, "cos_in_out")}
    params = {"layers": "1-1", **bounds, "sort": "absmax_nn"}
    rows = check(client, m, facts, params, (1, 1), bounds, "absmax_nn")
    assert rows and set(rows[0]) == {"layer", "neuron", "freq_nn", "cos_in_out", "absmax_nn"}


def test_many_bounds_at_once_and_a_single_layer(client, m, facts):
    bounds = {"min_freq_pp": 0.0, "max_freq_pp": median(facts, "freq_pp"), "min_cos_gate_out": -0.5,
              "max_norm_out": median(facts, "norm_out"), "min_absmax_pp": median(facts, "absmax_pp") / 2}
    check(client, m, facts, {"layers": "0", **bounds, "sort": "norm_gate", "order": "asc"}, (0, 0), bounds,
          "norm_gate", "asc")
    check(client, m, facts, {"layers": " 0 - 1 ", **bounds, "order": "desc"}, (0, 1), bounds, "neuron", "desc")


def test_pages_split_the_same_list(client, m, facts):
    params = {"sort": "absmax_nn", "order": "asc"}
    expected = brute(facts, sort="absmax_nn", order="asc")
    seen = []
    for offset in range(0, len(expected), 37):
        body = client.get(f"/api/models/{m}/neurons", params={**params, "offset": offset, "limit": 37}).json()
        assert body["total"] == len(expected) and (body["offset"], body["limit"]) == (offset, 37)
        seen += [(r["layer"], r["neuron"]) for r in body["neurons"]]
    assert seen == expected
    past = client.get(f"/api/models/{m}/neurons", params={"min_freq_nn": 0.0, "offset": len(facts)}).json()
    assert past["neurons"] == [] and past["total"] == len(brute(facts, bounds={"min_freq_nn": 0.0}))


def test_empty_bounds_from_the_form_mean_no_bound(client, m, facts):
    r = client.get(f"/api/models/{m}/neurons?layers=&min_freq_nn=&max_cos_in_out=&sort=neuron&order=asc")
    assert r.status_code == 200 and r.json()["total"] == len(facts) and r.json()["bounds"] == {}


@pytest.mark.parametrize("query,status,parameter,text", [
    ("layers=abc", 422, "layers", "not a layer range"),
    ("layers=0-7", 404, "layers", "layer 7 does not exist"),
    ("layers=-1", 422, "layers", "not a layer range"),
    ("min_cos_in_out=nan", 422, "min_cos_in_out", "finite"),
    ("max_absmax_pp=inf", 422, "max_absmax_pp", "finite"),
    ("min_norm_in=big", 422, "min_norm_in", None),
    ("sort=banana", 422, "sort", "unknown sort"),
    ("sort=flipped", 422, "sort", "unknown sort"),
    ("order=up", 422, "order", "unknown order"),
    ("order=", 422, "order", "unknown order"),  # the schema's enum: empty is no order
    ("limit=0", 422, "limit", "1..500"),
    ("limit=501", 422, "limit", "1..500"),
    ("offset=-1", 404, "offset", "0..192"),
    ("offset=193", 404, "offset", "0..192"),
])
def test_bad_filters_get_the_one_error_shape(client, m, query, status, parameter, text):
    for url in (f"/api/models/{m}/neurons?{query}", f"/models/{m}/neurons?{query}"):
        r = client.get(url)
        assert r.status_code == status, (url, r.text[:300])
        if url.startswith("/api/"):
            err = r.json()["error"]
            assert set(err) == {"status", "parameter", "message", "valid"} and err["parameter"] == parameter
            assert text is None or text in err["message"], err
        else:
            assert '<p class="error-message">' in r.text


def test_what_no_schema_can_refuse_is_read_as_meant(client, m, facts):
    """A range typed backwards is the same range; a minimum above its maximum leaves no neuron (not a 422:
    OpenAPI cannot relate two parameters, tests/test_openapi.py)."""
    backwards = client.get(f"/api/models/{m}/neurons", params={"layers": "1-0", "sort": "freq_nn"}).json()
    assert backwards == client.get(f"/api/models/{m}/neurons", params={"layers": "0-1", "sort": "freq_nn"}).json()
    assert backwards["layers"] == [0, 1]
    crossed = client.get(f"/api/models/{m}/neurons", params={"min_freq_nn": 0.5, "max_freq_nn": 0.2}).json()
    assert (crossed["total"], crossed["neurons"]) == (0, []) and brute(facts, bounds={"min_freq_nn": 0.5,
                                                                                      "max_freq_nn": 0.2}) == []


def test_filter_page_runs_the_query_of_its_url(client, m, facts):
    bounds = {"min_freq_nn": median(facts, "freq_nn"), "max_cos_in_out": median(facts, "cos_in_out")}
    expected = brute(facts, (1, 1), bounds, "absmax_nn")
    r = client.get(f"/models/{m}/neurons", params={"layers": "1-1", **bounds, "sort": "absmax_nn", "limit": 5})
    html = r.text
    assert r.status_code == 200 and f"{len(expected):,} neuron" in html
    # The form shows the query it ran, so the URL is the shareable result.
    assert 'name="layers" value="1-1"' in html and f'name="min_freq_nn" value="{bounds["min_freq_nn"]}"' in html
    assert '<option value="absmax_nn" selected>' in html
    for layer, neuron in expected[:5]:
        assert f'href="/models/{m}/neurons/{layer}/{neuron}"' in html
    first = ",".join(f"{layer}.{neuron}" for layer, neuron in expected[:4])
    assert f'href="/models/{m}/compare?neurons={first}"' in html
    assert 'rel="next"' in html and "offset=5" in html
    assert client.get(f"/models/{m}/neurons.json", params={"layers": "1-1", **bounds, "sort": "absmax_nn",
                                                            "limit": 5}).json()["total"] == len(expected)


def test_model_and_neuron_pages_link_to_filter_and_compare(client, m):
    assert f'href="/models/{m}/neurons"' in client.get(f"/models/{m}").text
    html = client.get(f"/models/{m}/neurons/1/3").text
    assert f'action="/models/{m}/compare"' in html and 'name="neurons" value="1.3, "' in html


def _neuron_json(client, m, layer, neuron):
    return client.get(f"/api/models/{m}/neurons/{layer}/{neuron}").json()


def test_compare_equals_each_neurons_own_pages(client, m):
    refs = [(1, 3), (0, 17), (1, 95)]
    body = client.get(f"/api/models/{m}/compare", params={"neurons": "1.3, 0.17,1.95", "quadrant": "nn",
                                                          "hook": "act"}).json()
    assert body["neurons"] == [{"layer": a, "neuron": b} for a, b in refs]
    assert (body["quadrant"], body["slug"], body["hook"]) == ("gate-_in-", "nn", "act")
    # Summaries read from the file by the reader equal the neuron pages, served from memory.
    assert body["summaries"] == [_neuron_json(client, m, a, b) for a, b in refs]
    for got, (a, b) in zip(body["examples"], refs):
        assert got == client.get(f"/api/models/{m}/neurons/{a}/{b}/examples",
                                 params={"quadrant": "nn", "hook": "act"}).json()
    assert client.get(f"/models/{m}/compare.json", params={"neurons": "1.3,0.17,1.95", "quadrant": "nn",
                                                           "hook": "act"}).json() == body


def test_compare_page_and_its_fragment(client, m):
    r = client.get(f"/models/{m}/compare", params={"neurons": "0.5,1.7"})
    html = r.text
    assert r.status_code == 200 and html.startswith("<!doctype html>")
    for layer, neuron in ((0, 5), (1, 7)):
        assert f'href="/models/{m}/neurons/{layer}/{neuron}"' in html and f'id="col-{layer}-{neuron}"' in html
        s = _neuron_json(client, m, layer, neuron)
        for q in s["quadrants"]:
            assert f"{100 * q['frequency']:.2f}%" in html
    assert html.count('class="snippet"') > 0 and "related" in html
    assert all(f">{q}</th>" in html for q in QUADRANTS)
    frag = client.get(f"/models/{m}/compare", params={"neurons": "0.5,1.7", "quadrant": "np"}, headers=HX).text
    assert frag.lstrip().startswith("{#") is False and '<div id="compare-lists">' in frag and "<html" not in frag
    assert '<option value="np" selected>' in frag


@pytest.mark.parametrize("neurons,status,text", [
    ("1.3", 422, "1 neuron given"),
    ("0.1,0.2,0.3,0.4,0.5", 422, "5 neurons given"),
    ("", 422, "0 neurons given"),
    ("0.1,0.96", 404, "neuron 96 does not exist"),
    ("0.1,2.0", 404, "layer 2 does not exist"),
    ("0.1,1-2", 422, "is not layer.neuron"),
    ("0.1,abc", 422, "is not layer.neuron"),
    ("0.1,,1.2", 422, "one comma between neurons"),
])
def test_bad_comparisons_get_the_one_error_shape(client, m, neurons, status, text):
    r = client.get(f"/api/models/{m}/compare", params={"neurons": neurons})
    err = r.json()["error"]
    assert r.status_code == status == err["status"] and text in err["message"], err
    assert set(err) == {"status", "parameter", "message", "valid"}
    page = client.get(f"/models/{m}/compare", params={"neurons": neurons})
    assert page.status_code == status and '<p class="error-message">' in page.text
    for bad in ({"neurons": "0.1,1.2", "quadrant": "zz"}, {"neurons": "0.1,1.2", "hook": "nope"}, {}):
        assert client.get(f"/api/models/{m}/compare", params=bad).status_code == 422


def test_a_neuron_given_twice_is_compared_once(client, m):
    once = client.get(f"/api/models/{m}/compare", params={"neurons": "0.1,1.2"}).json()
    twice = client.get(f"/api/models/{m}/compare", params={"neurons": "0.1,1.2,0.1"}).json()
    assert twice == once and once["neurons"] == [{"layer": 0, "neuron": 1}, {"layer": 1, "neuron": 2}]
    alone = client.get(f"/api/models/{m}/compare", params={"neurons": "1.2,1.2"}).json()
    assert alone["neurons"] == [{"layer": 1, "neuron": 2}] and len(alone["summaries"]) == len(alone["examples"]) == 1
    assert alone["summaries"][0] == once["summaries"][1]
    page = client.get(f"/models/{m}/compare", params={"neurons": "1.2,1.2"})
    assert page.status_code == 200 and 'id="col-1-2"' in page.text


def test_compare_shows_the_related_pairs_the_file_holds(recorded_db, tmp_path):
    """A copy of the recorded file with known `related` rows: the comparison lists the pairs among the
    compared neurons, as read back here with plain SQL, and nothing about neurons not compared."""
    path, con = edited_copy(recorded_db, tmp_path, "related")
    con.execute("DELETE FROM related")
    # 0.3 writes to 1.5 through its in weights (kept in 0.3's downstream list and in 1.5's upstream one);
    # 0.3 -> 1.6 via gate is kept only downstream; 0.3 -> 1.9 is about a neuron not compared.
    con.execute("""INSERT INTO related VALUES
        (0, 3, 0, 1, 2, 1, 5, -0.25), (1, 5, 1, 1, 0, 0, 3, -0.25),
        (0, 3, 0, 0, 0, 1, 6, 0.5), (0, 3, 0, 0, 1, 1, 9, 0.4)""")
    expected = con.execute("""
        SELECT layer, neuron, direction, via, other_layer, other_neuron, score FROM related
        WHERE (layer, neuron) IN ((0, 3), (1, 5), (1, 6)) AND (other_layer, other_neuron) IN ((0, 3), (1, 5), (1, 6))
        """).fetchall()
    con.close()
    with served(path) as (c, model):
        body = c.get(f"/api/models/{model}/compare", params={"neurons": "1.5,0.3,1.6"}).json()
        html = c.get(f"/models/{model}/compare", params={"neurons": "1.5,0.3,1.6"}).text
    related = body["related"]
    assert related["recorded"] is True
    got = {(p["writer"]["layer"], p["writer"]["neuron"], p["reader"]["layer"], p["reader"]["neuron"], p["via"]):
           (p["score"], p["downstream"], p["upstream"]) for p in related["pairs"]}
    want: dict = {}
    for layer, neuron, direction, via, ol, on, score in expected:
        key = ((layer, neuron, ol, on) if direction == 0 else (ol, on, layer, neuron)) + (("gate", "in")[via],)
        _, down, up = want.get(key, (score, False, False))
        want[key] = (score, down or direction == 0, up or direction == 1)
    assert got == {k: (pytest.approx(v[0]), v[1], v[2]) for k, v in want.items()}
    assert got[(0, 3, 1, 5, "in")][1:] == (True, True) and got[(0, 3, 1, 6, "gate")][1:] == (True, False)
    assert len(got) == 2
    assert [abs(p["score"]) for p in related["pairs"]] == sorted((abs(p["score"]) for p in related["pairs"]),
                                                                 reverse=True)
    assert "related-pairs" in html and "-0.25" in html


def test_compare_says_when_related_neurons_were_not_recorded(recorded_db, tmp_path):
    path, con = edited_copy(recorded_db, tmp_path, "unrelated")
    con.execute("DELETE FROM related")
    con.close()
    with served(path) as (c, model):
        body = c.get(f"/api/models/{model}/compare", params={"neurons": "0.1,1.2"}).json()
        assert body["related"] == {"recorded": False, "pairs": []}
        assert "were not recorded" in c.get(f"/models/{model}/compare", params={"neurons": "0.1,1.2"}).text


def test_no_input_gives_a_500(client, m):
    weird = ["-1", "1e400", "nan", "", "٣", "0x10", "'; DROP TABLE neurons; --", "a" * 300, "1.5.6", "0.1,,1.2"]
    for value in weird:
        for url in (f"/api/models/{m}/neurons?layers={value}", f"/api/models/{m}/neurons?min_freq_pp={value}",
                    f"/api/models/{m}/neurons?sort={value}", f"/api/models/{m}/compare?neurons={value}",
                    f"/api/models/{m}/compare?neurons=0.1,{value}", f"/models/{m}/neurons?max_absmax_nn={value}"):
            r = client.get(url)
            assert r.status_code < 500, (url, r.text[:200])
            assert math.isfinite(r.status_code)


def test_compare_lists_a_pair_the_recorder_related(client, m, recorded_db):
    """On the recorded file itself: a neuron and its strongest downstream neuron show as one pair, with the
    score the related table holds, in every list that kept it."""
    con = duckdb.connect(str(recorded_db), read_only=True)
    try:
        rows = con.execute("SELECT layer, neuron, via, other_layer, other_neuron, score FROM related "
                           "WHERE direction = 0 AND rank = 0 ORDER BY layer, neuron, via LIMIT 1").fetchall()
        if not rows:
            pytest.skip("this recorder writes no related neurons")
        a, b, via, c, d, score = rows[0]
        kept_up = con.execute("SELECT count(*) FROM related WHERE layer = ? AND neuron = ? AND direction = 1 "
                              "AND via = ? AND other_layer = ? AND other_neuron = ?", [c, d, via, a, b]).fetchall()
    finally:
        con.close()
    body = client.get(f"/api/models/{m}/compare", params={"neurons": f"{c}.{d},{a}.{b}"}).json()
    pair = next(p for p in body["related"]["pairs"] if p["via"] == ("gate", "in")[via]
                and (p["writer"], p["reader"]) == ({"layer": a, "neuron": b}, {"layer": c, "neuron": d}))
    assert pair["score"] == pytest.approx(score) and pair["downstream"] is True
    assert pair["upstream"] is (kept_up[0][0] > 0)


def test_compare_overlays_the_histograms_the_file_holds(recorded_db, tmp_path):
    """Known histogram rows written into a copy of the file: the comparison returns each neuron's counts on
    the common bins, trimmed to the bins any of them fills, and draws one line per neuron."""
    path, con = edited_copy(recorded_db, tmp_path, "histograms")
    if not con.execute("SELECT count(*) FROM histogram_bins WHERE axis = 'value'").fetchall()[0][0]:
        con.execute("INSERT INTO histogram_bins SELECT 'value', b, CASE WHEN b > 0 THEN b - 10 END, "
                    "CASE WHEN b < 19 THEN b - 9 END FROM range(20) t(b)")
    bins = con.execute("SELECT bin, lo, hi FROM histogram_bins WHERE axis = 'value' ORDER BY bin").fetchall()
    b = [row[0] for row in bins]
    con.execute("DELETE FROM histograms")
    # gate-_in- hook_post of 0.3 in bins b[3], b[5]; of 1.5 in b[4]; other lists and neurons must not show.
    assert b[3:6] == [b[3], b[3] + 1, b[3] + 2]
    con.execute("INSERT INTO histograms VALUES (0, 3, 3, 0, ?, [7, 0, 2]), (1, 5, 3, 0, ?, [4]), "
                "(1, 5, 0, 0, ?, [9]), (1, 5, 3, 1, ?, [9]), (1, 6, 3, 0, ?, [9])", [b[3], b[4], b[9], b[9], b[9]])
    con.close()
    with served(path) as (c, model):
        url = f"/api/models/{model}/compare"
        body = c.get(url, params={"neurons": "0.3,1.5", "quadrant": "nn"}).json()
        html = c.get(f"/models/{model}/compare", params={"neurons": "0.3,1.5", "quadrant": "nn"}).text
        act = c.get(url, params={"neurons": "0.3,1.5", "quadrant": "nn", "hook": "act"}).json()
        none = c.get(url, params={"neurons": "0.7,1.8", "quadrant": "nn"}).json()
        frag = c.get(f"/models/{model}/compare", params={"neurons": "0.7,1.8"}, headers=HX).text
    h = body["histograms"]
    assert (h["quadrant"], h["hook"]) == ("gate-_in-", "hook_post")
    assert h["counts"] == [[7, 0, 2], [0, 4, 0]]
    assert h["edges"] == [pytest.approx(bins[k][1]) if bins[k][1] is not None else None for k in (3, 4, 5)] + \
        [pytest.approx(bins[5][2])]
    assert html.count('<path class="series"') == 2 and "<title>0.3</title>" in html
    assert act["histograms"] is None and none["histograms"] is None and 'id="no-histograms"' in frag


@pytest.mark.parametrize("side", ["weights", "examples"])
def test_search_results_open_their_first_neurons_in_the_comparison(client, m, side):
    found = client.get(f"/api/models/{m}/search/tokens", params={"token_id": 3, "side": side}).json()["results"]
    first = list(dict.fromkeys(f"{r['layer']}.{r['neuron']}" for r in found))[:4]
    html = client.get(f"/models/{m}/search", params={"token_id": 3, "side": side}).text
    if len(first) < 2:
        assert 'id="compare-first"' not in html
        return
    extra = f"&amp;quadrant={found[0]['slug']}&amp;hook={found[0]['hook']}" if side == "examples" else ""
    href = f'href="/models/{m}/compare?neurons={",".join(first)}{extra}"'
    assert href in html
    assert client.get(f"/models/{m}/compare?neurons={','.join(first)}").status_code == 200
