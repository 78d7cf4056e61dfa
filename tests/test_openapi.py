"""What the API sends conforms to what /openapi.json says it sends, checked by schemathesis with all its checks.

Schemathesis generates requests from the schema (valid and invalid values of
every parameter) against the real app over the recorded database (uvicorn), and
checks each response: no 5xx, a documented status, content type and headers,
and a body that validates against the declared response model.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks

from gluscope.schema import HOOKS, QUADRANT_SLUGS
from gluscope.server.app import ROUTES

load_all_checks()
ALL_CHECKS = [CHECKS.get_one(name) for name in CHECKS.get_all_names()]
API_PATHS = [route.paths[0] for route in ROUTES if route.body is not None]


@pytest.fixture(scope="module")
def api_schema(live_server):
    # Over HTTP, not ASGI: schemathesis ends an ASGI app's lifespan after each
    # test, and the end of the lifespan closes the app's reader processes.
    return schemathesis.openapi.from_url(f"{live_server}/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("path", API_PATHS)
def test_every_response_conforms_to_the_schema(api_schema, path, mode):
    operation = api_schema[path]["GET"]
    if mode == GenerationMode.NEGATIVE and "{" not in path:
        pytest.skip("no parameter to make invalid")
    statuses = []

    # A bounded number of examples per endpoint keeps this to seconds; the
    # error tests (test_server_errors.py) cover strange inputs more densely.
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def conforms(case):
        statuses.append(case.call_and_validate(checks=ALL_CHECKS).status_code)

    conforms()
    if mode == GenerationMode.POSITIVE:
        # The schema's choices (models, quadrants, values) and minimums lead it to real neurons: some bodies
        # were checked, not only errors.
        assert 200 in statuses, statuses
    else:  # invalid values were sent and refused (an unknown extra query parameter is ignored, and fine)
        assert any(400 <= s < 500 for s in statuses), statuses


@pytest.mark.parametrize("route", [r for r in ROUTES if r.body is not None], ids=lambda r: r.view)
def test_bodies_validate_against_their_models(client, model_id, route):
    """Many real bodies of each endpoint, against its pydantic model with no unknown field allowed."""
    lists = [{"quadrant": q, "hook": h, "kind": k} for q in QUADRANT_SLUGS for h in HOOKS
             for k in ("top", "random", "interval")]
    urls = [route.paths[0].format(model=model_id, layer=layer, neuron=neuron, text_id=neuron)
            for layer in (0, 1) for neuron in (0, 41)]
    for url in urls:
        for params in lists if route.view == "examples" else [{}]:
            r = client.get(url, params=params)
            assert r.status_code == 200, url
            route.body.model_validate(r.json())


def test_every_api_endpoint_documents_its_body(client):
    paths = client.get("/openapi.json").json()["paths"]
    api = [p for p in paths if p.startswith("/api/")]
    assert len(api) == 9
    for path in api:
        ok = paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in ok, path
        for status in ("404", "422"):
            assert paths[path]["get"]["responses"][status]["content"]["application/json"]["schema"] == \
                {"$ref": "#/components/schemas/Error"}, (path, status)
