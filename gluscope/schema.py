"""Names and codes shared by the recorder and the server; the tables themselves are in schema.sql."""

from importlib import resources

SCHEMA_VERSION = 2  # 2: model_source, weights_file, weights_sha256, quantization; texts.source

# Code order is the column order of the paper's Figure 1.
QUADRANTS: tuple[str, ...] = ("gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-")
QUADRANT_SLUGS: tuple[str, ...] = ("pp", "pn", "np", "nn")
HOOKS: tuple[str, ...] = ("hook_post", "hook_pre_linear", "hook_pre", "act")


def schema_sql() -> str:
    """The DDL that creates an empty GLUScope database."""
    return resources.files("gluscope").joinpath("schema.sql").read_text()
