"""Direct depthwise convolution kernels: forward, grad_input and grad_weight/grad_bias.

Depthwise means ``groups == C`` and ``F = m * C`` (channel multiplier
``m >= 1``): filter ``f`` reads only input channel ``f // m``. Each output plane
is then a sum of ``KH * KW`` shifted, scaled copies of one input plane, which
is memory-bound work: an im2col + GEMM would spend its time building columns
and running ``C`` tiny GEMMs per image, and BLAS buys nothing here.

Every kernel walks *rows*: one output row (or one grad_output row) stays in L1
while the taps of a kernel row sweep over it, one tap at a time. For a tap the
output columns whose input column is inside the image form an interval
``[lo, hi)`` (window starts grow with ``ow``), so the sweep over it is a
branch-free loop with unit stride for ``stride_w == 1`` (vectorised by
``gcc -O3``) and a constant stride for ``stride_w == 2``. The columns outside
the interval are the border: zero padding skips them, the other padding modes
read the input column :func:`fastconv._im2col.source_index` maps them to. Rows
are mapped the same way through a per-call table, so reflect/replicate/circular
padding only costs a few extra scalar updates at the borders and no padded copy
of the input is ever made.

Work split (OpenMP, static schedules, so results are deterministic for a fixed
``n_threads``):

* :func:`forward`: one work item per output plane ``(n, f)``;
* :func:`backward_input`: one work item per input-gradient plane ``(n, c)``:
  the ``m`` filters of channel ``c`` scatter into the same plane, so one thread
  owns it and there are no races;
* :func:`backward_weight`: the ``N * F`` planes are cut into ``T = min(n_threads,
  N * F)`` contiguous chunks; chunk ``t`` sums into its own row of a
  ``(T, F * (KH*KW + 1))`` scratch (its size does not depend on ``N``), reduced
  in chunk order at the end. Splitting planes rather than filters keeps every
  thread busy when ``F < n_threads`` (or ``N`` is large and ``F`` small).

All kernels assume validated geometry (``fastconv._validation.conv_geometry``
with ``groups == C``) and C-contiguous arrays of one dtype.
"""

import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset

from fastconv._im2col cimport ConvGeom, PAD_ZEROS, make_geom, source_index


cdef struct Tables:
    # row_src[oh * KH + kh]: the input row output row oh reads through kernel row kh
    # (-1: a zero-padding row, skipped)
    const Py_ssize_t *row_src
    # col_src[kw * OW + ow]: the input column the same for kernel column kw (border
    # columns only are read, and only for the non-zero padding modes)
    const Py_ssize_t *col_src
    # [col_lo[kw], col_hi[kw]): the output columns whose tap kw is inside the image
    const Py_ssize_t *col_lo
    const Py_ssize_t *col_hi


cdef class _Tables:
    """Owns the arrays behind a :class:`Tables` (built with the GIL, read without)."""

    cdef Py_ssize_t[::1] row_src
    cdef Py_ssize_t[::1] col_src
    cdef Py_ssize_t[::1] col_lo
    cdef Py_ssize_t[::1] col_hi
    cdef Tables t

    def __cinit__(self, object geometry):
        cdef ConvGeom g = make_geom(geometry)
        cdef Py_ssize_t oh, ow, kh, kw, offset, last, lo, hi
        self.row_src = np.empty(g.OH * g.KH, dtype=np.intp)
        self.col_src = np.empty(g.KW * g.OW, dtype=np.intp)
        self.col_lo = np.empty(g.KW, dtype=np.intp)
        self.col_hi = np.empty(g.KW, dtype=np.intp)
        for oh in range(g.OH):
            for kh in range(g.KH):
                self.row_src[oh * g.KH + kh] = source_index(
                    oh * g.stride_h - g.pad_top + kh * g.dilation_h, g.H, g.mode)
        for kw in range(g.KW):
            for ow in range(g.OW):
                self.col_src[kw * g.OW + ow] = source_index(
                    ow * g.stride_w - g.pad_left + kw * g.dilation_w, g.W, g.mode)
            # iw = ow * stride_w + offset is inside [0, W) for ow in [lo, hi)
            offset = kw * g.dilation_w - g.pad_left
            lo = 0 if offset >= 0 else (-offset + g.stride_w - 1) // g.stride_w
            last = g.W - 1 - offset
            hi = 0 if last < 0 else min(last // g.stride_w + 1, g.OW)
            # an empty interval sits at hi so that [0, lo) and [hi, OW) still
            # cover every border column exactly once
            self.col_lo[kw] = min(lo, hi)
            self.col_hi[kw] = hi
        self.t.row_src = &self.row_src[0]
        self.t.col_src = &self.col_src[0]
        self.t.col_lo = &self.col_lo[0]
        self.t.col_hi = &self.col_hi[0]


# ---------------------------------------------------------------------------
# Tap kernels: one kernel tap (kh, kw) across the interior of one row.
#
# ``base = kw * dilation_w - pad_left``: tap kw of output column ow reads input
# column ``base + ow * stride``. Strides 1 and 2 get constant-stride loops so
# gcc vectorises them (a runtime stride would be scalar).


cdef inline void tap_axpy(floating *out, const floating *row, floating wv, Py_ssize_t base,
                          Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """out[ow] += wv * row[base + ow*stride] for ow in [lo, hi) (forward)."""
    cdef Py_ssize_t ow
    if stride == 1:
        for ow in range(lo, hi):
            out[ow] += wv * row[base + ow]
    elif stride == 2:
        for ow in range(lo, hi):
            out[ow] += wv * row[base + 2 * ow]
    else:
        for ow in range(lo, hi):
            out[ow] += wv * row[base + ow * stride]


cdef inline void tap_scatter(floating *row, const floating *grad, floating wv, Py_ssize_t base,
                             Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """row[base + ow*stride] += wv * grad[ow] for ow in [lo, hi) (the adjoint of tap_axpy).

    Distinct ``ow`` hit distinct columns, so the loop carries no dependence.
    """
    cdef Py_ssize_t ow
    if stride == 1:
        for ow in range(lo, hi):
            row[base + ow] += wv * grad[ow]
    elif stride == 2:
        for ow in range(lo, hi):
            row[base + 2 * ow] += wv * grad[ow]
    else:
        for ow in range(lo, hi):
            row[base + ow * stride] += wv * grad[ow]


cdef inline void tap_product(floating *acc, const floating *grad, const floating *row,
                             Py_ssize_t base, Py_ssize_t stride, Py_ssize_t lo,
                             Py_ssize_t hi) noexcept nogil:
    """acc[ow] += grad[ow] * row[base + ow*stride] for ow in [lo, hi) (grad_weight).

    A row of per-column partial sums rather than one scalar dot product: gcc
    vectorises a float reduction only under -ffast-math, an element-wise
    update always.
    """
    cdef Py_ssize_t ow
    if stride == 1:
        for ow in range(lo, hi):
            acc[ow] += grad[ow] * row[base + ow]
    elif stride == 2:
        for ow in range(lo, hi):
            acc[ow] += grad[ow] * row[base + 2 * ow]
    else:
        for ow in range(lo, hi):
            acc[ow] += grad[ow] * row[base + ow * stride]


# ---------------------------------------------------------------------------
# Plane kernels: everything one work item does.


cdef void forward_plane(const floating *xp, const floating *wk, floating b, const ConvGeom *g,
                        const Tables *t, floating *yp) noexcept nogil:
    """yp = b + sum over taps of wk[kh, kw] * (shifted xp).

    # IN  xp: one input plane (H, W); wk: the filter's KH*KW taps
    # OUT yp: one output plane (OH, OW), every element written
    """
    cdef Py_ssize_t oh, ow, kh, kw, ih, lo, hi, base
    cdef const Py_ssize_t *csrc
    cdef const floating *row
    cdef floating *out
    cdef floating wv
    for oh in range(g.OH):
        out = yp + oh * g.OW
        for ow in range(g.OW):
            out[ow] = b
        for kh in range(g.KH):
            ih = t.row_src[oh * g.KH + kh]
            if ih < 0:
                continue
            row = xp + ih * g.W
            for kw in range(g.KW):
                wv = wk[kh * g.KW + kw]
                lo = t.col_lo[kw]
                hi = t.col_hi[kw]
                tap_axpy(out, row, wv, kw * g.dilation_w - g.pad_left, g.stride_w, lo, hi)
                if g.mode != PAD_ZEROS:
                    csrc = t.col_src + kw * g.OW
                    for ow in range(lo):
                        out[ow] += wv * row[csrc[ow]]
                    for ow in range(hi, g.OW):
                        out[ow] += wv * row[csrc[ow]]


cdef void backward_input_plane(const floating *dyp, const floating *wk, const ConvGeom *g,
                               const Tables *t, Py_ssize_t m, floating *dxp) noexcept nogil:
    """dxp = sum over the m filters of channel c of their taps' adjoint scatters.

    # IN  dyp: the m consecutive grad_output planes (m, OH, OW) of channel c's filters;
    #     wk: their taps (m, KH*KW)
    # OUT dxp: one input-gradient plane (H, W), every element written
    """
    cdef Py_ssize_t P = g.OH * g.OW, KK = g.KH * g.KW
    cdef Py_ssize_t j, oh, ow, kh, kw, ih, lo, hi, base
    cdef const Py_ssize_t *csrc
    cdef const floating *grad
    cdef floating *row
    cdef floating wv
    memset(dxp, 0, g.H * g.W * sizeof(floating))
    # oh outside j: the KH input rows an output row touches stay in cache
    # while all m filters scatter into them
    for oh in range(g.OH):
        for j in range(m):
            grad = dyp + j * P + oh * g.OW
            for kh in range(g.KH):
                ih = t.row_src[oh * g.KH + kh]
                if ih < 0:
                    continue
                row = dxp + ih * g.W
                for kw in range(g.KW):
                    wv = wk[j * KK + kh * g.KW + kw]
                    lo = t.col_lo[kw]
                    hi = t.col_hi[kw]
                    tap_scatter(row, grad, wv, kw * g.dilation_w - g.pad_left, g.stride_w,
                                lo, hi)
                    if g.mode != PAD_ZEROS:
                        csrc = t.col_src + kw * g.OW
                        for ow in range(lo):
                            row[csrc[ow]] += wv * grad[ow]
                        for ow in range(hi, g.OW):
                            row[csrc[ow]] += wv * grad[ow]


cdef void backward_weight_plane(const floating *xp, const floating *dyp, const ConvGeom *g,
                                const Tables *t, floating *acc, floating *sums) noexcept nogil:
    """sums[k] += sum over (oh, ow) of dyp * (tap k's view of xp); sums[KK] += sum of dyp.

    # IN  xp: one input plane (H, W); dyp: one grad_output plane (OH, OW)
    # OUT sums: KH*KW + 1 running totals, accumulated into
    # acc: (KH*KW + 1) * OW scratch, overwritten
    """
    cdef Py_ssize_t KK = g.KH * g.KW
    cdef Py_ssize_t oh, ow, kh, kw, k, ih, lo, hi
    cdef const Py_ssize_t *csrc
    cdef const floating *grad
    cdef const floating *row
    cdef floating *a
    cdef floating total
    memset(acc, 0, (KK + 1) * g.OW * sizeof(floating))
    for oh in range(g.OH):
        grad = dyp + oh * g.OW
        a = acc + KK * g.OW
        for ow in range(g.OW):
            a[ow] += grad[ow]
        for kh in range(g.KH):
            ih = t.row_src[oh * g.KH + kh]
            if ih < 0:
                continue
            row = xp + ih * g.W
            for kw in range(g.KW):
                a = acc + (kh * g.KW + kw) * g.OW
                lo = t.col_lo[kw]
                hi = t.col_hi[kw]
                tap_product(a, grad, row, kw * g.dilation_w - g.pad_left, g.stride_w, lo, hi)
                if g.mode != PAD_ZEROS:
                    csrc = t.col_src + kw * g.OW
                    for ow in range(lo):
                        a[ow] += grad[ow] * row[csrc[ow]]
                    for ow in range(hi, g.OW):
                        a[ow] += grad[ow] * row[csrc[ow]]
    # the horizontal sums cost OW per tap, 1/OH of the sweep above
    for k in range(KK + 1):
        a = acc + k * g.OW
        total = 0
        for ow in range(g.OW):
            total = total + a[ow]
        sums[k] += total


# ---------------------------------------------------------------------------
# Drivers.


def forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w,
            const floating[::1] bias, floating[:, :, :, ::1] y,
            object geometry, int n_threads):
    """y[n, f] = bias[f] + depthwise_conv(x[n, f // m], w[f]), one output plane per work item.

    # IN  x: (N, C, H, W); w: (F, KH*KW) with F = m*C; bias: (F,) or None
    # OUT y: (N, F, OH, OW), every element written
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef _Tables tables = _Tables(geometry)
    cdef Py_ssize_t N = x.shape[0], F = w.shape[0]
    cdef Py_ssize_t m = F // g.C
    cdef Py_ssize_t item, n, f
    cdef bint has_bias = bias is not None
    cdef floating b
    if N == 0:
        return
    for item in prange(N * F, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // F
        f = item - n * F
        b = bias[f] if has_bias else 0
        forward_plane(&x[n, f // m, 0, 0], &w[f, 0], b, &g, &tables.t, &y[n, f, 0, 0])


def backward_input(const floating[:, ::1] w, const floating[:, :, :, ::1] dy,
                   floating[:, :, :, ::1] dx, object geometry, int n_threads):
    """dx[n, c] = sum over f in [c*m, (c+1)*m) of conv_transpose(dy[n, f], w[f]).

    One input-gradient plane per work item: the m filters of a channel all
    scatter into it, so no two threads ever write the same element.

    # IN  w: (F, KH*KW) with F = m*C; dy: (N, F, OH, OW)
    # OUT dx: (N, C, H, W), every element written
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef _Tables tables = _Tables(geometry)
    cdef Py_ssize_t N = dx.shape[0], F = w.shape[0], C = g.C
    cdef Py_ssize_t m = F // C
    cdef Py_ssize_t item, n, c
    if N == 0:
        return
    for item in prange(N * C, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // C
        c = item - n * C
        backward_input_plane(&dy[n, c * m, 0, 0], &w[c * m, 0], &g, &tables.t, m,
                             &dx[n, c, 0, 0])


def backward_weight(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] dy,
                    floating[:, ::1] dw, floating[::1] db, object geometry, int n_threads):
    """dw[f, (kh, kw)] = sum over (n, oh, ow) of dy[n, f] * x[n, f // m] seen through tap (kh, kw);
    db[f] = sum over (n, oh, ow) of dy[n, f].

    The N*F planes are cut into T = min(n_threads, N*F) contiguous chunks; chunk
    t sums into row t of a (T, F*(KK+1)) scratch (independent of N), and the
    rows are added in chunk order, so the result depends on n_threads but not
    on which thread ran which chunk.

    # IN  x: (N, C, H, W); dy: (N, F, OH, OW) with F = m*C
    # OUT dw: (F, KH*KW), overwritten; db: (F,) or None, overwritten
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef _Tables tables = _Tables(geometry)
    cdef Py_ssize_t N = x.shape[0], F = dw.shape[0]
    cdef Py_ssize_t KK = g.KH * g.KW
    cdef Py_ssize_t m = F // g.C
    cdef Py_ssize_t items = N * F
    cdef Py_ssize_t T = max(1, min(<Py_ssize_t> n_threads, items))
    cdef bint has_bias = db is not None
    dtype = np.float32 if floating is float else np.float64
    # partial[t, f*(KK+1) + k]: chunk t's total for tap k (k == KK: the bias) of filter f
    cdef floating[:, ::1] partial = np.zeros((T, F * (KK + 1)), dtype=dtype)
    cdef floating[:, ::1] acc = np.empty((T, (KK + 1) * g.OW), dtype=dtype)
    cdef Py_ssize_t chunk, item, i0, i1, n, f, k, s
    cdef floating total
    for chunk in prange(T, nogil=True, num_threads=n_threads, schedule="static", chunksize=1):
        i0 = chunk * items // T
        i1 = (chunk + 1) * items // T
        for item in range(i0, i1):
            n = item // F
            f = item - n * F
            backward_weight_plane(&x[n, f // m, 0, 0], &dy[n, f, 0, 0], &g, &tables.t,
                                  &acc[chunk, 0], &partial[chunk, f * (KK + 1)])
    for f in prange(F, nogil=True, num_threads=n_threads, schedule="static"):
        for k in range(KK + 1):
            total = 0
            for s in range(T):
                total = total + partial[s, f * (KK + 1) + k]
            if k < KK:
                dw[f, k] = total
            elif has_bias:
                db[f] = total
