"""GGUF files (llama.cpp, Ollama) as a model source: converted once into a cached Hugging Face folder.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`)
and dequantizes its weights to float, but it refuses to `save_pretrained` a
model loaded that way and reading the file again is slow (see docs/performance.md).
So the dequantized state dict is loaded into a fresh model built from the
same config, which saves as an ordinary safetensors folder; that folder is
cached under the file's content hash and every later run loads it like any
other local model, through TransformerBridge.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from gluscope.cache import cache_dir
from gluscope.errors import UserError

SOURCE_FILE = "gluscope-gguf.json"  # written into the converted folder: where its weights came from

# The mixture-of-experts GGUF architectures whose experts transformers reads into its fused layout, with the
# header fields of their experts' sizes. transformers' GGUF reader does not take these sizes into the config
# (it keeps the config class's defaults), so a file of other sizes would not load; they are set from the header.
# Other architectures with experts (Mixtral's, stored as `llama`) would load as a dense model without them.
EXPERT_SIZES = {
    "qwen2moe": {"expert_feed_forward_length": "moe_intermediate_size",
                 "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    "qwen3moe": {"expert_feed_forward_length": "moe_intermediate_size"},
}


@dataclass(frozen=True)
class GGUFSource:
    """What a converted folder was made from; recorded in the database's metadata."""
    file: str             # the file name as given
    sha256: str
    quantization: str     # the file's general.file_type, e.g. Q4_1, Q8_0, F16
    architecture: str     # general.architecture, e.g. llama

    @classmethod
    def read(cls, folder: Path) -> "GGUFSource":
        return cls(**json.loads((folder / SOURCE_FILE).read_text()))


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def gguf_file(name: str | Path) -> Path:
    """The GGUF file `name` names, which must exist."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"--model {path}: no such GGUF file")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _describe(path: Path) -> tuple[str, str]:
    """(quantization, architecture) from the file's own header; a file that is no GGUF is a UserError."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct.error, IndexError... on a bad file
        raise UserError(f"--model {path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    file_type = field("general.file_type")
    try:
        quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        types = sorted({t.tensor_type.name for t in reader.tensors})
        quantization = "+".join(types) or "unknown"
    architecture = str(field("general.architecture") or "unknown")
    experts = field(f"{architecture}.expert_count")
    if isinstance(experts, int) and experts > 1 and architecture not in EXPERT_SIZES:
        raise UserError(f"--model {path} ({architecture}) is a mixture-of-experts model with {experts} experts per "
                        f"layer, in a GGUF architecture whose experts GLUScope does not read (it reads "
                        f"{', '.join(EXPERT_SIZES)}): record it from its Hugging Face folder instead")
    return quantization, architecture


def convert(path: str | Path, progress: Callable[[str], None] = print) -> Path:
    """The cached Hugging Face folder for the GGUF file `path`, converting it on first use.

    The cache key is the file's SHA-256, so a renamed or copied file is not
    converted again and an edited one is. The folder is written under a
    temporary name and renamed when complete: a killed conversion leaves no
    folder that a later run would trust.
    """
    path = gguf_file(path)
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise UserError("reading GGUF files needs the `gguf` package: pip install 'gluscope[record]'") from None
    sha = file_sha256(path)
    folder = cache_dir("gguf") / sha[:32]
    if (folder / SOURCE_FILE).is_file():
        return folder
    with _memoized_gguf():
        quantization, architecture = _describe(path)
        progress(f"converting {path.name} ({quantization}, {architecture}) to a Hugging Face folder in {folder} ...")
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert_into(path, tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps(
                GGUFSource(path.name, sha, quantization, architecture).__dict__, indent=2) + "\n")
            try:
                tmp.rename(folder)
            except OSError:
                if not (folder / SOURCE_FILE).is_file():  # not a concurrent conversion that won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextmanager
def _memoized_gguf() -> Iterator[None]:
    """While converting, gguf's file reader and tensor-name map are built once per distinct argument.

    transformers' GGUF loader parses the whole file's metadata (the
    tokenizer's vocabulary and merges among it) on each of its calls: the
    header check here, the config, the weights and the tokenizer. It also
    builds gguf's tensor-name map once per submodule of the model, hundreds of
    times. Both are pure functions of their arguments and the file, which does
    not change during a conversion, so most of the conversion's time was
    spent redoing them.
    """
    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map") if hasattr(gguf, name)}
    memo: dict[tuple, object] = {}

    def memoized(name: str):
        def build(*args, **kwargs):
            key = (name, tuple(str(a) for a in args), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
            if key not in memo:
                memo[key] = originals[name](*args, **kwargs)
            return memo[key]
        return build

    try:
        for name in originals:
            setattr(gguf, name, memoized(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf, name, original)


def _config_of(path: Path):
    """transformers' config of the GGUF file, with its experts' sizes from the header where it has experts."""
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    reader = gguf.GGUFReader(str(path))
    architecture = str(reader.fields["general.architecture"].contents())
    for key, attr in EXPERT_SIZES.get(architecture, {}).items():
        value = reader.fields.get(f"{architecture}.{key}")
        if value is not None:
            setattr(config, attr, int(value.contents()))
    return config


def _convert_into(path: Path, out: Path) -> None:
    import logging

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        config = _config_of(path)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                      config=config)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError, NotImplementedError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--model {path}: transformers cannot read this GGUF file ({first[:200]})") from None
    config = loaded.config
    # The GGUF loader marks the config as quantized; the saved folder holds plain float weights.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    out.mkdir(parents=True)
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
