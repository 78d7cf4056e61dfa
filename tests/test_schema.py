"""The names both sides use (gluscope.schema) against the tables schema.sql creates, and what the server
refuses when it opens a file."""

from __future__ import annotations

import importlib.metadata

import duckdb
import numpy as np
import pytest

import gluscope
from gluscope.errors import UserError
from gluscope.schema import (ACT_FNS, COUNT_COLUMNS, GEOMETRY, HOOKS, POST_SIGNS, QUADRANT_SIGNS, QUADRANT_SLUGS,
                             QUADRANTS, WEIGHT_KINDS, schema_sql)
from gluscope.server.app import create_app
from gluscope.server.db import REQUIRED_TABLES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def empty():
    con = duckdb.connect(":memory:")
    con.execute(schema_sql())
    yield con
    con.close()


def test_code_tables_hold_the_names_the_code_uses(empty):
    quadrants = empty.execute("SELECT quadrant, label, slug, gate_sign, in_sign FROM quadrants ORDER BY quadrant").fetchall()
    assert quadrants == [(q, QUADRANTS[q], QUADRANT_SLUGS[q], *QUADRANT_SIGNS[q]) for q in range(len(QUADRANTS))]
    assert empty.execute("SELECT hook, name FROM hooks ORDER BY hook").fetchall() == list(enumerate(HOOKS))
    assert empty.execute("SELECT kind, name FROM weight_kinds ORDER BY kind").fetchall() == list(enumerate(WEIGHT_KINDS))
    # hook_post = act(x_gate) * x_in: positive exactly where x_gate and x_in agree in sign.
    assert [q for q, s in enumerate(POST_SIGNS) if s > 0] == [QUADRANTS.index("gate+_in+"), QUADRANTS.index("gate-_in-")]


def test_neuron_columns_are_the_counts_the_flip_and_the_geometry(empty):
    columns = [row[0] for row in empty.execute("DESCRIBE neurons").fetchall()]
    assert columns == ["layer", "neuron", *COUNT_COLUMNS, "flipped", *GEOMETRY]


def altered_copy(recorded_db, tmp_path, sql: str):
    """A copy of the recorded database with `sql` run on it."""
    copy = tmp_path / "altered.duckdb"
    copy.write_bytes(recorded_db.read_bytes())
    with duckdb.connect(str(copy)) as con:
        con.execute(sql)
    return copy


def test_the_server_requires_every_table_of_the_schema(empty, recorded_db, tmp_path):
    tables = {t for (t,) in empty.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert REQUIRED_TABLES == tables and "weight_kinds" in REQUIRED_TABLES
    with pytest.raises(UserError, match="no table weight_kinds"):
        create_app([altered_copy(recorded_db, tmp_path, "DROP TABLE weight_kinds")])


def test_an_unknown_activation_is_refused_when_the_file_is_opened(recorded_db, tmp_path):
    with pytest.raises(UserError, match="act_fn 'relu' is not an activation GLUScope computes"):
        create_app([altered_copy(recorded_db, tmp_path, "UPDATE metadata SET act_fn = 'relu'")])


def test_the_recorder_accepts_exactly_the_activations_the_server_computes():
    from transformers.activations import ACT2FN

    from gluscope.recorder.model import activation_function

    for name in sorted(set(ACT2FN) | set(ACT_FNS)):
        if name in ACT_FNS:
            activation_function(name)
        else:
            with pytest.raises(UserError):
                activation_function(name)


@pytest.mark.parametrize("name", sorted(ACT_FNS))
def test_the_servers_activation_is_the_models(name):
    """On every finite float16 x_gate (what a window stores), NumPy's act equals torch's to float32 rounding."""
    import torch

    from gluscope.recorder.model import activation_function
    from gluscope.server.activations import activation

    bits = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    x = bits.view(np.float16)
    x = x[np.isfinite(x)]
    with np.errstate(over="ignore"):  # exp(-x) of the most negative x: silu is then -0, as in torch
        ours = activation(name)(x.astype(np.float64)).astype(np.float32)
    theirs = activation_function(name)(torch.from_numpy(x.astype(np.float64))).to(torch.float32).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-7, atol=1e-12)  # gelu_tanh cancels where x << 0


def test_the_version_has_one_source(client):
    assert importlib.metadata.version("gluscope") == gluscope.__version__
    assert client.get("/openapi.json").json()["info"]["version"] == gluscope.__version__


def test_the_example_token_keys_count_the_sources_gluscope_schema_names():
    """schema.sql's key macros take EXAMPLE_SOURCES list sources: each hook's top list, then the sampled kinds."""
    from gluscope.schema import EXAMPLE_KINDS, EXAMPLE_SOURCES, SAMPLE_SOURCE

    con = duckdb.connect(":memory:")
    con.execute(schema_sql())
    n_layers, d_mlp = 2, 3
    for source in range(EXAMPLE_SOURCES):  # the last list of the last neuron: the largest key's list
        con.execute("INSERT INTO example_tokens VALUES (example_token_key(5, 1, example_list(1, 2, 3, $source, "
                    "$d_mlp), $n_layers, $d_mlp), 1, 0)", {"source": source, "n_layers": n_layers, "d_mlp": d_mlp})
    rows = con.execute("SELECT token_id, role, layer, neuron, quadrant, hook, kind FROM "
                       "example_token_rows(0, 9223372036854775807, $n_layers, $d_mlp) ORDER BY key",
                       {"n_layers": n_layers, "d_mlp": d_mlp}).fetchall()
    assert [(t, r, l, n, q) for t, r, l, n, q, _, _ in rows] == [(5, 1, 1, 2, 3)] * EXAMPLE_SOURCES
    # Each hook's top list, then the sampled kinds (samples.kind + 1 in EXAMPLE_KINDS), whose hook reads 0.
    assert [(h, EXAMPLE_KINDS[k]) for *_, h, k in rows] == [
        (s, "top") if s < SAMPLE_SOURCE else (0, EXAMPLE_KINDS[1 + s - SAMPLE_SOURCE]) for s in range(EXAMPLE_SOURCES)]


def test_a_models_body_shows_columns_of_the_metadata_table(empty):
    """data.MODEL_FIELDS, derived from responses.ModelInfo, names columns schema.sql's metadata has."""
    from gluscope.server.data import MODEL_FIELDS

    columns = [row[0] for row in empty.execute("DESCRIBE metadata").fetchall()]
    assert MODEL_FIELDS and set(MODEL_FIELDS) <= set(columns)
