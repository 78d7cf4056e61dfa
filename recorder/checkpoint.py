"""Checkpoints of a recording: where the loop is, every layer's reducer state, and which run it is.

A checkpoint is one uncompressed zip of .npy arrays, which np.load reads
without pickle: `run` (JSON bytes) describes the run and says how many
batches are done, `layer{L}/{name}` holds each field a layer's reducer
declares (LayerReducer.state). The batch order is deterministic
(record.shard_batches), so the count of batches done is the whole position.

It is written under a temporary name in the output's folder, flushed and
fsynced, then renamed over the previous one, so a kill at any instant leaves
either the previous checkpoint or the new one, complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
import zipfile
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gluscope.errors import UserError

log = logging.getLogger("gluscope.record")

# Without --checkpoint-every, a run whose first batches say it will take longer than AUTO_ABOVE_S checkpoints every
# DEFAULT_EVERY_MINUTES. A checkpoint of the OLMo-7B shape is large (mostly windows) and slow to write (see
# docs/performance.md), so ten minutes keeps that to a few per cent of the run.
DEFAULT_EVERY_MINUTES = 10.0
AUTO_ABOVE_S = 15 * 60
ESTIMATE_AFTER_BATCHES = 3
ESTIMATE_AFTER_S = 30.0

# Tests only: seconds to wait with the temporary file half written (after layer 0), so that a signal lands then.
DELAY_ENV = "GLUSCOPE_TEST_CHECKPOINT_DELAY"


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporary files of runs on `out` that were killed (SIGKILL leaves them); call under the output lock.

    Holding the lock, no other recorder writes `out`, its temporary database or its checkpoint, so every such
    file is a dead run's.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}(\.checkpoint)?\.\d+\.tmp(\.wal)?")
    stale = [p for p in out.parent.glob(f".{out.name}*.tmp*") if pattern.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def weights_fingerprint(model) -> str:
    """Identifies the model's weights: every parameter's name, shape, dtype and the bytes of 4096 evenly spaced
    elements. Exact bytes, not sums, so it does not depend on how a reduction was split over threads; it costs one
    small copy per parameter, not a pass over every weight."""
    import torch

    digest = hashlib.sha256()
    for name, p in model.bridge.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)].contiguous().cpu()
        digest.update(f"{name} {list(p.shape)} {p.dtype}\n".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot go into a checkpoint's description")


def describe_run(metadata: dict[str, Any], **more: Any) -> dict[str, Any]:
    """What a resume must match: the database's metadata but its creation time, and what else changes the result."""
    run = {key: value for key, value in metadata.items() if key != "created_at"}
    run.update(more)
    return json.loads(json.dumps(run, default=_plain))


# How the user sets each part of the description, in the order a difference is reported: the options first, so
# that --max-length is named rather than the corpus fingerprint it also changes.
FLAGS = {
    "batch_size": "--batch-size", "k": "--k", "window_before": "--window-before", "window_after": "--window-after",
    "refactor_glu": None, "dtype": "--dtype", "reducer": "--reducer", "compiled": "--compile", "device": "--device",
    "shard": "--shard", "max_length": "--max-length", "text_column": "--text-column", "dataset": "--dataset",
    "model_source": "--model", "model_revision": "--revision", "model_name": "--name",
    "weights_fingerprint": None, "tokenizer_fingerprint": None, "corpus_fingerprint": None,
}
SKIP = {"shard_index", "shard_count"}  # reported as "shard"


def _shown(key: str, value: Any, bare: bool = False) -> str:
    """How the user would have set `value`; bare: only the value where that is clear after _shown(key, other)."""
    if key == "refactor_glu":
        return "the weight convention refactor_glu" if value else "--no-refactor-glu"
    if key == "compiled":
        return f"--compile {'on' if value else 'off'}"
    if key == "shard":
        return f"--shard {value}" if value else "no --shard"
    if key.endswith("_fingerprint"):
        return f"{key.removesuffix('_fingerprint')} fingerprint {value}"
    return f"{value}" if bare else f"{FLAGS.get(key) or key} {value}"


def difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """One line saying the first way the checkpoint's run differs from this one; None if they are the same run."""
    keys = [*FLAGS, *sorted((set(saved) | set(current)) - set(FLAGS) - SKIP)]
    for key in keys:
        old, new = saved.get(key), current.get(key)
        if old != new:
            if key == "corpus_fingerprint":
                return f"checkpoint was recorded over another corpus (fingerprint {old}, this run's is {new})"
            if key == "weights_fingerprint":
                return f"checkpoint was recorded with other model weights (fingerprint {old}, this run's is {new})"
            return f"checkpoint was recorded with {_shown(key, old)}, this run has {_shown(key, new, bare=True)}"
    return None


@dataclass
class Checkpoint:
    path: Path
    run: dict[str, Any]
    next_batch: int     # batches done: the loop goes on from this index of the batch list
    arrays: Any         # np.load's lazy NpzFile: one layer is read at a time

    def layer_state(self, layer: int) -> dict[str, np.ndarray]:
        prefix = f"layer{layer}/"
        return {name.removeprefix(prefix): self.arrays[name] for name in self.arrays.files if name.startswith(prefix)}

    def close(self) -> None:
        self.arrays.close()


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        raise UserError(f"--resume: there is no checkpoint {path} (a run writes one with --checkpoint-every)")
    try:
        arrays = np.load(path, allow_pickle=False)
        run = json.loads(arrays["run"].tobytes())
        next_batch = int(run.pop("next_batch"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"checkpoint {path} cannot be read ({str(e)[:200]}); delete it to start over") from None
    return Checkpoint(path, run, next_batch, arrays)


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block is done, then arrive as usual.

    zipfile marks a member open before it hands back the member's writer; an interrupt between the two leaves the
    archive unclosable, and closing it on the way out replaces the KeyboardInterrupt with a ValueError (a traceback
    and exit status 1 instead of the one-line interrupt). Held per member, an interrupt still ends a long
    checkpoint within one array's write. Held by Python's handlers, not the thread's signal mask: any other thread
    (torch's workers) takes a signal the main thread blocks, and Python then runs its handler in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only: none can interrupt this one
        return
    arrived: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: arrived.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)  # to the handler it was meant for, now that the archive is whole


def _put(z: zipfile.ZipFile, name: str, value) -> None:
    """value: a NumPy array or a tensor on any device."""
    array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    with _signals_held(), z.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, array, allow_pickle=False)


def save_checkpoint(path: Path, run: dict[str, Any], next_batch: int, reducers: Sequence) -> int:
    """Write the checkpoint atomically (see the module's docstring); return its size in bytes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                _put(z, "run", np.frombuffer(json.dumps({**run, "next_batch": next_batch}).encode(), np.uint8))
                for layer, reducer in enumerate(reducers):
                    for name, value in reducer.state().items():
                        _put(z, f"layer{layer}/{name}", value)
                    if layer == 0 and os.environ.get(DELAY_ENV):
                        time.sleep(float(os.environ[DELAY_ENV]))
            f.flush()
            os.fsync(f.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:  # an interrupt, a full disk: the previous checkpoint stays as it was
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself reaches the disk only when the folder is synced.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return size


class CheckpointSchedule:
    """When the loop writes a checkpoint: every `every_minutes` (0: never; None: the default rule, decided once
    from the speed of the first batches)."""

    def __init__(self, every_minutes: float | None, total_tokens: int) -> None:
        self.every_s = None if every_minutes is None else every_minutes * 60
        self.total_tokens = total_tokens
        self.started = self.last = time.monotonic()
        self.batches = 0

    def due(self, tokens_done: int) -> bool:
        """After a batch: tokens_done since this loop started."""
        now = time.monotonic()
        self.batches += 1
        if self.every_s is None:
            elapsed = now - self.started
            if self.batches < ESTIMATE_AFTER_BATCHES and elapsed < ESTIMATE_AFTER_S:
                return False
            estimate = elapsed / max(tokens_done, 1) * self.total_tokens
            on = estimate > AUTO_ABOVE_S
            self.every_s = DEFAULT_EVERY_MINUTES * 60 if on else 0
            if on:
                log.info("this run will take about %.0f min: a checkpoint every %g min (--checkpoint-every sets "
                         "it, 0 turns it off)", estimate / 60, DEFAULT_EVERY_MINUTES)
        if self.every_s <= 0 or now - self.last < self.every_s:
            return False
        return True

    def written(self) -> None:
        self.last = time.monotonic()
