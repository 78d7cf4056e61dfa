"""What `--model` names, checked without torch: a hub name, a saved model's folder or a GGUF file.

These checks run before the recorder imports torch, transformers and
TransformerLens (most of ten seconds), so a mistyped path or a folder that
holds no model is answered at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from gluscope.errors import UserError
from gluscope.recorder.gguf import gguf_file, is_gguf

def looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def model_folder(name: str) -> Path | None:
    """The saved model's folder `name` names, as an absolute path; None for a hub name or a GGUF file.

    A folder must hold a readable config.json of a model GLUScope can record.
    """
    if is_gguf(name):
        return None
    path = Path(name).expanduser()
    if looks_like_path(name) and not path.is_dir():
        raise UserError(f"--model {name}: no such folder (give a local model folder, a .gguf file or a "
                        "Hugging Face hub name)")
    if not path.is_dir():
        return None
    if not (path / "config.json").exists():
        raise UserError(f"--model {name}: the folder has no config.json, so it is not a saved model")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: its config.json is not readable JSON ({e})") from None
    return path.resolve()


def check_model_source(name: str) -> None:
    """Every check of `--model` that needs neither torch nor the network."""
    if is_gguf(name):
        gguf_file(name)
    else:
        model_folder(name)
