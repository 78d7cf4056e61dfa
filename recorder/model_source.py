"""What `--model` names, checked without torch: a hub name, a saved model's folder or a GGUF file.

These checks run before the recorder imports torch, transformers and
TransformerLens (most of ten seconds), so a mistyped path, a folder that holds
no model or a mixture-of-experts model of a layout GLUScope cannot read is answered at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from gluscope.errors import UserError
from gluscope.recorder.gguf import gguf_file, is_gguf

def looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


# Mixture-of-experts architectures whose experts are not laid out as recorder/experts.py reads them, and why.
UNSUPPORTED_EXPERTS = {
    "gpt_oss": "its experts' SwiGLU is clamped, has biases and interleaves gate and up rows",
}


def refuse_unsupported_experts(name: str, config: dict) -> None:
    """Refuse at once an MoE architecture whose experts GLUScope cannot read, saying what is missing."""
    why = UNSUPPORTED_EXPERTS.get(config.get("model_type"))
    if why is not None:
        arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
        raise UserError(f"--model {name} ({arch}) is a mixture-of-experts model GLUScope cannot record yet: {why}")


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
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: its config.json is not readable JSON ({e})") from None
    refuse_unsupported_experts(name, config if isinstance(config, dict) else {})
    return path.resolve()


def check_model_source(name: str) -> None:
    """Every check of `--model` that needs neither torch nor the network."""
    if is_gguf(name):
        gguf_file(name)
    else:
        model_folder(name)
