"""act(x_gate) in NumPy, for every activation name the recorder accepts (gluscope.schema.ACT_FNS).

The windows store x_gate and x_in only; act and hook_post are computed here
from them, in float64, the way the model computes them.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from gluscope.schema import ACT_FNS, QUICK_GELU_ALPHA

_erf = np.frompyfunc(math.erf, 1, 1)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-QUICK_GELU_ALPHA * x))


FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"silu": _silu, "gelu": _gelu, "gelu_tanh": _gelu_tanh,
                                                            "quick_gelu": _quick_gelu}
assert set(ACT_FNS.values()) == set(FUNCTIONS), "every function gluscope.schema.ACT_FNS names needs a NumPy one"


def activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The function metadata.act_fn names; a KeyError for a name outside ACT_FNS (db.py refuses such files)."""
    return FUNCTIONS[ACT_FNS[name]]
