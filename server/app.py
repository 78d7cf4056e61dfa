"""The GLUScope web app: `create_app(paths)` and the one route table.

Every view validates its arguments, calls one function of data.py and hands
the dict to render.respond, which sends JSON (under /api/, for a `.json`
twin, or for Accept: application/json), an htmx fragment, or the full page.
Views that query the files do the same in a reader process (readers.py):
there a `*_body` function renders the bytes, and the view sends them.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import quote

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import RedirectResponse, Response

from gluscope.schema import HOOKS, QUADRANT_SLUGS
from gluscope.server import data
from gluscope.server.db import Database, open_databases
from gluscope.server.errors import ParameterError
from gluscope.server.readers import Readers, freeze_startup_objects
from gluscope.server.render import (STATIC_DIR, JSONResponse, error_page, make_response, render_body, respond,
                                    response_kind, wants_json)

log = logging.getLogger("gluscope.server")

ModelId = Path(description="model id, as listed by /api/models")
Layer = Path(description="zero-based layer index")
Neuron = Path(description="zero-based neuron index within the layer")
TextId = Path(description="zero-based text id, 0 .. n_texts-1")
QuadrantQ = Query(description="quadrant slug: pp (gate+_in+), pn (gate+_in-), np (gate-_in+), nn (gate-_in-)",
                  json_schema_extra={"enum": list(QUADRANT_SLUGS)})
HookQ = Query(description="which value the list is ranked by", json_schema_extra={"enum": list(HOOKS)})


def _registry(request: Request) -> dict[str, Database]:
    return request.app.state.registry


def _model(request: Request, model: str) -> Database:
    return data.get_model(_registry(request), model)


# --- views -----------------------------------------------------------------
# Views that only read what was loaded at startup are `async` and run on the
# front process's event loop. Views that query DuckDB are split in two: a
# `*_body` function (registry, kind, model, arguments) -> bytes that a reader
# process runs (readers.py), and the view that awaits it. FastAPI has checked
# the URL's types by then, and the body checks the ranges.

async def index(request: Request):
    """Every model this server reads, with its metadata."""
    return respond(request, data.models_data(_registry(request)), "index.html")


async def _read(request: Request, body: Callable[..., bytes], model: str, *args: Any,
                fragment: bool = False) -> Response:
    _model(request, model)  # an unknown model costs no reader's time
    kind = response_kind(request, fragment)
    return make_response(request, kind, await request.app.state.readers.run(body, kind, model, *args))


def model_body(registry: dict[str, Database], kind: str, model: str) -> bytes:
    return render_body(kind, data.model_data(data.get_model(registry, model)), "model.html")


async def model_view(request: Request, model: str = ModelId):
    """A model's metadata and its layers, with the mean frequency of each quadrant per layer."""
    return await _read(request, model_body, model)


def layer_body(registry: dict[str, Database], kind: str, model: str, layer: int, sort: str, order: str,
               offset: int, limit: int) -> bytes:
    db = data.get_model(registry, model)
    return render_body(kind, data.layer_data(db, layer, sort, order, offset, limit), "layer.html",
                       context={"info": data.model_info(db)})


async def layer_view(request: Request, model: str = ModelId, layer: int = Layer,
                     sort: str = Query("neuron", description="column to sort by"),
                     order: str = Query("asc", description="asc or desc"),
                     offset: int = Query(0, description="first row"),
                     limit: int = Query(100, description="rows, at most 1000")):
    """One page of a layer's neurons: frequency of each quadrant and weight geometry, sortable."""
    return await _read(request, layer_body, model, layer, sort, order, offset, limit)


async def neuron_view(request: Request, model: str = ModelId, layer: int = Layer, neuron: int = Neuron):
    """Figure 1 of the paper: count, frequency and min/max/mean of each value in each quadrant; weight geometry."""
    db = _model(request, model)
    return respond(request, data.neuron_data(db, layer, neuron), "neuron.html", context={"info": data.model_info(db)})


def examples_body(registry: dict[str, Database], kind: str, model: str, layer: int, neuron: int, quadrant: str,
                  hook: str, colour: str | None) -> bytes:
    db = data.get_model(registry, model)
    section = data.examples_section(db, layer, neuron, quadrant, hook)
    colour_by = HOOKS[section.hook] if colour is None else HOOKS[data.hook_code(colour, "colour")]
    return render_body(kind, lambda: section.to_json(db), "examples.html", "_examples.html",
                       context={"info": data.model_info(db), "colour_by": colour_by, "section": section, "db": db})


async def examples_view(request: Request, model: str = ModelId, layer: int = Layer, neuron: int = Neuron,
                        quadrant: str = QuadrantQ, hook: str = HookQ,
                        colour: str | None = Query(None, description="page only: the value that colours the tokens")):
    """The top-k examples of one (quadrant, value) list, most extreme first, with all four values per window token."""
    return await _read(request, examples_body, model, layer, neuron, quadrant, hook, colour, fragment=True)


def tokens_body(registry: dict[str, Database], kind: str, model: str, layer: int, neuron: int) -> bytes:
    db = data.get_model(registry, model)
    return render_body(kind, data.weight_tokens_data(db, layer, neuron), "tokens.html", "_tokens.html",
                       context={"info": data.model_info(db)})


async def tokens_view(request: Request, model: str = ModelId, layer: int = Layer, neuron: int = Neuron):
    """Tokens the neuron's weights point at: output tokens of w_out.W_U (promoted or suppressed by
    quadrant) and input tokens of w_gate.W_E and w_in.W_E (direct path only)."""
    return await _read(request, tokens_body, model, layer, neuron, fragment=True)


async def text_view(request: Request, model: str = ModelId, text_id: int = TextId,
              position: int | None = Query(None, description="page only: a token to mark")):
    """One recorded text: its token ids, each token, and the text decoded from the stored vocabulary."""
    db = _model(request, model)
    result = data.text_data(db, text_id)
    if position is not None:
        data.check_index("position", position, len(result["token_ids"]))
    return respond(request, result, "text.html", "_text.html",
                   context={"info": data.model_info(db), "position": position,
                            "parts": _text_parts(db, result["token_ids"], position)})


def _text_parts(db: Database, ids: list[int], position: int | None) -> tuple[str, str, str]:
    """The decoded text split around the marked token (the BOS at position 0 adds nothing)."""
    if position is None or position == 0:
        return db.decode(ids[1:]), "", ""
    return db.decode(ids[1:position]), db.decode(ids[position:position + 1]), db.decode(ids[position + 1:])


async def random_view(request: Request, model: str = ModelId):
    db = _model(request, model)
    layer, neuron = data.random_neuron(db)
    return RedirectResponse(f"/models/{quote(db.id)}/neurons/{layer}/{neuron}", status_code=302,
                            headers={"Cache-Control": "no-store"})


async def jump_view(request: Request, model: str = Query(...), to: str = Query(...)):
    """The jump box: `layer.neuron` to that neuron's page."""
    db = _model(request, model)
    layer, neuron = data.parse_neuron_ref(to, db)
    return RedirectResponse(f"/models/{quote(db.id)}/neurons/{layer}/{neuron}", status_code=303)


# --- the route table ---------------------------------------------------------

@dataclass
class Route:
    paths: list[str]          # the first one is in the OpenAPI schema if `api`
    view: Callable[..., Any]
    name: str
    api: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# A `.json` twin is listed before its page: `{neuron}` would also match "7.json".
ROUTES = [
    Route(["/api/models", "/.json", "/"], index, "models", api=True),
    Route(["/api/models/{model}", "/models/{model}.json", "/models/{model}"], model_view, "model", api=True),
    Route(["/api/models/{model}/layers/{layer}", "/models/{model}/layers/{layer}.json",
           "/models/{model}/layers/{layer}"], layer_view, "layer", api=True),
    Route(["/api/models/{model}/neurons/{layer}/{neuron}/examples",
           "/models/{model}/neurons/{layer}/{neuron}/examples.json",
           "/models/{model}/neurons/{layer}/{neuron}/examples"], examples_view, "examples", api=True),
    Route(["/api/models/{model}/neurons/{layer}/{neuron}/tokens",
           "/models/{model}/neurons/{layer}/{neuron}/tokens.json",
           "/models/{model}/neurons/{layer}/{neuron}/tokens"], tokens_view, "tokens", api=True),
    Route(["/api/models/{model}/neurons/{layer}/{neuron}", "/models/{model}/neurons/{layer}/{neuron}.json",
           "/models/{model}/neurons/{layer}/{neuron}"], neuron_view, "neuron", api=True),
    Route(["/api/models/{model}/texts/{text_id}", "/models/{model}/texts/{text_id}.json",
           "/models/{model}/texts/{text_id}"], text_view, "text", api=True),
    Route(["/models/{model}/random"], random_view, "random"),
    Route(["/-/jump"], jump_view, "jump"),
]


def _error_response(request: Request, body: dict[str, Any]) -> Response:
    if wants_json(request):
        return JSONResponse(body, status_code=body["error"]["status"])
    return error_page(request, body)


async def _parameter_error(request: Request, exc: ParameterError) -> Response:
    return _error_response(request, exc.body())


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("path", "query")]
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
    return _error_response(request, ParameterError(exc.status_code, None, message, None).body())


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path)
    return _error_response(request, ParameterError(500, None, "internal error (see the server log)", None).body())


def create_app(paths, readers: int = 1) -> FastAPI:
    """The app serving these recorded databases (opened read-only, once here and once in each reader).

    readers: processes that answer the views that query the files (readers.py),
    one request at a time each; about one per core. They are started with
    multiprocessing's "spawn", so a script that calls this needs the usual
    `if __name__ == "__main__":` guard.
    """
    registry = open_databases(paths)
    pool = Readers(paths, readers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.close()

    app = FastAPI(title="GLUScope", version="0.1.0", lifespan=lifespan,
                  description="Per-neuron sign-quadrant statistics of gated-MLP language models. "
                              "Layers and neurons are zero-based; quadrants are given by slug "
                              "(pp, pn, np, nn) in URLs and by label (gate+_in+ ...) in bodies.")
    app.state.registry = registry
    app.state.readers = pool
    for route in ROUTES:
        for i, path in enumerate(route.paths):
            in_schema = route.api and i == 0
            app.add_api_route(path, route.view, methods=["GET"], name=route.name if i == len(route.paths) - 1
                              else f"{route.name}_{i}", include_in_schema=in_schema,
                              response_class=JSONResponse if in_schema else Response,
                              tags=["api"] if in_schema else None, **route.extra)
    app.mount("/-/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(ParameterError, _parameter_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    freeze_startup_objects()
    return app
