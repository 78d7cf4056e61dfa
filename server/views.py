"""The views: one function per page, of one database (or of them all) and keyword arguments.

Every view has one shape, whichever process runs it. `@view` registers it
with the templates that show it and says whether it queries the file: such
a view runs in a reader process (readers.py), the others in the HTTP process
on what was loaded at startup. Its keyword parameters, with their FastAPI
declarations, are the endpoint's (app.py builds the endpoint from them), and
it returns a Page (data and what the templates read) or a Redirect.
run_view runs a view and makes the response's bytes, here or in a reader.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal

import duckdb
from fastapi import Path, Query
from pydantic import BeforeValidator

from gluscope.schema import EXAMPLE_KINDS, EXAMPLE_ROLES, HISTOGRAM_HOOKS, HOOKS, QUADRANT_SLUGS, WEIGHT_KINDS
from gluscope.server import data, filter_compare, neuron_search, queries, render
from gluscope.server.db import Database
from gluscope.server.errors import ParameterError
from gluscope.server.experts import expert_href, neuron_href
from gluscope.server.validate import (COMPARE_MAX, COMPARE_MIN, FILTER_PAGE_MAX, INTERVAL_MAX, LAYER_PAGE_MAX,
                                      LAYERS_PATTERN, NEURON_PATTERN, NEURONS_PATTERN, check_choice, check_index,
                                      example_interval, get_model, neuron_index, parse_neuron_ref)

# Ranges and choices are documented (json_schema_extra) but checked by
# validate.py, which knows each file's sizes and answers in the one error shape.
INDEX = {"minimum": 0}
Layer = Path(description="zero-based layer index", json_schema_extra=INDEX)
# A neuron of the layer: its zero-based index N in a dense layer, E.I (expert E's neuron I) in a layer of experts;
# validate.neuron_index checks it against the file and matches with the schema's pattern.
Neuron = Path(description="the neuron within the layer: its zero-based index N, or E.I (expert E's neuron I, both "
              "zero-based) in a mixture-of-experts layer", json_schema_extra={"pattern": NEURON_PATTERN,
                                                                                "examples": ["117", "3.61"]})
# A server of dense files only documents and parses the neuron as the integer it always was (app.endpoint picks
# this one there): "1.5" is then malformed (422), as before.
DenseNeuron = Path(description="zero-based neuron index within the layer", json_schema_extra=INDEX)


def neuron_parameter(moe: bool) -> tuple[type, Any]:
    """The `neuron` path parameter's type and declaration in an app serving a file with experts (moe), or not."""
    return (str, Neuron) if moe else (int, DenseNeuron)


ExpertP = Path(description="zero-based expert of the layer: routed experts first, then shared ones",
               json_schema_extra=INDEX)
TextId = Path(description="zero-based text id, 0 .. n_texts-1", json_schema_extra=INDEX)
QuadrantQ = Query(description="quadrant slug: pp (gate+_in+), pn (gate+_in-), np (gate-_in+), nn (gate-_in-)",
                  json_schema_extra={"enum": list(QUADRANT_SLUGS)})
HookQ = Query(description="which value the list is ranked by (kind=top) or shows (random, interval)",
              json_schema_extra={"enum": list(HOOKS)})
KindQ = Query("top", description="top: the top-k by |value|; random: tokens drawn uniformly from the quadrant; "
              "interval: a few drawn from each interval of |hook_post|, typical to extreme",
              json_schema_extra={"enum": list(EXAMPLE_KINDS)})
IntervalQ = Query(None, description=f"kind=interval: just this interval's examples (0 = typical, {INTERVAL_MAX} = "
                  "extreme); ignored for the other kinds",
                  json_schema_extra={"minimum": 0, "maximum": INTERVAL_MAX})
# The schema's pattern of a range of layers is the one parse_layer_range matches with.
LayersQ = Query(None, description="layers A-B (inclusive; B-A is the same range) or one layer A; all if empty",
                json_schema_extra={"pattern": LAYERS_PATTERN})


@dataclass
class Page:
    """What a view shows: the JSON body and what the templates read besides (see render.render_body)."""

    data: Any | Callable[[], Any]
    context: dict[str, Any] | Callable[[bool], dict[str, Any]] = field(default_factory=dict)


@dataclass
class Redirect:
    url: str
    status: int = 302
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Image:
    body: bytes
    media_type: str = "image/png"


@dataclass(frozen=True)
class View:
    fn: Callable[..., Page | Redirect | Image]
    page: str | None        # the full page's template
    fragment: str | None    # the partial an htmx request gets, if the page has one
    reads_file: bool        # queries DuckDB: runs in a reader process
    per_model: bool         # takes one model's Database (from the `model` parameter), else the registry


VIEWS: dict[str, View] = {}


def view(page: str | None = None, fragment: str | None = None, reads_file: bool = False,
         per_model: bool = True) -> Callable[[Callable[..., Page | Redirect]], Callable[..., Page | Redirect]]:
    def register(fn: Callable[..., Page | Redirect]) -> Callable[..., Page | Redirect]:
        VIEWS[fn.__name__] = View(fn, page, fragment, reads_file, per_model)
        return fn
    return register


def run_view(registry: dict[str, Database], name: str, model: str | None, kind: str,
             params: dict[str, Any]) -> bytes | Redirect | Image:
    """VIEWS[name] on these arguments, as the body of a response of this kind (render.py)."""
    v = VIEWS[name]
    if v.per_model:
        db = get_model(registry, model)
        try:
            shown = v.fn(db, **params)
        except duckdb.Error as e:  # a file damaged where opening it did not look: say so, never a 500
            raise ParameterError(503, None, f"{db.path.name} cannot be read where this page needs it; the file is "
                                 f"damaged ({str(e).splitlines()[0][:160]})") from None
    else:
        shown = v.fn(registry, **params)
    if isinstance(shown, (Redirect, Image)):
        return shown
    context = shown.context
    if v.per_model:  # every page of a model shows its name and shape
        info = {"info": data.model_info(db)}
        context = (lambda fragment: {**info, **shown.context(fragment)}) if callable(context) else {**info, **context}
    return render.render_body(kind, shown.data, v.page, v.fragment, context)


@view(page="index.html", per_model=False)
def index(registry: dict[str, Database]) -> Page:
    """Every model this server reads, with its metadata."""
    return Page(data.models_data(registry), {"moe_jump": any(db.experts.any for db in registry.values())})


@view(page="model.html", reads_file=True)
def model(db: Database, scatter: int | None = Query(None, description="page only: the layer whose §5.1 scatter "
                                                    "is shown (default: the middle one)", json_schema_extra=INDEX)
          ) -> Page:
    """A model's metadata and its layers: the mean frequency of each quadrant per layer, and the paper's §5.1
    analysis, the correlation across each layer's neurons between the frequency of x_gate > 0 and cos(w_in, w_out)."""
    if scatter is not None:
        check_index("scatter", scatter, db.n_layers)
    shown = db.n_layers // 2 if scatter is None else scatter
    return Page(data.model_data(db), lambda fragment: {"scatter": data.scatter(db, shown) if db.n_layers else None})


@view(page="scatter.html", reads_file=True)
def scatter(db: Database, layer: int = Layer) -> Page:
    """The §5.1 scatter of one layer: per neuron, the frequency of x_gate > 0 and cos(w_in, w_out), and their
    Pearson correlation r."""
    found = data.scatter(db, layer)
    return Page(lambda: found.to_json(db.id), lambda fragment: {"data": {"layer": layer}, "scatter": found})


@view(reads_file=True)
def scatter_png(db: Database, layer: int = Layer) -> Image:
    """The §5.1 scatter of one layer as a PNG image."""
    return Image(data.scatter_png(db, layer))


@view(reads_file=True)
def scatter_click(db: Database, layer: int = Layer, x: int = Query(..., description="pixel column of the click"),
                  y: int = Query(..., description="pixel row of the click")) -> Redirect:
    """A click on the scatter's image (an <input type="image"> sends its pixel): the nearest neuron's page."""
    nearest = data.scatter(db, layer).nearest(x, y)
    if nearest is None:
        raise ParameterError(404, "layer", f"layer {layer} has no neuron to show", None)
    return Redirect(_neuron_url(db, layer, nearest), 303)


@view(page="layer.html", reads_file=True)
def layer(db: Database, layer: int = Layer,
          sort: str = Query("neuron", description="column to sort by",
                            json_schema_extra={"enum": list(queries.LAYER_SORT_KEYS)}),
          order: str = Query("asc", description="asc or desc", json_schema_extra={"enum": list(data.LAYER_ORDERS)}),
          offset: int = Query(0, description="first row", json_schema_extra=INDEX),
          limit: int = Query(100, description=f"rows, at most {LAYER_PAGE_MAX}",
                             json_schema_extra={"minimum": 1, "maximum": LAYER_PAGE_MAX})) -> Page:
    """One page of a layer's neurons: frequency of each quadrant and weight geometry, sortable. A layer of experts
    also lists its experts: how often each was chosen, with what weight, the tokens routed to it most."""
    return Page(data.layer_data(db, layer, sort, order, offset, limit), {"experts_href": _experts_hrefs(db, layer)})


def _experts_hrefs(db: Database, layer: int) -> list[str]:
    return [expert_href(db.id, layer, e.expert) for e in db.experts.layers[layer].experts] \
        if 0 <= layer < db.n_layers else []


@view(page="expert.html", reads_file=True)
def expert(db: Database, layer: int = Layer, expert: int = ExpertP,
           sort: str = Query("neuron", description="column to sort the expert's neurons by",
                             json_schema_extra={"enum": list(queries.LAYER_SORT_KEYS)}),
           order: str = Query("asc", description="asc or desc", json_schema_extra={"enum": list(data.LAYER_ORDERS)}),
           offset: int = Query(0, description="first row, within the expert", json_schema_extra=INDEX),
           limit: int = Query(100, description=f"rows, at most {LAYER_PAGE_MAX}",
                              json_schema_extra={"minimum": 1, "maximum": LAYER_PAGE_MAX})) -> Page:
    """One expert of a mixture-of-experts layer: how often it was chosen (its share of the counted tokens), its
    router weight's mean and distribution, the tokens routed to it most (by count, by weight, by share of the
    token), the texts where its weight was largest, and its neurons (sortable, as a layer's)."""
    body = data.expert_data(db, layer, expert, sort, order, offset, limit)
    return Page(body, lambda fragment: {"weights_svg": render.weight_histogram_svg(body),
                                        "examples": render.expert_examples(body["examples"])})


@view(page="neuron.html")
def neuron(db: Database, layer: int = Layer, neuron: str = Neuron) -> Page:
    """Figure 1 of the paper: count, frequency and min/max/mean of each value in each quadrant; weight geometry.
    An expert neuron's statistics are over the tokens routed to its expert (`router` names it)."""
    n = neuron_index(db, layer, neuron)
    return Page(data.neuron_data(db, layer, n), {"nav": _neighbours(db, layer, n)})


def _neighbours(db: Database, layer: int, neuron: int) -> dict[str, str | None]:
    """The addresses of the neurons before and after this one (across layers, each of its own width), the page
    and of its expert."""
    widths = db.experts
    prev = (layer, neuron - 1) if neuron > 0 else (layer - 1, widths.width(layer - 1) - 1) if layer > 0 else None
    after = (layer, neuron + 1) if neuron + 1 < widths.width(layer) else (layer + 1, 0) \
        if layer + 1 < db.n_layers else None
    e = widths.expert_at(layer, neuron)
    return {"prev": None if prev is None else widths.address(*prev),
            "next": None if after is None else widths.address(*after),
            "expert_href": None if e is None else expert_href(db.id, layer, e.expert)}


@view(page="examples.html", fragment="_examples.html", reads_file=True)
def examples(db: Database, layer: int = Layer, neuron: str = Neuron, quadrant: str = QuadrantQ, hook: str = HookQ,
             kind: str = KindQ, interval: int | None = IntervalQ,
             colour: str | None = Query(None, description="page only: the value that colours the tokens",
                                        json_schema_extra={"enum": list(HOOKS)})) -> Page:
    """One list of examples with all four values per window token: the top-k of a (quadrant, value), most
    extreme first (kind=top), or the quadrant's random examples or examples across the range of |hook_post|
    (kind=random, interval; each interval example says its interval's bounds)."""
    found = data.read_example_list(db, layer, neuron_index(db, layer, neuron), quadrant, hook, kind,
                                   example_interval(kind, interval))
    colour_by = found.colour(colour)
    return Page(lambda: found.to_json(db.vocab),
                lambda fragment: render.examples_context(found, db.vocab, colour_by, compact=fragment))


@view(page="histograms.html", fragment="_histograms.html", reads_file=True)
def histograms(db: Database, layer: int = Layer, neuron: str = Neuron,
               hook: str = Query("hook_post", description="page only: the value whose histograms are drawn",
                                 json_schema_extra={"enum": list(HISTOGRAM_HOOKS)})) -> Page:
    """How a neuron's values are spread: per value and quadrant a histogram on fixed log-spaced bins, the joint
    density of (x_gate, x_in), and per quadrant the intervals of |hook_post| its examples across the range
    come from."""
    check_choice("hook", hook, HISTOGRAM_HOOKS)
    n = neuron_index(db, layer, neuron)
    body = data.histograms_data(db, layer, n)
    return Page(body, lambda fragment: render.histograms_context(body, hook, _neuron_url(db, layer, n)))


@view(page="tokens.html", fragment="_tokens.html", reads_file=True)
def tokens(db: Database, layer: int = Layer, neuron: str = Neuron) -> Page:
    """Tokens the neuron's weights point at: output tokens of w_out.W_U (promoted or suppressed by
    quadrant) and input tokens of w_gate.W_E and w_in.W_E (direct path only)."""
    return Page(data.weight_tokens_data(db, layer, neuron_index(db, layer, neuron)))


# It reads the file: an import's texts as its dataset gave them (texts.text) are not loaded at startup.
@view(page="text.html", fragment="_text.html", reads_file=True)
def text(db: Database, text_id: int = TextId,
         position: int | None = Query(None, description="page only: a token to mark")) -> Page:
    """One recorded text: its token ids, each token, and the text as its dataset gave it (an import's), else
    decoded from the stored vocabulary."""
    result = data.text_data(db, text_id)
    if position is not None:
        check_index("position", position, len(result["token_ids"]))
    marked = position if data.tokens_known(db) else None
    return Page(result, {"position": marked, "parts": data.text_parts(db, result, marked)})


def _neuron_url(db: Database, layer: int, neuron: int) -> str:
    return neuron_href(db.experts.address(layer, neuron), db.id)


@view()
def random(db: Database) -> Redirect:
    """A random neuron's page."""
    return Redirect(_neuron_url(db, *data.random_neuron(db)), 302, {"Cache-Control": "no-store"})


@view()
def jump(db: Database, to: str = Query(...)) -> Redirect:
    """The jump box: `layer.neuron` (or an expert neuron's `layer.expert.index`) to that neuron's page."""
    return Redirect(_neuron_url(db, *parse_neuron_ref(to, db)), 303)


# A bound left empty in the filter form is sent as "name=": no bound, not an error, and the schema says
# so. (FastAPI applies the validator only when the Query is inside the Annotated too.)
_blank_is_none = BeforeValidator(lambda v: None if isinstance(v, str) and not v.strip() else v,
                                 json_schema_input_type=float | None | Literal[""])


# The filter's expert= (a select whose "any" is sent empty: exactly "", as the schema says).
ExpertFilterQ = Annotated[int | None, BeforeValidator(lambda v: None if v == "" else v,
                                                      json_schema_input_type=int | None | Literal[""]),
                          Query(description="a file with experts: only the neurons of this expert (routed 0 .. "
                                "n_experts-1, then shared) in each layer of the range; empty: every neuron")]


def with_bounds(fn: Callable[..., Page]) -> Callable[..., Page]:
    """Give fn, which takes **bounds, one keyword parameter per bound (filter_compare.BOUND_NAMES): FastAPI then
    parses and documents each, and fn receives them all in `bounds`."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    for name in filter_compare.BOUND_NAMES:
        side, field_name = name.split("_", 1)
        doc = f"{'lowest' if side == 'min' else 'highest'} {filter_compare.FIELD_HELP[field_name]}"
        bound = Annotated[float | None, _blank_is_none, Query(description=doc)]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=bound, default=None))
        fn.__annotations__[name] = bound
    fn.__signature__ = inspect.Signature(params, return_annotation=Page)  # type: ignore[attr-defined]
    return fn


@view(page="filter.html", reads_file=True)
@with_bounds
def neuron_filter(db: Database,
                  layers: str | None = LayersQ,
                  sort: str = Query("neuron", description="field to sort by; `neuron` is (layer, neuron)",
                                    json_schema_extra={"enum": list(queries.FILTER_SORT_KEYS)}),
                  order: str | None = Query(None, description="asc or desc (default: asc by neuron, else desc)",
                                            json_schema_extra={"enum": list(filter_compare.FILTER_ORDERS)}),
                  offset: int = Query(0, description="first row of the page", json_schema_extra=INDEX),
                  limit: int = Query(50, description=f"rows, at most {FILTER_PAGE_MAX}",
                                     json_schema_extra={"minimum": 1, "maximum": FILTER_PAGE_MAX}),
                  expert: ExpertFilterQ = None,
                  **bounds: float | None) -> Page:
    """The whole model's neurons within bounds on each quadrant's frequency, the weight geometry and each
    quadrant's largest |hook_post|, sorted and paged; each row holds the fields bounded or sorted by. An expert
    neuron's frequencies are over the tokens routed to its expert; expert= keeps one expert's neurons."""
    body = filter_compare.filter_data(db, layers, bounds, sort, order, offset, limit, expert)
    return Page(body, {"labels": filter_compare.FIELD_LABELS, "fields": list(queries.FILTER_FIELDS),
                       "query": filter_compare.filter_query(body),
                       "max_experts": max((len(x.experts) for x in db.experts.layers), default=0),
                       "n_neurons": sum(x.n_neurons for x in db.experts.layers)})


@view(page="compare.html", fragment="_compare_lists.html", reads_file=True)
def compare(db: Database,
            neurons: str = Query(..., description=f"{COMPARE_MIN} to {COMPARE_MAX} layer.neuron (an expert "
                                                  "neuron: layer.expert.index), comma-separated; a neuron given "
                                                  "twice is shown once",
                                 json_schema_extra={"pattern": NEURONS_PATTERN, "example": "0.1,1.2"}),
            quadrant: str = Query("pp", description="the quadrant of the list shown for each neuron",
                                  json_schema_extra={"enum": list(QUADRANT_SLUGS)}),
            hook: str = Query("hook_post", description="the value that list is ranked by",
                              json_schema_extra={"enum": list(HOOKS)})) -> Page:
    """2 to 4 neurons side by side (one neuron given twice is shown once): summaries, the related scores between
    them, one list of examples each."""
    body, lists = filter_compare.compare_data(db, neurons, quadrant, hook)
    names = [db.experts.address(n["layer"], n["neuron"]) for n in body["neurons"]]
    return Page(lambda: {**body, "examples": [found.to_json(db.vocab) for found in lists]},
                lambda fragment: {"data": body, "columns": [
                    render.examples_context(found, db.vocab, HOOKS[found.hook], compact=True) for found in lists],
                    "overlay": render.overlay_svg(body["histograms"], names) if body["histograms"] else None})

@view(page="search.html", fragment="_search_results.html", reads_file=True)
def token_search(db: Database,
                 token_id: int | None = Query(None, description="a vocabulary id (with token: both are searched)",
                                              json_schema_extra=INDEX),
                 token: str | None = Query(None, description="the decoded text of a vocabulary entry, e.g. ' again'",
                                           json_schema_extra={"minLength": 1,
                                                              "maxLength": neuron_search.TOKEN_TEXT_MAX}),
                 loose: bool = Query(False, description="token= ignores a leading space and case"),
                 side: str = Query("weights", description="weights: token_neurons; examples: recorded examples",
                                   json_schema_extra={"enum": list(neuron_search.SIDES)}),
                 kind: str | None = Query(None, description=f"side=weights: {', '.join(WEIGHT_KINDS)} (default "
                                          f"{WEIGHT_KINDS[0]}); side=examples: {', '.join(EXAMPLE_KINDS)} "
                                          "(default all); a kind of the other side is ignored (the side's default "
                                          "applies, the body's kind says which ran)",
                                          json_schema_extra={"enum": ["", *WEIGHT_KINDS, *EXAMPLE_KINDS]}),
                 role: str = Query("focus", description="side=examples: the token of interest (focus) or the one "
                                   "after it (next)", json_schema_extra={"enum": list(EXAMPLE_ROLES)}),
                 quadrant: str | None = Query(None, description="side=examples: a quadrant slug (empty: any)",
                                              json_schema_extra={"enum": ["", *QUADRANT_SLUGS]}),
                 hook: str | None = Query(None, description="side=examples: the list's value (empty: any)",
                                          json_schema_extra={"enum": ["", *HOOKS]}),
                 layers: str | None = LayersQ,
                 limit: int = Query(20, description=f"results, 1..{neuron_search.SEARCH_LIMIT}",
                                    json_schema_extra={"minimum": 1, "maximum": neuron_search.SEARCH_LIMIT})) -> Page:
    """Neurons of a token: whose weights promote, suppress or read it most (side=weights, the transpose of the
    weight tokens over the whole model), or whose recorded examples hold it (side=examples)."""
    return Page(neuron_search.token_search_data(db, token_id, token, loose, side, kind, role, quadrant, hook, layers,
                                                limit),
                {"weight_kinds": WEIGHT_KINDS, "example_kinds": EXAMPLE_KINDS, "roles": EXAMPLE_ROLES,
                 "sides": neuron_search.SIDES})


@view(page="suggest.html", fragment="_suggest.html", reads_file=True)
def suggest(db: Database, token: str = Query(..., description="what the search box holds so far",
                                             json_schema_extra={"maxLength": neuron_search.TOKEN_TEXT_MAX}),
            limit: int = Query(12, description=f"entries, 1..{neuron_search.SUGGEST_LIMIT}",
                               json_schema_extra={"minimum": 1, "maximum": neuron_search.SUGGEST_LIMIT})) -> Page:
    """Vocabulary entries for a search box: the exact text, then those equal or starting with it ignoring a
    leading space and case, shortest first. An empty box suggests nothing."""
    return Page(neuron_search.suggestions_data(db, token, limit))


@view(page="related.html", fragment="_related.html", reads_file=True)
def related(db: Database, layer: int = Layer, neuron: str = Neuron) -> Page:
    """Neurons connected to this one along the direct residual path: score(A -> B) = cos(w_out of A,
    g_B * w_via of B), g_B the gain of B's pre-MLP norm; the 16 largest |score| per direction and via."""
    return Page(neuron_search.related_data(db, layer, neuron_index(db, layer, neuron)))
