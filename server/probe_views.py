"""The probe's pages and their JSON twins: a neuron on your text, the neurons that fire at a token, ablations.

Each answer has one data function, the probe's (probe_client.py forwards the
request); this module makes the endpoints of each answer (GET with the
request in the query, so that a result is a link to share; POST with a JSON
body for long texts) and what the templates read. A page shows the form, and
below it the answer, or why there is none; htmx fetches the same partial
alone into the neuron, comparison and model pages.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
from types import UnionType
from typing import Annotated, Any, Callable, Literal, Union, get_args, get_origin
from urllib.parse import urlencode

from fastapi import Path, Query, Request
from pydantic import BaseModel, BeforeValidator, ValidationError
from starlette.responses import Response

from gluscope import probe_protocol as pp
from gluscope.server import data, render
from gluscope.server.db import Database
from gluscope.server.errors import ParameterError
from gluscope.server.experts import neuron_href
from gluscope.server.probe_client import ProbeClient
from gluscope.server.validate import get_model

RESPONSES: dict[str, type[BaseModel]] = {"activations": pp.Activations, "fire": pp.Firing, "ablate": pp.Ablation}
TITLES = {"activations": "Neurons on your text", "fire": "The neurons that fire at a token",
          "ablate": "Switch neurons off, or one quadrant of them"}
DOCS = {
    "activations": "Run the model on a text and show neurons' values at every token (x_gate, x_in, act, hook_post "
                   "in the file's weight convention), each token's quadrant, and |hook_post| relative to the "
                   "largest recorded in that quadrant.",
    "fire": "Run the model on a text and list, per quadrant, the neurons with the largest |hook_post| at one token, "
            "each relative to its own largest |hook_post| recorded in that quadrant.",
    "ablate": "Run the model on a text twice, as it is and with the neurons' hook_post edited (zeroed, scaled or "
              "clamped, at every token but BOS or only where a neuron is in one quadrant), and compare the "
              "next-token distributions at each position: top tokens before and after, KL, log-probabilities.",
}


# --- the parameters of each answer, from its request model -------------------------------

def _without_validators(annotation: Any) -> Any:
    """`Annotated[int, ...] | None` -> `int | None`."""
    if get_origin(annotation) is Annotated:
        return get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        return functools.reduce(operator.or_, (_without_validators(a) for a in get_args(annotation)))
    return annotation


def blank_is_none(annotation: Any) -> BeforeValidator:
    return BeforeValidator(lambda v: None if isinstance(v, str) and not v.strip() else v,
                           json_schema_input_type=annotation | Literal[""])


def query_parameters(answer: str, api: bool) -> list[inspect.Parameter]:
    """The answer's request fields as query parameters, documented as the request model documents them; on a
    page (not api) every one is optional: the form asks for what is missing."""
    out = []
    for name, f in pp.REQUESTS[answer].model_fields.items():
        required = f.is_required() and api
        query = Query(description=f.description, json_schema_extra=f.json_schema_extra)
        base = _without_validators(f.annotation)  # the body's JSON-number checks are not for query strings
        annotation = base if required else base | None
        if not required and base in (int | None, float | None, int, float):
            # A form's empty number field is sent as "name=": unset, as in the filter form. (FastAPI applies
            # the validator only when the Query is inside the Annotated too.)
            annotated = Annotated[annotation, blank_is_none(base), query]
        else:
            annotated = Annotated[annotation, query]
        default = inspect.Parameter.empty if required else None if f.is_required() or not api else f.default
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotated))
    return out


def _request(answer: str, params: dict[str, Any]) -> dict[str, Any]:
    """The JSON body the probe takes: the request model's fields, unset ones left out."""
    try:
        model = pp.REQUESTS[answer].model_validate({k: v for k, v in params.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]) if first.get("loc") else None
        raise ParameterError(422, name, f"{name}: {first.get('msg', 'invalid value')}") from None
    return model.model_dump(exclude_none=True)


# --- the endpoints -------------------------------------------------------------------------

def make_endpoints(answer: str, models: list[str]) -> dict[str, Callable[..., Any]]:
    """The API's GET and POST, and the page's GET (without a text it shows the form)."""

    async def api_get(request: Request, model: str, **params: Any) -> Response:
        return await respond(request, answer, model, params)

    async def api_post(request: Request, model: str, body: Any) -> Response:
        return await respond(request, answer, model, body.model_dump())

    async def page(request: Request, model: str, **params: Any) -> Response:
        return await respond(request, answer, model, params)

    model_param = inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                    default=Path(description="model id, as listed by /api/models",
                                                 json_schema_extra={"enum": models}))
    req = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)
    api_get.__signature__ = inspect.Signature([req, model_param, *query_parameters(answer, True)])  # type: ignore
    page.__signature__ = inspect.Signature([req, model_param, *query_parameters(answer, False)])  # type: ignore
    api_post.__signature__ = inspect.Signature([req, model_param, inspect.Parameter(  # type: ignore
        "body", inspect.Parameter.KEYWORD_ONLY, annotation=pp.REQUESTS[answer])])
    for fn, suffix in ((api_get, ""), (api_post, "_post"), (page, "_page")):
        fn.__name__ = f"probe_{answer}{suffix}"
        fn.__doc__ = DOCS[answer] + (" The same request as a JSON body, for long texts." if suffix == "_post" else "")
    return {"get": api_get, "post": api_post, "page": page}


async def respond(request: Request, answer: str, model: str, params: dict[str, Any]) -> Response:
    db = get_model(request.app.state.registry, model)
    kind = render.response_kind(request, has_fragment=True)
    client: ProbeClient = request.app.state.probe
    if kind == render.JSON:
        body = await client.answer(db, answer, _request(answer, params))
        return render.make_response(request, kind, render.encode_json(body))
    shown = {k: v for k, v in params.items() if v is not None}
    context: dict[str, Any] = {"info": data.model_info(db), "answer": answer, "title": TITLES[answer],
                               "modes": pp.ABLATION_MODES, "fire_top_max": pp.FIRE_TOP_MAX,
                               "form": shown, "probe": client.configured, "hint": pp.START_HINT,
                               "result": None, "error": None, "link": None}
    status = 200
    if shown.get("text") and (answer == "fire" or shown.get("neurons")):
        try:
            body = await client.answer(db, answer, _request(answer, params))
            context["result"] = CONTEXTS[answer](body, db)
            context["link"] = f"/models/{db.id}/probe/{answer}?{urlencode(shown)}"
        except ParameterError as e:
            context["error"], status = e.body()["error"], e.status
    template = f"_probe_{answer}.html" if kind == render.FRAGMENT else "probe.html"
    body_bytes = render.templates.env.get_template(template).render(
        {"fragment": kind == render.FRAGMENT, "data": context, **context}).encode()
    response = render.make_response(request, kind, body_bytes, status)
    if context["error"] and status == 503 and not client.configured:
        response.headers["Cache-Control"] = "no-store"
    return response


# --- what the templates read -----------------------------------------------------------------

def _named(n: dict[str, Any], db: Database) -> dict[str, Any]:
    """A neuron of an answer with its address (`L.N`, or `L.E.I` for an expert neuron) and its page."""
    address = db.experts.address(n["layer"], n["neuron"])
    return {**n, "ref": address, "href": neuron_href(address, db.id)}


def activations_context(body: dict[str, Any], db: Database) -> dict[str, Any]:
    """Per neuron: its tokens as the examples show them (render.snippet), each coloured by hook_post relative
    to the largest |hook_post| recorded in the token's own quadrant, as a list of that quadrant's examples is
    coloured on its largest value; and per quadrant what was recorded beside the strongest value here."""
    tokens = [t["token"] for t in body["tokens"]]
    neurons = []
    for n in body["neurons"]:
        signed = [0.0 if rel is None or post is None else math.copysign(rel, post)
                  for rel, post in zip(n["relative"], n["values"]["hook_post"])]
        ex = {"tokens": tokens, "activations": {**n["values"], RELATIVE: signed}, "position": -1, "window_start": 0}
        strongest = {}
        for label, rel in zip(n["quadrants"], n["relative"]):
            if label is not None and rel is not None:
                strongest[label] = max(strongest.get(label, 0.0), rel)
        neurons.append({**_named(n, db), "snippet": render.snippet(ex, None, RELATIVE, 1.0), "strongest": strongest})
    return {"neurons": neurons, "body": body}


RELATIVE = "relative"  # the colour of a probed token: hook_post over its quadrant's recorded largest |hook_post|


def fire_context(body: dict[str, Any], db: Database) -> dict[str, Any]:
    model_id = db.id
    query = {"text": body["text"], "layers": f"{body['layers'][0]}-{body['layers'][1]}"}
    tokens = [{"token": t["token"], "position": i, "focus": i == body["position"],
               "href": f"/models/{model_id}/probe/fire?{urlencode({**query, 'position': i})}"}
              for i, t in enumerate(body["tokens"])]
    quadrants = []
    for q in body["quadrants"]:
        named = [_named(n, db) for n in q["neurons"]]
        refs = ",".join(n["ref"] for n in named)
        quadrants.append({**q, "neurons": named, "test_href": f"/models/{model_id}/probe/activations?"
                                            f"{urlencode({'text': body['text'], 'neurons': refs})}" if refs else None})
    return {"tokens": tokens, "quadrants": quadrants, "body": body,
            "focus": body["tokens"][body["position"]]["token"]}


def ablate_context(body: dict[str, Any], db: Database) -> dict[str, Any]:
    return {"body": body, "positions": body["positions"], "neurons": [_named(n, db) for n in body["neurons"]]}


CONTEXTS = {"activations": activations_context, "fire": fire_context, "ablate": ablate_context}
