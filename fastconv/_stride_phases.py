"""grad_x of strided convolutions by stride phases, each summed in place by the
pixel-row kernel.

grad_x of a convolution with stride s is ``col2im(W.T @ dY)``: every dY value scatters
into KH*KW input positions. Seen from grad_x instead, input row ``ix = s*i + py``
(row phase ``py < s``) meets only the taps ``kh = (py + pad_top) mod s + s*t``, each
reading dY row ``i + (py + pad_top - kh) / s``; likewise for columns. So each of the
``s_h * s_w`` phases of grad_x is a stride-1 correlation of dY (C_out channels in,
C_in out) with its own few taps of W: 1x1, 1x2, 2x1 and 2x2 for a 3x3 stride-2 layer,
9 taps in all, as many products as the GEMM's, but no column matrix to write and
scatter back, and a kernel that runs near the FMA peak.

``fastconv._conv_direct.input_grad_phases`` runs them: a work item is a band of phase
rows of one image, all phases, so each cache line of grad_x is completed by one item
(phase after phase over the whole batch, each line written a quarter at a time, grad_x
ran only 1.01-1.03x GEMM + col2im: README "Stride phases"). Each phase is the pixel-row
kernel's NCHW layer (``fastconv._direct.forward_pixel_rows``) with its outputs stored
``s_w`` apart.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from fastconv import _conv_direct, _direct
from fastconv._padding import source_map
from fastconv._validation import ConvGeometry
from fastconv._workspace import workspace

__all__ = ["applies", "pays_off", "backward_input"]


def applies(geometry: ConvGeometry) -> bool:
    """Whether grad_x can run by stride phases: a plain (ungrouped) NCHW layer with
    stride > 1 on some axis, dilation 1, zero padding, and a kernel at least as large as
    the stride on both axes (every phase meets some taps)."""
    g = geometry
    return (g.groups == 1 and g.stride_h * g.stride_w > 1
            and (g.dilation_h, g.dilation_w) == (1, 1) and g.padding_mode == "zeros"
            and g.KH >= g.stride_h and g.KW >= g.stride_w)


#: ``algorithm="auto"`` takes the stride phases for grad_x from this many input channels
#: (the kernel's vectors run along grad_x's channels). Against GEMM + col2im (interleaved,
#: median per-call ratio, 2 / 1 threads, float32, 8 images unless said; 3x3 stride 2
#: unless said): 128 -> 128 on 56x56 (resnet-3x3-s2) 1.09-1.28x / 1.15-1.17x, one image
#: 0.95-0.98x / 1.14-1.17x; 64 -> 64 on 56x56 1.07x; 256 -> 256 on 28x28 1.02-1.42x /
#: 1.23x, on 14x14 1.31x / 1.43x; 512 -> 512 on 14x14 1.01-1.09x / 1.10x; 256 -> 128
#: 1.21x, 128 -> 256 1.12x; 4x4 stride 2 64 -> 128 on 32x32 1.10-1.20x / 1.30x, 128 ->
#: 256 on 16x16 1.33x / 1.47x; 5x5 stride 2 64 -> 64 1.27x / 1.33x; float64 128 -> 128
#: 1.23x / 1.16x, 64 -> 64 1.21x / 1.11x. With fewer channels it lost or tied: 32 -> 64
#: on 112x112 0.97x / 1.09x, 16 -> 32 0.98x / 1.03x, 8 -> 16 0.82x, 3 -> 64 7x7 (resnet-
#: stem) 0.26x, though 16 -> 64 7x7 won 1.08x / 1.15x.
AUTO_MIN_CHANNELS = 64


def pays_off(geometry: ConvGeometry, itemsize: int = 4) -> bool:
    """Whether ``algorithm="auto"`` takes the stride phases for grad_x: where they
    :func:`applies`, with AUTO_MIN_CHANNELS input channels or more and some phase of
    more than one tap. Where every phase is one tap (a kernel the size of its stride:
    2x2 stride 2, 3x3 stride 3, 4x4 stride 4) col2im only moves each column value to its
    place, and the GEMM won (0.81-0.98x)."""
    g = geometry
    return (applies(g) and g.C >= AUTO_MIN_CHANNELS
            and (g.KH > g.stride_h or g.KW > g.stride_w))


class _AxisPhase(NamedTuple):
    """One axis of a phase: the taps that meet it and its correlation's geometry."""

    taps: tuple           # kernel indices, by increasing dY offset (decreasing index)
    size: int             # grad_x rows (columns) in the phase
    before: int           # the correlation's padding before dY (negative: dY cropped)
    after: int


def _axis_phase(phase: int, size: int, kernel: int, stride: int, pad: int,
                dy_size: int) -> _AxisPhase:
    """Row (column) phase ``phase``: grad_x index ``stride*i + phase`` takes tap ``k``
    of dY index ``i + (phase + pad - k) / stride`` where that divides."""
    taps = tuple(k for k in range(kernel - 1, -1, -1) if (phase + pad - k) % stride == 0)
    count = max(0, -(-(size - phase) // stride))
    before = (taps[0] - phase - pad) // stride
    # the correlation's output count is dy_size + before + after - len(taps) + 1
    after = count - dy_size - before + len(taps) - 1
    return _AxisPhase(taps, count, before, after)


class _PhasePlan(NamedTuple):
    """The phases of a geometry as ``input_grad_phases`` reads them."""

    phases: np.ndarray    # (P, PHASE_FIELDS), see _conv_direct.input_grad_phases
    rowmaps: np.ndarray   # (P, longest): each phase's rowmap, padded with -1
    colmaps: np.ndarray
    offsets: np.ndarray
    tap_row: np.ndarray   # (KH*KW,): tap (kh, kw)'s first row in the packed filters
    tap_step: np.ndarray  # (KH*KW,): its rows' step from filter to filter (-1: no phase)
    weight_rows: int      # rows of the packed filters
    band_rows: int
    band_elements: int    # a thread's rows: the largest phase band's
    pointers: int         # a thread's row pointers
    vectors: int


def _padded(arrays) -> np.ndarray:
    longest = max(len(a) for a in arrays)
    out = np.full((len(arrays), longest), -1, np.intp)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def _phase_plan(g: ConvGeometry, n_threads: int) -> _PhasePlan:
    rows = [_axis_phase(py, g.H, g.KH, g.stride_h, g.pad_top, g.OH) for py in range(g.stride_h)]
    cols = [_axis_phase(px, g.W, g.KW, g.stride_w, g.pad_left, g.OW)
            for px in range(g.stride_w)]
    table, rowmaps, colmaps, offsets, geometries = [], [], [], [], []
    tap_row = np.full(g.KH * g.KW, -1, np.intp)
    tap_step = np.zeros(g.KH * g.KW, np.intp)
    wrow = 0
    for py, rp in enumerate(rows):
        for px, cp in enumerate(cols):
            if rp.size == 0 or cp.size == 0:
                continue
            KH, KW = len(rp.taps), len(cp.taps)
            # the phase as a stride-1 layer of dY: C_out channels in, C_in out
            pg = ConvGeometry(g.N, g.F, g.OH, g.OW, g.C, KH, KW, 1, 1, rp.before, rp.after,
                              cp.before, cp.after, 1, 1, rp.size, cp.size)
            width = cp.size + KW - 1
            lo = min(width, max(0, cp.before))
            hi = max(lo, min(width, g.OW + cp.before))
            row = np.array((py, px, rp.size, cp.size, KH, g.F * KW, lo, hi, cp.before, width,
                        True, wrow), np.intp)
            table.append(row)
            rowmaps.append(_direct._row_plan(pg).rowmap)
            colmaps.append(source_map(width, g.OW, cp.before, cp.after, "zeros"))
            kw, c = np.arange(KW, dtype=np.intp), np.arange(g.F, dtype=np.intp)
            offsets.append((c[:, None] * width + kw[None, :]).reshape(-1))
            # phase row t, dY channel f, column u: row wrow + (t*F + f)*KW + u
            for t, kh in enumerate(rp.taps):
                for u, kw in enumerate(cp.taps):
                    tap_row[kh * g.KW + kw] = wrow + t * g.F * KW + u
                    tap_step[kh * g.KW + kw] = KW
            geometries.append(pg)
            wrow += KH * KW * g.F
    # one band for every phase: the one whose rows take the most room sets it
    widest = max(geometries, key=lambda pg: pg.KH * (pg.OW + pg.KW - 1))
    band = _direct._band_rows(widest, g.F * widest.KH * (widest.OW + widest.KW - 1),
                              n_threads)
    band_elements = max((band + pg.KH - 1) * (pg.OW + pg.KW - 1) * g.F for pg in geometries)
    pointers = 3 * band * max(pg.KH for pg in geometries)
    vectors = 2 if max(pg.OW for pg in geometries) < _direct.NARROW_ROW else 4
    for array in (tap_row, tap_step):
        array.flags.writeable = False
    return _PhasePlan(_padded(table), _padded(rowmaps), _padded(colmaps), _padded(offsets),
                      tap_row, tap_step, wrow, band, band_elements, pointers, vectors)


def pack_weight(weight: np.ndarray, geometry: ConvGeometry, dtype, n_threads: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """The phases' filters for :func:`backward_input`: phase p's taps of ``weight``
    (F, C, KH, KW) with the channel axes swapped, packed as
    :func:`fastconv._direct.pack_weight_rows` packs NCHW rows, stacked by rows; into
    ``out`` (that many C-contiguous elements of ``dtype``) where given."""
    g = geometry
    plan = _phase_plan(g, n_threads)
    lanes = _direct.NHWC_VECTOR_BYTES // np.dtype(dtype).itemsize
    ldw = -(-g.C // lanes) * lanes
    if out is None:
        # in a reused workspace: a fresh array per call costs page faults
        out = workspace("phase-weight", dtype, plan.weight_rows * ldw)
    packed = out[:plan.weight_rows * ldw].reshape(plan.weight_rows, ldw)
    _conv_direct.pack_phase_weight(np.ascontiguousarray(weight, dtype=dtype), packed,
                                   plan.tap_row, plan.tap_step, n_threads)
    return packed


def backward_input(grad_output: np.ndarray, weight: np.ndarray, geometry: ConvGeometry,
                   dtype, n_threads: int, grad_x: np.ndarray,
                   wpack: np.ndarray | None = None) -> np.ndarray:
    """grad_x of the layer (``geometry``, :func:`applies`) by its stride phases, into
    ``grad_x`` (N, C, H, W), every element written. ``grad_output`` must be C-contiguous
    of ``dtype``; ``wpack``: the weight already packed by :func:`pack_weight`."""
    g = geometry
    plan = _phase_plan(g, n_threads)
    if wpack is None:
        wpack = pack_weight(weight, g, dtype, n_threads)
    zeros = np.zeros(wpack.shape[1], dtype)
    scratch = workspace("direct-nhwc", dtype, n_threads * plan.band_elements)
    pointers = workspace("direct-nhwc-rows", np.intp, n_threads * plan.pointers)
    _conv_direct.input_grad_phases(grad_output, wpack, zeros, grad_x, scratch, pointers,
                                   plan.phases, plan.rowmaps, plan.colmaps, plan.offsets,
                                   g.stride_h, g.stride_w, plan.band_rows,
                                   _direct.WIDE_KERNEL, plan.vectors, n_threads)
    return grad_x
