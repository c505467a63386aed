"""im2col / col2im kernels.

Two layouts live here:

* the engine's per-image *column layout* (Caffe's): rows are ``(c, kh, kw)``,
  columns are output positions ``p = oh * OW + ow``, so ``W (F x K) @ col (K x P)``
  is the image's NCHW output with no transpose. The kernels fill or consume a
  tile of columns ``[p0, p1)`` for the channels ``[c0, c1)``;
* the seeds' batch layout ``(N*OH*OW, C*FH*FW)`` behind the public
  :func:`fastconv.im2col` / :func:`fastconv.col2im`.

All kernels assume validated geometry (see ``fastconv._validation``).
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy, memset


cdef ConvGeom make_geom(object geometry) except *:
    """Copy a ``fastconv._validation.ConvGeometry`` into the kernels' struct."""
    cdef ConvGeom g
    g.C = geometry.C
    g.H = geometry.H
    g.W = geometry.W
    g.KH = geometry.KH
    g.KW = geometry.KW
    g.stride_h = geometry.stride_h
    g.stride_w = geometry.stride_w
    g.pad_top = geometry.pad_top
    g.pad_left = geometry.pad_left
    g.dilation_h = geometry.dilation_h
    g.dilation_w = geometry.dilation_w
    g.OH = geometry.OH
    g.OW = geometry.OW
    g.groups = geometry.groups
    g.mode = geometry.mode_code
    return g


cdef inline void valid_ow_range(const ConvGeom *g, Py_ssize_t kw,
                                Py_ssize_t *lo, Py_ssize_t *hi) noexcept nogil:
    """Output columns ``ow`` in ``[lo, hi)`` read an input column inside the image.

    Computing the range once per kernel column keeps the copy loops free of
    branches (and lets the stride-1 case be a memcpy).
    """
    cdef Py_ssize_t offset = kw * g.dilation_w - g.pad_left   # iw = ow * stride_w + offset
    cdef Py_ssize_t last
    if offset >= 0:
        lo[0] = 0
    else:
        lo[0] = (-offset + g.stride_w - 1) // g.stride_w
    last = g.W - 1 - offset
    if last < 0:
        hi[0] = 0
    else:
        hi[0] = last // g.stride_w + 1
    if hi[0] > g.OW:
        hi[0] = g.OW
    if lo[0] > hi[0]:
        lo[0] = hi[0]


cdef inline Py_ssize_t clamp(Py_ssize_t v, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    return lo if v < lo else (hi if v > hi else v)


cdef void im2col_tile(const floating *img, const ConvGeom *g,
                      Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t p0, Py_ssize_t p1,
                      floating *col, Py_ssize_t ld) noexcept nogil:
    """col[(c - c0, kh, kw), p - p0] = img[c, oh*sh - pt + kh*dh, ow*sw - pl + kw*dw].

    Outside the image the value is 0 (``g.mode == PAD_ZEROS``) or the pixel
    :func:`source_index` maps it to (reflect, replicate, circular): the
    padding is read in place, never materialised.

    # IN  img: one image, (C, H, W) contiguous
    # OUT col: ((c1 - c0) * KH * KW) rows of (p1 - p0) columns, row stride ld
    """
    cdef Py_ssize_t plane_size = g.H * g.W
    cdef Py_ssize_t c, kh, kw, p, oh, ow, ow0, ow1, ih, a, b, lo, hi, base
    cdef const floating *plane
    cdef floating *dst
    for c in range(c0, c1):
        plane = img + c * plane_size
        for kh in range(g.KH):
            for kw in range(g.KW):
                dst = col + (((c - c0) * g.KH + kh) * g.KW + kw) * ld
                valid_ow_range(g, kw, &lo, &hi)
                p = p0
                while p < p1:
                    oh = p // g.OW
                    ow0 = p - oh * g.OW
                    ow1 = ow0 + (p1 - p)
                    if ow1 > g.OW:
                        ow1 = g.OW
                    ih = source_index(oh * g.stride_h - g.pad_top + kh * g.dilation_h, g.H,
                                      g.mode)
                    if ih < 0:
                        memset(dst, 0, (ow1 - ow0) * sizeof(floating))
                    else:
                        a = clamp(lo, ow0, ow1)
                        b = clamp(hi, a, ow1)
                        base = ih * g.W + kw * g.dilation_w - g.pad_left
                        if a > ow0:
                            border_gather(plane + ih * g.W, g, kw, ow0, a, dst)
                        if g.stride_w == 1:
                            memcpy(dst + (a - ow0), plane + base + a, (b - a) * sizeof(floating))
                        elif g.stride_w == 2:
                            copy_every_other(plane + base + 2 * a, dst + (a - ow0), b - a)
                        else:
                            for ow in range(a, b):
                                dst[ow - ow0] = plane[base + ow * g.stride_w]
                        if ow1 > b:
                            border_gather(plane + ih * g.W, g, kw, b, ow1, dst + (b - ow0))
                    dst += ow1 - ow0
                    p += ow1 - ow0


# Stride 2 (downsampling layers) gets loops of their own: with the stride a constant
# the compiler vectorises them with shuffles, where the general strided loop stays
# scalar (the gather was 18% of resnet-3x3-s2's forward at 1 thread).
cdef inline void copy_every_other(const floating *src, floating *dst,
                                  Py_ssize_t n) noexcept nogil:
    """dst[i] = src[2*i] for i < n."""
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = src[2 * i]


cdef inline void add_every_other(const floating *src, floating *dst,
                                 Py_ssize_t n) noexcept nogil:
    """dst[2*i] += src[i] for i < n (the adjoint of :func:`copy_every_other`)."""
    cdef Py_ssize_t i
    for i in range(n):
        dst[2 * i] += src[i]


cdef inline void border_gather(const floating *row, const ConvGeom *g, Py_ssize_t kw,
                               Py_ssize_t ow_a, Py_ssize_t ow_b, floating *dst) noexcept nogil:
    """dst[ow - ow_a] for output columns [ow_a, ow_b) whose input column is padding."""
    cdef Py_ssize_t ow, iw
    if g.mode == PAD_ZEROS:
        memset(dst, 0, (ow_b - ow_a) * sizeof(floating))
        return
    for ow in range(ow_a, ow_b):
        iw = source_index(ow * g.stride_w - g.pad_left + kw * g.dilation_w, g.W, g.mode)
        dst[ow - ow_a] = row[iw]


cdef inline void border_scatter(const floating *src, const ConvGeom *g, Py_ssize_t kw,
                                Py_ssize_t ow_a, Py_ssize_t ow_b, floating *row) noexcept nogil:
    """The adjoint of :func:`border_gather`: padding columns add into the pixel they copied."""
    cdef Py_ssize_t ow, iw
    if g.mode == PAD_ZEROS:
        return
    for ow in range(ow_a, ow_b):
        iw = source_index(ow * g.stride_w - g.pad_left + kw * g.dilation_w, g.W, g.mode)
        row[iw] += src[ow - ow_a]


cdef void col2im_rows_add(const floating *col, const ConvGeom *g,
                         Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t oh0, Py_ssize_t oh1,
                         Py_ssize_t ld, floating *img) noexcept nogil:
    """:func:`col2im_tile_add` for a tile of whole output rows ``[oh0, oh1)``.

    Small planes (OW = 7 .. 16: deep layers, a transposed conv's input) make
    the general loop pay a division, a padding lookup and two clamps for every
    few columns it adds; here each row only computes its input row, and the
    interior adds of stride 1 are a contiguous loop.
    """
    cdef Py_ssize_t plane_size = g.H * g.W, OW = g.OW, sw = g.stride_w
    cdef Py_ssize_t c, kh, kw, oh, ow, ih, lo, hi, base
    cdef floating *plane
    cdef floating *dst
    cdef const floating *src
    for c in range(c0, c1):
        plane = img + c * plane_size
        for kh in range(g.KH):
            for kw in range(g.KW):
                src = col + (((c - c0) * g.KH + kh) * g.KW + kw) * ld
                valid_ow_range(g, kw, &lo, &hi)
                for oh in range(oh0, oh1):
                    ih = source_index(oh * g.stride_h - g.pad_top + kh * g.dilation_h, g.H,
                                      g.mode)
                    if ih >= 0:
                        base = ih * g.W + kw * g.dilation_w - g.pad_left
                        if lo > 0:
                            border_scatter(src, g, kw, 0, lo, plane + ih * g.W)
                        if sw == 1:
                            dst = plane + base
                            for ow in range(lo, hi):
                                dst[ow] += src[ow]
                        elif sw == 2:
                            add_every_other(src + lo, plane + base + 2 * lo, hi - lo)
                        else:
                            for ow in range(lo, hi):
                                plane[base + ow * sw] += src[ow]
                        if hi < OW:
                            border_scatter(src + hi, g, kw, hi, OW, plane + ih * g.W)
                    src += OW


cdef void col2im_tile_add(const floating *col, const ConvGeom *g,
                          Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t p0, Py_ssize_t p1,
                          Py_ssize_t ld, floating *img) noexcept nogil:
    """The adjoint of :func:`im2col_tile`: img[c, ih, iw] += col[(c - c0, kh, kw), p - p0].

    Only the planes ``c0 .. c1 - 1`` are written, so callers may run disjoint
    channel ranges of one image in parallel.

    # IN  col: ((c1 - c0) * KH * KW) rows of (p1 - p0) columns, row stride ld
    # OUT img: one image, (C, H, W) contiguous, accumulated into
    """
    cdef Py_ssize_t plane_size = g.H * g.W
    cdef Py_ssize_t c, kh, kw, p, oh, ow, ow0, ow1, ih, a, b, lo, hi, base
    cdef floating *plane
    cdef const floating *src
    if p0 % g.OW == 0 and p1 % g.OW == 0:
        col2im_rows_add(col, g, c0, c1, p0 // g.OW, p1 // g.OW, ld, img)
        return
    for c in range(c0, c1):
        plane = img + c * plane_size
        for kh in range(g.KH):
            for kw in range(g.KW):
                src = col + (((c - c0) * g.KH + kh) * g.KW + kw) * ld
                valid_ow_range(g, kw, &lo, &hi)
                p = p0
                while p < p1:
                    oh = p // g.OW
                    ow0 = p - oh * g.OW
                    ow1 = ow0 + (p1 - p)
                    if ow1 > g.OW:
                        ow1 = g.OW
                    ih = source_index(oh * g.stride_h - g.pad_top + kh * g.dilation_h, g.H,
                                      g.mode)
                    if ih >= 0:
                        a = clamp(lo, ow0, ow1)
                        b = clamp(hi, a, ow1)
                        base = ih * g.W + kw * g.dilation_w - g.pad_left
                        if a > ow0:
                            border_scatter(src, g, kw, ow0, a, plane + ih * g.W)
                        if g.stride_w == 2:
                            add_every_other(src + (a - ow0), plane + base + 2 * a, b - a)
                        else:
                            for ow in range(a, b):
                                plane[base + ow * g.stride_w] += src[ow - ow0]
                        if ow1 > b:
                            border_scatter(src + (b - ow0), g, kw, b, ow1, plane + ih * g.W)
                    src += ow1 - ow0
                    p += ow1 - ow0


# ---------------------------------------------------------------------------
# The seeds' batch layout: rows (n, oh, ow), columns (c, kh, kw).
# ---------------------------------------------------------------------------

def im2col_rows(const floating[:, :, :, ::1] x, floating[:, ::1] col, object geometry,
                int n_threads):
    """col[(n, oh, ow), (c, kh, kw)] = x[n, c, ih, iw] (0 in the padding).

    # IN  x: (N, C, H, W)
    # OUT col: (N*OH*OW, C*KH*KW), every element written
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t rows = N * g.OH      # one work item: all output columns of one output row
    cdef Py_ssize_t item, n, oh, ow, c, kh, kw, ih, iw
    cdef floating *dst
    cdef const floating *plane
    for item in prange(rows, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // g.OH
        oh = item - n * g.OH
        dst = &col[item * g.OW, 0]
        for ow in range(g.OW):
            for c in range(g.C):
                plane = &x[n, c, 0, 0]
                for kh in range(g.KH):
                    ih = oh * g.stride_h - g.pad_top + kh * g.dilation_h
                    if <size_t> ih >= <size_t> g.H:
                        for kw in range(g.KW):
                            dst[kw] = 0
                    else:
                        for kw in range(g.KW):
                            iw = ow * g.stride_w - g.pad_left + kw * g.dilation_w
                            if <size_t> iw < <size_t> g.W:
                                dst[kw] = plane[ih * g.W + iw]
                            else:
                                dst[kw] = 0
                    dst = dst + g.KW


def col2im_rows(const floating[:, ::1] col, floating[:, :, :, ::1] x, object geometry,
                int n_threads):
    """x[n, c, ih, iw] = sum of col[(n, oh, ow), (c, kh, kw)] over the windows covering it.

    One work item per (n, c) plane, so no two threads write the same element.

    # IN  col: (N*OH*OW, C*KH*KW)
    # OUT x: (N, C, H, W), overwritten
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t planes = N * g.C
    cdef Py_ssize_t item, n, c, oh, ow, kh, kw, ih, iw
    cdef floating *plane
    cdef const floating *src
    for item in prange(planes, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // g.C
        c = item - n * g.C
        plane = &x[n, c, 0, 0]
        memset(plane, 0, g.H * g.W * sizeof(floating))
        for oh in range(g.OH):
            for ow in range(g.OW):
                src = &col[(n * g.OH + oh) * g.OW + ow, c * g.KH * g.KW]
                for kh in range(g.KH):
                    ih = oh * g.stride_h - g.pad_top + kh * g.dilation_h
                    if <size_t> ih < <size_t> g.H:
                        for kw in range(g.KW):
                            iw = ow * g.stride_w - g.pad_left + kw * g.dilation_w
                            if <size_t> iw < <size_t> g.W:
                                plane[ih * g.W + iw] += src[kh * g.KW + kw]
