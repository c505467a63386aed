"""Winograd convolution: cast/contiguity -> transformed filters -> tile plan and workspace -> kernel.

``conv2d(..., algorithm="winograd")`` validates its arguments and builds the
:class:`~fastconv._validation.ConvGeometry` before calling these drivers; the
kernels live in ``fastconv._conv_winograd``. Winograd applies to 3x3 kernels
with stride 1 and dilation 1 (:func:`applies`), in NCHW.

grad_x of such a convolution is itself a 3x3 stride-1 convolution, of dY with
the kernel rotated by 180 degrees and its channel axes swapped (seed 001's
derivation), padded by ``2 - pad`` on each side: :func:`backward_input` runs
the same kernel on it. A negative padding there (pad > 2) just starts the
tiles inside dY. grad_weight (:func:`backward_weight`) correlates each n x n
tile of dY with its (n+2) x (n+2) input tile, F(3x3, 2x2) or F(3x3, 3x3),
summed over tiles by GEMMs in the transform domain.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from fastconv import _conv, _conv_winograd, _tiling
from fastconv._threads import single_threaded_blas
from fastconv._tiling import WinogradPlan, plan_winograd
from fastconv._padding import source_map
from fastconv._validation import ConvGeometry
from fastconv._workspace import workspace

__all__ = ["applies", "fits", "fits_input_grad", "pays_off", "pays_off_input_grad",
           "pays_off_weight_grad", "choose_m", "choose_m_input_grad", "choose_n_weight_grad",
           "transformed_weight", "TransformedWeights", "forward", "backward_input",
           "backward_weight"]

#: The output tile sizes the kernels implement (F(2x2, 3x3), F(3x3, 3x3), F(4x4, 3x3)).
TILE_SIZES = (2, 3, 4)

#: F(4x4, 3x3) rounds its transform-domain GEMM's error up by the output transform,
#: and the sgemm kernel sums a whole reduction in one register, so that rounding
#: grows with the sum's length. Its GEMMs therefore sum SUM_CHUNK[4] = 64 channels
#: (grad_x: filters) per BLAS call, each call adding to the last
#: (``fastconv._blas.gemm_rm_chunked``); other tile sizes sum all in one call.
#: Float32 error relative to im2col's (random data, README "Winograd accuracy"),
#: whole sums -> chunks of 64: forward 5.4 -> 3.8x at 128 channels, 8.6 -> 3.8x at 256,
#: 10.2 -> 4.3x at 512 (deep-7x7), 11.2 -> 4.5x at 1024; grad_x 15.4 -> 8.3x at 128,
#: 13.9 -> 4.9x at 256, 11.4 -> 5.7x at 512, 10.7 -> 4.4x at 1024. Chunks of 16 or 32
#: would help shorter sums too, but cost 15-43% of the forward (deep-7x7, vgg-mid,
#: resnet-3x3 at 2 threads) where 64 cost 1-4%.
SUM_CHUNK = {4: 64}

#: The forward takes F(4x4) up to this many channels per group (measured to 1024,
#: above); longer sums F(3x3, 3x3) (1.4-3.9x im2col's error, points 0, 1, -2, -1/2).
F4_MAX_REDUCTION = 1024

#: ``algorithm="auto"`` takes Winograd for an NCHW 3x3 stride-1 layer where it
#: measured faster than im2col (1 thread, min of 5, planes 8x8 .. 56x56, C and
#: F in 1 .. 64: README "Choosing the algorithm"). Its costs are a transform per
#: input channel and one per filter for every tile, so it needs enough of both
#: per GEMM: the forward sums over C/groups channels into F/groups outputs,
#: grad_x over F/groups filters into C/groups outputs.
AUTO_MIN_CHANNELS = 8
#: ... or, in the forward, few filters per channel (C = 3 with F = 8 ran 1.5-1.7x
#: faster, with F = 32 on par, with F = 64 slower).
AUTO_MAX_FILTERS_PER_CHANNEL = 4
#: grad_x also needs at least half as many outputs (C) as summed filters (F):
#: C = 16 with F = 64 was on par, C = 8 with F = 64 at 0.55-0.69x.
AUTO_MIN_INPUT_GRAD_OUTPUTS_PER_FILTER = 0.5


def applies(geometry: ConvGeometry) -> bool:
    """A 3x3 kernel, stride 1 and dilation 1: the shapes F(m x m, 3 x 3) computes."""
    return ((geometry.KH, geometry.KW) == (3, 3)
            and (geometry.stride_h, geometry.stride_w) == (1, 1)
            and (geometry.dilation_h, geometry.dilation_w) == (1, 1))


def fits(geometry: ConvGeometry) -> bool:
    """Whether the forward's GEMMs stay within the 32-bit BLAS limit
    (``fastconv._tiling.BLAS_INT_MAX``) for any tile size.

    A block holds whole tile rows, so a tile row's TW = ceil(OW/m) tiles (at
    most ceil(OW/2)) are one leading dimension; U's rows of C/groups values
    are another, within the limit whenever the weight's rows are (checked
    for every engine). The filters (the GEMMs' rows) are cut as needed.
    """
    return -(-geometry.OW // 2) <= _tiling.BLAS_INT_MAX


def fits_input_grad(geometry: ConvGeometry) -> bool:
    """:func:`fits` for grad_x, whose tile rows span W and whose U rows hold F/groups
    values: else grad_x runs by im2col."""
    return (-(-geometry.W // 2) <= _tiling.BLAS_INT_MAX
            and geometry.F // geometry.groups <= _tiling.BLAS_INT_MAX)


def pays_off(geometry: ConvGeometry) -> bool:
    """Whether ``algorithm="auto"`` takes Winograd for this (applicable) layer's forward."""
    Cg, Fg = geometry.C // geometry.groups, geometry.F // geometry.groups
    if geometry.is_depthwise:
        return False
    return Cg >= AUTO_MIN_CHANNELS or AUTO_MAX_FILTERS_PER_CHANNEL * Cg >= Fg


#: The channels-last forward (``forward_nhwc``) gathers each tile's pixels as vectors of
#: C channels: against NHWC im2col (2 threads, interleaved) 16 channels and more ran
#: 1.50-2.05x (16 -> 16 on 56x56, 16 -> 32 and 32 -> 64 on 32x32, 64 -> 64 and 256 -> 256
#: on 14x14, 512 -> 512 on 7x7), 8 channels 0.85-1.17x, 3-6 channels 0.45-0.73x.
AUTO_NHWC_MIN_CHANNELS = 16


def pays_off_nhwc(geometry: ConvGeometry) -> bool:
    """Whether ``algorithm="auto"`` takes Winograd for a channels-last forward: where
    :func:`pays_off` does, with at least AUTO_NHWC_MIN_CHANNELS channels."""
    return pays_off(geometry) and geometry.C >= AUTO_NHWC_MIN_CHANNELS


def pays_off_input_grad(geometry: ConvGeometry) -> bool:
    """Whether ``algorithm="auto"`` takes Winograd for this (applicable) layer's grad_x."""
    Cg, Fg = geometry.C // geometry.groups, geometry.F // geometry.groups
    if geometry.is_depthwise or geometry.padding_mode != "zeros":
        return False
    return Cg >= AUTO_MIN_CHANNELS and Cg >= AUTO_MIN_INPUT_GRAD_OUTPUTS_PER_FILTER * Fg


#: grad_x amplifies F(4x4)'s rounding more (its im2col path's own error is lower:
#: col2im adds 9 short sums): 8-12x im2col's error summing 4-16 filters, 10.7x with
#: 32 (cifar-3x3) and 10.0-13.7x with 64 (one chunk of SUM_CHUNK[4]; resnet-3x3),
#: against 3.6-8.7x for F(3x3) and 2.2x at most for F(2x2). From two chunks on it
#: stays within 10x: 7.6x at 96 filters, 7.9-8.3x at 128 (vgg-mid), 4.4-5.7x at
#: 256-1024 (deep-7x7), where F(3x3) reached 10.5x at 1024. So grad_x takes F(4x4) from
#: this many filters per group up to F4_MAX_REDUCTION.
INPUT_GRAD_F4_MIN_REDUCTION = 65


def pays_off_weight_grad(geometry: ConvGeometry) -> bool:
    """Whether ``algorithm="auto"`` takes Winograd for this (applicable) layer's
    grad_weight: F(3x3, 2x2) ran 1.4-2.3x im2col's speed from 16 channels and filters up
    (c16, resnet-3x3, vgg-mid), 1.25x on deep-7x7's 7x7 planes, 0.73x with cifar-3x3's 3
    channels (before F(3x3, 3x3), which is faster still where it applies)."""
    Cg, Fg = geometry.C // geometry.groups, geometry.F // geometry.groups
    return not geometry.is_depthwise and min(Cg, Fg) >= AUTO_MIN_CHANNELS


def _tile_products(m: int, out_h: int, out_w: int) -> int:
    """The transform-domain products of F(m x m, 3 x 3) over one output plane (or of
    grad_weight's F(3 x 3, m x m) over one dY plane)."""
    return -(-out_h // m) * -(-out_w // m) * (m + 2) ** 2


def _tile_size(out_h: int, out_w: int, f4_accurate: bool) -> int:
    """4, unless the output is too small for 4x4 tiles to pay (<= 2 along an axis: 2)
    or F(4x4)'s float error over the layer's sums is too large (``f4_accurate`` False). Those sums take F(3x3) where its tiles need fewer products
    than F(2x2)'s: it ran 1.09-1.44x faster than F(2x2) on 7x7 to 56x56 planes of
    16-512 channels (forward and grad_x, 2 threads, median of 9, alternating; AMD EPYC
    AVX-512)."""
    if min(out_h, out_w) <= 2:
        return 2
    if f4_accurate:
        return 4
    return 3 if _tile_products(3, out_h, out_w) < _tile_products(2, out_h, out_w) else 2


def choose_m(geometry: ConvGeometry) -> int:
    """Output tile size of the forward: its sums run over the C/groups input channels."""
    reduction = geometry.C // geometry.groups
    return _tile_size(geometry.OH, geometry.OW, reduction <= F4_MAX_REDUCTION)


def choose_m_input_grad(geometry: ConvGeometry) -> int:
    """Output tile size of grad_x: its sums run over the F/groups filters."""
    reduction = geometry.F // geometry.groups
    return _tile_size(geometry.H, geometry.W,
                      INPUT_GRAD_F4_MIN_REDUCTION <= reduction <= F4_MAX_REDUCTION)


@functools.lru_cache(maxsize=256)
def _tile_maps(m: int, H: int, W: int, OH: int, OW: int, pads: tuple, mode: str):
    """Row and column maps of the tiles' input (``fastconv._padding``) and the interior
    tiles ``[lo, hi)`` of a tile row: pure functions of the geometry, built once."""
    top, bottom, left, right = pads
    TH, TW = -(-OH // m), -(-OW // m)
    rowmap = source_map(TH * m + 2, H, top, bottom, mode)
    colmap = source_map(TW * m + 2, W, left, right, mode)
    rowmap.flags.writeable = colmap.flags.writeable = False   # shared by every call
    lo, hi = _interior_tiles(W, left, m, TW) if mode == "zeros" else (0, 0)
    return rowmap, colmap, lo, hi


def _interior_tiles(W: int, left: int, m: int, TW: int) -> tuple[int, int]:
    """``[lo, hi)``: tiles whose m + 2 input columns all lie inside the input."""
    lo = min(TW, max(0, -(-left // m)))
    hi = max(lo, min(TW, (W - (m + 2) + left) // m + 1))
    return lo, hi


def transformed_weight(weight: np.ndarray, groups: int, m: int, dtype, n_threads: int,
                       for_input_grad: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """The filters in the Winograd domain, ``(alpha**2, F, C/groups)`` (or, for grad_x,
    ``(alpha**2, C, F/groups)``); see ``fastconv._conv_winograd.transform_weight``.

    Without ``out`` the result lives in a reused workspace, valid until the
    next call on this Python thread.
    """
    w = np.ascontiguousarray(weight, dtype=dtype)
    F, Cg = w.shape[:2]
    rows, cols = (Cg * groups, F // groups) if for_input_grad else (F, Cg)
    shape = ((m + 2) ** 2, rows, cols)
    if out is None:
        slot = "winograd-weight-grad" if for_input_grad else "winograd-weight"
        out = workspace(slot, w.dtype, int(np.prod(shape))).reshape(shape)
    _conv_winograd.transform_weight(w, out, m, groups, for_input_grad, n_threads)
    return out


#: The filter-block forward (``fastconv._conv_winograd.forward_filter_blocks``) runs
#: where the filters in the Winograd domain outweigh a block's tiles (V and M), so
#: that every thread streaming all of them per block would dominate: deep-7x7
#: (512 -> 512 on 7x7, 36 MiB of filters against 9 MiB of tiles) ran 1.18-1.27x
#: faster at 2 threads and 1.11-1.13x at 1 (interleaved, median per-call ratio,
#: filters transformed per block in the thread). vgg-mid (2.3 MiB against 9 MiB)
#: swung between 0.6x and 1.13x at 2 threads; resnet-3x3 ran 0.6x: they keep blocks.
#: Blocks of 16 filters ran 1.27x / 1.11x, of 32 1.23x / 1.13x, of 8 1.21x.
FILTER_BLOCK = 16
#: Tiles per chunk that the threads transform together (their V is shared).
FILTER_BLOCK_CHUNK_TILES = 256


def _filter_blocks_pay(plan: WinogradPlan, C: int, F: int, groups: int) -> bool:
    """Whether the filters (F x C per transform position) outweigh a block's tiles."""
    return groups == 1 and F * C > (C + F) * plan.rows_per_block * plan.tile_cols


def _run(x: np.ndarray, weight: np.ndarray, U: np.ndarray | None, bias, y: np.ndarray,
         geometry: ConvGeometry, m: int, C: int, F: int, H: int, W: int, OH: int, OW: int,
         pads, mode: str, relu: bool, for_input_grad: bool, n_threads: int) -> None:
    """One Winograd convolution of x (N, C, H, W) into y (N, F, OH, OW) by ``U``, the
    filters in the Winograd domain, or by ``weight`` transformed here when U is None."""
    top, bottom, left, right = pads
    tiles: WinogradPlan = plan_winograd(x.shape[0], C, F, OH, OW, m, x.itemsize, n_threads)
    rowmap, colmap, lo, hi = _tile_maps(m, H, W, OH, OW, pads, mode)
    if _filter_blocks_pay(tiles, C, F, geometry.groups):
        rows = max(1, min(x.shape[0] * -(-OH // m), FILTER_BLOCK_CHUNK_TILES // tiles.tile_cols))
        aa, tb = (m + 2) ** 2, rows * tiles.tile_cols
        V = workspace("winograd-shared", x.dtype, aa * C * tb)
        scratch = workspace("winograd", x.dtype,
                            n_threads * aa * ((FILTER_BLOCK + 1) * tb + FILTER_BLOCK * C))
        w = None if U is not None else np.ascontiguousarray(weight, dtype=x.dtype)
        with single_threaded_blas:
            _conv_winograd.forward_filter_blocks(x, U, w, bias, y, V, scratch, m, rowmap,
                                                 colmap, left, lo, hi, rows, FILTER_BLOCK,
                                                 for_input_grad, relu, SUM_CHUNK.get(m, 0),
                                                 n_threads)
        return
    if U is None:
        U = transformed_weight(weight, geometry.groups, m, x.dtype, n_threads, for_input_grad)
    scratch = workspace("winograd", x.dtype, n_threads * tiles.workspace_per_thread(C, F))
    with single_threaded_blas:
        _conv_winograd.forward(x, U, bias, y, scratch, m, geometry.groups, rowmap, colmap,
                               left, lo, hi, tiles.rows_per_block, relu,
                               SUM_CHUNK.get(m, 0), n_threads)


def _run_nhwc(x: np.ndarray, U: np.ndarray, bias, out: np.ndarray, m: int, size: tuple,
              out_size: tuple, pads: tuple, mode: str, n_threads: int) -> None:
    """One channels-last Winograd convolution of x (N, H, W, C_in) into out (N, OH, OW,
    C_out) by ``U`` ((m+2)**2, C_out, C_in): ``fastconv._conv_winograd.forward_nhwc``."""
    (H, W), (OH, OW) = size, out_size
    C_in, C_out = x.shape[3], out.shape[3]
    rowmap, colmap, _, _ = _tile_maps(m, H, W, OH, OW, pads, mode)
    tiles: WinogradPlan = plan_winograd(x.shape[0], C_in, C_out, OH, OW, m, x.itemsize,
                                        n_threads)
    per_block = tiles.rows_per_block * tiles.tile_cols
    positions = (m + 2) ** 2
    scratch = workspace("winograd", x.dtype, n_threads * (
        positions * (C_in + per_block * (C_in + C_out)) + m * m * C_out))
    with single_threaded_blas:
        _conv_winograd.forward_nhwc(x, U, bias, out, scratch, m, rowmap, colmap, per_block,
                                    SUM_CHUNK.get(m, 0), n_threads)


def forward_nhwc(x: np.ndarray, weight: np.ndarray, bias, geometry: ConvGeometry,
                 n_threads: int, out: np.ndarray) -> np.ndarray:
    """``conv2d(x, weight) + bias`` of a channels-last layer (groups 1) by Winograd, into
    ``out`` (N, OH, OW, F); ``x`` (N, H, W, C) C-contiguous of the compute dtype.

    The transforms run along the contiguous channels of each tile
    (``fastconv._conv_winograd.forward_nhwc``): no transposed copy of x or y. Same tile
    sizes, chunked sums and padding modes as the NCHW forward."""
    g = geometry
    m = choose_m(g)
    U = transformed_weight(weight, 1, m, x.dtype, n_threads)
    _run_nhwc(x, U, bias, out, m, (g.H, g.W), (g.OH, g.OW),
              (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right), g.padding_mode, n_threads)
    return out


def backward_input_nhwc(grad_output: np.ndarray, weight: np.ndarray, geometry: ConvGeometry,
                        n_threads: int, out: np.ndarray) -> np.ndarray:
    """grad_x of a zero-padded channels-last layer (groups 1) by Winograd, into ``out``
    (N, H, W, C): :func:`forward_nhwc`'s kernel on ``grad_output`` (N, OH, OW, F) with the
    flipped, transposed filters, as the NCHW :func:`backward_input` does."""
    g = geometry
    m = choose_m_input_grad(g)
    U = transformed_weight(weight, 1, m, grad_output.dtype, n_threads, for_input_grad=True)
    _run_nhwc(grad_output, U, None, out, m, (g.OH, g.OW), (g.H, g.W),
              (2 - g.pad_top, 2 - g.pad_bottom, 2 - g.pad_left, 2 - g.pad_right), "zeros",
              n_threads)
    return out


def pays_off_input_grad_nhwc(geometry: ConvGeometry) -> bool:
    """Whether ``algorithm="auto"`` takes Winograd for a channels-last grad_x: where
    :func:`pays_off_input_grad` does, groups 1, with at least AUTO_NHWC_MIN_CHANNELS
    filters (the channels its tiles gather)."""
    return (geometry.groups == 1 and pays_off_input_grad(geometry)
            and geometry.F >= AUTO_NHWC_MIN_CHANNELS)


def forward(x: np.ndarray, weight: np.ndarray, bias, geometry: ConvGeometry, dtype,
            n_threads: int, out: np.ndarray, relu: bool = False, m: int | None = None,
            U: np.ndarray | None = None) -> np.ndarray:
    """``act(conv2d(x, weight) + bias)`` by Winograd, written into ``out`` (N, F, OH, OW).

    ``x`` must be C-contiguous of ``dtype``; ``U`` the filters already
    transformed for this ``m`` (a layer's cache), else they are transformed here.
    """
    g = geometry
    m = choose_m(g) if m is None else m
    b = None if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    _run(x, weight, U, b, out, g, m, g.C, g.F, g.H, g.W, g.OH, g.OW,
         (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right), g.padding_mode, relu, False,
         n_threads)
    return out


def backward_input(grad_output: np.ndarray, weight: np.ndarray, geometry: ConvGeometry, dtype,
                   n_threads: int, out: np.ndarray, m: int | None = None,
                   U: np.ndarray | None = None) -> np.ndarray:
    """grad_x of a zero-padded Winograd-able convolution, into ``out`` (N, C, H, W).

    ``grad_output`` (N, F, OH, OW) must be C-contiguous of ``dtype``; ``U``
    the grad_x filters already transformed for this ``m``, else they are
    transformed here.
    """
    g = geometry
    if g.padding_mode != "zeros":
        raise ValueError("Winograd grad_x needs padding_mode='zeros'")
    m = choose_m_input_grad(g) if m is None else m
    pads = (2 - g.pad_top, 2 - g.pad_bottom, 2 - g.pad_left, 2 - g.pad_right)
    _run(grad_output, weight, U, None, out, g, m, g.F, g.C, g.OH, g.OW, g.H, g.W, pads, "zeros",
         False, True, n_threads)
    return out


class TransformedWeights:
    """A layer's filters in the Winograd domain, transformed again only when they change.

    The cache keeps a copy of the filters it last transformed and compares it
    byte for byte with the current ones on every call (a memcmp, which stops
    at the first difference during training), so in-place updates such as
    ``layer.W -= lr * layer.dW`` and rebinding ``layer.W`` are both noticed.
    Cached arrays are never modified (a change makes new ones), so a thread
    may keep using what :meth:`get` returned while another refreshes the cache.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: np.ndarray | None = None
        self._transforms: dict = {}

    def get(self, weight: np.ndarray, groups: int, m: int, dtype, n_threads: int,
            for_input_grad: bool = False) -> np.ndarray:
        """The transform of ``weight`` (see :func:`transformed_weight`), cached.

        The snapshot is of ``weight`` as given; transforms for several compute
        dtypes (a float32 layer fed float64 input) live side by side.
        """
        def make(w: np.ndarray) -> np.ndarray:
            F, Cg = w.shape[:2]
            rows, cols = (Cg * groups, F // groups) if for_input_grad else (F, Cg)
            return transformed_weight(w, groups, m, dtype, n_threads, for_input_grad,
                                      out=np.empty(((m + 2) ** 2, rows, cols), dtype))

        return self.get_or_make(weight, (m, groups, for_input_grad, np.dtype(dtype)), make)

    def get_or_make(self, weight: np.ndarray, key, make) -> np.ndarray:
        """``make(weight)`` (a new array, never modified afterwards), cached under ``key``
        until ``weight`` changes."""
        w = np.ascontiguousarray(weight)
        with self._lock:
            snapshot = self._snapshot
            if (snapshot is None or snapshot.shape != w.shape or snapshot.dtype != w.dtype
                    or not _conv_winograd.same_bytes(snapshot.reshape(-1).view(np.uint8),
                                                     w.reshape(-1).view(np.uint8))):
                self._snapshot = w.copy()
                self._transforms = {}
            U = self._transforms.get(key)
            if U is None:
                U = self._transforms[key] = make(w)
            return U

    def clear(self) -> None:
        """Drop the cached transforms (they are rebuilt on the next call)."""
        with self._lock:
            self._snapshot = None
            self._transforms = {}


@functools.lru_cache(maxsize=256)
def _grad_tile_maps(n: int, OH: int, OW: int):
    """Row and column maps of dY's n x n tiles: the position itself, -1 past the output."""
    rows = np.arange(-(-OH // n) * n, dtype=np.intp)
    cols = np.arange(-(-OW // n) * n, dtype=np.intp)
    rows = np.where(rows < OH, rows, -1)
    cols = np.where(cols < OW, cols, -1)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


#: The dY tile sizes of grad_weight's F(3x3, n x n) kernels.
WEIGHT_GRAD_TILE_SIZES = (2, 3)

#: grad_weight takes F(3x3, 3x3) (25 products per 9 dY pixels against F(3x3, 2x2)'s 16
#: per 4) where its tiles need at most this fraction of F(3x3, 2x2)'s products on the
#: plane. Alternating in one process (2 threads, median of 9, AMD EPYC AVX-512): ratios
#: 0.72-0.80 (56x56, 32x32 and 14x14 planes) ran 1.11-1.46x faster, 0.88 (7x7, 8x8)
#: 0.96-1.04x, the bigger transform-domain sums costing what the products saved. Its
#: float32 error was 1.4-4.7x im2col's (F(3x3, 2x2): 0.6-2.3x).
WEIGHT_GRAD_N3_MAX_PRODUCTS_RATIO = 0.8


def choose_n_weight_grad(geometry: ConvGeometry) -> int:
    """dY tile size n of grad_weight's F(3x3, n x n): 3 where its tiles cover dY with at
    most WEIGHT_GRAD_N3_MAX_PRODUCTS_RATIO of F(3x3, 2x2)'s products, else 2."""
    g = geometry
    if (_tile_products(3, g.OH, g.OW)
            <= WEIGHT_GRAD_N3_MAX_PRODUCTS_RATIO * _tile_products(2, g.OH, g.OW)):
        return 3
    return 2


#: The weight gradients' GEMMs, ``W_s @ V_s.T`` per transform position (and group), run by
#: fastconv's own kernel (``fastconv._blas.gemm_nt``, which reads W_s in place and
#: transposes V_s a panel at a time where BLAS packs both) where a position's sums take
#: at most this many bytes. Against BLAS (interleaved, median of 11-31, 1 / 2 threads):
#: resnet-3x3's backward 1.07 / 1.05-1.08 (64 x 64 sums), vgg-mid's 1.03-1.07 / 1.03
#: (128 x 128), 256 -> 256 on 28x28 1.01 / 0.98 (256 KiB), dcgan-up's phases 1.04 /
#: 0.98-1.03 (256 x 512: 512 KiB); deep-7x7's 512 x 512 (1 MiB, past half of L2, reread
#: by each 128-term block) lost 0.93-0.95.
OWN_KERNEL_MAX_SUMS_BYTES = 512 * 1024


def own_kernel_pays_off(rows: int, cols: int, itemsize: int) -> bool:
    """Whether a weight gradient's ``rows x cols`` sums per position go to the own GEMM
    kernel (float32 only: ``gemm_nt`` keeps float64 with BLAS)."""
    return rows * cols * itemsize <= OWN_KERNEL_MAX_SUMS_BYTES


def backward_weight(x: np.ndarray, grad_output: np.ndarray, geometry: ConvGeometry,
                    n_threads: int, out: np.ndarray, n: int | None = None) -> np.ndarray:
    """grad_weight of a Winograd-able convolution by F(3x3, n x n), into ``out`` (F, C/g, 3, 3).

    ``x`` and ``grad_output`` must be C-contiguous of one float dtype; ``n``, the
    dY tile size (2 or 3), defaults to :func:`choose_n_weight_grad`'s. Every
    padding mode works: grad_weight only reads the padded input.
    """
    g = geometry
    n = choose_n_weight_grad(g) if n is None else n
    Cg = g.C // g.groups
    positions = (n + 2) ** 2
    tiles: WinogradPlan = plan_winograd(g.N, g.C, g.F, g.OH, g.OW, n, x.itemsize, n_threads)
    pads = (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right)
    rowmap, colmap, lo, hi = _tile_maps(n, g.H, g.W, g.OH, g.OW, pads, g.padding_mode)
    grad_rows, grad_cols = _grad_tile_maps(n, g.OH, g.OW)
    scratch = workspace("winograd", x.dtype, n_threads * tiles.workspace_per_thread(g.C, g.F))
    partial = workspace("winograd-partial", x.dtype, n_threads * positions * g.F * Cg)
    partial = partial.reshape(n_threads, -1)
    # reused: deep-7x7's 16 MiB of fresh pages would cost milliseconds per call
    sums = workspace("winograd-sums", x.dtype, positions * g.F * Cg)
    with single_threaded_blas:
        _conv_winograd.backward_weight(x, grad_output, partial, scratch, g.groups, rowmap,
                                       colmap, g.pad_left, lo, hi, grad_rows, grad_cols,
                                       tiles.rows_per_block, n, n_threads,
                                       own_kernel_pays_off(g.F // g.groups, Cg, x.itemsize))
    _conv.reduce_rows(partial, sums, n_threads)
    _conv_winograd.weight_grad_output(sums, out.reshape(-1), n)
    return out
