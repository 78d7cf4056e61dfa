"""A neuron, a list of its examples and its histograms as self-contained HTML, for Jupyter (gluscope/api.py).

The pages' own partials (templates/_*.html) render them, in the server's Jinja2
environment and from the same context functions (render.examples_context,
render.histograms_context), so the tokens' colours, their hover values (each
token's title) and the SVG are the pages'. What needs a server is then taken
out: links, form targets and htmx attributes lose their URLs, and the page's
stylesheet is inlined, scoped to the output so that it restyles nothing else
in the notebook. No script, no network.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import jinja2

from gluscope.server import render
from gluscope.server.data import ExampleList
from gluscope.server.db import Vocabulary

# The class of the element each output is wrapped in: the page's stylesheet applies inside it only.
SCOPE = "gluscope-notebook"

# What a notebook cannot use: the colour selector (a form that reloads the page; a list is coloured by the value
# given to Examples.html) and each example's full text (fetched by htmx). A link without its URL reads as text.
NOTEBOOK_CSS = (f".{SCOPE} .colour-form, .{SCOPE} details.fulltext {{ display: none; }}\n"
                f".{SCOPE} a:not([href]) {{ color: inherit; cursor: default; }}\n")

# What the page's stylesheet sets on the whole document, a notebook's output sets on its own element.
_DOCUMENT_SELECTORS = frozenset({":root", "html", "body"})
_RULE = re.compile(r"([^{}]+)\{([^{}]*)\}")
_COMMENT = re.compile(r"/\*.*?\*/", re.S)

# Attributes that name the server: links, form targets, htmx requests (and any src). The templates escape every
# quote inside an attribute's value (&#34;), so the next quote ends it.
_SERVER_ATTRIBUTES = re.compile(r'\s(?:href|src|action|hx-[\w-]+)="[^"]*"')

_TITLES = {
    "neuron": '<p><strong>Neuron <span class="ref">{{ data|address }}</span></strong> '
              '<span class="muted">of {{ info.model_name }}</span></p>',
    "examples": '<p><strong>Neuron <span class="ref">{{ data|address }}</span></strong> '
                '<span class="muted">{{ data.quadrant }} · {{ data.hook }} · {{ data.kind }}'
                '{% if data.interval is not none %} · interval {{ data.interval }}{% endif %}</span></p>',
    "histograms": '<p><strong>Neuron <span class="ref">{{ data|address }}</span></strong> '
                  '<span class="muted">distributions of {{ hook }}</span></p>',
}


def scoped_css(css: str, scope: str) -> str:
    """`css` with every rule restricted to the elements inside `scope` (a selector); rules for :root, html or
    body apply to the scope itself."""
    def rule(m: re.Match) -> str:
        selectors = (s.strip() for s in m.group(1).split(","))
        scoped = ", ".join(scope if s in _DOCUMENT_SELECTORS else f"{scope} {s}" for s in selectors)
        return f"{scoped} {{{m.group(2)}}}\n"
    return _RULE.sub(rule, _COMMENT.sub("", css))


@lru_cache(maxsize=1)
def stylesheet() -> str:
    """The pages' stylesheet (frontend/static/gluscope.css) scoped to SCOPE, and what a notebook adds."""
    return scoped_css((render.STATIC_DIR / "gluscope.css").read_text(encoding="utf-8"), f".{SCOPE}") + NOTEBOOK_CSS


def inert(html: str) -> str:
    """The markup without the attributes that would reach for a server."""
    return _SERVER_ATTRIBUTES.sub("", html)


def _render(name: str, context: dict[str, Any]) -> str:
    return render.templates.env.get_template(name).render(context)


@lru_cache(maxsize=None)
def _title_template(kind: str) -> jinja2.Template:
    return render.templates.env.from_string(_TITLES[kind])


def _title(kind: str, context: dict[str, Any]) -> str:
    return _title_template(kind).render(context)


def _output(body: str) -> str:
    """One output: the element the stylesheet is scoped to, with the names, codes and colours the page's <body>
    carries (render.py, body_names)."""
    names = render.templates.env.globals["body_names"]
    return f'<div class="{SCOPE}"{names}><style>{stylesheet()}</style>{inert(body)}</div>'


def neuron_html(body: dict[str, Any], info: dict[str, Any]) -> str:
    """A neuron's summary (data.neuron_data's body) as its page shows it: Figure 1 and the weight geometry."""
    context = {"data": body, "info": info}
    return _output(_title("neuron", context) + _render("_neuron_summary.html", context)
                   + _render("_neuron_weights.html", context))


def examples_html(found: ExampleList, vocab: Vocabulary, info: dict[str, Any], colour_by: str) -> str:
    """A list of examples as its page shows it, without JavaScript: every token coloured by `colour_by` on the
    list's scale, its four values in its title."""
    context = {"info": info, **render.examples_context(found, vocab, colour_by, compact=False)}
    return _output(_title("examples", context) + _render("_examples.html", context))


def histograms_html(body: dict[str, Any], hook: str) -> str:
    """A neuron's distributions (data.histograms_data's body) as its page draws them: the histograms of `hook`
    per quadrant, with the intervals of |hook_post|, and the joint density of (x_gate, x_in)."""
    context = render.histograms_context(body, hook, "")
    return _output(_title("histograms", context) + _render("_histograms.html", context))
