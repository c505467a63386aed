"""Implicit GEMM of plain NCHW layers: the forward and the weight gradient without a
column matrix (phase-plane maps, workspace -> kernel).

The direct forward of a 1x1 layer with many input channels
(``conv2d(..., algorithm="direct")``, and ``"auto"`` where :func:`pays_off`; wider
layers run ``fastconv._direct``'s pixel-row kernel, see WIDER_BY_PIXEL_ROWS, though
this kernel computes any plain layer) runs ``fastconv._conv_implicit``: the padded
input under a band of output rows is split into stride phase planes, in which every
tap of NR consecutive output positions is one contiguous run; a register-blocked
kernel sums those runs for 4 filters at a time (``fastconv/_implicit_kernels.h``).
Compared with im2col + GEMM, no column matrix is written (KH*KW copies of the input on
a 3x3 layer) and BLAS does not copy it again into packed panels: on resnet-3x3-s2
those two copies were 15% and 13% of the forward's samples.

The weight gradient (:func:`backward_weight`; ``"direct"``'s beyond 4 channels, and
``"auto"``'s where :func:`pays_off_weight_grad`) lays the input out as column-tap planes
instead, one per kw, so that each tap of every output pixel lies at a constant offset
from the pixel's index in dY: its sums run along dY's rows as they are.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from fastconv import _conv, _conv_implicit, _direct
from fastconv._direct import pack_weight
from fastconv._padding import source_indices
from fastconv._validation import ConvGeometry
from fastconv._workspace import workspace

__all__ = ["applies", "preferred", "pays_off", "pointwise_pays_off", "pays_off_weight_grad",
           "forward", "backward_weight"]

#: Whether the kernel runs its AVX-512 build, blocks of 2 vectors of 64 bytes, rather
#: than 3 of 32 bytes (FC_IM_WIDE_NV / FC_IM_NV in _implicit_kernels.h): where the CPU
#: has AVX-512. Either way the filters come packed by _direct.pack_weight,
#: _direct.FILTER_BLOCK (FC_IM_FB) at a time.
WIDE_KERNEL = _conv_implicit.wide_kernel()
#: ... but only where an image's positions, rounded up to its strips, are at most this
#: many times the narrow build's: a 3x3 stride-2 layer to 8x8 (72 positions: 3 strips of
#: 24, or 96 positions in 3 strips of 32) ran 0.82x / 0.85x (1 / 2 threads); resnet-3x3-s2
#: (816 -> 832 positions) 1.02-1.05x / 1.11-1.14x, 256 -> 128 3x3 stride 2 on 56x56
#: 1.04x / 1.10x, 32 -> 32 7x7 on 56x56 1.18x / 1.01x (in-process A/B, median per-call).
WIDE_MAX_POSITIONS = 1.05
#: Taps summed per pass over a strip: its kc runs of NR positions stay in L1 (32 KiB)
#: while every filter block reads them. A run is 96 bytes but, unaligned, touches 2-3
#: cache lines: 192 runs (~30 KiB of lines) did not stay, and the kernel alone ran 77
#: GFLOP/s at kc = 192 against 85 at kc = 48..96 (resnet-3x3-s2's planes, interleaved);
#: its forward 1.05x / 1.05x at 96 (1 / 2 threads, median per-call ratio). Each pass is
#: summed from zero and added to the stored sums, which keeps float32 error at im2col's
#: or below.
K_BLOCK = 96
#: A band's planes (a thread's workspace) stay in L2 (1 MiB per core here) beside
#: the packed filters that every strip streams.
BAND_BYTES = 128 << 10
#: Taps per channel block: its packed filters (F x TAP_BLOCK) stay in L2 with the band's
#: planes and sums, so every position of the band reuses them from there.
TAP_BLOCK = 256
#: ``algorithm="auto"`` takes this kernel for filters up to this size: every band of
#: output rows streams all of them. Against im2col + GEMM (interleaved, median per-call
#: ratio, 2 / 1 threads), 3x3 stride 2: 128 -> 128 on 56x56 (0.56 MiB) 1.13x / 1.22x, in
#: float64 (1.13 MiB) 1.06x / 1.10x; 256 -> 128 and 128 -> 256 on 56x56 (1.13 MiB) 1.25x /
#: 1.27x and 1.02x / 1.10x; 192 -> 192 on 28x28 (1.27 MiB) 0.81x / 1.00x; 256 -> 256 on
#: 28x28 (2.25 MiB) 0.82x / 0.86x; 512 -> 512 on 14x14 (9 MiB) 0.58x / 0.64x.
AUTO_MAX_WEIGHT_BYTES = 5 << 18
#: With the AVX-512 blocks (WIDE_KERNEL, float32) it won with larger filters where each
#: image has at least AUTO_WIDE_MIN_POSITIONS output pixels, so a band's strips reuse a
#: channel block's filters from L2 (3x3 stride 2, input 56x56 to 28x28 outputs, 1 / 2
#: threads): 192 -> 192 (1.27 MiB) 1.17x / 1.12x, 256 -> 256 (2.25 MiB) 1.12x / 1.16x,
#: 128 -> 256 1.12x / 1.09x, 256 -> 512 (4.5 MiB) 1.06x / 1.07x, 384 -> 384 (5.1 MiB)
#: 1.06x / 1.11x; to 14x14 it lost from 2.6 MiB (192 -> 384 1.00x / 0.85x, 256 -> 512
#: 0.87x / 0.89x), to 7x7 at 2.25 MiB (0.96x / 0.91x), and at 9 MiB (512 -> 512: 0.91x
#: to 14x14, 0.73x-0.82x to 7x7).
AUTO_MAX_WEIGHT_BYTES_WIDE = 6 << 20
AUTO_WIDE_MIN_POSITIONS = 784
#: ``algorithm="auto"`` takes the in-place 1x1 kernel (pointwise_pays_off) where BLAS's
#: GEMM has few rows (filters) for its depth (channels): it copies the input into packed
#: panels for them (a third of resnet-1x1's forward). Against im2col's GEMM (interleaved,
#: median per-call ratio, 1 / 2 threads, float32, AVX-512 build): 256 -> 64 on 8 x 56x56
#: (resnet-1x1) 1.11x / 1.00-1.12x, 1.27x / 1.09x; 512 -> 64 on 8 x 14x14 1.30x / 1.19x;
#: 512 -> 128 on 8 x 28x28 1.07x / 1.02x; 2048 -> 128 on 32 x 7x7 1.19x / 1.19x; 96 -> 24
#: on 8 x 28x28 1.20x / 1.16x; 64 -> 16 on 8 x 112x112 1.17x / 1.22x. It lost where the
#: filters are as many as a quarter of the channels or more (128 -> 128 0.99x / 0.98x,
#: 256 -> 128 1.02x / 0.91x, 64 -> 256 0.90x / 0.95x, 256 -> 1024 0.83x / 0.78x), with
#: more filters (1024 -> 256 on 8 x 14x14 0.95x / 0.90x), in float64 (256 -> 64 0.80x /
#: 0.79x) and at 2 threads on small batches (512 -> 128 on 1 x 28x28 0.83x, 256 -> 64 on
#: 4 x 7x7 0.50x; 8 x 7x7 1.06x); the narrow build ran resnet-1x1 0.90-0.99x at 2 threads.
#: Once the kernel prefetched two strips ahead (in-place reads had waited on DRAM), layers
#: with as many filters as channels won too: 128 -> 128 1.18x / 1.02x (56x56), 1.09x / 0.96x
#: (28x28), 64 -> 64 1.25x / 1.10x, 32 -> 32 on 112x112 1.32x / 1.38x, 256 -> 128 1.08x /
#: 1.08x, 96 -> 64 1.13x / 1.41x; expansions did not (32 -> 128 0.97x / 0.88x, 64 -> 128
#: 1.07x / 0.97x), nor more filters (256 -> 256 0.88x / 0.93x, 1024 -> 256 0.97x / 0.89x);
#: float64 ran even (256 -> 64 1.02x / 1.02x), the narrow build 0.89-0.97x at 2 threads.
#: And once its store also fetched its lines ahead, expansions won as well: 32 -> 128 1.13x /
#: 1.16x, 64 -> 128 1.21x / 1.10x, 16 -> 64 1.08x / 0.98x, 64 -> 128 on 1 x 56x56 1.15x /
#: 1.15x. Beyond 128 filters it stayed shape-dependent (64 -> 256 1.08x / 1.15x on 56x56 but
#: 1.02x / 0.84x on 28x28; 128 -> 256 1.02x / 1.00x; 512 -> 256 1.12x / 0.95x; 256 -> 512
#: 1.03x / 0.91x), so the filter bound stays.
AUTO_POINTWISE_MAX_FILTERS = 128
AUTO_POINTWISE_MIN_POSITIONS = 2048
#: The planes may exceed the input by padding and the dropped columns; beyond this
#: factor (a padding or dilation far larger than the image) the row kernel runs instead.
MAX_PLANE_GROWTH = 4


class _PlanePlan(NamedTuple):
    """How an image's phase planes are laid out and read (see the module docstring)."""

    Hq: int               # rows of one phase plane of the whole image
    band_rows: int        # plane rows of positions a work item may touch (without reach)
    band_strips: int      # strips per work item (an image's last item may have fewer)
    strip: int            # positions per strip (strip_positions)
    channel_block: int    # input channels laid out and summed at a time
    reach: int            # plane rows the taps reach below a band's last output row
    Wq: int               # columns of one phase plane (OW plus the taps' reach)
    rowmap: np.ndarray    # (sh*Hq,): input row under padded row i*sh + ph, -1 for zeros
    colmap: np.ndarray    # (sw*Wq,): input column under padded column q*sw + pw
    lo: np.ndarray        # (sw,): phase pw's columns [lo, hi) lie inside the input
    hi: np.ndarray
    row_slot: np.ndarray  # (sh,): first phase plane of row phase ph, -1 if no tap reads it
    col_slot: np.ndarray  # (sw,): plane of column phase pw within it, -1 likewise
    offsets: np.ndarray   # (C*KH*KW,): where tap (c, kh, kw) reads in a band's planes
    phases: int           # phase planes per channel (those some tap reads)
    in_place: bool        # the planes are the input itself (see in_place())
    band_elements: int    # phases*channel_block*(band_rows + reach)*Wq


def strip_positions(geometry: ConvGeometry, itemsize: int) -> int:
    """Output positions per register block (a strip): 24 floats or 12 doubles, 32 / 16
    by the AVX-512 build where it runs (WIDE_KERNEL) and an image's positions fill its
    strips about as well (see WIDE_MAX_POSITIONS)."""
    g = geometry
    narrow = _conv_implicit.strip_positions(itemsize, False)
    if not WIDE_KERNEL:
        return narrow
    wide = _conv_implicit.strip_positions(itemsize, True)
    positions = g.OH * _plane_shape(g)[2]

    def computed(strip: int) -> int:
        return -(-positions // strip) * strip

    return wide if computed(wide) <= WIDE_MAX_POSITIONS * computed(narrow) else narrow


def _plane_shape(g: ConvGeometry) -> tuple[int, int, int]:
    """``(reach, Hq, Wq)``: plane rows the taps reach below an output row, and the rows
    and columns of an image's phase plane (the output's plus the taps' reach)."""
    reach = (g.KH - 1) * g.dilation_h // g.stride_h
    return reach, g.OH + reach, g.OW + (g.KW - 1) * g.dilation_w // g.stride_w


@functools.lru_cache(maxsize=256)
def _plane_plan(g: ConvGeometry, itemsize: int, n_threads: int) -> _PlanePlan:
    """The plane layout of a geometry, built once (NumPy setup costs tens of microseconds)."""
    sh, sw, dh, dw = g.stride_h, g.stride_w, g.dilation_h, g.dilation_w
    kh = np.arange(g.KH, dtype=np.intp) * dh
    kw = np.arange(g.KW, dtype=np.intp) * dw
    reach, Hq, Wq = _plane_shape(g)
    # only the phases some tap reads get planes (one of four on a 1x1 stride-2 layer)
    used_rows, used_cols = np.unique(kh % sh), np.unique(kw % sw)
    col_slot = np.full(sw, -1, np.intp)
    col_slot[used_cols] = np.arange(len(used_cols))
    row_slot = np.full(sh, -1, np.intp)
    row_slot[used_rows] = np.arange(len(used_rows)) * len(used_cols)
    phases = len(used_rows) * len(used_cols)
    # channels in blocks of about TAP_BLOCK taps, as even as possible
    blocks = -(-g.C * g.KH * g.KW // TAP_BLOCK)
    channel_block = -(-g.C // blocks)
    # items of whole strips: an image's strips split evenly into items of about the
    # rows that fill BAND_BYTES (but at least 4 items per thread over the batch). An
    # item's positions may start and end inside a plane row: an image computes only its
    # last strip's tail past its positions (items of whole rows each ended on a partial
    # strip: resnet-3x3-s2's 28 rows of 29 positions as 9 + 9 + 9 + 1 rows took 35
    # strips of 24, as strips 34)
    strip = strip_positions(g, itemsize)
    row_bytes = phases * channel_block * Wq * itemsize
    max_rows = max(1, min(g.OH, BAND_BYTES // row_bytes - reach,
                          -(-g.N * g.OH // (4 * n_threads))))
    image_strips = -(-g.OH * Wq // strip)
    items = -(-image_strips // max(1, max_rows * Wq // strip))
    band_strips = -(-image_strips // items)
    # the rows an item's positions touch: its first may start up to Wq - 1 positions in
    band_rows = min(g.OH, -(-(band_strips * strip + Wq - 1) // Wq))
    direct_read = in_place(g, itemsize)
    if direct_read:
        # the planes are the input: the offsets are the image's
        band_rows, band_strips, channel_block = g.OH, 1, g.C
    Hb = band_rows + reach
    rows = (np.arange(Hq, dtype=np.intp)[None, :] * sh
            + np.arange(sh, dtype=np.intp)[:, None]).reshape(-1)
    rowmap = source_indices(rows, g.H, g.pad_top, g.pad_bottom, g.padding_mode)
    cols = (np.arange(Wq, dtype=np.intp)[None, :] * sw
            + np.arange(sw, dtype=np.intp)[:, None]).reshape(-1)
    colmap = source_indices(cols, g.W, g.pad_left, g.pad_right, g.padding_mode)
    # phase pw, column q shows input column q*sw + pw - left: inside for q in [lo, hi)
    lo = np.array([min(Wq, max(0, -(-(g.pad_left - pw) // sw))) for pw in range(sw)], np.intp)
    hi = np.array([max(lo[pw], min(Wq, (g.W - 1 + g.pad_left - pw) // sw + 1))
                   for pw in range(sw)], np.intp)
    # tap (c, kh, kw) reads plane (phase, c) from row kh // sh, column kw // sw
    phase = row_slot[kh % sh][:, None] + col_slot[kw % sw][None, :]         # (KH, KW)
    c = np.arange(channel_block, dtype=np.intp)
    offsets = (((phase[None] * channel_block + c[:, None, None]) * Hb
                + (kh // sh)[None, :, None]) * Wq + (kw // sw)[None, None, :]).reshape(-1)
    for array in (rowmap, colmap, lo, hi, row_slot, col_slot, offsets):
        array.flags.writeable = False      # shared by every call with this geometry
    return _PlanePlan(Hq, band_rows, band_strips, strip, channel_block, reach, Wq, rowmap,
                      colmap, lo, hi, row_slot, col_slot, offsets, phases, direct_read,
                      phases * channel_block * Hb * Wq)


def applies(geometry: ConvGeometry) -> bool:
    """A plain (ungrouped) layer whose phase planes stay within MAX_PLANE_GROWTH times
    the input (plus a small image's border)."""
    g = geometry
    _, Hq, Wq = _plane_shape(g)
    planes = g.stride_h * Hq * g.stride_w * Wq
    return g.groups == 1 and planes <= MAX_PLANE_GROWTH * g.H * g.W + 4096


#: Plain layers wider than 1x1 run their direct forward by fastconv._direct's pixel-row
#: kernel (``forward_pixel_rows`` with NCHW rows) rather than here: its blocks load the
#: filters as vectors and broadcast the inputs, with no loads across cache lines.
#: Against this kernel (8 images unless said, interleaved, 1 / 2 threads, float32): 3x3
#: stride 2, 128 -> 128 on 56x56 (resnet-3x3-s2) 1.04-1.06x / 1.06-1.11x, 256 -> 128
#: 1.03x / 1.05x, 128 -> 256 1.07x / 1.07x, 192 -> 192 on 28x28 1.19x / 1.15x, 32 -> 64
#: on 112x112 1.02x / 1.09x, one image 1.16x / 1.33x; 5x5 64 -> 64 1.07x / 1.05x, 3x3
#: dilation 2 1.14x / 1.16x; float64 1.01-1.34x (2 threads). ``auto`` takes it where
#: ``fastconv._direct.pays_off_rows`` (measured against im2col).
WIDER_BY_PIXEL_ROWS = True


def _plain(geometry: ConvGeometry) -> bool:
    """A plain layer this kernel applies to, with more channels than fastconv._direct's
    row kernel is built for."""
    return applies(geometry) and geometry.C > _direct.AUTO_MAX_CHANNELS


def preferred(geometry: ConvGeometry) -> bool:
    """Whether the direct forward of this plain layer runs here: 1x1 layers (wider ones,
    see WIDER_BY_PIXEL_ROWS, by the pixel-row kernel) with more channels than the row
    kernel of ``fastconv._direct`` is built for."""
    return _plain(geometry) and (geometry.KH * geometry.KW == 1 or not WIDER_BY_PIXEL_ROWS)


def pays_off(geometry: ConvGeometry, itemsize: int = 4) -> bool:
    """Whether ``algorithm="auto"`` takes the direct forward of a plain NCHW layer (after
    Winograd, which wins where it applies): a 1x1 layer, a plain GEMM, here where
    :func:`pointwise_pays_off`; a wider one by the pixel-row kernel where
    ``fastconv._direct.pays_off_rows`` (see WIDER_BY_PIXEL_ROWS), or else here with
    filters of at most AUTO_MAX_WEIGHT_BYTES, since every band of output rows streams all
    of them (AUTO_MAX_WEIGHT_BYTES_WIDE for float32 by the AVX-512 build with at least
    AUTO_WIDE_MIN_POSITIONS output pixels per image)."""
    g = geometry
    if not _plain(g):
        return False
    if g.KH * g.KW == 1:
        return pointwise_pays_off(g, itemsize)
    if WIDER_BY_PIXEL_ROWS:
        return _direct.pays_off_rows(g, itemsize, AUTO_MAX_WEIGHT_BYTES)
    weight_bytes = g.F * g.C * g.KH * g.KW * itemsize
    return (weight_bytes <= AUTO_MAX_WEIGHT_BYTES
            or (WIDE_KERNEL and itemsize == 4 and g.OH * g.OW >= AUTO_WIDE_MIN_POSITIONS
                and weight_bytes <= AUTO_MAX_WEIGHT_BYTES_WIDE))


def pointwise_pays_off(geometry: ConvGeometry, itemsize: int = 4) -> bool:
    """Whether ``algorithm="auto"`` runs a 1x1 layer here, reading its input in place
    (:func:`in_place`), rather than as BLAS's GEMM: in float32 by the AVX-512 build
    (WIDE_KERNEL), for a layer of at most AUTO_POINTWISE_MAX_FILTERS filters, with at
    least AUTO_POINTWISE_MIN_POSITIONS output pixels in the batch."""
    g = geometry
    return (in_place(g, itemsize) and itemsize == 4 and WIDE_KERNEL
            and g.F <= AUTO_POINTWISE_MAX_FILTERS
            and g.N * g.OH * g.OW >= AUTO_POINTWISE_MIN_POSITIONS)


#: grad_x of a 1x1 layer is itself a 1x1 layer on dY, F channels into C: ``algorithm="auto"``
#: runs it in place (:func:`backward_input_in_place`) rather than as im2col's GEMM where
#: the in-place forward of that layer measured faster (interleaved, median per-call ratio,
#: 1 / 2 threads, float32, C <- F on 8 images): 256 <- 64 on 56x56 (resnet-1x1's)
#: 1.09x / 1.18x, 256 <- 128 1.19x / 1.13x, 128 <- 32 1.09x / 1.12x, 64 <- 64 1.29x / 1.21x;
#: on 28x28 it lost (256 <- 64 0.83x / 0.92x; 512 <- 128 1.02x / 1.02x), on 14x14 too
#: (1024 <- 256 0.94x / 0.89x). So at most AUTO_POINTWISE_INPUT_GRAD_MAX_CHANNELS channels
#: and planes of at least AUTO_POINTWISE_INPUT_GRAD_MIN_PLANE pixels.
AUTO_POINTWISE_INPUT_GRAD_MAX_CHANNELS = 256
AUTO_POINTWISE_INPUT_GRAD_MIN_PLANE = 56 * 56


def _input_grad_geometry(geometry: ConvGeometry) -> ConvGeometry:
    """The 1x1 layer on dY whose forward is a 1x1 layer's grad_x: F channels into C."""
    g = geometry
    return g._replace(C=g.F, F=g.C)


def pointwise_input_grad_pays_off(geometry: ConvGeometry, itemsize: int = 4) -> bool:
    """Whether ``algorithm="auto"`` computes a 1x1 layer's grad_x in place
    (:func:`backward_input_in_place`): float32, the AVX-512 build, at most
    AUTO_POINTWISE_INPUT_GRAD_MAX_CHANNELS input channels, planes of at least
    AUTO_POINTWISE_INPUT_GRAD_MIN_PLANE pixels."""
    g = geometry
    return (in_place(g, itemsize) and g.groups == 1 and itemsize == 4 and WIDE_KERNEL
            and g.C <= AUTO_POINTWISE_INPUT_GRAD_MAX_CHANNELS
            and g.H * g.W >= AUTO_POINTWISE_INPUT_GRAD_MIN_PLANE)


def backward_input_in_place(grad_output: np.ndarray, weight: np.ndarray,
                            geometry: ConvGeometry, dtype, n_threads: int,
                            out: np.ndarray) -> np.ndarray:
    """grad_x of a 1x1, stride-1, unpadded layer (groups 1) into ``out`` (N, C, H, W): the
    in-place forward of dY (C-contiguous, ``dtype``) by the filters transposed, (C, F)."""
    weight_t = np.ascontiguousarray(
        np.asarray(weight, dtype=dtype).reshape(geometry.F, geometry.C).T)
    return forward(grad_output, weight_t.reshape(geometry.C, geometry.F, 1, 1), None,
                   _input_grad_geometry(geometry), dtype, n_threads, out)


def in_place(geometry: ConvGeometry, itemsize: int) -> bool:
    """A 1x1, stride-1, unpadded layer (whose image holds a strip): its planes are the
    input itself."""
    g = geometry
    return (g.KH == g.KW == 1 and g.stride_h == g.stride_w == 1
            and g.pad_top == g.pad_bottom == g.pad_left == g.pad_right == 0
            and g.OH * g.OW >= strip_positions(g, itemsize))


def forward(x: np.ndarray, weight: np.ndarray, bias, geometry: ConvGeometry, dtype,
            n_threads: int, out: np.ndarray, relu: bool = False,
            wpack: np.ndarray | None = None) -> np.ndarray:
    """``act(conv2d(x, weight) + bias)`` by the implicit GEMM kernel, into ``out``
    (N, F, OH, OW). ``x`` must be C-contiguous of ``dtype``; ``wpack`` is ``weight``
    already packed by :func:`fastconv._direct.pack_weight` (a layer's cache), else it is
    packed here (0.24 ms for resnet-3x3-s2's 128 x 1152 filters)."""
    g = geometry
    itemsize = np.dtype(dtype).itemsize
    plan = _plane_plan(g, itemsize, n_threads)
    strip = plan.strip
    if wpack is None:
        wpack = pack_weight(np.asarray(weight, dtype=dtype), dtype)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    direct_read = plan.in_place
    # a block hanging past an image's last position reads up to strip + Wq more
    per_thread = 0 if direct_read else plan.band_elements + strip + plan.Wq
    planes = workspace("implicit-planes", dtype, n_threads * per_thread)
    acc = workspace("implicit-acc", dtype,
                    n_threads * plan.band_strips * -(-g.F // _direct.FILTER_BLOCK)
                    * _direct.FILTER_BLOCK * strip)
    _conv_implicit.forward(x, wpack, b, out, planes, acc, plan.rowmap, plan.colmap, plan.lo,
                           plan.hi, plan.row_slot, plan.col_slot, plan.phases, g.pad_top,
                           g.pad_left, plan.offsets, plan.Hq, plan.Wq, plan.band_rows,
                           plan.band_strips, plan.channel_block, g.KH, g.KW, plan.reach,
                           g.stride_h, g.stride_w, strip, K_BLOCK, direct_read, relu,
                           n_threads)
    return out


#: A weight-gradient item's column-tap planes (a thread's workspace) stay in L2 beside
#: the band's dY rows, which every block of taps streams. On resnet-3x3-s2, 256 KiB ran
#: 1.13x / 1.15x im2col's grad_weight (2 / 1 threads), 512 KiB 1.08x / 1.18x, 2 MiB
#: 1.11x / 1.07x, 64 KiB 0.68x (interleaved, median per-call ratio).
WEIGHT_GRAD_PLANE_BYTES = 256 << 10
#: ``algorithm="auto"`` takes the implicit weight gradient for layers wider than 1x1
#: with at least this many output pixels per image: each block sums FB x FC_WG_TB
#: vectors along one band's pixels, then their lanes are added, so short bands pay that
#: more often. Against im2col's grad_weight (interleaved, median per-call ratio, 2 / 1
#: threads, 3x3 stride 2 unless said): 128 -> 128 to 16x16 0.93x / 1.08x, 20x20 0.93x /
#: 0.94x, 24x24 1.05x / 1.16x, 28x28 (resnet-3x3-s2) 1.08-1.13x / 1.15-1.18x; 256 -> 256
#: to 14x14 0.74x / 0.74x, 512 -> 512 to 7x7 0.35x; 64 -> 64 7x7 s2 to 28x28 1.05x /
#: 1.14x; 32 -> 64 5x5 s1 on 28x28 1.28x / 1.30x; 16 -> 32 5x5 on 32x32 2.4x / 2.1x;
#: 1x1 256 -> 64 on 56x56 0.75x (BLAS reads the input in place there). Its filters must
#: also stay within AUTO_MAX_WEIGHT_BYTES: each thread's partial sums are their size
#: (256 -> 256 to 28x28, 2.25 MiB: 0.91x / 0.98x).
AUTO_MIN_WEIGHT_GRAD_POSITIONS = 576


class _WeightGradPlan(NamedTuple):
    """How :func:`backward_weight` lays out an item's column-tap planes."""

    band_rows: int        # output rows per work item
    channel_block: int    # input channels per work item
    row_phases: int       # row phases some tap reads
    row_index: np.ndarray  # (sh,): the row phase's planes, -1 if no tap reads it
    offsets: np.ndarray   # (channel_block*taps,): where tap (c, kh, kw) reads in the planes
    plane_elements: int   # channel_block*row_phases*KW*(band_rows + reach)*OW
    plane_used: np.ndarray  # (sh*KW,) uint8: whether the taps read plane (ph, kw)


@functools.lru_cache(maxsize=256)
def _weight_grad_plan(g: ConvGeometry, itemsize: int, taps: tuple | None = None
                      ) -> _WeightGradPlan:
    """Bands and channel blocks whose planes fill about WEIGHT_GRAD_PLANE_BYTES; every
    tap of each channel, or only ``taps`` (indices kh*KW + kw, in that order)."""
    sh, dh = g.stride_h, g.dilation_h
    reach = (g.KH - 1) * dh // sh
    kh = np.arange(g.KH, dtype=np.intp) * dh
    used = np.unique(kh % sh)
    row_index = np.full(sh, -1, np.intp)
    row_index[used] = np.arange(len(used))
    row_bytes = len(used) * g.KW * g.OW * itemsize       # one plane row of one channel
    # whole images where 8 channels fit, else bands of rows
    band_rows = max(1, min(g.OH, WEIGHT_GRAD_PLANE_BYTES // (8 * row_bytes) - reach))
    channel_block = max(1, min(g.C, WEIGHT_GRAD_PLANE_BYTES // ((band_rows + reach) * row_bytes)))
    plane = (band_rows + reach) * g.OW
    c = np.arange(channel_block, dtype=np.intp)[:, None, None]
    kw = np.arange(g.KW, dtype=np.intp)[None, None, :]
    offsets = ((((c * len(used) + row_index[kh % sh][None, :, None]) * g.KW + kw) * plane
                + (kh // sh)[None, :, None] * g.OW)).reshape(channel_block, -1)
    taps = tuple(range(g.KH * g.KW)) if taps is None else taps
    offsets = np.ascontiguousarray(offsets[:, list(taps)]).reshape(-1)
    plane_used = np.zeros(sh * g.KW, np.uint8)
    for k in taps:
        plane_used[(k // g.KW) * dh % sh * g.KW + k % g.KW] = 1
    for array in (row_index, offsets, plane_used):
        array.flags.writeable = False      # shared by every call with this geometry
    return _WeightGradPlan(band_rows, channel_block, len(used), row_index, offsets,
                           channel_block * len(used) * g.KW * plane, plane_used)


def pays_off_weight_grad(geometry: ConvGeometry, itemsize: int = 4) -> bool:
    """Whether ``algorithm="auto"`` takes :func:`backward_weight` for a plain NCHW layer's
    grad_weight (after the direct and Winograd weight gradients): a kernel wider than 1x1,
    at least AUTO_MIN_WEIGHT_GRAD_POSITIONS output pixels per image and filters of at most
    AUTO_MAX_WEIGHT_BYTES."""
    g = geometry
    return (applies(g) and g.KH * g.KW > 1 and g.OH * g.OW >= AUTO_MIN_WEIGHT_GRAD_POSITIONS
            and g.F * g.C * g.KH * g.KW * itemsize <= AUTO_MAX_WEIGHT_BYTES)


def backward_weight(x: np.ndarray, grad_output: np.ndarray, geometry: ConvGeometry, dtype,
                    n_threads: int, out: np.ndarray, taps: tuple | None = None) -> np.ndarray:
    """grad_weight of a plain NCHW layer, ``(F, C*KH*KW)`` into ``out`` (flat), without a
    column matrix: the sums run along dY's rows as they lie and along runs of
    column-tap planes of the input (see ``fastconv._conv_implicit.backward_weight``),
    into per-thread partial sums over the batch that are reduced at the end.
    ``x`` and ``grad_output`` must be C-contiguous of ``dtype``. With ``taps`` (indices
    kh*KW + kw) only those: ``out`` is then ``(F, C, len(taps))``, flat."""
    g = geometry
    itemsize = np.dtype(dtype).itemsize
    plan = _plane_plan(g, itemsize, n_threads)
    wplan = _weight_grad_plan(g, itemsize, taps)
    per_channel = g.KH * g.KW if taps is None else len(taps)
    K = g.C * per_channel
    # + 8: a band's last vector of pixels may read past the last plane (masked, not summed)
    planes = workspace("implicit-planes", dtype, n_threads * (wplan.plane_elements + 8))
    partial = workspace("partial", dtype, n_threads * g.F * K).reshape(n_threads, -1)
    _conv_implicit.backward_weight(x, grad_output.reshape(g.N, g.F, -1), partial, planes,
                                   plan.rowmap, plan.colmap, plan.lo, plan.hi, wplan.row_index,
                                   wplan.row_phases, wplan.offsets, plan.Hq, plan.Wq, g.OH,
                                   g.OW, wplan.band_rows, wplan.channel_block, g.KH, g.KW,
                                   plan.reach, g.stride_h, g.stride_w, g.dilation_w,
                                   g.pad_left, n_threads, per_channel, wplan.plane_used)
    _conv.reduce_rows(partial, out, n_threads)
    return out
