"""Pooling and activation kernels: max/avg pooling (+ backward), global average, ReLU.

Pooling works on *planes*: the (N, C, H, W) input is viewed as N*C planes of
H x W, and one OpenMP work item is one whole plane. Every output element of a
plane, and every element of its input gradient, is written by the thread that
owns the plane, so the scatter-adds of the backward passes never race.

Window geometry is precomputed once per call into per-axis tables (see
:func:`axis_table`): for output row ``oh`` the in-bounds taps are rows
``row_start[oh] + a*dh`` for ``a < row_count[oh]``, and likewise for columns.
The inner loops then carry no bounds checks and no divisions.

Semantics are PyTorch's CPU kernels (``aten/src/ATen/native/cpu/MaxPoolKernel.cpp``
and ``AvgPoolKernel.cpp``): padding is never read (max: as if -inf; avg: as
zeros, counted in the divisor only with ``count_include_pad``), ties go to the
first tap in scan order, and a NaN wins and propagates (the last NaN's index is
kept). All kernels assume validated geometry (``fastconv._validation.pool_geometry``)
and contiguous arrays of one dtype (``fastconv._pooling``).
"""

import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from openmp cimport omp_get_thread_num
from libc.math cimport INFINITY
from libc.stdint cimport INT32_MAX, int32_t, int64_t
from libc.string cimport memset


cdef struct PoolTables:
    # rows: first in-bounds input row, number of in-bounds taps, window rows
    # inside the padded input (avg's count_include_pad divisor factor)
    const Py_ssize_t *row_start
    const Py_ssize_t *row_count
    const Py_ssize_t *row_padded
    const Py_ssize_t *col_start
    const Py_ssize_t *col_count
    const Py_ssize_t *col_padded
    Py_ssize_t H, W, OH, OW, dh, dw
    Py_ssize_t KW, sw, pw
    # output columns [lo, hi) have all KW taps inside the input (an interval,
    # since window starts grow with ow); the row kernels handle them
    Py_ssize_t lo, hi
    bint int32_indices   # H*W fits an int32: the argmax sweep uses 32-bit lanes


cdef void axis_table(Py_ssize_t size, Py_ssize_t kernel, Py_ssize_t stride, Py_ssize_t pad,
                     Py_ssize_t dilation, Py_ssize_t n_out, Py_ssize_t *start,
                     Py_ssize_t *count, Py_ssize_t *padded) noexcept nogil:
    """Window ``o`` reads input ``start[o] + a*dilation`` for ``a < count[o]``.

    The window's taps are ``o*stride - pad + k*dilation`` for ``k < kernel``;
    ``count`` keeps those in ``[0, size)`` (PyTorch skips the leading padded
    taps one dilation step at a time, which lands on the same first tap).
    ``padded[o]`` is PyTorch's ``min(first + span, size + pad) - first``: the
    window's extent inside the padded input, past which ``ceil_mode`` windows
    are clipped for the avg divisor.
    """
    cdef Py_ssize_t o, first, k0, k1, last, span = dilation * (kernel - 1) + 1
    for o in range(n_out):
        first = o * stride - pad
        k0 = 0 if first >= 0 else (-first + dilation - 1) // dilation
        last = size - 1 - first
        k1 = 0 if last < 0 else last // dilation + 1
        if k1 > kernel:
            k1 = kernel
        if k1 < k0:
            k1 = k0
        start[o] = first + k0 * dilation
        count[o] = k1 - k0
        padded[o] = (first + span if first + span < size + pad else size + pad) - first


cdef class _Tables:
    """Owns the arrays behind a :class:`PoolTables` (built with the GIL, read without)."""

    cdef Py_ssize_t[:, ::1] rows
    cdef Py_ssize_t[:, ::1] cols
    cdef PoolTables t

    def __cinit__(self, object g):
        cdef Py_ssize_t ow = 0
        self.rows = np.empty((3, max(g.OH, 1)), dtype=np.intp)
        self.cols = np.empty((3, max(g.OW, 1)), dtype=np.intp)
        axis_table(g.H, g.KH, g.stride_h, g.pad_h, g.dilation_h, g.OH,
                   &self.rows[0, 0], &self.rows[1, 0], &self.rows[2, 0])
        axis_table(g.W, g.KW, g.stride_w, g.pad_w, g.dilation_w, g.OW,
                   &self.cols[0, 0], &self.cols[1, 0], &self.cols[2, 0])
        self.t.row_start = &self.rows[0, 0]
        self.t.row_count = &self.rows[1, 0]
        self.t.row_padded = &self.rows[2, 0]
        self.t.col_start = &self.cols[0, 0]
        self.t.col_count = &self.cols[1, 0]
        self.t.col_padded = &self.cols[2, 0]
        self.t.H = g.H
        self.t.W = g.W
        self.t.OH = g.OH
        self.t.OW = g.OW
        self.t.dh = g.dilation_h
        self.t.dw = g.dilation_w
        self.t.KW = g.KW
        self.t.sw = g.stride_w
        self.t.pw = g.pad_w
        while ow < g.OW and self.cols[1, ow] < g.KW:
            ow += 1
        self.t.lo = ow
        while ow < g.OW and self.cols[1, ow] == g.KW:
            ow += 1
        self.t.hi = ow
        self.t.int32_indices = g.H * g.W <= INT32_MAX


cdef inline Py_ssize_t window_argmax(const floating *plane, const PoolTables *t,
                                     Py_ssize_t oh, Py_ssize_t ow,
                                     floating *best) noexcept nogil:
    """Flat index in the plane of the window's maximum, and the maximum in ``best``.

    PyTorch's scan: start from the first in-bounds tap with -inf, replace on
    ``v > best or isnan(v)``, so ties keep the first tap and NaN wins (the last
    NaN). An empty window (every tap in the padding) gives -inf and -1.
    """
    cdef Py_ssize_t nh = t.row_count[oh], nw = t.col_count[ow]
    cdef Py_ssize_t first = t.row_start[oh] * t.W + t.col_start[ow]
    cdef Py_ssize_t arg = first, a, b, offset
    cdef floating v, m = -INFINITY
    if nh == 0 or nw == 0:
        best[0] = m
        return -1
    for a in range(nh):
        offset = first + a * t.dh * t.W
        for b in range(nw):
            v = plane[offset]
            if v > m or v != v:
                m = v
                arg = offset
            offset = offset + t.dw
    best[0] = m
    return arg


cdef inline Py_ssize_t avg_divisor(const PoolTables *t, Py_ssize_t oh, Py_ssize_t ow,
                                   bint count_include_pad) noexcept nogil:
    if count_include_pad:
        return t.row_padded[oh] * t.col_padded[ow]
    return t.row_count[oh] * t.col_count[ow]


# ---------------------------------------------------------------------------
# Row kernels: one kernel tap for every interior window of an output row.
#
# Visiting the taps (a, b) in row-major order, each across the whole row of
# windows, keeps every window's scan order (ties and NaN resolve as in the
# per-window scan) while the inner loop is a branch-free strided sweep that
# the compiler can vectorise; strides 1 and 2 get constant-stride copies.


cdef inline void max_tap(const floating *row, Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi,
                         floating *m) noexcept nogil:
    """m[ow] = max(m[ow], row[ow*stride]) with NaN winning, for ow in [lo, hi)."""
    cdef Py_ssize_t ow
    cdef floating v, cur
    if stride == 2:
        for ow in range(lo, hi):
            v = row[2 * ow]
            cur = m[ow]
            m[ow] = v if (v > cur) | (v != v) else cur
    elif stride == 1:
        for ow in range(lo, hi):
            v = row[ow]
            cur = m[ow]
            m[ow] = v if (v > cur) | (v != v) else cur
    else:
        for ow in range(lo, hi):
            v = row[ow * stride]
            cur = m[ow]
            m[ow] = v if (v > cur) | (v != v) else cur


cdef inline void argmax_tap(const floating *row, Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi,
                            int64_t offset, floating *m, int64_t *arg) noexcept nogil:
    """As :func:`max_tap`, and arg[ow] = offset + ow*stride where the tap wins."""
    cdef Py_ssize_t ow
    cdef floating v, cur
    cdef bint win
    if stride == 2:
        for ow in range(lo, hi):
            v = row[2 * ow]
            cur = m[ow]
            win = (v > cur) | (v != v)
            m[ow] = v if win else cur
            arg[ow] = offset + 2 * ow if win else arg[ow]
    elif stride == 1:
        for ow in range(lo, hi):
            v = row[ow]
            cur = m[ow]
            win = (v > cur) | (v != v)
            m[ow] = v if win else cur
            arg[ow] = offset + ow if win else arg[ow]
    else:
        for ow in range(lo, hi):
            v = row[ow * stride]
            cur = m[ow]
            win = (v > cur) | (v != v)
            m[ow] = v if win else cur
            arg[ow] = offset + ow * stride if win else arg[ow]


cdef inline void argmax_tap32(const floating *row, Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi,
                            int32_t offset, floating *m, int32_t *arg) noexcept nogil:
    """As :func:`argmax_tap` in 32-bit indices: as wide as float32 lanes, so it vectorises."""
    cdef Py_ssize_t ow
    cdef floating v, cur
    cdef bint win
    if stride == 2:
        for ow in range(lo, hi):
            v = row[2 * ow]
            cur = m[ow]
            win = (v > cur) | (v != v)
            m[ow] = v if win else cur
            arg[ow] = offset + 2 * <int32_t> ow if win else arg[ow]
    elif stride == 1:
        for ow in range(lo, hi):
            v = row[ow]
            cur = m[ow]
            win = (v > cur) | (v != v)
            m[ow] = v if win else cur
            arg[ow] = offset + <int32_t> ow if win else arg[ow]
    else:
        for ow in range(lo, hi):
            v = row[ow * stride]
            cur = m[ow]
            win = (v > cur) | (v != v)
            m[ow] = v if win else cur
            arg[ow] = offset + <int32_t> (ow * stride) if win else arg[ow]


cdef inline void sum_tap(const floating *row, Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi,
                         floating *acc) noexcept nogil:
    """acc[ow] += row[ow*stride] for ow in [lo, hi)."""
    cdef Py_ssize_t ow
    if stride == 2:
        for ow in range(lo, hi):
            acc[ow] = acc[ow] + row[2 * ow]
    elif stride == 1:
        for ow in range(lo, hi):
            acc[ow] = acc[ow] + row[ow]
    else:
        for ow in range(lo, hi):
            acc[ow] = acc[ow] + row[ow * stride]


cdef inline void spread_tap(floating *row, Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi,
                            const floating *share) noexcept nogil:
    """row[ow*stride] += share[ow] for ow in [lo, hi) (distinct targets: no conflicts)."""
    cdef Py_ssize_t ow
    if stride == 2:
        for ow in range(lo, hi):
            row[2 * ow] = row[2 * ow] + share[ow]
    elif stride == 1:
        for ow in range(lo, hi):
            row[ow] = row[ow] + share[ow]
    else:
        for ow in range(lo, hi):
            row[ow * stride] = row[ow * stride] + share[ow]


cdef void max_plane(const floating *src, const PoolTables *t, floating *dst,
                    int64_t *idx) noexcept nogil:
    """One plane of max pooling; ``idx`` may be NULL (no indices wanted).

    # IN  src: (H, W)
    # OUT dst: (OH, OW); idx: (OH, OW) or NULL
    """
    cdef Py_ssize_t oh, ow, a, b, r, lo, hi, base
    cdef floating *m
    cdef int64_t *arg = NULL
    cdef int32_t *arg32
    for oh in range(t.OH):
        m = dst + oh * t.OW
        if idx != NULL:
            arg = idx + oh * t.OW
        lo, hi = t.lo, t.hi
        if t.row_count[oh] == 0:
            lo = hi = 0
        if hi > lo:
            r = t.row_start[oh]
            # The 32-bit indices live in the first half of this row's int64
            # slots; widening them back to front never overwrites one unread.
            arg32 = <int32_t *> arg
            for ow in range(lo, hi):
                m[ow] = -INFINITY
                if arg != NULL:
                    if t.int32_indices:
                        arg32[ow] = <int32_t> (r * t.W + t.col_start[ow])
                    else:
                        arg[ow] = r * t.W + t.col_start[ow]
            for a in range(t.row_count[oh]):
                for b in range(t.KW):
                    # input column of window ow, tap b: ow*sw + base
                    base = (r + a * t.dh) * t.W + b * t.dw - t.pw
                    if arg == NULL:
                        max_tap(src + base, t.sw, lo, hi, m)
                    elif t.int32_indices:
                        argmax_tap32(src + base, t.sw, lo, hi, <int32_t> base, m, arg32)
                    else:
                        argmax_tap(src + base, t.sw, lo, hi, base, m, arg)
            if arg != NULL and t.int32_indices:
                for ow in range(hi - 1, lo - 1, -1):
                    arg[ow] = arg32[ow]
        # edge windows (and every window of a row without input rows): one by
        # one, after the interior (their int64 writes would clobber arg32)
        for ow in range(t.OW):
            if lo <= ow < hi:
                continue
            if arg != NULL:
                arg[ow] = window_argmax(src, t, oh, ow, &m[ow])
            else:
                window_argmax(src, t, oh, ow, &m[ow])


def max_pool_forward(const floating[:, :, ::1] x, floating[:, :, ::1] y,
                     int64_t[:, :, ::1] indices, object geometry, int n_threads):
    """y[p, oh, ow] = max of plane p's window (oh, ow); indices = its flat position or -1.

    # IN  x: (planes, H, W)
    # OUT y: (planes, OH, OW); indices: (planes, OH, OW) or None (not written)
    """
    cdef _Tables tables = _Tables(geometry)
    cdef const PoolTables *t = &tables.t
    cdef Py_ssize_t planes = x.shape[0], plane_size = t.H * t.W, out_size = t.OH * t.OW
    cdef Py_ssize_t p
    cdef int64_t *idx0 = NULL if indices is None else &indices[0, 0, 0]
    cdef const floating *x0 = &x[0, 0, 0]
    cdef floating *y0 = &y[0, 0, 0]
    for p in prange(planes, nogil=True, num_threads=n_threads, schedule="static"):
        max_plane(x0 + p * plane_size, t, y0 + p * out_size,
                  NULL if idx0 == NULL else idx0 + p * out_size)


def max_pool_backward_indices(const floating[:, :, ::1] grad_output,
                              const int64_t[:, :, ::1] indices, floating[:, :, ::1] grad_x,
                              int n_threads):
    """grad_x[p, indices[p, o]] += grad_output[p, o]; returns the count of bad indices.

    An index of -1 (an empty window) adds nothing; any other index outside
    ``[0, H*W)`` is skipped and counted, so the caller can raise.

    # IN  grad_output, indices: (planes, OH, OW)
    # OUT grad_x: (planes, H, W), overwritten
    """
    cdef Py_ssize_t planes = grad_x.shape[0]
    cdef Py_ssize_t plane_size = grad_x.shape[1] * grad_x.shape[2]
    cdef Py_ssize_t out_size = grad_output.shape[1] * grad_output.shape[2]
    cdef Py_ssize_t p, o, arg, bad = 0
    cdef const floating *g
    cdef const int64_t *idx
    cdef floating *dst
    for p in prange(planes, nogil=True, num_threads=n_threads, schedule="static"):
        g = &grad_output[0, 0, 0] + p * out_size
        idx = &indices[0, 0, 0] + p * out_size
        dst = &grad_x[0, 0, 0] + p * plane_size
        memset(dst, 0, plane_size * sizeof(floating))
        for o in range(out_size):
            arg = idx[o]
            # one unsigned compare covers 0 <= arg < H*W
            if <size_t> arg < <size_t> plane_size:
                dst[arg] = dst[arg] + g[o]
            elif arg != -1:
                bad += 1
    return bad


# ---------------------------------------------------------------------------
# average pooling


cdef void avg_plane(const floating *src, const PoolTables *t, bint count_include_pad,
                    floating *dst) noexcept nogil:
    """One plane of average pooling.

    # IN  src: (H, W)
    # OUT dst: (OH, OW)
    """
    cdef Py_ssize_t oh, ow, a, b, r, nh, lo, hi, divisor, first
    cdef floating *acc
    cdef const floating *row
    cdef floating total
    for oh in range(t.OH):
        acc = dst + oh * t.OW
        nh = t.row_count[oh]
        lo, hi = t.lo, t.hi
        for ow in range(t.OW):
            if lo <= ow < hi:
                continue
            first = t.row_start[oh] * t.W + t.col_start[ow]
            total = 0
            for a in range(nh):
                row = src + first + a * t.W
                for b in range(t.col_count[ow]):
                    total = total + row[b]
            divisor = avg_divisor(t, oh, ow, count_include_pad)
            # an empty window cannot pass validation; PyTorch writes 0 for one
            acc[ow] = total / divisor if divisor > 0 else 0
        if hi <= lo:
            continue
        r = t.row_start[oh]
        for ow in range(lo, hi):
            acc[ow] = 0
        for a in range(nh):
            for b in range(t.KW):
                sum_tap(src + (r + a) * t.W + b - t.pw, t.sw, lo, hi, acc)
        # interior windows lie inside the input: KW columns on either count
        divisor = (t.row_padded[oh] if count_include_pad else nh) * t.KW
        for ow in range(lo, hi):
            acc[ow] = acc[ow] / divisor


cdef void avg_plane_backward(const floating *g, const PoolTables *t, bint count_include_pad,
                             floating *dst, floating *shares) noexcept nogil:
    """One plane of the average pooling gradient (``dst`` zeroed first).

    # IN  g: (OH, OW)
    # OUT dst: (H, W)
    # TMP shares: (OW,), this thread's own
    """
    cdef Py_ssize_t oh, ow, a, b, r, nh, lo, hi, divisor, first
    cdef floating *row
    cdef floating share
    memset(dst, 0, t.H * t.W * sizeof(floating))
    for oh in range(t.OH):
        nh = t.row_count[oh]
        lo, hi = t.lo, t.hi
        for ow in range(t.OW):
            if lo <= ow < hi:
                continue
            divisor = avg_divisor(t, oh, ow, count_include_pad)
            if divisor == 0:
                continue
            share = g[oh * t.OW + ow] / divisor
            first = t.row_start[oh] * t.W + t.col_start[ow]
            for a in range(nh):
                row = dst + first + a * t.W
                for b in range(t.col_count[ow]):
                    row[b] = row[b] + share
        if hi <= lo:
            continue
        r = t.row_start[oh]
        divisor = (t.row_padded[oh] if count_include_pad else nh) * t.KW
        # one division per window, not per tap
        for ow in range(lo, hi):
            shares[ow] = g[oh * t.OW + ow] / divisor
        for a in range(nh):
            for b in range(t.KW):
                spread_tap(dst + (r + a) * t.W + b - t.pw, t.sw, lo, hi, shares)


def avg_pool_forward(const floating[:, :, ::1] x, floating[:, :, ::1] y, object geometry,
                     bint count_include_pad, int n_threads):
    """y[p, oh, ow] = sum of plane p's in-bounds window / PyTorch's divisor.

    # IN  x: (planes, H, W)
    # OUT y: (planes, OH, OW)
    """
    cdef _Tables tables = _Tables(geometry)
    cdef const PoolTables *t = &tables.t
    cdef Py_ssize_t planes = x.shape[0], plane_size = t.H * t.W, out_size = t.OH * t.OW
    cdef Py_ssize_t p
    cdef const floating *x0 = &x[0, 0, 0]
    cdef floating *y0 = &y[0, 0, 0]
    for p in prange(planes, nogil=True, num_threads=n_threads, schedule="static"):
        avg_plane(x0 + p * plane_size, t, count_include_pad, y0 + p * out_size)


def avg_pool_backward(const floating[:, :, ::1] grad_output, floating[:, :, ::1] grad_x,
                      object geometry, bint count_include_pad, int n_threads):
    """grad_x[p, window(oh, ow)] += grad_output[p, oh, ow] / divisor.

    # IN  grad_output: (planes, OH, OW)
    # OUT grad_x: (planes, H, W), overwritten
    """
    cdef _Tables tables = _Tables(geometry)
    cdef const PoolTables *t = &tables.t
    cdef Py_ssize_t planes = grad_x.shape[0], plane_size = t.H * t.W, out_size = t.OH * t.OW
    cdef Py_ssize_t p
    cdef const floating *g0 = &grad_output[0, 0, 0]
    cdef floating *dx0 = &grad_x[0, 0, 0]
    # one row of window shares per OpenMP thread, allocated before nogil
    cdef floating[:, ::1] shares = np.empty((max(n_threads, 1), max(t.OW, 1)),
                                            dtype=np.float32 if floating is float else np.float64)
    cdef floating *shares0 = &shares[0, 0]
    for p in prange(planes, nogil=True, num_threads=n_threads, schedule="static"):
        avg_plane_backward(g0 + p * out_size, t, count_include_pad, dx0 + p * plane_size,
                           shares0 + omp_get_thread_num() * shares.shape[1])


# ---------------------------------------------------------------------------
# global average pooling


def global_avg_forward(const floating[:, ::1] x, floating[::1] y, int n_threads):
    """y[p] = mean of plane p.

    Summed in double: one long reduction per plane (up to H*W terms), where a
    float32 running sum would lose digits; the cost is hidden by memory reads.

    # IN  x: (planes, H*W)
    # OUT y: (planes,)
    """
    cdef Py_ssize_t planes = x.shape[0], size = x.shape[1], p, i
    cdef double total
    for p in prange(planes, nogil=True, num_threads=n_threads, schedule="static"):
        total = 0
        for i in range(size):
            total = total + x[p, i]
        y[p] = <floating> (total / size)


def global_avg_backward(const floating[::1] grad_output, floating[:, ::1] grad_x,
                        int n_threads):
    """grad_x[p, :] = grad_output[p] / (H*W).

    # IN  grad_output: (planes,)
    # OUT grad_x: (planes, H*W), overwritten
    """
    cdef Py_ssize_t planes = grad_x.shape[0], size = grad_x.shape[1], p, i
    cdef floating share
    for p in prange(planes, nogil=True, num_threads=n_threads, schedule="static"):
        share = grad_output[p] / size
        for i in range(size):
            grad_x[p, i] = share


# ---------------------------------------------------------------------------
# ReLU (elementwise on flat arrays)


# Below this many elements per thread, one thread is faster than waking a team.
cdef Py_ssize_t RELU_MIN_PER_THREAD = 1 << 15


cdef inline int relu_threads(Py_ssize_t size, int n_threads) noexcept nogil:
    cdef Py_ssize_t useful = size // RELU_MIN_PER_THREAD
    if useful < 1:
        return 1
    return n_threads if useful > n_threads else <int> useful


def relu_forward(const floating[::1] x, floating[::1] y, int n_threads):
    """y = x where x > 0 or x is NaN, else 0 (NaN propagates, as in PyTorch).

    # IN  x: (size,)
    # OUT y: (size,)
    """
    cdef Py_ssize_t size = x.shape[0], i
    cdef floating v
    for i in prange(size, nogil=True, num_threads=relu_threads(size, n_threads),
                    schedule="static"):
        v = x[i]
        # `not (v <= 0)` rather than `v > 0`: keeps NaN
        y[i] = 0 if v <= 0 else v


def relu_backward(const floating[::1] grad_output, const floating[::1] x,
                  floating[::1] grad_x, int n_threads):
    """grad_x = grad_output where x > 0, else 0 (PyTorch's threshold_backward).

    # IN  grad_output, x: (size,)
    # OUT grad_x: (size,)
    """
    cdef Py_ssize_t size = x.shape[0], i
    for i in prange(size, nogil=True, num_threads=relu_threads(size, n_threads),
                    schedule="static"):
        grad_x[i] = grad_output[i] if x[i] > 0 else 0
