"""Finding neurons: token search on both sides and related neurons, against brute force.

The recorder's token_neurons and related tables, and the API answering from
them, are recomputed from the weights alone: the plain Hugging Face model's
matrices in float64, with NumPy, over every neuron and every token. The
activation-side search is recomputed from the examples and texts tables
with Python loops. The model has three layers and random pre-MLP norm
gains (Llama: the weight; Gemma: 1 + the weight), so a missing or doubled
gain changes the answer.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from starlette.testclient import TestClient
from transformers import AutoModelForCausalLM

from gluscope.schema import EXAMPLE_KINDS, EXAMPLE_ROLES, HOOKS, QUADRANT_SLUGS, QUADRANTS, RELATED_VIA, WEIGHT_KINDS
from gluscope.server.app import create_app

from . import recordings

pytestmark = pytest.mark.integration

N_LAYERS = 3
TIE = 1e-6


def perturbed(arch: str) -> tuple[Path, Path]:
    """(model folder, its recording) of a three-layer tiny model whose pre-MLP norms have random gains."""
    folder = recordings.model(arch, n_layers=N_LAYERS, perturb_norms=True)
    return folder, recordings.record(folder, recordings.corpus(), "--max-length", "40", "--batch-size", "4")


@pytest.fixture(scope="module")
def llama() -> tuple[Path, Path]:
    return perturbed("llama")


@pytest.fixture(scope="module")
def con(llama):
    c = duckdb.connect(str(llama[1]), read_only=True)
    yield c
    c.close()


@pytest.fixture(scope="module")
def api(llama):
    with TestClient(create_app([llama[1]]), raise_server_exceptions=False) as c:
        c.model_id = c.get("/api/models").json()["models"][0]["id"]
        yield c


# --- brute force from the weights alone --------------------------------------

def hf_weights(folder: Path, arch: str) -> dict:
    """Per layer (w_gate, w_in, w_out) [n, d] after the weight convention, the pre-MLP gain, and W_E, W_U [V, d]."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    layers = []
    for layer in model.model.layers:
        mlp = layer.mlp
        g, i, o = (w.detach().double().numpy() for w in (mlp.gate_proj.weight, mlp.up_proj.weight,
                                                         mlp.down_proj.weight.T))
        s = np.where((g * i).sum(1) < 0, -1.0, 1.0)[:, None]
        gamma = layer.post_attention_layernorm.weight.detach().double().numpy()
        gain = 1.0 + gamma if arch == "gemma" else gamma  # GemmaRMSNorm scales by (1 + weight)
        layers.append((g, s * i, s * o, gain))
    W_E = model.get_input_embeddings().weight.detach().double().numpy()
    W_U = model.get_output_embeddings().weight.detach().double().numpy()
    return {"layers": layers, "W_E": W_E, "W_U": W_U}


def token_products(w: dict) -> dict[int, np.ndarray]:
    """Per weight kind of the + side (0 out, 2 gate, 4 in): the [V, L * n] products, neurons numbered globally."""
    return {
        0: np.concatenate([w["W_U"] @ o.T for _, _, o, _ in w["layers"]], axis=1),
        2: np.concatenate([w["W_E"] @ g.T for g, _, _, _ in w["layers"]], axis=1),
        4: np.concatenate([w["W_E"] @ i.T for _, i, _, _ in w["layers"]], axis=1),
    }


def brute_token_neurons(w: dict, top: int = 32) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """(token, kind) -> [(global neuron id, score)] most extreme first, over every neuron of the model."""
    products = token_products(w)
    out = {}
    for kind, p in products.items():
        for side, sign in ((0, 1.0), (1, -1.0)):
            order = np.argsort(-sign * p, axis=1, kind="stable")[:, :top]
            for token in range(p.shape[0]):
                out[(token, kind + side)] = [(int(j), float(p[token, j])) for j in order[token]]
    return out


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def brute_related(w: dict, top: int = 16) -> dict[tuple[int, int, int, int], list[tuple[int, int, float]]]:
    """(layer, neuron, direction, via) -> [(other layer, other neuron, score)] by |score|."""
    layers = w["layers"]
    writes = [_unit(o) for _, _, o, _ in layers]
    reads = [(_unit(g * gain), _unit(i * gain)) for g, i, _, gain in layers]
    n = writes[0].shape[0]
    out = {}
    for la in range(len(layers)):
        for via in (0, 1):
            down = [(lb, writes[la] @ reads[lb][via].T) for lb in range(la + 1, len(layers))]
            up = [(lb, (writes[lb] @ reads[la][via].T).T) for lb in range(la)]
            for direction, blocks in ((0, down), (1, up)):
                if not blocks:
                    continue
                scores = np.concatenate([b for _, b in blocks], axis=1)            # [n, others]
                owner = np.concatenate([np.full(b.shape[1], lb) for lb, b in blocks])
                index = np.concatenate([np.arange(b.shape[1]) for _, b in blocks])
                order = np.argsort(-np.abs(scores), axis=1, kind="stable")[:, :top]
                for neuron in range(n):
                    out[(la, neuron, direction, via)] = [(int(owner[j]), int(index[j]), float(scores[neuron, j]))
                                                         for j in order[neuron]]
    return out


def assert_same_ranking(got: list[tuple], want: list[tuple], magnitude, where, true_score=None) -> None:
    """Same entries in the same order, up to the order among values equal within TIE; same values.

    Among tied values (the zero embedding row of the padding token ties every
    neuron) any entry with that value is right: true_score(entry) says what
    the brute force gives the entry the recorder chose.
    """
    assert len(got) == len(want), where
    np.testing.assert_allclose([g[-1] for g in got], [x[-1] for x in want], rtol=1e-5, atol=1e-6, err_msg=str(where))
    for rank, (g, x) in enumerate(zip(got, want)):
        tied = [y for y in want if abs(magnitude(y[-1]) - magnitude(x[-1])) <= TIE]
        if len(tied) == 1:
            assert g[:-1] == x[:-1], (where, rank)
        elif true_score is not None:
            assert true_score(g[:-1]) == pytest.approx(x[-1], rel=1e-5, abs=1e-6), (where, rank)
        else:
            assert g[:-1] in [y[:-1] for y in tied], (where, rank)
    assert len(set(g[:-1] for g in got)) == len(got), where


# --- the recorder's tables --------------------------------------------------------

def test_token_neurons_equal_brute_force(llama, con):
    folder, _ = llama
    w = hf_weights(folder, "llama")
    n = w["layers"][0][0].shape[0]
    want = brute_token_neurons(w)
    got = defaultdict(list)
    for token, kind, layer, neuron, score in con.execute(
            "SELECT token_id, kind, layer, neuron, score FROM token_neurons ORDER BY token_id, kind, rank").fetchall():
        got[(token, kind)].append((layer * n + neuron, score))
    assert set(got) == set(want) and len(want) == 6 * w["W_U"].shape[0]
    products = token_products(w)
    for (token, kind), rows in want.items():
        sign = 1.0 if kind % 2 == 0 else -1.0
        assert_same_ranking(got[(token, kind)], rows, lambda v: sign * v, (token, kind),
                            lambda entry: products[kind - kind % 2][token, entry[0]])
    # Every rank holds an entry, and rows come sorted by token (one range per token).
    ranks = con.execute("SELECT DISTINCT rank FROM token_neurons ORDER BY rank").fetchall()
    assert [r for (r,) in ranks] == list(range(32))


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_related_equal_brute_force(arch, llama):
    folder, db = llama if arch == "llama" else perturbed(arch)
    w = hf_weights(folder, arch)
    want = brute_related(w)
    c = duckdb.connect(str(db), read_only=True)
    got = defaultdict(list)
    for layer, neuron, direction, via, other_layer, other_neuron, score in c.execute(
            "SELECT layer, neuron, direction, via, other_layer, other_neuron, score FROM related "
            "ORDER BY layer, neuron, direction, via, rank").fetchall():
        got[(layer, neuron, direction, via)].append((other_layer, other_neuron, score))
    c.close()
    assert set(got) == set(want)
    for key, rows in want.items():
        assert_same_ranking(got[key], rows, abs, key)
    # The gains matter: the same cosines without them rank other neurons.
    no_gain = brute_related({**w, "layers": [(g, i, o, np.ones_like(gain)) for g, i, o, gain in w["layers"]]})
    assert any([r[:2] for r in no_gain[key]] != [r[:2] for r in got[key]] for key in no_gain)


def brute_example_search(con, token_ids: set[int], role: int) -> dict[tuple, tuple[int, int, float]]:
    """(layer, neuron, quadrant, hook, kind) -> (matches, best rank, its value), from examples and texts alone."""
    texts = dict(con.execute("SELECT text_id, token_ids FROM texts").fetchall())
    (n_per_interval,), = con.execute("SELECT n_per_interval FROM metadata").fetchall()
    lists: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for layer, neuron, q, h, rank, value, text_id, position in con.execute(
            "SELECT layer, neuron, quadrant, hook, rank, value, text_id, position FROM examples").fetchall():
        ids = texts[text_id]
        at = position + role
        if at < len(ids) and ids[at] in token_ids:
            lists[(layer, neuron, q, h, 0)].append((rank, value))
    # The sampled examples (kinds random, interval) are indexed under hook_post, with their hook_post value; an
    # interval list's place of an example counts the intervals before it as full.
    for layer, neuron, q, kind, interval, rank, act, x_in, text_id, position in con.execute(
            "SELECT layer, neuron, quadrant, kind, interval, rank, act, x_in, text_id, position FROM samples").fetchall():
        ids = texts[text_id]
        at = position + role
        if at < len(ids) and ids[at] in token_ids:
            lists[(layer, neuron, q, 0, 1 + kind)].append((interval * n_per_interval + rank,
                                                           float(np.float32(act) * np.float32(x_in))))
    return {key: (len(found), *min(found)) for key, found in lists.items()}


def _ranked(found: dict, limit: int) -> list[tuple]:
    """Most matches first, then the earliest first match, then top, random, interval, then by layer, neuron,
    quadrant and hook."""
    rows = sorted(found.items(), key=lambda kv: (-kv[1][0], kv[1][1], kv[0][4], kv[0][:4]))
    return [(*key, *value) for key, value in rows[:limit]]


def _frequent_tokens(con, role: int, count: int) -> list[int]:
    """Tokens that sit most often as the focus (role 0) or next token of an example: searches with many hits."""
    rows = con.execute(f"""SELECT t.token_ids[e.position + 1 + {role}] AS tok, count(*) AS c
                          FROM examples e JOIN texts t USING (text_id) WHERE tok IS NOT NULL
                          GROUP BY tok ORDER BY c DESC, tok LIMIT {count}""").fetchall()
    return [t for t, _ in rows]


def test_example_tokens_index_equals_brute_force(con):
    for role in (0, 1):
        for token in _frequent_tokens(con, role, 3):
            want = brute_example_search(con, {token}, role)
            got = {(l, n, q, h, k): (m, r) for l, n, q, h, k, m, r in con.execute(
                "SELECT layer, neuron, quadrant, hook, kind, matches, best_rank FROM example_token_lists "
                "WHERE token_id = ? AND role = ?", [token, role]).fetchall()}
            assert got == {key: found[:2] for key, found in want.items()} and want, (token, role)


def test_example_token_keys_follow_the_documented_formula(con):
    """example_tokens.key against schema.sql's formula, written out here, and the view's decoding of it."""
    (n_layers, d_mlp), = con.execute("SELECT n_layers, d_mlp FROM metadata").fetchall()
    keys = [key for (key,) in con.execute("SELECT key FROM example_tokens").fetchall()]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    decoded = con.execute("SELECT key, token_id, role, layer, neuron, quadrant, hook, kind FROM example_token_lists "
                          "USING SAMPLE 500 ROWS (reservoir, 1)").fetchall()
    assert len(decoded) == 500
    for key, token_id, role, layer, neuron, quadrant, hook, kind in decoded:
        source = hook if kind == 0 else 3 + kind
        assert key == (((token_id * 2 + role) * n_layers + layer) * d_mlp + neuron) * 24 + quadrant * 6 + source


def test_each_top_lists_first_example_holds_its_extreme(con):
    """What the search's values rely on (server/db.py, top_example_value): rank 0's value is value_stats' extreme."""
    rows = con.execute("SELECT e.value, s.min, s.max FROM examples e JOIN value_stats s "
                       "USING (layer, neuron, quadrant, hook) WHERE e.rank = 0").fetchall()
    assert rows and all(value == (hi if abs(hi) >= abs(lo) else lo) for value, lo, hi in rows)


# --- the API -----------------------------------------------------------------

def test_weight_search_equals_brute_force(api, llama, con):
    folder, _ = llama
    w = hf_weights(folder, "llama")
    n = w["layers"][0][0].shape[0]
    want = brute_token_neurons(w)
    products = token_products(w)
    for token in (2, 3, 100, 250):
        for k, kind in enumerate(WEIGHT_KINDS):
            body = api.get(f"/api/models/{api.model_id}/search/tokens",
                           params={"token_id": token, "side": "weights", "kind": kind, "limit": 32}).json()
            assert body["tokens"] == [{"token_id": token, "token": body["tokens"][0]["token"]}]
            got = [(r["layer"] * n + r["neuron"], r["score"]) for r in body["results"]]
            sign = 1.0 if k % 2 == 0 else -1.0
            assert_same_ranking(got, want[(token, k)], lambda v: sign * v, (token, kind),
                                lambda entry: products[k - k % 2][token, entry[0]])
            # A layer range filters the whole model's top 32.
            body = api.get(f"/api/models/{api.model_id}/search/tokens",
                           params={"token_id": token, "kind": kind, "limit": 32, "layers": "1-2"}).json()
            assert [(r["layer"] * n + r["neuron"]) for r in body["results"]] == \
                   [g for g, _ in got if g >= n], (token, kind)


def test_examples_search_equals_brute_force(api, con):
    m = api.model_id
    for role, name in enumerate(EXAMPLE_ROLES):
        for token in _frequent_tokens(con, role, 2):
            found = brute_example_search(con, {token}, role)
            body = api.get(f"/api/models/{m}/search/tokens",
                           params={"token_id": token, "side": "examples", "role": name, "limit": 100}).json()
            got = [(r["layer"], r["neuron"], QUADRANTS.index(r["quadrant"]), HOOKS.index(r["hook"]),
                    EXAMPLE_KINDS.index(r["kind"]), r["matches"], r["best_rank"], r["best_value"])
                   for r in body["results"]]
            want = _ranked(found, 100)
            assert [g[:7] for g in got] == [x[:7] for x in want], (token, name)
            np.testing.assert_allclose([g[7] for g in got], [x[7] for x in want], rtol=1e-6)
            # Both ways to a value: a top list's first example (from memory), and any other (from the file).
            first = [g[4] == 0 and g[6] == 0 for g in got]
            assert any(first) and not all(first), (token, name)
            assert all(r["slug"] == QUADRANT_SLUGS[QUADRANTS.index(r["quadrant"])] for r in body["results"])
            # Filters: a quadrant, a value and a layer range.
            body = api.get(f"/api/models/{m}/search/tokens",
                           params={"token_id": token, "side": "examples", "role": name, "quadrant": "nn",
                                   "hook": "hook_post", "layers": "1-2", "kind": "top", "limit": 5}).json()
            filtered = {k: v for k, v in found.items() if k[2] == 3 and k[3] == 0 and k[4] == 0 and 1 <= k[0] <= 2}
            assert [(r["layer"], r["neuron"], r["matches"]) for r in body["results"]] == \
                   [(x[0], x[1], x[5]) for x in _ranked(filtered, 5)], (token, name)


def test_token_text_finds_vocabulary_entries_exactly_or_loosely(api, con):
    m = api.model_id
    vocab = [t for (t,) in con.execute("SELECT token FROM vocab ORDER BY token_id").fetchall()]
    word = next(t for t in vocab if t.startswith(" ") and t[1:].isalpha() and len(t) > 3)
    exact = api.get(f"/api/models/{m}/search/tokens", params={"token": word}).json()
    assert [t["token_id"] for t in exact["tokens"]] == [vocab.index(word)]
    loose_ids = {i for i, t in enumerate(vocab) if (t[1:] if t.startswith(" ") else t).casefold() == word[1:].casefold()}
    loose = api.get(f"/api/models/{m}/search/tokens",
                    params={"token": word[1:].upper(), "loose": "true", "side": "examples"}).json()
    assert {t["token_id"] for t in loose["tokens"]} == loose_ids and vocab.index(word) in loose_ids
    # Several entries: the matches of each add up.
    found = brute_example_search(con, loose_ids, 0)
    assert [(r["layer"], r["neuron"], r["matches"]) for r in loose["results"]] == \
           [(x[0], x[1], x[5]) for x in _ranked(found, 20)]
    # The weight side with several entries: each neuron once, at its most extreme score.
    body = api.get(f"/api/models/{m}/search/tokens", params={"token": word[1:], "loose": "true", "kind": "in-"}).json()
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores) and len({(r["layer"], r["neuron"]) for r in body["results"]}) == len(scores)


def test_suggestions_start_with_the_text(api, con):
    m = api.model_id
    body = api.get(f"/api/models/{m}/search/suggest", params={"token": "th", "limit": 50}).json()
    vocab = [t for (t,) in con.execute("SELECT token FROM vocab ORDER BY token_id").fetchall()]
    want = {i for i, t in enumerate(vocab) if (t[1:] if t.startswith(" ") else t).casefold().startswith("th")}
    assert {s["token_id"] for s in body["suggestions"]} == want and want
    assert all(s["token"] == vocab[s["token_id"]] for s in body["suggestions"])
    # Entries equal to the text (ignoring a leading space and case) first, then the shortest.
    same = [(s["token"][1:] if s["token"].startswith(" ") else s["token"]).casefold() == "th"
            for s in body["suggestions"]]
    assert same == sorted(same, reverse=True)
    lengths = [len(s["token"]) for s, equal in zip(body["suggestions"], same) if not equal]
    assert lengths == sorted(lengths)
    assert api.get(f"/api/models/{m}/search/suggest", params={"token": ""}).json()["suggestions"] == []
    fragment = api.get(f"/models/{m}/search/suggest", params={"token": "th"}, headers={"HX-Request": "true"})
    assert fragment.text.lstrip().startswith("<ul") and f"/models/{m}/search?token_id=" in fragment.text


def test_related_endpoint_equals_the_table(api, con):
    m = api.model_id
    for layer, neuron in ((0, 0), (1, 50), (2, 95)):
        body = api.get(f"/api/models/{m}/neurons/{layer}/{neuron}/related").json()
        rows = con.execute("SELECT direction, via, other_layer, other_neuron, score FROM related "
                           "WHERE layer = ? AND neuron = ?", [layer, neuron]).fetchall()
        for d, direction in enumerate(("downstream", "upstream")):
            want = sorted(((r[2], r[3], RELATED_VIA[r[1]], r[4]) for r in rows if r[0] == d),
                          key=lambda r: (-abs(r[3]), r[0], r[1], r[2]))
            got = [(r["layer"], r["neuron"], r["via"], r["score"]) for r in body[direction]]
            assert [g[:3] for g in got] == [x[:3] for x in want]
            np.testing.assert_allclose([g[3] for g in got], [x[3] for x in want], rtol=1e-6)
        assert (len(body["downstream"]) > 0) == (layer < N_LAYERS - 1)
        assert (len(body["upstream"]) > 0) == (layer > 0)


def test_related_between_for_the_compare_page(api, con, llama):
    from gluscope.server import queries
    from gluscope.server.db import open_database

    db = open_database(llama[1], neuron_table=False)
    (a_layer, a_neuron, b_layer, b_neuron, score), = con.execute(
        "SELECT layer, neuron, other_layer, other_neuron, score FROM related "
        "WHERE direction = 0 AND via = 1 AND rank = 0 AND layer = 0 AND neuron = 5").fetchall()
    rows = queries.related_between(db, [(a_layer, a_neuron), (b_layer, b_neuron), (2, 7)])
    assert {"layer": a_layer, "neuron": a_neuron, "direction": "downstream", "via": "in", "other_layer": b_layer,
            "other_neuron": b_neuron, "score": pytest.approx(score)} in rows
    assert all((r["other_layer"], r["other_neuron"]) in {(a_layer, a_neuron), (b_layer, b_neuron), (2, 7)}
               for r in rows)
    assert queries.related_between(db, [(0, 5)]) == []
    db.con.close()


def test_pages_link_search_results_to_neurons(api, con):
    m = api.model_id
    page = api.get(f"/models/{m}/search", params={"token_id": 100, "kind": "out-"})
    assert page.status_code == 200 and 'id="search-weights"' in page.text
    first = api.get(f"/api/models/{m}/search/tokens", params={"token_id": 100, "kind": "out-"}).json()["results"][0]
    assert f'href="/models/{m}/neurons/{first["layer"]}/{first["neuron"]}"' in page.text
    assert page.headers["link"].startswith(f"</models/{m}/search.json?")
    token = _frequent_tokens(con, 0, 1)[0]
    page = api.get(f"/models/{m}/search", params={"token_id": token, "side": "examples"})
    assert "/examples?quadrant=" in page.text
    # Every page of a model has the search box, a plain form; the neuron page loads its related neurons.
    neuron = api.get(f"/models/{m}/neurons/1/3").text
    assert f'action="/models/{m}/search"' in neuron and f'hx-get="/models/{m}/neurons/1/3/related"' in neuron
    fragment = api.get(f"/models/{m}/neurons/1/3/related", headers={"HX-Request": "true"}).text
    assert fragment.lstrip().startswith('<div class="related">') and f'href="/models/{m}/neurons/0/' in fragment
    # The search box submits without JavaScript: token text, loosely.
    plain = api.get(f"/models/{m}/search", params={"token": "THE", "loose": "true"})
    assert plain.status_code in (200, 404)


BAD = [
    ({"token": ""}, 422, "token"),
    ({"token": "no-such-token-here"}, 404, "token"),
    ({"token_id": 10 ** 6}, 404, "token_id"),
    ({"token_id": -1}, 404, "token_id"),
    ({"token_id": "abc"}, 422, "token_id"),
    ({"token_id": 3, "layers": "0-3"}, 404, "layers"),
    ({"token_id": 3, "layers": "one"}, 422, "layers"),
    ({"token_id": 3, "kind": "best"}, 422, "kind"),
    ({"token_id": 3, "side": "examples", "role": "after"}, 422, "role"),
    ({"token_id": 3, "side": "examples", "quadrant": "xx"}, 422, "quadrant"),
    ({"token_id": 3, "side": "examples", "hook": "hook_mid"}, 422, "hook"),
    ({"token_id": 3, "side": "both"}, 422, "side"),
    ({"token_id": 3, "limit": 0}, 422, "limit"),
    ({"token_id": 3, "limit": 101}, 422, "limit"),
    ({"token": "x" * 201}, 422, "token"),
]


@pytest.mark.parametrize("params,status,parameter", BAD, ids=[str(b[0])[:50] for b in BAD])
def test_bad_search_input_gets_the_one_error_shape(api, params, status, parameter):
    r = api.get(f"/api/models/{api.model_id}/search/tokens", params=params)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["status"], error["parameter"]) == (status, parameter) and error["message"]
    page = api.get(f"/models/{api.model_id}/search", params=params)
    assert page.status_code == status and "text/html" in page.headers["content-type"]


def test_what_no_schema_can_refuse_is_read_as_meant(api):
    """Parameters OpenAPI cannot relate (tests/test_openapi.py): a range typed backwards is the same range, a
    kind of the other side gives way to this side's default, token_id and token are both searched."""
    url = f"/api/models/{api.model_id}/search/tokens"

    def get(**params) -> dict:
        r = api.get(url, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    backwards = get(token_id=3, layers="2-1")
    assert backwards == get(token_id=3, layers="1-2") and backwards["layers"] == "1-2"
    assert get(token_id=3, kind="top") == get(token_id=3, kind="out+") == get(token_id=3)
    assert get(token_id=3, side="examples", kind="out+") == get(token_id=3, side="examples")
    # Both: one search over all their entries, each neuron at its best score (out+: largest first).
    text = get(token_id=5)["tokens"][0]["token"]
    by_id, by_text = get(token_id=3, limit=100), get(token=text, limit=100)
    both = get(token_id=3, token=text, limit=100)
    assert both["tokens"] == by_id["tokens"] + [t for t in by_text["tokens"] if t not in by_id["tokens"]]
    best: dict[tuple[int, int], dict] = {}
    for hit in by_id["results"] + by_text["results"]:
        key = (hit["layer"], hit["neuron"])
        if key not in best or hit["score"] > best[key]["score"]:
            best[key] = hit
    expected = sorted(best.values(), key=lambda h: (-h["score"], h["layer"], h["neuron"]))[:100]
    assert [(h["layer"], h["neuron"], h["score"]) for h in both["results"]] == \
        [(h["layer"], h["neuron"], h["score"]) for h in expected]


@pytest.mark.parametrize("url,status,parameter", [
    ("/search/suggest?token=th&limit=0", 422, "limit"),
    ("/search/suggest?limit=3", 422, "token"),
    ("/neurons/3/0/related", 404, "layer"),
    ("/neurons/0/96/related", 404, "neuron"),
    ("/neurons/0/x/related", 422, "neuron"),
])
def test_bad_suggest_and_related_input(api, url, status, parameter):
    r = api.get(f"/api/models/{api.model_id}{url}")
    assert r.status_code == status and r.json()["error"]["parameter"] == parameter, r.text


def test_token_neurons_running_top_equals_one_topk_over_all_blocks():
    """Many blocks merged into the running tops (the tiny model has three per kind): the result equals one
    topk over every neuron at once."""
    from gluscope.recorder.token_tops import TokenNeurons

    generator = torch.Generator().manual_seed(3)
    blocks = [torch.randn(64, 300, generator=generator, dtype=torch.float64).float() for _ in range(40)]
    blocks[30][:, 7] += 100.0  # one token whose every neuron of a late block enters its top
    tn = TokenNeurons(300)
    update = tn.reducer(2, 0)
    for i, block in enumerate(blocks):
        update(i * 64, block)
    everything = torch.cat(blocks)
    for side, largest in ((2, True), (3, False)):
        want = everything.topk(32, dim=0, largest=largest)
        layer, neuron, score = tn.result(d_mlp=64 * 40)
        np.testing.assert_array_equal(score[side], want.values.T.numpy())
        # Each kept neuron holds its score (exact ties, which this sample has, may come in either order).
        held = everything.numpy()[neuron[side], np.arange(300)[:, None]]
        np.testing.assert_array_equal(held, score[side])
        assert (neuron[side] == want.indices.T.numpy()).mean() > 0.99


def test_weight_stage_without_the_kernel_keeps_the_same_tops(llama, monkeypatch):
    """torch's path (a GPU's, or a CPU's without a compiler) keeps what the compiled running tops keep."""
    from gluscope.recorder import related as related_module
    from gluscope.recorder import token_tops
    from gluscope.recorder.model import load_model
    from gluscope.recorder.related import related_neurons
    from gluscope.recorder.token_tops import TokenNeurons
    from gluscope.recorder.weights import layer_weights

    model = load_model(str(llama[0]), device="cpu", dtype="float32")

    def tops():
        token_neurons = TokenNeurons(model.token_count())
        weights = layer_weights(model, True, token_neurons=token_neurons)
        return token_neurons.result(model.d_mlp), related_neurons(model, [w.sign for w in weights])

    (layer, neuron, score), related = tops()
    monkeypatch.setattr(token_tops, "column_tops", lambda *args: False)
    monkeypatch.setattr(related_module, "abs_tops", lambda *args: False)
    (t_layer, t_neuron, t_score), t_related = tops()
    # Equal scores may be kept in another order or, at the last place, by another neuron (the padding token's
    # zero embedding ties every neuron); the scores themselves are the same.
    np.testing.assert_array_equal(score, t_score)
    assert ((layer == t_layer) & (neuron == t_neuron)).mean() > 0.9
    np.testing.assert_array_equal(np.abs(related.score), np.abs(t_related.score))
    assert ((related.other_layer == t_related.other_layer) & (related.other_neuron == t_related.other_neuron)).mean() > 0.99
