"""The recorder's reduction on the CPU: one compiled pass per layer and batch.

On a GPU, `reduce.py`'s tensor code fuses well under torch.compile. On the
CPU the same code costs more than the layer's matmuls: it makes many passes
over [B, T, d_mlp] and merges the top-k with gathers and sorts. The C++ kernel
in kernels/reduce_cpu.cpp reads x_gate, x_in and act(x_gate) once, keeps the
accumulators of a block of neurons in L1, and merges each text's candidates
into sorted top-k lists by insertion, copying an entering example's window
while that text is still in cache.

The kernel is compiled on first use with the system's g++ (as torch.compile
on the CPU also needs) into a cache folder, and called through ctypes, so
it needs neither Python headers nor a build step at install time.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import torch

from gluscope.recorder.reduce import N_LISTS, list_signs

log = logging.getLogger("gluscope.record")

SOURCE = Path(__file__).with_name("kernels") / "reduce_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


class KernelUnavailable(RuntimeError):
    """The CPU kernel cannot be built here (no C++ compiler, or it failed)."""


def _cache_dir() -> Path:
    root = os.environ.get("GLUSCOPE_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gluscope"


def _cpu_id() -> str:
    """-march=native code is only valid on the CPU that built it, so the cache key names that CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


@cache
def load_kernel() -> ctypes.CDLL:
    """Build (once per source, compiler flags and CPU) and load the kernel; KernelUnavailable if it cannot be."""
    wanted = os.environ.get("CXX")
    compiler = shutil.which(wanted) if wanted else shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise KernelUnavailable(f"no C++ compiler ({wanted or 'g++'}) found")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"reduce_cpu-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name and rename: a concurrent run never loads half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise KernelUnavailable(f"{compiler} failed: {last}")
            os.replace(tmp, lib)
        finally:
            Path(tmp).unlink(missing_ok=True)
    dll = ctypes.CDLL(str(lib))
    fn = dll.gluscope_reduce_update
    fn.restype = ctypes.c_int
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, p, p, i64, i64, i64, p, p, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p, p, p, ctypes.c_int]
    return dll


def kernel_available() -> bool:
    try:
        load_kernel()
        return True
    except (KernelUnavailable, OSError) as e:
        log.warning("CPU reduction kernel unavailable (%s); using the slower tensor code", e)
        return False


class CpuLayerState:
    """The running statistics and top-k of one layer, as NumPy arrays updated by the compiled kernel.

    Offers what `record._layer_result` reads from reduce.LayerState (counts,
    vmin, vmax, vsum, ranked()) in the same layouts.
    """

    def __init__(self, k: int, n: int, window: int) -> None:
        self.counts_ = np.zeros((n, 4), np.int64)
        self.vsum_ = np.zeros((n, N_LISTS), np.float64)
        self.near = np.full((n, N_LISTS), np.inf, np.float32)
        self.top_mag = np.full((n, N_LISTS, k), -1.0, np.float32)
        self.top_text = np.full((n, N_LISTS, k), -1, np.int32)
        self.top_pos = np.zeros((n, N_LISTS, k), np.int32)
        self.win_start = np.zeros((n, N_LISTS, k), np.int32)
        self.win_len = np.zeros((n, N_LISTS, k), np.int32)
        # The window row each entry owns: entries move as better ones enter, windows never do.
        self.slot = np.broadcast_to(np.arange(k, dtype=np.int32), (n, N_LISTS, k)).copy()
        self.win_gate = np.zeros((n, N_LISTS, k, window), np.uint16)
        self.win_in = np.zeros((n, N_LISTS, k, window), np.uint16)

    def update(self, g: torch.Tensor, x_in: torch.Tensor, act: torch.Tensor, sign: torch.Tensor,
               lengths: np.ndarray, text_ids: np.ndarray, before: int, after: int) -> None:
        """Fold one batch: g, x_in (raw, before the sign), act(g), all [B, T, n] float32 on the CPU."""
        g, x_in, act, sign = (_contiguous_f32(t) for t in (g, x_in, act, sign))
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        text_ids = np.ascontiguousarray(text_ids, dtype=np.int64)
        B, T, n = g.shape
        k, W = self.top_mag.shape[2], self.win_gate.shape[3]
        ptr = _ptr
        load_kernel().gluscope_reduce_update(
            ptr(g), ptr(x_in), ptr(act), ptr(sign), B, T, n, ptr(lengths), ptr(text_ids), before, after, k, W,
            ptr(self.counts_), ptr(self.vsum_), ptr(self.near), ptr(self.top_mag), ptr(self.top_text),
            ptr(self.top_pos), ptr(self.win_start), ptr(self.win_len), ptr(self.slot), ptr(self.win_gate),
            ptr(self.win_in),
            torch.get_num_threads())

    @property
    def counts(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.counts_.T))

    @property
    def vsum(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.vsum_.T) * list_signs().double().numpy()[:, None])

    def _ends(self) -> tuple[np.ndarray, np.ndarray]:
        """(signed extreme, signed near-zero end) per [16, n]; the extreme is every list's first entry."""
        signs = list_signs().numpy()[:, None]
        top = self.top_mag[:, :, 0].T
        extreme = np.where(top > 0, top * signs, np.nan)
        near = np.where(np.isfinite(self.near.T), self.near.T * signs, np.nan)
        # A list whose values were all exactly zero has no example; its ends are that zero.
        extreme = np.where(np.isnan(extreme) & ~np.isnan(near), near, extreme)
        return extreme, near

    @property
    def vmax(self) -> torch.Tensor:
        extreme, near = self._ends()
        return torch.from_numpy(np.where(list_signs().numpy()[:, None] > 0, extreme, near).astype(np.float32))

    @property
    def vmin(self) -> torch.Tensor:
        extreme, near = self._ends()
        return torch.from_numpy(np.where(list_signs().numpy()[:, None] > 0, near, extreme).astype(np.float32))

    def _windows(self, bits: np.ndarray) -> np.ndarray:
        """[n, 16, k, W] float16 in list order (the kernel keeps them in slot order)."""
        return np.take_along_axis(bits, self.slot[..., None], axis=2).view(np.float16)

    def ranked(self) -> dict[str, torch.Tensor]:
        """The top-k lists, most extreme first, as [k, 16, n] tensors like LayerState.ranked()."""
        signs = list_signs().numpy()[None, :, None]

        def kln(a: np.ndarray) -> np.ndarray:  # [n, 16, k, ...] -> [k, 16, n, ...]
            return np.ascontiguousarray(np.moveaxis(a, (0, 2), (2, 0)))

        filled = self.top_text >= 0
        value = kln(np.where(filled, self.top_mag, 0)) * signs
        out = {
            "keys": kln(np.where(filled, 0, -1).astype(np.int64)),
            "value": value.astype(np.float32),
            "text": kln(self.top_text), "pos": kln(self.top_pos),
            "win_start": kln(self.win_start), "win_len": kln(self.win_len),
            "win_gate": kln(self._windows(self.win_gate)), "win_in": kln(self._windows(self.win_in)),
        }
        return {name: torch.from_numpy(a) for name, a in out.items()}


def _contiguous_f32(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError("the CPU kernel takes CPU tensors")
    return t.detach().to(torch.float32).contiguous()


def _ptr(a) -> int:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.ctypes.data
