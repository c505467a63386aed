"""Winograd F(m x m, 3 x 3) convolution kernels (m = 2 or 4), stride 1, dilation 1, NCHW.

A 3x3 convolution of an ``alpha x alpha`` input tile (``alpha = m + 2``) gives
an ``m x m`` output tile; in the Winograd domain it is an element-wise product:

    Y = AT [ (G g G^T) * (BT d B) ] A

Summed over channels, each of the ``alpha**2`` transform-domain positions
``s = (xi, nu)`` is a matrix product over tiles: ``M_s (F x T) = U_s (F x C) @
V_s (C x T)``, so the convolution becomes ``alpha**2`` GEMMs with ``m**2 * 9 /
alpha**2`` (4 for m = 4) times fewer multiplications than im2col + GEMM.

Work items are *blocks* of consecutive tile rows of the batch (tile row
``r = n * TH + th``; its ``TW`` tiles are contiguous in the block). One thread
runs a block start to finish in its own workspace:

1. per channel: gather the input tiles (:c:func:`fc_winoM_gather_*`, padding
   read through row and column maps) into ``D`` and transform them into
   ``V_s[c, :]``;
2. ``alpha**2`` (times groups) single-threaded GEMMs ``M_s = U_s @ V_s``;
3. per filter: transform ``M_s[f, :]`` back into output tiles and scatter
   them into ``y`` with the bias and, optionally, the ReLU fused.

The per-thread workspace holds ``D``, ``V``, ``M`` and the output tiles of one
block: its size comes from the tile plan (``fastconv._tiling.plan_winograd``),
never from the batch. The transforms, gathers and scatters are straight-line C
generated from the exact matrices (``fastconv/_winograd_transforms.h``), with
an AVX2+FMA clone picked at load time. BLAS must be single-threaded while
these run (``fastconv._threads``).
"""

cimport openmp
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcmp, memcpy, memset

from fastconv import _tiling
from fastconv._blas cimport gemm_nn, gemm_nt, gemm_rm_chunked


cdef extern from "_winograd_transforms.h" nogil:
    # fc_wino_<kind>_<s|d>(m, ...): the F(m x m, 3 x 3) kernel of each kind
    void fc_wino_input_s(int m, const float *src, Py_ssize_t lds, float *dst, Py_ssize_t ldd,
                         Py_ssize_t n)
    void fc_wino_input_d(int m, const double *src, Py_ssize_t lds, double *dst,
                         Py_ssize_t ldd, Py_ssize_t n)
    void fc_wino_output_s(int m, const float *src, Py_ssize_t lds, float *dst, Py_ssize_t ldd,
                          Py_ssize_t n)
    void fc_wino_output_d(int m, const double *src, Py_ssize_t lds, double *dst,
                          Py_ssize_t ldd, Py_ssize_t n)
    void fc_wino_weight_s(int m, const float *g, Py_ssize_t ldg, Py_ssize_t inc, float *dst,
                          Py_ssize_t ldd, Py_ssize_t n)
    void fc_wino_weight_d(int m, const double *g, Py_ssize_t ldg, Py_ssize_t inc, double *dst,
                          Py_ssize_t ldd, Py_ssize_t n)
    void fc_wino_gather_s(int m, const float *plane, Py_ssize_t W, const Py_ssize_t *rows,
                          const Py_ssize_t *cols, Py_ssize_t left, Py_ssize_t TW, Py_ssize_t lo,
                          Py_ssize_t hi, float *D, Py_ssize_t ldd)
    void fc_wino_gather_d(int m, const double *plane, Py_ssize_t W, const Py_ssize_t *rows,
                          const Py_ssize_t *cols, Py_ssize_t left, Py_ssize_t TW, Py_ssize_t lo,
                          Py_ssize_t hi, double *D, Py_ssize_t ldd)
    void fc_wino_scatter_s(int m, const float *Y, Py_ssize_t ldy, float *out, Py_ssize_t OW,
                           Py_ssize_t rows, Py_ssize_t TW, float bias, int relu)
    void fc_wino_scatter_d(int m, const double *Y, Py_ssize_t ldy, double *out, Py_ssize_t OW,
                           Py_ssize_t rows, Py_ssize_t TW, double bias, int relu)
    # grad_weight's F(3x3, n x n) kernels, n the dY tile size (its input transform is
    # the forward's fc_wino_input for m = n: the two share their points)
    void fc_winodw_grad_s(int n, const float *src, Py_ssize_t lds, float *dst, Py_ssize_t ldd,
                          Py_ssize_t count)
    void fc_winodw_grad_d(int n, const double *src, Py_ssize_t lds, double *dst,
                          Py_ssize_t ldd, Py_ssize_t count)
    void fc_winodw_output_s(int n, const float *src, Py_ssize_t lds, float *dst,
                            Py_ssize_t ldd, Py_ssize_t count)
    void fc_winodw_output_d(int n, const double *src, Py_ssize_t lds, double *dst,
                            Py_ssize_t ldd, Py_ssize_t count)
    void fc_winodw_gather_grad_s(int n, const float *plane, Py_ssize_t W,
                                 const Py_ssize_t *rows, const Py_ssize_t *cols,
                                 Py_ssize_t left, Py_ssize_t TW, Py_ssize_t lo, Py_ssize_t hi,
                                 float *D, Py_ssize_t ldd)
    void fc_winodw_gather_grad_d(int n, const double *plane, Py_ssize_t W,
                                 const Py_ssize_t *rows, const Py_ssize_t *cols,
                                 Py_ssize_t left, Py_ssize_t TW, Py_ssize_t lo, Py_ssize_t hi,
                                 double *D, Py_ssize_t ldd)


# --- dispatch on the dtype (the header dispatches on m) -----------------------------------

cdef inline void input_transform(int m, const floating *src, Py_ssize_t lds, floating *dst,
                                 Py_ssize_t ldd, Py_ssize_t n) noexcept nogil:
    if floating is float:
        fc_wino_input_s(m, src, lds, dst, ldd, n)
    else:
        fc_wino_input_d(m, src, lds, dst, ldd, n)


cdef inline void output_transform(int m, const floating *src, Py_ssize_t lds, floating *dst,
                                  Py_ssize_t ldd, Py_ssize_t n) noexcept nogil:
    if floating is float:
        fc_wino_output_s(m, src, lds, dst, ldd, n)
    else:
        fc_wino_output_d(m, src, lds, dst, ldd, n)


cdef inline void filter_transform(int m, const floating *g, Py_ssize_t ldg, Py_ssize_t inc,
                                  floating *dst, Py_ssize_t ldd, Py_ssize_t n) noexcept nogil:
    if floating is float:
        fc_wino_weight_s(m, g, ldg, inc, dst, ldd, n)
    else:
        fc_wino_weight_d(m, g, ldg, inc, dst, ldd, n)


cdef inline void gather_tiles(int m, const floating *plane, Py_ssize_t W, const Py_ssize_t *rows,
                              const Py_ssize_t *cols, Py_ssize_t left, Py_ssize_t TW,
                              Py_ssize_t lo, Py_ssize_t hi, floating *D,
                              Py_ssize_t ldd) noexcept nogil:
    if floating is float:
        fc_wino_gather_s(m, plane, W, rows, cols, left, TW, lo, hi, D, ldd)
    else:
        fc_wino_gather_d(m, plane, W, rows, cols, left, TW, lo, hi, D, ldd)


cdef inline void scatter_tiles(int m, const floating *Y, Py_ssize_t ldy, floating *out,
                               Py_ssize_t OW, Py_ssize_t rows, Py_ssize_t TW, floating bias,
                               bint relu) noexcept nogil:
    if floating is float:
        fc_wino_scatter_s(m, Y, ldy, out, OW, rows, TW, bias, relu)
    else:
        fc_wino_scatter_d(m, Y, ldy, out, OW, rows, TW, bias, relu)


cdef inline void weight_grad_dy_tiles(int n, const floating *D, floating *V, Py_ssize_t ldv,
                                      Py_ssize_t count) noexcept nogil:
    """W = G dY G^T of ``count`` n x n dY tiles (D's streams count apart) for grad_weight."""
    if floating is float:
        fc_winodw_grad_s(n, D, count, V, ldv, count)
    else:
        fc_winodw_grad_d(n, D, count, V, ldv, count)


cdef inline void gather_grad_tiles(int n, const floating *plane, Py_ssize_t W,
                                   const Py_ssize_t *rows, const Py_ssize_t *cols, Py_ssize_t TW,
                                   Py_ssize_t hi, floating *D, Py_ssize_t ldd) noexcept nogil:
    if floating is float:
        fc_winodw_gather_grad_s(n, plane, W, rows, cols, 0, TW, 0, hi, D, ldd)
    else:
        fc_winodw_gather_grad_d(n, plane, W, rows, cols, 0, TW, 0, hi, D, ldd)


cdef inline void gather_block(int m, const floating *x, Py_ssize_t C, Py_ssize_t H,
                              Py_ssize_t W, Py_ssize_t c, Py_ssize_t r0, Py_ssize_t r1,
                              Py_ssize_t TH, Py_ssize_t TW, const Py_ssize_t *rowmap,
                              const Py_ssize_t *colmap, Py_ssize_t left, Py_ssize_t lo,
                              Py_ssize_t hi, floating *D, Py_ssize_t tb) noexcept nogil:
    """Channel c's input tiles of the block's tile rows [r0, r1) (r = n*TH + th) into D."""
    cdef Py_ssize_t r, n, th
    for r in range(r0, r1):
        n = r // TH
        th = r - n * TH
        gather_tiles(m, x + (n * C + c) * H * W, W, rowmap + th * m, colmap, left, TW, lo, hi,
                     D + (r - r0) * TW, tb)


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


# --- kernels ---------------------------------------------------------------------------------

def transform_weight(const floating[:, :, :, ::1] weight, floating[:, :, ::1] U, int m,
                     Py_ssize_t groups, bint for_input_grad, int n_threads):
    """U[s] = G g G^T at every transform position s, for every filter pair, in double.

    ``for_input_grad=False``: ``U[s, f, c] = (G weight[f, c] G^T)[s]``, shape
    (alpha**2, F, C/groups): the forward's filters.

    ``for_input_grad=True``: the filters of grad_x, the convolution of dY with
    the kernel rotated by 180 degrees and the channel axes swapped (seed 001):
    ``U[s, c, fg] = (G rot180(weight[g*F/groups + fg, c - g*C/groups]) G^T)[s]``
    with ``g`` the group of channel ``c``, shape (alpha**2, C, F/groups).

    # IN  weight: (F, C/groups, 3, 3)
    # OUT U: as above, every element written
    """
    cdef Py_ssize_t F = weight.shape[0], Cg = weight.shape[1]
    cdef Py_ssize_t Fg = F // groups, C = Cg * groups
    cdef Py_ssize_t f, c, gi
    if not for_input_grad:
        for f in prange(F, nogil=True, num_threads=n_threads, schedule="static"):
            filter_transform(m, &weight[f, 0, 0, 0], 1, 9, &U[0, f, 0], F * Cg, Cg)
        return
    for c in prange(C, nogil=True, num_threads=n_threads, schedule="static"):
        gi = c // Cg
        # from the last tap backwards (ldg = -1): the kernel rotated by 180 degrees
        filter_transform(m, &weight[gi * Fg, c - gi * Cg, 2, 2], -1, Cg * 9, &U[0, c, 0],
                         C * Fg, Fg)


def forward(const floating[:, :, :, ::1] x, const floating[:, :, ::1] U,
            const floating[::1] bias, floating[:, :, :, ::1] y, floating[::1] workspace,
            int m, Py_ssize_t groups, const Py_ssize_t[::1] rowmap,
            const Py_ssize_t[::1] colmap, Py_ssize_t left, Py_ssize_t lo, Py_ssize_t hi,
            Py_ssize_t rows_per_block, bint relu, Py_ssize_t sum_chunk, int n_threads):
    """y = act(conv3x3(x) + bias) by F(m x m, 3 x 3), one block of tile rows per work item.

    ``rowmap[p]`` / ``colmap[p]`` give the input row / column under padded
    position ``p`` (``p = th*m + i`` for tap row ``i`` of tile row ``th``), or
    -1 for a zero; tiles ``[lo, hi)`` of every tile row read only columns
    ``p - left`` inside the input (no map lookup). The transform-domain GEMMs sum
    ``sum_chunk`` channels per BLAS call (``fastconv._blas.gemm_rm_chunked``; 0: all).

    # IN  x: (N, C, H, W); U: (alpha**2, F, C/groups) from transform_weight; bias: (F,) or None
    # IN  rowmap: (ceil(OH/m)*m + 2,); colmap: (ceil(OW/m)*m + 2,)
    # OUT y: (N, F, OH, OW), every element written
    # workspace: n_threads * workspace_per_thread of the plan
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = y.shape[1], OH = y.shape[2], OW = y.shape[3]
    cdef Py_ssize_t A = m + 2, AA = (m + 2) * (m + 2)
    cdef Py_ssize_t TH = ceil_div(OH, m), TW = ceil_div(OW, m)
    cdef Py_ssize_t Cg = C // groups, Fg = F // groups
    cdef Py_ssize_t total_rows = N * TH
    cdef Py_ssize_t n_blocks = ceil_div(total_rows, rows_per_block)
    cdef Py_ssize_t tb_max = rows_per_block * TW
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    # gemm_rm cuts Fg into pieces within the BLAS limit; Cg (U's rows) and the
    # block's tiles (V's and M's) are its leading dimensions: fastconv._winograd.fits
    # and plan_winograd keep them within it
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    # F(3x3, 3x3)'s GEMMs (whole sums) by fastconv's own kernel where it runs: resnet-3x3's
    # grad_x (m = 3) 1.08x at 1 and 2 threads (interleaved, median per-call ratio);
    # F(4x4, 3x3)'s (sums of 64 channels, blocks of 196 tiles) lost 0.95-0.98x to BLAS
    cdef bint own_gemm = m == 3
    cdef bint has_bias = bias is not None
    cdef Py_ssize_t block, r0, r1, r, n, th, tb, c, s, gi, f
    cdef floating *D
    cdef floating *V
    cdef floating *M
    cdef floating *tiles
    cdef floating b
    if N == 0:
        return
    for block in prange(n_blocks, nogil=True, num_threads=n_threads, schedule="static"):
        D = &workspace[openmp.omp_get_thread_num() * per_thread]
        V = D + AA * tb_max
        M = V + AA * C * tb_max
        tiles = M + AA * F * tb_max
        r0 = block * rows_per_block
        r1 = min(r0 + rows_per_block, total_rows)
        tb = (r1 - r0) * TW
        # 1. V[s, c, t] for the block's tiles t
        for c in range(C):
            gather_block(m, &x[0, 0, 0, 0], C, H, W, c, r0, r1, TH, TW, &rowmap[0],
                         &colmap[0], left, lo, hi, D, tb)
            input_transform(m, D, tb, V + c * tb, C * tb, tb)
        # 2. M[s] = U[s] @ V[s], group by group, sum_chunk channels at a time
        for s in range(AA):
            for gi in range(groups):
                gemm_nn(Fg, tb, Cg, &U[s, gi * Fg, 0], Cg, V + (s * C + gi * Cg) * tb, tb,
                        0, M + (s * F + gi * Fg) * tb, tb, sum_chunk, limit, own_gemm)
        # 3. y[n, f] tiles = act(AT M[:, f, t] A + bias[f])
        for f in range(F):
            output_transform(m, M + f * tb, F * tb, tiles, tb, tb)
            b = bias[f] if has_bias else 0
            for r in range(r0, r1):
                n = r // TH
                th = r - n * TH
                scatter_tiles(m, tiles + (r - r0) * TW, tb, &y[n, f, th * m, 0], OW,
                              min(m, OH - th * m), TW, b, relu)


def forward_nhwc(const floating[:, :, :, ::1] x, const floating[:, :, ::1] U,
                 const floating[::1] bias, floating[:, :, :, ::1] y, floating[::1] workspace,
                 int m, const Py_ssize_t[::1] rowmap, const Py_ssize_t[::1] colmap,
                 Py_ssize_t tiles_per_block, Py_ssize_t sum_chunk, int n_threads):
    """y = conv2d(x, W) + bias in channels-last order by F(m x m, 3 x 3), groups 1.

    Along the contiguous channels: each tile's (m+2)**2 input pixels are gathered as
    whole channel vectors into D (zeros where ``rowmap``/``colmap`` say -1), and the
    generated input transform runs over the C channels of the tile at once into
    ``V[s, t, :]``. Per transform position ``M_s (tiles x F) = V_s @ U_s.T`` by
    ``fastconv._blas.gemm_nt`` (the own kernel where it runs, ``sum_chunk`` channels
    at a time), and the output transform runs over the F filters of a tile into its
    m x m output pixels, stored (+ bias) where they lie inside y. A work item is a block
    of ``tiles_per_block`` tiles, counted over images, tile rows and tile columns.

    # IN  x: (N, H, W, C); U: ((m+2)**2, F, C) (``fastconv._winograd.transformed_weight``)
    # IN  rowmap / colmap: the input row / column under each tile position
    #     (``fastconv._winograd._tile_maps``, any padding mode)
    # OUT y: (N, OH, OW, F), every element written
    # workspace: n_threads equal slices of at least
    #     (m+2)**2 * (C + tiles_per_block * (C + F)) + m*m*F
    """
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t OH = y.shape[1], OW = y.shape[2], F = y.shape[3]
    cdef Py_ssize_t A = m + 2, AA = (m + 2) * (m + 2)
    cdef Py_ssize_t TH = ceil_div(OH, m), TW = ceil_div(OW, m)
    cdef Py_ssize_t total = N * TH * TW
    cdef Py_ssize_t n_blocks = ceil_div(total, tiles_per_block)
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    # BLAS's leading dimensions here are C and F, within the limit like the weight's rows
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef bint has_bias = bias is not None
    cdef Py_ssize_t block, t0, t1, tb, t, n, th, tw, i, j, ih, iw, s, oh, ow, f
    cdef floating *D
    cdef floating *V
    cdef floating *M
    cdef floating *Y
    cdef floating *dst
    cdef const floating *src
    if total == 0:
        return
    for block in prange(n_blocks, nogil=True, num_threads=n_threads, schedule="static"):
        D = &workspace[openmp.omp_get_thread_num() * per_thread]
        V = D + AA * C
        M = V + AA * tiles_per_block * C
        Y = M + AA * tiles_per_block * F
        t0 = block * tiles_per_block
        t1 = min(t0 + tiles_per_block, total)
        tb = t1 - t0
        # 1. V[s, t, :] = BT d B of each tile, over its C channels at once
        for t in range(t0, t1):
            n = t // (TH * TW)
            th = (t - n * TH * TW) // TW
            tw = t - n * TH * TW - th * TW
            for i in range(A):
                ih = rowmap[th * m + i]
                for j in range(A):
                    iw = colmap[tw * m + j]
                    dst = D + (i * A + j) * C
                    if ih < 0 or iw < 0:
                        memset(dst, 0, C * sizeof(floating))
                    else:
                        memcpy(dst, &x[n, ih, iw, 0], C * sizeof(floating))
            input_transform(m, D, C, V + (t - t0) * C, tb * C, C)
        # 2. M[s] = V[s] @ U[s].T
        for s in range(AA):
            gemm_nt(tb, F, C, V + s * tb * C, C, &U[s, 0, 0], C, 0, M + s * tb * F, F,
                    sum_chunk, limit, True)
        # 3. each tile's m x m outputs = AT M A (+ bias), over its F filters at once
        for t in range(t0, t1):
            n = t // (TH * TW)
            th = (t - n * TH * TW) // TW
            tw = t - n * TH * TW - th * TW
            output_transform(m, M + (t - t0) * F, tb * F, Y, F, F)
            for i in range(min(m, OH - th * m)):
                oh = th * m + i
                for j in range(min(m, OW - tw * m)):
                    ow = tw * m + j
                    src = Y + (i * m + j) * F
                    dst = &y[n, oh, ow, 0]
                    if has_bias:
                        for f in range(F):
                            dst[f] = src[f] + bias[f]
                    else:
                        memcpy(dst, src, F * sizeof(floating))


def same_bytes(const unsigned char[::1] a, const unsigned char[::1] b):
    """Whether two byte buffers are equal (memcmp without the GIL, stops at the first difference)."""
    cdef int different
    if a.shape[0] != b.shape[0]:
        return False
    if a.shape[0] == 0:
        return True
    with nogil:
        different = memcmp(&a[0], &b[0], a.shape[0])
    return different == 0


def backward_weight(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] dy,
                    floating[:, ::1] partial, floating[::1] workspace, Py_ssize_t groups,
                    const Py_ssize_t[::1] rowmap, const Py_ssize_t[::1] colmap, Py_ssize_t left,
                    Py_ssize_t lo, Py_ssize_t hi, const Py_ssize_t[::1] grad_rows,
                    const Py_ssize_t[::1] grad_cols, Py_ssize_t rows_per_block, int n,
                    int n_threads, bint own_kernel=False):
    """Per-thread transform-domain sums of grad_weight by F(3x3, n x n), for
    :func:`weight_grad_output`.

    ``own_kernel``: the GEMMs by fastconv's own kernel where it runs
    (``fastconv._blas.gemm_nt``: it transposes V_s a panel at a time), else BLAS.

    Each n x n tile of dY and its (n+2) x (n+2) input tile give the tile's 3x3
    kernel gradient as ``AT [(G dY G^T) * (BT d B)] A``; the output transform is
    linear, so the products are summed over all tiles first: at each of the
    ``(n+2)**2`` positions s, ``partial[t, s, f, c] += W_s[f, tiles] @ V_s[c, tiles].T``,
    a GEMM per block (per group) whose inner dimension is the block's tiles.

    ``rowmap``/``colmap``/``left``/``lo``/``hi`` map the input tiles as in
    :func:`forward` (m = n); ``grad_rows``/``grad_cols`` map dY's tiles (-1 past
    OH/OW), whose tiles ``[0, hi_grad)`` of a row lie inside dY.

    # IN  x: (N, C, H, W); dy: (N, F, OH, OW)
    # OUT partial: (n_threads, (n+2)**2 * F * C/groups), zeroed here
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = dy.shape[1], OH = dy.shape[2], OW = dy.shape[3]
    cdef Py_ssize_t AA = (n + 2) * (n + 2)
    cdef Py_ssize_t TH = ceil_div(OH, n), TW = ceil_div(OW, n)
    cdef Py_ssize_t Cg = C // groups, Fg = F // groups
    cdef Py_ssize_t total_rows = N * TH
    cdef Py_ssize_t n_blocks = ceil_div(total_rows, rows_per_block)
    cdef Py_ssize_t tb_max = rows_per_block * TW
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t grad_hi = OW // n
    # BLAS (gemm_rm) cuts Fg, Cg and the tiles into pieces within its limit; the leading
    # dimensions (tiles of a block, Cg) stay within it (plan_winograd, filter-row check)
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef Py_ssize_t block, r0, r1, r, image, th, tb, c, f, s, gi
    cdef int tid
    cdef floating *Dx
    cdef floating *Vx
    cdef floating *Dg
    cdef floating *Vg
    cdef floating *acc
    partial[:, :] = 0
    if N == 0:
        return
    for block in prange(n_blocks, nogil=True, num_threads=n_threads, schedule="static"):
        tid = openmp.omp_get_thread_num()
        Dx = &workspace[tid * per_thread]
        Vx = Dx + AA * tb_max
        Vg = Vx + AA * C * tb_max
        Dg = Vg + AA * F * tb_max
        acc = &partial[tid, 0]
        r0 = block * rows_per_block
        r1 = min(r0 + rows_per_block, total_rows)
        tb = (r1 - r0) * TW
        for c in range(C):
            gather_block(n, &x[0, 0, 0, 0], C, H, W, c, r0, r1, TH, TW, &rowmap[0],
                         &colmap[0], left, lo, hi, Dx, tb)
            input_transform(n, Dx, tb, Vx + c * tb, C * tb, tb)   # the forward's F(n x n)
        for f in range(F):
            for r in range(r0, r1):
                image = r // TH
                th = r - image * TH
                gather_grad_tiles(n, &dy[image, f, 0, 0], OW, &grad_rows[th * n], &grad_cols[0],
                                  TW, grad_hi, Dg + (r - r0) * TW, tb)
            weight_grad_dy_tiles(n, Dg, Vg + f * tb, F * tb, tb)
        for s in range(AA):
            for gi in range(groups):
                gemm_nt(Fg, Cg, tb, Vg + (s * F + gi * Fg) * tb, tb, Vx + (s * C + gi * Cg) * tb,
                        tb, 1, acc + (s * F + gi * Fg) * Cg, Cg, 0, limit, own_kernel)


def weight_grad_output(const floating[::1] sums, floating[::1] grad_weight, int n):
    """grad_weight[f, c] = AT M[:, f, c] A from the reduced sums M ((n+2)**2, F*C/groups)
    of :func:`backward_weight` with dY tiles n x n.

    # IN  sums: ((n+2)**2 * F * C/groups,); OUT grad_weight: (F * C/groups * 9,)
    """
    cdef Py_ssize_t pairs = sums.shape[0] // ((n + 2) * (n + 2))
    with nogil:
        if floating is float:
            fc_winodw_output_s(n, &sums[0], pairs, &grad_weight[0], 0, pairs)
        else:
            fc_winodw_output_d(n, &sums[0], pairs, &grad_weight[0], 0, pairs)


def forward_filter_blocks(const floating[:, :, :, ::1] x, const floating[:, :, ::1] U,
                          const floating[:, :, :, ::1] weight, const floating[::1] bias,
                          floating[:, :, :, ::1] y,
                          floating[::1] V, floating[::1] workspace, int m,
                          const Py_ssize_t[::1] rowmap, const Py_ssize_t[::1] colmap,
                          Py_ssize_t left, Py_ssize_t lo, Py_ssize_t hi,
                          Py_ssize_t rows_per_chunk, Py_ssize_t filter_block,
                          bint for_input_grad, bint relu, Py_ssize_t sum_chunk, int n_threads):
    """y = act(conv3x3(x) + bias) by F(m x m, 3 x 3) for filters too many to stream per block.

    :func:`forward` gives each thread whole blocks of tiles, so every thread reads
    all of ``U`` once per block, and BLAS packs it again for each block's few
    tiles: on deep layers (512 x 512 filters: U is 36 MiB at m = 4, a block's
    tiles a quarter of that) streaming U dominates. Here the threads share a chunk
    of ``rows_per_chunk`` tile rows: first they transform its input together (into
    ``V``, shared, one channel per work item), then each takes blocks of
    ``filter_block`` filters, transforms the block's filters (unless ``U`` is
    given: a layer's cache), runs the block's alpha**2 GEMMs over the chunk's
    tiles and its output transform. The block's filters and products stay in
    the thread's workspace (L2). Groups 1.

    ``for_input_grad``: ``weight`` is the convolution's (C_out, C_in, 3, 3) and this
    is its grad_x (x: dY, y: dX): filter c is the channel-c slice, rotated by 180
    degrees (as :func:`transform_weight`).

    # IN  x: (N, C, H, W); U: (alpha**2, F, C) from transform_weight, or None with
    #     weight: (F, C, 3, 3) ((C, F, 3, 3) for_input_grad); bias: (F,) or None
    # OUT y: (N, F, OH, OW), every element written
    # V: alpha**2 * C * rows_per_chunk * TW (shared)
    # workspace: n_threads * alpha**2 * ((filter_block + 1) * rows_per_chunk * TW
    #            + filter_block * C)
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = y.shape[1], OH = y.shape[2], OW = y.shape[3]
    cdef Py_ssize_t AA = (m + 2) * (m + 2)
    cdef Py_ssize_t TH = ceil_div(OH, m), TW = ceil_div(OW, m)
    cdef Py_ssize_t total_rows = N * TH
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t f_blocks = ceil_div(F, filter_block)
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef bint has_bias = bias is not None
    cdef Py_ssize_t r0, r1, tb, c, fb, f0, fn, s, f, r, n, th
    cdef floating *D
    cdef floating *M
    cdef floating *Ub
    cdef const floating *Us
    cdef Py_ssize_t ldu
    cdef bint transform = U is None
    cdef floating b
    if N == 0:
        return
    for r0 in range(0, total_rows, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, total_rows)
        tb = (r1 - r0) * TW
        # 1. V[s, c, t] for the chunk's tiles t, one channel per work item
        for c in prange(C, nogil=True, num_threads=n_threads, schedule="static"):
            D = &workspace[openmp.omp_get_thread_num() * per_thread]
            gather_block(m, &x[0, 0, 0, 0], C, H, W, c, r0, r1, TH, TW, &rowmap[0],
                         &colmap[0], left, lo, hi, D, tb)
            input_transform(m, D, tb, &V[c * tb], C * tb, tb)
        # 2. per filter block: M[s] = U[s, block] @ V[s], then y's tiles of the block
        for fb in prange(f_blocks, nogil=True, num_threads=n_threads, schedule="dynamic"):
            D = &workspace[openmp.omp_get_thread_num() * per_thread]
            M = D + AA * tb
            f0 = fb * filter_block
            fn = min(filter_block, F - f0)
            if transform:
                Ub = M + AA * filter_block * tb
                for f in range(fn):
                    if for_input_grad:
                        # from the last tap backwards: the kernel rotated by 180 degrees
                        filter_transform(m, &weight[0, f0 + f, 2, 2], -1, F * 9, Ub + f * C,
                                         fn * C, C)
                    else:
                        filter_transform(m, &weight[f0 + f, 0, 0, 0], 1, 9, Ub + f * C, fn * C,
                                         C)
                Us = Ub
                ldu = fn * C
            else:
                Us = &U[0, f0, 0]
                ldu = F * C
            for s in range(AA):
                gemm_rm_chunked(False, False, fn, tb, C, 1, Us + s * ldu, C, &V[s * C * tb], tb,
                                0, M + s * fn * tb, tb, sum_chunk, limit)
            for f in range(fn):
                output_transform(m, M + f * tb, fn * tb, D, tb, tb)
                b = bias[f0 + f] if has_bias else 0
                for r in range(r0, r1):
                    n = r // TH
                    th = r - n * TH
                    scatter_tiles(m, D + (r - r0) * TW, tb, &y[n, f0 + f, th * m, 0], OW,
                                  min(m, OH - th * m), TW, b, relu)
