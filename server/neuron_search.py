"""Searching for neurons: by token (from the weights or from the examples, with the search box's
suggestions), and by connection (related neurons).

Each function returns the JSON-ready dict of one view, as data.py does.
What the recorder precomputed for this (schema.sql: token_neurons,
example_tokens, related) makes every answer one or a few range lookups.
"""

from __future__ import annotations

import bisect
import weakref
from typing import Any

from gluscope.schema import (EXAMPLE_KINDS, EXAMPLE_ROLES, HOOKS, QUADRANT_SLUGS, QUADRANTS, RELATED_DIRECTIONS,
                             RELATED_VIA, WEIGHT_KINDS)
from gluscope.server import queries
from gluscope.server.data import _num
from gluscope.server.db import Database, Vocabulary
from gluscope.server.errors import ParameterError
from gluscope.server.validate import (check_choice, check_index, check_neuron, hook_code, parse_layer_range,
                                      quadrant_code)

SIDES = ("weights", "examples")
SEARCH_LIMIT = 100   # results per search
SUGGEST_LIMIT = 50   # vocabulary entries per suggestion list
TOKEN_TEXT_MAX = 200  # characters of token= (no vocabulary entry is longer in practice)


# --- the vocabulary, looked up by text ---------------------------------------

def loose_key(text: str) -> str:
    """What `loose=true` compares: the text without one leading space, case-folded."""
    return (text[1:] if text.startswith(" ") else text).casefold()


class VocabularyIndex:
    """A vocabulary's entries by decoded text, exactly and loosely, and its loose keys sorted for prefixes.

    Built once per process and vocabulary on first use (its cost: see docs/performance.md).
    """

    def __init__(self, vocab: Vocabulary) -> None:
        self.exact: dict[str, list[int]] = {}
        self.loose: dict[str, list[int]] = {}
        for i, token in enumerate(vocab.tokens):
            self.exact.setdefault(token, []).append(i)
            self.loose.setdefault(loose_key(token), []).append(i)
        self.sorted_keys = sorted(self.loose)

    def find(self, text: str, loose: bool) -> list[int]:
        return sorted(self.loose.get(loose_key(text), [])) if loose else self.exact.get(text, [])

    def with_prefix(self, prefix: str) -> list[int]:
        """Every id whose loose key starts with the loose key of `prefix`."""
        key = loose_key(prefix)
        lo = bisect.bisect_left(self.sorted_keys, key)
        hi = bisect.bisect_left(self.sorted_keys, key + "\U0010ffff")
        return [i for k in self.sorted_keys[lo:hi] for i in self.loose[k]]


_INDEXES: "weakref.WeakKeyDictionary[Vocabulary, VocabularyIndex]" = weakref.WeakKeyDictionary()


def vocabulary_index(vocab: Vocabulary) -> VocabularyIndex:
    index = _INDEXES.get(vocab)
    if index is None:
        index = _INDEXES[vocab] = VocabularyIndex(vocab)
    return index


def resolve_tokens(db: Database, token_id: int | None, token: str | None, loose: bool) -> list[int]:
    """The token ids a search is about: token_id, and the entries whose text equals `token`, each once.

    Given both, both are searched, as a loose text searches all its entries: neither is a mistake, and the
    schema cannot make them exclusive.
    """
    ids = [] if token_id is None else [check_index("token_id", token_id, len(db.vocab))]
    if token is None:
        return ids
    if token == "":
        raise ParameterError(422, "token", "token is empty: give the text of a vocabulary entry, e.g. ' the'", None)
    if len(token) > TOKEN_TEXT_MAX:
        raise ParameterError(422, "token", f"token is {len(token)} characters long; at most {TOKEN_TEXT_MAX}", None)
    found = vocabulary_index(db.vocab).find(token, loose)
    if not found:
        how = "ignoring a leading space and case" if loose else "exactly (loose=true ignores a leading space and case)"
        shown = token if len(token) <= 40 else token[:40] + "…"
        raise ParameterError(404, "token", f"no vocabulary entry decodes to {shown!r} {how}", None)
    return list(dict.fromkeys(ids + found))


def check_limit(limit: int, most: int) -> int:
    if not 1 <= limit <= most:
        raise ParameterError(422, "limit", f"limit {limit} is outside 1..{most}", f"1..{most}")
    return limit


def _blank(value: str | None) -> str | None:
    """An empty form field (a select's "any") is no filter."""
    return None if value is None or value == "" else value


# --- search by token ---------------------------------------------------------

def token_search_data(db: Database, token_id: int | None = None, token: str | None = None, loose: bool = False,
                      side: str = "weights", kind: str | None = None, role: str = "focus",
                      quadrant: str | None = None, hook: str | None = None, layers: str | None = None,
                      limit: int = 20) -> dict[str, Any]:
    """The neurons of a token: from the weights (token_neurons) or from the recorded examples (example_tokens).

    No token at all is an empty search (the page then shows only its form).
    """
    check_choice("side", side, SIDES)
    check_limit(limit, SEARCH_LIMIT)
    kind, quadrant, hook, layers = _blank(kind), _blank(quadrant), _blank(hook), _blank(layers)
    lo, hi = parse_layer_range(layers, db)
    ids = resolve_tokens(db, token_id, token, loose)
    query: dict[str, Any] = {"model": db.id, "side": side, "token_id": token_id, "token": token, "loose": loose,
                             "layers": None if layers is None else f"{lo}-{hi}", "limit": limit}
    # Every parameter is checked whichever side it applies to: a typo never passes unnoticed.
    if kind is not None:
        check_choice("kind", kind, (*WEIGHT_KINDS, *EXAMPLE_KINDS))
    check_choice("role", role, EXAMPLE_ROLES)
    q = None if quadrant is None else quadrant_code(quadrant)
    h = None if hook is None else hook_code(hook)
    # A kind of the other side does not apply: this side's default does, and the body's `kind` says which ran
    # (a form switching side may keep the kind, and the schema cannot tie kind to side).
    if side == "weights":
        kind = kind if kind in WEIGHT_KINDS else WEIGHT_KINDS[0]
        query.update(kind=kind, role=None, quadrant=None, hook=None)
        results = _weight_hits(db, ids, WEIGHT_KINDS.index(kind), lo, hi, limit)
    else:
        kind = kind if kind in EXAMPLE_KINDS else None
        query.update(kind=kind, role=role, quadrant=None if q is None else QUADRANT_SLUGS[q],
                     hook=None if h is None else HOOKS[h])
        results = _example_hits(db, ids, EXAMPLE_ROLES.index(role), q, h,
                                None if kind is None else EXAMPLE_KINDS.index(kind), lo, hi, limit)
    tokens = [{"token_id": i, "token": db.vocab.token(i)} for i in ids]
    return {**query, "tokens": tokens, "results": results}


def _weight_hits(db: Database, ids: list[int], kind: int, lo: int, hi: int, limit: int) -> list[dict[str, Any]]:
    """Most extreme first: largest score for the + kinds, smallest for the - kinds; a neuron once, at its best token."""
    sign = 1.0 if kind % 2 == 0 else -1.0
    rows = []
    for token_id in ids:
        rows += db.query(queries.TOKEN_NEURONS, {"token_id": token_id, "kind": kind, "lo": lo, "hi": hi})
    rows.sort(key=lambda r: (-sign * r[3], r[1], r[2]))
    seen: set[tuple[int, int]] = set()
    hits = []
    for token_id, layer, neuron, score in rows:
        if (layer, neuron) in seen:
            continue
        seen.add((layer, neuron))
        hits.append({"layer": layer, "neuron": neuron, **db.experts.ref(layer, neuron), "token_id": token_id,
                     "token": db.vocab.token(token_id), "score": _num(score)})
        if len(hits) == limit:
            break
    return hits


def _example_hits(db: Database, ids: list[int], role: int, quadrant: int | None, hook: int | None,
                  kind: int | None, lo: int, hi: int, limit: int) -> list[dict[str, Any]]:
    if not ids:
        return []
    params: dict[str, Any] = {"role": role, "lo": lo, "hi": hi, "quadrant": quadrant, "hook": hook, "kind": kind,
                              "limit": limit, "n_layers": db.n_layers, "d_mlp": db.d_mlp}
    params.update({f"t{i}": t for i, t in enumerate(ids)})
    rows = db.query(queries.example_tokens_search(len(ids)), params)
    return [{"layer": layer, "neuron": neuron, **db.experts.ref(layer, neuron), "quadrant": QUADRANTS[q],
             "slug": QUADRANT_SLUGS[q],
             "hook": HOOKS[h], "kind": EXAMPLE_KINDS[k], "matches": matches, "best_rank": best_rank,
             "best_value": _num(value)}
            for (layer, neuron, q, h, k, matches, best_rank), value in zip(rows, _best_values(db, rows))]


def _best_values(db: Database, rows: list[tuple]) -> list[float | None]:
    """The value of each hit's first matching example: the index holds none (schema.sql, example_tokens).

    A top list's first example is its extreme, which the server keeps in memory; any other is read from
    examples or samples, one lookup each.
    """
    values: list[float | None] = [None] * len(rows)
    read: list[tuple[int, int]] = []
    params: dict[str, Any] = {}
    for i, (layer, neuron, q, h, k, _matches, best_rank) in enumerate(rows):
        if k == 0 and best_rank == 0:
            values[i] = db.top_example_value(layer, neuron, q, h)
        else:
            j = len(read)
            read.append((i, k))
            params.update({f"l{j}": layer, f"n{j}": neuron, f"q{j}": q, f"r{j}": best_rank})
            if k == 0:
                params[f"h{j}"] = h
            if k == 2:  # DuckDB refuses a parameter the statement does not use
                params["n_per_interval"] = int(db.meta["n_per_interval"])
    if read:
        for j, value in db.query(queries.example_values_sql([k for _, k in read]), params):
            values[read[j][0]] = value
    return values


def suggestions_data(db: Database, q: str, limit: int = 12) -> dict[str, Any]:
    """Vocabulary entries for a search box: exact text first, then loose matches of the whole text, then
    entries starting with it (ignoring a leading space and case), shortest first."""
    check_limit(limit, SUGGEST_LIMIT)
    if len(q) > TOKEN_TEXT_MAX:
        raise ParameterError(422, "token", f"token is {len(q)} characters long; at most {TOKEN_TEXT_MAX}", None)
    found: list[int] = []
    if q != "":  # a box being cleared: nothing to suggest
        index = vocabulary_index(db.vocab)
        tokens = db.vocab.tokens
        candidates = index.with_prefix(q)
        candidates.sort(key=lambda i: (tokens[i] != q, loose_key(tokens[i]) != loose_key(q), len(tokens[i]), i))
        found = candidates[:limit]
    return {"model": db.id, "token": q, "suggestions": [{"token_id": i, "token": db.vocab.token(i)} for i in found]}


# --- related neurons -----------------------------------------------------------

def related_data(db: Database, layer: int, neuron: int) -> dict[str, Any]:
    """The neurons that read what this one writes (downstream) and that it reads (upstream), gate and in
    merged, by |score|: score(A -> B) = cos(w_out of A, g_B * w_via of B) (schema.sql, related)."""
    check_neuron(db, layer, neuron)
    lists: dict[str, list[dict[str, Any]]] = {d: [] for d in RELATED_DIRECTIONS}
    for direction, via, _rank, other_layer, other_neuron, score in db.query(
            queries.RELATED, {"layer": layer, "neuron": neuron}):
        lists[RELATED_DIRECTIONS[direction]].append(
            {"layer": other_layer, "neuron": other_neuron, **db.experts.ref(other_layer, other_neuron),
             "via": RELATED_VIA[via], "score": _num(score)})
    for rows in lists.values():
        rows.sort(key=lambda r: (-abs(r["score"] or 0.0), r["layer"], r["neuron"], r["via"]))
    return {"model": db.id, "layer": layer, "neuron": neuron, **db.experts.ref(layer, neuron), **lists}

