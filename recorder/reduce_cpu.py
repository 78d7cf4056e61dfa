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
it needs neither Python headers nor a build step at install time. Its one
argument is the struct `ReduceArgs` declares; the C++ side of that struct and
the rules of rules.py reach the kernel as a generated header
(`kernel_header()`, kept beside the built library), and `load_kernel` checks
that the compiler laid the struct out as ctypes does.
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

from gluscope.recorder import rules
from gluscope.recorder.reducer import Batch, LayerSetup, ReducedLayer, finish_layer
from gluscope.recorder.writer import LayerStatistics

log = logging.getLogger("gluscope.record")

SOURCE = Path(__file__).with_name("kernels") / "reduce_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_f32, _f64, _i32, _i64, _u16 = (ctypes.POINTER(t) for t in
                                (ctypes.c_float, ctypes.c_double, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint16))


class ReduceArgs(ctypes.Structure):
    """The kernel's argument: one layer's batch (read only) and the layer's state (updated in place).

    Arrays are C-contiguous; n = neurons, L = 16 lists, k = examples per list, W = window slots.
    """

    _fields_ = [
        ("x_gate", _f32), ("x_in", _f32), ("act", _f32),   # [B, T, n]; x_in before the weight convention
        ("sign", _f32),                                     # [n] the weight convention
        ("lengths", _i64), ("text_ids", _i64),              # [B]
        ("batch", ctypes.c_int64), ("seq_len", ctypes.c_int64), ("n", ctypes.c_int64),
        ("before", ctypes.c_int64), ("after", ctypes.c_int64), ("k", ctypes.c_int64), ("window", ctypes.c_int64),
        ("counts", _i64),                                   # [n, 4]
        ("near", _f32),                                     # [n, L] smallest |value|
        ("total", _f64),                                    # [n, L] sum of |value|
        ("top_mag", _f32), ("top_text", _i32), ("top_pos", _i32),  # [n, L, k] sorted, most extreme first
        ("top_slot", _i32),                                 # [n, L, k] the window row each entry owns
        ("win_gate", _u16), ("win_in", _u16),               # [n, L, k, W] float16 bits, by slot
        ("n_threads", ctypes.c_int32),
    ]
    INPUTS = ("x_gate", "x_in", "act", "sign", "lengths", "text_ids")

    @classmethod
    def of(cls, **values) -> "ReduceArgs":
        """Arrays and tensors become pointers, after a check of their dtype and memory order."""
        args = cls()
        for name, ctype in cls._fields_:
            value = values.pop(name)
            if issubclass(ctype, ctypes._Pointer):
                array = value.numpy() if isinstance(value, torch.Tensor) else value
                if array.dtype != np.dtype(ctype._type_) or not array.flags.c_contiguous:
                    raise TypeError(f"{name}: want a C-contiguous {np.dtype(ctype._type_)} array, got {array.dtype}")
                value = ctypes.cast(array.ctypes.data, ctype)
            setattr(args, name, value)
        if values:
            raise TypeError(f"ReduceArgs has no fields {sorted(values)}")
        return args

    @classmethod
    def c_declaration(cls) -> str:
        """The same struct in C++, and a function that reports how the compiler laid it out."""
        c_types = {ctypes.c_float: "float", ctypes.c_double: "double", ctypes.c_int32: "int32_t",
                   ctypes.c_int64: "int64_t", ctypes.c_uint16: "uint16_t"}
        members = []
        for name, ctype in cls._fields_:
            if issubclass(ctype, ctypes._Pointer):
                const = "const " if name in cls.INPUTS else ""
                members.append(f"  {const}{c_types[ctype._type_]}* {name};")
            else:
                members.append(f"  {c_types[ctype]} {name};")
        offsets = [f"  offsets[{i}] = offsetof(ReduceArgs, {name});" for i, (name, _) in enumerate(cls._fields_)]
        return "\n".join([
            "struct ReduceArgs {", *members, "};",
            'extern "C" int64_t gluscope_reduce_args_layout(int64_t* offsets) {', *offsets,
            "  return sizeof(ReduceArgs);", "}",
        ]) + "\n"

    @classmethod
    def layout(cls) -> tuple[int, list[int]]:
        """(sizeof, offset of each field) as ctypes lays the struct out."""
        return ctypes.sizeof(cls), [getattr(cls, name).offset for name, _ in cls._fields_]


def kernel_header() -> str:
    """What the kernel's source is compiled with in front of it: the rules and the argument struct."""
    return "#include <cstddef>\n#include <cstdint>\n" + rules.c_header() + ReduceArgs.c_declaration()


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
    header = kernel_header()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(header.encode() + source + " ".join([compiler, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"reduce_cpu-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        # Kept beside the library for whoever reads the kernel; the build uses it through -include.
        header_path = lib.with_suffix(".h")
        header_path.write_text(header)
        # Build under a temporary name and rename: a concurrent run never loads half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-include", str(header_path), "-o", tmp, str(SOURCE)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise KernelUnavailable(f"{compiler} failed: {last}")
            os.replace(tmp, lib)
        except BaseException:
            header_path.unlink(missing_ok=True)
            raise
        finally:
            Path(tmp).unlink(missing_ok=True)
    dll = ctypes.CDLL(str(lib))
    check_layout(dll)
    fn = dll.gluscope_reduce_update
    fn.restype = None
    fn.argtypes = [ctypes.POINTER(ReduceArgs)]
    return dll


def check_layout(dll: ctypes.CDLL) -> None:
    """KernelUnavailable unless the compiled ReduceArgs has ctypes' size and field offsets."""
    fn = dll.gluscope_reduce_args_layout
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    size, offsets = ReduceArgs.layout()
    compiled = (ctypes.c_int64 * len(offsets))()
    compiled_size = fn(compiled)
    if compiled_size != size or list(compiled) != offsets:
        raise KernelUnavailable(f"the compiled ReduceArgs ({compiled_size} bytes, offsets {list(compiled)}) is not "
                                f"the one ctypes declares ({size} bytes, offsets {offsets})")


def kernel_available() -> bool:
    try:
        load_kernel()
        return True
    except (KernelUnavailable, OSError) as e:
        log.warning("CPU reduction kernel unavailable (%s); using the slower tensor code", e)
        return False


class ActBuffer:
    """act(x_gate) of the current layer, in memory reused across layers and batches."""

    def __init__(self) -> None:
        self.memory = torch.empty(0)

    def act(self, act_fn, x_gate: torch.Tensor) -> torch.Tensor:
        if self.memory.numel() < x_gate.numel():
            self.memory = torch.empty(x_gate.numel())
        return act_fn(x_gate, out=self.memory[:x_gate.numel()].view(x_gate.shape))


class KernelReducer:
    """A LayerReducer as NumPy arrays updated in place by the compiled kernel, neuron-major ([n, 16, ...])."""

    def __init__(self, setup: LayerSetup, buffer: ActBuffer) -> None:
        self.setup = setup
        self.buffer = buffer
        self.sign = _contiguous_f32(setup.sign)
        n, k, window, lists = setup.n, setup.k, setup.window, rules.N_LISTS
        self.counts = np.zeros((n, rules.N_QUADRANTS), np.int64)
        self.total = np.zeros((n, lists), np.float64)
        self.near = np.full((n, lists), np.inf, np.float32)
        self.top_mag = np.full((n, lists, k), -1.0, np.float32)
        self.top_text = np.full((n, lists, k), -1, np.int32)
        self.top_pos = np.zeros((n, lists, k), np.int32)
        # The window row each entry owns: entries move as better ones enter, windows never do.
        self.top_slot = np.broadcast_to(np.arange(k, dtype=np.int32), (n, lists, k)).copy()
        self.win_gate = np.zeros((n, lists, k, window), np.uint16)
        self.win_in = np.zeros((n, lists, k, window), np.uint16)

    def update(self, x_gate: torch.Tensor, x_in: torch.Tensor, batch: Batch) -> None:
        x_gate, x_in = _contiguous_f32(x_gate), _contiguous_f32(x_in)
        B, T, n = x_gate.shape
        args = ReduceArgs.of(
            x_gate=x_gate, x_in=x_in, act=self.buffer.act(self.setup.act_fn, x_gate), sign=self.sign,
            lengths=batch.lengths, text_ids=batch.text_ids, batch=B, seq_len=T, n=n,
            before=self.setup.before, after=self.setup.after, k=self.setup.k, window=self.setup.window,
            counts=self.counts, near=self.near, total=self.total, top_mag=self.top_mag, top_text=self.top_text,
            top_pos=self.top_pos, top_slot=self.top_slot, win_gate=self.win_gate, win_in=self.win_in,
            n_threads=torch.get_num_threads())
        load_kernel().gluscope_reduce_update(ctypes.byref(args))

    def finish(self) -> LayerStatistics:
        # Windows sit in slot order; put them in the order of their entries.
        n, lists, k, window = self.win_gate.shape
        rows = (np.arange(n * lists)[:, None] * k + self.top_slot.reshape(-1, k)).reshape(-1)

        def by_entry(bits: np.ndarray) -> np.ndarray:
            return bits.reshape(-1, window).take(rows, axis=0).reshape(bits.shape).view(np.float16)
        return finish_layer(ReducedLayer(
            counts=self.counts, near=self.near, total=self.total, top_mag=self.top_mag, top_text=self.top_text,
            top_pos=self.top_pos, win_gate=by_entry(self.win_gate), win_in=by_entry(self.win_in),
        ), self.setup)


def _contiguous_f32(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError("the CPU kernel takes CPU tensors")
    return t.detach().to(torch.float32).contiguous()
