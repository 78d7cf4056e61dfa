"""The documentation against the code: every route, CLI option and table is documented, every relative link resolves.

Routes come from the app's one route table, options from the real argparse
parser, tables from schema.sql, so a new route, option or table fails here
until docs/ names it. Each failure says what is missing.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from gluscope.cli import build_parser
from gluscope.server.app import ROUTES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_BYTES = 12 * 1024
SCHEMA = ROOT / "gluscope" / "schema.sql"

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
# [text](target) and ![alt](target), one level of brackets inside the text, an optional "title".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")
CREATE_TABLE = re.compile(r"^\s*CREATE\s+(?:OR\s+REPLACE\s+)?(?:TEMP(?:ORARY)?\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?"
                          r"(\w+)", re.I | re.M)


def markdown_files() -> list[Path]:
    """README.md, CHANGELOG.md and docs/*.md: the files whose links must resolve."""
    return [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]


def docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")))


def prose(markdown: str) -> str:
    """The Markdown without its fenced code blocks (a `# comment` there is no heading, a `](x)` no link)."""
    return FENCE.sub("", markdown)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2 … as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for m in HEADING.finditer(prose(markdown)):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links and images of one Markdown file whose file, or heading, does not exist."""
    broken = []
    text = path.read_text(encoding="utf-8")
    for m in LINK.finditer(prose(text)):
        target = m.group(1)
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        shown = f"{path.relative_to(ROOT)}: ({target})"
        if not dest.exists():
            broken.append(f"{shown}: no file {file_part}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{shown}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return broken


def route_paths() -> list[str]:
    return [path for route in ROUTES for path in route.paths]


def undocumented_routes(text: str) -> list[str]:
    """Paths of the route table not written literally, in backticks, in the text."""
    return [path for path in route_paths() if f"`{path}`" not in text]


def cli_options() -> list[tuple[str, str]]:
    """(subcommand, --option) for every option of every subcommand of the real parser."""
    found = []

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{command} {name}".strip())
            else:
                found.extend((command, s) for s in action.option_strings if s.startswith("--") and s != "--help")

    walk(build_parser(), "")
    return found


def subcommands() -> list[str]:
    return [name for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]


def undocumented_options(text: str) -> list[str]:
    """`gluscope <command> --option` for each option not in the text as a whole word."""
    return [f"gluscope {command} {option}" for command, option in cli_options()
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)]


def undocumented_commands(text: str) -> list[str]:
    return [f"gluscope {name}" for name in subcommands() if f"gluscope {name}" not in text]


def schema_tables() -> list[str]:
    return CREATE_TABLE.findall(SCHEMA.read_text(encoding="utf-8"))


def undocumented_tables(text: str) -> list[str]:
    """Tables of schema.sql not written as `name` in the text."""
    return [name for name in schema_tables() if f"`{name}`" not in text]


def test_the_collections_are_not_empty():
    # A parser or regex that found nothing would let every check below pass.
    assert len(route_paths()) > 20 and "/api/models" in route_paths()
    assert ("record", "--model") in [(c.split()[-1], o) for c, o in cli_options()]
    assert {"dataset", "record", "merge", "serve", "demo"} <= set(subcommands())
    assert {"metadata", "neurons", "examples", "windows"} <= set(schema_tables())


def test_every_route_is_in_the_json_api_doc():
    missing = undocumented_routes((DOCS / "json-api.md").read_text(encoding="utf-8"))
    assert not missing, f"routes of server/app.py's ROUTES not written (in backticks) in docs/json-api.md: {missing}"


def test_every_cli_option_is_documented():
    text = docs_text()
    missing = undocumented_commands(text) + undocumented_options(text)
    assert not missing, f"commands or options of the gluscope CLI that docs/ never names: {missing}"


def test_every_table_is_in_the_database_doc():
    missing = undocumented_tables((DOCS / "database.md").read_text(encoding="utf-8"))
    assert not missing, f"tables of gluscope/schema.sql not written as `name` in docs/database.md: {missing}"


def test_every_relative_link_resolves():
    broken = [b for path in markdown_files() if path.exists() for b in broken_links(path)]
    assert not broken, "links that point nowhere:\n" + "\n".join(broken)


def test_the_readme_is_at_most_12_kb():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail into docs/"


def test_headings_name_concepts_not_issue_numbers():
    found = [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for path in markdown_files() if path.exists()
             for m in HEADING.finditer(prose(path.read_text(encoding="utf-8"))) if re.search(r"#\d", m.group(2))]
    assert not found, f"headings with an issue number (name the concept instead): {found}"


@pytest.mark.parametrize("heading, expected", [
    ("Long runs: shards, merge and several GPUs", "long-runs-shards-merge-and-several-gpus"),
    ("`gluscope serve [FILE…]`", "gluscope-serve-file"),
    ("The paper's set-up", "the-papers-set-up"),
    ("What a neuron_page shows", "what-a-neuron_page-shows"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected
