"""Reading a recording from Python: the server's data as pandas DataFrames, and neurons that show themselves in
Jupyter.

    import gluscope
    db = gluscope.open("olmo-7b.duckdb")
    table = db.neurons(layer=20)            # one row per neuron, ready for groupby and corr
    n = db.neuron(20, 117)                  # a mixture-of-experts layer: db.neuron(3, 6, 61), address 3.6.61
    n.examples("gate-_in+", "hook_post")    # in a notebook, coloured as on the page; .frame is the DataFrame

The file is opened as the server opens it (server/db.py), and every call runs
the server's own data functions (server/data.py, neuron_search.py,
filter_compare.py), then only reshapes what they return: the pages, their JSON
and these DataFrames cannot disagree. Quadrants are named `gate+_in+` ...
(a slug such as `pp` is accepted too), values `hook_post`, `hook_pre_linear`,
`hook_pre` and `act`; NaN stands where the JSON has null. Everything a user
can get wrong raises a one-line gluscope.errors.UserError: DatabaseFileError
for the file, ArgumentError (with the JSON API's message) for an argument.
docs/python-api.md lists every call and its columns.
"""

from __future__ import annotations

import functools
import operator
import os
from pathlib import Path
from typing import Any, Callable, ParamSpec, TypeVar

import numpy as np

try:
    import pandas as pd
except ImportError as e:  # pandas is an optional dependency: the server and the recorder do without it
    raise ImportError("gluscope's Python API needs pandas: pip install 'gluscope[notebook]'") from e
from pydantic import BaseModel

from gluscope import notebook_html
from gluscope.errors import UserError
from gluscope.schema import EXAMPLE_KINDS, GEOMETRY, HISTOGRAM_HOOKS, HOOKS, QUADRANT_SLUGS, QUADRANTS, WEIGHT_KINDS
from gluscope.server import data, responses
from gluscope.server.db import COUNT_NOT_KNOWN, NO_ROW, Database, DatabaseFileError, NeuronTable, open_databases
from gluscope.server.errors import ParameterError
from gluscope.server.experts import address_of
from gluscope.server.filter_compare import check_filter_expert, stored_neuron_summaries
from gluscope.server.neuron_search import related_data, token_search_data
from gluscope.server.validate import check_choice, check_expert, check_index, neuron_index

__all__ = ["ArgumentError", "DatabaseFileError", "Examples", "Histograms", "Neuron", "Recording", "open_recording"]

STATS = ("min", "max", "mean")
# What a file with experts adds to a neuron's `layer` and `neuron` (its flat index within the layer).
ADDRESS_COLUMNS = tuple(responses.ADDRESS_FIELDS)

P = ParamSpec("P")
R = TypeVar("R")


class ArgumentError(UserError, ValueError):
    """An argument the recording has no answer for (a layer or neuron out of range, an unknown quadrant, value or
    kind): the message is the one the JSON API sends for it."""

    def __init__(self, message: str, parameter: str | None = None, valid: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.valid = valid


def _user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """fn, raising the server's ParameterError as an ArgumentError: a Python caller gets no HTTP status."""
    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ParameterError as e:
            raise ArgumentError(e.message, e.parameter, e.valid) from None
    return call


def open_recording(path: str | os.PathLike) -> Recording:
    """The recording at `path`, opened read-only with the server's checks (DatabaseFileError if it is not one
    the server would serve)."""
    path = Path(path)
    if not path.exists():
        raise DatabaseFileError(f"{path} does not exist")
    if not path.is_file():
        raise DatabaseFileError(f"{path} is not a file")
    (db,) = open_databases([path], neuron_table=False).values()
    return Recording(db)


def _frame(rows: list[dict[str, Any]], body: type[BaseModel], moe: bool, first: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows of a JSON body's list as a DataFrame with the fields its model declares (responses.py): `first`, then
    the neuron's key and, in a file with experts, its address; no quadrant slug, which the label says."""
    fields = [*first, *(f for f in body.model_fields if f not in ADDRESS_COLUMNS and f != "slug")]
    key = [f for f in ("layer", "neuron") if f in fields]
    columns = key + (list(ADDRESS_COLUMNS) if moe and key else []) + [f for f in fields if f not in key]
    return _nullable_experts(pd.DataFrame(rows, columns=columns))


def _nullable_experts(frame: pd.DataFrame) -> pd.DataFrame:
    """A dense neuron has no expert: integers with missing values, not floats."""
    for name in ("expert", "expert_neuron"):
        if name in frame:
            frame[name] = frame[name].astype("Int64")
    return frame


def _frequencies(by_slug: dict[str, float | None]) -> dict[str, float | None]:
    return {f"{label} frequency": by_slug[slug] for slug, label in zip(QUADRANT_SLUGS, QUADRANTS)}


def _low(edge: float | None) -> float:
    return -np.inf if edge is None else edge


def _high(edge: float | None) -> float:
    return np.inf if edge is None else edge


def _layer_range(layers: int | tuple[int, int] | str | None) -> str | None:
    """A layer, (first, last) or the server's 'A-B' as the text the server parses (validate.parse_layer_range)."""
    if layers is None or isinstance(layers, str):
        return layers
    if isinstance(layers, tuple):
        first, last = layers
        return f"{operator.index(first)}-{operator.index(last)}"
    return str(operator.index(layers))


class Recording:
    """One recorded model, opened read-only: its metadata, its layers and neurons as DataFrames, one neuron at a
    time (`neuron`), and search by token. Use as a context manager, or call close()."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def path(self) -> Path:
        return self._db.path

    @property
    def id(self) -> str:
        """The model's id, as the server's URLs and JSON name it."""
        return self._db.id

    def __repr__(self) -> str:
        m = self._db.meta
        return (f"<gluscope.Recording {self.id}: {m['n_layers']} layers × {m['d_mlp']} neurons, "
                f"{m['n_tokens']:,} tokens, {self.path}>")

    def close(self) -> None:
        self._db.con.close()

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def metadata(self) -> pd.Series:
        """What was recorded, and how: the metadata table as the API's model body has it (data.model_info)."""
        return pd.Series(data.model_info(self._db), name=self.id)

    def layers(self) -> pd.DataFrame:
        """One row per layer, as the model page shows them (data.model_data): the mean frequency of each quadrant
        over its neurons, the share of flipped neurons and the paper's §5.1 correlation; a file with experts adds
        each layer's router."""
        rows = [{"layer": row["layer"], "n_neurons": row["n_neurons"], **_frequencies(row["frequency"]),
                 **{k: v for k, v in row.items() if k not in ("layer", "n_neurons", "frequency")}}
                for row in data.model_data(self._db)["layers"]]
        return pd.DataFrame(rows)

    @_user_errors
    def neurons(self, layer: int | None = None, expert: int | None = None) -> pd.DataFrame:
        """One row per neuron of `layer` (default: every layer): each quadrant's count and frequency, each
        quadrant's min, max and mean of each value, the flip and the weight geometry, as the neuron page shows
        them. expert: only that expert's neurons (a file with experts), of `layer` or of every layer that has it."""
        db = self._db
        layers = range(db.n_layers) if layer is None else [check_index("layer", operator.index(layer), db.n_layers)]
        if expert is not None:
            expert = operator.index(expert)
            if layer is None:
                check_filter_expert(db, expert, 0, db.n_layers - 1)
                layers = [x for x in layers if expert < len(db.experts.layers[x].experts)]
            else:
                check_expert(db, layers[0], expert)
        table = self._neuron_table()
        frames = [pd.DataFrame(_neuron_columns(db, table, x, _expert_neurons(db, x, expert))) for x in layers]
        return _nullable_experts(pd.concat(frames, ignore_index=True))

    def _neuron_table(self) -> NeuronTable:
        """What the server's HTTP process loads at startup (db.NeuronTable), loaded on first use."""
        db = self._db
        if db.neurons is None:
            db.neurons = NeuronTable.load(db.con, db.n_layers, db.d_mlp, int(db.meta["n_tokens"]), db.experts.any,
                                        db.stated)
        return db.neurons

    @_user_errors
    def neuron(self, layer: int, *address: int) -> Neuron:
        """One neuron, by its address as the server's URLs give it: neuron(L, N) in a dense layer, neuron(L, E, I)
        for neuron I of expert E in a mixture-of-experts layer (a bare index there is refused with its address)."""
        if len(address) not in (1, 2):
            raise TypeError("neuron(layer, neuron) or, in a mixture-of-experts layer, neuron(layer, expert, index)")
        parts = [operator.index(a) for a in address]
        layer = operator.index(layer)
        segment = parts[0] if len(parts) == 1 else f"{parts[0]}.{parts[1]}"
        return Neuron(self._db, layer, neuron_index(self._db, layer, segment))

    @_user_errors
    def search(self, token: str | None = None, *, token_id: int | None = None, loose: bool = False,
               side: str = "weights", kind: str | None = None, role: str = "focus", quadrant: str | None = None,
               hook: str | None = None, layers: int | tuple[int, int] | str | None = None,
               limit: int = 20) -> pd.DataFrame:
        """The neurons of a token (the search page, neuron_search.token_search_data): side="weights", whose
        weights promote, suppress or read it most (kind out+, out-, gate+, gate-, in+, in-; default out+);
        side="examples", whose recorded lists hold it (role focus or next; kind, quadrant, hook narrow them).
        token is a vocabulary entry's text (loose: ignoring a leading space and case), token_id its id;
        layers one layer, (first, last) or 'A-B'."""
        if token is None and token_id is None:
            raise ArgumentError("search for a token (its text) or a token_id", "token")
        body = token_search_data(self._db, token_id, token, loose, side, kind, role, quadrant, hook,
                                 _layer_range(layers), limit)
        hit = responses.WeightHit if body["side"] == "weights" else responses.ExampleHit
        return _frame(body["results"], hit, self._db.experts.any)


def _expert_neurons(db: Database, layer: int, expert: int | None) -> slice:
    if expert is None:
        return slice(None)
    e = db.experts.layers[layer].experts[expert]
    return slice(e.first_neuron, e.first_neuron + e.n_neurons)


def _neuron_columns(db: Database, table: NeuronTable, layer: int, which: slice) -> dict[str, Any]:
    """The columns of Recording.neurons for the neurons `which` of `layer`, from the server's NeuronTable: its
    frequencies are the neuron page's (queries.frequency: over each neuron's counted tokens, or an import's stated
    ones where its counts are not known, which are then <NA>)."""
    index = np.arange(db.experts.width(layer))[which]
    index = index[table.counts[layer, index, 0] != NO_ROW]  # never written: no row (its page is a 404)
    columns: dict[str, Any] = {"layer": np.full(len(index), layer, np.int64), "neuron": index}
    if db.experts.any:
        refs = [db.experts.ref(layer, n) for n in index.tolist()]
        columns.update({name: [r[name] for r in refs] for name in ADDRESS_COLUMNS})
        n_tokens = int(db.meta["n_tokens"])
        columns["counted_tokens"] = np.array([db.experts.tokens(layer, n, n_tokens) for n in index.tolist()],
                                             np.int64)
    counts = table.counts[layer, index]
    unknown = counts == COUNT_NOT_KNOWN
    for q, label in enumerate(QUADRANTS):
        columns[f"{label} count"] = pd.arrays.IntegerArray(counts[:, q], unknown[:, q]) if unknown.any() \
            else counts[:, q]
        columns[f"{label} frequency"] = table.frequency[layer, index, q]
    for q, label in enumerate(QUADRANTS):
        for h, hook in enumerate(HOOKS):
            for stat, values in zip(STATS, (table.stat_min, table.stat_max, table.stat_mean)):
                columns[f"{label} {hook} {stat}"] = values[layer, index, q, h]
        if table.routed is not None:  # NaN for a dense neuron
            for stat, values in zip(STATS, table.routed):
                columns[f"{label} routed {stat}"] = values[layer, index, q]
    columns["flipped"] = table.flipped[layer, index]
    for name in GEOMETRY:
        columns[name] = table.geometry[name][layer, index]
    return columns


class Neuron:
    """One neuron: its summary, examples, histograms, weight tokens and related neurons. In Jupyter it shows
    its Figure 1 and weight geometry as its page does."""

    def __init__(self, db: Database, layer: int, neuron: int) -> None:
        self._db = db
        self.layer = layer
        self.neuron = neuron  # the flat index within the layer, as the JSON's `neuron`
        self.address = db.experts.address(layer, neuron)
        self._body: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<gluscope.Neuron {self.address} of {self._db.id}>"

    def _summary_body(self) -> dict[str, Any]:
        """The neuron page's body (responses.NeuronSummary), read as the server's reader processes read it."""
        if self._body is None:
            (self._body,) = stored_neuron_summaries(self._db, [(self.layer, self.neuron)])
        return self._body

    @_user_errors
    def summary(self) -> pd.DataFrame:
        """Figure 1 of the paper, one row per quadrant: count, frequency (over the counted tokens: an expert
        neuron's, those routed to its expert), and each value's min, max and mean; an expert neuron adds
        router weight × hook_post (`routed ...`)."""
        rows = {}
        for q in self._summary_body()["quadrants"]:
            row = {"count": q["count"], "frequency": q["frequency"]}
            row.update({f"{hook} {stat}": q["stats"][hook][stat] for hook in HOOKS for stat in STATS})
            if q.get("routed"):
                row.update({f"routed {stat}": q["routed"][stat] for stat in STATS})
            rows[q["quadrant"]] = row
        return pd.DataFrame.from_dict(rows, orient="index").rename_axis("quadrant")

    @_user_errors
    def weights(self) -> pd.Series:
        """Whether the weight convention flipped the neuron, and its weight geometry (cosines and norms)."""
        return pd.Series(self._summary_body()["weights"], name=self.address)

    @_user_errors
    def examples(self, quadrant: str, hook: str = "hook_post", kind: str = "top",
                 interval: int | None = None) -> Examples:
        """One list of examples (data.read_example_list): kind="top", the top-k of (quadrant, hook) by |value|;
        "random", tokens drawn uniformly from the quadrant; "interval", drawn from each interval of |hook_post|
        (interval: just that one, 0 typical .. 3 extreme)."""
        found = data.read_example_list(self._db, self.layer, self.neuron, quadrant, hook, kind, interval)
        return Examples(self._db, found)

    @_user_errors
    def histograms(self, hook: str = "hook_post") -> Histograms:
        """How the neuron's values are spread (data.histograms_data): the histograms of `hook` per quadrant, the
        joint density of (x_gate, x_in) and the intervals of |hook_post|."""
        check_choice("hook", hook, HISTOGRAM_HOOKS)
        return Histograms(data.histograms_data(self._db, self.layer, self.neuron), hook)

    @_user_errors
    def tokens(self) -> pd.DataFrame:
        """The tokens the weights point at (data.weight_tokens_data), most extreme first within each kind: out+
        and out- (w_out · W_U: promoted where hook_post > 0, in gate+_in+ and gate-_in-, suppressed elsewhere),
        gate+, gate-, in+, in- (W_E · w_gate, W_E · w_in: the inputs they read)."""
        body = data.weight_tokens_data(self._db, self.layer, self.neuron)
        rows = [{"kind": kind, "rank": rank, **token} for kind in WEIGHT_KINDS
                for rank, token in enumerate(body["tokens"][kind])]
        return _frame(rows, responses.WeightToken, False, first=("kind", "rank"))

    @_user_errors
    def related(self) -> pd.DataFrame:
        """Neurons connected along the direct residual path (neuron_search.related_data): downstream, those that
        read what this one writes, and upstream, those it reads, each by |score|."""
        body = related_data(self._db, self.layer, self.neuron)
        rows = [{"direction": direction, **r} for direction in ("downstream", "upstream") for r in body[direction]]
        return _frame(rows, responses.RelatedNeuron, self._db.experts.any, first=("direction",))

    @_user_errors
    def _repr_html_(self) -> str:
        return notebook_html.neuron_html(self._summary_body(), data.model_info(self._db))


class Examples:
    """One list of a neuron's examples: `frame` holds them, one row each, and in Jupyter they show as on the
    page, coloured by the list's value (html() colours by another)."""

    def __init__(self, db: Database, found: data.ExampleList) -> None:
        self._db = db
        self._found = found
        self.quadrant = QUADRANTS[found.quadrant]
        self.hook = HOOKS[found.hook]
        self.kind = EXAMPLE_KINDS[found.kind]
        self.interval = found.selected
        self.frame = _examples_frame(db, found)

    def __len__(self) -> int:
        return len(self._found)

    def __repr__(self) -> str:
        return (f"<gluscope.Examples {self._db.experts.address(self._found.layer, self._found.neuron)} "
                f"{self.quadrant} {self.hook} {self.kind}: {len(self)} examples>")

    @_user_errors
    def html(self, colour: str | None = None) -> str:
        """The list as self-contained HTML, its tokens coloured by `colour` (a value; default the list's own)."""
        return notebook_html.examples_html(self._found, self._db.vocab, data.model_info(self._db),
                                           self._found.colour(colour))

    def _repr_html_(self) -> str:
        return self.html()


def _examples_frame(db: Database, found: data.ExampleList) -> pd.DataFrame:
    """One row per example: where it is, the value, the text (data.whole_texts), the token of interest, and its
    window (decoded, as tokens, and each value at each of its tokens: NaN past the text or, for an expert neuron,
    at a token not routed to its expert). An example whose position is not known (an import's, at text level)
    has no token and no window: position, window_start, token and window are missing (the two integer columns
    then nullable), its window's tokens and values empty."""
    located = found.position >= 0
    frame = pd.DataFrame({"rank": found.rank.astype(np.int64), "value": found.value.astype(np.float64),
                          "text_id": found.text_id, "source_index": found.source_index, "source": found.source,
                          "position": _where_known(found.position, located)})
    if found.interval is not None:
        frame["interval"] = found.interval.astype(np.int64)
        frame["interval_lo"] = [found.bounds[i][0] for i in found.interval.tolist()]
        frame["interval_hi"] = [_high(found.bounds[i][1]) for i in found.interval.tolist()]
    whole = data.whole_texts(db, found.text_id)
    texts = [whole[t] for t in found.text_id.tolist()]
    windows = [ids.tolist() for ids in found.token_ids]
    frame["text"] = texts
    frame["token"] = [db.vocab.token(int(db.texts.token_ids(t)[p])) if known else None
                      for t, p, known in zip(found.text_id.tolist(), found.position.tolist(), located.tolist())]
    frame["window_start"] = _where_known(found.window_start, located)
    # The BOS at position 0 adds nothing to a decoded text (data.text_parts).
    frame["window"] = [(db.vocab.decode(ids[1:] if s == 0 else ids) if known else None)
                       for ids, s, known in zip(windows, found.window_start.tolist(), located.tolist())]
    frame["window_tokens"] = [[db.vocab.token(t) for t in ids] for ids in windows]
    for k, hook in enumerate(HOOKS):
        frame[f"window_{hook}"] = [found.values[i, k, :len(ids)] for i, ids in enumerate(windows)]
    return frame


def _where_known(values: np.ndarray, known: np.ndarray) -> np.ndarray | pd.arrays.IntegerArray:
    """Integers, <NA> where not known; a plain int64 column where all are (a recording's), as they always were."""
    values = values.astype(np.int64)
    return values if known.all() else pd.arrays.IntegerArray(values, ~known)


class Histograms:
    """A neuron's distributions: `frame`, the histogram of one value per quadrant; `density`, the joint
    distribution of (x_gate, x_in); `intervals`, the intervals of |hook_post| its sampled examples come from.
    In Jupyter they are drawn as on the page. `known` is False for an import of the paper's layout, which has
    none: the three frames are then empty (Neuron.summary has its frequencies), and Jupyter says so."""

    def __init__(self, body: dict[str, Any], hook: str) -> None:
        self._body = body
        self.hook = hook
        self.known: bool = body.get("distributions_known", True)
        self.frame = _histogram_frame(body["values"][hook])
        self.density = _density_frame(body["density"])
        self.intervals = pd.DataFrame(
            [{"quadrant": q["quadrant"], "interval": i["interval"], "lo": i["lo"], "hi": _high(i["hi"]),
              "count": i["count"]} for q in body["quadrants"] for i in q["intervals"]],
            columns=["quadrant", "interval", "lo", "hi", "count"])

    def __repr__(self) -> str:
        address = address_of(self._body)
        if not self.known:
            return f"<gluscope.Histograms {address}: none (an import of the paper's layout, which has none)>"
        return f"<gluscope.Histograms {address} {self.hook}: {len(self.frame)} (quadrant, bin) rows>"

    def _repr_html_(self) -> str:
        return notebook_html.histograms_html(self._body, self.hook)


def _histogram_frame(value: dict[str, Any]) -> pd.DataFrame:
    """One row per (quadrant, bin) from the first to the last bin that holds a token: the bin's number in
    histogram_bins, its edges (±inf where open) and the quadrant's tokens in it."""
    edges = value["edges"]
    rows = [{"quadrant": quadrant, "bin": value["first_bin"] + j, "lo": _low(edges[j]), "hi": _high(edges[j + 1]),
             "count": count} for quadrant, counts in value["counts"].items() for j, count in enumerate(counts)]
    return pd.DataFrame(rows, columns=["quadrant", "bin", "lo", "hi", "count"])


def _density_frame(density: dict[str, Any]) -> pd.DataFrame:
    """One row per cell of the joint histogram of x_gate and x_in (bins of histogram_bins' axis 'density')."""
    g, x = density["gate_edges"], density["in_edges"]
    rows = [{"gate_bin": density["first_gate_bin"] + i, "in_bin": density["first_in_bin"] + j,
             "gate_lo": _low(g[i]), "gate_hi": _high(g[i + 1]), "in_lo": _low(x[j]), "in_hi": _high(x[j + 1]),
             "count": count} for i, row in enumerate(density["counts"]) for j, count in enumerate(row)]
    return pd.DataFrame(rows, columns=["gate_bin", "in_bin", "gate_lo", "gate_hi", "in_lo", "in_hi", "count"])
