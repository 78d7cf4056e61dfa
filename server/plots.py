"""Small plots drawn on the server: histograms and the joint density as SVG, a layer's scatter as PNG.

SVG is written here as text, so every piece of text that goes into it passes
through `_text` (markupsafe's escape): a label may one day hold a token or a
model's name, and an SVG inlined in a page runs a <script> like HTML does.
The PNG is drawn with NumPy and compressed with zlib, fast and small
enough to draw per layer (see docs/performance.md), and the page works
without JavaScript (an <input type="image"> sends the click's pixel, and
the server finds the nearest neuron; see views.scatter_click).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Sequence

import numpy as np
from markupsafe import Markup, escape

from gluscope.schema import QUADRANT_SLUGS

SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _text(s: object) -> str:
    return str(escape(str(s)))


def _n(x: float) -> str:
    """A coordinate, short."""
    return f"{x:.1f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def power_label(e: int) -> str:
    """2^e, readable: 0.125 … 1024 as decimals, beyond that 2⁻¹² or 2¹²."""
    if -3 <= e <= 10:
        return f"{2.0 ** e:g}"
    return "2" + str(e).translate(SUPERSCRIPT)


@lru_cache(maxsize=4096)  # the edges are a few hundred fixed values
def edge_label(v: float | None) -> str:
    """A bin edge as the plots write it: a power of two where it is one, else 3 significant digits."""
    if v is None:
        return "∞"
    if v == 0:
        return "0"
    m, e = math.frexp(abs(v))
    sign = "−" if v < 0 else ""
    if m == 0.5:
        return sign + power_label(e - 1)
    return sign + f"{abs(v):.3g}"


@lru_cache(maxsize=4096)
def _edge(v: float | None) -> str:
    """edge_label, escaped (it writes digits and signs only, but all text in a plot goes through _text)."""
    return _text(edge_label(v))


@dataclass
class Band:
    """A clickable range of |value| drawn over a histogram: one interval of the examples across the range."""

    lo: float            # |value| >= lo
    hi: float | None     # |value| < hi; None: unbounded
    href: str
    label: str           # the tooltip


def magnitude_slots(edges: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map signed bins onto bins of |value|, both signs together (the value bins are mirrored around 0).

    Returns (slot of each signed bin, lower |value| of each slot, upper |value| of each slot; inf when open).
    Within a quadrant a value has one sign, except an exact 0 (or an underflow to 0), which lands on the
    positive side of 0: counting by magnitude keeps such a token in the picture.
    """
    lo = np.array([-math.inf if v is None else v for v in edges[:-1]], np.float64)
    hi = np.array([math.inf if v is None else v for v in edges[1:]], np.float64)
    mag_lo = np.where(lo >= 0, lo, np.abs(hi))
    mag_hi = np.where(lo >= 0, hi, np.abs(lo))
    lows = np.unique(mag_lo)
    slot = np.searchsorted(lows, mag_lo)
    highs = np.full(len(lows), math.inf)
    highs[slot] = mag_hi
    return slot, lows, highs


def histogram_svg(counts: Sequence[int], slot: np.ndarray, lows: np.ndarray, highs: np.ndarray,
                  view: tuple[int, int], sign: int, slug: str, caption: str, bands: Sequence[Band] = (),
                  width: int = 270, height: int = 150) -> Markup:
    """One quadrant's histogram over |value| (log scale, two bins per octave), counts on a linear axis.

    counts: per signed bin (as the JSON body has them); slot, lows, highs: magnitude_slots; view: the slots
    shown [first, stop), shared by the four quadrants of a value so that they line up.
    """
    per_slot = np.zeros(len(lows), np.int64)
    np.add.at(per_slot, slot[:len(counts)], np.asarray(counts, np.int64))
    first, stop = view
    shown = per_slot[first:stop]
    left, right, top, bottom = 40, 8, 16, 34
    pw, ph = width - left - right, height - top - bottom
    n = max(stop - first, 1)
    bw = pw / n
    peak = int(shown.max(initial=0))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="hist" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img">',
           f"<title>{_text(caption)}</title>"]
    x_of = lambda s: left + (s - first) * bw  # noqa: E731
    bars = {}
    for j, c in enumerate(shown.tolist()):
        if not c:
            continue
        h = ph * c / peak
        s = first + j
        hi = highs[s]
        rng = f"[{_edge(float(lows[s]))}, {_edge(None if math.isinf(hi) else float(hi))})"
        bars[s] = (f'<rect x="{x_of(s) + 0.4:.1f}" y="{top + ph - h:.1f}" width="{max(bw - 0.8, 0.6):.1f}" '
                   f'height="{h:.1f}"><title>|value| in {rng}: {c:,} tokens</title></rect>')
    # Each band (an interval) is a link holding its background, its key under the axis and its bars: a click
    # anywhere on it opens the interval's examples, and each bar keeps its own tooltip.
    for i, b in enumerate(bands):
        s0 = int(np.searchsorted(lows, b.lo))
        s1 = stop if b.hi is None else int(np.searchsorted(lows, b.hi))
        x0, x1 = max(x_of(s0), left), min(x_of(s1), left + pw)
        inside = "".join(bars.pop(s) for s in sorted(bars) if s0 <= s < s1)
        if x1 <= x0:
            continue
        out.append(f'<a href="{_text(b.href)}" class="interval" data-interval="{i}"><title>{_text(b.label)}</title>'
                   f'<rect class="band band-{i % 2}" x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" height="{ph}"/>'
                   f'<rect class="band-key" x="{x0:.1f}" y="{top + ph + 20}" width="{x1 - x0:.1f}" height="6"/>'
                   f'<g class="bar q-{slug}">{inside}</g></a>')
    sign_text = "−" if sign < 0 else ""
    out.append(f'<g class="bar q-{slug}">{"".join(bars[s] for s in sorted(bars))}</g>')
    # Axes: ticks at octaves, labelled every few so that they stay apart.
    out.append(f'<path class="axis" d="M{left},{top}V{top + ph}H{left + pw}"/>')
    octaves = [(s, int(math.log2(lows[s]))) for s in range(first, stop + 1)
               if s < len(lows) and lows[s] > 0 and math.log2(lows[s]).is_integer()]
    step = max(1, math.ceil(len(octaves) / 6))
    for s, e in octaves:
        x = x_of(s)
        out.append(f'<path class="tick" d="M{_n(x)},{top + ph}v3"/>')
        if e % step == 0:
            out.append(f'<text x="{_n(x)}" y="{top + ph + 13}" text-anchor="middle">'
                       f'{_text(sign_text + power_label(e))}</text>')
    out.append(f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{peak:,}</text>'
               f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">0</text>')
    out.append(f'<text class="cap" x="{left}" y="{top - 5}">{_text(caption)}</text></svg>')
    return Markup("".join(out))


def density_svg(counts: Sequence[Sequence[int]], gate_edges: Sequence[float | None], in_edges: Sequence[float | None],
                frequencies: dict[str, float | None], labels: dict[str, str], cell: int | None = None) -> Markup:
    """The joint density of (x_gate, x_in) as a heatmap: log-spaced signed bins, the quadrant lines at 0,
    each cell coloured by its quadrant's hue with opacity by log count, each quadrant's frequency written
    in its corner."""
    grid = np.asarray(counts, np.int64).reshape(len(gate_edges) - 1 if gate_edges else 0,
                                                len(in_edges) - 1 if in_edges else 0)
    ng, ni = grid.shape
    cell = cell or max(4, min(12, 320 // max(ng, ni, 1)))
    left, top, right, bottom = 46, 22, 10, 38
    pw, ph = max(ng, 1) * cell, max(ni, 1) * cell
    width, height = left + pw + right, top + ph + bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="density" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img"><title>joint density of x_gate and x_in</title>',
           f'<rect class="frame" x="{left}" y="{top}" width="{pw}" height="{ph}"/>']
    peak = math.log1p(int(grid.max(initial=0)))
    # Labels once per edge (escaped once); the cells of a quadrant in one %-formatting call (a neuron has
    # hundreds of cells, and building each string in Python was most of the fragment's time).
    g_label = [_edge(v) for v in gate_edges]
    i_label = [_edge(v) for v in in_edges]
    g_pos = np.array([v is not None and v >= 0 for v in gate_edges[:-1]], bool)
    i_pos = np.array([v is not None and v >= 0 for v in in_edges[:-1]], bool)
    gi, ii = np.nonzero(grid)
    c = grid[gi, ii]
    alpha = (0.15 + 0.85 * np.log1p(c) / peak) if peak else np.ones(len(c))
    quadrant = np.where(g_pos[gi], 0, 2) + np.where(i_pos[ii], 0, 1)
    cell_svg = (f'<rect x="%d" y="%d" width="{cell}" height="{cell}" fill-opacity="%.2f">'
                '<title>x_gate [%s, %s) · x_in [%s, %s): %d</title></rect>')
    g_lo, g_hi, i_lo, i_hi = (np.array(v, object) for v in (g_label[:-1], g_label[1:], i_label[:-1], i_label[1:]))
    for q, slug in enumerate(QUADRANT_SLUGS):
        at = np.flatnonzero(quadrant == q)
        if not len(at):
            continue
        i, j = gi[at], ii[at]
        fields = zip((left + i * cell).tolist(), (top + ph - (j + 1) * cell).tolist(), alpha[at].tolist(),
                     g_lo[i], g_hi[i], i_lo[j], i_hi[j], c[at].tolist())
        out.append(f'<g class="cell q-{slug}">' + (cell_svg * len(at)) % tuple(chain.from_iterable(fields)) + "</g>")

    def zero_at(edges, n):  # the index of the edge 0 (the quadrant line), clipped to the plot
        for k, v in enumerate(edges):
            if v is not None and v >= 0:
                return k
        return n

    zx, zy = left + zero_at(gate_edges, ng) * cell, top + ph - zero_at(in_edges, ni) * cell
    out.append(f'<path class="qline" d="M{zx},{top}V{top + ph}M{left},{zy}H{left + pw}"/>')
    # Each quadrant's frequency, in its own corner.
    corners = {"pp": (left + pw - 3, top + 11, "end"), "pn": (left + pw - 3, top + ph - 4, "end"),
               "np": (left + 3, top + 11, "start"), "nn": (left + 3, top + ph - 4, "start")}
    for slug, (x, y, anchor) in corners.items():
        f = frequencies.get(slug)
        shown = "—" if f is None else f"{100 * f:.1f}%"
        out.append(f'<text class="qfreq q-{slug}-text" x="{x}" y="{y}" text-anchor="{anchor}">'
                   f'{_text(labels[slug])} {_text(shown)}</text>')
    # Tick labels at a few edges of each axis (the outer ones, and 0).
    for k in _ticks(gate_edges, cell, 30):
        x = left + k * cell
        out.append(f'<path class="tick" d="M{x},{top + ph}v3"/><text x="{x}" y="{top + ph + 13}" '
                   f'text-anchor="middle">{_text(edge_label(gate_edges[k]))}</text>')
    for k in _ticks(in_edges, cell, 13):
        y = top + ph - k * cell
        out.append(f'<path class="tick" d="M{left - 3},{y}h3"/><text x="{left - 5}" y="{y + 3}" '
                   f'text-anchor="end">{_text(edge_label(in_edges[k]))}</text>')
    out.append(f'<text class="cap" x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle">x_gate (hook_pre)</text>'
               f'<text class="cap" x="{left}" y="{top - 8}">x_in (hook_pre_linear)</text></svg>')
    return Markup("".join(out))


def _ticks(edges: Sequence[float | None], cell: int, spacing: int) -> list[int]:
    """Edges worth labelling: 0 first, then powers of 2^4 outwards from it, each at least `spacing` pixels from
    the labels already kept (the bins next to 0 are narrow in value but as wide as any on the plot)."""
    candidates = []
    for k, v in enumerate(edges):
        if v is None:
            continue
        m, e = math.frexp(abs(v))
        if v == 0 or (m == 0.5 and (e - 1) % 4 == 0):
            candidates.append((0 if v == 0 else abs(e - 1) + 1, k))
    kept: list[int] = []
    for _, k in sorted(candidates):
        if all(abs(k - j) * cell >= spacing for j in kept):
            kept.append(k)
    return sorted(kept)


# --- the scatter, as a PNG ------------------------------------------------------

@dataclass(frozen=True)
class ScatterFrame:
    """Where a scatter's data lands on its image, so that the page can label the axes and a click on the
    image (its pixel) can be read back as data coordinates."""

    width: int
    height: int
    left: int
    top: int
    plot_width: int
    plot_height: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        px = self.left + (np.asarray(x, np.float64) - x0) / (x1 - x0) * (self.plot_width - 1)
        py = self.top + (1 - (np.asarray(y, np.float64) - y0) / (y1 - y0)) * (self.plot_height - 1)
        return px, py

    def x_ticks(self) -> list[tuple[float, float]]:
        return [(v, float(self.to_pixels(np.array([v]), np.array([self.y_range[0]]))[0][0]))
                for v in nice_ticks(*self.x_range)]

    def y_ticks(self) -> list[tuple[float, float]]:
        return [(v, float(self.to_pixels(np.array([self.x_range[0]]), np.array([v]))[1][0]))
                for v in nice_ticks(*self.y_range)]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * span:
        ticks.append(round(v, 10))
        v += step
    return ticks


def scatter_frame(x: np.ndarray, y: np.ndarray, width: int = 640, height: int = 400,
                  x_range: tuple[float, float] | None = None) -> ScatterFrame:
    """The frame of a scatter of these points: x over x_range (or the data's), y over the data's range padded."""
    def span(v: np.ndarray) -> tuple[float, float]:
        v = v[np.isfinite(v)]
        if not len(v):
            return 0.0, 1.0
        lo, hi = float(v.min()), float(v.max())
        pad = (hi - lo) * 0.04 or 0.5
        return lo - pad, hi + pad
    return ScatterFrame(width, height, 8, 8, width - 16, height - 16,
                        x_range or span(np.asarray(x, np.float64)), span(np.asarray(y, np.float64)))


def scatter_png(x: np.ndarray, y: np.ndarray, frame: ScatterFrame, rgb: tuple[int, int, int] = (29, 35, 42)) -> bytes:
    """The points as dots of 3x3 pixels on white, darker where they pile up, with grid lines at the ticks."""
    h, w = frame.height, frame.width
    px, py = frame.to_pixels(x, y)
    ok = np.isfinite(px) & np.isfinite(py)
    cx = np.clip(np.rint(px[ok]).astype(np.int64), 0, w - 1)
    cy = np.clip(np.rint(py[ok]).astype(np.int64), 0, h - 1)
    # Points per pixel (bincount: np.add.at is far slower, see docs/performance.md), then each spread over a 3x3
    # dot by adding shifted copies: a point weighs 1 at its pixel and 0.5 around it.
    hits = np.bincount(cy * w + cx, minlength=h * w).reshape(h, w).astype(np.float32)
    padded = np.pad(hits, 1)
    ink = hits * 0.5
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            ink += 0.5 * padded[dy:dy + h, dx:dx + w]
    # One dot is clearly dark, a pile saturates instead of clipping: LEVELS shades of it per kind of
    # background pixel (plain, grid line, frame), written as a palette image, one byte a pixel.
    level = np.rint((LEVELS - 1) * (1.0 - np.exp(-1.4 * ink))).astype(np.uint8)
    background = np.zeros((h, w), np.uint8)
    for _, gx in frame.x_ticks():
        background[frame.top:frame.top + frame.plot_height, int(round(gx))] = 1
    for _, gy in frame.y_ticks():
        background[int(round(gy)), frame.left:frame.left + frame.plot_width] = 1
    l, t, r, b = frame.left, frame.top, frame.left + frame.plot_width - 1, frame.top + frame.plot_height - 1
    background[t:b + 1, [l, r]] = 2
    background[[t, b], l:r + 1] = 2
    paper = np.array([(255, 255, 255), (232, 235, 238), (160, 168, 176)], np.float32)
    k = np.arange(LEVELS, dtype=np.float32)[None, :, None] / (LEVELS - 1)
    palette = np.rint(paper[:, None, :] + (np.asarray(rgb, np.float32) - paper[:, None, :]) * k).astype(np.uint8)
    background *= LEVELS
    background += level
    return encode_png(background, palette.reshape(-1, 3))


LEVELS = 85  # shades per background: 3 x 85 = 255 palette entries
# zlib's level 1: on a flat plot it takes a fraction of level 6's time for a file a little larger.
ZLIB_LEVEL = 1


def encode_png(index: np.ndarray, palette: np.ndarray) -> bytes:
    """An 8-bit palette PNG of an [h, w] uint8 array of indexes into palette ([n <= 256, 3] uint8), filter 0 on
    every row (small enough for flat plots)."""
    h, w = index.shape
    raw = np.zeros((h, 1 + w), np.uint8)
    raw[:, 1:] = index

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", palette.astype(np.uint8).tobytes())
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), ZLIB_LEVEL)) + chunk(b"IEND", b""))


def nearest(px: np.ndarray, py: np.ndarray, x: float, y: float) -> int:
    """Index of the point nearest to pixel (x, y); -1 when there is none."""
    d = (px - x) ** 2 + (py - y) ** 2
    d = np.where(np.isfinite(d), d, np.inf)
    if not len(d) or not np.isfinite(d.min()):
        return -1
    return int(np.argmin(d))
