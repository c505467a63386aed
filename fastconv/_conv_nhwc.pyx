"""Channels-last (NHWC) convolution drivers: row tiles, per-thread workspaces, BLAS gemm.

The column matrix of the whole batch has one *row* per output position
``r = (n*OH + oh)*OW + ow`` and ``K = C*KH*KW`` columns ordered
``(g, kh, kw, cg)``: per group and kernel tap, a chunk of ``Cg = C/G``
input channels copied from the pixel ``x[n, ih, iw, g*Cg:(g+1)*Cg]``. The
weight is taken as ``wt`` of shape (F, Kg = KH*KW*Cg), each filter's taps
reordered to ``(kh, kw, cg)`` (:func:`weight_columns`); ``wt_g`` is the
(Fg, Kg) block of group g. Then

* forward: ``Y[rows, g*Fg:(g+1)*Fg] = col[rows, g*Kg:(g+1)*Kg] @ wt_g.T``;
  the output rows of a tile are contiguous in NHWC, so a tile may span
  images and needs no staging;
* grad_weight: per-thread partial sums of ``dY_g.T @ col_g`` (and of dY's
  rows for the bias), reduced by :func:`reduce_weight_grad`;
* grad_x: ``dcol_g = dY_g @ wt_g``, scattered back into the pixels it came
  from. Rows of one image overlap in dx, so a work item owns whole images,
  or (few images for the threads) one block of an image's channels, or one
  band of an image's input rows (recomputing the output rows that straddle
  two bands).

A tile is a range of rows ``[r0, r1)``; it is only ever materialised in the
calling thread's slice of the workspace, whose size comes from
``fastconv._tiling.plan_nhwc`` and never depends on the batch. BLAS must be
single-threaded while these run (``fastconv._threads``). Every array argument
has been validated, cast and made contiguous by ``fastconv._nhwc``.

BLAS takes 32-bit dimensions (``fastconv._tiling.BLAS_INT_MAX``, read at
every call so tests can lower it): row tiles stay within it (the plan),
``gemm_rm`` cuts anything longer, and the leading dimensions K (a column
row) and F (an output pixel) are checked in ``fastconv._functional``.
"""

cimport openmp
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy, memset

from fastconv import _tiling
from fastconv._blas cimport gemm_nt, gemm_rm
from fastconv._im2col cimport ConvGeom, make_geom, source_index


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef struct Chunks:
    # Where the (group, tap) chunks of one column row live; tap t = kh*KW + kw.
    Py_ssize_t c_first       # input channel of the first group's chunk
    Py_ssize_t n_groups      # groups side by side in a column row
    Py_ssize_t width         # channels per chunk (also the x channel offset between groups)
    Py_ssize_t group_stride  # column offset between groups
    Py_ssize_t tap_stride    # column offset between taps
    bint run                 # a kernel row's KW taps are one run in x and in the column row


cdef inline Chunks make_chunks(const ConvGeom *g, Py_ssize_t c_first, Py_ssize_t n_groups,
                               Py_ssize_t width, Py_ssize_t group_stride,
                               Py_ssize_t tap_stride) noexcept nogil:
    cdef Chunks ch
    ch.c_first = c_first
    ch.n_groups = n_groups
    ch.width = width
    ch.group_stride = group_stride
    ch.tap_stride = tap_stride
    # whole pixels, adjacent taps: x[n, ih, iw:iw+KW, :] is one run of KW*C
    ch.run = n_groups == 1 and width == g.C and tap_stride == g.C and g.dilation_w == 1
    return ch


cdef inline Chunks full_chunks(const ConvGeom *g) noexcept nogil:
    """The whole column row: every group, layout (g, kh, kw, cg)."""
    cdef Py_ssize_t Cg = g.C // g.groups
    return make_chunks(g, 0, g.groups, Cg, g.KH * g.KW * Cg, Cg)


cdef inline void copy_n(floating *dst, const floating *src, Py_ssize_t n) noexcept nogil:
    """dst[:n] = src[:n]. Chunks are often a few floats (C = 1 or 3, depthwise): fixed-size
    copies inline to vector moves where a memcpy call would cost more than the copy."""
    if n >= 32:
        memcpy(dst, src, n * sizeof(floating))
        return
    while n >= 8:
        memcpy(dst, src, 8 * sizeof(floating))
        dst += 8
        src += 8
        n -= 8
    if n >= 4:
        memcpy(dst, src, 4 * sizeof(floating))
        dst += 4
        src += 4
        n -= 4
    if n >= 2:
        memcpy(dst, src, 2 * sizeof(floating))
        dst += 2
        src += 2
        n -= 2
    if n:
        dst[0] = src[0]


cdef inline void copy_runs(floating *dst, Py_ssize_t ld, const floating *src, Py_ssize_t step,
                           Py_ssize_t count, Py_ssize_t n, Py_ssize_t room,
                           const floating *src_end) noexcept nogil:
    """dst[o*ld : o*ld + n] = src[o*step : o*step + n] for o < count.

    A short run (n <= 16) goes as one fixed 8- or 16-element copy: a couple of
    vector moves, where copy_n's size tests and tail moves cost more than the
    copy itself (lenet-mnist, 5 floats a run: the gather was 24% of its NHWC
    forward). The fixed copy also writes the ``wide - n`` elements after the
    run and reads as many past the source run, so it is used only where the
    caller rewrites those elements afterwards (``room``: elements from ``dst``
    that may be written) and the read stays below ``src_end``; other runs are
    copied exactly.
    """
    cdef Py_ssize_t o, n_wide = 0
    cdef Py_ssize_t wide = 8 if n <= 8 else (16 if n <= 16 else 0)
    if wide and wide <= room and src_end - src >= wide:
        n_wide = min(count, (src_end - src - wide) // step + 1)
    if wide == 8:
        for o in range(n_wide):
            memcpy(dst + o * ld, src + o * step, 8 * sizeof(floating))
    elif wide == 16:
        for o in range(n_wide):
            memcpy(dst + o * ld, src + o * step, 16 * sizeof(floating))
    for o in range(n_wide, count):
        copy_n(dst + o * ld, src + o * step, n)


cdef inline void add_n(floating *dst, const floating *src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] += src[i]


cdef inline void interior_columns(const ConvGeom *g, Py_ssize_t *lo, Py_ssize_t *hi) noexcept nogil:
    """Output columns ``ow`` in ``[lo, hi)`` read every kernel tap inside the image's width."""
    cdef Py_ssize_t last = g.W - 1 - (g.KW - 1) * g.dilation_w + g.pad_left   # ow*sw <= last
    lo[0] = (g.pad_left + g.stride_w - 1) // g.stride_w
    hi[0] = last // g.stride_w + 1 if last >= 0 else 0
    if hi[0] > g.OW:
        hi[0] = g.OW
    if lo[0] > hi[0]:
        lo[0] = hi[0]


cdef inline void run_taps(Py_ssize_t W, Py_ssize_t KW, Py_ssize_t iw0, Py_ssize_t *lo,
                          Py_ssize_t *hi) noexcept nogil:
    """Taps ``kw`` in ``[lo, hi)`` read columns ``iw0 + kw`` inside the image (dilation 1)."""
    lo[0] = -iw0 if iw0 < 0 else 0
    hi[0] = W - iw0 if W - iw0 < KW else KW
    if hi[0] < 0:
        hi[0] = 0
    if lo[0] > hi[0]:
        lo[0] = hi[0]


cdef void gather_pixel(const floating *image, const ConvGeom *g, const Chunks *ch,
                       Py_ssize_t ih0, Py_ssize_t iw0, floating *dst) noexcept nogil:
    """One column row, any position: border taps go through ``source_index``.

    # IN  image: x[n] + c_first, (H, W, C) contiguous
    # OUT dst: the row's chunks
    """
    cdef Py_ssize_t C = g.C, H = g.H, W = g.W, KW = g.KW, dh = g.dilation_h, dw = g.dilation_w
    cdef int mode = g.mode
    cdef Py_ssize_t width = ch.width, gstride = ch.group_stride, tstride = ch.tap_stride
    cdef Py_ssize_t run_len = KW * C, kh, kw, gi, ih, iws, lo = 0, hi = 0
    cdef const floating *row
    cdef const floating *src
    cdef floating *d
    if ch.run:
        run_taps(W, KW, iw0, &lo, &hi)
        for kh in range(g.KH):
            d = dst + kh * run_len
            ih = source_index(ih0 + kh * dh, H, mode)
            if ih < 0:
                memset(d, 0, run_len * sizeof(floating))
                continue
            row = image + ih * W * C
            copy_n(d + lo * C, row + (iw0 + lo) * C, (hi - lo) * C)
            for kw in range(lo):
                iws = source_index(iw0 + kw, W, mode)
                if iws < 0:
                    memset(d + kw * C, 0, C * sizeof(floating))
                else:
                    copy_n(d + kw * C, row + iws * C, C)
            for kw in range(hi, KW):
                iws = source_index(iw0 + kw, W, mode)
                if iws < 0:
                    memset(d + kw * C, 0, C * sizeof(floating))
                else:
                    copy_n(d + kw * C, row + iws * C, C)
        return
    for kh in range(g.KH):
        ih = source_index(ih0 + kh * dh, H, mode)
        row = image + (ih if ih >= 0 else 0) * W * C
        for kw in range(KW):
            d = dst + (kh * KW + kw) * tstride
            iws = source_index(iw0 + kw * dw, W, mode)
            if ih < 0 or iws < 0:
                for gi in range(ch.n_groups):
                    memset(d + gi * gstride, 0, width * sizeof(floating))
            else:
                src = row + iws * C
                for gi in range(ch.n_groups):
                    copy_n(d + gi * gstride, src + gi * width, width)


cdef void gather_interior(const floating *image, const ConvGeom *g, const Chunks *ch,
                          Py_ssize_t ih0, Py_ssize_t iw0, Py_ssize_t count,
                          floating *dst, Py_ssize_t ld) noexcept nogil:
    """``count`` consecutive column rows of one output row whose taps are all inside the
    image's width: kernel row outermost, so a tap costs one copy and no index mapping.

    # IN  image: x[n] + c_first; (ih0, iw0): the first row's padded window corner
    # OUT dst: count rows of row stride ld
    """
    cdef Py_ssize_t C = g.C, KW = g.KW, dw = g.dilation_w
    cdef Py_ssize_t step = g.stride_w * C, WC = g.W * C
    cdef Py_ssize_t width = ch.width, gstride = ch.group_stride, tstride = ch.tap_stride
    cdef Py_ssize_t n_groups = ch.n_groups
    cdef Py_ssize_t run_len = KW * C, kh, kw, gi, ih, o
    # runs are whole pixels (c_first = 0): reads stay inside this image
    cdef const floating *image_end = image + g.H * WC
    cdef const floating *row
    cdef const floating *src
    cdef floating *d
    for kh in range(g.KH):
        ih = source_index(ih0 + kh * g.dilation_h, g.H, g.mode)
        if ih < 0:
            for o in range(count):
                for kw in range(KW):
                    d = dst + o * ld + (kh * KW + kw) * tstride
                    for gi in range(n_groups):
                        memset(d + gi * gstride, 0, width * sizeof(floating))
            continue
        row = image + ih * WC + iw0 * C
        if ch.run:
            # kernel row kh's runs may spill into the taps of rows kh+1.. (written
            # later by this loop), not past the column row
            copy_runs(dst + kh * run_len, ld, row, step, count, run_len,
                      (g.KH - kh) * run_len, image_end)
        elif width == 1:
            # depthwise: one channel per group
            for o in range(count):
                for kw in range(KW):
                    src = row + o * step + kw * dw * C
                    d = dst + o * ld + (kh * KW + kw) * tstride
                    for gi in range(n_groups):
                        d[gi * gstride] = src[gi]
        else:
            for o in range(count):
                for kw in range(KW):
                    src = row + o * step + kw * dw * C
                    d = dst + o * ld + (kh * KW + kw) * tstride
                    for gi in range(n_groups):
                        copy_n(d + gi * gstride, src + gi * width, width)


cdef void gather_rows(const floating *x, const ConvGeom *g, const Chunks *ch,
                      Py_ssize_t r0, Py_ssize_t r1, floating *col, Py_ssize_t ld) noexcept nogil:
    """col[r - r0, chunk (gi, kh, kw)] = x[n, ih', iw', c_first + gi*width :+ width].

    ``(ih', iw')`` is the padded position ``(oh*sh - pt + kh*dh, ow*sw - pl + kw*dw)``
    mapped by the padding mode (``source_index``); a chunk that maps to no
    pixel (zeros mode) is zero.

    # IN  x: (N, H, W, C) contiguous
    # OUT col: (r1 - r0) rows of row stride ld; the chunks described by ch are written
    """
    cdef Py_ssize_t P = g.OH * g.OW, OW = g.OW, HWC = g.H * g.W * g.C
    cdef Py_ssize_t r, n, oh, ow, end, a, b, o, lo, hi
    cdef const floating *image
    cdef floating *dst
    interior_columns(g, &lo, &hi)
    r = r0
    while r < r1:
        # the rest of one output row: [ow, end)
        n = r // P
        oh = (r - n * P) // OW
        ow = r - n * P - oh * OW
        end = min(OW, ow + (r1 - r))
        image = x + n * HWC + ch.c_first
        dst = col + (r - r0) * ld
        a = min(max(lo, ow), end)
        b = min(max(hi, a), end)
        for o in range(ow, a):
            gather_pixel(image, g, ch, oh * g.stride_h - g.pad_top, o * g.stride_w - g.pad_left,
                         dst + (o - ow) * ld)
        if b > a:
            gather_interior(image, g, ch, oh * g.stride_h - g.pad_top,
                            a * g.stride_w - g.pad_left, b - a, dst + (a - ow) * ld, ld)
        for o in range(b, end):
            gather_pixel(image, g, ch, oh * g.stride_h - g.pad_top, o * g.stride_w - g.pad_left,
                         dst + (o - ow) * ld)
        r += end - ow


cdef void scatter_pixel(const floating *src, const ConvGeom *g, const Chunks *ch,
                        Py_ssize_t ih0, Py_ssize_t iw0, Py_ssize_t h0, Py_ssize_t h1,
                        floating *image) noexcept nogil:
    """The adjoint of :func:`gather_pixel`: image[ih', iw', chunk channels] += src's chunks,
    for the input rows ``h0 <= ih' < h1`` only."""
    cdef Py_ssize_t C = g.C, H = g.H, W = g.W, KW = g.KW, dh = g.dilation_h, dw = g.dilation_w
    cdef int mode = g.mode
    cdef Py_ssize_t width = ch.width, gstride = ch.group_stride, tstride = ch.tap_stride
    cdef Py_ssize_t run_len = KW * C, kh, kw, gi, ih, iws, lo = 0, hi = 0
    cdef floating *row
    cdef floating *d
    cdef const floating *s
    if ch.run:
        run_taps(W, KW, iw0, &lo, &hi)
        for kh in range(g.KH):
            ih = source_index(ih0 + kh * dh, H, mode)
            if ih < h0 or ih >= h1:
                continue
            s = src + kh * run_len
            row = image + ih * W * C
            add_n(row + (iw0 + lo) * C, s + lo * C, (hi - lo) * C)
            for kw in range(lo):
                iws = source_index(iw0 + kw, W, mode)
                if iws >= 0:
                    add_n(row + iws * C, s + kw * C, C)
            for kw in range(hi, KW):
                iws = source_index(iw0 + kw, W, mode)
                if iws >= 0:
                    add_n(row + iws * C, s + kw * C, C)
        return
    for kh in range(g.KH):
        ih = source_index(ih0 + kh * dh, H, mode)
        if ih < h0 or ih >= h1:
            continue
        row = image + ih * W * C
        for kw in range(KW):
            iws = source_index(iw0 + kw * dw, W, mode)
            if iws < 0:
                continue
            s = src + (kh * KW + kw) * tstride
            d = row + iws * C
            for gi in range(ch.n_groups):
                add_n(d + gi * width, s + gi * gstride, width)


cdef void scatter_interior(const floating *src, Py_ssize_t ld, const ConvGeom *g,
                           const Chunks *ch, Py_ssize_t ih0, Py_ssize_t iw0, Py_ssize_t count,
                           Py_ssize_t h0, Py_ssize_t h1, floating *image) noexcept nogil:
    """The adjoint of :func:`gather_interior`, for the input rows ``h0 <= ih' < h1`` only."""
    cdef Py_ssize_t C = g.C, KW = g.KW, dw = g.dilation_w
    cdef Py_ssize_t step = g.stride_w * C, WC = g.W * C
    cdef Py_ssize_t width = ch.width, gstride = ch.group_stride, tstride = ch.tap_stride
    cdef Py_ssize_t n_groups = ch.n_groups
    cdef Py_ssize_t run_len = KW * C, kh, kw, gi, ih, o, j, phase
    cdef Py_ssize_t phases = ceil_div(KW, g.stride_w)
    cdef floating *row
    cdef floating *d
    cdef const floating *s
    for kh in range(g.KH):
        ih = source_index(ih0 + kh * g.dilation_h, g.H, g.mode)
        if ih < h0 or ih >= h1:
            continue
        row = image + ih * WC + iw0 * C
        if ch.run:
            # Windows o and o+1 overlap when stride < KW: reading back what the
            # previous add just stored, shifted by C floats, defeats store
            # forwarding (lenet: 55% of the scatter stalled on it). Every
            # phase-th window is disjoint from the one before it.
            for phase in range(min(phases, count)):
                for j in range(ceil_div(count - phase, phases)):
                    o = phase + j * phases
                    add_n(row + o * step, src + o * ld + kh * run_len, run_len)
        elif width == 1:
            for o in range(count):
                for kw in range(KW):
                    d = row + o * step + kw * dw * C
                    s = src + o * ld + (kh * KW + kw) * tstride
                    for gi in range(n_groups):
                        d[gi] += s[gi * gstride]
        else:
            for o in range(count):
                for kw in range(KW):
                    d = row + o * step + kw * dw * C
                    s = src + o * ld + (kh * KW + kw) * tstride
                    for gi in range(n_groups):
                        add_n(d + gi * width, s + gi * gstride, width)


cdef void scatter_rows(const floating *col, Py_ssize_t ld, const ConvGeom *g, const Chunks *ch,
                       Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t h0, Py_ssize_t h1,
                       floating *x) noexcept nogil:
    """The adjoint of :func:`gather_rows`: x[n, ih', iw', chunk channels] += col[r - r0, chunk].

    Only the channels of ``ch`` and the input rows ``h0 <= ih' < h1`` are
    written, and only in the images of rows ``[r0, r1)``: callers give each
    thread its own images, channel block or band of rows.

    # IN  col: (r1 - r0) rows of row stride ld
    # OUT x: (N, H, W, C) contiguous, accumulated into
    """
    cdef Py_ssize_t P = g.OH * g.OW, OW = g.OW, HWC = g.H * g.W * g.C
    cdef Py_ssize_t r, n, oh, ow, end, a, b, o, lo, hi
    cdef floating *image
    cdef const floating *src
    interior_columns(g, &lo, &hi)
    r = r0
    while r < r1:
        n = r // P
        oh = (r - n * P) // OW
        ow = r - n * P - oh * OW
        end = min(OW, ow + (r1 - r))
        image = x + n * HWC + ch.c_first
        src = col + (r - r0) * ld
        a = min(max(lo, ow), end)
        b = min(max(hi, a), end)
        for o in range(ow, a):
            scatter_pixel(src + (o - ow) * ld, g, ch, oh * g.stride_h - g.pad_top,
                          o * g.stride_w - g.pad_left, h0, h1, image)
        if b > a:
            scatter_interior(src + (a - ow) * ld, ld, g, ch, oh * g.stride_h - g.pad_top,
                             a * g.stride_w - g.pad_left, b - a, h0, h1, image)
        for o in range(b, end):
            scatter_pixel(src + (o - ow) * ld, g, ch, oh * g.stride_h - g.pad_top,
                          o * g.stride_w - g.pad_left, h0, h1, image)
        r += end - ow


cdef inline bint reads_band(const ConvGeom *g, Py_ssize_t oh, Py_ssize_t h0,
                            Py_ssize_t h1) noexcept nogil:
    """Whether a tap of output row ``oh`` reads an input row in ``[h0, h1)``."""
    cdef Py_ssize_t kh, ih
    for kh in range(g.KH):
        ih = source_index(oh * g.stride_h - g.pad_top + kh * g.dilation_h, g.H, g.mode)
        if h0 <= ih < h1:
            return True
    return False


cdef inline Py_ssize_t split_point(Py_ssize_t total, Py_ssize_t parts, Py_ssize_t i) noexcept nogil:
    """Start of part i when ``total`` items are cut into ``parts`` near-equal parts."""
    return total * i // parts


def weight_columns(const floating[:, ::1] w, floating[:, ::1] wt, Py_ssize_t KK):
    """wt[f, t*Cg + c] = w[f, c*KK + t]: each filter's taps from (cg, kh, kw) to (kh, kw, cg).

    Runs in the calling thread: waking the OpenMP workers for a region of
    its own cost ~1.2 ms on a machine whose other core is busy (more than
    the whole reorder of lenet's weight), and deep-7x7's 512x512x3x3 takes
    ~1.9 ms here against NumPy's 7 ms transposing copy.

    # IN  w: (F, Cg*KK)
    # OUT wt: (F, KK*Cg)
    """
    cdef Py_ssize_t F = w.shape[0], Kg = w.shape[1], Cg = Kg // KK
    cdef Py_ssize_t f, t, c
    cdef const floating *src
    cdef floating *dst
    with nogil:
        for f in range(F):
            src = &w[f, 0]
            dst = &wt[f, 0]
            # reading each filter in order measured faster than writing it in order
            for c in range(Cg):
                for t in range(KK):
                    dst[t * Cg + c] = src[c * KK + t]


def reduce_weight_grad(const floating[:, ::1] partial, floating[:, ::1] grad_w,
                       floating[::1] grad_b, Py_ssize_t KK, int n_threads):
    """grad_w[f, c*KK + t] = sum over threads of partial[:, f*Kg + t*Cg + c]; grad_b likewise.

    The reduction of :func:`backward_weight`'s partial sums and the inverse of
    :func:`weight_columns`'s reordering in one pass.

    # IN  partial: (T, F*Kg + F + anything): the bias sums at F*Kg
    # OUT grad_w: (F, Cg*KK); grad_b: (F,) or None
    """
    cdef Py_ssize_t T = partial.shape[0], M = partial.shape[1]
    cdef Py_ssize_t F = grad_w.shape[0], Kg = grad_w.shape[1], Cg = Kg // KK
    cdef Py_ssize_t f, t, c, i, c0, c1
    cdef bint with_bias = grad_b is not None
    cdef floating total
    cdef floating *dst
    cdef const floating *src
    for f in prange(F, nogil=True, num_threads=n_threads, schedule="static"):
        src = &partial[0, f * Kg]
        dst = &grad_w[f, 0]
        for c0 in range(0, Cg, 64):
            c1 = min(c0 + 64, Cg)
            for t in range(KK):
                for c in range(c0, c1):
                    total = 0
                    for i in range(T):
                        total = total + src[i * M + t * Cg + c]
                    dst[c * KK + t] = total
        if with_bias:
            total = 0
            for i in range(T):
                total = total + partial[i, F * Kg + f]
            grad_b[f] = total


def forward(const floating[:, :, :, ::1] x, const floating[:, ::1] wt,
            const floating[::1] bias, floating[:, ::1] y,
            floating[::1] workspace, object geometry, Py_ssize_t n_tiles,
            Py_ssize_t f_blocks, int n_threads, bint own_kernel=False):
    """Y[rows] = col[rows] @ wt_g.T (per group) (+ bias), one work item per row tile and
    block of filters.

    ``own_kernel``: the GEMMs by fastconv's own kernel where it runs
    (``fastconv._blas.gemm_nt``: it reads the column rows in place and transposes the
    filters a panel at a time), else BLAS.

    ``f_blocks > 1`` (groups == 1, few rows, many filters): each item computes
    its block of filters for the tile's rows, so a thread packs only its part
    of the weight for BLAS instead of all of it (gathering the rows again costs
    less when they are fewer than the filters).

    # IN  x: (N, H, W, C); wt: (F, Kg); bias: (F,) or None
    # OUT y: (N*OH*OW, F), every element written
    # workspace: n_threads equal slices of at least ceil(R / n_tiles) * K elements
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef Chunks ch = full_chunks(&g)
    cdef bint pointwise = geometry.is_pointwise
    cdef const floating *bias_ptr = NULL
    cdef Py_ssize_t G = g.groups
    cdef Py_ssize_t N = x.shape[0], F = wt.shape[0], Kg = wt.shape[1]
    cdef Py_ssize_t K = G * Kg, Fg = F // G
    cdef Py_ssize_t R = N * g.OH * g.OW
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef Py_ssize_t item, tile, r0, r1, r, gi, f0, f1
    cdef const floating *cols
    cdef floating *ws
    cdef floating *out
    cdef floating beta
    if R == 0:
        return
    if bias is not None:
        bias_ptr = &bias[0]
    for item in prange(n_tiles * f_blocks, nogil=True, num_threads=n_threads,
                       schedule="static"):
        tile = item // f_blocks
        r0 = split_point(R, n_tiles, tile)
        r1 = split_point(R, n_tiles, tile + 1)
        f0 = split_point(F, f_blocks, item - tile * f_blocks)
        f1 = split_point(F, f_blocks, item - tile * f_blocks + 1)
        if pointwise:
            # 1x1, stride 1, no padding: the input rows (pixels) are the column rows
            cols = &x[0, 0, 0, 0] + r0 * K
        else:
            ws = &workspace[openmp.omp_get_thread_num() * per_thread]
            gather_rows(&x[0, 0, 0, 0], &g, &ch, r0, r1, ws, K)
            cols = ws
        out = &y[r0, 0]
        beta = 0
        if bias_ptr != NULL:
            beta = 1
            for r in range(r1 - r0):
                copy_n(out + r * F + f0, bias_ptr + f0, f1 - f0)
        # a pointwise layer's rows are read in place, from memory: the kernel fetches
        # them ahead (resnet-1x1 1.20x / 1.26x at 2 / 1 threads; a gathered tile is
        # in cache, where fetching costs 1-3%)
        if f_blocks > 1:
            gemm_nt((r1 - r0), (f1 - f0), K, cols, K, &wt[f0, 0], K, beta, out + f0, F, 0,
                    limit, own_kernel, pointwise)
            continue
        for gi in range(G):
            gemm_nt((r1 - r0), Fg, Kg, cols + gi * Kg, K, &wt[gi * Fg, 0], Kg, beta,
                    out + gi * Fg, F, 0, limit, own_kernel, pointwise)


def backward_weight(const floating[:, :, :, ::1] x, const floating[:, ::1] dy,
                    floating[:, ::1] partial, floating[::1] workspace, object geometry,
                    Py_ssize_t n_tiles, Py_ssize_t f_blocks, bint with_bias, int n_threads):
    """Per-thread partial sums of grad_weight (as wt's (F, Kg)) and grad_bias.

    partial[t, :F*Kg] += dY_g.T @ col_g (group g's filter rows) and
    partial[t, F*Kg:] += dY.sum(axis=0) over the row tiles of thread t;
    reduce with :func:`reduce_weight_grad`.

    ``f_blocks > 1`` (groups == 1 and one row tile): each item writes the
    final sums of its block of filters into partial[0], and only that row
    is to be reduced: no per-thread copies of a large weight to zero and add.

    # IN  x: (N, H, W, C); dy: (N*OH*OW, F)
    # OUT partial: (n_threads, F*Kg + 2*F), zeroed here (the bias part stays 0
    #     without with_bias; the last F are scratch for a tile's bias sums);
    #     with f_blocks > 1 only partial[0] is written
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef Chunks ch = full_chunks(&g)
    cdef bint pointwise = geometry.is_pointwise
    cdef Py_ssize_t G = g.groups
    cdef Py_ssize_t N = x.shape[0], F = dy.shape[1]
    cdef Py_ssize_t Fg = F // G, K = g.C * g.KH * g.KW, Kg = K // G
    cdef Py_ssize_t R = N * g.OH * g.OW
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef Py_ssize_t item, r0, r1, r, f, gi, f0, f1
    cdef const floating *cols
    cdef const floating *grad
    cdef floating *ws
    cdef floating *acc
    cdef floating *tile_sums
    if f_blocks > 1:
        for item in prange(f_blocks, nogil=True, num_threads=n_threads, schedule="static"):
            f0 = split_point(F, f_blocks, item)
            f1 = split_point(F, f_blocks, item + 1)
            if pointwise:
                cols = &x[0, 0, 0, 0]
            else:
                ws = &workspace[openmp.omp_get_thread_num() * per_thread]
                gather_rows(&x[0, 0, 0, 0], &g, &ch, 0, R, ws, K)
                cols = ws
            acc = &partial[0, 0]
            gemm_rm(True, False, (f1 - f0), K, R,
                    1, &dy[0, f0], F, cols, K, 0, acc + f0 * K, K, limit)
            acc = acc + F * K
            for f in range(f0, f1):
                acc[f] = 0
            if with_bias:
                for r in range(R):
                    for f in range(f0, f1):
                        acc[f] = acc[f] + dy[r, f]
        return
    memset(&partial[0, 0], 0, partial.shape[0] * partial.shape[1] * sizeof(floating))
    if R == 0:
        return
    for item in prange(n_tiles, nogil=True, num_threads=n_threads, schedule="static"):
        r0 = split_point(R, n_tiles, item)
        r1 = split_point(R, n_tiles, item + 1)
        acc = &partial[openmp.omp_get_thread_num(), 0]
        if pointwise:
            cols = &x[0, 0, 0, 0] + r0 * K
        else:
            ws = &workspace[openmp.omp_get_thread_num() * per_thread]
            gather_rows(&x[0, 0, 0, 0], &g, &ch, r0, r1, ws, K)
            cols = ws
        grad = &dy[r0, 0]
        for gi in range(G):
            # dY_g.T @ col_g rather than col_g.T @ dY_g: BLAS then repacks the
            # transposed operand from the F-wide dY rows, not the K-wide column
            # rows (resnet-1x1: sgemm_otcopy fell from 21% to ~4% of the time)
            gemm_rm(True, False, Fg, Kg, (r1 - r0),
                    1, grad + gi * Fg, F, cols + gi * Kg, K,
                    1, acc + gi * Fg * Kg, Kg, limit)
        if with_bias:
            # row by row: the inner loop runs along contiguous filters. The tile's
            # sums go to the scratch row after the bias sums first: one float32
            # accumulator over all of a thread's rows stalls once it is 2**24
            # times the values it adds (a 46343**2 batch of U(0, 1) summed to 3%)
            acc = acc + F * Kg
            tile_sums = acc + F
            memset(tile_sums, 0, F * sizeof(floating))
            for r in range(r1 - r0):
                for f in range(F):
                    tile_sums[f] = tile_sums[f] + grad[r * F + f]
            for f in range(F):
                acc[f] = acc[f] + tile_sums[f]


cdef void input_rows(const floating *wt, const floating *dy, const ConvGeom *g,
                     Py_ssize_t F, Py_ssize_t Kg, Py_ssize_t r0, Py_ssize_t r1,
                     Py_ssize_t tile_rows, Py_ssize_t h0, Py_ssize_t h1,
                     floating *ws, floating *dx, Py_ssize_t limit) noexcept nogil:
    """dx[image rows h0..h1-1] += col2im(dY[r0:r1] @ wt_g) for every group, in row tiles.

    # IN  wt: (F, Kg); dy: (N*OH*OW, F)
    # OUT dx: (N, H, W, C), accumulated into (only input rows [h0, h1))
    # ws: tile_rows * K elements
    """
    cdef Chunks ch = full_chunks(g)
    cdef Py_ssize_t G = g.groups, Fg = F // g.groups, K = g.groups * Kg
    cdef Py_ssize_t n_sub = ceil_div(r1 - r0, tile_rows)
    cdef Py_ssize_t s, a, b, gi
    for s in range(n_sub):
        a = r0 + split_point(r1 - r0, n_sub, s)
        b = r0 + split_point(r1 - r0, n_sub, s + 1)
        for gi in range(G):
            gemm_rm(False, False, (b - a), Kg, Fg,
                    1, dy + a * F + gi * Fg, F, wt + gi * Fg * Kg, Kg,
                    0, ws + gi * Kg, K, limit)
        scatter_rows(ws, K, g, &ch, a, b, h0, h1, dx)


def backward_input(const floating[:, ::1] wt, const floating[:, ::1] dy,
                   floating[:, :, :, ::1] dx, floating[::1] workspace, object geometry,
                   Py_ssize_t n_tiles, Py_ssize_t tile_rows, Py_ssize_t n_items,
                   Py_ssize_t c_block, Py_ssize_t n_bands, int n_threads):
    """dx = col2im(dY @ wt_g) (per group).

    * pointwise: every dx row is one dY row's product, no overlap: ``n_tiles``
      row tiles as in :func:`forward`;
    * ``n_bands > 1``: one work item per (image, band of input rows); the
      output rows reading a band are recomputed by each band they touch;
    * ``c_block < C``: one work item per (image, channel block): whole groups
      when ``c_block`` is a multiple of Cg (one gemm per group), else a block
      of one group's channels (one gemm per kernel tap, into the block only);
    * else ``n_items`` work items of whole images.

    Every item cuts its rows into tiles of at most ``tile_rows``.

    # IN  wt: (F, Kg); dy: (N*OH*OW, F)
    # OUT dx: (N, H, W, C), every element written
    # workspace: n_threads equal slices of at least tile_rows * K elements
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef bint pointwise = geometry.is_pointwise
    cdef Py_ssize_t G = g.groups, C = g.C, H = g.H
    cdef Py_ssize_t N = dx.shape[0], F = wt.shape[0], Kg = wt.shape[1]
    cdef Py_ssize_t Fg = F // G, Cg = C // G, KK = g.KH * g.KW
    cdef Py_ssize_t P = g.OH * g.OW, R = N * P
    cdef Py_ssize_t HW = g.H * g.W, WC = g.W * g.C
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef Py_ssize_t groups_per_block = c_block // Cg if c_block % Cg == 0 else 0
    cdef Py_ssize_t blocks_per_group = 1 if groups_per_block else ceil_div(Cg, c_block)
    cdef Py_ssize_t n_blocks = (ceil_div(G, groups_per_block) if groups_per_block
                                else G * blocks_per_group)
    cdef Py_ssize_t item, n0, n1, r0, r1, s, n_sub, r, gi, g0, g1, b, a, cb, t, ldw
    cdef Py_ssize_t h0, h1, oh, oh_end
    cdef floating *ws
    cdef floating *image
    cdef Chunks bch
    if R == 0:
        return
    if pointwise:
        for item in prange(n_tiles, nogil=True, num_threads=n_threads, schedule="static"):
            r0 = split_point(R, n_tiles, item)
            r1 = split_point(R, n_tiles, item + 1)
            for gi in range(G):
                gemm_rm(False, False, (r1 - r0), Kg, Fg,
                        1, &dy[r0, gi * Fg], F, &wt[gi * Fg, 0], Kg,
                        0, &dx[0, 0, 0, 0] + r0 * C + gi * Cg, C, limit)
        return
    if n_bands > 1:
        for item in prange(N * n_bands, nogil=True, num_threads=n_threads, schedule="static"):
            n0 = item // n_bands
            b = item - n0 * n_bands
            h0 = split_point(H, n_bands, b)
            h1 = split_point(H, n_bands, b + 1)
            ws = &workspace[openmp.omp_get_thread_num() * per_thread]
            image = &dx[n0, 0, 0, 0]
            memset(image + h0 * WC, 0, (h1 - h0) * WC * sizeof(floating))
            # runs of consecutive output rows with a tap in the band (padding
            # modes can map a tap far away: circular's top rows read the bottom)
            oh = 0
            while oh < g.OH:
                if not reads_band(&g, oh, h0, h1):
                    oh = oh + 1
                    continue
                oh_end = oh + 1
                while oh_end < g.OH and reads_band(&g, oh_end, h0, h1):
                    oh_end = oh_end + 1
                input_rows(&wt[0, 0], &dy[0, 0], &g, F, Kg, n0 * P + oh * g.OW,
                           n0 * P + oh_end * g.OW, tile_rows, h0, h1, ws, &dx[0, 0, 0, 0],
                           limit)
                oh = oh_end
        return
    if c_block >= C:
        for item in prange(n_items, nogil=True, num_threads=n_threads, schedule="static"):
            n0 = split_point(N, n_items, item)
            n1 = split_point(N, n_items, item + 1)
            ws = &workspace[openmp.omp_get_thread_num() * per_thread]
            memset(&dx[0, 0, 0, 0] + n0 * HW * C, 0, (n1 - n0) * HW * C * sizeof(floating))
            input_rows(&wt[0, 0], &dy[0, 0], &g, F, Kg, n0 * P, n1 * P, tile_rows, 0, H, ws,
                       &dx[0, 0, 0, 0], limit)
        return
    for item in prange(N * n_blocks, nogil=True, num_threads=n_threads, schedule="static"):
        n0 = item // n_blocks
        b = item - n0 * n_blocks
        ws = &workspace[openmp.omp_get_thread_num() * per_thread]
        if groups_per_block:
            g0 = b * groups_per_block
            g1 = min(g0 + groups_per_block, G)
            a = 0
            cb = (g1 - g0) * Cg
            ldw = (g1 - g0) * Kg
            bch = make_chunks(&g, g0 * Cg, g1 - g0, Cg, Kg, Cg)
        else:
            g0 = b // blocks_per_group
            g1 = g0 + 1
            a = (b - g0 * blocks_per_group) * c_block
            cb = min(a + c_block, Cg) - a
            ldw = KK * cb
            bch = make_chunks(&g, g0 * Cg + a, 1, cb, 0, cb)
        image = &dx[n0, 0, 0, 0]
        for r in range(HW):
            memset(image + r * C + g0 * Cg + a, 0, cb * sizeof(floating))
        n_sub = ceil_div(P, tile_rows)
        for s in range(n_sub):
            r0 = n0 * P + split_point(P, n_sub, s)
            r1 = n0 * P + split_point(P, n_sub, s + 1)
            if groups_per_block:
                for gi in range(g0, g1):
                    gemm_rm(False, False, (r1 - r0), Kg, Fg,
                            1, &dy[r0, gi * Fg], F, &wt[gi * Fg, 0], Kg,
                            0, ws + (gi - g0) * Kg, ldw, limit)
            else:
                # the block's channels of tap t are columns t*Cg + a .. of wt_g
                for t in range(KK):
                    gemm_rm(False, False, (r1 - r0), cb, Fg,
                            1, &dy[r0, g0 * Fg], F, &wt[g0 * Fg, t * Cg + a], Kg,
                            0, ws + t * cb, ldw, limit)
            scatter_rows(ws, ldw, &g, &bch, r0, r1, 0, H, &dx[0, 0, 0, 0])

