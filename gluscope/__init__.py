"""GLUScope: per-quadrant statistics of gated MLP neurons, recorded into DuckDB and browsed over HTTP."""

__version__ = "0.1.0"
