"""HTML pages and htmx fragments of the real app over a recorded database."""

from __future__ import annotations

import base64
import html
import re

import numpy as np
import pytest

from gluscope.schema import HOOKS, QUADRANTS
from gluscope.server import render

pytestmark = pytest.mark.integration

HX = {"HX-Request": "true"}


@pytest.fixture(scope="module")
def m(model_id):
    return model_id


@pytest.fixture(scope="module")
def script_example(script_list):
    return script_list


def test_index_lists_models_and_has_a_jump_box(client, m):
    html = client.get("/").text
    assert f'href="/models/{m}"' in html and 'action="/-/jump"' in html and 'name="to"' in html
    for column in ("layers", "neurons", "tokens recorded", "dataset", "recorded"):
        assert column in html


def test_jump_box_goes_to_the_neuron(client, m):
    r = client.get("/-/jump", params={"model": m, "to": "1.42"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/models/{m}/neurons/1/42"
    bad = client.get("/-/jump", params={"model": m, "to": "1.960"})
    assert bad.status_code == 404 and "neuron 960 does not exist" in bad.text and "0..95" in bad.text
    assert client.get("/-/jump", params={"model": m, "to": "banana"}).status_code == 422


def test_model_page_lists_layers(client, m):
    html = client.get(f"/models/{m}").text
    assert f'href="/models/{m}/layers/0"' in html and f'href="/models/{m}/layers/1"' in html
    assert 'action="/-/jump"' in html


def test_neuron_page_shows_figure_1(client, m):
    data = client.get(f"/api/models/{m}/neurons/1/3").json()
    r = client.get(f"/models/{m}/neurons/1/3")
    assert r.status_code == 200 and r.text.startswith("<!doctype html>")
    html = r.text
    for q in QUADRANTS:
        assert f">{q}</th>" in html
    for hook in HOOKS:
        assert f"<th colspan=\"5\">{hook}" in html
    for q in data["quadrants"]:
        assert f"{100 * q['frequency']:.2f}%" in html
        assert f"{q['stats']['hook_post']['max']:.3g}" in html
    # Navigation and the weight convention.
    assert f'href="/models/{m}/neurons/1/2"' in html and f'href="/models/{m}/neurons/1/4"' in html
    assert f'href="/models/{m}/random"' in html and "flipped" in html
    # Sixteen lazy sections, none loaded: no token is on the page yet.
    assert len(re.findall(r'<details class="ex-section"', html)) == 16
    assert 'hx-trigger="toggle once"' in html and 'class="t ' not in html and 'class="t"' not in html
    assert f'hx-get="/models/{m}/neurons/1/3/examples?quadrant=nn&amp;hook=act"' in html


def test_prev_next_cross_layer_boundaries(client, m):
    first, last_of_0 = client.get(f"/models/{m}/neurons/0/0").text, client.get(f"/models/{m}/neurons/0/95").text
    assert 'id="prev-neuron"' not in first
    assert f'href="/models/{m}/neurons/1/0"' in last_of_0
    assert 'id="next-neuron"' not in client.get(f"/models/{m}/neurons/1/95").text


def test_random_neuron_redirects_to_a_valid_neuron(client, m):
    r = client.get(f"/models/{m}/random", follow_redirects=False)
    assert r.status_code == 302 and re.fullmatch(rf"/models/{m}/neurons/[01]/\d+", r.headers["location"])
    assert client.get(r.headers["location"]).status_code == 200


def test_examples_fragment_is_a_partial_and_the_page_wraps_it(client, m):
    url = f"/models/{m}/neurons/0/4/examples?quadrant=pp&hook=hook_post"
    fragment = client.get(url, headers=HX)
    page = client.get(url)
    assert fragment.status_code == page.status_code == 200
    assert "<html" not in fragment.text and '<div class="examples"' in fragment.text
    assert page.text.startswith("<!doctype html>") and '<div class="examples"' in page.text
    assert fragment.headers["vary"].startswith("HX-Request")
    # A history restore gets the whole page.
    restored = client.get(url, headers={**HX, "HX-History-Restore-Request": "true"})
    assert restored.text.startswith("<!doctype html>")
    n = len(client.get(url.replace("/examples", "/examples.json")).json()["examples"])
    assert fragment.text.count('<li class="ex">') == page.text.count('<li class="ex">') == n
    # The page marks each token of interest itself; the fragment says where it is, for gluscope.js.
    assert len(re.findall(r'class="t (?:oq )?focus" tabindex', page.text)) == n
    assert len(re.findall(r'<div class="snippet" data-start="\d+" data-focus="\d+" data-v="', fragment.text)) == n


def test_fragment_snippets_carry_the_json_values_exactly(client, m):
    """The fragment's data-v holds every token's four values as float32: the JSON twin's numbers, bit for bit."""
    url = f"/models/{m}/neurons/1/3/examples?quadrant=np&hook=act"
    data = client.get(url.replace("/examples", "/examples.json")).json()
    fragment = client.get(url, headers=HX).text
    snippets = re.findall(r'<div class="snippet" data-start="(\d+)" data-focus="(\d+)" data-v="([^"]*)">(.*?)</div>',
                          fragment, re.S)
    assert len(snippets) == len(data["examples"]) > 0
    for (start, focus, b64, body), ex in zip(snippets, data["examples"]):
        n = len(ex["tokens"])
        assert int(start) == ex["window_start"] and int(focus) == ex["position"] - ex["window_start"]
        values = np.frombuffer(base64.b64decode(b64), "<f4").reshape(len(HOOKS), n)
        for k, hook in enumerate(HOOKS):
            expected = np.array([np.nan if v is None else v for v in ex["activations"][hook]], np.float32)
            np.testing.assert_array_equal(values[k], expected)
        spans = re.findall(r'<span class="t" tabindex="0">(.*?)</span>(?=<span class="t"|$)', body, re.S)
        assert [html.unescape(re.sub(r"<[^>]+>", "", t)) for t in spans] == [
            "".join(render.WHITESPACE_MARKS.get(c, c) for c in tok) or "∅" for tok in ex["tokens"]]


def test_every_token_title_holds_its_four_values_and_colour(client, m):
    """Each token's title on the page (which gluscope.js turns into the tooltip) against the JSON twin, token by token."""
    url = f"/models/{m}/neurons/1/3/examples?quadrant=np&hook=act"
    data = client.get(url.replace("/examples", "/examples.json")).json()
    fragment = client.get(url).text  # the page: complete without JavaScript
    spans = re.findall(r'<span class="(t[^"]*)" tabindex="0" title="([^"]*)"( style="[^"]*")?>', fragment)
    tokens = [(ex, i) for ex in data["examples"] for i in range(len(ex["tokens"]))]
    assert len(spans) == len(tokens) > 0
    scale = max(abs(v) for ex in data["examples"] for v in ex["activations"]["act"] if v is not None)
    for (cls, title, style), (ex, i) in zip(spans, tokens):
        head, *lines = title.split("&#10;")
        assert head.startswith(f"position {ex['window_start'] + i} · ")
        assert [line.split(" ")[0] for line in lines] == list(HOOKS)
        for line, hook in zip(lines, HOOKS):
            v = ex["activations"][hook][i]
            shown = line.split(" ")[1]
            assert shown == "—" if v is None else float(shown) == pytest.approx(v, rel=1e-3, abs=1e-12)
        v = ex["activations"]["act"][i]
        alpha = min(abs(v) / scale, 1) * 0.85 if v else 0
        if alpha >= 0.005:
            assert style.endswith(f',{alpha:.3f})"') and ("214,39,40" in style) == (v > 0)
        else:
            assert not style
        assert ("focus" in cls) == (i == ex["position"] - ex["window_start"])


def test_format_many_is_fmt_for_every_kind_of_number():
    from gluscope.server.render import fmt, format_many

    values = [0.0, -0.0, 1.0, -1.5, 123456.0, 1e-7, -3.14159e-3, float("nan"), float("inf"), None, 65504.0]
    assert format_many(values) == [fmt(v) for v in values]
    assert format_many([]) == []


def test_tokens_are_escaped_and_whitespace_is_visible(client, m, script_example, planted_script_text_id):
    layer, neuron, slug, hook = script_example
    html = client.get(f"/models/{m}/neurons/{layer}/{neuron}/examples",
                      params={"quadrant": slug, "hook": hook}, headers=HX).text
    assert "&lt;script&gt;" in html and "<script>" not in html.lower().replace("<script src", "")
    text_page = client.get(f"/models/{m}/texts/{planted_script_text_id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text_page
    assert "<script>alert" not in text_page
    assert "script-src 'self'" in client.get(f"/models/{m}/texts/{planted_script_text_id}").headers["content-security-policy"]
    # A text with tabs, double spaces and newlines shows visible marks in its tokens view.
    assert '<span class="ws">·</span>' in text_page or '<span class="ws">⏎' in client.get(f"/models/{m}/texts/0").text


def test_each_example_can_load_its_full_text(client, m):
    frag = client.get(f"/models/{m}/neurons/1/1/examples", params={"quadrant": "pn", "hook": "hook_pre"}, headers=HX).text
    match = re.search(r'hx-get="(/models/[^"]+/texts/(\d+)\?position=(\d+))"', frag)
    assert match
    url, text_id, position = match.group(1), int(match.group(2)), int(match.group(3))
    full = client.get(url, headers=HX)
    assert full.status_code == 200 and "<html" not in full.text and '<mark class="focus-text">' in full.text
    assert f"text {text_id}" in full.text
    token = client.get(f"/api/models/{m}/texts/{text_id}").json()["tokens"][position]
    marked = re.search(r'<mark class="focus-text">(.*?)</mark>', full.text, re.S).group(1)
    assert marked == html.escape(token, quote=False)
    assert client.get(url).text.startswith("<!doctype html>")


def test_colour_selector_works_without_javascript(client, m):
    url = f"/models/{m}/neurons/0/2/examples?quadrant=nn&hook=hook_post"
    by_post = client.get(url).text
    by_gate = client.get(url + "&colour=hook_pre").text
    assert '<option value="hook_pre" selected>' in by_gate and by_post != by_gate
    assert client.get(url + "&colour=nonsense").status_code == 422


def test_layer_page_is_sortable(client, m):
    html = client.get(f"/models/{m}/layers/1", params={"sort": "cos_in_out", "order": "desc", "limit": 20}).text
    rows = re.findall(rf'href="/models/{m}/neurons/1/(\d+)"', html)
    assert len(rows) == 20
    expected = [n["neuron"] for n in client.get(f"/api/models/{m}/layers/1?sort=cos_in_out&order=desc&limit=20").json()["neurons"]]
    assert [int(r) for r in rows] == expected
    assert 'aria-sort="descending"' in html


def test_static_assets_are_served_locally(client):
    html = client.get("/").text
    for src in re.findall(r'(?:src|href)="(/-/static/[^"]+)"', html):
        assert client.get(src).status_code == 200, src
    assert "htmx" in client.get("/-/static/vendor/htmx.min.js").text[:2000]
    assert "http://" not in html and "https://" not in html  # no CDN
