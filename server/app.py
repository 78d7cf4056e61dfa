"""The GLUScope web app: `create_app(paths)` and the one route table.

Each route names a view (views.py) and the model of its JSON body
(responses.py). `endpoint` makes the FastAPI endpoint from the view's own
parameters: it checks the model, picks the kind of response (render.py),
runs the view here or in a reader process (readers.py), and sends the bytes.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, get_type_hints

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import RedirectResponse, Response

import gluscope
from gluscope.server import responses
from gluscope.server.db import open_databases
from gluscope.server import probe_views
from gluscope.server.errors import ParameterError
from gluscope.server.probe_client import ProbeClient
from gluscope.server.readers import Readers, freeze_startup_objects
from gluscope.server.render import STATIC_DIR, JSONResponse, error_page, make_response, response_kind, wants_json
from gluscope.server.validate import get_model
from gluscope.server.views import VIEWS, Image, Neuron, Redirect, neuron_parameter, run_view

log = logging.getLogger("gluscope.server")

MODEL_DESCRIPTION = "model id, as listed by /api/models"


def endpoint(name: str, model_in_path: bool, models: list[str], moe: bool = False) -> Callable[..., Any]:
    """The FastAPI endpoint of view `name`: the view's keyword parameters, plus `model` (one of `models`)
    for a view of one model. moe: a file served has experts, so a `neuron` is N or E.I (views.neuron_parameter)."""
    v = VIEWS[name]

    async def answer(request: Request, **params: Any) -> Response:
        registry = request.app.state.registry
        model = params.pop("model", None)
        if v.per_model:
            get_model(registry, model)  # an unknown model costs no reader's time
        kind = response_kind(request, v.fragment is not None)
        if v.reads_file:
            result = await request.app.state.readers.run(run_view, name, model, kind, params)
        else:
            result = run_view(registry, name, model, kind, params)
        if isinstance(result, Redirect):
            return RedirectResponse(result.url, status_code=result.status, headers=result.headers)
        if isinstance(result, Image):
            return Response(result.body, media_type=result.media_type, headers={"Cache-Control": "max-age=3600"})
        return make_response(request, kind, result)

    hints = get_type_hints(v.fn, include_extras=True)  # keep Annotated validators (views.with_bounds)
    own = list(inspect.signature(v.fn).parameters.values())[1:]  # after the Database or the registry
    signature = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)]
    if v.per_model:
        where = Path if model_in_path else Query
        signature.append(inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                           default=where(description=MODEL_DESCRIPTION,
                                                         json_schema_extra={"enum": models})))
    for p in own:
        annotation, default = hints[p.name], p.default
        if p.name == "neuron" and p.default is Neuron:
            annotation, default = neuron_parameter(moe)
        signature.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default))
    answer.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]
    answer.__name__ = name
    answer.__doc__ = v.fn.__doc__
    return answer


@dataclass
class Route:
    paths: list[str]                       # the first one is in the OpenAPI schema if `body` is set
    view: str                              # a name in views.VIEWS
    body: type[BaseModel] | None = None    # the JSON body's model: an API endpoint
    # The body's model of an endpoint that only a file with experts answers with 200: the OpenAPI schema of a
    # server with such a file documents it; elsewhere it answers 404s only, and its schema leaves it out.
    moe_body: type[BaseModel] | None = None

    def documented(self, moe: bool) -> type[BaseModel] | None:
        return self.body or (self.moe_body if moe else None)


# A `.json` twin is listed before its page: `{neuron}` would also match "7.json".
ROUTES = [
    Route(["/api/models", "/.json", "/"], "index", responses.Models),
    Route(["/api/models/{model}", "/models/{model}.json", "/models/{model}"], "model", responses.ModelDetail),
    Route(["/api/models/{model}/layers/{layer}", "/models/{model}/layers/{layer}.json",
           "/models/{model}/layers/{layer}"], "layer", responses.LayerPage),
    Route(["/api/models/{model}/layers/{layer}/experts/{expert}", "/models/{model}/layers/{layer}/experts/{expert}.json",
           "/models/{model}/layers/{layer}/experts/{expert}"], "expert", moe_body=responses.ExpertPage),
    Route(["/api/models/{model}/layers/{layer}/scatter", "/models/{model}/layers/{layer}/scatter.json",
           "/models/{model}/layers/{layer}/scatter"], "scatter", responses.LayerScatter),
    Route(["/models/{model}/layers/{layer}/scatter.png"], "scatter_png"),
    Route(["/models/{model}/layers/{layer}/scatter/click"], "scatter_click"),
    Route(["/api/models/{model}/neurons/{layer}/{neuron}/examples",
           "/models/{model}/neurons/{layer}/{neuron}/examples.json",
           "/models/{model}/neurons/{layer}/{neuron}/examples"], "examples", responses.ExampleListBody),
    Route(["/api/models/{model}/neurons/{layer}/{neuron}/histograms",
           "/models/{model}/neurons/{layer}/{neuron}/histograms.json",
           "/models/{model}/neurons/{layer}/{neuron}/histograms"], "histograms", responses.Histograms),
    Route(["/api/models/{model}/neurons/{layer}/{neuron}/tokens",
           "/models/{model}/neurons/{layer}/{neuron}/tokens.json",
           "/models/{model}/neurons/{layer}/{neuron}/tokens"], "tokens", responses.WeightTokens),
    Route(["/api/models/{model}/neurons/{layer}/{neuron}/related",
           "/models/{model}/neurons/{layer}/{neuron}/related.json",
           "/models/{model}/neurons/{layer}/{neuron}/related"], "related", responses.Related),
    Route(["/api/models/{model}/search/tokens", "/models/{model}/search.json", "/models/{model}/search"],
          "token_search", responses.TokenSearch),
    Route(["/api/models/{model}/search/suggest", "/models/{model}/search/suggest.json",
           "/models/{model}/search/suggest"], "suggest", responses.Suggestions),
    Route(["/api/models/{model}/neurons/{layer}/{neuron}", "/models/{model}/neurons/{layer}/{neuron}.json",
           "/models/{model}/neurons/{layer}/{neuron}"], "neuron", responses.NeuronSummary),
    Route(["/api/models/{model}/neurons", "/models/{model}/neurons.json", "/models/{model}/neurons"],
          "neuron_filter", responses.FilterPage),
    Route(["/api/models/{model}/compare", "/models/{model}/compare.json", "/models/{model}/compare"],
          "compare", responses.Comparison),
    Route(["/api/models/{model}/texts/{text_id}", "/models/{model}/texts/{text_id}.json",
           "/models/{model}/texts/{text_id}"], "text", responses.Text),
    Route(["/models/{model}/random"], "random"),
    Route(["/-/jump"], "jump"),
]

# Every error a request can cause has the one shape (errors.py).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": responses.Error, "description": "an unknown model, layer, expert, neuron or text (in a layer of "
                                                   "experts, also a bare neuron index: its address is expert.index)"},
    422: {"model": responses.Error, "description": "a malformed or unknown parameter"},
    503: {"model": responses.Error, "description": "a reader process stopped while answering; try again"},
}


PROBE_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": responses.Error, "description": "a POST body that is not JSON"},
    **ERROR_RESPONSES,
    503: {"model": responses.Error, "description": "no probe is configured, it is down, it does not hold this "
                                                   "model, or its queue is full (then with Retry-After)"},
    504: {"model": responses.Error, "description": "the probe did not answer within its per-request limit"},
}


def _error_response(request: Request, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    response = JSONResponse(body, status_code=body["error"]["status"]) if wants_json(request) \
        else error_page(request, body)
    response.headers.update(headers or {})
    return response


async def _parameter_error(request: Request, exc: ParameterError) -> Response:
    retry_after = getattr(exc, "retry_after", None)  # a probe's full queue says when to come back
    return _error_response(request, exc.body(), {"Retry-After": str(retry_after)} if retry_after else None)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("path", "query", "body")]
    parameter = loc[0] if loc else None
    kind = first.get("type", "")
    if kind == "missing":
        message, valid = f"{parameter} is required", None
    elif kind.startswith("int"):
        shown = str(first.get("input", ""))[:40]
        message, valid = f"{parameter} must be a whole number, not {shown!r}", "an integer"
    else:
        message, valid = f"{parameter}: {first.get('msg', 'invalid value')}", None
    return _error_response(request, ParameterError(422, parameter, message, valid).body())


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    message = "no such page" if exc.status_code == 404 else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # A 405 must say which methods the path allows (Allow, RFC 9110). Starlette names those of the first
        # route that matched the path; a path served by two routes (a probe answer's GET and POST) has both.
        allowed = {m for route in request.app.routes if isinstance(route, APIRoute)
                   and route.path_regex.match(request.url.path) for m in route.methods}
        headers["Allow"] = ", ".join(sorted(allowed))
    return _error_response(request, ParameterError(exc.status_code, None, message, None).body(), headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path)
    return _error_response(request, ParameterError(500, None, "internal error (see the server log)", None).body())


def add_probe_routes(app: FastAPI, models: list[str]) -> None:
    """Each probe answer: the API's GET and POST (in the schema), the page and its .json twin."""
    for answer in probe_views.RESPONSES:
        made = probe_views.make_endpoints(answer, models)
        api = f"/api/models/{{model}}/probe/{answer}"
        documented = {"response_model": probe_views.RESPONSES[answer], "responses": PROBE_ERROR_RESPONSES,
                      "tags": ["probe"], "response_class": JSONResponse}
        app.add_api_route(api, made["get"], methods=["GET"], name=f"probe_{answer}_api", **documented)
        app.add_api_route(api, made["post"], methods=["POST"], name=f"probe_{answer}_post", **documented)
        for i, path in enumerate((f"/models/{{model}}/probe/{answer}.json", f"/models/{{model}}/probe/{answer}")):
            app.add_api_route(path, made["page"], methods=["GET"], include_in_schema=False, response_class=Response,
                              name=f"probe_{answer}" if i else f"probe_{answer}_json")


def create_app(paths, readers: int = 1, probe: str | None = None) -> FastAPI:
    """The app serving these recorded databases (opened read-only, once here and once in each reader).

    probe: the URL of a `gluscope probe` holding these models, for the probe pages (probe_client.py).
    readers: processes that answer the views that query the files (readers.py),
    one request at a time each. They are started with multiprocessing's
    "spawn", so a script that calls this needs the usual
    `if __name__ == "__main__":` guard.
    """
    registry = open_databases(paths)
    pool = Readers(paths, readers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.close()

    app = FastAPI(title="GLUScope", version=gluscope.__version__, lifespan=lifespan,
                  description="Per-neuron sign-quadrant statistics of gated-MLP language models. "
                              "Layers and neurons are zero-based; quadrants are given by slug "
                              "(pp, pn, np, nn) in URLs and by label (gate+_in+ ...) in bodies.")
    app.state.registry = registry
    app.state.readers = pool
    app.state.probe = ProbeClient(probe)
    moe = any(db.experts.any for db in registry.values())
    for route in ROUTES:
        answer = endpoint(route.view, "{model}" in route.paths[0], sorted(registry), moe)
        body = route.documented(moe)
        for i, path in enumerate(route.paths):
            in_schema = body is not None and i == 0
            documented = {"response_model": body, "responses": ERROR_RESPONSES, "tags": ["api"]}
            app.add_api_route(path, answer, methods=["GET"], include_in_schema=in_schema,
                              name=route.view if i == len(route.paths) - 1 else f"{route.view}_{i}",
                              response_class=JSONResponse if in_schema else Response,
                              **(documented if in_schema else {}))
    add_probe_routes(app, sorted(registry))
    app.mount("/-/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(ParameterError, _parameter_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    freeze_startup_objects()
    return app
