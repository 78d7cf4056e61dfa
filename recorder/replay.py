"""Locating an imported example's token: the texts the paper's lists name, run again through the model.

The layout keeps the texts of a neuron's extreme values, not the tokens.
The original tool finds the token again when it draws a page, as the
argmax of |value| within the quadrant (recompute.recompute_acts); this does
the same once, at import, through the recorder's own model loading
(model.load_model) and forward pass with its hooks (record._run), and keeps
the position where the replay reproduces the stored value.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from gluscope.errors import UserError
from gluscope.recorder.checkpoint import weights_fingerprint
from gluscope.recorder.corpus import Corpus, tokenizer_fingerprint
from gluscope.recorder.model import GatedModel, load_model
from gluscope.recorder.paper_import import (LOCATE_ATOL, LOCATE_RTOL, WINDOW_AFTER, WINDOW_BEFORE, Examples,
                                            Located, Neurons, Texts)
from gluscope.recorder.record import _run
from gluscope.recorder.vocab import vocabulary
from gluscope.recorder.weights import weight_geometry
from gluscope.schema import QUADRANT_SIGNS


class _Locator:
    """A layer's stand-in for a reducer (record._hooks hands it x_gate and x_in): for each text of the batch it
    locates the examples of this layer that name the text, and cuts their windows."""

    def __init__(self, layer: int, sign: torch.Tensor, act_fn, wanted: dict[int, list[int]], neuron_of: np.ndarray,
                 examples: Examples, text_ids: np.ndarray, bos_counted: bool, windows: dict[str, list]) -> None:
        self.layer, self.sign, self.act_fn, self.wanted, self.neuron_of = layer, sign, act_fn, wanted, neuron_of
        self.examples, self.text_ids, self.first = examples, text_ids, 0 if bos_counted else 1
        self.windows, self.seen = windows, set()

    def update(self, x_gate: torch.Tensor, x_in: torch.Tensor, batch) -> None:
        for b, (index, length) in enumerate(zip(batch.text_ids.tolist(), batch.lengths.tolist())):
            rows = self.wanted.get(int(self.text_ids[index]), [])
            if rows:
                self._locate(np.asarray(rows), x_gate[b, :length].float(), x_in[b, :length].float())

    def _locate(self, rows: np.ndarray, x_gate: torch.Tensor, x_in: torch.Tensor) -> None:
        e = self.examples
        neurons = torch.as_tensor(self.neuron_of[rows], device=x_gate.device)
        gate = x_gate[:, neurons].T.double()                                   # [examples, T]
        x_in = (x_in[:, neurons] * self.sign[neurons]).T.double()
        act = self.act_fn(gate)
        values = torch.stack([act * x_in, x_in, gate, act])                    # HOOKS order
        signs = torch.as_tensor(np.asarray(QUADRANT_SIGNS)[e.quadrant[rows]], device=gate.device)
        inside = (torch.sign(gate) == signs[:, :1]) & (torch.sign(x_in) == signs[:, 1:])
        inside[:, :self.first] = False
        v = values[torch.as_tensor(e.hook[rows], device=gate.device), torch.arange(len(rows))]
        magnitude = torch.where(inside, v.abs(), torch.full_like(v, -1.0))
        position = magnitude.argmax(1)  # the first of equals: the lower position, as the recorder's tie rule
        found = v[torch.arange(len(rows)), position].cpu().numpy()
        stored = e.value[rows].astype(np.float64)
        ok = inside[torch.arange(len(rows)), position].cpu().numpy() & np.isclose(
            found, stored, rtol=LOCATE_RTOL, atol=LOCATE_ATOL)
        e.position[rows[ok]] = position.cpu().numpy()[ok]
        g16, i16 = gate.cpu().numpy().astype(np.float16), x_in.cpu().numpy().astype(np.float16)
        for j in np.flatnonzero(ok):
            self._window(int(rows[j]), int(position[j]), g16[j], i16[j])

    def _window(self, row: int, position: int, gate: np.ndarray, x_in: np.ndarray) -> None:
        e = self.examples
        key = (int(self.neuron_of[row]), int(e.text_id[row]), position)
        if key in self.seen:  # one window per token, however many lists it is in
            return
        self.seen.add(key)
        self.windows["layer"].append(self.layer)
        start, stop = max(0, position - WINDOW_BEFORE), min(len(gate), position + WINDOW_AFTER + 1)
        self.windows["neuron"].append(key[0])
        self.windows["text_id"].append(key[1])
        self.windows["position"].append(position)
        self.windows["window_start"].append(start)
        self.windows["x_gate"].append(gate[start:stop].view(np.int16).tolist())
        self.windows["x_in"].append(x_in[start:stop].view(np.int16).tolist())


def _check_fits(model: GatedModel, neurons: Neurons, texts: Texts, path: str) -> None:
    n_layers, d_mlp = int(neurons.layer.max()) + 1, int(neurons.neuron.max()) + 1
    if model.layouts is not None:
        raise UserError(f"--model {path} is a mixture-of-experts model; the paper's layout is of dense ones")
    if (model.n_layers, model.d_mlp) != (n_layers, d_mlp):
        raise UserError(f"--model {path} has {model.n_layers} layers of {model.d_mlp} neurons; the dataset "
                        f"{n_layers} of {d_mlp}")
    top = max(int(t.max()) for t in texts.token_ids)
    if top >= model.token_count():
        raise UserError(f"--model {path}: the texts hold token id {top}, past its vocabulary of "
                        f"{model.token_count()}")


def locate(path: str, neurons: Neurons, examples: Examples, texts: Texts, refactor_glu: bool,
           bos_counted: bool) -> Located:
    """paper_import.locate: load the model, replay the named texts layer by layer, locate in place."""
    model = load_model(path)
    _check_fits(model, neurons, texts, path)
    n_layers = model.n_layers
    windows: dict[str, list] = defaultdict(list)
    flipped, geometry, locators = np.zeros(len(neurons.layer), bool), defaultdict(list), []
    text_ids = np.unique(examples.text_id)
    order = np.lexsort((neurons.neuron, neurons.layer))
    for layer in range(n_layers):
        sign, geo = weight_geometry(*model.mlp_weights(layer), refactor_glu)
        mine = order[neurons.layer[order] == layer]
        flipped[mine] = (sign.cpu().numpy() < 0)[neurons.neuron[mine]]
        for name, values in geo.items():
            geometry[name].append(values[neurons.neuron[mine]])
        rows_here = np.flatnonzero(neurons.layer[examples.row] == layer)
        wanted: dict[int, list[int]] = defaultdict(list)
        for r in rows_here.tolist():
            wanted[int(examples.text_id[r])].append(r)
        locators.append(_Locator(layer, sign.to(model.device), model.act_fn, wanted, neurons.neuron[examples.row],
                                 examples, text_ids, bos_counted, windows))
    corpus = Corpus(np.asarray(text_ids, np.int64), [texts.token_ids[t] for t in text_ids.tolist()])
    batches = [np.array([i]) for i in range(len(text_ids))]  # one at a time, as the original ran them
    _run(model, corpus, batches, locators, progress=False)
    return Located(model=model, flipped=flipped,
                   geometry={name: np.concatenate(parts)[np.argsort(order, kind="stable")]
                             for name, parts in geometry.items()},
                   vocab=vocabulary(model.tokenizer, model.vocab_size), windows=_window_columns(windows),
                   weights_fingerprint=weights_fingerprint(model),
                   tokenizer_fingerprint=tokenizer_fingerprint(model.tokenizer))


def _window_columns(windows: dict[str, list]) -> dict:
    """The windows table's columns, by (layer, neuron, text_id, position) as every table is ordered."""
    import pyarrow as pa

    order = sorted(range(len(windows["neuron"])), key=lambda i: (windows["layer"][i], windows["neuron"][i],
                                                                windows["text_id"][i], windows["position"][i]))

    def column(name: str, dtype) -> pa.Array:
        return pa.array([windows[name][i] for i in order], dtype)
    return {"layer": column("layer", pa.int16()), "neuron": column("neuron", pa.int32()),
            "text_id": column("text_id", pa.int32()), "position": column("position", pa.int16()),
            "window_start": column("window_start", pa.int16()),
            "x_gate": column("x_gate", pa.list_(pa.int16())), "x_in": column("x_in", pa.list_(pa.int16()))}
