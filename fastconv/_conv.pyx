"""Convolution drivers: OpenMP over work items, per-thread workspaces, BLAS gemm.

Work items are (image, column tile) for everything that reads columns
(forward, grad_weight) and (image, channel block) for grad_x, whose col2im
scatter must not race: channel c's rows of the column matrix only write plane
c. The tile plan (``tile_p``, ``c_block``) comes from ``fastconv._tiling``; the
workspaces come from ``fastconv._workspace`` and never depend on the batch.
BLAS must be single-threaded while these run (``fastconv._threads``).

Every array argument has been validated, cast and made contiguous by
``fastconv._functional``.
"""

cimport openmp
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.string cimport memset

from fastconv._blas cimport gemm_rm
from fastconv._im2col cimport ConvGeom, col2im_tile_add, im2col_tile, make_geom


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


def forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w2d,
            const floating[::1] bias, floating[:, :, ::1] y,
            floating[::1] workspace, object geometry, Py_ssize_t tile_p, int n_threads):
    """y[n] = w2d @ im2col(x[n]) (+ bias), one column tile at a time.

    # IN  x: (N, C, H, W); w2d: (F, C*KH*KW); bias: (F,) or None
    # OUT y: (N, F, OH*OW)
    # workspace: n_threads * K * tile_p elements (unused for pointwise convs)
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef bint pointwise = geometry.is_pointwise
    cdef bint has_bias = bias is not None
    cdef Py_ssize_t N = x.shape[0], F = w2d.shape[0], K = w2d.shape[1]
    cdef Py_ssize_t P = g.OH * g.OW
    cdef Py_ssize_t n_tiles = ceil_div(P, tile_p)
    cdef Py_ssize_t item, n, p0, p1, f, p, tid
    cdef const floating *cols
    cdef floating *out
    cdef floating beta
    cdef int ldcol
    if N == 0:
        return
    for item in prange(N * n_tiles, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // n_tiles
        p0 = (item - n * n_tiles) * tile_p
        p1 = min(p0 + tile_p, P)
        tid = openmp.omp_get_thread_num()
        if pointwise:
            # the input plane (C x P) already is the column matrix
            cols = &x[n, 0, 0, 0] + p0
            ldcol = <int> P
        else:
            im2col_tile(&x[n, 0, 0, 0], &g, 0, g.C, p0, p1, &workspace[tid * K * tile_p])
            cols = &workspace[tid * K * tile_p]
            ldcol = <int> (p1 - p0)
        out = &y[n, 0, p0]
        beta = 0
        if has_bias:
            beta = 1
            for f in range(F):
                for p in range(p1 - p0):
                    out[f * P + p] = bias[f]
        gemm_rm(False, False, <int> F, <int> (p1 - p0), <int> K,
                1, &w2d[0, 0], <int> K, cols, ldcol, beta, out, <int> P)


def backward_weight(const floating[:, :, :, ::1] x, const floating[:, :, ::1] dy,
                    floating[:, ::1] partial, floating[::1] workspace, object geometry,
                    Py_ssize_t tile_p, int n_threads, bint with_bias):
    """Per-thread partial sums of grad_weight (and grad_bias), to be reduced by :func:`reduce_rows`.

    partial[t, :F*K] += dy[n][:, tile] @ im2col(x[n])[:, tile].T and
    partial[t, F*K:] += dy[n][:, tile].sum(axis=1) over the items of thread t.

    # IN  x: (N, C, H, W); dy: (N, F, OH*OW)
    # OUT partial: (n_threads, F*K + F), zeroed here
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef bint pointwise = geometry.is_pointwise
    cdef Py_ssize_t N = x.shape[0], F = dy.shape[1]
    cdef Py_ssize_t K = g.C * g.KH * g.KW
    cdef Py_ssize_t P = g.OH * g.OW
    cdef Py_ssize_t n_tiles = ceil_div(P, tile_p)
    cdef Py_ssize_t item, n, p0, p1, f, p, tid
    cdef const floating *cols
    cdef const floating *grad
    cdef floating *acc
    cdef floating total
    cdef int ldcol
    memset(&partial[0, 0], 0, partial.shape[0] * partial.shape[1] * sizeof(floating))
    if N == 0:
        return
    for item in prange(N * n_tiles, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // n_tiles
        p0 = (item - n * n_tiles) * tile_p
        p1 = min(p0 + tile_p, P)
        tid = openmp.omp_get_thread_num()
        if pointwise:
            cols = &x[n, 0, 0, 0] + p0
            ldcol = <int> P
        else:
            im2col_tile(&x[n, 0, 0, 0], &g, 0, g.C, p0, p1, &workspace[tid * K * tile_p])
            cols = &workspace[tid * K * tile_p]
            ldcol = <int> (p1 - p0)
        grad = &dy[n, 0, p0]
        acc = &partial[tid, 0]
        gemm_rm(False, True, <int> F, <int> K, <int> (p1 - p0),
                1, grad, <int> P, cols, ldcol, 1, acc, <int> K)
        if with_bias:
            for f in range(F):
                total = 0
                for p in range(p1 - p0):
                    total = total + grad[f * P + p]
                acc[F * K + f] = acc[F * K + f] + total


def backward_input(const floating[:, ::1] w2d, const floating[:, :, ::1] dy,
                   floating[:, :, :, ::1] dx, floating[::1] workspace, object geometry,
                   Py_ssize_t tile_p, Py_ssize_t c_block, int n_threads):
    """dx[n] = col2im(w2d.T @ dy[n]), one (image, channel block) per work item.

    # IN  w2d: (F, C*KH*KW); dy: (N, F, OH*OW)
    # OUT dx: (N, C, H, W), every element written
    # workspace: n_threads * (c_block*KH*KW) * tile_p elements (unused for pointwise convs)
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef bint pointwise = geometry.is_pointwise
    cdef Py_ssize_t N = dx.shape[0], F = w2d.shape[0], K = w2d.shape[1]
    cdef Py_ssize_t KK = g.KH * g.KW
    cdef Py_ssize_t P = g.OH * g.OW
    cdef Py_ssize_t plane_size = g.H * g.W
    cdef Py_ssize_t n_blocks = ceil_div(g.C, c_block)
    cdef Py_ssize_t n_tiles = ceil_div(P, tile_p)
    cdef Py_ssize_t ws_per_thread = c_block * KK * tile_p
    cdef Py_ssize_t item, n, c0, c1, t, p0, p1, tid
    cdef floating *image
    cdef floating *dcol
    if N == 0:
        return
    for item in prange(N * n_blocks, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // n_blocks
        c0 = (item - n * n_blocks) * c_block
        c1 = min(c0 + c_block, g.C)
        tid = openmp.omp_get_thread_num()
        image = &dx[n, 0, 0, 0]
        if pointwise:
            for t in range(n_tiles):
                p0 = t * tile_p
                p1 = min(p0 + tile_p, P)
                gemm_rm(True, False, <int> (c1 - c0), <int> (p1 - p0), <int> F,
                        1, &w2d[0, c0], <int> K, &dy[n, 0, p0], <int> P,
                        0, image + c0 * P + p0, <int> P)
        else:
            dcol = &workspace[tid * ws_per_thread]
            memset(image + c0 * plane_size, 0, (c1 - c0) * plane_size * sizeof(floating))
            for t in range(n_tiles):
                p0 = t * tile_p
                p1 = min(p0 + tile_p, P)
                gemm_rm(True, False, <int> ((c1 - c0) * KK), <int> (p1 - p0), <int> F,
                        1, &w2d[0, c0 * KK], <int> K, &dy[n, 0, p0], <int> P,
                        0, dcol, <int> (p1 - p0))
                col2im_tile_add(dcol, &g, c0, c1, p0, p1, image)


def reduce_rows(const floating[:, ::1] partial, floating[::1] out, int n_threads):
    """out[i] = sum over t of partial[t, i] (the per-thread grad_weight/grad_bias sums).

    # IN  partial: (T, M)
    # OUT out: (M,)
    """
    cdef Py_ssize_t T = partial.shape[0], M = partial.shape[1]
    cdef Py_ssize_t i, t
    cdef floating total
    for i in prange(M, nogil=True, num_threads=n_threads, schedule="static"):
        total = 0
        for t in range(T):
            total = total + partial[t, i]
        out[i] = total
