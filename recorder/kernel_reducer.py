"""The recorder's reduction on the CPU: one compiled pass per layer and batch.

On a GPU, `tensor_reducer.py`'s tensor code fuses well under torch.compile. On the
CPU the same code costs more than the layer's matmuls: it makes many passes
over [B, T, d_mlp] and merges the top-k with gathers and sorts. The C++ kernel
in kernels/reduce_cpu.cpp reads x_gate, x_in and act(x_gate) once, keeps the
accumulators of a block of neurons in L1, and merges each text's candidates
into sorted top-k lists by insertion, writing the windows of a text's
entering examples once its offers are done, while the text is still in cache.

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
import dataclasses
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from gluscope.cache import cache_dir
from gluscope.recorder import rules
from gluscope.recorder.reducer_interface import (Batch, Contribution, LayerSetup, ReducedLayer, checked_state,
                                                finish_layer)
from gluscope.recorder.writer import LayerStatistics

log = logging.getLogger("gluscope.record")

SOURCE = Path(__file__).with_name("kernels") / "reduce_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# A block is 16 floats: one 512-bit vector where the CPU has them (GCC and Clang otherwise prefer 256 bits), which
# measured faster on an AVX-512 machine (see docs/performance.md); where there are no 512-bit vectors the flag
# changes nothing. x86 only: other targets have no such option.
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.append("-mprefer-vector-width=512")

_f32, _f64, _i64 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64)

# The layer's state, which the kernel updates in place: (name, C type, shape, initial value). Dimensions: n
# neurons, Q = 4 quadrants, L = 16 lists, k examples per list, W window slots. Names that ReducedLayer also has
# are handed to it as they are; a new statistic of the kernel is one row here and its code in the .cpp (a checkpoint
# saves and restores every row: KernelReducer.state).
STATE = (
    ("counts", ctypes.c_int64, "n Q", 0),
    ("near", ctypes.c_float, "n L", np.inf),      # the smallest |value|
    ("total", ctypes.c_double, "n L", 0),         # the sum of |value|
    ("top_mag", ctypes.c_float, "n L k", -1),     # the lists, sorted, most extreme first
    ("top_text", ctypes.c_int32, "n L k", -1),
    ("top_pos", ctypes.c_int32, "n L k", 0),
    ("top_slot", ctypes.c_int32, "n L k", 0),     # the window row each entry owns
    ("win_gate", ctypes.c_uint16, "n L k W", 0),  # float16 bits, by slot
    ("win_in", ctypes.c_uint16, "n L k W", 0),
    # Distributions: H = 3 histogram hooks, S = HIST_SLOTS, D = 2 * DENSITY_MAG_BINS signed density bins, R = SAMPLE_SLOTS per quadrant.
    ("hist", ctypes.c_int64, "n Q H S", 0),
    ("density", ctypes.c_int64, "n D D", 0),
    ("samp_hash", ctypes.c_int64, "n Q R", -1),   # sorted within each list, smallest first
    ("samp_text", ctypes.c_int32, "n Q R", -1),
    ("samp_pos", ctypes.c_int32, "n Q R", 0),
    ("samp_slot", ctypes.c_int32, "n Q R", 0),    # the window row each entry owns, within its quadrant
    ("samp_gate", ctypes.c_float, "n Q R", 0),
    ("samp_in", ctypes.c_float, "n Q R", 0),
    ("samp_act", ctypes.c_float, "n Q R", 0),
    ("samp_win_gate", ctypes.c_uint16, "n Q R W", 0),
    ("samp_win_in", ctypes.c_uint16, "n Q R W", 0),
)

# ReduceArgs.parts: which distributions the kernel computes, by name (tensor_reducer.DISTRIBUTIONS) -> the
# kernel's PART_* bit.
PARTS = {"histograms": 1, "density": 2, "sampling": 4}


class ReduceArgs(ctypes.Structure):
    """The kernel's argument: one layer's batch (read only), then the layer's STATE (updated in place).

    Arrays are C-contiguous.
    """

    _fields_ = [
        ("x_gate", _f32), ("x_in", _f32), ("act", _f32),   # [B, T, n]; x_in before the weight convention
        ("gate_stride", ctypes.c_int64), ("in_stride", ctypes.c_int64),  # floats between rows of x_gate, x_in
        ("sign", _f32),                                     # [n] the weight convention
        ("bounds", _f32),                                   # [n, Q, 3] the interval bounds
        ("lengths", _i64), ("text_ids", _i64),              # [B]
        ("row_map", _i64),                                  # [B * T] an expert's compact rows (-1: routed elsewhere), or null
        ("weight", _f32),                                   # [rows] router weight of each row of x_gate, or null
        ("batch", ctypes.c_int64), ("seq_len", ctypes.c_int64), ("n", ctypes.c_int64),
        ("before", ctypes.c_int64), ("after", ctypes.c_int64), ("k", ctypes.c_int64), ("window", ctypes.c_int64),
        ("seed", ctypes.c_int64), ("layer", ctypes.c_int64), ("first_neuron", ctypes.c_int64),
        ("parts", ctypes.c_int32),
        *((name, ctypes.POINTER(ctype)) for name, ctype, _, _ in STATE),
        # With weight: the unit's [n, Q] slices of its layer's router-weighted hook_post (reducer_interface.Contribution).
        ("weighted_min", _f32), ("weighted_max", _f32), ("weighted_sum", _f64), ("weighted_count", _i64),
        ("n_threads", ctypes.c_int32),
    ]
    INPUTS = ("x_gate", "x_in", "act", "sign", "bounds", "lengths", "text_ids", "row_map", "weight")
    ROWS = ("x_gate", "x_in")  # rows with a stride of their own: only their columns need be contiguous

    def set(self, **values) -> None:
        """Set these fields. Arrays and tensors become pointers, after a check of their dtype and memory order;
        None is a null pointer (an optional input left out)."""
        for name, value in values.items():
            ctype = _field_types().get(name)
            if ctype is None:
                raise TypeError(f"ReduceArgs has no field {name}")
            if issubclass(ctype, ctypes._Pointer):
                value = ctype() if value is None else _pointer(name, value, ctype)
            setattr(self, name, value)

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


@cache
def _field_types() -> dict[str, type]:
    return dict(ReduceArgs._fields_)


@cache
def _dtype(ctype: type) -> np.dtype:
    return np.dtype(ctype)


def _pointer(name: str, value: np.ndarray | torch.Tensor, pointer: type) -> ctypes._Pointer:
    array = value.numpy() if isinstance(value, torch.Tensor) else value
    dtype = _dtype(pointer._type_)
    rows = name in ReduceArgs.ROWS
    laid_out = array.flags.c_contiguous or rows and array.strides[-1:] == (dtype.itemsize,)
    if array.dtype != dtype or not laid_out:
        raise TypeError(f"{name}: want a {'column' if rows else 'C'}-contiguous {dtype} array, got "
                        f"{array.dtype} strides {array.strides}")
    return ctypes.cast(array.ctypes.data, pointer)


def kernel_header() -> str:
    """What the kernel's source is compiled with in front of it: the rules and the argument struct."""
    return "#include <cstddef>\n#include <cstdint>\n" + rules.c_header() + ReduceArgs.c_declaration()


class KernelUnavailable(RuntimeError):
    """The CPU kernel cannot be built here (no C++ compiler, or it failed)."""


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
    lib = cache_dir() / f"reduce_cpu-{key}.so"
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

    # ReduceArgs.parts: every distribution. A class attribute, so that a benchmark can narrow it from outside
    # to measure what each part costs (as TensorDistributions.parts).
    parts: int = sum(PARTS.values())

    def __init__(self, setup: LayerSetup, buffer: ActBuffer) -> None:
        self.setup = setup
        self.buffer = buffer
        self.sign = _contiguous_f32(setup.sign)
        sizes = {"n": setup.n, "Q": rules.N_QUADRANTS, "L": rules.N_LISTS, "k": setup.k, "W": setup.window,
                 "H": rules.N_HIST_HOOKS, "S": rules.HIST_SLOTS, "D": rules.DENSITY_BINS, "R": rules.SAMPLE_SLOTS}
        self.arrays = {name: np.full([sizes[d] for d in dims.split()], initial, np.dtype(ctype))
                      for name, ctype, dims, initial in STATE}
        # Entries move as better ones enter, windows never do: each entry carries the row of its window.
        self.arrays["top_slot"][:] = np.arange(setup.k, dtype=np.int32)
        self.arrays["samp_slot"][:] = np.arange(rules.SAMPLE_SLOTS, dtype=np.int32)
        self.bounds = setup.interval_bounds
        # The fields no call changes, set once (load_state writes the arrays in place); each update sets the rest.
        self.args = ReduceArgs()
        self.args.set(sign=self.sign, bounds=self.bounds, before=setup.before, after=setup.after, k=setup.k,
                      window=setup.window, seed=setup.seed, layer=setup.layer, first_neuron=setup.first_neuron,
                      **self.arrays)

    def state(self) -> dict[str, np.ndarray]:
        return dict(self.arrays)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        for name, _, _, _ in STATE:
            # In place: the arrays' memory is what the kernel is handed.
            self.arrays[name][...] = checked_state(state, name, self.arrays[name])

    def update(self, x_gate: torch.Tensor, x_in: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None,
               contribution: Contribution | None = None) -> None:
        x_gate, x_in = _float_rows(x_gate), _float_rows(x_in)
        B, T = batch.valid.shape
        n = x_gate.shape[-1]
        self.args.set(
            x_gate=x_gate, x_in=x_in, gate_stride=x_gate.stride(0), in_stride=x_in.stride(0),
            act=self.buffer.act(self.setup.act_fn, x_gate), lengths=batch.lengths,
            text_ids=batch.text_ids, row_map=None if rows is None else rows.to(torch.int64).contiguous().numpy(),
            batch=B, seq_len=T, n=n, parts=self.parts, n_threads=torch.get_num_threads(), **_weighted(contribution))
        load_kernel().gluscope_reduce_update(ctypes.byref(self.args))

    def finish(self) -> LayerStatistics:
        state = self.arrays
        # Windows sit in slot order; put them in the order of their entries.
        def by_entry(bits: np.ndarray, slot: np.ndarray) -> np.ndarray:
            k, window = bits.shape[-2:]
            rows = (np.arange(slot.size // k)[:, None] * k + slot.reshape(-1, k)).reshape(-1)
            return bits.reshape(-1, window).take(rows, axis=0).reshape(bits.shape).view(np.float16)
        handed = {f.name: state[f.name] for f in dataclasses.fields(ReducedLayer)}
        handed.update(win_gate=by_entry(state["win_gate"], state["top_slot"]),
                      win_in=by_entry(state["win_in"], state["top_slot"]),
                      samp_win_gate=by_entry(state["samp_win_gate"], state["samp_slot"]),
                      samp_win_in=by_entry(state["samp_win_in"], state["samp_slot"]))
        return finish_layer(ReducedLayer(**handed), self.setup)


def _weighted(contribution: Contribution | None) -> dict[str, torch.Tensor | None]:
    """ReduceArgs' weight and weighted_* fields: the kernel writes the running values in place."""
    if contribution is None:
        return dict(weight=None, weighted_min=None, weighted_max=None, weighted_sum=None, weighted_count=None)
    return dict(weight=_contiguous_f32(contribution.weight), weighted_min=contribution.value_min,
                weighted_max=contribution.value_max, weighted_sum=contribution.value_sum,
                weighted_count=contribution.value_count)


def _float_rows(t: torch.Tensor) -> torch.Tensor:
    """float32 [rows, n] of unit column stride: a view of t where it is one (an expert's x_gate and x_in are column
    halves of one product, which the kernel reads in place instead of copying)."""
    if t.device.type != "cpu":
        raise ValueError("the CPU kernel takes CPU tensors")
    rows = t.detach().to(torch.float32).reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _contiguous_f32(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError("the CPU kernel takes CPU tensors")
    return t.detach().to(torch.float32).contiguous()


def _tops_kernel(name: str, product: torch.Tensor, floats: tuple[torch.Tensor, ...], ids: tuple[torch.Tensor, ...]):
    """The kernel's function `name` for a CPU float32 product with unit column stride and contiguous float32 and
    int64 tops; None where the kernel is unavailable or the tensors do not suit it."""
    def fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
        return t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
    if (not fits(product[:1], torch.float32) or product.stride(1) != 1
            or not all(fits(t, torch.float32) for t in floats) or not all(fits(t, torch.int64) for t in ids)):
        return None
    try:
        fn = getattr(load_kernel(), name)
    except (KernelUnavailable, OSError):
        return None
    fn.restype = None
    return fn


def column_tops(product: torch.Tensor, key0: torch.Tensor, id0: torch.Tensor, key1: torch.Tensor, id1: torch.Tensor,
                first_id: int) -> bool:
    """Merge a CPU float32 [R, C] product into running tops per column, in place (gluscope_column_tops).

    key0 [C, top]: the largest entries, decreasing; key1: the smallest, negated; ids first_id + row. -inf marks
    an empty place. False (nothing done) where the kernel is unavailable or the tensors do not suit it.
    """
    fn = _tops_kernel("gluscope_column_tops", product, (key0, key1), (id0, id1))
    if fn is None:
        return False
    R, C = product.shape
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn(ptr(product.data_ptr()), i64(R), i64(C), i64(product.stride(0)), i64(first_id), ptr(key0.data_ptr()),
       ptr(id0.data_ptr()), ptr(key1.data_ptr()), ptr(id1.data_ptr()), i64(key0.shape[1]),
       ctypes.c_int32(max(1, min(torch.get_num_threads(), C))))
    return True


def abs_tops(product: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], row_first: int,
             cols: tuple[torch.Tensor, torch.Tensor, torch.Tensor], col_first: int) -> bool:
    """Merge a CPU float32 [R, C] product into running tops by |value| per row and per column, in place.

    rows, cols: (key [R or C, top] = |value| decreasing, -inf empty; id; signed value); a row's entries get
    ids row_first + column, a column's col_first + row (gluscope_abs_tops). False where the kernel cannot.
    """
    fn = _tops_kernel("gluscope_abs_tops", product, (rows[0], rows[2], cols[0], cols[2]), (rows[1], cols[1]))
    if fn is None:
        return False
    R, C = product.shape
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn(ptr(product.data_ptr()), i64(R), i64(C), i64(product.stride(0)), ptr(rows[0].data_ptr()),
       ptr(rows[1].data_ptr()), ptr(rows[2].data_ptr()), i64(row_first), ptr(cols[0].data_ptr()),
       ptr(cols[1].data_ptr()), ptr(cols[2].data_ptr()), i64(col_first), i64(rows[0].shape[1]),
       ctypes.c_int32(max(1, min(torch.get_num_threads(), R, C))))
    return True
