"""No input makes the server answer 500, and every error has the one shape (JSON) or an error page (HTML)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from gluscope.cli import UserError
from gluscope.server.app import create_app

pytestmark = pytest.mark.integration

WEIRD = ["-1", "0", "95", "96", "2", "99999999999999999999", "-99999999999999999999", "1e3", "0x10", "1.0", " 1",
         "abc", "", "%00", "٣", "１", "😀", "<script>", "'; DROP TABLE neurons; --", "NaN", "inf", "..", "a" * 300]


@pytest.fixture(scope="module")
def m(model_id):
    return model_id


def _templates(m: str) -> list[str]:
    return [
        "/api/models/{x}", "/api/models/{m}/neurons/{x}/0", "/api/models/{m}/neurons/0/{x}",
        "/api/models/{m}/neurons/{x}/{x}/examples?quadrant=pp&hook=act",
        "/api/models/{m}/neurons/0/0/examples?quadrant={x}&hook=act",
        "/api/models/{m}/neurons/0/0/examples?quadrant=np&hook={x}",
        "/api/models/{m}/texts/{x}", "/api/models/{m}/layers/{x}", "/api/models/{m}/layers/0?sort={x}",
        "/api/models/{m}/layers/0?offset={x}", "/api/models/{m}/layers/0?limit={x}", "/api/models/{m}/layers/0?order={x}",
        "/models/{m}/neurons/{x}/1", "/models/{m}/neurons/1/{x}.json", "/models/{m}/texts/0?position={x}",
        "/models/{m}/neurons/0/0/examples?quadrant=pp&hook=act&colour={x}", "/-/jump?model={m}&to={x}",
        "/api/models/{m}/neurons/0/0/examples?quadrant=pp&hook=act&kind={x}",
        "/api/models/{m}/neurons/0/0/examples?quadrant=pp&hook=act&kind=interval&interval={x}",
        "/api/models/{m}/neurons/{x}/{x}/histograms", "/models/{m}/neurons/0/0/histograms?hook={x}",
        "/api/models/{m}/layers/{x}/scatter", "/models/{m}/layers/{x}/scatter.png",
        "/models/{m}/layers/0/scatter/click?x={x}&y={x}", "/models/{m}?scatter={x}",
        "/models/{x}/random", "/models/{m}/{x}",
        "/api/models/{m}/neurons?layers={x}", "/api/models/{m}/neurons?min_freq_nn={x}",
        "/api/models/{m}/neurons?max_absmax_pp={x}&sort=absmax_pp", "/api/models/{m}/neurons?sort={x}",
        "/api/models/{m}/neurons?offset={x}&limit={x}", "/models/{m}/neurons?max_cos_in_out={x}",
        "/api/models/{m}/compare?neurons={x}", "/api/models/{m}/compare?neurons=0.1,{x}",
        "/api/models/{m}/compare?neurons={x},{x}", "/models/{m}/compare?neurons=0.1,1.1&quadrant={x}",
    ]


@pytest.mark.parametrize("value", WEIRD)
def test_no_input_gives_a_500(client, m, value):
    for template in _templates(m):
        url = template.format(m=m, x=quote(value, safe=""))
        r = client.get(url)
        assert r.status_code < 500, (url, r.status_code, r.text[:300])
        if r.status_code >= 400:
            if r.headers["content-type"].startswith("application/json"):
                err = r.json()["error"]
                assert set(err) == {"status", "parameter", "message", "valid"} and err["status"] == r.status_code
            else:
                assert r.headers["content-type"].startswith("text/html") and err_page(r.text)


def err_page(html: str) -> bool:
    return '<p class="error-message">' in html and "<script>alert" not in html


@pytest.mark.parametrize("url,status,text", [
    ("/models/nope", 404, "unknown model"),
    ("/models/{m}/neurons/7/0", 404, "layer 7 does not exist"),
    ("/models/{m}/neurons/0/x", 422, "neuron must be a whole number"),
    ("/models/{m}/neurons/0/0/examples?quadrant=zz&hook=act", 422, "unknown quadrant"),
    ("/models/{m}/texts/1000", 404, "text_id 1000 does not exist"),
    ("/no/such/page", 404, "no such page"),
])
def test_html_pages_get_an_error_page_with_the_same_status(client, m, url, status, text):
    r = client.get(url.format(m=m))
    assert r.status_code == status and r.headers["content-type"].startswith("text/html")
    assert text in r.text and err_page(r.text)
    as_json = client.get(url.format(m=m), headers={"Accept": "application/json"})
    assert as_json.status_code == status and as_json.json()["error"]["status"] == status


def test_a_malicious_parameter_is_escaped_in_the_error_page(client):
    r = client.get("/models/" + quote("<script>alert(1)", safe=""))
    assert r.status_code == 404 and "&lt;script&gt;" in r.text and "<script>alert" not in r.text


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "TRACE"])
@pytest.mark.parametrize("path", ["/api/models/{m}", "/models/{m}/neurons/1/3", "/api/models"])
def test_method_not_allowed_has_the_error_shape_and_says_what_is(client, m, method, path):
    """RFC 9110: a 405 names the methods the path allows (schemathesis checks it for every route)."""
    r = client.request(method, path.format(m=m))
    assert r.status_code == 405 and r.headers["allow"] == "GET", r.headers
    if path.startswith("/api/"):
        assert r.json()["error"]["status"] == 405
    else:  # a page's URL answers with the error page
        assert "405" in r.text and r.headers["content-type"].startswith("text/html")


def test_a_file_that_is_not_a_database_is_refused_clearly(tmp_path):
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(UserError, match="junk.duckdb"):
        create_app([junk])
    import duckdb

    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    with pytest.raises(UserError, match="not a GLUScope database"):
        create_app([empty])
