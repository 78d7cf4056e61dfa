"""The probe through the web server, as a browser and an API client use it: pages, JSON twins, errors.

The server and the probe are the real apps; the probe runs in a thread on a
port (conftest.probe_url), so the server reaches it over HTTP as it does in
production.
"""

from __future__ import annotations

import re

import httpx
import pytest
from starlette.testclient import TestClient

from gluscope.probe.answers import Limits
from gluscope.probe.app import create_probe_app
from gluscope.probe.batcher import Batcher
from gluscope.probe.loaded import load_for
from gluscope.probe_protocol import START_HINT, Ablation, Activations, Firing
from gluscope.server.app import create_app
from gluscope.server.db import open_databases

from . import recordings
from .processes import free_port, served_in_thread

pytestmark = pytest.mark.integration

TEXT = "The cat sat on the mat, and then the cat sat again."
HX = {"HX-Request": "true"}
HOSTILE = [recordings.PLANTED_SCRIPT, '<img src=x onerror="alert(2)">', '"><svg onload=alert(3)>']


@pytest.fixture(scope="module")
def mid(probe_client) -> str:
    return probe_client.get("/api/models").json()["models"][0]["id"]


def _error(r: httpx.Response, status: int, parameter: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"status", "parameter", "message", "valid"}
    assert body["error"]["status"] == status
    if parameter is not None:
        assert body["error"]["parameter"] == parameter, body
    return body["error"]


ANSWERS = [("activations", {"text": TEXT, "neurons": "1.3,0.5"}, Activations),
           ("fire", {"text": TEXT, "position": 4, "top": 3}, Firing),
           ("ablate", {"text": TEXT, "neurons": "1.3", "quadrant": "pp", "target": " the"}, Ablation)]


@pytest.mark.parametrize("answer,params,model", ANSWERS, ids=[a[0] for a in ANSWERS])
def test_get_post_and_the_json_twin_agree_with_the_probe(probe_client, probe_url, mid, answer, params, model):
    api = f"/api/models/{mid}/probe/{answer}"
    got = probe_client.get(api, params=params)
    assert got.status_code == 200, got.text
    model.model_validate(got.json())
    assert probe_client.post(api, json=params).json() == got.json()
    assert probe_client.get(f"/models/{mid}/probe/{answer}.json", params=params).json() == got.json()
    assert httpx.post(f"{probe_url}/models/{mid}/{answer}", json=params).json() == got.json()


@pytest.mark.parametrize("answer,params,model", ANSWERS, ids=[a[0] for a in ANSWERS])
def test_the_page_shows_the_form_the_answer_and_a_link_to_it(probe_client, mid, answer, params, model):
    page = probe_client.get(f"/models/{mid}/probe/{answer}", params=params)
    assert page.status_code == 200 and "<html" in page.text
    assert f'action="/models/{mid}/probe/{answer}"' in page.text
    link = re.search(r'<p class="probe-link muted"><a href="([^"]+)"', page.text).group(1).replace("&amp;", "&")
    assert probe_client.get(link).text == page.text  # the link is the answer
    fragment = probe_client.get(f"/models/{mid}/probe/{answer}", params=params, headers=HX)
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert fragment.text.strip().startswith('<div class="probe probe-') and fragment.text.strip() in page.text


def test_the_activations_page_colours_tokens_as_the_examples_do(probe_client, mid):
    body = probe_client.get(f"/api/models/{mid}/probe/activations", params={"text": TEXT, "neurons": "1.3"}).json()
    page = probe_client.get(f"/models/{mid}/probe/activations", params={"text": TEXT, "neurons": "1.3"}).text
    (n,) = body["neurons"]
    spans = re.findall(r'<span class="t[^"]*" tabindex="0" title="position (\d+) · ([^&]*)&#10;hook_post ([^&]*)&#10;',
                       page)
    assert [int(p) for p, _, _ in spans] == list(range(len(body["tokens"])))
    assert [q for _, q, _ in spans][1:] == [q or "no quadrant" for q in n["quadrants"][1:]]
    # Each token on its own quadrant's recorded scale, as that quadrant's examples are coloured.
    styles = re.findall(r'title="position (\d+) [^"]*"( style="background:rgba\([0-9,]+,([0-9.]+)\)")?>', page)
    for (position, _, alpha), rel in zip(styles, n["relative"]):
        want = 0.0 if rel is None else min(rel, 1.0) * 0.85
        assert float(alpha or 0) == pytest.approx(want if want >= 0.005 else 0.0, abs=6e-4), position


def test_the_neuron_model_and_compare_pages_hold_the_probe_sections(probe_client, client, mid):
    for c in (probe_client, client):  # with and without a probe: the pages work
        assert 'hx-get="/models/%s/probe/activations?neurons=1.3"' % mid in c.get(f"/models/{mid}/neurons/1/3").text
        assert f'hx-get="/models/{mid}/probe/fire"' in c.get(f"/models/{mid}").text
        assert "/probe/activations?neurons=1.3%2C0.5" in c.get(f"/models/{mid}/compare?neurons=1.3,0.5").text
    lazy = probe_client.get(f"/models/{mid}/probe/ablate?neurons=1.3", headers=HX)
    assert lazy.status_code == 200 and 'name="neurons" value="1.3"' in lazy.text and "No probe" not in lazy.text


def test_without_a_probe_pages_say_how_to_start_one_and_the_api_answers_503(client, mid):
    fragment = client.get(f"/models/{mid}/probe/activations?neurons=1.3", headers=HX)
    assert fragment.status_code == 200 and START_HINT.split("`")[1] in fragment.text
    err = _error(client.get(f"/api/models/{mid}/probe/activations", params={"text": TEXT, "neurons": "1.3"}), 503)
    assert "gluscope probe" in err["message"]
    page = client.get(f"/models/{mid}/probe/fire", params={"text": TEXT})
    assert page.status_code == 503 and "No probe is running" in page.text


def test_a_probe_that_is_down_or_holds_another_model_is_a_503(recorded_db, tmp_path):
    other = recordings.record(recordings.model("gemma"), recordings.corpus("standard"), "--max-length", "24")
    with TestClient(create_app([recorded_db], probe=f"http://127.0.0.1:{free_port()}"),
                    raise_server_exceptions=False) as down:
        mid = down.get("/api/models").json()["models"][0]["id"]
        err = _error(down.get(f"/api/models/{mid}/probe/activations", params={"text": TEXT, "neurons": "1.3"}), 503)
        assert "not answering" in err["message"]
        assert down.get(f"/models/{mid}/neurons/1/3").status_code == 200
        shown = down.get(f"/models/{mid}/probe/activations", params={"text": TEXT, "neurons": "1.3"}, headers=HX)
        assert shown.status_code == 503 and "not answering" in shown.text
    (db,) = open_databases([other]).values()
    only_gemma = {db.id: load_for(db, "cpu")}
    with served_in_thread(create_probe_app(only_gemma, Limits(), Batcher())) as url, \
            TestClient(create_app([recorded_db, other], probe=url), raise_server_exceptions=False) as c:
        ids = [m["id"] for m in c.get("/api/models").json()["models"]]
        llama = next(i for i in ids if i != db.id)
        err = _error(c.get(f"/api/models/{llama}/probe/activations", params={"text": TEXT, "neurons": "1.3"}), 503)
        assert "does not hold" in err["message"]
        assert c.get(f"/api/models/{db.id}/probe/activations", params={"text": TEXT, "neurons": "1.3"}).status_code \
            == 200


def test_a_full_queue_is_a_503_with_retry_after(recorded_db):
    models = {i: load_for(d, "cpu") for i, d in open_databases([recorded_db]).items()}
    with served_in_thread(create_probe_app(models, Limits(), Batcher(queue_size=0))) as url, \
            TestClient(create_app([recorded_db], probe=url), raise_server_exceptions=False) as c:
        mid = next(iter(models))
        r = c.get(f"/api/models/{mid}/probe/activations", params={"text": TEXT, "neurons": "1.3"})
        err = _error(r, 503)
        assert "busy" in err["message"] and int(r.headers["Retry-After"]) >= 1


BAD = [
    ("activations", {"text": "", "neurons": "1.3"}, 422, "text"),
    ("activations", {"text": "cat " * 600, "neurons": "1.3"}, 422, "text"),
    ("activations", {"text": TEXT, "neurons": "9.3"}, 404, "layer"),
    ("activations", {"text": TEXT, "neurons": "1.99999"}, 404, "neuron"),
    ("activations", {"text": TEXT, "neurons": ",".join(["1.3"] * 10_000)}, 422, "neurons"),
    ("activations", {"text": TEXT}, 422, "neurons"),
    ("ablate", {"text": TEXT, "neurons": "1.3", "quadrant": "gate+_in0"}, 422, "quadrant"),
    ("ablate", {"text": TEXT, "neurons": "1.3", "mode": "scale", "factor": "nan"}, 422, "factor"),
    ("ablate", {"text": TEXT, "neurons": "1.3", "mode": "scale", "factor": "inf"}, 422, "factor"),
    ("ablate", {"text": TEXT, "neurons": "1.3", "mode": "clamp", "value": "-inf"}, 422, "value"),
    ("ablate", {"text": TEXT, "neurons": "1.3", "position": "x"}, 422, "position"),
    ("fire", {"text": TEXT, "layers": "a-b"}, 422, "layers"),
    ("fire", {"text": TEXT, "top": 10_000}, 422, "top"),
]


@pytest.mark.parametrize("answer,params,status,parameter", BAD,
                         ids=[f"{a}-{p}-{i}" for i, (a, _, _, p) in enumerate(BAD)])
def test_bad_input_gets_the_error_shape(probe_client, mid, answer, params, status, parameter):
    api = f"/api/models/{mid}/probe/{answer}"
    err = _error(probe_client.get(api, params=params) if len(str(params)) < 4000 else
                 probe_client.post(api, json=params), status, parameter)
    if params.get("text", "").startswith("cat cat"):
        assert "512" in err["message"]
    if parameter == "neurons" and len(params.get("neurons", "")) > 1000:
        assert "64" in err["message"]
    # The page shows the same error where the answer would be, with its status (a page without a text or
    # neurons is the empty form, asking for them).
    if len(str(params)) < 4000 and params.get("text") and (answer == "fire" or "neurons" in params):
        page = probe_client.get(f"/models/{mid}/probe/{answer}", params=params, headers=HX)
        assert page.status_code == status and "error-message" in page.text and "<html" not in page.text


def test_unknown_model_and_method(probe_client):
    _error(probe_client.get("/api/models/nope/probe/fire", params={"text": TEXT}), 404, "model")
    r = probe_client.delete("/api/models/nope/probe/fire")
    assert r.status_code == 405 and "GET" in r.headers["Allow"]


@pytest.mark.parametrize("answer", ["activations", "fire", "ablate"])
def test_hostile_texts_are_escaped_on_every_probe_page(probe_client, mid, answer):
    for text in HOSTILE:
        params = {"text": text, "neurons": "1.3"} if answer != "fire" else {"text": text}
        for headers in ({}, HX):
            page = probe_client.get(f"/models/{mid}/probe/{answer}", params=params, headers=headers)
            assert page.status_code == 200, page.text
            assert "<script>alert" not in page.text and "<img src=x" not in page.text and "<svg onload" not in page.text


def test_an_edit_that_overflows_the_model_is_answered_with_nulls(probe_client, mid):
    params = {"text": TEXT, "neurons": "0.1,1.2", "mode": "scale", "factor": 3e259}
    r = probe_client.get(f"/api/models/{mid}/probe/ablate", params=params)
    assert r.status_code == 200, r.text
    body = Ablation.model_validate(r.json())
    assert body.positions[0].kl is None
    assert probe_client.get(f"/models/{mid}/probe/ablate", params=params).status_code == 200


def test_the_server_waits_as_long_as_the_probe_may_take(recorded_db):
    models = {i: load_for(d, "cpu") for i, d in open_databases([recorded_db]).items()}
    with served_in_thread(create_probe_app(models, Limits(), Batcher(timeout_s=90.0))) as url, \
            TestClient(create_app([recorded_db], probe=url), raise_server_exceptions=False) as c:
        mid = next(iter(models))
        assert c.get(f"/api/models/{mid}/probe/activations", params={"text": TEXT, "neurons": "1.3"}).status_code == 200
        assert c.app.state.probe.timeout_s == 95.0
