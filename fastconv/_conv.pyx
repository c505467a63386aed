"""Convolution drivers: OpenMP over work items, per-thread workspaces, BLAS gemm.

A *column tile* is either a group of whole images (``images_per_tile > 1``,
small planes: one gemm then has enough columns to run at full speed) or a
range of output columns ``[p0, p1)`` of one image (large planes, and N = 1
inference, where cutting images keeps every thread busy).

* forward and grad_weight run one work item per column tile;
* grad_x runs one item per image group, or per (image, channel block) when
  images are cut: col2im scatters into overlapping pixels, so two threads must
  never share an image's plane, and channel c's rows only write plane c.

The tile plan comes from ``fastconv._tiling``, the workspaces from
``fastconv._workspace``; neither depends on the batch size. BLAS must be
single-threaded while these run (``fastconv._threads``). Every array argument
has been validated, cast and made contiguous by ``fastconv._functional``.

BLAS takes 32-bit dimensions (the limit is ``fastconv._tiling.BLAS_INT_MAX``,
read at every call so tests can lower it). ``gemm_rm`` cuts F, the tile's
columns and the reductions into pieces within it; what it cannot cut is a
leading dimension. The weight's rows (C/groups*KH*KW, checked in
``fastconv._functional``) and a tile's columns (the plan keeps them within
the limit) always fit; an output plane's P = OH*OW may not, and then its
tiles are staged through the workspace like image groups (``staged``), and
the pointwise shortcuts (x, dy or dx planes handed to BLAS in place) are off.
"""

cimport openmp
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy, memset

from fastconv import _tiling
from fastconv._blas cimport gemm_nn, gemm_nt, gemm_rm
from fastconv._im2col cimport ConvGeom, col2im_tile_add, im2col_tile, make_geom


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef struct Tile:
    Py_ssize_t n0, n1      # images [n0, n1)
    Py_ssize_t p0, p1      # output columns [p0, p1) of each image
    Py_ssize_t width       # p1 - p0
    Py_ssize_t total       # (n1 - n0) * width: the tile's column count


cdef inline Tile tile_of(Py_ssize_t item, Py_ssize_t N, Py_ssize_t P, Py_ssize_t images_per_tile,
                         Py_ssize_t tile_p) noexcept nogil:
    cdef Tile t
    cdef Py_ssize_t tiles_per_image = ceil_div(P, tile_p)
    cdef Py_ssize_t group = item // tiles_per_image
    t.n0 = group * images_per_tile
    t.n1 = min(t.n0 + images_per_tile, N)
    t.p0 = (item - group * tiles_per_image) * tile_p
    t.p1 = min(t.p0 + tile_p, P)
    t.width = t.p1 - t.p0
    t.total = (t.n1 - t.n0) * t.width
    return t


cdef inline Py_ssize_t n_tiles(Py_ssize_t N, Py_ssize_t P, Py_ssize_t images_per_tile,
                               Py_ssize_t tile_p) noexcept nogil:
    return ceil_div(N, images_per_tile) * ceil_div(P, tile_p)


cdef void tile_columns(const floating *x, const ConvGeom *g, const Tile *t,
                       floating *col) noexcept nogil:
    """The tile's column matrix (K x total): the images' column blocks side by side."""
    cdef Py_ssize_t j, image_size = g.C * g.H * g.W
    for j in range(t.n1 - t.n0):
        im2col_tile(x + (t.n0 + j) * image_size, g, 0, g.C, t.p0, t.p1,
                    col + j * t.width, t.total)


cdef void gather_planes(const floating *src, Py_ssize_t F, Py_ssize_t P, const Tile *t,
                        floating *dst) noexcept nogil:
    """dst[f, j*width + q] = src[n0 + j, f, p0 + q]: an (N, F, P) tile as one F x total matrix."""
    cdef Py_ssize_t j, f
    for j in range(t.n1 - t.n0):
        for f in range(F):
            memcpy(dst + f * t.total + j * t.width, src + ((t.n0 + j) * F + f) * P + t.p0,
                   t.width * sizeof(floating))


cdef inline void copy_rows(const floating *src, Py_ssize_t ld, Py_ssize_t rows,
                           Py_ssize_t width, floating *dst) noexcept nogil:
    """dst (rows x width, contiguous) = the rows x width block of src with row stride ld."""
    cdef Py_ssize_t r
    for r in range(rows):
        memcpy(dst + r * width, src + r * ld, width * sizeof(floating))


cdef inline void epilogue_row(const floating *src, floating *dst, Py_ssize_t n,
                              const floating *bias, bint relu) noexcept nogil:
    """dst[q] = act(src[q] + bias[0]) for q < n: no bias when ``bias`` is NULL, act the
    ReLU when ``relu`` (src may be dst).

    ``0 if v <= 0 else v`` is fastconv.relu's rule: NaN stays NaN, -0 becomes 0.
    """
    cdef Py_ssize_t q
    cdef floating v, b = 0 if bias == NULL else bias[0]
    if relu:
        for q in range(n):
            v = src[q] + b
            dst[q] = 0 if v <= 0 else v
    elif bias != NULL:
        for q in range(n):
            dst[q] = src[q] + b
    elif src != dst:
        memcpy(dst, src, n * sizeof(floating))


cdef void scatter_planes(const floating *src, Py_ssize_t F, Py_ssize_t P, const Tile *t,
                         const floating *bias, bint relu, floating *dst) noexcept nogil:
    """The inverse of :func:`gather_planes`, adding ``bias[f]`` on the way (if not NULL)
    and applying the ReLU (if ``relu``)."""
    cdef Py_ssize_t j, f
    for j in range(t.n1 - t.n0):
        for f in range(F):
            epilogue_row(src + f * t.total + j * t.width,
                         dst + ((t.n0 + j) * F + f) * P + t.p0, t.width,
                         NULL if bias == NULL else bias + f, relu)


def forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w2d,
            const floating[::1] bias, floating[:, :, ::1] y,
            floating[::1] workspace, object geometry, Py_ssize_t images_per_tile,
            Py_ssize_t tile_p, int n_threads, bint relu=False):
    """y[n] = act(w2d @ im2col(x[n]) + bias), one column tile per work item.

    With groups, group gi's filters (a row block of w2d) multiply group gi's
    channels (a row block of the same column tile): one gemm per group. The
    bias and the ReLU (``relu``) are applied to each tile's output rows right
    after its gemm, while they are in cache.

    # IN  x: (N, C, H, W); w2d: (F, C/groups*KH*KW); bias: (F,) or None
    # OUT y: (N, F, OH*OW)
    # workspace: n_threads * workspace_per_thread(...) elements
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef const floating *bias_ptr = NULL
    cdef Py_ssize_t N = x.shape[0], F = w2d.shape[0], Kg = w2d.shape[1]
    cdef Py_ssize_t Fg = F // g.groups, K = Kg * g.groups
    cdef Py_ssize_t P = g.OH * g.OW
    # planes wider than BLAS's leading dimensions go through the staging area
    cdef bint wide = P > limit
    cdef bint pointwise = geometry.is_pointwise and not wide
    cdef Py_ssize_t col_size = K * images_per_tile * tile_p
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t item, f, q, gi, ldcol, ldout
    cdef bint staged
    cdef Tile t
    cdef const floating *cols
    cdef floating *ws
    cdef floating *out
    cdef floating beta
    if N == 0:
        return
    if bias is not None:
        bias_ptr = &bias[0]
    for item in prange(n_tiles(N, P, images_per_tile, tile_p), nogil=True,
                       num_threads=n_threads, schedule="static"):
        t = tile_of(item, N, P, images_per_tile, tile_p)
        ws = &workspace[openmp.omp_get_thread_num() * per_thread]
        staged = wide or t.n1 - t.n0 > 1
        if pointwise and t.n1 - t.n0 == 1:
            # the input plane (C x P) already is the column matrix
            cols = &x[t.n0, 0, 0, 0] + t.p0
            ldcol = P
        else:
            tile_columns(&x[0, 0, 0, 0], &g, &t, ws)
            cols = ws
            ldcol = t.total
        beta = 0
        if not staged:
            out = &y[t.n0, 0, t.p0]
            ldout = P
            if bias_ptr != NULL:
                beta = 1
                for f in range(F):
                    for q in range(t.width):
                        out[f * P + q] = bias_ptr[f]
        else:
            out = ws + col_size
            ldout = t.total
        for gi in range(g.groups):
            gemm_rm(False, False, Fg, t.total, Kg,
                    1, &w2d[gi * Fg, 0], Kg, cols + gi * Kg * ldcol, ldcol,
                    beta, out + gi * Fg * ldout, ldout, limit)
        if staged:
            scatter_planes(out, F, P, &t, bias_ptr, relu, &y[0, 0, 0])
        elif relu:
            for f in range(F):
                epilogue_row(out + f * P, out + f * P, t.width, NULL, True)


def backward_weight(const floating[:, :, :, ::1] x, const floating[:, :, ::1] dy,
                    floating[:, ::1] partial, floating[::1] workspace, object geometry,
                    Py_ssize_t images_per_tile, Py_ssize_t tile_p, int n_threads,
                    const floating[:, ::1] w2d=None, floating[:, :, ::1] y=None,
                    bint with_sums=True, bint transposed_sums=False):
    """Per-thread partial sums of grad_weight and grad_bias, to be reduced by :func:`reduce_rows`.

    partial[t, :F*Kg] += dy_tile @ cols_tile.T (group by group: Kg = K/groups columns
    per filter) and partial[t, F*Kg:] += dy_tile.sum(axis=1) over the tiles of thread t
    (left 0 without ``with_sums``).

    ``transposed_sums``: each group's (Fg, Kg) block of sums is kept transposed, (Kg, Fg),
    as ``cols_tile @ dy_tile.T`` (:func:`reduce_rows` with ``groups`` puts it back): the
    GEMM by fastconv's own kernel (``fastconv._blas.gemm_nt``), which transposes the
    operand with fewer rows, dy's, a panel at a time, where BLAS packs both (a copy of x's
    columns, 25.7 MB a call on resnet-1x1: its grad_weight GEMM ran 1.2x faster).

    Given ``w2d`` and ``y``, also ``y[n] = w2d @ im2col(x[n])`` (per group, no bias)
    from the same column tiles, i.e. :func:`forward`'s output: a transposed
    convolution's backward needs both products of im2col(grad_output), and
    unrolling it once saves a pass that was 5% of dcgan-up's backward.

    # IN  x: (N, C, H, W); dy: (N, F, OH*OW); w2d: (F, C/groups*KH*KW) or None
    # OUT partial: (n_threads, F*Kg + F), zeroed here; y: (N, F, OH*OW) or None,
    #     every element written
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef bint fused = w2d is not None
    cdef Py_ssize_t N = x.shape[0], F = dy.shape[1]
    cdef Py_ssize_t K = g.C * g.KH * g.KW
    cdef Py_ssize_t Kg = K // g.groups, Fg = F // g.groups
    cdef Py_ssize_t P = g.OH * g.OW
    # planes wider than BLAS's leading dimensions go through the staging area
    cdef bint wide = P > limit
    cdef bint pointwise = geometry.is_pointwise and not wide
    cdef Py_ssize_t col_size = K * images_per_tile * tile_p
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t item, f, gi, ldcol, ldgrad, ldout
    cdef bint staged
    cdef Tile t
    cdef const floating *cols
    cdef const floating *grad
    cdef const floating *w = NULL
    cdef floating *y_ptr = NULL
    cdef floating *ws
    cdef floating *acc
    cdef floating *out
    if fused:
        if y is None:
            raise ValueError("backward_weight: w2d given without y")
        w = &w2d[0, 0]
        y_ptr = &y[0, 0, 0]
    memset(&partial[0, 0], 0, partial.shape[0] * partial.shape[1] * sizeof(floating))
    if N == 0:
        return
    for item in prange(n_tiles(N, P, images_per_tile, tile_p), nogil=True,
                       num_threads=n_threads, schedule="static"):
        t = tile_of(item, N, P, images_per_tile, tile_p)
        ws = &workspace[openmp.omp_get_thread_num() * per_thread]
        acc = &partial[openmp.omp_get_thread_num(), 0]
        staged = wide or t.n1 - t.n0 > 1
        if pointwise and t.n1 - t.n0 == 1:
            cols = &x[t.n0, 0, 0, 0] + t.p0
            ldcol = P
        else:
            tile_columns(&x[0, 0, 0, 0], &g, &t, ws)
            cols = ws
            ldcol = t.total
        if fused:
            # before dy's planes take the staging area below
            if not staged:
                out = y_ptr + t.n0 * F * P + t.p0
                ldout = P
            else:
                out = ws + col_size
                ldout = t.total
            for gi in range(g.groups):
                gemm_rm(False, False, Fg, t.total, Kg,
                        1, w + gi * Fg * Kg, Kg, cols + gi * Kg * ldcol, ldcol,
                        0, out + gi * Fg * ldout, ldout, limit)
            if staged:
                scatter_planes(out, F, P, &t, NULL, False, y_ptr)
        if not staged:
            grad = &dy[t.n0, 0, t.p0]
            ldgrad = P
        else:
            gather_planes(&dy[0, 0, 0], F, P, &t, ws + col_size)
            grad = ws + col_size
            ldgrad = t.total
        for gi in range(g.groups):
            if transposed_sums:
                gemm_nt(Kg, Fg, t.total, cols + gi * Kg * ldcol, ldcol,
                        grad + gi * Fg * ldgrad, ldgrad, 1, acc + gi * Fg * Kg, Fg, 0, limit,
                        True)
            else:
                gemm_rm(False, True, Fg, Kg, t.total,
                        1, grad + gi * Fg * ldgrad, ldgrad, cols + gi * Kg * ldcol, ldcol,
                        1, acc + gi * Fg * Kg, Kg, limit)
        if with_sums:
            for f in range(F):
                acc[F * Kg + f] = acc[F * Kg + f] + sum_run(grad + f * ldgrad, t.total)


cdef inline const floating *weight_block(const floating *w, bint transposed, Py_ssize_t gi,
                                         Py_ssize_t r, Py_ssize_t Fg,
                                         Py_ssize_t Kg) noexcept nogil:
    """Row r of W_g.T (Kg x Fg) for :func:`backward_input`: a column of the (F, Kg) weight,
    or a row of the (G*Kg, Fg) transposed one."""
    if transposed:
        return w + (gi * Kg + r) * Fg
    return w + gi * Fg * Kg + r


cdef inline void fill_planes(floating *image, Py_ssize_t c0, Py_ssize_t c1,
                             Py_ssize_t plane_size, const floating *bias) noexcept nogil:
    """Planes c0 .. c1-1 of one image set to 0, or to bias[c] if bias is not NULL."""
    cdef Py_ssize_t c, q
    cdef floating *plane
    if bias == NULL:
        memset(image + c0 * plane_size, 0, (c1 - c0) * plane_size * sizeof(floating))
        return
    for c in range(c0, c1):
        plane = image + c * plane_size
        for q in range(plane_size):
            plane[q] = bias[c]


def backward_input(const floating[:, ::1] w2d, const floating[:, :, ::1] dy,
                   floating[:, :, :, ::1] dx, floating[::1] workspace, object geometry,
                   Py_ssize_t images_per_tile, Py_ssize_t tile_p, Py_ssize_t c_block,
                   int n_threads, bint transposed_weight=False,
                   const floating[::1] bias=None):
    """dx[n] = col2im(w2d.T @ dy[n]) (+ bias[c] on plane c).

    One work item per image group (``images_per_tile > 1``), else per (image,
    channel block), each looping over the image's column tiles.

    With groups, channel c's rows of the column tile come from its group's
    filters only: one gemm per group (per group a channel block meets).

    ``transposed_weight``: w2d is given as W_g.T for each group, stacked
    ((G*Kg, Fg), see :func:`transpose_weight`). BLAS then packs rows of Fg
    contiguous values; packing the (F, Kg) weight as a transposed operand
    reads Fg rows Kg apart for every few columns, which for a 256 x 2048
    weight (dcgan-up) cost 13% of the pass, against ~2% here. And the products
    are then row-major ``A @ B`` that fastconv's own float32 kernel
    (``fastconv._blas.gemm_nn``) runs where the CPU has AVX-512, reading both
    operands in place: resnet-3x3-s2's backward 1.02x / 1.05x, cifar-3x3's
    1.11x / 1.05x (2 / 1 threads, against BLAS on the untransposed weight).

    ``bias`` (a transposed convolution's): the planes start from it instead
    of zero, which saves the separate pass over dx that adding it afterwards
    takes.

    Planes wider than the BLAS limit (P > BLAS_INT_MAX): each group's rows of
    a dy tile are copied into the staging area first (dy's row stride P is
    too long for BLAS), and a pointwise layer's products go through the
    column tile rather than straight into dx.

    # IN  w2d: (F, C/groups*KH*KW), or (C*KH*KW, F/groups) if transposed_weight;
    #     dy: (N, F, OH*OW); bias: (C,) or None
    # OUT dx: (N, C, H, W), every element written
    """
    cdef ConvGeom g = make_geom(geometry)
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef bint tw = transposed_weight
    cdef Py_ssize_t N = dx.shape[0]
    cdef Py_ssize_t Kg = (w2d.shape[0] // g.groups) if tw else w2d.shape[1]
    cdef Py_ssize_t F = (w2d.shape[1] * g.groups) if tw else w2d.shape[0]
    cdef Py_ssize_t K = Kg * g.groups, Fg = F // g.groups, Cg = g.C // g.groups
    cdef Py_ssize_t KK = g.KH * g.KW
    cdef Py_ssize_t P = g.OH * g.OW
    cdef bint wide = P > limit
    cdef bint pointwise = geometry.is_pointwise and not wide
    cdef Py_ssize_t plane_size = g.H * g.W
    cdef Py_ssize_t col_size = K * images_per_tile * tile_p
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t n_blocks = ceil_div(g.C, c_block)
    cdef Py_ssize_t tiles_per_image = ceil_div(P, tile_p)
    cdef Py_ssize_t item, j, n, c0, c1, k, p0, p1, gi, cs, ce, ldgrad
    cdef Py_ssize_t lda = Fg if tw else Kg
    cdef const floating *w = &w2d[0, 0]
    cdef const floating *bias_ptr = NULL
    cdef floating beta = 0
    cdef Tile t
    cdef floating *ws
    cdef floating *image
    cdef const floating *grad
    if N == 0:
        return
    if bias is not None:
        bias_ptr = &bias[0]
        beta = 1
    if images_per_tile > 1:
        for item in prange(ceil_div(N, images_per_tile), nogil=True, num_threads=n_threads,
                           schedule="static"):
            t = tile_of(item, N, P, images_per_tile, P)
            ws = &workspace[openmp.omp_get_thread_num() * per_thread]
            gather_planes(&dy[0, 0, 0], F, P, &t, ws + col_size)
            for gi in range(g.groups):
                if tw:
                    gemm_nn(Kg, t.total, Fg, weight_block(w, tw, gi, 0, Fg, Kg), lda,
                            ws + col_size + gi * Fg * t.total, t.total, 0,
                            ws + gi * Kg * t.total, t.total, 0, limit, True)
                else:
                    gemm_rm(True, False, Kg, t.total, Fg,
                            1, weight_block(w, tw, gi, 0, Fg, Kg), lda,
                            ws + col_size + gi * Fg * t.total,
                            t.total, 0, ws + gi * Kg * t.total, t.total, limit)
            for j in range(t.n1 - t.n0):
                image = &dx[t.n0 + j, 0, 0, 0]
                fill_planes(image, 0, g.C, plane_size, bias_ptr)
                col2im_tile_add(ws + j * P, &g, 0, g.C, 0, P, t.total, image)
        return
    for item in prange(N * n_blocks, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // n_blocks
        c0 = (item - n * n_blocks) * c_block
        c1 = min(c0 + c_block, g.C)
        ws = &workspace[openmp.omp_get_thread_num() * per_thread]
        image = &dx[n, 0, 0, 0]
        if not pointwise or bias_ptr != NULL:
            # pointwise: the gemm adds to the bias (beta 1), else overwrites
            fill_planes(image, c0, c1, plane_size, bias_ptr)
        for k in range(tiles_per_image):
            p0 = k * tile_p
            p1 = min(p0 + tile_p, P)
            # the groups that channels [c0, c1) belong to, each block [cs, ce) of it
            for gi in range(c0 // Cg, (c1 - 1) // Cg + 1):
                cs = max(c0, gi * Cg)
                ce = min(c1, (gi + 1) * Cg)
                grad = &dy[n, gi * Fg, p0]
                ldgrad = P
                if wide:
                    copy_rows(grad, P, Fg, p1 - p0, ws + col_size)
                    grad = ws + col_size
                    ldgrad = p1 - p0
                if pointwise:
                    # dx's plane block is the column block itself: write it directly
                    gemm_rm(not tw, False, ce - cs, p1 - p0, Fg,
                            1, weight_block(w, tw, gi, cs - gi * Cg, Fg, Kg), lda,
                            grad, ldgrad, beta, image + cs * P + p0, P, limit)
                elif tw:
                    gemm_nn((ce - cs) * KK, p1 - p0, Fg,
                            weight_block(w, tw, gi, (cs - gi * Cg) * KK, Fg, Kg), lda,
                            grad, ldgrad, 0, ws + (cs - c0) * KK * (p1 - p0), p1 - p0, 0,
                            limit, True)
                else:
                    gemm_rm(True, False, (ce - cs) * KK, p1 - p0, Fg,
                            1, weight_block(w, tw, gi, (cs - gi * Cg) * KK, Fg, Kg), lda,
                            grad, ldgrad, 0, ws + (cs - c0) * KK * (p1 - p0), p1 - p0, limit)
            if not pointwise:
                col2im_tile_add(ws, &g, c0, c1, p0, p1, p1 - p0, image)


def transpose_weight(const floating[:, ::1] w2d, floating[:, ::1] wt, Py_ssize_t groups,
                     int n_threads):
    """wt[g*Kg + r, f] = w2d[g*Fg + f, r]: each group's (Fg, Kg) block transposed, for
    :func:`backward_input` with ``transposed_weight``.

    In 32 x 32 blocks, so both the reads and the writes use whole cache lines.

    # IN  w2d: (F, Kg)
    # OUT wt: (groups*Kg, F/groups)
    """
    cdef Py_ssize_t F = w2d.shape[0], Kg = w2d.shape[1], Fg = F // groups
    cdef Py_ssize_t r_blocks = ceil_div(Kg, 32), item, gi, r0, r1, f0, f1, r, f
    for item in prange(groups * r_blocks, nogil=True, num_threads=n_threads,
                       schedule="static"):
        gi = item // r_blocks
        r0 = (item - gi * r_blocks) * 32
        r1 = min(r0 + 32, Kg)
        for f0 in range(0, Fg, 32):
            f1 = min(f0 + 32, Fg)
            for r in range(r0, r1):
                for f in range(f0, f1):
                    wt[gi * Kg + r, f] = w2d[gi * Fg + f, r]


def reduce_rows(const floating[:, ::1] partial, floating[::1] out, int n_threads,
                Py_ssize_t groups=0, Py_ssize_t Fg=0, Py_ssize_t Kg=0):
    """out[i] = sum over t of partial[t, i] (the per-thread grad_weight/grad_bias sums).

    With ``groups`` > 0, the first ``groups * Fg * Kg`` values of each row of ``partial``
    are :func:`backward_weight`'s ``transposed_sums``: per group a (Kg, Fg) block, summed
    into out's (Fg, Kg) block.

    # IN  partial: (T, M)
    # OUT out: (M,)
    """
    cdef Py_ssize_t T = partial.shape[0], M = partial.shape[1]
    cdef Py_ssize_t block = Fg * Kg, transposed = groups * Fg * Kg if groups > 0 else 0
    cdef Py_ssize_t i, t, src, gi, f
    cdef floating total
    for i in prange(M, nogil=True, num_threads=n_threads, schedule="static"):
        src = i
        if i < transposed:
            # out's (f, kk) of group gi from the block's (kk, f)
            gi = i // block
            f = (i - gi * block) // Kg
            src = gi * block + (i - gi * block - f * Kg) * Fg + f
        total = 0
        for t in range(T):
            total = total + partial[t, src]
        out[i] = total


def channel_sums(const floating[:, :, ::1] y, floating[::1] out, int n_threads):
    """out[c] = y[:, c, :].sum(): a bias gradient.

    # IN  y: (N, C, P)
    # OUT out: (C,)
    """
    cdef Py_ssize_t N = y.shape[0], C = y.shape[1], P = y.shape[2]
    cdef Py_ssize_t c, n, q0
    cdef floating total
    for c in prange(C, nogil=True, num_threads=n_threads, schedule="static"):
        total = 0
        for n in range(N):
            # in blocks: one float32 accumulator over N*P values stalls once it is
            # 2**24 times the values it adds (huge planes and batches)
            for q0 in range(0, P, 4096):
                total = total + sum_run(&y[n, c, q0], min(4096, P - q0))
        out[c] = total


cdef inline floating sum_run(const floating *v, Py_ssize_t n) noexcept nogil:
    """sum(v[:n]) in eight interleaved partial sums.

    One accumulator waits out each add's latency (a float per 4 cycles: 2% of
    dcgan-up's backward at 1 thread went to summing its grad_bias); eight
    independent ones keep the adders busy, and the compiler packs them into vectors.
    """
    cdef floating s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        s0 = s0 + v[i]
        s1 = s1 + v[i + 1]
        s2 = s2 + v[i + 2]
        s3 = s3 + v[i + 3]
        s4 = s4 + v[i + 4]
        s5 = s5 + v[i + 5]
        s6 = s6 + v[i + 6]
        s7 = s7 + v[i + 7]
        i = i + 8
    while i < n:
        s0 = s0 + v[i]
        i = i + 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
