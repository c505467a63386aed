"""Direct depthwise convolution kernels: forward, grad_input and grad_weight/grad_bias.

Depthwise means ``groups == C`` and ``F = m * C`` (channel multiplier
``m >= 1``): filter ``f`` reads only input channel ``f // m``. Each output plane
is then a sum of ``KH * KW`` shifted, scaled copies of one input plane. That is
memory-bound work: an im2col + GEMM would spend its time building columns and
running ``C`` tiny GEMMs per image, and BLAS buys nothing here.

Every output row splits into

* the *interior*, the output columns where every kernel column reads inside
  the image (an interval, since window starts grow with ``ow``): branch-free
  sweeps with unit stride for ``stride_w == 1`` (vectorised by gcc -O3) and
  constant stride 2 for ``stride_w == 2``;
* the *border*, the few columns left at each end, swept down the plane one
  (tap, column) at a time through per-call tables that give the input row and
  column each (output, tap) pair reads, built with
  :func:`fastconv._im2col.source_index`: -1 (skipped) for zero padding, the
  mirrored, clamped or wrapped pixel for reflect, replicate and circular
  padding. No padded copy of the input is made, and the interior loops are
  the same for every padding mode. In the interior, a zero-padding row reads
  a row of zeros, so the sweeps need no row cases either.

In the interior the taps go in blocks of 3 kernel rows x 3 kernel columns
(:func:`block_axpy`, :func:`block_gather`, :func:`block_acc`; other shapes one
kernel column of up to 3 rows at a time): one load and store of the written
row per nine taps. With one per tap, 3x3 layers were bound by L1 traffic, not
by memory. The tap groups run outside and the rows inside. For stride 1 with
``OW == W`` (``padding='same'``) input and output rows share one pitch, so the
interior of all interior rows is one interval of the flattened plane and is
swept in one go; the border columns inside that interval are reset before the
border loops run. With 56-column rows the set-up of each row's sweep (overlap
checks, loop tails) otherwise costs as much as the row's arithmetic. A 3x3
dilation-1 filter's sweep (:func:`block_set_flat`, :func:`block_gather_set_flat`,
the forward and, with one filter per channel, grad_x) writes its sums rather
than adding them to a plane set to the bias or zero first, two rows per step:
the four rows they read serve both.

* forward: ``out[ow] += sum w[r, c] * x_row_r[base + c*dil + ow*stride]``;
* grad_input is the same loop turned around, one *input-gradient* row at a
  time, over the grad_output rows that reach it (a per-call table lists
  them), so each ``dx`` row is finished while it sits in L1;
* grad_weight: products of a grad_output row with shifted input rows, added
  column by column into one accumulator row per tap, a local array of
  :data:`CHUNK` columns summed once per plane by folding halves. A running
  sum per tap would stay scalar: gcc reorders a float reduction only under
  -ffast-math.

Work split (OpenMP, static schedules, so results are deterministic for a fixed
``n_threads``):

* :func:`forward`: one work item per output plane ``(n, f)``;
* :func:`backward_input`: one work item per input-gradient plane ``(n, c)``:
  the ``m`` filters of channel ``c`` all add into it, so one thread owns it
  and there are no races;
* :func:`backward_weight`: the ``N * F`` planes are cut into ``T = min(n_threads,
  N * F)`` contiguous chunks; chunk ``t`` sums into its own row of a
  ``(T, F * (KH*KW + 1))`` scratch (its size does not depend on ``N``), and the
  rows are added in chunk order at the end. Splitting planes rather than
  filters keeps every thread busy when ``F < n_threads``, and costs only a
  tiny scratch when ``N`` is large.

All kernels assume validated geometry (``fastconv._validation.conv_geometry``
with ``groups == C``) and C-contiguous arrays of one dtype.
"""

import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset

from fastconv._im2col cimport ConvGeom, PAD_ZEROS, make_geom, source_index


cdef enum:
    # kernel rows swept together: 3 makes a 3x3 kernel one block, and more rows
    # would run out of SSE registers for the weights
    ROWS = 3
    # grad_weight's interior goes in chunks of CHUNK output columns, so that its
    # per-tap accumulator rows are one small local array (gcc then knows they
    # alias nothing and vectorises without runtime checks)
    CHUNK = 64


cdef struct Tables:
    # row_src[oh * KH + kh]: the input row output row oh reads through kernel row kh
    # (-1: a zero-padding row)
    const Py_ssize_t *row_src
    # col_src[kw * OW + ow]: the input column output column ow reads through kernel
    # column kw (-1: a zero-padding column); the border loops' only source of columns
    const Py_ssize_t *col_src
    # [v_lo[kw], v_hi[kw]): the output columns whose tap kw reads an input pixel,
    # the columns inside the image for zero padding, all of them otherwise
    const Py_ssize_t *v_lo
    const Py_ssize_t *v_hi
    # [ow_lo, ow_hi): the interior output columns, where every kernel column reads
    # ow * stride_w + kw * dilation_w - pad_left inside the image
    Py_ssize_t ow_lo, ow_hi
    # [iw_lo, iw_hi): grad_input's interior input columns for stride 1, those that
    # every kernel column reaches from an interior output column
    Py_ssize_t iw_lo, iw_hi
    # [oh_lo, oh_hi): the interior output rows, whose kernel rows all read
    # oh * stride_h + kh * dilation_h - pad_top inside the image; the border
    # loops step through them without the row table
    Py_ssize_t oh_lo, oh_hi
    # Flat sweeps (stride 1 and OW == W, so rows have one pitch in and out): the
    # interior columns of the interior rows (forward), and of the input rows
    # [bw_lo, bw_hi) that receive exactly the KH grad_output rows
    # oh = ih + pad_top - kh * dilation_h (grad_input), are one interval of the
    # flattened plane, swept in one go rather than row by row. The border columns
    # inside that interval get garbage and are reset before the border loops.
    bint flat
    Py_ssize_t bw_lo, bw_hi
    # grad_input's interior for kernel column kw: output columns [gi_lo[kw], gi_hi[kw]).
    # For stride 1 those whose input columns receive every kernel column (one
    # interval of input columns, so a 3x3 block can gather it); for larger strides
    # all the columns of kw inside the image
    const Py_ssize_t *gi_lo
    const Py_ssize_t *gi_hi
    # grad_input's gather lists: input row ih receives from (out_oh[e], out_kh[e]) for
    # e in [in_start[ih], in_start[ih + 1]), in (oh, kh) order
    const Py_ssize_t *in_start
    const Py_ssize_t *out_oh
    const Py_ssize_t *out_kh


cdef class _Tables:
    """Owns the arrays behind a :class:`Tables` (built with the GIL, read without)."""

    cdef Py_ssize_t[::1] row_src, col_src, v_lo, v_hi, gi_lo, gi_hi
    cdef Py_ssize_t[::1] in_start, out_oh, out_kh
    cdef Tables t

    cdef bint _regular(self, const ConvGeom *g, Py_ssize_t ih):
        """Input row ih receives exactly the KH rows oh = ih + pad_top - kh*dilation_h
        (stride 1), all inside the output: no padding row maps onto it."""
        cdef Py_ssize_t e, e0 = self.in_start[ih], e1 = self.in_start[ih + 1]
        if e1 - e0 != g.KH or self.t.iw_lo >= self.t.iw_hi:
            return False
        for e in range(e0, e1):
            # pairs are unique, so KH of them on this line are every kh once
            if self.out_oh[e] != ih + g.pad_top - self.out_kh[e] * g.dilation_h:
                return False
        return True

    def __cinit__(self, object geometry):
        cdef ConvGeom g = make_geom(geometry)
        cdef Py_ssize_t oh, ow, kh, kw, ih, base, last, e, lo, hi
        cdef Py_ssize_t ow_lo = 0, ow_hi = g.OW, iw_lo = 0, iw_hi = g.W
        cdef Py_ssize_t[::1] next_slot
        self.row_src = np.empty(g.OH * g.KH, dtype=np.intp)
        self.col_src = np.empty(g.KW * g.OW, dtype=np.intp)
        self.v_lo = np.empty(g.KW, dtype=np.intp)
        self.v_hi = np.empty(g.KW, dtype=np.intp)
        self.gi_lo = np.empty(g.KW, dtype=np.intp)
        self.gi_hi = np.empty(g.KW, dtype=np.intp)
        self.in_start = np.zeros(g.H + 1, dtype=np.intp)
        self.out_oh = np.empty(g.OH * g.KH, dtype=np.intp)
        self.out_kh = np.empty(g.OH * g.KH, dtype=np.intp)

        for oh in range(g.OH):
            for kh in range(g.KH):
                ih = source_index(oh * g.stride_h - g.pad_top + kh * g.dilation_h, g.H, g.mode)
                self.row_src[oh * g.KH + kh] = ih
                if ih >= 0:
                    self.in_start[ih + 1] += 1
        # counting sort of the (oh, kh) pairs by the input row they read
        for ih in range(g.H):
            self.in_start[ih + 1] += self.in_start[ih]
        next_slot = np.array(self.in_start[:g.H], dtype=np.intp)
        for oh in range(g.OH):
            for kh in range(g.KH):
                ih = self.row_src[oh * g.KH + kh]
                if ih >= 0:
                    e = next_slot[ih]
                    self.out_oh[e] = oh
                    self.out_kh[e] = kh
                    next_slot[ih] = e + 1

        for kw in range(g.KW):
            base = kw * g.dilation_w - g.pad_left
            for ow in range(g.OW):
                self.col_src[kw * g.OW + ow] = source_index(ow * g.stride_w + base, g.W, g.mode)
            # base + ow * stride_w is inside [0, W) for ow in [lo, hi)
            lo = min(0 if base >= 0 else (-base + g.stride_w - 1) // g.stride_w, g.OW)
            last = g.W - 1 - base
            hi = max(0 if last < 0 else min(last // g.stride_w + 1, g.OW), lo)
            self.v_lo[kw] = lo if g.mode == PAD_ZEROS else 0
            self.v_hi[kw] = hi if g.mode == PAD_ZEROS else g.OW
            self.gi_lo[kw] = lo
            self.gi_hi[kw] = hi
            ow_lo = max(ow_lo, lo)
            ow_hi = min(ow_hi, hi)
            iw_lo = max(iw_lo, lo + base)
            iw_hi = min(iw_hi, hi + base)
        self.t.ow_lo = ow_lo
        self.t.ow_hi = max(ow_hi, ow_lo)
        self.t.iw_lo = iw_lo
        self.t.iw_hi = max(iw_hi, iw_lo)
        # oh * stride_h - pad_top >= 0 and oh * stride_h - pad_top + (KH-1)*dh <= H - 1
        self.t.oh_lo = min((g.pad_top + g.stride_h - 1) // g.stride_h, g.OH)
        last = g.H - 1 + g.pad_top - (g.KH - 1) * g.dilation_h
        self.t.oh_hi = max(0 if last < 0 else min(last // g.stride_h + 1, g.OH), self.t.oh_lo)
        self.t.flat = (g.stride_h == 1 and g.stride_w == 1 and g.W == g.OW and
                       self.t.ow_lo < self.t.ow_hi)
        self.t.bw_lo = self.t.bw_hi = 0
        if self.t.flat:
            ih = 0
            while ih < g.H and not self._regular(&g, ih):
                ih += 1
            self.t.bw_lo = ih
            while ih < g.H and self._regular(&g, ih):
                ih += 1
            self.t.bw_hi = ih
        if g.stride_w == 1:
            for kw in range(g.KW):
                base = kw * g.dilation_w - g.pad_left
                if iw_lo < iw_hi:
                    self.gi_lo[kw] = iw_lo - base
                    self.gi_hi[kw] = iw_hi - base
                else:
                    # no interior: an empty one at lo keeps [v_lo, gi_lo) and
                    # [gi_hi, v_hi) covering every column of the tap
                    self.gi_hi[kw] = self.gi_lo[kw]

        self.t.row_src = &self.row_src[0]
        self.t.col_src = &self.col_src[0]
        self.t.v_lo = &self.v_lo[0]
        self.t.v_hi = &self.v_hi[0]
        self.t.gi_lo = &self.gi_lo[0]
        self.t.gi_hi = &self.gi_hi[0]
        self.t.in_start = &self.in_start[0]
        self.t.out_oh = &self.out_oh[0]
        self.t.out_kh = &self.out_kh[0]


cdef inline bint input_rows(const floating *xp, const floating *zero_row, const ConvGeom *g,
                            const Tables *t, Py_ssize_t oh, Py_ssize_t kh, Py_ssize_t nr,
                            const floating **rows) noexcept nogil:
    """rows[r] = the input row kernel row kh + r of output row oh reads, for r < 3.

    A zero-padding row reads ``zero_row`` (so the sweeps need no special
    rows), and rows past ``nr`` repeat rows[0] (valid memory, never used).
    Returns False if every row is padding (the group adds nothing).
    """
    cdef const Py_ssize_t *src = t.row_src + oh * g.KH + kh
    cdef bint inside = False
    cdef Py_ssize_t r
    for r in range(ROWS):
        if r >= nr:
            rows[r] = rows[0]
        elif src[r] >= 0:
            rows[r] = xp + src[r] * g.W
            inside = True
        else:
            rows[r] = zero_row
    return inside


# ---------------------------------------------------------------------------
# Interior kernels. ``base = kw * dilation_w - pad_left`` (+ c0 * stride for a
# chunk starting at output column c0): output column ow reads input column
# ``base + ow * stride``. Strides 1 and 2 get constant-stride loops so gcc
# vectorises them (a runtime stride stays scalar). Blocks cover 3 kernel rows
# x 3 kernel columns, the columns ``dil`` apart; their weights are copied into
# locals so gcc keeps them in registers across the stores.


cdef inline void rows_axpy(floating *out, Py_ssize_t count,
                           const floating *r0, const floating *r1, const floating *r2,
                           floating w0, floating w1, floating w2, Py_ssize_t base,
                           Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """out[ow] += sum over r < count of w_r * r_r[base + ow*stride], ow in [lo, hi) (forward)."""
    cdef Py_ssize_t ow
    if stride == 1:
        if count == 3:
            for ow in range(lo, hi):
                out[ow] += w0 * r0[base + ow] + w1 * r1[base + ow] + w2 * r2[base + ow]
        elif count == 2:
            for ow in range(lo, hi):
                out[ow] += w0 * r0[base + ow] + w1 * r1[base + ow]
        else:
            for ow in range(lo, hi):
                out[ow] += w0 * r0[base + ow]
    elif stride == 2:
        if count == 3:
            for ow in range(lo, hi):
                out[ow] += (w0 * r0[base + 2 * ow] + w1 * r1[base + 2 * ow]
                            + w2 * r2[base + 2 * ow])
        elif count == 2:
            for ow in range(lo, hi):
                out[ow] += w0 * r0[base + 2 * ow] + w1 * r1[base + 2 * ow]
        else:
            for ow in range(lo, hi):
                out[ow] += w0 * r0[base + 2 * ow]
    else:
        for ow in range(lo, hi):
            out[ow] += w0 * r0[base + ow * stride]
        if count > 1:
            for ow in range(lo, hi):
                out[ow] += w1 * r1[base + ow * stride]
        if count > 2:
            for ow in range(lo, hi):
                out[ow] += w2 * r2[base + ow * stride]


cdef inline void block_axpy(floating *out, const floating *r0, const floating *r1,
                            const floating *r2, const floating *wb, Py_ssize_t ldw,
                            Py_ssize_t base, Py_ssize_t dil, Py_ssize_t stride, Py_ssize_t lo,
                            Py_ssize_t hi) noexcept nogil:
    """out[ow] += sum over (r, c) of wb[r*ldw + c] * r_r[base + c*dil + ow*stride], ow in [lo, hi).

    Nine taps for one load and store of ``out``. Stride 1 or 2.
    """
    cdef Py_ssize_t ow, i, d2 = 2 * dil
    cdef floating w00 = wb[0], w01 = wb[1], w02 = wb[2]
    cdef floating w10 = wb[ldw], w11 = wb[ldw + 1], w12 = wb[ldw + 2]
    cdef floating w20 = wb[2 * ldw], w21 = wb[2 * ldw + 1], w22 = wb[2 * ldw + 2]
    # dilation 1 gets its own loops: with constant offsets the nine taps need
    # three pointers, not nine, and the weights then fit in registers
    if stride == 1 and dil == 1:
        for ow in range(lo, hi):
            i = base + ow
            out[ow] += ((w00 * r0[i] + w01 * r0[i + 1] + w02 * r0[i + 2])
                        + (w10 * r1[i] + w11 * r1[i + 1] + w12 * r1[i + 2])
                        + (w20 * r2[i] + w21 * r2[i + 1] + w22 * r2[i + 2]))
    elif stride == 1:
        for ow in range(lo, hi):
            i = base + ow
            out[ow] += ((w00 * r0[i] + w01 * r0[i + dil] + w02 * r0[i + d2])
                        + (w10 * r1[i] + w11 * r1[i + dil] + w12 * r1[i + d2])
                        + (w20 * r2[i] + w21 * r2[i + dil] + w22 * r2[i + d2]))
    elif dil == 1:
        for ow in range(lo, hi):
            i = base + 2 * ow
            out[ow] += ((w00 * r0[i] + w01 * r0[i + 1] + w02 * r0[i + 2])
                        + (w10 * r1[i] + w11 * r1[i + 1] + w12 * r1[i + 2])
                        + (w20 * r2[i] + w21 * r2[i + 1] + w22 * r2[i + 2]))
    else:
        for ow in range(lo, hi):
            i = base + 2 * ow
            out[ow] += ((w00 * r0[i] + w01 * r0[i + dil] + w02 * r0[i + d2])
                        + (w10 * r1[i] + w11 * r1[i + dil] + w12 * r1[i + d2])
                        + (w20 * r2[i] + w21 * r2[i + dil] + w22 * r2[i + d2]))


cdef inline void block_set_flat(floating *out, Py_ssize_t W, const floating *x,
                                const floating *wb, Py_ssize_t ldw, Py_ssize_t lo,
                                Py_ssize_t hi, floating b) noexcept nogil:
    """out[p] = b + sum over (r, c) of wb[r*ldw + c] * x[p + r*W + c], p in [lo, hi): a 3x3,
    stride-1, dilation-1 filter over a flattened plane whose output and input rows share
    the pitch W (``x`` already offset by the padding). Two output rows per step where
    both lie in the interval: the four input rows they read serve both (12 loads per two
    outputs instead of 18), and ``out`` is written, not read and added to. The sum is
    :func:`block_axpy`'s, in its order: bit for bit ``b`` plus it.
    """
    cdef Py_ssize_t p, start = lo
    cdef const floating *r0 = x
    cdef const floating *r1 = x + W
    cdef const floating *r2 = x + 2 * W
    cdef const floating *r3 = x + 3 * W
    cdef floating w00 = wb[0], w01 = wb[1], w02 = wb[2]
    cdef floating w10 = wb[ldw], w11 = wb[ldw + 1], w12 = wb[ldw + 2]
    cdef floating w20 = wb[2 * ldw], w21 = wb[2 * ldw + 1], w22 = wb[2 * ldw + 2]
    while start + 2 * W <= hi:
        for p in range(start, start + W):
            out[p] = b + ((w00 * r0[p] + w01 * r0[p + 1] + w02 * r0[p + 2])
                          + (w10 * r1[p] + w11 * r1[p + 1] + w12 * r1[p + 2])
                          + (w20 * r2[p] + w21 * r2[p + 1] + w22 * r2[p + 2]))
            out[p + W] = b + ((w00 * r1[p] + w01 * r1[p + 1] + w02 * r1[p + 2])
                              + (w10 * r2[p] + w11 * r2[p + 1] + w12 * r2[p + 2])
                              + (w20 * r3[p] + w21 * r3[p + 1] + w22 * r3[p + 2]))
        start = start + 2 * W
    for p in range(start, hi):
        out[p] = b + ((w00 * r0[p] + w01 * r0[p + 1] + w02 * r0[p + 2])
                      + (w10 * r1[p] + w11 * r1[p + 1] + w12 * r1[p + 2])
                      + (w20 * r2[p] + w21 * r2[p + 1] + w22 * r2[p + 2]))


cdef inline void rows_gather(floating *row, Py_ssize_t count,
                             const floating *g0, const floating *g1, const floating *g2,
                             floating w0, floating w1, floating w2, Py_ssize_t base,
                             Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """row[base + ow*stride] += sum over r < count of w_r * g_r[ow], ow in [lo, hi) (grad_input).

    The adjoint of :func:`rows_axpy` for grad_output rows g_r that reach the
    same input row; distinct ``ow`` write distinct columns, so the loop
    carries no dependence.
    """
    cdef Py_ssize_t ow
    if stride == 1:
        if count == 3:
            for ow in range(lo, hi):
                row[base + ow] += w0 * g0[ow] + w1 * g1[ow] + w2 * g2[ow]
        elif count == 2:
            for ow in range(lo, hi):
                row[base + ow] += w0 * g0[ow] + w1 * g1[ow]
        else:
            for ow in range(lo, hi):
                row[base + ow] += w0 * g0[ow]
    elif stride == 2:
        if count == 3:
            for ow in range(lo, hi):
                row[base + 2 * ow] += w0 * g0[ow] + w1 * g1[ow] + w2 * g2[ow]
        elif count == 2:
            for ow in range(lo, hi):
                row[base + 2 * ow] += w0 * g0[ow] + w1 * g1[ow]
        else:
            for ow in range(lo, hi):
                row[base + 2 * ow] += w0 * g0[ow]
    else:
        for ow in range(lo, hi):
            row[base + ow * stride] += w0 * g0[ow]
        if count > 1:
            for ow in range(lo, hi):
                row[base + ow * stride] += w1 * g1[ow]
        if count > 2:
            for ow in range(lo, hi):
                row[base + ow * stride] += w2 * g2[ow]


cdef inline void block_gather(floating *row, const floating *g0, const floating *g1,
                              const floating *g2, const floating *wb, Py_ssize_t base,
                              Py_ssize_t dil, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """row[iw] += sum over (r, c) of wb[3*r + c] * g_r[iw - base - c*dil], iw in [lo, hi).

    The adjoint of :func:`block_axpy` for stride 1, written as a gather over
    input columns so each ``row`` element is loaded and stored once.
    """
    cdef Py_ssize_t iw, i, d2 = 2 * dil
    cdef floating w00 = wb[0], w01 = wb[1], w02 = wb[2]
    cdef floating w10 = wb[3], w11 = wb[4], w12 = wb[5]
    cdef floating w20 = wb[6], w21 = wb[7], w22 = wb[8]
    if dil == 1:
        for iw in range(lo, hi):
            i = iw - base
            row[iw] += ((w00 * g0[i] + w01 * g0[i - 1] + w02 * g0[i - 2])
                        + (w10 * g1[i] + w11 * g1[i - 1] + w12 * g1[i - 2])
                        + (w20 * g2[i] + w21 * g2[i - 1] + w22 * g2[i - 2]))
    else:
        for iw in range(lo, hi):
            i = iw - base
            row[iw] += ((w00 * g0[i] + w01 * g0[i - dil] + w02 * g0[i - d2])
                        + (w10 * g1[i] + w11 * g1[i - dil] + w12 * g1[i - d2])
                        + (w20 * g2[i] + w21 * g2[i - dil] + w22 * g2[i - d2]))


cdef inline void block_gather_set_flat(floating *out, Py_ssize_t W, const floating *g0,
                                       const floating *wb, Py_ssize_t lo,
                                       Py_ssize_t hi) noexcept nogil:
    """out[q] = 0 + sum over (r, c) of wb[3*r + c] * g_r[q - c] for q in [lo, hi), where
    g_r = g0 - r*W: :func:`block_gather`'s sum over a flattened plane (dilation 1,
    grad_output and input rows of one pitch W, ``g0`` already offset), written rather
    than added to a zeroed plane (bit for bit the same, -0 included). Two output rows per
    step where both lie in the interval: row q + W reads g0 + W, g0 and g1, so the two
    rows read four grad_output rows (12 loads per two outputs instead of 18)."""
    cdef Py_ssize_t q, start = lo
    cdef const floating *gu = g0 + W
    cdef const floating *g1 = g0 - W
    cdef const floating *g2 = g0 - 2 * W
    cdef floating zero = 0
    cdef floating w00 = wb[0], w01 = wb[1], w02 = wb[2]
    cdef floating w10 = wb[3], w11 = wb[4], w12 = wb[5]
    cdef floating w20 = wb[6], w21 = wb[7], w22 = wb[8]
    while start + 2 * W <= hi:
        for q in range(start, start + W):
            out[q] = zero + ((w00 * g0[q] + w01 * g0[q - 1] + w02 * g0[q - 2])
                             + (w10 * g1[q] + w11 * g1[q - 1] + w12 * g1[q - 2])
                             + (w20 * g2[q] + w21 * g2[q - 1] + w22 * g2[q - 2]))
            out[q + W] = zero + ((w00 * gu[q] + w01 * gu[q - 1] + w02 * gu[q - 2])
                                 + (w10 * g0[q] + w11 * g0[q - 1] + w12 * g0[q - 2])
                                 + (w20 * g1[q] + w21 * g1[q - 1] + w22 * g1[q - 2]))
        start = start + 2 * W
    for q in range(start, hi):
        out[q] = zero + ((w00 * g0[q] + w01 * g0[q - 1] + w02 * g0[q - 2])
                         + (w10 * g1[q] + w11 * g1[q - 1] + w12 * g1[q - 2])
                         + (w20 * g2[q] + w21 * g2[q - 1] + w22 * g2[q - 2]))


cdef inline void tap_acc(floating *acc, const floating *grad, const floating *row,
                         Py_ssize_t base, Py_ssize_t stride, Py_ssize_t n) noexcept nogil:
    """acc[j] += grad[j] * row[base + j*stride] for j < n (grad_weight, one tap).

    Column-wise partial sums rather than one running sum: gcc vectorises an
    element-wise update, a float reduction only under -ffast-math.
    """
    cdef Py_ssize_t j
    if stride == 1:
        for j in range(n):
            acc[j] += grad[j] * row[base + j]
    elif stride == 2:
        for j in range(n):
            acc[j] += grad[j] * row[base + 2 * j]
    else:
        for j in range(n):
            acc[j] += grad[j] * row[base + j * stride]


cdef inline void block_acc(floating *acc, const floating *grad, const floating *r0,
                           const floating *r1, const floating *r2, Py_ssize_t base,
                           Py_ssize_t dil, Py_ssize_t stride, Py_ssize_t n) noexcept nogil:
    """acc[(3*r + c)*CHUNK + j] += grad[j] * r_r[base + c*dil + j*stride] for j < n.

    :func:`tap_acc` for a 3x3 block, sharing the grad loads. Stride 1 or 2.
    """
    cdef Py_ssize_t j, i, d2 = 2 * dil
    cdef floating gv
    if stride == 1 and dil == 1:
        for j in range(n):
            gv = grad[j]
            i = base + j
            acc[j] += gv * r0[i]
            acc[CHUNK + j] += gv * r0[i + 1]
            acc[2 * CHUNK + j] += gv * r0[i + 2]
            acc[3 * CHUNK + j] += gv * r1[i]
            acc[4 * CHUNK + j] += gv * r1[i + 1]
            acc[5 * CHUNK + j] += gv * r1[i + 2]
            acc[6 * CHUNK + j] += gv * r2[i]
            acc[7 * CHUNK + j] += gv * r2[i + 1]
            acc[8 * CHUNK + j] += gv * r2[i + 2]
    elif dil == 1:
        for j in range(n):
            gv = grad[j]
            i = base + 2 * j
            acc[j] += gv * r0[i]
            acc[CHUNK + j] += gv * r0[i + 1]
            acc[2 * CHUNK + j] += gv * r0[i + 2]
            acc[3 * CHUNK + j] += gv * r1[i]
            acc[4 * CHUNK + j] += gv * r1[i + 1]
            acc[5 * CHUNK + j] += gv * r1[i + 2]
            acc[6 * CHUNK + j] += gv * r2[i]
            acc[7 * CHUNK + j] += gv * r2[i + 1]
            acc[8 * CHUNK + j] += gv * r2[i + 2]
    else:
        for j in range(n):
            gv = grad[j]
            i = base + j * stride
            acc[j] += gv * r0[i]
            acc[CHUNK + j] += gv * r0[i + dil]
            acc[2 * CHUNK + j] += gv * r0[i + d2]
            acc[3 * CHUNK + j] += gv * r1[i]
            acc[4 * CHUNK + j] += gv * r1[i + dil]
            acc[5 * CHUNK + j] += gv * r1[i + d2]
            acc[6 * CHUNK + j] += gv * r2[i]
            acc[7 * CHUNK + j] += gv * r2[i + dil]
            acc[8 * CHUNK + j] += gv * r2[i + d2]


cdef inline void block_acc2(floating *acc, const floating *grad, const floating *grad1,
                            const floating *r0, const floating *r1, const floating *r2,
                            const floating *s0, const floating *s1, const floating *s2,
                            Py_ssize_t base, Py_ssize_t n) noexcept nogil:
    """:func:`block_acc` for two output rows at once (stride 1, dilation 1): ``grad``
    reads rows r0..r2, ``grad1`` rows s0..s2. Each accumulator is loaded and stored
    once per two products: one row at a time, the nine accumulator loads and stores
    per column bound the sweep, not the multiplications."""
    cdef Py_ssize_t j, i
    cdef floating gv, hv
    for j in range(n):
        gv = grad[j]
        hv = grad1[j]
        i = base + j
        acc[j] += gv * r0[i] + hv * s0[i]
        acc[CHUNK + j] += gv * r0[i + 1] + hv * s0[i + 1]
        acc[2 * CHUNK + j] += gv * r0[i + 2] + hv * s0[i + 2]
        acc[3 * CHUNK + j] += gv * r1[i] + hv * s1[i]
        acc[4 * CHUNK + j] += gv * r1[i + 1] + hv * s1[i + 1]
        acc[5 * CHUNK + j] += gv * r1[i + 2] + hv * s1[i + 2]
        acc[6 * CHUNK + j] += gv * r2[i] + hv * s2[i]
        acc[7 * CHUNK + j] += gv * r2[i + 1] + hv * s2[i + 1]
        acc[8 * CHUNK + j] += gv * r2[i + 2] + hv * s2[i + 2]


cdef inline void block_acc2_rows(floating *acc, const floating *grad, const floating *grad1,
                                 const floating *x, Py_ssize_t W, Py_ssize_t base,
                                 Py_ssize_t n) noexcept nogil:
    """:func:`block_acc2` where the two output rows read four consecutive input rows,
    ``x + k*W`` for k < 4 (an interior pair): inlined with the rows derived from one
    pointer and the pitch, not six pointers loaded from the caller's arrays, which
    spilled to the stack (their reloads were the sweep's hottest instructions):
    mobilenet-dw's backward 1.02x faster at 1 and 2 threads with a loop of its own, that
    less 0.99-1.00x through block_acc2. The same sums in the same order."""
    block_acc2(acc, grad, grad1, x, x + W, x + 2 * W, x + W, x + 2 * W, x + 3 * W, base, n)


cdef inline floating fold_sum(floating *acc) noexcept nogil:
    """The sum of the CHUNK entries of acc, folding halves onto each other (acc is
    overwritten). Every fold is an element-wise add that gcc vectorises, where
    one running sum would be a chain of scalar adds."""
    cdef Py_ssize_t j, width = CHUNK // 2
    while width >= 1:
        for j in range(width):
            acc[j] += acc[j + width]
        width = width // 2
    return acc[0]


# ---------------------------------------------------------------------------
# Plane kernels: everything one work item does. The interior sweeps run with
# the tap groups outside and the rows inside, so that the per-group set-up is
# paid once per plane, not once per row; the border columns are swept down
# the plane one (tap, column) at a time for the same reason. Only columns in
# [v_lo, v_hi) reach the border loops, so every column index there is >= 0.


cdef inline void column_axpy(floating *yp, const floating *xp, floating wv, const ConvGeom *g,
                             const Tables *t, Py_ssize_t kh, Py_ssize_t ow,
                             Py_ssize_t iw) noexcept nogil:
    """yp[oh, ow] += wv * xp[row_src[oh, kh], iw] for every output row oh (forward border)."""
    cdef Py_ssize_t oh, ih
    cdef Py_ssize_t step = g.stride_h * g.W, first = t.oh_lo * g.stride_h - g.pad_top
    for oh in range(t.oh_lo):
        ih = t.row_src[oh * g.KH + kh]
        if ih >= 0:
            yp[oh * g.OW + ow] += wv * xp[ih * g.W + iw]
    for oh in range(t.oh_lo, t.oh_hi):
        yp[oh * g.OW + ow] += wv * xp[(first + kh * g.dilation_h) * g.W + iw
                                      + (oh - t.oh_lo) * step]
    for oh in range(t.oh_hi, g.OH):
        ih = t.row_src[oh * g.KH + kh]
        if ih >= 0:
            yp[oh * g.OW + ow] += wv * xp[ih * g.W + iw]


cdef inline void column_scatter(floating *dxp, const floating *gp, floating wv,
                                const ConvGeom *g, const Tables *t, Py_ssize_t kh,
                                Py_ssize_t ow, Py_ssize_t iw) noexcept nogil:
    """dxp[row_src[oh, kh], iw] += wv * gp[oh, ow] for every output row oh (grad_input border)."""
    cdef Py_ssize_t oh, ih
    cdef Py_ssize_t step = g.stride_h * g.W, first = t.oh_lo * g.stride_h - g.pad_top
    for oh in range(t.oh_lo):
        ih = t.row_src[oh * g.KH + kh]
        if ih >= 0:
            dxp[ih * g.W + iw] += wv * gp[oh * g.OW + ow]
    for oh in range(t.oh_lo, t.oh_hi):
        dxp[(first + kh * g.dilation_h) * g.W + iw + (oh - t.oh_lo) * step] += (
            wv * gp[oh * g.OW + ow])
    for oh in range(t.oh_hi, g.OH):
        ih = t.row_src[oh * g.KH + kh]
        if ih >= 0:
            dxp[ih * g.W + iw] += wv * gp[oh * g.OW + ow]


cdef inline floating column_dot(const floating *dyp, const floating *xp, const ConvGeom *g,
                                const Tables *t, Py_ssize_t kh, Py_ssize_t ow,
                                Py_ssize_t iw) noexcept nogil:
    """sum over output rows oh of dyp[oh, ow] * xp[row_src[oh, kh], iw] (grad_weight border).

    The interior rows in four running sums, added at the end: one sum was a chain of
    dependent adds down the column (mobilenet-dw's backward 1.04x faster at 1 and 2 threads)."""
    cdef Py_ssize_t oh, ih
    cdef Py_ssize_t step = g.stride_h * g.W, first = t.oh_lo * g.stride_h - g.pad_top
    cdef floating total = 0, s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef const floating *d
    cdef const floating *v
    for oh in range(t.oh_lo):
        ih = t.row_src[oh * g.KH + kh]
        if ih >= 0:
            total += dyp[oh * g.OW + ow] * xp[ih * g.W + iw]
    d = dyp + t.oh_lo * g.OW + ow
    v = xp + (first + kh * g.dilation_h) * g.W + iw
    oh = t.oh_lo
    while oh + 4 <= t.oh_hi:
        s0 += d[0] * v[0]
        s1 += d[g.OW] * v[step]
        s2 += d[2 * g.OW] * v[2 * step]
        s3 += d[3 * g.OW] * v[3 * step]
        d += 4 * g.OW
        v += 4 * step
        oh = oh + 4
    while oh < t.oh_hi:
        s0 += d[0] * v[0]
        d += g.OW
        v += step
        oh = oh + 1
    total += (s0 + s1) + (s2 + s3)
    for oh in range(t.oh_hi, g.OH):
        ih = t.row_src[oh * g.KH + kh]
        if ih >= 0:
            total += dyp[oh * g.OW + ow] * xp[ih * g.W + iw]
    return total


cdef inline void interior_axpy(floating *out, Py_ssize_t nr, Py_ssize_t nc,
                               const floating **rows, const floating *wk, Py_ssize_t ldw,
                               Py_ssize_t base, Py_ssize_t dil, Py_ssize_t stride,
                               Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """An nr x nc group of taps (weights wk, row stride ldw) over out[lo:hi] (forward):
    one :func:`block_axpy` for a full 3x3 group, else one :func:`rows_axpy` per column."""
    cdef Py_ssize_t c
    if nr == 3 and nc == 3 and stride <= 2:
        block_axpy(out, rows[0], rows[1], rows[2], wk, ldw, base, dil, stride, lo, hi)
    else:
        for c in range(nc):
            rows_axpy(out, nr, rows[0], rows[1], rows[2], wk[c],
                      wk[ldw + c] if nr > 1 else 0, wk[2 * ldw + c] if nr > 2 else 0,
                      base + c * dil, stride, lo, hi)


cdef void forward_plane(const floating *xp, const floating *zero_row, const floating *wk,
                        floating b, const ConvGeom *g, const Tables *t,
                        floating *yp) noexcept nogil:
    """yp = b + sum over taps of wk[kh, kw] * (xp shifted by the tap).

    # IN  xp: one input plane (H, W); wk: the filter's KH*KW taps
    # OUT yp: one output plane (OH, OW), every element written
    """
    cdef Py_ssize_t p, oh, ow, kh, kw, r, nr, nc, lo, hi
    cdef Py_ssize_t ow_lo = t.ow_lo, ow_hi = t.ow_hi
    cdef Py_ssize_t p0 = t.oh_lo * g.OW + ow_lo, p1 = (t.oh_hi - 1) * g.OW + ow_hi
    cdef bint flat = t.flat and t.oh_lo < t.oh_hi
    # a 3x3 dilation-1 filter: the flat interval in one sweep that writes b + sum, two
    # rows at a time (mobilenet-dw's forward 1.01-1.07x at 1 and 2 threads)
    cdef bint flat_set = (flat and g.KH == 3 and g.KW == 3 and g.dilation_h == 1
                          and g.dilation_w == 1)
    cdef const floating *rows[ROWS]
    cdef floating *out
    cdef floating wv
    if flat_set:
        for p in range(p0):
            yp[p] = b
        for p in range(p1, g.OH * g.OW):
            yp[p] = b
    else:
        for p in range(g.OH * g.OW):
            yp[p] = b
    kh = 0
    while kh < g.KH:
        nr = min(<Py_ssize_t> ROWS, g.KH - kh)
        kw = 0
        while kw < g.KW:
            nc = min(<Py_ssize_t> 3, g.KW - kw)
            for oh in range(g.OH):
                if flat and t.oh_lo <= oh < t.oh_hi:
                    continue
                if input_rows(xp, zero_row, g, t, oh, kh, nr, rows):
                    interior_axpy(yp + oh * g.OW, nr, nc, rows, wk + kh * g.KW + kw, g.KW,
                                  kw * g.dilation_w - g.pad_left, g.dilation_w, g.stride_w,
                                  ow_lo, ow_hi)
            if flat_set:
                block_set_flat(yp, g.W, xp - g.pad_left - g.pad_top * g.W, wk, g.KW, p0, p1,
                               b)
            elif flat:
                # output index p = oh*OW + ow reads kernel row kh + r's input index
                # p + ((kh + r)*dilation_h - pad_top)*W + kw*dilation_w - pad_left
                for r in range(ROWS):
                    rows[r] = xp + (kh + min(r, nr - 1)) * g.dilation_h * g.W
                interior_axpy(yp, nr, nc, rows, wk + kh * g.KW + kw, g.KW,
                              kw * g.dilation_w - g.pad_left - g.pad_top * g.W,
                              g.dilation_w, 1, p0, p1)
            kw = kw + nc
        kh = kh + nr
    if flat:
        for oh in range(t.oh_lo, t.oh_hi):
            out = yp + oh * g.OW
            for ow in range(ow_lo):
                out[ow] = b
            for ow in range(ow_hi, g.OW):
                out[ow] = b
    for kh in range(g.KH):
        for kw in range(g.KW):
            wv = wk[kh * g.KW + kw]
            lo = t.v_lo[kw]
            hi = t.v_hi[kw]
            for ow in range(lo, min(hi, ow_lo)):
                column_axpy(yp, xp, wv, g, t, kh, ow, t.col_src[kw * g.OW + ow])
            for ow in range(max(lo, ow_hi), hi):
                column_axpy(yp, xp, wv, g, t, kh, ow, t.col_src[kw * g.OW + ow])


cdef void backward_input_plane(const floating *dyp, const floating *wk, const ConvGeom *g,
                               const Tables *t, Py_ssize_t m, floating *dxp) noexcept nogil:
    """dxp = sum over the m filters of channel c of the adjoint of their forward sweeps.

    The interior one input-gradient row at a time, from the grad_output rows
    that reach it (``t.in_start``/``t.out_oh``/``t.out_kh``, up to 3 at a
    time), in blocks as in :func:`forward_plane` (3x3 blocks for stride 1
    only: for larger strides a block's kernel columns write different input
    columns); then the border columns scattered back through the tables.

    # IN  dyp: the m consecutive grad_output planes (m, OH, OW) of channel c's filters;
    #     wk: their taps (m, KH*KW)
    # OUT dxp: one input-gradient plane (H, W), every element written
    """
    cdef Py_ssize_t P = g.OH * g.OW, KK = g.KH * g.KW
    cdef Py_ssize_t j, ih, ow, kh, kw, c, e, e0, e1, ne, nc, k0, k1, k2, base, iw
    cdef const floating *gp
    cdef const floating *wj
    cdef const floating *g0
    cdef const floating *g1
    cdef const floating *g2
    cdef floating *row
    cdef floating wb[9]
    cdef floating w1, w2, wv
    cdef bint blocks = g.stride_w == 1
    cdef bint flat = t.flat and t.bw_lo < t.bw_hi
    cdef Py_ssize_t q0 = t.bw_lo * g.W + t.iw_lo, q1 = (t.bw_hi - 1) * g.W + t.iw_hi
    cdef Py_ssize_t shift = ((g.KH - 1) * g.dilation_h - g.pad_top) * g.OW
    # one 3x3 dilation-1 filter: the flat interval written in one sweep, not zeroed and
    # added to, two rows at a time (mobilenet-dw's backward 1.04-1.06x, 1 and 2 threads)
    cdef bint flat_set = (flat and m == 1 and g.KH == 3 and g.KW == 3
                          and g.dilation_h == 1 and g.dilation_w == 1)
    if flat_set:
        memset(dxp, 0, q0 * sizeof(floating))
        memset(dxp + q1, 0, (g.H * g.W - q1) * sizeof(floating))
    else:
        memset(dxp, 0, g.H * g.W * sizeof(floating))
    for ih in range(g.H):
        if flat and t.bw_lo <= ih < t.bw_hi:
            continue
        row = dxp + ih * g.W
        e0 = t.in_start[ih]
        e1 = t.in_start[ih + 1]
        for j in range(m):
            gp = dyp + j * P
            wj = wk + j * KK
            e = e0
            while e < e1:
                ne = min(<Py_ssize_t> ROWS, e1 - e)
                k0 = t.out_kh[e]
                k1 = t.out_kh[e + 1] if ne > 1 else k0
                k2 = t.out_kh[e + 2] if ne > 2 else k0
                g0 = gp + t.out_oh[e] * g.OW
                g1 = gp + t.out_oh[e + 1] * g.OW if ne > 1 else g0
                g2 = gp + t.out_oh[e + 2] * g.OW if ne > 2 else g0
                kw = 0
                while kw < g.KW:
                    nc = min(<Py_ssize_t> 3, g.KW - kw)
                    if ne == 3 and nc == 3 and blocks:
                        for c in range(3):
                            wb[c] = wj[k0 * g.KW + kw + c]
                            wb[3 + c] = wj[k1 * g.KW + kw + c]
                            wb[6 + c] = wj[k2 * g.KW + kw + c]
                        # stride 1: the interiors of the block's columns are one
                        # interval of input columns
                        base = kw * g.dilation_w - g.pad_left
                        block_gather(row, g0, g1, g2, wb, base, g.dilation_w,
                                     t.gi_lo[kw] + base, t.gi_hi[kw] + base)
                    else:
                        for c in range(kw, kw + nc):
                            w1 = wj[k1 * g.KW + c] if ne > 1 else 0
                            w2 = wj[k2 * g.KW + c] if ne > 2 else 0
                            rows_gather(row, ne, g0, g1, g2, wj[k0 * g.KW + c], w1, w2,
                                        c * g.dilation_w - g.pad_left, g.stride_w,
                                        t.gi_lo[c], t.gi_hi[c])
                    kw = kw + nc
                e = e + ne
    if flat_set:
        # the flat sweep below with its one block: g_r = dyp + (2 - r)*OW, base = shift -
        # pad_left
        block_gather_set_flat(dxp, g.W, dyp + 2 * g.OW - (shift - g.pad_left), wk, q0, q1)
    elif flat:
        # input index q = ih*W + iw gets kernel tap (kh, kw) from grad_output index
        # q + (pad_top - kh*dilation_h)*OW + pad_left - kw*dilation_w; g_r is the
        # grad_output plane shifted so that offset is never negative
        for j in range(m):
            gp = dyp + j * P
            wj = wk + j * KK
            kh = 0
            while kh < g.KH:
                ne = min(<Py_ssize_t> ROWS, g.KH - kh)
                g0 = gp + (g.KH - 1 - kh) * g.dilation_h * g.OW
                g1 = gp + (g.KH - 2 - kh) * g.dilation_h * g.OW if ne > 1 else g0
                g2 = gp + (g.KH - 3 - kh) * g.dilation_h * g.OW if ne > 2 else g0
                kw = 0
                while kw < g.KW:
                    nc = min(<Py_ssize_t> 3, g.KW - kw)
                    base = kw * g.dilation_w - g.pad_left + shift
                    if ne == 3 and nc == 3:
                        for c in range(3):
                            wb[c] = wj[kh * g.KW + kw + c]
                            wb[3 + c] = wj[(kh + 1) * g.KW + kw + c]
                            wb[6 + c] = wj[(kh + 2) * g.KW + kw + c]
                        block_gather(dxp, g0, g1, g2, wb, base, g.dilation_w, q0, q1)
                    else:
                        for c in range(nc):
                            w1 = wj[(kh + 1) * g.KW + kw + c] if ne > 1 else 0
                            w2 = wj[(kh + 2) * g.KW + kw + c] if ne > 2 else 0
                            rows_gather(dxp, ne, g0, g1, g2, wj[kh * g.KW + kw + c], w1, w2,
                                        base + c * g.dilation_w, 1,
                                        q0 - base - c * g.dilation_w,
                                        q1 - base - c * g.dilation_w)
                    kw = kw + nc
                kh = kh + ne
    if flat:
        for ih in range(t.bw_lo, t.bw_hi):
            row = dxp + ih * g.W
            for iw in range(t.iw_lo):
                row[iw] = 0
            for iw in range(t.iw_hi, g.W):
                row[iw] = 0
    for j in range(m):
        gp = dyp + j * P
        wj = wk + j * KK
        for kh in range(g.KH):
            for kw in range(g.KW):
                wv = wj[kh * g.KW + kw]
                for ow in range(t.v_lo[kw], t.gi_lo[kw]):
                    column_scatter(dxp, gp, wv, g, t, kh, ow, t.col_src[kw * g.OW + ow])
                for ow in range(t.gi_hi[kw], t.v_hi[kw]):
                    column_scatter(dxp, gp, wv, g, t, kh, ow, t.col_src[kw * g.OW + ow])


cdef void backward_weight_plane(const floating *xp, const floating *zero_row,
                                const floating *dyp, const ConvGeom *g, const Tables *t,
                                floating *sums) noexcept nogil:
    """sums[kh*KW + kw] += <dyp, xp seen through tap (kh, kw)>; sums[KH*KW] += sum of dyp.

    Per block of taps (as in :func:`forward_plane`) and chunk of interior
    columns, every output row adds into one column-wise accumulator row per
    tap; the rows are summed once at the end. Then the border columns.

    # IN  xp: one input plane (H, W); dyp: one grad_output plane (OH, OW)
    # OUT sums: KH*KW + 1 running totals, accumulated into
    """
    cdef floating acc[9 * CHUNK]
    cdef Py_ssize_t oh, ow, kh, kw, r, c, j, nr, nc, c0, n, lo, hi, base
    cdef Py_ssize_t ow_lo = t.ow_lo, ow_hi = t.ow_hi
    cdef const floating *rows[ROWS]
    cdef const floating *next_rows[ROWS]
    cdef const floating *grad
    cdef floating total
    cdef bint full, pairs, inside
    # grad_bias: the plane summed column-wise, CHUNK at a time, then folded
    memset(acc, 0, CHUNK * sizeof(floating))
    for n in range(g.OH * g.OW // CHUNK):
        for j in range(CHUNK):
            acc[j] += dyp[n * CHUNK + j]
    c0 = g.OH * g.OW // CHUNK * CHUNK
    for j in range(g.OH * g.OW - c0):
        acc[j] += dyp[c0 + j]
    sums[g.KH * g.KW] += fold_sum(acc)
    kh = 0
    while kh < g.KH:
        nr = min(<Py_ssize_t> ROWS, g.KH - kh)
        kw = 0
        while kw < g.KW:
            nc = min(<Py_ssize_t> 3, g.KW - kw)
            full = nr == 3 and nc == 3 and g.stride_w <= 2
            pairs = full and g.stride_w == 1 and g.dilation_w == 1
            c0 = ow_lo
            while c0 < ow_hi:
                n = min(<Py_ssize_t> CHUNK, ow_hi - c0)
                memset(acc, 0, 9 * CHUNK * sizeof(floating))
                base = kw * g.dilation_w - g.pad_left + c0 * g.stride_w
                oh = 0
                while pairs and oh + 1 < g.OH:
                    # rows all padding read zero_row: they add zeros
                    inside = input_rows(xp, zero_row, g, t, oh, kh, nr, rows)
                    if input_rows(xp, zero_row, g, t, oh + 1, kh, nr, next_rows) or inside:
                        if (rows[1] == rows[0] + g.W and rows[2] == rows[1] + g.W
                                and next_rows[0] == rows[1] and next_rows[1] == rows[2]
                                and next_rows[2] == rows[2] + g.W):
                            block_acc2_rows(acc, dyp + oh * g.OW + c0,
                                            dyp + (oh + 1) * g.OW + c0, rows[0], g.W, base, n)
                        else:
                            block_acc2(acc, dyp + oh * g.OW + c0, dyp + (oh + 1) * g.OW + c0,
                                       rows[0], rows[1], rows[2], next_rows[0], next_rows[1],
                                       next_rows[2], base, n)
                    oh = oh + 2
                while oh < g.OH:
                    if not input_rows(xp, zero_row, g, t, oh, kh, nr, rows):
                        oh = oh + 1
                        continue
                    grad = dyp + oh * g.OW + c0
                    oh = oh + 1
                    if full:
                        block_acc(acc, grad, rows[0], rows[1], rows[2], base, g.dilation_w,
                                  g.stride_w, n)
                    else:
                        for r in range(nr):
                            for c in range(nc):
                                tap_acc(acc + (3 * r + c) * CHUNK, grad, rows[r],
                                        base + c * g.dilation_w, g.stride_w, n)
                for r in range(nr):
                    for c in range(nc):
                        # acc is zero past n (the memset), so the whole row folds
                        sums[(kh + r) * g.KW + kw + c] += fold_sum(acc + (3 * r + c) * CHUNK)
                c0 = c0 + n
            kw = kw + nc
        kh = kh + nr
    for kh in range(g.KH):
        for kw in range(g.KW):
            lo = t.v_lo[kw]
            hi = t.v_hi[kw]
            total = 0
            for ow in range(lo, min(hi, ow_lo)):
                total += column_dot(dyp, xp, g, t, kh, ow, t.col_src[kw * g.OW + ow])
            for ow in range(max(lo, ow_hi), hi):
                total += column_dot(dyp, xp, g, t, kh, ow, t.col_src[kw * g.OW + ow])
            sums[kh * g.KW + kw] += total


# ---------------------------------------------------------------------------
# Drivers.


cdef extern from *:
    """
    /* Whether the CPU runs x86-64-v3 (AVX2, FMA, BMI1/2, ...): the test GCC's ifunc
       resolver makes for FC_TARGET's clones. */
    static int fc_cpu_runs_x86_64_v3(void)
    {
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
        __builtin_cpu_init();
        return __builtin_cpu_supports("x86-64-v3");
    #else
        return 0;
    #endif
    }
    """
    int fc_cpu_runs_x86_64_v3() nogil


def cpu_runs_x86_64_v3():
    """Whether this CPU can run the x86-64-v3 build of these kernels (fastconv._depthwise_avx2)."""
    return bool(fc_cpu_runs_x86_64_v3())


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
    # what zero-padding rows read: the sweeps then need no special rows
    cdef const floating[::1] zero_row = np.zeros(
        g.W, dtype=np.float32 if floating is float else np.float64)
    if N == 0:
        return
    # consecutive items of an image share their input plane when m > 1
    for item in prange(N * F, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // F
        f = item - n * F
        b = bias[f] if has_bias else 0
        forward_plane(&x[n, f // m, 0, 0], &zero_row[0], &w[f, 0], b, &g, &tables.t,
                      &y[n, f, 0, 0])


def backward(const floating[:, :, :, ::1] x, const floating[:, ::1] w,
             const floating[:, :, :, ::1] dy, floating[:, :, :, ::1] dx,
             floating[:, ::1] dw, floating[::1] db, object geometry, int n_threads):
    """dx, dw and db of a depthwise layer in one pass over the planes.

    dx[n, c] = sum over f in [c*m, (c+1)*m) of conv_transpose(dy[n, f], w[f]);
    dw[f, (kh, kw)] = sum over (n, oh, ow) of dy[n, f] * x[n, f // m] seen through tap
    (kh, kw); db[f] = sum over (n, oh, ow) of dy[n, f].

    A work item is an input plane (n, c): its dx plane from the channel's m dY planes,
    then those filters' weight sums from x[n, c] and the same dY planes while they are
    still in cache (a pass for each read dY from memory twice: mobilenet-dw's backward
    1.2x faster fused). The N*C items are cut into T = min(n_threads, N*C) contiguous
    chunks; chunk t writes its dx planes (no two chunks share one) and sums into row t
    of a (T, F*(KH*KW + 1)) scratch (independent of N), and the rows are added in chunk
    order, so the result depends on n_threads but not on which thread ran which chunk.

    # IN  x: (N, C, H, W); w: (F, KH*KW) with F = m*C; dy: (N, F, OH, OW)
    # OUT dx: (N, C, H, W), every element written; dw: (F, KH*KW), overwritten;
    #     db: (F,) or None, overwritten
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef _Tables tables = _Tables(geometry)
    cdef Py_ssize_t N = x.shape[0], F = dw.shape[0], C = g.C
    cdef Py_ssize_t KK1 = g.KH * g.KW + 1
    cdef Py_ssize_t m = F // C
    cdef Py_ssize_t items = N * C
    cdef Py_ssize_t T = max(1, min(<Py_ssize_t> n_threads, items))
    cdef bint has_bias = db is not None
    dtype = np.float32 if floating is float else np.float64
    cdef const floating[::1] zero_row = np.zeros(g.W, dtype=dtype)
    # partial[t, f*KK1 + k]: chunk t's total for tap k (k == KK1 - 1: the bias) of filter f
    cdef floating[:, ::1] partial = np.zeros((T, F * KK1), dtype=dtype)
    cdef Py_ssize_t chunk, item, n, c, f, j, k, s
    cdef floating total
    for chunk in prange(T, nogil=True, num_threads=n_threads, schedule="static", chunksize=1):
        for item in range(chunk * items // T, (chunk + 1) * items // T):
            n = item // C
            c = item - n * C
            backward_input_plane(&dy[n, c * m, 0, 0], &w[c * m, 0], &g, &tables.t, m,
                                 &dx[n, c, 0, 0])
            for j in range(m):
                f = c * m + j
                backward_weight_plane(&x[n, c, 0, 0], &zero_row[0], &dy[n, f, 0, 0], &g,
                                      &tables.t, &partial[chunk, f * KK1])
    for f in prange(F, nogil=True, num_threads=n_threads, schedule="static"):
        for k in range(KK1):
            total = 0
            for s in range(T):
                total = total + partial[s, f * KK1 + k]
            if k < KK1 - 1:
                dw[f, k] = total
            elif has_bias:
                db[f] = total
