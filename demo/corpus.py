"""The demo corpus: Python's own standard library, present on every machine without downloads.

Files are listed in a fixed order (sorted relative paths) and split into a
training part and a held-out part by a hash of the relative path, so the
split is the same on every machine and every Python 3.11.x patch release,
and a file never moves between the parts because another file appeared or
disappeared. `demo/train_demo_model.py` trains on the training part only;
the demo records on the held-out part (`write_demo_corpus`).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterator

# Folder names anywhere in a path that take a file out of the corpus: test
# suites, the IDLE GUI, installed third-party packages, the dead 2to3 tool,
# generated code tables and bundled data, build configuration.
EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "lib2to3",
    "turtledemo", "encodings", "pydoc_data", "ensurepip", "__phello__", "__pycache__",
})
HELDOUT_BUCKETS = 10  # one file in ten (by path hash) is held out
MAX_CHARS = 4000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    return any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1])


def list_stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the stdlib's Python sources in the corpus, sorted."""
    root = stdlib_root() if root is None else Path(root)
    paths = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not _excluded(rel) and path.is_file():
            paths.append(rel.as_posix())
    return sorted(paths)


def is_heldout(rel_path: str) -> bool:
    """Whether a file (by its relative POSIX path) belongs to the held-out part."""
    return hashlib.sha256(rel_path.encode()).digest()[0] % HELDOUT_BUCKETS == 0


def split_files(root: Path | None = None) -> tuple[list[str], list[str]]:
    """(training files, held-out files), each sorted."""
    files = list_stdlib_files(root)
    return [f for f in files if not is_heldout(f)], [f for f in files if is_heldout(f)]


def read_source(rel_path: str, root: Path | None = None) -> str:
    root = stdlib_root() if root is None else Path(root)
    return (root / rel_path).read_text(encoding="utf-8", errors="replace")


def chunk_text(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Split `text` at line boundaries into pieces of at most `max_chars` characters.

    A single line longer than `max_chars` is cut into `max_chars` pieces.
    Whitespace-only pieces are dropped.
    """
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                chunks.append("".join(current))
                current, size = [], 0
            chunks.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and current:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append("".join(current))
    return [c for c in chunks if c.strip()]


def iter_documents(split: str = "heldout", max_files: int | None = None,
                   root: Path | None = None) -> Iterator[dict]:
    """{"text", "path"} records of one part ("train" or "heldout"), in file then chunk order."""
    train, heldout = split_files(root)
    files = {"train": train, "heldout": heldout}[split]
    if max_files is not None:
        files = files[:max_files]
    for rel in files:
        for chunk in chunk_text(read_source(rel, root)):
            yield {"text": chunk, "path": rel}


def write_demo_corpus(out_path: Path, max_files: int | None = None) -> Path:
    """Write the held-out stdlib files as JSONL ({"text": ..., "path": ...} per line); return the path.

    Long files are split at line boundaries into texts of at most 4000
    characters. The order is deterministic. `max_files` keeps only the first
    that many held-out files.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in iter_documents("heldout", max_files=max_files):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out_path)
    return out_path
