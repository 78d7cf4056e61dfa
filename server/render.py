"""Choosing the response (JSON, htmx fragment or full page), making its bytes, and the helpers templates use.

A view hands over a Page (views.py): its JSON body and what the templates read
besides it. render_body turns it into the bytes of one kind of response, in
whichever process ran the view; make_response wraps them with the headers.
Templates receive plain dicts, lists and markup, never a database.
"""

from __future__ import annotations

import base64
import math
import weakref
from functools import lru_cache
from itertools import chain
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jinja2
import orjson
import starlette.responses
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.templating import Jinja2Templates

import numpy as np

from gluscope.schema import (GATE_POS_SLUGS, GEOMETRY, GEOMETRY_LABELS, HISTOGRAM_HOOKS, HOOKS, POST_SIGNS,
                             QUADRANT_SIGNS, QUADRANT_SLUGS, QUADRANTS)
from gluscope.server import plots
from gluscope.server.experts import address_of, neuron_href
from gluscope.server.queries import GATE_POS_COUNT

if TYPE_CHECKING:
    from gluscope.server.data import ExampleList
    from gluscope.server.db import Vocabulary

TEMPLATE_DIR = Path(str(files("gluscope.templates")))
STATIC_DIR = Path(str(files("gluscope.frontend") / "static"))

# Pages may run only our own scripts: a token such as <script> is escaped
# anyway, and this keeps anything that slipped through from running.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

WHITESPACE_MARKS = {" ": "·", "\t": "→", "\r": "␍", "\n": "⏎\n", "\u00a0": "⍽"}
# A value's colour: red above zero, blue below, white at zero. Written once here: base.html hands them to
# gluscope.js (data-pos-rgb, data-neg-rgb) and to gluscope.css (--pos-rgb, --neg-rgb) on <body>.
POS_RGB, NEG_RGB = (214, 39, 40), (31, 119, 180)


def encode_json(content: Any) -> bytes:
    """Compact UTF-8 JSON. Data functions map NaN and infinity to None (JSON has neither); orjson would
    write null for them too. orjson, not the standard library: an examples body is a few thousand numbers,
    and encoding it was the largest cost of the examples JSON (see docs/performance.md)."""
    return orjson.dumps(content)


class JSONResponse(starlette.responses.JSONResponse):  # a JSONResponse, so /openapi.json shows the body model
    def render(self, content: Any) -> bytes:
        return encode_json(content)


def wants_json(request: Request) -> bool:
    path = request.url.path
    if path.startswith("/api/") or path.endswith(".json"):
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def is_fragment_request(request: Request) -> bool:
    # A history restore needs the whole page, not the fragment it once swapped in.
    return request.headers.get("hx-request") == "true" and request.headers.get("hx-history-restore-request") != "true"


def json_url(request: Request) -> str:
    url = request.url
    return url.path + ".json" + (f"?{url.query}" if url.query else "")


JSON, FRAGMENT, PAGE = "json", "fragment", "page"


def response_kind(request: Request, has_fragment: bool = False) -> str:
    """JSON for the API, .json twins and Accept: application/json; the fragment for htmx; else the page."""
    if wants_json(request):
        return JSON
    return FRAGMENT if has_fragment and is_fragment_request(request) else PAGE


def render_body(kind: str, data: Any | Callable[[], Any], page: str, fragment: str | None = None,
                context: dict[str, Any] | Callable[[bool], dict[str, Any]] | None = None) -> bytes:
    """The body of a response of this kind, as bytes.

    `data` is the JSON body, or a function that makes it, called for JSON
    only; templates read it as `data`. `context` is what they read besides,
    or a function of `fragment` that makes it, called for HTML only (and it
    may replace `data` by what the templates need instead): the htmx
    fragment never builds the JSON body, nor the JSON the rows of a page.
    """
    if kind == JSON:
        return encode_json(data() if callable(data) else data)
    is_fragment = kind == FRAGMENT and fragment is not None
    made = context(is_fragment) if callable(context) else context
    full = {"fragment": is_fragment, **({} if callable(data) else {"data": data}), **(made or {})}
    return templates.env.get_template(fragment if is_fragment else page).render(full).encode()


def make_response(request: Request, kind: str, body: bytes, status: int = 200) -> Response:
    if kind == JSON:
        return Response(body, status_code=status, media_type=JSONResponse.media_type, headers={"Vary": "Accept"})
    headers = {"Vary": "HX-Request, Accept", **SECURITY_HEADERS}
    if kind == PAGE:
        headers["Link"] = f'<{json_url(request)}>; rel="alternate"; type="application/json"'
    return HTMLResponse(body, status_code=status, headers=headers)


def error_page(request: Request, body: dict[str, Any]) -> HTMLResponse:
    """The error as a page, or as the fragment an htmx request would have swapped in."""
    err = body["error"]
    name = "_error.html" if is_fragment_request(request) else "error.html"
    return templates.TemplateResponse(request=request, name=name, context={"error": err},
                                      status_code=err["status"], headers={"Vary": "HX-Request, Accept",
                                                                          **SECURITY_HEADERS})


# --- template helpers -------------------------------------------------------

# Unbounded: every token shown comes from a vocabulary (token_spans fills it
# in each reader at startup), so no page escapes a token twice.
@lru_cache(maxsize=None)
def show_token(token: str) -> Markup:
    """Escaped token text with whitespace made visible (· space, ⏎ newline, → tab)."""
    out = []
    for ch in token:
        mark = WHITESPACE_MARKS.get(ch)
        out.append(f'<span class="ws">{mark}</span>' if mark else str(escape(ch)))
    return Markup("".join(out)) if token else Markup('<span class="ws">∅</span>')


_SPANS: "weakref.WeakKeyDictionary[Vocabulary, list[str]]" = weakref.WeakKeyDictionary()


def token_spans(vocab: Vocabulary) -> list[str]:
    """Each vocabulary entry as the bare token span of an htmx examples fragment, built once per vocabulary
    (readers.py builds them at startup).

    The fragment's snippets are then a join of prebuilt strings; gluscope.js
    adds each token's values, quadrant and colour from the snippet's data-v.
    """
    spans = _SPANS.get(vocab)
    if spans is None:
        spans = _SPANS[vocab] = [f'<span class="t" tabindex="0">{show_token(token)}</span>' for token in vocab.tokens]
    return spans


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def freq_gate_pos(frequency: dict[str, float | None]) -> float | None:
    """The frequency of x_gate > 0 from a neuron's frequency per quadrant slug, their sum; None where they are
    (an expert no token was routed to)."""
    parts = [frequency[s] for s in GATE_POS_SLUGS]
    return None if None in parts else sum(parts)


def format_many(values: list[float | None], spec: str = "%.4g") -> list[str]:
    """fmt() of many numbers in one C-level formatting call.

    A list shows 16 × 27 tokens with four values each; formatting them one
    Python call at a time was the largest cost of the examples fragment.
    """
    if not values:
        return []
    if None in values:
        values = [float("nan") if v is None else v for v in values]
    text = ((spec + "\x00") * len(values)) % tuple(values)
    out = text.split("\x00")[:-1]
    # nan, inf and -0 are rare: look at each string only when one occurs.
    if "n" in text or "-0\x00" in text:
        out = [_FIXES.get(t, t) for t in out]
    return out


_FIXES = {"nan": "—", "inf": "—", "-inf": "—", "-0": "0"}


def _styles(values: list[float | None], scale: float) -> list[str]:
    """Each token's style attribute: a background on one diverging scale per list.

    Same formula as colour() in gluscope.js, which recolours when the selector changes.
    """
    if not scale > 0 or not math.isfinite(scale):
        return [""] * len(values)
    alpha = [min(abs(v) / scale, 1.0) * 0.85 if v and math.isfinite(v) else 0.0 for v in values]
    text = format_many(alpha, "%.3f")
    return [f' style="background:rgba({_POS if v > 0 else _NEG},{t})"' if a >= 0.005 else ""
            for v, a, t in zip(values, alpha, text)]


_POS, _NEG = ",".join(map(str, POS_RGB)), ",".join(map(str, NEG_RGB))


_SPAN = ('<span class="%s" tabindex="0" title="position %d · %s&#10;' + "&#10;".join(f"{h} %s" for h in HOOKS)
         + '"%s>%s</span>')
_QUADRANT_OF = {(g > 0, x > 0): q for q, (g, x) in enumerate(QUADRANT_SIGNS)}  # (x_gate > 0, x_in > 0) -> code


def snippet(ex: dict[str, Any], q_code: int | None, colour_by: str, scale: float,
            not_routed: str | None = None) -> Markup:
    """One example's window as focusable token spans; the title holds all four values (gluscope.js reads it).

    Built here rather than in a template loop, and with one formatting call
    for all spans: a list has 16 × 27 tokens, and this is the hot path of
    the examples page. not_routed: an expert neuron's window holds no values
    (NaN, null in JSON) at tokens not routed to its expert; they are shown
    uncoloured, classed `nr`, with this in their title.
    """
    acts = ex["activations"]
    n = len(ex["tokens"])
    focus = ex["position"] - ex["window_start"]
    gates, ins = acts["hook_pre"], acts["hook_pre_linear"]
    quads = [_QUADRANT_OF[(g > 0, x > 0)] if g and x else None for g, x in zip(gates, ins)]
    classes = ["t" if q_code is None or q == q_code else "t oq" for q in quads]  # None: no list's quadrant
    heads = ["no quadrant" if q is None else QUADRANTS[q] for q in quads]
    if not_routed:
        for i, (g, x) in enumerate(zip(gates, ins)):
            if g is None and x is None:
                classes[i], heads[i] = "t nr", not_routed
    if 0 <= focus < n:
        classes[focus] += " focus"
    text = format_many(list(chain.from_iterable(acts[h] for h in HOOKS)))
    fields = zip(classes, range(ex["window_start"], ex["window_start"] + n), heads,
                 *(text[i * n:(i + 1) * n] for i in range(len(HOOKS))),
                 _styles(acts[colour_by], scale), map(show_token, ex["tokens"]))
    return Markup('<div class="snippet">' + (_SPAN * n) % tuple(chain.from_iterable(fields)) + "</div>")


def compact_snippet(found: ExampleList, i: int, spans: list[str]) -> Markup:
    """One example's window for the htmx fragment: bare token spans, and all four values of every token
    as little-endian float32 in base64 (data-v, [4 values in HOOKS order, tokens]).

    gluscope.js turns data-v into what snippet() writes on the server (each
    token's tooltip values, quadrant class and colour). A list is then a
    few kilobytes of numbers instead of far more in formatted attributes,
    and costs the server no per-token formatting (see docs/performance.md).
    """
    ids = found.token_ids[i]
    n = len(ids)
    if n and (ids.min() < 0 or ids.max() >= len(spans)):  # never from our recorder; shown, not fatal
        body = "".join(spans[t] if 0 <= t < len(spans) else _UNKNOWN_SPAN % t for t in ids.tolist())
    else:
        body = "".join([spans[t] for t in ids.tolist()])
    values = base64.b64encode(found.values[i, :, :n].astype("<f4").tobytes()).decode("ascii")
    start = int(found.window_start[i])
    return Markup(f'<div class="snippet" data-start="{start}" data-focus="{int(found.position[i]) - start}" '
                  f'data-v="{values}">{body}</div>')


_UNKNOWN_SPAN = '<span class="t" tabindex="0">&lt;unk %d&gt;</span>'


def examples_context(found: ExampleList, vocab: Vocabulary, colour_by: str, compact: bool) -> dict[str, Any]:
    """What _examples.html reads: which list (`data`), its colour scales, and per example the JSON
    fields and the snippet's markup.

    compact: the htmx fragment (gluscope.js finishes each snippet); else the
    page, complete without JavaScript.
    """
    scales = found.scales()
    spans = token_spans(vocab) if compact else []
    rows = []
    for i in range(len(found)):
        if found.position[i] < 0:  # an imported example: the text is known, its token is not
            ex = found.head(i)
            ex["snippet"] = Markup('<div class="snippet whole-text">{}</div>').format(
                found.texts[int(found.text_id[i])])
        elif compact:
            ex = {**found.head(i), "snippet": compact_snippet(found, i, spans)}
        else:
            ex = found.example(i, vocab)
            ex["snippet"] = snippet(ex, found.quadrant, colour_by, scales[colour_by], found.not_routed)
        rows.append(ex)
    return {"data": found.describe(), "examples": rows, "scales": scales, "colour_by": colour_by,
            "not_routed": found.not_routed}


def weight_histogram_svg(body: dict[str, Any]) -> Markup | None:
    """An expert's router weight over its tokens (data.expert_data's `weights`), drawn as a neuron's histograms
    are (plots.histogram_svg): log-spaced bins of the value, two per octave."""
    w = body["weights"]
    if not w["counts"] or not any(w["counts"]):
        return None
    slot, lows, highs = plots.magnitude_slots(w["edges"])
    used = slot[np.flatnonzero(w["counts"])]
    first, stop = int(used.min()), int(used.max()) + 1
    if stop - first < MIN_SLOTS:
        stop = min(len(lows), first + MIN_SLOTS)
        first = max(0, stop - MIN_SLOTS)
    label = f"{'shared ' if body['shared'] else ''}expert {body['expert']}"
    return plots.histogram_svg(w["counts"], slot, lows, highs, (first, stop), 1, "w",
                               f"router weight of {label}: {sum(w['counts']):,} tokens", width=420, height=170)


def expert_examples(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An expert's examples (the texts where its router weight was largest) with each window as token spans,
    the token of interest outlined as in a neuron's lists. The file keeps no values around it, so the spans
    carry only their position (a plain title, no colour)."""
    out = []
    for ex in examples:
        focus = ex["position"] - ex["window_start"]
        spans = []
        for i, token in enumerate(ex["tokens"]):
            cls, title = ("t focus", f"position {ex['window_start'] + i} · router weight {fmt(ex['weight'])}") \
                if i == focus else ("t", f"position {ex['window_start'] + i}")
            spans.append(f'<span class="{cls}" tabindex="0" title="{title}">{show_token(token)}</span>')
        out.append({**ex, "snippet": Markup('<div class="router-window">' + "".join(spans) + "</div>")})
    return out


# The sign of each histogram's value in each quadrant (its x axis is |value|).
VALUE_SIGNS = {"hook_post": POST_SIGNS, "hook_pre_linear": tuple(i for _, i in QUADRANT_SIGNS),
               "hook_pre": tuple(g for g, _ in QUADRANT_SIGNS)}
MIN_SLOTS = 10  # a histogram shows at least this many bins (5 octaves), so that a narrow one stays readable


def histograms_context(body: dict[str, Any], hook: str, base: str) -> dict[str, Any]:
    """What _histograms.html reads: per quadrant the SVG histogram of `hook` and the links to its intervals'
    examples, the density's SVG, and the switch between values."""
    value = body["values"][hook]
    edges = value["edges"]
    quadrants = body["quadrants"]
    out = []
    if edges:
        slot, lows, highs = plots.magnitude_slots(edges)
        used = np.zeros(len(lows), bool)
        for counts in value["counts"].values():
            used[slot[np.flatnonzero(counts)]] = True
        nz = np.flatnonzero(used)
        first, stop = int(nz[0]), int(nz[-1]) + 1
        if stop - first < MIN_SLOTS:
            stop = min(len(lows), first + MIN_SLOTS)
            first = max(0, stop - MIN_SLOTS)
    for q, (label, slug) in enumerate(zip(QUADRANTS, QUADRANT_SLUGS)):
        info = quadrants[q]
        intervals = [{**iv, "href": f"{base}/examples?quadrant={slug}&hook=hook_post&kind=interval&interval={iv['interval']}",
                      "range": f"[{plots.edge_label(iv['lo'])}, {plots.edge_label(iv['hi'])})"}
                     for iv in info["intervals"]]
        svg = None
        if edges and info["count"]:
            bands = [plots.Band(iv["lo"] or 0.0, iv["hi"], iv["href"],
                                f"interval {iv['interval']}: |hook_post| in {iv['range']}"
                                + ("" if iv["count"] is None else f", {iv['count']:,} tokens") + ": show its examples")
                     for iv in intervals] if hook == "hook_post" else []
            svg = plots.histogram_svg(value["counts"][label], slot, lows, highs, (first, stop), VALUE_SIGNS[hook][q],
                                      slug, f"{label}: {info['count']:,} tokens", bands)
        out.append({"quadrant": label, "slug": slug, "count": info["count"], "frequency": info["frequency"],
                    "svg": svg, "intervals": intervals})
    d = body["density"]
    density = plots.density_svg(d["counts"], d["gate_edges"], d["in_edges"],
                                {q["slug"]: q["frequency"] for q in quadrants},
                                dict(zip(QUADRANT_SLUGS, QUADRANTS))) if d["counts"] else None
    switch = [(h, f"{base}/histograms?hook={h}", h == hook) for h in HISTOGRAM_HOOKS]
    return {"data": body, "hook": hook, "plots": out, "density": density, "switch": switch, "base": base}


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, auto_reload=False)
    env.filters.update(show_token=show_token, fmt=fmt, pct=pct, freq_gate_pos=freq_gate_pos, address=address_of,
                       neuron_href=neuron_href)
    # gluscope.js reads the names and codes from <body>, written once in gluscope/schema.py, and the colours;
    # gluscope.css reads the colours from the same element's custom properties.
    names = {"hooks": HOOKS, "quadrants": QUADRANTS, "quadrant-signs": QUADRANT_SIGNS, "pos-rgb": POS_RGB,
             "neg-rgb": NEG_RGB}
    colours = f"--pos-rgb: {_POS}; --neg-rgb: {_NEG}"
    body_names = Markup("".join(f' data-{k}="{escape(orjson.dumps(v).decode())}"' for k, v in names.items())
                        + f' style="{colours}"')
    env.globals.update(HOOKS=HOOKS, QUADRANTS=QUADRANTS, QUADRANT_SLUGS=QUADRANT_SLUGS, GEOMETRY=GEOMETRY,
                       GEOMETRY_LABELS=GEOMETRY_LABELS, GATE_POS_COUNT=GATE_POS_COUNT, zip=zip,
                       body_names=body_names)
    return env


templates = Jinja2Templates(env=_env())


# One colour per compared neuron, apart from the quadrant hues.
OVERLAY_COLOURS = ("#1d232a", "#e377c2", "#17becf", "#8c564b")


def overlay_svg(overlay: dict[str, Any], names: list[str], width: int = 720, height: int = 190) -> Markup:
    """The compared neurons' histograms of one (quadrant, value) overlaid as step lines: each neuron's share
    of its quadrant's tokens per bin, so that neurons whose quadrant is rare compare by shape."""
    counts, edges = overlay["counts"], overlay["edges"]
    n = len(edges) - 1
    shares = [[c / sum(row) for c in row] if sum(row) else [0.0] * n for row in counts]
    top = max((max(s) for s in shares if s), default=0.0) or 1.0
    left, right, bottom, up = 44, 8, 34, 8
    base, dx = height - bottom, (width - left - right) / max(n, 1)

    def y(v: float) -> str:
        return f"{base - v / top * (base - up):.1f}"

    out = [f'<svg class="overlay" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{escape(overlay["hook"])} in {escape(overlay["quadrant"])}, per neuron">',
           f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#999"/>',
           f'<text x="{left - 4}" y="{up + 8}" text-anchor="end" font-size="10">{100 * top:.0f}%</text>',
           f'<text x="{left - 4}" y="{base}" text-anchor="end" font-size="10">0</text>']
    for j in sorted({0, n // 2, n}):
        label = "−∞" if edges[j] is None and j == 0 else "∞" if edges[j] is None else f"{edges[j]:.3g}"
        out.append(f'<text x="{left + j * dx:.1f}" y="{base + 13}" text-anchor="middle" font-size="10">{label}</text>')
    for k, row in enumerate(shares):
        colour = OVERLAY_COLOURS[k % len(OVERLAY_COLOURS)]
        d = f"M{left},{base}" + "".join(f" V{y(v)} H{left + (j + 1) * dx:.1f}" for j, v in enumerate(row)) + f" V{base}"
        out.append(f'<path class="series" d="{d}" fill="none" stroke="{colour}" stroke-width="1.6">'
                   f'<title>{escape(names[k])}</title></path>')
        out.append(f'<text x="{left + 8 + 90 * k}" y="{height - 4}" font-size="11" fill="{colour}">'
                   f'■ {escape(names[k])}</text>')
    out.append("</svg>")
    return Markup("".join(out))
