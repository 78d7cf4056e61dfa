"""The model a database was recorded from, loaded again and proven to be the same one.

The database's metadata says where the model came from (model_source), in
which dtype it ran, and the fingerprints of its weights and tokenizer. The
model is looked for where it was recorded from, then (for a GGUF file) in the
cache of converted files by the file's SHA-256, then in --model-dir by the
source's last path component; whichever loads must have both fingerprints of
the file, or the probe refuses to answer for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gluscope.cache import cache_dir
from gluscope.errors import UserError
from gluscope.recorder.checkpoint import weights_fingerprint
from gluscope.recorder.corpus import tokenizer_fingerprint
from gluscope.recorder.gguf import SOURCE_FILE, is_gguf
from gluscope.recorder.model import GatedModel, load_model
from gluscope.recorder.weights import weight_geometry
from gluscope.server.db import Database, NeuronTable


@dataclass
class LoadedModel:
    """A GatedModel with what the probe needs of its database: the weight convention's signs and the BOS rule."""

    model: GatedModel
    db: Database
    signs: list[torch.Tensor]   # per layer [d_mlp] float32 +-1 on the model's device (all +1 without refactor_glu)
    bos: int
    max_abs: np.ndarray         # [L, N, 4, hooks] the largest |value| recorded (recorded_max_abs)

    @property
    def id(self) -> str:
        return self.db.id


def recorded_max_abs(neurons: NeuronTable) -> np.ndarray:
    """[L, N, 4, hooks] float32: the largest |value| recorded per neuron, quadrant and hook; NaN where none."""
    with np.errstate(invalid="ignore"):
        found = np.fmax(np.abs(neurons.stat_min), np.abs(neurons.stat_max)).astype(np.float32)
    # A quadrant that never occurred has no scale. Whether it occurred is its frequency (queries.frequency), not
    # its count: an import's counts can be NULL where its layout states a frequency and its lists an extreme.
    # For a recording the two agree (a frequency is > 0 exactly where the count is).
    found[~(neurons.frequency > 0)] = np.nan
    return found


def candidate_sources(meta: dict, model_dir: Path | None) -> list[str]:
    """Where the model of a database with this metadata may be, in the order tried."""
    source = str(meta["model_source"])
    out = []
    if meta.get("weights_sha256"):  # converted once when recorded; the folder is named by the file's hash
        converted = cache_dir("gguf") / str(meta["weights_sha256"])[:32]
        if (converted / SOURCE_FILE).is_file():
            out.append(str(converted))
    out.append(source)
    if model_dir is not None:
        name = Path(source.rstrip("/")).name
        if name and (model_dir / name).exists():
            out.append(str(model_dir / name))
    return out


def _loadable(source: str) -> bool:
    """Whether `source` can be tried without the network: a local folder or file, or a hub name in the cache."""
    path = Path(source).expanduser()
    if path.exists():
        return True
    if is_gguf(source) or source.startswith((".", "/", "~")):
        return False
    return True  # a hub name: transformers finds it in its cache, or says it cannot (HF_HUB_OFFLINE decides)


def load_for(db: Database, device: str | None, model_dir: Path | None = None,
             loaded: dict[tuple[str, str], GatedModel] | None = None) -> LoadedModel:
    """The model `db` was recorded from, in its dtype on `device`, with both fingerprints checked.

    `loaded` shares models between databases recorded from the same weights (keyed by fingerprint and dtype).
    """
    meta = db.meta
    key = (str(meta["weights_fingerprint"]), str(meta["dtype"]))
    model = loaded.get(key) if loaded is not None else None
    if model is None:
        model = _load_checked(db, device, model_dir)
        if loaded is not None:
            loaded[key] = model
    signs = []
    for layer in range(model.n_layers):
        sign, _ = weight_geometry(*model.mlp_weights(layer), bool(meta["refactor_glu"]))
        signs.append(sign.to(model.device))
    return LoadedModel(model=model, db=db, signs=signs, bos=int(meta["bos_token_id"]),
                       max_abs=recorded_max_abs(db.neurons))


def _load_checked(db: Database, device: str | None, model_dir: Path | None) -> GatedModel:
    meta = db.meta
    if meta.get("imported_from") and not meta.get("weights_fingerprint"):
        raise UserError(f"{db.path.name}: an import of the paper's layout made without --model names no model the "
                        "probe could load and check; import it again with `gluscope import-gluscope ... --model M`")
    tried = []
    for source in candidate_sources(meta, model_dir):
        if not _loadable(source):
            tried.append(f"{source} (not here)")
            continue
        # A hub model at the commit it was recorded from; a folder or file is what it is.
        revision = None if Path(source).expanduser().exists() else meta.get("model_revision")
        try:
            model = load_model(source, device=device, dtype=str(meta["dtype"]), revision=revision,
                               display_name=str(meta["model_name"]))
        except UserError as e:
            tried.append(f"{source} ({str(e).split(': ', 1)[-1]})")
            continue
        weights, tokens = weights_fingerprint(model), tokenizer_fingerprint(model.tokenizer)
        if weights != meta["weights_fingerprint"] or tokens != meta["tokenizer_fingerprint"]:
            which = "weights" if weights != meta["weights_fingerprint"] else "tokenizer"
            tried.append(f"{source} (another model: its {which} fingerprint differs from the file's)")
            del model
            continue
        return model
    hint = "" if model_dir is not None else "; put the model in a folder and pass --model-dir"
    raise UserError(f"{db.path.name}: cannot load the model it was recorded from: tried " + "; ".join(tried) + hint)
