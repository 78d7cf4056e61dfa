"""GLUScope: per-quadrant statistics of gated MLP neurons, recorded into DuckDB and browsed over HTTP."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gluscope.api import Recording

__version__ = "0.1.0"


def open(path: str | os.PathLike) -> Recording:
    """A recording opened read-only for reading from Python (docs/python-api.md): gluscope.api.Recording.

    pandas and the server are imported here, not with the package: the command line imports it too.
    """
    from gluscope.api import open_recording

    return open_recording(path)
