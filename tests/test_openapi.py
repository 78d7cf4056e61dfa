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
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks

from gluscope.schema import HOOKS, QUADRANT_SLUGS
from gluscope.server.app import ROUTES

pytestmark = pytest.mark.integration

load_all_checks()
ALL_CHECKS = [CHECKS.get_one(name) for name in CHECKS.get_all_names()]
API_PATHS = [route.paths[0] for route in ROUTES if route.body is not None]
# Where a parameter's valid values depend on another's, which OpenAPI cannot say, a request valid by the schema
# can be refused (422) with reason: the token search's kind is a weight kind for side=weights and an example
# kind for side=examples, and a range of layers must run forwards (the search, the filter); a filter's minimum
# above its maximum; a neuron given twice in a comparison. Every other check still runs there, except that the
# comparison's pattern only guides generation to real neurons: its parser also takes the jump box's other
# separators and spaces.
CROSS_PARAMETER = {"/api/models/{model}/search/tokens": ("positive_data_acceptance",),
                   "/api/models/{model}/neurons": ("positive_data_acceptance",),
                   "/api/models/{model}/compare": ("positive_data_acceptance", "negative_data_rejection")}


@pytest.fixture(scope="module")
def api_schema(live_server):
    # Over HTTP, not ASGI: schemathesis ends an ASGI app's lifespan after each
    # test, and the end of the lifespan closes the app's reader processes.
    return schemathesis.openapi.from_url(f"{live_server}/openapi.json")


# Random digits rarely name real neurons of the 2 x 96 test model: half of the generated comparisons do.
REAL_VALUES = {"/api/models/{model}/compare": [{"neurons": "0.1,1.2"}, {"neurons": "1.95,0.0,1.3"}]}


def _with_real_values(drawn):
    case, real, values = drawn
    if real:
        case.query = {**(case.query or {}), **values}
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("path", API_PATHS)
def test_every_response_conforms_to_the_schema(api_schema, path, mode):
    operation = api_schema[path]["GET"]
    if mode == GenerationMode.NEGATIVE and "{" not in path:
        pytest.skip("no parameter to make invalid")
    statuses = []

    # A bounded number of examples per endpoint keeps this to seconds; the
    # error tests (test_server_errors.py) cover strange inputs more densely.
    checks = [c for c in ALL_CHECKS if c.__name__ not in CROSS_PARAMETER.get(path, ())]
    strategy = operation.as_strategy(generation_mode=mode)
    if mode == GenerationMode.POSITIVE and path in REAL_VALUES:
        strategy = st.tuples(strategy, st.booleans(), st.sampled_from(REAL_VALUES[path])).map(_with_real_values)

    @given(case=strategy)
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def conforms(case):
        statuses.append(case.call_and_validate(checks=checks).status_code)

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
    searches = [{"token_id": t, "side": side, "kind": kind} for t in (3, 100)
                for side, kind in (("weights", "out+"), ("weights", "in-"), ("examples", None))] + [{}]
    params_of = {
        "examples": lists, "token_search": searches, "suggest": [{"token": "th"}, {"token": "e"}],
        "compare": [{"neurons": "0.0,1.41", **lists[i]} for i in (0, 7, 15)] + [{"neurons": "1.2,0.3,1.4,0.5"}],
        "neuron_filter": [{}, {"layers": "1", "min_freq_nn": 0.1, "max_cos_in_out": 0.0, "sort": "absmax_nn"},
                          {"sort": "absmax_pn", "order": "asc", "offset": 150, "limit": 100}, {"offset": 192}],
    }
    for url in urls:
        for params in params_of.get(route.view, [{}]):
            r = client.get(url, params=params)
            assert r.status_code == 200, url
            route.body.model_validate(r.json())


def test_every_api_endpoint_documents_its_body(client):
    paths = client.get("/openapi.json").json()["paths"]
    api = [p for p in paths if p.startswith("/api/")]
    assert len(api) == 14
    for path in api:
        ok = paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in ok, path
        for status in ("404", "422"):
            assert paths[path]["get"]["responses"][status]["content"]["application/json"]["schema"] == \
                {"$ref": "#/components/schemas/Error"}, (path, status)
