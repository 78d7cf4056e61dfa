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
    # Extra flags, e.g. -mno-f16c (the tests build the portable float16 path this way).
    flags = [*FLAGS, *os.environ.get("GLUSCOPE_CXXFLAGS", "").split()]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"reduce_cpu-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name and rename: a concurrent run never loads half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
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

    Offers what `record._layer_result` reads from reduce.LayerState, totals()
    and examples(), in the same layouts.
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

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(counts [4, n], vmin [16, n], vmax [16, n], vsum [16, n]), as LayerState.totals().

        A list's extreme end is its first entry; its near-zero end is `near`.
        A list whose values were all exactly zero has no entry: both ends are that zero.
        """
        signs = list_signs().numpy()[:, None]
        top = self.top_mag[:, :, 0].T
        near = np.where(np.isfinite(self.near.T), self.near.T * signs, np.inf * signs)
        extreme = np.where(top > 0, top * signs, np.where(np.isfinite(self.near.T), near, -np.inf * signs))
        vmax = np.where(signs > 0, extreme, near).astype(np.float32)
        vmin = np.where(signs > 0, near, extreme).astype(np.float32)
        return np.ascontiguousarray(self.counts_.T), vmin, vmax, self.vsum_.T * signs

    def examples(self) -> dict[str, np.ndarray]:
        """The lists most extreme first, as [4, 4, n, k, ...] like LayerState.examples().

        Views of neuron-major memory: the writer wants rows by neuron, so it
        copies nothing more.
        """
        n = self.top_mag.shape[0]

        def qhnk(a: np.ndarray) -> np.ndarray:
            return np.moveaxis(a.reshape(n, 4, 4, *a.shape[2:]), 0, 2)

        value = np.where(self.top_text >= 0, self.top_mag, 0) * list_signs().numpy()[None, :, None]
        # The kernel keeps each list's windows in slot order; entries carry their slot.
        k, W = self.win_gate.shape[2:]
        rows = (np.arange(n * N_LISTS)[:, None] * k + self.slot.reshape(-1, k)).reshape(-1)
        windows = {name: bits.reshape(-1, W).take(rows, axis=0).reshape(bits.shape).view(np.float16)
                   for name, bits in (("win_gate", self.win_gate), ("win_in", self.win_in))}
        return {"value": qhnk(value.astype(np.float32)), "text": qhnk(self.top_text), "pos": qhnk(self.top_pos),
                "win_start": qhnk(self.win_start), "win_len": qhnk(self.win_len),
                **{name: qhnk(w) for name, w in windows.items()}}


def _contiguous_f32(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError("the CPU kernel takes CPU tensors")
    return t.detach().to(torch.float32).contiguous()


def _ptr(a) -> int:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.ctypes.data
