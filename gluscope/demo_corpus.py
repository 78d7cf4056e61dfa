"""The demo's corpus: real prose and real code that every machine running GLUScope already has offline.

- **Prose, documentation:** the Python Language Reference, as the standard
  library ships it for `help()` (`pydoc_data/topics.py`).
- **Code:** the sources of Python's standard library (tests left out).

Both come with the Python installation itself, so the corpus depends only on
the Python version (not on which packages happen to be installed), and nobody
here wrote any of it. Each source is cut into passages of about
`PASSAGE_CHARS` characters at blank lines, so that a text is a readable
unit rather than a file's licence header. The pool holds as many prose
passages as code passages, and each passage keeps where it came from
(`source`), which the pages show beside every example.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path
from typing import Iterator

PASSAGE_CHARS = 700
PER_KIND = 500  # passages of prose and of code in the pool; the recording takes a shuffled prefix


def passages(text: str, size: int = PASSAGE_CHARS) -> Iterator[tuple[int, str]]:
    """(first line number, passage) pieces of `text`, cut at blank lines, each about `size` characters."""
    lines = text.splitlines(keepends=True)
    start, buf, n = 1, [], 0
    for i, line in enumerate(lines, 1):
        if not buf:
            if not line.strip():
                continue  # a passage starts at its first non-blank line, which `source` names
            start = i
        buf.append(line)
        n += len(line)
        if n >= size and not line.strip():
            yield start, "".join(buf).strip("\n")
            buf, n = [], 0
    if "".join(buf).strip():
        yield start, "".join(buf).strip("\n")


def documentation() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for line, text in passages(topics[name]):
            yield f"Python Language Reference, topic {name!r} (pydoc_data/topics.py), line {line}", text


def stdlib_code() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for line, text in passages(source):
            yield f"Lib/{rel.as_posix()}:{line}", text


def build(out: Path, seed: int = 0, per_kind: int = PER_KIND) -> Path:
    """Write the pool as JSON lines {"text", "source", "kind"} to `out` (atomically); return it."""
    rng = random.Random(seed)
    prose = [p for p in documentation() if len(p[1]) >= 200]
    code = [p for p in stdlib_code() if len(p[1]) >= 200]
    chosen = [("prose", p) for p in rng.sample(prose, min(per_kind, len(prose)))]
    chosen += [("code", p) for p in rng.sample(code, min(per_kind, len(code)))]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for kind, (source, text) in chosen:
            f.write(json.dumps({"text": text, "source": source, "kind": kind}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out
