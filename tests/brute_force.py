"""Shared pieces of the tests' independent references: what the recorder writes, recomputed another way."""

from __future__ import annotations

import pytest

# schema.sql's count lists as rows of (bin, count), the way its comment reads them; zeros between counts kept.
HISTOGRAM_CELLS = ("(SELECT layer, neuron, quadrant, hook, first_bin + generate_subscripts(counts, 1) - 1 AS bin, "
                   "unnest(counts) AS count FROM histograms)")
DENSITY_CELLS = ("(SELECT layer, neuron, gate_bin, first_in_bin + generate_subscripts(counts, 1) - 1 AS in_bin, "
                 "unnest(counts) AS count FROM density)")


def require_kernel() -> None:
    """Skip, saying why, where the CPU kernel cannot be built (`make test` installs g++ where it can)."""
    from gluscope.recorder.kernel_reducer import KernelUnavailable, load_kernel
    try:
        load_kernel()
    except (KernelUnavailable, OSError) as e:
        pytest.skip(f"the CPU kernel cannot be built here: {e}")


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def sample_hash(seed: int, layer: int, neuron: int, text_id: int, position: int) -> int:
    """The documented sample hash of a token for a neuron (schema.sql, samples), written out in Python."""
    token = _fmix32(_fmix32(seed ^ text_id) ^ position)
    salt = _fmix32(_fmix32(seed ^ layer) ^ neuron)
    return (((token ^ salt) * 0x9E3779B1) & 0xFFFFFFFF) >> 1
