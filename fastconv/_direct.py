"""Direct convolution of layers with few input channels: packing, maps and workspace -> kernel.

``conv2d(..., algorithm="direct")`` on a plain (groups = 1) NCHW layer, and
``algorithm="auto"`` where :func:`pays_off`, run ``fastconv._conv_direct``:
register-blocked sums over the C*KH*KW taps of each output row, which beat
im2col + GEMM when that GEMM would be too shallow (K = C*KH*KW of 25 .. 150
for a network's first layers). grad_weight of the same layers
(:func:`backward_weight`) sums dY times the same phase rows: its GEMM would
have only F x K outputs per image. Depthwise layers have their own direct kernel
(``fastconv._depthwise``). grad_x runs by the im2col engine.

The pixel-row kernel (:func:`forward_pixel_rows`) is the direct forward of channels-last
layers and of NCHW ones with more channels, wider than 1x1 (``fastconv._implicit``
takes 1x1 ones): it reads padded copies of whole input rows, blocks of output pixels x
vectors of filters summing every tap.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from fastconv import _conv, _conv_direct
from fastconv._padding import source_indices, source_map
from fastconv._validation import ConvGeometry
from fastconv._workspace import workspace

__all__ = ["applies", "pays_off", "pays_off_nhwc", "pays_off_rows", "pack_weight",
           "pack_weight_rows", "forward", "forward_pixel_rows", "backward_weight"]

#: Filters per register block of the kernel (FC_FB in _direct_kernels.h).
FILTER_BLOCK = 4
#: Columns the kernel may read past a row's last output (its widest vector block).
VECTOR_COLUMNS = 8
#: Whether the kernel runs its AVX-512 build (blocks of 4 and 2 vectors of 32 bytes as 2
#: and 1 of 64 bytes, _direct_kernels.h): where the CPU has AVX-512.
WIDE_KERNEL = _conv_direct.wide_kernel()

#: ``algorithm="auto"`` takes the direct kernel for plain layers with at most this
#: many input channels (measured: README "Choosing the algorithm").
AUTO_MAX_CHANNELS = 4
#: The channels-last kernel reads the taps of a block of filters (C*KH*KW x 64 values)
#: for every block of output pixels: ``algorithm="auto"`` takes it for NHWC layers wider
#: than 1x1 with at most this many taps (the block's filters stay in L2: 288 KiB, 64
#: float32 or 32 float64 filters), where it measured faster than NHWC im2col + GEMM,
#: which gathers a column tile first: against it (2 threads) 1.3-1.5x for 1-3 channels,
#: 1.1-1.3x for 8-64, 1.07x for resnet-3x3-s2's 1152 taps; 0.90-1.00x with 2304 taps,
#: 0.68-0.76x with 4608.
AUTO_MAX_TAPS_NHWC = 1152


#: The kernel copies each input row it reads into a padded row of the columns its taps
#: span; beyond this many columns more than the input's own width (a padding or
#: dilation far larger than the image) that row would dwarf the input: im2col then.
MAX_EXTRA_ROW_COLUMNS = 64


def row_span(geometry: ConvGeometry) -> int:
    """Padded columns one output row's taps span: ``(OW-1)*sw + dw*(KW-1) + 1``."""
    g = geometry
    return (g.OW - 1) * g.stride_w + g.dilation_w * (g.KW - 1) + 1


def applies(geometry: ConvGeometry) -> bool:
    """A plain (ungrouped) layer whose padded rows stay about the size of the input's:
    the kernel sums every input channel into every filter from copies of those rows."""
    return (geometry.groups == 1
            and row_span(geometry) <= 2 * geometry.W + MAX_EXTRA_ROW_COLUMNS)


def pays_off(geometry: ConvGeometry) -> bool:
    """Whether ``algorithm="auto"`` takes the direct kernel for this NCHW layer."""
    return applies(geometry) and geometry.C <= AUTO_MAX_CHANNELS


def pays_off_nhwc(geometry: ConvGeometry) -> bool:
    """Whether ``algorithm="auto"`` takes the channels-last direct kernel for this NHWC
    layer's forward (where Winograd does not: see ``fastconv._functional``); a 1x1
    layer's GEMM reads its input in place, no gather to save."""
    g = geometry
    return (applies(g) and g.KH * g.KW > 1
            and g.C * g.KH * g.KW <= AUTO_MAX_TAPS_NHWC)


#: ``algorithm="auto"`` takes the pixel-row kernel for the forward of NCHW plain layers
#: wider than 1x1 with more than AUTO_MAX_CHANNELS channels (where Winograd does not
#: apply) up to this many bytes of filters, by item size: each output row streams all of
#: them through L2. Against im2col + GEMM (3x3 stride 2 unless said, 8 images,
#: interleaved, median of per-call ratios, 1 / 2 threads, AVX-512 build), float32:
#: 128 -> 128 to 14x14 (0.56 MiB) 1.32x / 1.33x, 5x5 64 -> 128 1.32x / 1.32x, 192 -> 192
#: (1.27 MiB) 1.26x / 1.22x, 256 -> 256 to 7x7, 14x14, 28x28 (2.25 MiB) 1.19x / 1.06x,
#: 1.16x / 1.11x, 1.18x / 1.16x, 256 -> 512 (4.5 MiB) 1.03x / 1.04x, 384 -> 384 (5.06 MiB)
#: 1.10x / 1.05x and 1.11x / 1.14x, but 512 -> 512 to 7x7 (9 MiB) 0.82x / 0.72x; float64:
#: 128 -> 128 (1.12 MiB) 1.23x (2 threads), 192 -> 192 (2.53 MiB) 1.14x / 1.13x, 256 -> 256
#: (4.5 MiB) 0.94-1.25x, 9 MiB and more 0.28-0.94x. The 32-byte build (no AVX-512) was
#: not measured against im2col: it keeps the bound its caller passes, the implicit
#: GEMM's, under which that kernel had won (fastconv._implicit.AUTO_MAX_WEIGHT_BYTES).
AUTO_ROWS_MAX_WEIGHT_BYTES = {4: 6 << 20, 8: 3 << 20}


def pays_off_rows(geometry: ConvGeometry, itemsize: int, narrow_max_bytes: int) -> bool:
    """Whether ``algorithm="auto"`` takes the pixel-row kernel for this plain NCHW layer's
    forward (called for layers wider than 1x1 with more than AUTO_MAX_CHANNELS channels,
    see fastconv._implicit.pays_off): filters of at most AUTO_ROWS_MAX_WEIGHT_BYTES with
    the AVX-512 build, ``narrow_max_bytes`` without it."""
    g = geometry
    weight_bytes = g.F * g.C * g.KH * g.KW * itemsize
    limit = AUTO_ROWS_MAX_WEIGHT_BYTES.get(itemsize, 0) if WIDE_KERNEL else narrow_max_bytes
    return weight_bytes <= limit


def pack_weight(weight: np.ndarray, dtype) -> np.ndarray:
    """(F, C, KH, KW) -> blocks of FILTER_BLOCK filters with the filter index innermost,
    ``[F/4][C][KH][KW][4]``, zero past F: one block's taps read 4 adjacent values."""
    F, C, KH, KW = weight.shape
    blocks = -(-F // FILTER_BLOCK)
    padded = np.zeros((blocks * FILTER_BLOCK, C, KH, KW), dtype)
    padded[:F] = weight
    packed = padded.reshape(blocks, FILTER_BLOCK, C, KH, KW).transpose(0, 2, 3, 4, 1)
    return np.ascontiguousarray(packed).reshape(-1)


class _RowPlan(NamedTuple):
    """How the kernel lays out and reads a band's input rows (see forward)."""

    S: int                # column phases (the stride, or 1 for a single output column)
    ldr: int              # columns of one phase row
    rowmap: np.ndarray    # (OH*KH,): input row under (oh, kh), -1 for padding
    colmap: np.ndarray    # (S*ldr,): input column under padded column p, -1 for a zero
    lo: np.ndarray        # (S,): phase r's columns [lo[r], hi[r]) lie inside the input
    hi: np.ndarray
    tap: np.ndarray       # (KW,): where kernel column kw starts in a row's phases


@functools.lru_cache(maxsize=256)
def _row_plan(g: ConvGeometry) -> _RowPlan:
    """The row layout of a geometry: a pure function of it, built once (NumPy setup costs
    tens of microseconds, a visible share of a small layer's call)."""
    # one output column reads the same taps whatever the stride: one phase then
    S, dw = (g.stride_w if g.OW > 1 else 1), g.dilation_w
    # a phase row holds every output column plus the reach of the last kernel column
    ldr = -(-g.OW // VECTOR_COLUMNS) * VECTOR_COLUMNS + (g.KW - 1) * dw // S + 1
    # the input row under every (oh, kh): OH*KH entries, whatever the stride (a map of
    # every padded row would be as long as a huge stride or padding)
    taps = (np.arange(g.OH, dtype=np.intp)[:, None] * g.stride_h
            + np.arange(g.KH, dtype=np.intp)[None, :] * g.dilation_h)
    rowmap = source_indices(taps.reshape(-1), g.H, g.pad_top, g.pad_bottom, g.padding_mode)
    colmap = source_map(S * ldr, g.W, g.pad_left, g.pad_right, g.padding_mode)
    tap = np.array([(kw * dw % S) * ldr + kw * dw // S for kw in range(g.KW)], np.intp)
    # phase r, column q shows plane column q*S + r - left: inside for q in [lo[r], hi[r])
    lo = np.array([min(ldr, max(0, -(-(g.pad_left - r) // S))) for r in range(S)], np.intp)
    hi = np.array([max(lo[r], min(ldr, (g.W - 1 + g.pad_left - r) // S + 1)) for r in range(S)],
                  np.intp)
    for array in (rowmap, colmap, lo, hi, tap):
        array.flags.writeable = False      # shared by every call with this geometry
    return _RowPlan(S, ldr, rowmap, colmap, lo, hi, tap)


#: Bands are cut as if each output row had its own KH phase rows per channel, this many
#: elements in all: the band stays in L2 (1 MiB per core here). Its output rows share
#: their input rows (a 3x3 stride-1 band of R rows stores R + 2), so it takes less; the
#: sharing alone ran cifar-3x3's forward 1.07x and resnet-stem's 1.04-1.05x (1 and 2
#: threads) with these same bands.
BAND_ELEMENTS = 1 << 15


def band_rows(g: ConvGeometry, rows: "_RowPlan", n_threads: int) -> int:
    """Output rows per work item: as many as BAND_ELEMENTS counts (see there), but
    at least 4 items per thread over the batch (N = 1 inference still splits)."""
    return _band_rows(g, g.C * g.KH * rows.S * rows.ldr, n_threads)


def _band_rows(g: ConvGeometry, per_row: int, n_threads: int) -> int:
    """:func:`band_rows` for rows of ``per_row`` elements per output row."""
    band = max(1, min(g.OH, BAND_ELEMENTS // per_row))
    return max(1, min(band, -(-g.N * g.OH // (4 * n_threads))))


def forward(x: np.ndarray, weight: np.ndarray, bias, geometry: ConvGeometry, dtype,
            n_threads: int, out: np.ndarray, relu: bool = False) -> np.ndarray:
    """``act(conv2d(x, weight) + bias)`` by the direct kernel, into ``out`` (N, F, OH, OW).

    ``x`` must be C-contiguous of ``dtype``.
    """
    g = geometry
    rows = _row_plan(g)
    band = band_rows(g, rows, n_threads)
    wpack = pack_weight(np.asarray(weight, dtype=dtype), dtype)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    strides = band_layout(g, band)
    scratch = workspace("direct", dtype, n_threads * int(strides[4]))
    live = workspace("direct-live", np.uint8, n_threads * band * g.KH)
    _conv_direct.forward(x, wpack, b, out, scratch, live, rows.rowmap, rows.colmap, rows.lo,
                         rows.hi, g.pad_left, rows.tap, g.KH, g.KW, g.stride_h, g.dilation_h,
                         rows.S, rows.ldr, strides, band, relu, WIDE_KERNEL, n_threads)
    return out


@functools.lru_cache(maxsize=256)
def band_layout(g: ConvGeometry, band: int) -> np.ndarray:
    """Where a band's phase rows lie in a thread's workspace (see fastconv._conv_direct):
    ``(band_stride, c_stride, kh_stride, shared, elements)``, tap row kh of output row r
    of channel c starting at ``r*band_stride + c*c_stride + kh*kh_stride``.

    The output rows share their input rows (``shared``: padded row r*sh + kh*dh stored
    once) unless that would store more rows than one copy per (r, kh) does: a stride
    beyond the kernel's reach skips rows, and a huge one would leave a gap as large.
    """
    rows = _row_plan(g)
    row_len = rows.S * rows.ldr
    spanned = (band - 1) * g.stride_h + (g.KH - 1) * g.dilation_h + 1
    if spanned <= band * g.KH:
        layout = (g.stride_h * row_len, spanned * row_len, g.dilation_h * row_len, 1,
                  g.C * spanned * row_len)
    else:
        layout = (g.C * g.KH * row_len, g.KH * row_len, row_len, 0, band * g.C * g.KH * row_len)
    strides = np.array(layout, np.intp)
    strides.flags.writeable = False
    return strides


@functools.lru_cache(maxsize=256)
def _tap_offsets(g: ConvGeometry, band: int) -> np.ndarray:
    """Where each tap k = (c*KH + kh)*KW + kw starts for a band's first output row, in
    the phase rows of bands of ``band`` rows (:func:`band_layout`)."""
    rows = _row_plan(g)
    _, c_stride, kh_stride = band_layout(g, band)[:3]
    starts = (np.arange(g.C, dtype=np.intp)[:, None] * c_stride
              + np.arange(g.KH, dtype=np.intp)[None, :] * kh_stride)
    offsets = (starts.reshape(-1)[:, None] + rows.tap[None, :]).reshape(-1)
    offsets.flags.writeable = False
    return offsets


def backward_weight(x: np.ndarray, dy: np.ndarray, geometry: ConvGeometry, dtype,
                    n_threads: int, out: np.ndarray) -> np.ndarray:
    """grad_weight of a layer :func:`applies` to, by the direct kernel, into ``out``
    (F*C*KH*KW values, C-order of (F, C, KH, KW)).

    Every output row's input rows are laid out as in :func:`forward`; each thread sums
    its bands' ``dY x input`` products into its own row of partial sums, reduced at the
    end (a GEMM of only F x C*KH*KW outputs per image runs BLAS far below its speed).
    ``x`` and ``dy`` must be C-contiguous of ``dtype``.
    """
    g = geometry
    rows = _row_plan(g)
    band = band_rows(g, rows, n_threads)
    K = g.C * g.KH * g.KW
    partial = workspace("direct-weight-grad", dtype, n_threads * g.F * K).reshape(n_threads, -1)
    strides = band_layout(g, band)
    scratch = workspace("direct", dtype, n_threads * int(strides[4]))
    live = workspace("direct-live", np.uint8, n_threads * band * g.KH)
    _conv_direct.backward_weight(x, dy, partial, scratch, live, rows.rowmap, rows.colmap,
                                 rows.lo, rows.hi, g.pad_left, _tap_offsets(g, band), g.KH,
                                 g.stride_h, g.dilation_h, rows.S, rows.ldr, strides, band,
                                 n_threads)
    _conv.reduce_rows(partial, out, n_threads)
    return out


#: Filter vectors of the pixel-row kernel are 64 bytes: the packed filters and the bias
#: are padded with zeros to a whole number of them (the 32-byte build reads two per 64).
NHWC_VECTOR_BYTES = 64

#: Output rows narrower than this run the NCHW pixel-row kernel in blocks of 2 filter
#: vectors (up to 12 pixels), wider ones in blocks of 4 (6 pixels): a block's filters
#: stream from L2 once per block, so short rows want long blocks. 3x3 stride-2 layers
#: into 7x7 (8 images, interleaved, 1 / 2 threads): 256 -> 256 1.36x / 1.12x faster in
#: blocks of 2; into 28x28 0.95-1.05x, 32 -> 64 into 56x56 0.95x / 0.97x.
NARROW_ROW = 12


def pack_weight_rows(weight: np.ndarray, dtype, out: np.ndarray | None = None,
                     layout: str = "NHWC") -> np.ndarray:
    """(F, C, KH, KW) -> (KH*KW*C, ldw), the pixel-row kernel's taps in the order its
    input lies: ``[kh][kw][c][f]`` for NHWC rows, ``[kh][c][kw][f]`` for NCHW ones; the
    filters of one tap adjacent and zero past F to ``ldw``, a whole number of 64-byte
    vectors; into ``out`` (that many C-contiguous elements of ``dtype``) where given."""
    F, C, KH, KW = weight.shape
    lanes = NHWC_VECTOR_BYTES // np.dtype(dtype).itemsize
    ldw = -(-F // lanes) * lanes
    if out is None:
        out = np.empty(KH * KW * C * ldw, dtype)
    nchw = layout == "NCHW"
    packed = out.reshape((KH, C, KW, ldw) if nchw else (KH, KW, C, ldw))
    packed[..., F:] = 0
    packed[..., :F] = np.asarray(weight).transpose((2, 1, 3, 0) if nchw else (2, 3, 1, 0))
    return packed.reshape(KH * KW * C, ldw)


class _PixelRowPlan(NamedTuple):
    """How the pixel-row kernel lays out and reads a band's input rows (see
    forward_pixel_rows)."""

    rowmap: np.ndarray    # (OH*KH,): input row under (oh, kh), -1 for padding
    colmap: np.ndarray    # (Wp,): input column under padded pixel p, -1 for zeros
    lo: int               # pixels [lo, hi) are input columns p - pad_left
    hi: int
    offsets: np.ndarray   # (KW*C,): where each tap of a padded row lies (see below)
    shared: bool          # a band's output rows share their input rows
    band: int             # output rows per work item
    band_elements: int    # a band's padded rows: one thread's workspace
    vectors: int          # filter vectors per register block, at most


@functools.lru_cache(maxsize=256)
def _pixel_row_plan(g: ConvGeometry, n_threads: int, layout: str = "NHWC") -> _PixelRowPlan:
    """The padded-row layout of a geometry, built once (see :func:`_row_plan`): a row
    holds Wp pixels of C values (NHWC; tap ``(kw, c)`` at ``kw*dw*C + c``) or C runs of
    Wp values (NCHW; tap ``(c, kw)`` at ``c*Wp + kw*dw``)."""
    width = row_span(g)
    colmap = source_map(width, g.W, g.pad_left, g.pad_right, g.padding_mode)
    # (a negative padding crops the input: a stride phase of grad_x, fastconv._stride_phases)
    lo = min(width, max(0, g.pad_left))
    hi = max(lo, min(width, g.W + g.pad_left))
    kw, c = np.arange(g.KW, dtype=np.intp), np.arange(g.C, dtype=np.intp)
    if layout == "NCHW":
        offsets = (c[:, None] * width + kw[None, :] * g.dilation_w).reshape(-1)
        vectors = 2 if g.OW < NARROW_ROW else 4
    else:
        offsets = (kw[:, None] * (g.dilation_w * g.C) + c[None, :]).reshape(-1)
        vectors = 4
    band = _band_rows(g, g.C * g.KH * width, n_threads)
    # one row per padded input row unless a stride beyond the kernel's reach would leave
    # rows (and a huge one, a gap as large) that no output row reads
    spanned = (band - 1) * g.stride_h + (g.KH - 1) * g.dilation_h + 1
    shared = spanned <= band * g.KH
    rowmap = _row_plan(g).rowmap
    for array in (colmap, offsets):
        array.flags.writeable = False
    rows = spanned if shared else band * g.KH
    return _PixelRowPlan(rowmap, colmap, lo, hi, offsets, shared, band,
                         rows * width * g.C, vectors)


def forward_pixel_rows(x: np.ndarray, weight: np.ndarray, bias, geometry: ConvGeometry,
                       dtype, n_threads: int, out: np.ndarray, relu: bool = False,
                       layout: str = "NHWC", wpack: np.ndarray | None = None) -> np.ndarray:
    """``act(conv2d(x, weight) + bias)`` by the pixel-row kernel, into ``out``: channels-last
    arrays (x (N, H, W, C), out (N, OH, OW, F)) or, with ``layout="NCHW"``, channels-first
    ones; ``x`` must be C-contiguous of ``dtype``.

    Per work item (a band of one image's output rows) the input rows under the band are
    copied padded; the kernel then sums every tap for blocks of pixels x vectors of
    filters (``fastconv/_direct_nhwc_kernels.h``). ``wpack``: the filters packed by
    :func:`pack_weight_rows` for this layout (a layer's cache), else packed here.
    """
    g = geometry
    plan = _pixel_row_plan(g, n_threads, layout)
    lanes = NHWC_VECTOR_BYTES // np.dtype(dtype).itemsize
    ldw = -(-g.F // lanes) * lanes
    if wpack is None:
        # in a reused workspace, as _nhwc.nhwc_weight's: a fresh array per call costs page
        # faults (resnet-3x3-s2's packed filters are 576 KiB)
        wpack = pack_weight_rows(weight, dtype, workspace("direct-nhwc-weight", dtype,
                                                          g.C * g.KH * g.KW * ldw), layout)
    b = np.zeros(ldw, dtype)
    if bias is not None:
        b[:g.F] = bias
    scratch = workspace("direct-nhwc", dtype, n_threads * plan.band_elements)
    pointers = workspace("direct-nhwc-rows", np.intp, n_threads * 3 * plan.band * g.KH)
    _conv_direct.forward_pixel_rows(x, wpack, b, out, scratch, pointers, plan.rowmap,
                                    plan.colmap, plan.lo, plan.hi, g.pad_left, plan.offsets,
                                    g.KH, g.stride_h, g.dilation_h, g.stride_w, plan.shared,
                                    plan.band, relu, WIDE_KERNEL, layout == "NCHW",
                                    plan.vectors, n_threads)
    return out
