"""grad_x of strided convolutions by stride phases, each summed in place by the
pixel-row kernel, or the whole backward with the 2x2 phases by Winograd.

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

A 2x2 phase is also the grad_x of a stride-1 2x2 transposed convolution (input: x's phase,
output gradient: dY), whose grad_weight is the layer's four taps of that phase. So
:func:`backward` runs such phases by the transposed layers' phase Winograd
(``fastconv._phases.backward``, which reads x's phase and writes grad_x's in place), the
rest by the pixel-row phases and the implicit weight gradient of the other taps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from fastconv import _conv_direct, _conv_phases, _direct, _implicit
from fastconv import _phases as _phase_winograd
from fastconv._validation import ConvGeometry
from fastconv._workspace import workspace

__all__ = ["applies", "pays_off", "winograd_applies", "winograd_pays_off", "backward_input",
           "backward"]


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


#: The 2x2 phases' F(4x4, 2x2) GEMMs sum this many terms per BLAS call (the transposed
#: convolution's BACKWARD_SUM_CHUNK is 64). A phase sums only C_out stacked channels, not
#: the s*s*C_out of a transposed layer's, and on resnet-3x3-s2 (128 filters) chunks of 64
#: left grad_x at 10.3x im2col's float32 error (grad_weight 5.5x), chunks of 32 at 7.2x
#: (4.2x) for 1.00x / 0.99x the time (2 / 1 threads), 16 at 6.1x (5.0x) for 0.98x.
#: F(3x3, 2x2) stayed at 1.7x (1.2x) but ran 0.95x / 0.96x.
WINOGRAD_SUM_CHUNKS = {4: 32}


def winograd_applies(geometry: ConvGeometry) -> bool:
    """Whether :func:`backward` can run this layer's backward: it :func:`applies`, some
    phase meets 2x2 taps (a 3x3 stride-2 layer's one, all four of a 4x4 stride-2 one's),
    within the phase Winograd's BLAS limits, and the implicit weight gradient takes the
    other taps."""
    g = geometry
    if not applies(g):
        return False
    winograd = [p for p in _phases(g) if p.winograd]
    return (bool(winograd) and all(_phase_winograd.fits(p.geometry) for p in winograd)
            and _implicit.applies(g))


#: ``algorithm="auto"`` takes :func:`backward` where its 2x2 phases run F(4x4, 2x2) (the
#: phase backward's ``backward_tile``: C * F >= 8192 channel pairs) over at least this
#: many 2x2 tiles of the phase (over the batch) per channel pair C * F: the filters'
#: transforms and grad_weight's per-thread sums cost per pair, the savings per tile.
#: Against the pixel-row phases + implicit grad_weight (whole backward, interleaved,
#: median of 7, 2 / 1 threads, float32, 8 images, 3x3 stride 2 unless said): 128 -> 128
#: on 56x56 (resnet-3x3-s2, 0.096 tiles per pair) 1.03-1.07x / 1.07x, 128 -> 256 and 256
#: -> 128 on 56x56 (0.048) 1.10x / 1.10x and 1.08x / 1.07x, 4x4 stride 2 64 -> 128 on
#: 32x32 (0.0625) 1.27x / 1.23x; it lost with fewer tiles per pair: one image of
#: resnet-3x3-s2 (0.012) 0.91x / 0.95x, 256 -> 256 on 28x28 (0.006) 0.87x / 0.91x, 4x4
#: stride 2 128 -> 256 on 16x16 (0.004) 0.95x / 1.07x, 512 -> 512 on 14x14 0.68x; and
#: with F(2x2, 2x2) (64 -> 64 on 56x56: 0.99x / 0.93x).
WINOGRAD_TILES_PER_PAIR = 1 / 32


def winograd_pays_off(geometry: ConvGeometry, itemsize: int = 4) -> bool:
    """Whether ``algorithm="auto"`` takes :func:`backward` for the whole backward: where
    it :func:`winograd_applies` and grad_x's phases :func:`pays_off`, its 2x2 phases run
    F(4x4, 2x2) over WINOGRAD_TILES_PER_PAIR tiles per channel pair or more."""
    g = geometry
    if not (winograd_applies(g) and pays_off(g, itemsize)):
        return False
    winograd = [p.geometry for p in _phases(g) if p.winograd]
    return all(_phase_winograd.backward_tile(pg) == 4
               and pg.N * -(-pg.OH // 2) * -(-pg.OW // 2) >= WINOGRAD_TILES_PER_PAIR * g.C * g.F
               for pg in winograd)


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


class _Phase(NamedTuple):
    """One stride phase of grad_x: grad_x's rows ``py + s_h*i``, columns ``px + s_w*j``."""

    py: int
    px: int
    rows: _AxisPhase
    cols: _AxisPhase
    geometry: ConvGeometry    # the phase as a stride-1 layer of dY: C_out channels in, C_in out

    @property
    def winograd(self) -> bool:
        """A 2x2 phase, which :func:`backward` runs by Winograd (``fastconv._phases``)."""
        return len(self.rows.taps) == len(self.cols.taps) == 2


@functools.lru_cache(maxsize=64)
def _phases(g: ConvGeometry) -> tuple:
    """The phases of a layer that :func:`applies`, those of at least one grad_x value."""
    rows = [_axis_phase(py, g.H, g.KH, g.stride_h, g.pad_top, g.OH) for py in range(g.stride_h)]
    cols = [_axis_phase(px, g.W, g.KW, g.stride_w, g.pad_left, g.OW)
            for px in range(g.stride_w)]
    return tuple(_Phase(py, px, rp, cp, ConvGeometry(
        g.N, g.F, g.OH, g.OW, g.C, len(rp.taps), len(cp.taps), 1, 1, rp.before, rp.after,
        cp.before, cp.after, 1, 1, rp.size, cp.size))
        for py, rp in enumerate(rows) for px, cp in enumerate(cols)
        if rp.size > 0 and cp.size > 0)


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


class _WinogradSplit(NamedTuple):
    """What :func:`backward` runs by Winograd and what by the direct kernels."""

    phases: tuple         # per 2x2 phase: (phase, row taps, column taps as index arrays)
    rest: tuple           # the other taps, kh*KW + kw


@functools.lru_cache(maxsize=64)
def _winograd_split(g: ConvGeometry) -> _WinogradSplit:
    phases, taken = [], set()
    for phase in _phases(g):
        if phase.winograd:
            rt, ct = (np.array(taps, np.intp) for taps in (phase.rows.taps, phase.cols.taps))
            for array in (rt, ct):
                array.flags.writeable = False
            phases.append((phase, rt, ct))
            taken.update(kh * g.KW + kw for kh in rt for kw in ct)
    return _WinogradSplit(tuple(phases),
                          tuple(k for k in range(g.KH * g.KW) if k not in taken))


@functools.lru_cache(maxsize=64)
def _phase_plan(g: ConvGeometry, n_threads: int, without_winograd: bool = False
                ) -> _PhasePlan | None:
    """The pixel-row kernel's plan of every phase, or of those :func:`backward` does not
    run by Winograd (None where that leaves none)."""
    phases = [p for p in _phases(g) if not (without_winograd and p.winograd)]
    if not phases:
        return None
    table, rowmaps, colmaps, offsets, row_plans = [], [], [], [], []
    tap_row = np.full(g.KH * g.KW, -1, np.intp)
    tap_step = np.zeros(g.KH * g.KW, np.intp)
    wrow = 0
    for phase in phases:
        rp, cp, pg = phase.rows, phase.cols, phase.geometry
        KH, KW = pg.KH, pg.KW
        # the phase's padded rows as the pixel-row kernel's NCHW forward lays them out
        rows = _direct._pixel_row_plan(pg, n_threads, "NCHW")
        width = len(rows.colmap)
        table.append(np.array((phase.py, phase.px, rp.size, cp.size, KH, g.F * KW, rows.lo,
                               rows.hi, cp.before, width, rows.shared, wrow), np.intp))
        rowmaps.append(rows.rowmap)
        colmaps.append(rows.colmap)
        offsets.append(rows.offsets)
        row_plans.append(rows)
        # phase row t, dY channel f, column u: row wrow + (t*F + f)*KW + u
        for t, kh in enumerate(rp.taps):
            for u, kw in enumerate(cp.taps):
                tap_row[kh * g.KW + kw] = wrow + t * g.F * KW + u
                tap_step[kh * g.KW + kw] = KW
        wrow += KH * KW * g.F
    # one band for every phase: the smallest of the phases' own (the one whose rows take
    # the most room), and the wider blocks where any phase's rows are long enough
    band = min(plan.band for plan in row_plans)
    vectors = max(plan.vectors for plan in row_plans)
    geometries = [p.geometry for p in phases]
    # a band's rows: R + KH - 1 of them (stride 1: the band's output rows share them)
    band_elements = max((band + pg.KH - 1) * (pg.OW + pg.KW - 1) * g.F for pg in geometries)
    pointers = 3 * band * max(pg.KH for pg in geometries)
    for array in (tap_row, tap_step):
        array.flags.writeable = False
    return _PhasePlan(_padded(table), _padded(rowmaps), _padded(colmaps), _padded(offsets),
                      tap_row, tap_step, wrow, band, band_elements, pointers, vectors)


def pack_weight(weight: np.ndarray, plan: _PhasePlan, dtype, n_threads: int) -> np.ndarray:
    """The phases' filters for :func:`backward_input`: each phase's taps of ``weight``
    (F, C, KH, KW) with the channel axes swapped, packed as
    :func:`fastconv._direct.pack_weight_rows` packs NCHW rows, stacked by rows, in a
    reused workspace (a fresh array per call costs page faults)."""
    F, C = weight.shape[:2]
    lanes = _direct.NHWC_VECTOR_BYTES // np.dtype(dtype).itemsize
    ldw = -(-C // lanes) * lanes
    out = workspace("phase-weight", dtype, plan.weight_rows * ldw)
    packed = out.reshape(plan.weight_rows, ldw)
    _conv_direct.pack_phase_weight(np.ascontiguousarray(weight, dtype=dtype), packed,
                                   plan.tap_row, plan.tap_step, n_threads)
    return packed


def backward_input(grad_output: np.ndarray, weight: np.ndarray, geometry: ConvGeometry,
                   dtype, n_threads: int, grad_x: np.ndarray,
                   without_winograd: bool = False) -> np.ndarray:
    """grad_x of the layer (``geometry``, :func:`applies`) by its stride phases, into
    ``grad_x`` (N, C, H, W), every element written (with ``without_winograd``, all but
    the 2x2 phases' elements). ``grad_output`` must be C-contiguous of ``dtype``."""
    g = geometry
    plan = _phase_plan(g, n_threads, without_winograd)
    if plan is None:
        return grad_x
    wpack = pack_weight(weight, plan, dtype, n_threads)
    zeros = np.zeros(wpack.shape[1], dtype)
    scratch = workspace("direct-nhwc", dtype, n_threads * plan.band_elements)
    pointers = workspace("direct-nhwc-rows", np.intp, n_threads * plan.pointers)
    _conv_direct.input_grad_phases(grad_output, wpack, zeros, grad_x, scratch, pointers,
                                   plan.phases, plan.rowmaps, plan.colmaps, plan.offsets,
                                   g.stride_h, g.stride_w, plan.band_rows,
                                   _direct.WIDE_KERNEL, plan.vectors, n_threads)
    return grad_x


def backward(grad_output: np.ndarray, x: np.ndarray, weight: np.ndarray,
             geometry: ConvGeometry, dtype, n_threads: int, grad_x: np.ndarray,
             grad_weight: np.ndarray) -> None:
    """grad_x and grad_weight of a layer that :func:`winograd_applies`: each 2x2 phase of
    grad_x, with its four taps of grad_weight, by the phase Winograd of a stride-1 2x2
    transposed convolution (``fastconv._phases.backward``: its x is that phase of x, its
    grad_output dY, its filters the phase's taps with the channel axes swapped), reading
    and writing the phase in place; the other phases by :func:`backward_input`, the other
    taps by the implicit weight gradient (``fastconv._implicit.backward_weight``).
    ``grad_output``, ``x`` and ``weight`` must be C-contiguous of ``dtype``; ``grad_x``
    (N, C, H, W) and ``grad_weight`` (F, C, KH, KW) are written in full."""
    g = geometry
    backward_input(grad_output, weight, g, dtype, n_threads, grad_x, without_winograd=True)
    split = _winograd_split(g)
    for phase, rt, ct in split.phases:
        # the transposed convolution's weight (C, F, 2, 2): tap (t, u) = W[:, :, rt[t], ct[u]]
        taps = workspace("phase-taps-2x2", dtype, g.C * g.F * 4).reshape(g.C, g.F, 2, 2)
        _conv_phases.stride_phase_taps(weight, taps, rt, ct, n_threads)
        sums = workspace("phase-grad-weight", dtype, taps.size).reshape(taps.shape)
        _phase_winograd.backward(grad_output, x, taps, phase.geometry, n_threads, grad_x, sums,
                                 x_phase=(phase.py, phase.px, g.stride_h, g.stride_w),
                                 sum_chunks=WINOGRAD_SUM_CHUNKS)
        _conv_phases.scatter_stride_phase_taps(sums, grad_weight, rt, ct, n_threads)
    rest = split.rest
    if rest:
        out = workspace("phase-weight-grad-rest", dtype, g.F * g.C * len(rest))
        _implicit.backward_weight(x, grad_output, g, dtype, n_threads, out, taps=rest)
        grad_weight.reshape(g.F, g.C, -1)[:, :, list(rest)] = out.reshape(g.F, g.C, -1)
