"""Choosing the response (JSON, htmx fragment or full page) and the helpers templates use.

Views hand over one dict of data; `respond` decides once how to send it.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.templating import Jinja2Templates

from gluscope.schema import HOOKS, QUADRANT_SLUGS, QUADRANTS

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
POS_RGB, NEG_RGB = (214, 39, 40), (31, 119, 180)  # red above zero, blue below, white at zero


class JSONResponse(Response):
    """JSON without NaN (data functions already map it to null), UTF-8, compact."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


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


def respond(request: Request, data: dict[str, Any], page: str, fragment: str | None = None,
            context: dict[str, Any] | None = None, status: int = 200) -> Response:
    """JSON for the API, .json twins and Accept: application/json; the fragment for htmx; else the page."""
    if wants_json(request):
        return JSONResponse(data, status_code=status, headers={"Vary": "Accept"})
    name = fragment if fragment and is_fragment_request(request) else page
    headers = {"Vary": "HX-Request, Accept", **SECURITY_HEADERS}
    if name == page:
        headers["Link"] = f'<{json_url(request)}>; rel="alternate"; type="application/json"'
    return templates.TemplateResponse(request=request, name=name, context={"data": data, **(context or {})},
                                      status_code=status, headers=headers)


def error_page(request: Request, body: dict[str, Any]) -> HTMLResponse:
    err = body["error"]
    return templates.TemplateResponse(request=request, name="error.html", context={"error": err},
                                      status_code=err["status"], headers=SECURITY_HEADERS)


# --- template helpers -------------------------------------------------------

@lru_cache(maxsize=65536)
def show_token(token: str) -> Markup:
    """Escaped token text with whitespace made visible (· space, ⏎ newline, → tab)."""
    out = []
    for ch in token:
        mark = WHITESPACE_MARKS.get(ch)
        out.append(f'<span class="ws">{mark}</span>' if mark else str(escape(ch)))
    return Markup("".join(out)) if token else Markup('<span class="ws">∅</span>')


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def colour(value: float | None, scale: float) -> str:
    """Background on one diverging scale for a whole section (same formula as gluscope.js)."""
    if value is None or not math.isfinite(value) or scale <= 0 or value == 0:
        return ""
    a = min(abs(value) / scale, 1.0) * 0.85
    if a < 0.005:
        return ""
    r, g, b = POS_RGB if value > 0 else NEG_RGB
    return f"background:rgba({r},{g},{b},{a:.3f})"


def token_quadrant(x_gate: float | None, x_in: float | None) -> int | None:
    if not x_gate or not x_in:
        return None
    return (0 if x_gate > 0 else 2) + (0 if x_in > 0 else 1)


def section_scales(data: dict[str, Any]) -> dict[str, float]:
    """max |value| over every token of every window of a section, per value."""
    scales = {}
    for hook in HOOKS:
        m = 0.0
        for ex in data["examples"]:
            for v in ex["activations"][hook]:
                if v is not None and abs(v) > m:
                    m = abs(v)
        scales[hook] = m
    return scales


def snippet(ex: dict[str, Any], quadrant: str, colour_by: str, scale: float) -> Markup:
    """One example's window as focusable token spans.

    Built here rather than in a template loop: a section has 16 × 27 tokens,
    and this is the hot path of the examples fragment.
    """
    q_code = QUADRANTS.index(quadrant)
    acts = ex["activations"]
    cols = [acts[h] for h in HOOKS]
    gate, inn = acts["hook_pre"], acts["hook_pre_linear"]
    focus = ex["position"] - ex["window_start"]
    parts = []
    for i, tok in enumerate(ex["tokens"]):
        tq = token_quadrant(gate[i], inn[i])
        cls = "t" if tq == q_code else "t oq"
        if i == focus:
            cls += " focus"
        values = "&#10;".join(f"{h} {fmt(c[i])}" for h, c in zip(HOOKS, cols))
        quad = QUADRANTS[tq] if tq is not None else "no quadrant"
        title = f"position {ex['window_start'] + i} · {quad}&#10;{values}"
        style = colour(acts[colour_by][i], scale)
        parts.append(f'<span class="{cls}" tabindex="0" title="{title}"'
                     f'{f" style={chr(34)}{style}{chr(34)}" if style else ""}>{show_token(tok)}</span>')
    return Markup("".join(parts))


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, auto_reload=False)
    env.filters.update(show_token=show_token, fmt=fmt, pct=pct)
    env.globals.update(HOOKS=HOOKS, QUADRANTS=QUADRANTS, QUADRANT_SLUGS=QUADRANT_SLUGS, zip=zip,
                       snippet=snippet, section_scales=section_scales, colour=colour)
    return env


templates = Jinja2Templates(env=_env())
