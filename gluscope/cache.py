"""Where GLUScope keeps what it builds once and reuses: the CPU kernel, converted GGUF models, the demo model."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$GLUSCOPE_CACHE`, else `$XDG_CACHE_HOME/gluscope`, else `~/.cache/gluscope`, joined with `parts` (created)."""
    root = os.environ.get("GLUSCOPE_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gluscope"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
