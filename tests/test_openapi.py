"""What the API sends conforms to what /openapi.json says it sends, checked by schemathesis with all its checks.

Schemathesis generates requests from the schema (valid and invalid values of
every parameter) against the real app over the recorded database (uvicorn), and
checks each response: no 5xx, a documented status, content type and headers,
and a body that validates against the declared response model.
"""

from __future__ import annotations

import jsonschema_rs  # schemathesis 4's own validator (a dependency of it): the schema read as schemathesis reads it
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks

from gluscope.recorder import rules
from gluscope.schema import HOOKS, QUADRANT_SLUGS
from gluscope.server.app import ROUTES
from gluscope.server.validate import INTERVAL_MAX

pytestmark = pytest.mark.integration

load_all_checks()
ALL_CHECKS = [CHECKS.get_one(name) for name in CHECKS.get_all_names()]
API_PATHS = [route.paths[0] for route in ROUTES if route.body is not None]
# Every check runs on every endpoint: a request the schema admits is never refused (422), and one it does not
# admit is. OpenAPI cannot tie one parameter to another, so the API has no such rule (SCHEMA_VALID below).


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
    strategy = operation.as_strategy(generation_mode=mode)
    if mode == GenerationMode.POSITIVE and path in REAL_VALUES:
        strategy = st.tuples(strategy, st.booleans(), st.sampled_from(REAL_VALUES[path])).map(_with_real_values)

    @given(case=strategy)
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
    assert len(API_PATHS) == 14 and set(API_PATHS) <= set(api)
    for path in api:
        ok = paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in ok, path
        for status in ("404", "422"):
            assert paths[path]["get"]["responses"][status]["content"]["application/json"]["schema"] == \
                {"$ref": "#/components/schemas/Error"}, (path, status)


EXAMPLES = "/api/models/{model}/neurons/{layer}/{neuron}/examples"
SEARCH, FILTER = "/api/models/{model}/search/tokens", "/api/models/{model}/neurons"
COMPARE = "/api/models/{model}/compare"
# Requests on each side of the schema's line, where the API's checks are subtle: those that pair parameters,
# patterns, ranges. Each row is (path, query, admitted by the schema). The fuzzing above draws such cases only
# by chance; these are the ones it once found refused though admitted.
SCHEMA_VALID = [
    (COMPARE, {"neurons": "0.0,0.0"}, True),          # a neuron twice: shown once
    (COMPARE, {"neurons": "1.2, 0.1,1.2,"}, True),    # spaces, and the trailing comma a form leaves
    (COMPARE, {"neurons": "0.1"}, False),
    (COMPARE, {"neurons": "0.1,,1.2"}, False),
    (COMPARE, {"neurons": "0.1,0.2,0.3,0.4,0.5"}, False),
    (COMPARE, {"neurons": "0.1,\u0661.2"}, False),     # a digit, to Python's \d, but not to the schema's [0-9]
    (FILTER, {"layers": "1-0"}, True),                # backwards: the same layers
    (FILTER, {"layers": " 0 – 1 "}, True),
    (FILTER, {"layers": "   "}, True),                # a blank form field: every layer
    (FILTER, {"layers": "-script.pyw"}, False),
    (FILTER, {"layers": "1\n"}, False),
    (FILTER, {"layers": "\u0661"}, False),
    (FILTER, {"min_freq_nn": 0.5, "max_freq_nn": 0.2}, True),  # nothing between them: no neuron
    (SEARCH, {"token_id": 3, "layers": "1-0"}, True),
    (SEARCH, {"token_id": 3, "layers": "0-1-1"}, False),
    (SEARCH, {"token_id": 3, "token": "a"}, True),    # both: both searched
    (SEARCH, {"token_id": 3, "kind": "random"}, True),  # the other side's kind: this side's default
    (SEARCH, {"token_id": 3, "side": "examples", "kind": "in-"}, True),
    (SEARCH, {"token_id": 3, "side": "examples", "kind": "interval", "role": "next"}, True),
    (EXAMPLES, {"quadrant": "pp", "hook": "act", "interval": 0}, True),  # kind=top: interval ignored
    (EXAMPLES, {"quadrant": "pp", "hook": "act", "kind": "random", "interval": INTERVAL_MAX}, True),
    (EXAMPLES, {"quadrant": "pp", "hook": "act", "interval": INTERVAL_MAX + 1}, False),
    (EXAMPLES, {"quadrant": "pp", "hook": "act", "kind": "interval", "interval": -1}, False),
    (EXAMPLES, {"quadrant": "pp", "hook": "act", "colour": ""}, False),
]


def _admits(operation, query: dict) -> bool:
    """Whether each query value validates against its parameter's schema in /openapi.json."""
    schemas = {p["name"]: p["schema"] for p in operation.definition.raw.get("parameters", []) if p["in"] == "query"}
    return all(jsonschema_rs.is_valid(schemas[name], value) for name, value in query.items())


@pytest.mark.parametrize("path,query,admitted", SCHEMA_VALID,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{q}" for p, q, _ in SCHEMA_VALID])
def test_the_api_takes_exactly_what_the_schema_admits(api_schema, model_id, path, query, admitted):
    operation = api_schema[path]["GET"]
    assert _admits(operation, query) == admitted
    case = operation.Case(path_parameters={"model": model_id, "layer": 0, "neuron": 0}, query=query)
    response = case.call_and_validate(checks=ALL_CHECKS)
    assert (response.status_code == 200) == admitted, response.text[:300]
    if not admitted:
        assert response.status_code == 422 and response.json()["error"]["parameter"] in query, response.text[:300]


def test_the_schema_knows_every_interval_a_file_can_hold():
    """interval's maximum is static (schema.sql: 0..3): it must follow the recorder's number of intervals."""
    assert INTERVAL_MAX == rules.N_INTERVALS - 1


# --- the probe's endpoints, with a probe holding the model (conftest.probe_url) --------------------------

PROBE_PATHS = [f"/api/models/{{model}}/probe/{answer}" for answer in ("activations", "fire", "ablate")]
# Random digits rarely name real neurons of the 2 x 96 test model: half of the generated requests do.
PROBE_REAL = [{"neurons": "0.1,1.2"}, {"neurons": "1.95"}]


@pytest.fixture(scope="module")
def probe_schema(live_probe_server):
    return schemathesis.openapi.from_url(f"{live_probe_server}/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", PROBE_PATHS, ids=lambda p: p.rsplit("/", 1)[-1])
def test_every_probe_response_conforms_to_the_schema(probe_schema, path, method, mode):
    operation = probe_schema[path][method]
    statuses = []
    strategy = operation.as_strategy(generation_mode=mode)
    if mode == GenerationMode.POSITIVE and not path.endswith("/fire"):
        def real(drawn):
            case, use, values = drawn
            if use:
                if method == "GET":
                    case.query = {**(case.query or {}), **values}
                else:
                    case.body = {**(case.body or {}), **values}
            return case
        strategy = st.tuples(strategy, st.booleans(), st.sampled_from(PROBE_REAL)).map(real)

    @given(case=strategy)
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def conforms(case):
        statuses.append(case.call_and_validate(checks=ALL_CHECKS).status_code)

    conforms()
    if mode == GenerationMode.POSITIVE:
        assert 200 in statuses, statuses
    else:
        assert any(400 <= s < 500 for s in statuses), statuses
