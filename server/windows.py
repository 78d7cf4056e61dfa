"""A neuron's examples and windows as read from the file, decoded from float16 bits, and kept per neuron.

One lookup (queries.NEURON_EXAMPLES) brings all 16 lists of a neuron and the
windows they point at, with its samples too when a sampled list asks first;
the neuron's other lists then come from memory (Database.examples, an LRU of
GLUSCOPE_EXAMPLE_CACHE neurons).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gluscope.server.activations import activation
from gluscope.server.db import Database

EXAMPLE_COLUMNS = ("quadrant", "hook", "rank", "value", "text_id", "position")  # position -1: not known (an import)
WINDOW_COLUMNS = ("text_id", "position", "window_start")
SAMPLE_COLUMNS = ("quadrant", "kind", "interval", "rank", "text_id", "position", "x_gate", "x_in", "act", "hook_post")


@dataclass
class NeuronExamples:
    """One neuron's 16 lists and the windows they point at, as NumPy columns read from the file."""

    examples: dict[str, np.ndarray]  # EXAMPLE_COLUMNS, ordered by (quadrant, hook, rank)
    windows: dict[str, np.ndarray]   # WINDOW_COLUMNS and each window's start and length in x_gate/x_in,
                                     # ordered by window_key
    x_gate: np.ndarray               # every window's float16 bits, one window after another (start, length)
    x_in: np.ndarray
    window_key: np.ndarray           # window_key(text_id, position) per window, ascending
    samples: dict[str, np.ndarray] | None = None  # SAMPLE_COLUMNS by (quadrant, kind, interval, rank), once read


def window_key(text_id: np.ndarray, position: np.ndarray) -> np.ndarray:
    return (text_id.astype(np.int64) << 16) | position.astype(np.int64)


def _take(columns: dict[str, np.ndarray], order: np.ndarray) -> dict[str, np.ndarray]:
    return {name: column[order] for name, column in columns.items()}


def neuron_examples(db: Database, layer: int, neuron: int, with_samples: bool = False) -> NeuronExamples:
    """All examples of a neuron (and its samples, with_samples), from the cache or from one lookup (sorted here,
    not by DuckDB)."""
    cached = db.examples.get((layer, neuron))
    if cached is not None:
        if with_samples and cached.samples is None:
            cached.samples = _samples(db.prepared_columns("neuron_samples", layer, neuron))
        return cached
    statement = "neuron_examples_and_samples" if with_samples else "neuron_examples"
    found = {name: np.ma.getdata(column) for name, column in db.prepared_columns(statement, layer, neuron).items()}
    part = found["part"]
    is_example = part == 0
    e = {name: found[name][is_example] for name in EXAMPLE_COLUMNS}
    examples = _take(e, np.lexsort((e["rank"], e["hook"], e["quadrant"])))
    # Window rows come one per token, each window's tokens together and in order (unnest).
    is_token = part == 1
    token_key = window_key(found["text_id"][is_token], found["position"][is_token])
    first = np.flatnonzero(np.r_[True, token_key[1:] != token_key[:-1]]) if len(token_key) else np.zeros(0, np.int64)
    key = token_key[first]
    order = np.argsort(key, kind="stable")
    if len(key) and (np.diff(key[order]) == 0).any():
        raise RuntimeError("DuckDB returned a window's tokens apart: the query's unnest order changed")
    w = {name: found[name][is_token][first] for name in WINDOW_COLUMNS}
    w["start"], w["length"] = first, np.diff(np.r_[first, len(token_key)])
    result = NeuronExamples(examples=examples, windows=_take(w, order), window_key=key[order],
                            x_gate=found["x_gate"][is_token].astype(np.int16),
                            x_in=found["x_in"][is_token].astype(np.int16),
                            samples=_samples({name: column[part == 2] for name, column in found.items()})
                            if with_samples else None)
    db.examples.put((layer, neuron), result)
    return result


def _samples(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SAMPLE_COLUMNS from rows of queries._SAMPLES_PART."""
    r = {name: np.ma.getdata(column) for name, column in rows.items()}
    act, x_in = r["value"].astype(np.float32), r["s_in"].astype(np.float32)
    s = {"quadrant": r["quadrant"], "kind": r["hook"], "interval": r["window_start"], "rank": r["rank"],
         "text_id": r["text_id"], "position": r["position"], "x_gate": r["s_gate"].astype(np.float32),
         "x_in": x_in, "act": act, "hook_post": act * x_in}  # float32, as the recorder computes it
    return _take({name: s[name] for name in SAMPLE_COLUMNS}, np.lexsort((s["rank"], s["interval"], s["kind"],
                                                                       s["quadrant"])))


def window_values(x_gate_bits: np.ndarray, x_in_bits: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                  act_fn: str) -> np.ndarray:
    """All four values per token of many windows, from their stored float16 bit patterns.

    The bits hold the windows' values one after another; window j is
    [starts[j], starts[j] + lengths[j]). Returns [windows, 4 (HOOKS order),
    longest window] float32, NaN past each window's end: a list's windows
    cost one NumPy pass, and the JSON body and both HTML renderings read the
    same numbers.
    """
    lengths = np.asarray(lengths, np.int64)
    width = int(lengths.max(initial=0))
    inside = np.arange(width) < lengths[:, None]
    at = np.where(inside, np.asarray(starts, np.int64)[:, None] + np.arange(width), 0)
    bits = np.zeros((2, len(lengths), width), np.int16)
    if len(x_gate_bits):
        bits[0] = np.where(inside, np.asarray(x_gate_bits, np.int16)[at], 0)
        bits[1] = np.where(inside, np.asarray(x_in_bits, np.int16)[at], 0)
    x_gate, x_in = bits.view(np.float16).astype(np.float64)
    with np.errstate(all="ignore"):
        act = activation(act_fn)(x_gate).astype(np.float32)
        post = (act.astype(np.float64) * x_in).astype(np.float32)
    values = np.stack([post, x_in.astype(np.float32), x_gate.astype(np.float32), act], axis=1)
    values[~np.broadcast_to(inside[:, None, :], values.shape)] = np.nan
    return values
