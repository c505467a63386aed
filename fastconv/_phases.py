"""Transposed convolutions by 2x2 phase convolutions in the Winograd domain.

A transposed convolution whose kernel is twice its stride on both axes
(DCGAN's 4x4 stride-2 upsampling, or a plain 2x2 stride-1 one) splits into
``s * s`` output phases, each a 2x2 stride-1 correlation: of x in the
forward, of one phase plane of grad_output for grad_x (``fastconv._conv_phases``
derives both). They run by F(2x2, 2x2) Winograd (16/9 = 1.78x fewer
multiplications than im2col + GEMM; the forward by F(3x3, 2x2), 2.25x fewer,
where :func:`forward_tile` says its tiles fit the planes better; the backward by
F(4x4, 2x2), 2.56x fewer, where :func:`backward_tile` says it measured faster), and
grad_weight by F(2x2, m x m) from the same transform of the grad_output tiles.
:func:`applies` says which layers;
``conv_transpose2d`` / ``conv_transpose2d_backward`` take it with
``algorithm="winograd"``, or with "auto" where :func:`pays_off` /
:func:`pays_off_backward` say it measured faster.
"""

from __future__ import annotations

import functools

import numpy as np

from fastconv import _conv_phases, _tiling, _winograd
from fastconv._padding import source_map
from fastconv._threads import single_threaded_blas
from fastconv._validation import ConvGeometry
from fastconv._winograd_matrices import PHASE_VARIANTS
from fastconv._workspace import workspace

__all__ = ["applies", "fits", "pays_off", "pays_off_backward", "forward_tile", "backward_tile",
           "filters_shape", "forward_filters", "forward", "backward"]

#: ``algorithm="auto"`` thresholds, measured at 1 thread (min of 5; 4x4 stride-2 layers
#: and a few 2x2, 6x6 and 8x8 ones; C 3..512, planes 4x4..32x32: README "Transposed
#: convolution by phases"). The forward shares each x tile among the phases by shifting some
#: phases' tiles a row (column) earlier, which costs one extra tile row and column:
#: on 8x8 planes (5 tiles for 4) it lost (0.8-0.9x), on 16x16 and 32x32 it gained
#: 1.05-1.5x where C_out >= C_in / 4, and lost with fewer outputs (64 -> 3: 0.64x),
#: a single phase (2x2 stride 1: 0.8-0.9x) or few tiles for the weight's size
#: (256 -> 128 on one 16x16 plane: 0.68x). The backward gained 1.1-1.9x except with
#: few output channels (64 -> 4: 0.95x; 64 -> 8: 1.16x) or few tiles for the weight's
#: size (256 -> 128 on eight 4x4 planes: 0.96x; on one 16x16 plane: 1.09x).
AUTO_FORWARD_MIN_PLANE = 16
AUTO_FORWARD_MAX_INPUTS_PER_OUTPUT = 4
AUTO_FORWARD_TILES_PER_WEIGHT = 1 / 512
AUTO_MAX_INPUTS_PER_OUTPUT = 8
AUTO_TILES_PER_WEIGHT = 1 / 2048

#: Output tile sizes m of F(m x m, 2 x 2) that the header implements
#: (fastconv._winograd_matrices.PHASE_VARIANTS), and those each pass may take.
TILE_SIZES = tuple(sorted(PHASE_VARIANTS))
FORWARD_TILE_SIZES = (2, 3)
BACKWARD_TILE_SIZES = (2, 4)

#: The backward's tile. F(3x3, 2x2) does 16 products per 9 outputs against F(2x2, 2x2)'s
#: 9 per 4, but in the backward (grad_weight by F(2x2, 3x3) from the same tiles) it
#: measured 0.83-1.17x of m = 2 where it does 16-21% fewer products (2 threads, median
#: of 11, 4x4 stride-2 layers on 6x6..48x48 planes; README "Transposed convolution by
#: phases"): its transforms cost more. F(4x4, 2x2) does 25 per 16 (0.69x F(2x2)'s
#: products) and, with its GEMMs summed BACKWARD_SUM_CHUNK terms per BLAS call,
#: stays within 4.4-4.7x im2col's float32 error on dcgan-up (10.9x and 8.5x summed
#: whole). Against m = 2 (2 threads, median of 27 calls, alternating; 4x4 stride-2
#: layers C_in -> C_out on N x H x W inputs) it ran 1.16-1.17x faster on dcgan-up (1 and
#: 2 threads), 1.24x on 256 -> 256 (4 x 32x32), 1.10-1.12x on 512 -> 256 (8 x 16x16),
#: 256 -> 128 (64 x 8x8) and 128 -> 64 (16 x 16x16), 1.01-1.05x on 128 -> 64 and
#: 64 -> 32 (8 x 32x32), and lost with fewer channel pairs (64 -> 64, 32 x 16x16: 0.90x)
#: or few tiles for the weight (512 -> 256, 16 x 8x8: 0.86x). So the backward takes
#: m = 4 from BACKWARD_F4_MIN_PAIRS channel pairs C_in * C_out, with at least
#: BACKWARD_F4_TILES_PER_WEIGHT of x's 2x2 tiles per (phase, C_in, C_out) triple.
BACKWARD_F4_MIN_PAIRS = 8192
BACKWARD_F4_TILES_PER_WEIGHT = 1 / 1024
BACKWARD_SUM_CHUNK = {4: 64}

#: The forward takes F(3x3, 2x2) where its products (tiles x 16) are at most this
#: fraction of F(2x2, 2x2)'s (tiles x 9). The forward's phases share tiles shifted by
#: a row, so the tile counts round differently: at ratios 0.64-0.82 (8x8, 16x16, 32x32,
#: 48x48 planes) m = 3 ran 1.04-1.31x faster at 1 and 2 threads, at 0.91 (12x12) on
#: par (0.97-1.01x), at 1.0 (6x6) 0.76-0.79x.
FORWARD_MAX_PRODUCTS_RATIO = 0.85


def applies(geometry: ConvGeometry) -> bool:
    """Whether a transposed convolution (its ``transposed_geometry``) splits into 2x2
    phases: kernel = 2 * stride on both axes, dilation 1, groups 1."""
    g = geometry
    return (g.KH == 2 * g.stride_h and g.KW == 2 * g.stride_w
            and (g.dilation_h, g.dilation_w) == (1, 1) and g.groups == 1)


def fits(geometry: ConvGeometry) -> bool:
    """Whether the GEMMs' leading dimensions stay within the 32-bit BLAS limit
    (``fastconv._tiling.BLAS_INT_MAX``): the stacked phase channels ``s*s*C_out``,
    C_in, and a tile row's tiles (at most ``ceil((W + 3)/2)``: the forward's phase
    planes hold up to W + 2 columns, plus the shifted phases' extra tile)."""
    g = geometry
    return max(g.stride_h * g.stride_w * g.C, g.F,
               -(-(g.OW + 3) // min(TILE_SIZES))) <= _tiling.BLAS_INT_MAX


def _tiles(geometry: ConvGeometry) -> int:
    """x's 2x2 tiles over the batch: the columns of every phase's GEMMs (the auto rule's
    thresholds were measured with m = 2)."""
    return geometry.N * -(-geometry.OH // 2) * -(-geometry.OW // 2)


def _enough_tiles(geometry: ConvGeometry, per_weight: float) -> bool:
    """The filters' transform (and the backward's grad_weight sums) cost ~9 values per
    (phase, C_in, C_out) triple whatever the batch; the GEMMs only save enough over
    im2col with ``per_weight`` tiles for every such triple."""
    g = geometry
    return _tiles(g) >= per_weight * g.stride_h * g.stride_w * g.C * g.F


def pays_off(geometry: ConvGeometry) -> bool:
    """Whether ``algorithm="auto"`` takes the phase convolutions for the forward of a
    layer that :func:`applies`: several phases, x planes of AUTO_FORWARD_MIN_PLANE
    or more on both axes, C_out >= C_in / AUTO_FORWARD_MAX_INPUTS_PER_OUTPUT (the
    GEMMs' rows are the phases' C_out filters) and enough tiles."""
    g = geometry
    C_out, C_in = g.C, g.F
    return (g.stride_h * g.stride_w > 1 and min(g.OH, g.OW) >= AUTO_FORWARD_MIN_PLANE
            and C_out * AUTO_FORWARD_MAX_INPUTS_PER_OUTPUT >= C_in
            and _enough_tiles(g, AUTO_FORWARD_TILES_PER_WEIGHT))


def pays_off_backward(geometry: ConvGeometry) -> bool:
    """Whether ``algorithm="auto"`` takes the phase convolutions for the backward of a
    layer that :func:`applies`: C_out >= C_in / AUTO_MAX_INPUTS_PER_OUTPUT and enough
    tiles."""
    C_out, C_in = geometry.C, geometry.F
    return (C_out * AUTO_MAX_INPUTS_PER_OUTPUT >= C_in
            and _enough_tiles(geometry, AUTO_TILES_PER_WEIGHT))


@functools.lru_cache(maxsize=256)
def _maps(m: int, H: int, W: int, H_t: int, W_t: int, sh: int, sw: int, ph: int, pw: int):
    """The read-only index maps of :func:`fastconv._conv_phases.backward` (with the
    interior tiles of each phase column) and each phase's first tap ``kh0`` / ``kw0``.

    Phase row ``a`` holds grad_output rows ``a + sh*q``; its 2x2 correlation
    has top padding ``(a + ph) // sh``, so tile position ``p`` reads phase row
    ``q = p - top``. x's maps are the position itself, -1 past H / W.
    """
    TH, TW = -(-H // m), -(-W // m)

    def phase_maps(tiles: int, size_t: int, s: int, pad: int) -> np.ndarray:
        rows = []
        for a in range(s):
            # phase row q of the ceil((size_t - a)/s) in the phase plane, then its dY row
            q = source_map(tiles * m + 1, -(-(size_t - a) // s), (a + pad) // s, 0, "zeros")
            rows.append(np.where(q >= 0, a + s * q, -1))
        return np.ascontiguousarray(rows, dtype=np.intp)

    def x_map(tiles: int, size: int) -> np.ndarray:
        return source_map(tiles * m, size, 0, 0, "zeros")

    # interior tiles of phase column b: positions p = m*tw + j (j <= m) at phase columns
    # q = p - top inside [0, ceil((W_t - b)/sw)), dY column sw*p - left
    tops = [(b + pw) // sw for b in range(sw)]
    lefts = np.array([sw * top - b for b, top in enumerate(tops)], dtype=np.intp)
    # (a negative top, a stride phase's correlation that crops dY: fastconv._stride_phases)
    los = np.array([min(TW, max(0, -(-top // m))) for top in tops], dtype=np.intp)
    his = np.array([max(lo, min(TW, (-(-(W_t - b) // sw) - (m + 1) + top) // m + 1))
                    for b, (lo, top) in enumerate(zip(los, tops))], dtype=np.intp)
    maps = (phase_maps(TH, H_t, sh, ph), phase_maps(TW, W_t, sw, pw), lefts, los, his,
            x_map(TH, H), x_map(TW, W), *_first_taps(sh, sw, ph, pw))
    for array in maps:
        array.flags.writeable = False   # shared by every call
    return maps


def _first_taps(sh: int, sw: int, ph: int, pw: int) -> tuple[np.ndarray, np.ndarray]:
    """``kh0[a] = (a + ph) % sh``, ``kw0[b] = (b + pw) % sw``: each phase's first kernel tap."""
    return (np.array([(a + ph) % sh for a in range(sh)], dtype=np.intp),
            np.array([(b + pw) % sw for b in range(sw)], dtype=np.intp))


@functools.lru_cache(maxsize=256)
def backward_tile(geometry: ConvGeometry) -> int:
    """The backward's output tile size m: 4 where F(4x4, 2x2) measured faster (enough
    channel pairs and tiles, see BACKWARD_F4_MIN_PAIRS), else 2."""
    g = geometry
    return 4 if (g.C * g.F >= BACKWARD_F4_MIN_PAIRS
                 and _enough_tiles(g, BACKWARD_F4_TILES_PER_WEIGHT)) else 2


def _forward_axis_tiles(size_t: int, s: int, pad: int, m: int) -> int:
    """The forward's tile rows (columns) of m: enough for every phase, phase ``a``'s
    ``q < ceil((size_t - a)/s)`` output rows with its tiles starting ``shift`` rows
    earlier (``shift = (a + pad)//s - pad//s``)."""
    return max(-(-(max(0, -(-(size_t - a) // s)) + (a + pad) // s - pad // s) // m)
               for a in range(s))


@functools.lru_cache(maxsize=256)
def forward_tile(geometry: ConvGeometry) -> int:
    """The forward's output tile size m: 3 where F(3x3, 2x2) does at most
    FORWARD_MAX_PRODUCTS_RATIO of F(2x2, 2x2)'s products on this layer's planes, else 2
    (memoised: a forward asks it up to four times)."""
    g = geometry

    def products(m: int) -> int:
        return (_forward_axis_tiles(g.H, g.stride_h, g.pad_top, m)
                * _forward_axis_tiles(g.W, g.stride_w, g.pad_left, m) * (m + 1) ** 2)

    return 3 if products(3) <= FORWARD_MAX_PRODUCTS_RATIO * products(2) else 2


@functools.lru_cache(maxsize=256)
def _forward_maps(m: int, H: int, W: int, H_t: int, W_t: int, sh: int, sw: int, ph: int,
                  pw: int):
    """The read-only maps of :func:`fastconv._conv_phases.forward`: the x row / column under
    each shared tile position (phase 0 reads x rows ``q + ph//sh - 1 + t``), each phase's
    tile shift, and the columns' ``left`` offset and interior tiles ``lo, hi``."""

    def axis(size: int, size_t: int, s: int, pad: int):
        top = pad // s
        shifts = np.array([(a + pad) // s - top for a in range(s)], dtype=np.intp)
        tiles = _forward_axis_tiles(size_t, s, pad, m)
        return source_map(tiles * m + 1, size, 1 - top, 0, "zeros"), shifts, tiles

    x_rows, shifts_h, _ = axis(H, H_t, sh, ph)
    x_cols, shifts_w, TW = axis(W, W_t, sw, pw)
    left = 1 - pw // sw
    # interior tiles: all m + 1 columns m*tw + j - left inside x
    lo = min(TW, max(0, -(-left // m)))
    hi = max(lo, min(TW, (W - (m + 1) + left) // m + 1))
    for array in (x_rows, x_cols, shifts_h, shifts_w):
        array.flags.writeable = False
    return x_rows, x_cols, shifts_h, shifts_w, left, lo, hi


def filters_shape(geometry: ConvGeometry) -> tuple[int, int, int]:
    """The shape of :func:`forward_filters`: ``((m+1)**2, sh*sw*C_out, C_in)``."""
    g = geometry
    return ((forward_tile(g) + 1) ** 2, g.stride_h * g.stride_w * g.C, g.F)


def forward_filters(weight: np.ndarray, geometry: ConvGeometry, dtype, n_threads: int,
                    out: np.ndarray | None = None) -> np.ndarray:
    """The forward's stacked phase filters in the Winograd domain, ``((m+1)**2,
    sh*sw*C_out, C_in)`` (``fastconv._conv_phases.transform_weight_forward``).

    Without ``out`` the result lives in a reused workspace, valid until the next
    call on this Python thread.
    """
    g = geometry
    w = np.ascontiguousarray(weight, dtype=dtype)
    C_in, C_out = w.shape[:2]
    phases = g.stride_h * g.stride_w
    K = phases * C_out
    shape = filters_shape(g)
    if out is None:
        out = workspace("winograd-weight", w.dtype, int(np.prod(shape))).reshape(shape)
    taps = workspace("phase-taps", w.dtype, K * C_in * 4).reshape(phases, C_out, C_in, 2, 2)
    kh0, kw0 = _first_taps(g.stride_h, g.stride_w, g.pad_top, g.pad_left)
    m = forward_tile(g)
    _conv_phases.transform_weight_forward(w, out, taps, kh0, kw0, m, n_threads)
    return out


def forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
            geometry: ConvGeometry, n_threads: int, out: np.ndarray,
            U: np.ndarray | None = None) -> np.ndarray:
    """``conv_transpose2d(x, weight) + bias`` of a layer that :func:`applies`, into ``out``.

    ``x`` (N, C_in, H, W), ``weight`` (C_in, C_out, 2*sh, 2*sw) and ``bias``
    (C_out,) or None must be C-contiguous of one float dtype; ``out``
    (N, C_out, H_out, W_out) is written in full. ``U``: the filters already
    transformed by :func:`forward_filters` (a layer's cache), else they are here.
    """
    g = geometry
    dtype = x.dtype
    N, C_in, H, W = x.shape
    C_out, H_t, W_t = out.shape[1:]
    sh, sw = g.stride_h, g.stride_w
    m = forward_tile(g)
    positions = (m + 1) ** 2
    x_rows, x_cols, shifts_h, shifts_w, left, lo, hi = _forward_maps(
        m, H, W, H_t, W_t, sh, sw, g.pad_top, g.pad_left)
    if U is None:
        U = forward_filters(weight, g, dtype, n_threads)
    phases = sh * sw
    TH, TW = (len(x_rows) - 1) // m, (len(x_cols) - 1) // m
    per_tile = positions * (1 + C_in + phases * C_out) + m * m * phases
    rows_per_block = _tiling.plan_phase_forward(N, TH, TW, n_threads)
    scratch = workspace("winograd", dtype, n_threads * rows_per_block * TW * per_tile)
    with single_threaded_blas:
        _conv_phases.forward(x, U, bias, out, scratch, x_rows, x_cols, left, lo, hi, shifts_h,
                             shifts_w, m, rows_per_block, n_threads)
    return out


def backward(grad_output: np.ndarray, x: np.ndarray, weight: np.ndarray,
             geometry: ConvGeometry, n_threads: int, grad_x: np.ndarray,
             grad_weight: np.ndarray, x_phase: tuple | None = None,
             sum_chunks: dict | None = None) -> None:
    """grad_x and grad_weight of a transposed convolution that :func:`applies`.

    ``grad_output`` (N, C_out, H_out, W_out), ``x`` (N, C_in, H, W) and
    ``weight`` (C_in, C_out, 2*sh, 2*sw) must be C-contiguous of one float
    dtype; ``grad_x`` and ``grad_weight`` are written in full.

    ``x_phase = (row0, col0, step_h, step_w)``: x (and grad_x) is the stride phase of the
    arrays given at rows ``row0 + step_h*i`` and columns ``col0 + step_w*j``,
    ``geometry.OH x geometry.OW`` of them (``fastconv._stride_phases``: a 2x2 phase of a
    strided layer's backward); grad_x's other values are left as they are.
    ``sum_chunks``: the GEMMs' sums per BLAS call by tile size, instead of
    BACKWARD_SUM_CHUNK.
    """
    g = geometry
    dtype = x.dtype
    N, C_in, H, W = x.shape
    if x_phase is not None:
        H, W = g.OH, g.OW
    C_out, H_t, W_t = grad_output.shape[1:]
    sh, sw = g.stride_h, g.stride_w
    K = sh * sw * C_out
    m = backward_tile(g)
    positions = (m + 1) ** 2
    dy_rows, dy_cols, dy_lefts, dy_los, dy_his, x_rows, x_cols, kh0, kw0 = _maps(
        m, H, W, H_t, W_t, sh, sw, g.pad_top, g.pad_left)
    phase_args = {}
    if x_phase is not None:
        row0, col0, step_h, step_w = x_phase
        # the phase's columns are step_w apart in x's rows
        x_cols = np.where(x_cols >= 0, x_cols * step_w, -1)
        phase_args = dict(phase_rows=H, phase_cols=W, row0=row0, col0=col0, step_h=step_h,
                          step_w=step_w)
    TW = -(-W // m)
    rows_per_block = _tiling.plan_phase_backward(N, -(-H // m), TW, n_threads)
    per_thread = rows_per_block * TW * positions * (2 + K + C_in)
    scratch = workspace("winograd", dtype, n_threads * per_thread)
    U = workspace("winograd-weight-grad", dtype, positions * C_in * K).reshape(
        positions, C_in, K)
    taps = workspace("phase-taps", dtype, C_in * K * 4).reshape(C_in, K, 2, 2)
    _conv_phases.transform_weight(weight, U, taps, kh0, kw0, m, n_threads)
    partial = workspace("winograd-partial", dtype, n_threads * positions * C_in * K).reshape(
        n_threads, -1)
    used = workspace("phase-used", np.uint8, n_threads)
    with single_threaded_blas:
        _conv_phases.backward(grad_output, x, U, grad_x, partial, scratch, dy_rows, dy_cols,
                              dy_lefts, dy_los, dy_his, x_rows, x_cols, m, rows_per_block,
                              (sum_chunks or BACKWARD_SUM_CHUNK).get(m, 0), used, n_threads,
                              _winograd.own_kernel_pays_off(C_in, K, x.itemsize), **phase_args)
    # the taps' copy is done with: its space holds the transformed sums, 4 per pair
    outputs = workspace("phase-taps", dtype, (C_in + n_threads) * K * 4)
    _conv_phases.weight_grad_output(partial, used, grad_weight, outputs, kh0, kw0, m,
                                    n_threads)
