"""Histograms, the joint density, random and interval examples and the §5.1 scatter, served by the real app over a
database recorded by the real recorder: every number against the file's own tables, read here with plain SQL
and NumPy."""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import pytest

from gluscope.schema import HISTOGRAM_HOOKS, HOOKS, QUADRANT_SLUGS, QUADRANTS

from .brute_force import DENSITY_CELLS, HISTOGRAM_CELLS
from .recordings import PLANTED_SCRIPT

pytestmark = pytest.mark.integration

HX = {"HX-Request": "true"}
NEURONS = [(0, 0), (0, 17), (1, 42), (1, 95)]
SVG = re.compile(r"<svg\b.*?</svg>", re.S)


@pytest.fixture(scope="module")
def n_tokens(con) -> int:
    return con.execute("SELECT n_tokens FROM metadata").fetchall()[0][0]


def edges_of(con, axis: str) -> list[float | None]:
    rows = con.execute("SELECT bin, lo, hi FROM histogram_bins WHERE axis = ? ORDER BY bin", [axis]).fetchall()
    assert [b for b, _, _ in rows] == list(range(len(rows)))
    return [lo for _, lo, _ in rows] + [rows[-1][2]]


def test_the_bins_are_the_documented_ones(con):
    """schema.sql: 116 'value' bins, two per octave of |v| from 2^-16 to 2^12, and 24 'density' bins, one per
    two octaves from 2^-12 to 2^8, mirrored around 0, open at both ends."""
    value = [m * 2.0 ** e for e in range(-16, 12) for m in (1.0, 1.5)] + [2.0 ** 12]
    density = [2.0 ** e for e in range(-12, 9, 2)]
    for axis, magnitudes in {"value": value, "density": density}.items():
        positive = [0.0] + magnitudes
        assert edges_of(con, axis) == [None, *(-v for v in reversed(positive[1:])), *positive, None]


def test_the_count_lists_run_from_a_count_to_a_count(con):
    """schema.sql: a list of histograms or density starts and ends with a count > 0; none is empty."""
    for table in ("histograms", "density"):
        n, bad = con.execute(f"SELECT count(*), count(*) FILTER (WHERE len(counts) = 0 OR counts[1] <= 0 "
                             f"OR counts[-1] <= 0 OR list_min(counts) < 0) FROM {table}").fetchall()[0]
        assert n > 0 and bad == 0, table


@pytest.mark.parametrize("layer,neuron", NEURONS)
def test_histograms_equal_the_tables(client, con, model_id, n_tokens, layer, neuron):
    body = client.get(f"/api/models/{model_id}/neurons/{layer}/{neuron}/histograms").json()
    assert (body["model"], body["layer"], body["neuron"], body["n_tokens"]) == (model_id, layer, neuron, n_tokens)
    counts = con.execute("SELECT count_pp, count_pn, count_np, count_nn FROM neurons WHERE layer = ? AND neuron = ?",
                         [layer, neuron]).fetchall()[0]
    assert sum(counts) > 0
    edges = edges_of(con, "value")
    assert list(body["values"]) == list(HISTOGRAM_HOOKS)
    for name, value in body["values"].items():
        dense = np.zeros((4, len(edges) - 1), np.int64)
        for q, b, c in con.execute(f"SELECT quadrant, bin, count FROM {HISTOGRAM_CELLS} WHERE layer = ? AND neuron = ? "
                                   "AND hook = ?", [layer, neuron, HOOKS.index(name)]).fetchall():
            dense[q, b] += c
        nonzero = np.flatnonzero(dense.sum(0))
        first, stop = nonzero[0], nonzero[-1] + 1
        assert value["first_bin"] == first and value["edges"] == edges[first:stop + 1]
        assert list(value["counts"]) == list(QUADRANTS)
        for q, label in enumerate(QUADRANTS):
            assert value["counts"][label] == dense[q, first:stop].tolist()
            assert sum(value["counts"][label]) == counts[q], (name, label)  # every token in exactly one bin
    assert [q["count"] for q in body["quadrants"]] == list(counts)
    assert [q["frequency"] for q in body["quadrants"]] == pytest.approx([c / n_tokens for c in counts])

    d = body["density"]
    d_edges = edges_of(con, "density")
    grid = np.zeros((len(d_edges) - 1,) * 2, np.int64)
    for g, i, c in con.execute(f"SELECT gate_bin, in_bin, count FROM {DENSITY_CELLS} WHERE layer = ? AND neuron = ?",
                               [layer, neuron]).fetchall():
        grid[g, i] += c
    g0, i0 = d["first_gate_bin"], d["first_in_bin"]
    shown = np.asarray(d["counts"])
    assert d["gate_edges"] == d_edges[g0:g0 + shown.shape[0] + 1] and d["in_edges"] == d_edges[i0:i0 + shown.shape[1] + 1]
    assert (grid[g0:g0 + shown.shape[0], i0:i0 + shown.shape[1]] == shown).all() and shown.sum() == grid.sum()
    assert grid.sum() == sum(counts)  # the counted tokens: those in a quadrant
    # The quadrant lines: cells left of x_gate = 0 hold the gate- quadrants, below x_in = 0 the in- ones.
    zero = d_edges.index(0.0)
    assert grid[zero:, zero:].sum() == counts[0] and grid[zero:, :zero].sum() == counts[1]
    assert grid[:zero, zero:].sum() == counts[2] and grid[:zero, :zero].sum() == counts[3]


@pytest.mark.parametrize("layer,neuron", NEURONS)
def test_intervals_and_their_counts(client, con, model_id, layer, neuron):
    """Each quadrant's intervals as stored; its count is the quadrant's tokens with |hook_post| in [lo, hi),
    summed here from the hook_post histogram (the bounds are bin edges)."""
    body = client.get(f"/api/models/{model_id}/neurons/{layer}/{neuron}/histograms").json()
    edges = edges_of(con, "value")
    for q, quadrant in enumerate(body["quadrants"]):
        stored = con.execute("SELECT interval, lo, hi FROM intervals WHERE layer = ? AND neuron = ? AND quadrant = ? "
                             "ORDER BY interval", [layer, neuron, q]).fetchall()
        assert [(i["interval"], i["lo"], i["hi"]) for i in quadrant["intervals"]] == stored
        if quadrant["count"]:
            assert len(stored) >= 4
        bins = dict(con.execute(f"SELECT bin, count FROM {HISTOGRAM_CELLS} WHERE layer = ? AND neuron = ? "
                                "AND quadrant = ? AND hook = 0 AND count > 0", [layer, neuron, q]).fetchall())
        for iv in quadrant["intervals"]:
            assert iv["lo"] in {abs(e) for e in edges if e is not None}
            top = float("inf") if iv["hi"] is None else iv["hi"]
            inside = 0
            for b, c in bins.items():
                lo, hi = edges[b], edges[b + 1]
                mag = sorted(abs(x) if x is not None else float("inf") for x in (lo, hi))
                if iv["lo"] <= mag[0] and mag[1] <= top:
                    inside += c
            assert iv["count"] == inside
        assert sum(iv["count"] for iv in quadrant["intervals"]) == quadrant["count"]


def _f16(bits) -> np.ndarray:
    return np.asarray(bits, np.int16).view(np.float16).astype(np.float64)


@pytest.mark.parametrize("kind", ["random", "interval"])
@pytest.mark.parametrize("layer,neuron", NEURONS[1:3])
def test_sampled_examples_equal_the_samples_table(client, con, model_id, kind, layer, neuron):
    """kind=random and kind=interval list the samples table's rows, in its order, with the value of the hook asked
    for (hook_post = act * x_in in float32), each interval example with its interval's bounds, and the window."""
    code = ("random", "interval").index(kind)
    seen = 0
    for q, slug in enumerate(QUADRANT_SLUGS):
        rows = con.execute(
            "SELECT s.interval, s.rank, s.text_id, s.position, s.x_gate, s.x_in, s.act, i.lo, i.hi, "
            "       w.window_start, w.x_gate, w.x_in, t.token_ids "
            "FROM samples s JOIN windows w USING (layer, neuron, text_id, position) JOIN texts t USING (text_id) "
            "LEFT JOIN intervals i ON i.layer = s.layer AND i.neuron = s.neuron AND i.quadrant = s.quadrant "
            "     AND i.interval = s.interval AND s.kind = 1 "
            "WHERE s.layer = ? AND s.neuron = ? AND s.quadrant = ? AND s.kind = ? ORDER BY s.interval, s.rank",
            [layer, neuron, q, code]).fetchall()
        n_samples = con.execute("SELECT count(*) FROM samples WHERE layer = ? AND neuron = ? AND quadrant = ? "
                                "AND kind = ?", [layer, neuron, q, code]).fetchall()[0][0]
        assert len(rows) == n_samples  # every sample has its window
        for hook in HOOKS:
            body = client.get(f"/api/models/{model_id}/neurons/{layer}/{neuron}/examples",
                              params={"quadrant": slug, "hook": hook, "kind": kind}).json()
            assert (body["kind"], body["quadrant"], body["hook"], body["interval"]) == (kind, QUADRANTS[q], hook, None)
            assert len(body["examples"]) == len(rows)
            for ex, (interval, rank, text_id, position, g, x, act, lo, hi, start, wg, wx, ids) in zip(body["examples"], rows):
                assert (ex["rank"], ex["text_id"], ex["position"], ex["window_start"]) == (rank, text_id, position, start)
                want = {"hook_post": float(np.float32(act) * np.float32(x)), "hook_pre_linear": x, "hook_pre": g,
                        "act": act}[hook]
                assert ex["value"] == pytest.approx(want, rel=1e-7, abs=0)
                assert ex.get("interval") == ([lo, hi] if kind == "interval" else None)
                assert ex["token_ids"] == ids[start:start + len(wg)]
                np.testing.assert_allclose(ex["activations"]["hook_pre"], _f16(wg), rtol=1e-6)
                np.testing.assert_allclose(ex["activations"]["hook_pre_linear"], _f16(wx), rtol=1e-6)
                # The token of interest is in the quadrant, and in its interval.
                i = position - start
                assert np.sign(_f16(wg)[i]) == (1 if slug[0] == "p" else -1)
                assert np.sign(_f16(wx)[i]) == (1 if slug[1] == "p" else -1)
                if kind == "interval":
                    post = abs(float(np.float32(act) * np.float32(x)))
                    assert lo <= post and (hi is None or post < hi)
        seen += len(rows)
        # At most one example per text within a list (per interval for kind=interval).
        keys = [(r[0], r[2]) for r in rows]
        assert len(keys) == len(set(keys))
    assert seen > 0


def test_a_sampled_list_is_the_same_whether_the_neuron_was_read_before_or_not(recorded_db, model_id):
    """A neuron not in memory reads its samples with its examples (one statement); one whose top list came first
    reads them alone: both give the same lists, and the top lists stay the same."""
    from starlette.testclient import TestClient

    from gluscope.server.app import create_app
    base = f"/api/models/{model_id}/neurons/1/3/examples"
    asks = [{"quadrant": q, "hook": h, "kind": k} for q in QUADRANT_SLUGS for h, k in
            (("hook_post", "top"), ("hook_post", "random"), ("x_in", "random"), ("act", "interval"))]
    answers = []
    for order in (asks, asks[1:] + asks[:1], asks[::-1]):
        with TestClient(create_app([recorded_db])) as c:
            answers.append({str(a): c.get(base, params=a).json() for a in order})
    assert answers[0] == answers[1] == answers[2]
    assert any(body["examples"] for key, body in answers[0].items() if "random" in key)


def test_one_interval_alone(client, con, model_id):
    layer, neuron = 1, 42
    for q, slug in enumerate(QUADRANT_SLUGS):
        url = f"/api/models/{model_id}/neurons/{layer}/{neuron}/examples"
        every = client.get(url, params={"quadrant": slug, "hook": "hook_post", "kind": "interval"}).json()
        bounds = {iv["interval"]: [iv["lo"], iv["hi"]] for iv in every["intervals"]}
        assert list(bounds) == [r[0] for r in con.execute(
            "SELECT interval FROM intervals WHERE layer = ? AND neuron = ? AND quadrant = ? ORDER BY interval",
            [layer, neuron, q]).fetchall()]
        for i in bounds:
            one = client.get(url, params={"quadrant": slug, "hook": "hook_post", "kind": "interval", "interval": i}).json()
            assert one["interval"] == i
            assert one["examples"] == [ex for ex in every["examples"] if ex["interval"] == bounds[i]]


@pytest.mark.parametrize("params,status,parameter", [
    ({"quadrant": "pp", "hook": "act", "kind": "bogus"}, 422, "kind"),
    ({"quadrant": "pp", "hook": "act", "kind": "TOP"}, 422, "kind"),
    ({"quadrant": "pp", "hook": "act", "interval": "4"}, 422, "interval"),  # outside 0..3 whatever the kind
    ({"quadrant": "pp", "hook": "act", "kind": "interval", "interval": "99"}, 422, "interval"),
    ({"quadrant": "pp", "hook": "act", "kind": "interval", "interval": "-1"}, 422, "interval"),
    ({"quadrant": "pp", "hook": "act", "kind": "interval", "interval": "x"}, 422, "interval"),
])
def test_bad_kind_or_interval_has_the_error_shape(client, model_id, params, status, parameter):
    for prefix in ("/api/models", "/models"):
        r = client.get(f"{prefix}/{model_id}/neurons/0/3/examples", params=params,
                       headers={"Accept": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"status", "parameter", "message", "valid"} and err["parameter"] == parameter
        page = client.get(f"/models/{model_id}/neurons/0/3/examples", params=params)
        assert page.status_code == status and '<p class="error-message">' in page.text


@pytest.mark.parametrize("url,status,parameter", [
    ("/api/models/{m}/neurons/0/96/histograms", 404, "neuron"),
    ("/api/models/{m}/neurons/5/0/histograms", 404, "layer"),
    ("/models/{m}/neurons/0/1/histograms?hook=act", 422, "hook"),
    ("/api/models/{m}/layers/2/scatter", 404, "layer"),
    ("/models/{m}/layers/2/scatter.png", 404, "layer"),
    ("/models/{m}/layers/0/scatter/click?x=1", 422, "y"),
    ("/models/{m}/layers/0/scatter/click?x=a&y=1", 422, "x"),
    ("/models/{m}.json?scatter=7", 404, "scatter"),
])
def test_new_routes_refuse_bad_parameters_in_the_one_shape(client, model_id, url, status, parameter):
    r = client.get(url.format(m=model_id), headers={"Accept": "application/json"})
    assert r.status_code == status and r.json()["error"]["parameter"] == parameter


def test_histogram_pages_plots_and_switch(client, model_id):
    base = f"/models/{model_id}/neurons/1/42"
    page = client.get(f"{base}/histograms")
    assert page.status_code == 200 and page.text.startswith("<!doctype html>")
    fragment = client.get(f"{base}/histograms", headers=HX).text
    assert "<html" not in fragment and '<div class="dist">' in fragment
    # Four histograms and one density, each well-formed XML; links switch to the other values.
    svgs = SVG.findall(fragment)
    assert len(svgs) == 5 and all(ET.fromstring(s) is not None for s in svgs)
    for h in HISTOGRAM_HOOKS:
        assert f'href="{base}/histograms?hook={h}"' in fragment
    # The hook_post histograms carry the intervals as links, and so does the caption under each.
    body = client.get(f"/api/models/{model_id}/neurons/1/42/histograms").json()
    for q in body["quadrants"]:
        for iv in q["intervals"]:
            link = f'{base}/examples?quadrant={q["slug"]}&amp;hook=hook_post&amp;kind=interval&amp;interval={iv["interval"]}'
            # In the caption always; over the histogram where the interval overlaps the plotted range, as it
            # does wherever it holds tokens.
            assert fragment.count(f'href="{link}"') in ((2,) if iv["count"] else (1, 2))
    other = client.get(f"{base}/histograms?hook=hook_pre", headers=HX).text
    assert 'class="interval"' not in other and len(SVG.findall(other)) == 5 and other != fragment
    # The neuron page loads them lazily, and still works without JavaScript (a link).
    neuron = client.get(base).text
    assert f'hx-get="{base}/histograms"' in neuron and f'<a href="{base}/histograms">' in neuron


def test_bars_are_the_counts(client, model_id):
    """Each bar's tooltip gives its count; per quadrant they add up to the quadrant's tokens."""
    base = f"/models/{model_id}/neurons/0/17"
    body = client.get(f"/api/models/{model_id}/neurons/0/17/histograms").json()
    for hook in HISTOGRAM_HOOKS:
        svgs = SVG.findall(client.get(f"{base}/histograms?hook={hook}", headers=HX).text)
        for q, svg in zip(body["quadrants"], svgs[:4]):
            root = ET.fromstring(svg)
            ns = "{http://www.w3.org/2000/svg}"
            bars = [t.text for g in root.iter(f"{ns}g") if "bar" in g.get("class", "") for t in g.iter(f"{ns}title")]
            assert sum(int(re.search(r": ([\d,]+) tokens", b).group(1).replace(",", "")) for b in bars) == q["count"]


def test_svg_text_is_escaped():
    """Text in a plot is escaped: the planted <script> as a caption and a quadrant label stays text."""
    from gluscope.server import plots

    slot, lows, highs = plots.magnitude_slots([-1.0, -0.5, 0.0, 0.5, 1.0, None])
    bands = [plots.Band(0.0, 0.5, f"/x?a=1&b={PLANTED_SCRIPT}", PLANTED_SCRIPT)]
    hist = plots.histogram_svg([1, 2, 3, 4, 5], slot, lows, highs, (0, len(lows)), 1, "pp", PLANTED_SCRIPT, bands)
    dens = plots.density_svg([[1, 2], [3, 4]], [-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], {"pp": 0.5},
                             {s: PLANTED_SCRIPT for s in QUADRANT_SLUGS})
    for svg in (hist, dens):
        assert "<script" not in svg and "&lt;script&gt;" in svg
        root = ET.fromstring(str(svg))
        assert not [e for e in root.iter() if e.tag.rsplit("}", 1)[-1].lower() == "script"]
        assert any(PLANTED_SCRIPT in (e.text or "") for e in root.iter())


def test_model_page_correlation_equals_numpy(client, con, model_id, n_tokens):
    body = client.get(f"/api/models/{model_id}").json()
    for layer in body["layers"]:
        freq, cos = con.execute("SELECT (count_pp + count_pn)::DOUBLE, cos_in_out FROM neurons WHERE layer = ? "
                                "ORDER BY neuron", [layer["layer"]]).fetchnumpy().values()
        r = np.corrcoef(freq / n_tokens, cos)[0, 1]
        assert layer["r_gate_pos_cos_in_out"] == pytest.approx(r, abs=1e-6)
    html = client.get(f"/models/{model_id}").text
    assert "r (§5.1)" in html and f'href="/models/{model_id}?scatter=1#scatter"' in html


def _png(data: bytes) -> np.ndarray:
    """Decode an 8-bit palette PNG with filter-0 rows (what the server writes), by the spec, to [h, w, 3] RGB."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, size, palette = 8, b"", None, None
    while at < len(data):
        (n,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        chunk = data[at + 8:at + 8 + n]
        assert struct.unpack(">I", data[at + 8 + n:at + 12 + n])[0] == zlib.crc32(kind + chunk)
        if kind == b"IHDR":
            size = struct.unpack(">II", chunk[:8])
            assert chunk[8:] == bytes([8, 3, 0, 0, 0])
        elif kind == b"PLTE":
            palette = np.frombuffer(chunk, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat += chunk
        at += 12 + n
    w, h = size
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w)
    assert (raw[:, 0] == 0).all() and raw[:, 1:].max() < len(palette)
    return palette[raw[:, 1:]]


def test_scatter_json_png_and_a_click(client, con, model_id, n_tokens):
    """The scatter's points are the layer's neurons; the image shows a dot at each; a click at a neuron's dot
    (its pixel read off the page's own tick labels) opens that neuron."""
    layer = 1
    body = client.get(f"/api/models/{model_id}/layers/{layer}/scatter").json()
    rows = con.execute("SELECT neuron, (count_pp + count_pn)::DOUBLE / ?, cos_in_out FROM neurons WHERE layer = ? "
                       "ORDER BY neuron", [n_tokens, layer]).fetchall()
    assert body["neuron"] == [r[0] for r in rows] and body["n_neurons"] == len(rows)
    assert body["freq_gate_pos"] == pytest.approx([r[1] for r in rows]) and body["cos_in_out"] == pytest.approx([r[2] for r in rows])
    assert body["r"] == pytest.approx(np.corrcoef([r[1] for r in rows], [r[2] for r in rows])[0, 1], abs=1e-6)
    assert client.get(f"/models/{model_id}/layers/{layer}/scatter.json").json() == body

    page = client.get(f"/models/{model_id}/layers/{layer}/scatter").text
    assert f'action="/models/{model_id}/layers/{layer}/scatter/click"' in page and 'type="image"' in page
    width, height = (int(v) for v in re.search(r'<input type="image"[^>]* width="(\d+)" height="(\d+)"', page).groups())
    # Tick labels sit at their value's pixel (box coordinates: 56 px of labels left of the image, 18 above).
    xt = [(float(v), float(p) - 56) for p, v in re.findall(r'<span class="xt" style="left:(\d+)px;[^"]*">([^<]+)<', page)]
    yt = [(float(v), float(p) - 10) for p, v in re.findall(r'<span class="yt" style="top:(-?\d+)px">([^<]+)<', page)]
    assert len(xt) >= 2 and len(yt) >= 2
    (x0, p0), (x1, p1) = xt[0], xt[-1]
    (y0, q0), (y1, q1) = yt[0], yt[-1]
    px = p0 + (np.array(body["freq_gate_pos"]) - x0) * (p1 - p0) / (x1 - x0)
    py = q0 + (np.array(body["cos_in_out"]) - y0) * (q1 - q0) / (y1 - y0)

    image = _png(client.get(f"/models/{model_id}/layers/{layer}/scatter.png").content)
    assert image.shape == (height, width, 3)
    dark = image.sum(axis=2) < 300
    for i in range(len(px)):  # a dot within a pixel (the labels are rounded) of every neuron
        x, y = int(round(px[i])), int(round(py[i]))
        assert dark[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any(), i
    # Click on the most isolated neuron's dot: its page.
    d = np.hypot(px[:, None] - px[None], py[:, None] - py[None]) + np.eye(len(px)) * 1e9
    lonely = int(np.argmax(d.min(axis=1)))
    r = client.get(f"/models/{model_id}/layers/{layer}/scatter/click",
                   params={"x": int(round(px[lonely])), "y": int(round(py[lonely]))}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/models/{model_id}/neurons/{layer}/{body['neuron'][lonely]}"
    # The model page shows the chosen layer's scatter in the same form.
    html = client.get(f"/models/{model_id}", params={"scatter": layer}).text
    assert f'src="/models/{model_id}/layers/{layer}/scatter.png"' in html


@pytest.mark.parametrize("kind", ["random", "interval"])
def test_sample_fragments_and_tabs(client, model_id, kind):
    base = f"/models/{model_id}/neurons/1/42/examples?quadrant=nn&hook=hook_post"
    fragment = client.get(f"{base}&kind={kind}", headers=HX).text
    data = client.get(f"/api/models/{model_id}/neurons/1/42/examples?quadrant=nn&hook=hook_post&kind={kind}").json()
    assert fragment.count('<li class="ex">') == len(data["examples"]) > 0
    assert f'data-kind="{kind}"' in fragment
    for k in ("top", "random", "interval"):
        assert f'hx-get="{base.replace("&", "&amp;")}&amp;kind={k}"' in fragment
    if kind == "interval":
        groups = {tuple(ex["interval"]) for ex in data["examples"]}
        assert fragment.count('<li class="ex-group">') == len(groups)
    page = client.get(f"{base}&kind={kind}").text
    assert page.startswith("<!doctype html>") and page.count('<li class="ex">') == len(data["examples"])


@pytest.mark.parametrize("page,api", [
    ("/models/{m}/neurons/1/42/histograms.json", "/api/models/{m}/neurons/1/42/histograms"),
    ("/models/{m}/neurons/0/5/examples.json?quadrant=np&hook=act&kind=interval&interval=1",
     "/api/models/{m}/neurons/0/5/examples?quadrant=np&hook=act&kind=interval&interval=1"),
    ("/models/{m}/layers/1/scatter.json", "/api/models/{m}/layers/1/scatter"),
])
def test_new_pages_have_json_twins(client, model_id, page, api):
    twin, direct = client.get(page.format(m=model_id)), client.get(api.format(m=model_id))
    assert twin.status_code == direct.status_code == 200 and twin.json() == direct.json()
    html = client.get(page.format(m=model_id).replace(".json", "", 1))
    assert html.headers["content-type"].startswith("text/html") and 'rel="alternate"' in html.headers["link"]
    negotiated = client.get(page.format(m=model_id).replace(".json", "", 1), headers={"Accept": "application/json"})
    assert negotiated.json() == direct.json()
