"""Every tiny model, corpus and recording the tests read, each made once and shared.

A test asks for what it needs by what makes it different (`model("gemma",
n_layers=3)`, `record(model, corpus, "--reducer", "torch")`) and gets a path
that every other test asking the same gets too. Each thing is built into
pytest's cache folder under a key made of those options, the content of its
inputs and a fingerprint of the code that builds it (the recorder, the
schema, this module), so that a later run reuses it only while nothing that
could change it has changed. A lock per key makes parallel workers
(pytest-xdist) build each thing once: the first builds, the others wait and
read.

What is cached is read-only by agreement: a test that changes a file copies
it first (`copy_of`).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
PLANTED_SCRIPT = "<script>alert(1)</script>"
EXTRA_TOKENS = ("<script>", "</script>")
# What every recording of the tests has in common: the CPU and no compilation, so that runs are deterministic.
CPU = ("--device", "cpu", "--compile", "off")

PROSE = [
    "The quick brown fox jumps over the lazy dog, and then it jumps over the dog again.",
    "Once again the committee met on Monday; once again nothing was decided.",
    "Rivers carry sediment to the sea, where it settles into layers of sand and clay.",
    "She opened the door, looked outside, and closed it again without a word.",
    "In 1969 the first humans walked on the Moon, an event watched by millions.",
    "Prices rose sharply in March, then fell back in April as supply recovered.",
]
CODE = [
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "import os\n\nfor name in os.listdir('.'):\n    print(name)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "while True:\n\tline = input()\n\tif not line:\n\t\tbreak\n",
]
SPECIAL = [
    f"Malicious markup {PLANTED_SCRIPT} must show as text, never run.",
    "Tabs\tand  double  spaces\nand newlines\n\nare whitespace worth seeing.",
    "Unicode: naïve café, 東京, emoji 🙂 and ümlauts.",
]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

_root: Path | None = None


def use_folder(folder: Path, prune: bool = False) -> None:
    """Keep built things under `folder` (pytest's cache: conftest sets it), in a subfolder for this code.

    `prune` removes what was built for other code: each edit of the recorder makes a new set, and nothing
    reads the old ones again. Only one process may prune (xdist's controller, before its workers start).
    """
    global _root
    folder = Path(folder)
    _root = folder / code_fingerprint()
    if prune and folder.is_dir():
        for old in folder.iterdir():
            if old != _root:
                shutil.rmtree(old, ignore_errors=True)


def _folder() -> Path:
    global _root
    if _root is None:  # no pytest cache (-p no:cacheprovider): a temporary folder for this process
        _root = Path(tempfile.mkdtemp(prefix="gluscope-recordings-"))
        atexit.register(shutil.rmtree, _root, ignore_errors=True)
    _root.mkdir(parents=True, exist_ok=True)
    return _root


# --- texts ---------------------------------------------------------------------

def corpus_texts() -> list[str]:
    """Document-sized texts: each base text repeated with variations, so the corpus has ~40 texts."""
    texts = []
    for i, base in enumerate(PROSE + CODE + SPECIAL):
        texts.append(base)
        texts.append(f"{base} {base.lower()} (variant {i})")
        texts.append(base.replace(" ", "  ") + f"\n# note {i}\n" + base)
    return texts


def tokenizer_training_texts() -> list[str]:
    return corpus_texts() * 4


def corpus_source(i: int) -> str:
    """Where corpus text i "came from": what a page shows beside its examples (`record --source-column`)."""
    return f"corpus/text-{i:03d}.txt"


def _standard_rows() -> list[dict]:
    return [{"text": text, "id": i, "source": corpus_source(i)} for i, text in enumerate(corpus_texts())]


def _distinct_rows() -> list[dict]:
    """Each text starts with its own letter, so no two texts share a context and exact ties between texts
    cannot arise (what a brute force one text at a time needs)."""
    return [{"text": f"{letter} {text}"} for letter, text in zip(LETTERS, corpus_texts())]


def _random_rows() -> list[dict]:
    """150 texts of 3 to 60 words drawn from the corpus: top-k lists that fill, evict and reorder many times."""
    import numpy as np

    words = " ".join(corpus_texts()).split()
    rng = np.random.default_rng(1)
    return [{"text": " ".join(rng.choice(words, rng.integers(3, 60)))} for _ in range(150)]


CORPORA: dict[str, Callable[[], list[dict]]] = {
    "standard": _standard_rows,
    # The standard corpus four times over: 168 texts, so that a run interrupted and resumed has a long loop.
    "long": lambda: _standard_rows() * 4,
    "distinct": _distinct_rows,
    "random": _random_rows,
}


# --- keys and the build lock ---------------------------------------------------------

# What a recording depends on besides its inputs: the code that records and the libraries that compute.
CODE_FOLDERS = ("recorder", "gluscope")
LIBRARIES = ("torch", "transformers", "transformer-lens", "tokenizers", "duckdb", "numpy", "gguf")


@cache
def code_fingerprint() -> str:
    h = hashlib.sha256()
    files = [p for folder in CODE_FOLDERS for p in sorted((ROOT / folder).rglob("*"))
             if p.suffix in {".py", ".cpp", ".sql"} and "__pycache__" not in p.parts]
    for path in [*files, Path(__file__), ROOT / "tests" / "tiny_models.py", ROOT / "tests" / "gguf_files.py"]:
        if path.exists():
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    for name in LIBRARIES:
        try:
            h.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]


def content_hash(path: Path) -> str:
    """Of a file, or of every file of a folder with its relative name."""
    h = hashlib.sha256()
    path = Path(path)
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _key(kind: str, *parts: object) -> str:
    text = json.dumps([kind, code_fingerprint(), *[str(p) for p in parts]])
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@contextmanager
def _locked(key: str) -> Iterator[None]:
    with open(_folder() / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _built(key: str, name: str, build: Callable[[Path], None]) -> Path:
    """`folder/key/name`, built by `build(path)` into a temporary folder and renamed into place once whole."""
    final = _folder() / key
    if (final / name).exists():
        return final / name
    with _locked(key):
        if not (final / name).exists():
            work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=_folder()))
            try:
                build(work / name)
                os.replace(work, final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return final / name


# --- what tests ask for ------------------------------------------------------------

def corpus(name: str = "standard") -> Path:
    """A JSON-lines corpus (see CORPORA), at the same path for everyone who asks."""
    def build(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in CORPORA[name]()))

    return _built(_key("corpus", name), f"{name}.jsonl", build)


def model(arch: str = "llama", *, perturb_norms: bool = False, **options) -> Path:
    """A tiny random model of `arch` with the tests' tokenizer (see tiny_models.save_tiny_model for `options`).

    `perturb_norms` gives the pre-MLP norms random gains (a fresh model's are all 1, or 0 for Gemma's weight),
    so that a brute force from the weights that forgets or doubles the gain gets another answer.
    """
    options = {"init_std": 0.15, "extra_tokens": EXTRA_TOKENS, **options}

    def build(path: Path) -> None:
        from .tiny_models import save_tiny_model

        save_tiny_model(path, arch, tokenizer_training_texts(), **options)
        if perturb_norms:
            _perturb_norms(path, arch)

    return _built(_key("model", arch, perturb_norms, sorted(options.items())), f"tiny-{arch}", build)


def _perturb_norms(folder: Path, arch: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            norm = layer.post_attention_layernorm.weight
            norm.copy_(torch.randn(norm.shape, generator=generator) * 0.6 + (0.0 if arch == "gemma" else 1.0))
    model.save_pretrained(folder)


def gguf(model_folder: Path) -> Path:
    """The tiny Llama written as a float32 GGUF file, the way llama.cpp's converter lays it out."""
    def build(path: Path) -> None:
        from .gguf_files import write_llama_gguf

        path.parent.mkdir(parents=True, exist_ok=True)
        write_llama_gguf(model_folder, path)

    return _built(_key("gguf", content_hash(model_folder)), f"{Path(model_folder).name}.F32.gguf", build)


def record(model_source: Path, corpus_file: Path, *options: str) -> Path:
    """The database `gluscope record` writes for this model, corpus and options (run in this process, once)."""
    def build(path: Path) -> None:
        from gluscope.cli import main as gluscope_main

        path.parent.mkdir(parents=True, exist_ok=True)
        args = ["record", "--model", str(model_source), "--dataset", str(corpus_file), "--out", str(path),
                *CPU, *options]
        assert gluscope_main(args) == 0, args

    key = _key("db", content_hash(model_source), content_hash(corpus_file), *options)
    return _built(key, "recording.duckdb", build)


def copy_of(path: Path, folder: Path) -> Path:
    """A private copy of a shared file or folder, for a test that changes it."""
    target = Path(folder) / Path(path).name
    if Path(path).is_dir():
        shutil.copytree(path, target)
    else:
        shutil.copy(path, target)
    return target
