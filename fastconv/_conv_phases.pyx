"""Transposed convolutions whose kernel is twice their stride, by 2x2 phase convolutions.

The transposed convolution's grad_x is the strided convolution
``conv2d(dY, W, stride s, padding p)``. Split dY into its ``s * s`` phases
(dY rows ``a + s*q``, columns ``b + s*q'``): the kernel taps that meet phase
``(a, b)`` are ``kh = kh0(a) + s*t``, ``kw = kw0(b) + s*t'`` with
``kh0(a) = (a + p) mod s`` and ``t, t' < k/s = 2``, so each phase is a 2x2
stride-1 correlation of the phase plane (its top padding ``(a + p) // s``).
grad_x is the sum of the phase correlations, one 2x2 convolution over
``s * s * C_out`` stacked channels ``c = (a*s + b) * C_out + co`` whose
filters are ``Wsub[ci, c, t, t'] = W[ci, co, kh0(a) + s*t, kw0(b) + s*t']``;
grad_weight is each phase's 2x2 weight gradient, written back to its taps.

Both run in the Winograd domain from one transform of the dY tiles
``V = BT d B`` ((m+1)x(m+1) tiles of the phase planes, read in place through
row and column maps of dY): grad_x by F(m x m, 2 x 2), ``M_s = U_s @ V_s``
then ``AT M A``; grad_weight by F(2 x 2, m x m), ``sum_tiles (G x G^T)_s @
V_s^T`` then ``AT . A`` once per (filter, channel) pair. Work items are blocks
of grad_x's m x m tile rows, as in ``fastconv._conv_winograd``; the per-thread
workspace comes from the block size, never from the batch.

The forward is the same split seen from x: output phase ``(a, b)`` (rows
``a + s*q``) is a 2x2 correlation of x, top padding ``1 - (a + p) // s``,
with the phase's taps rotated by 180 degrees and the channel axes swapped,
``Wf[a, b][co, ci, t, t'] = W[ci, co, kh0(a) + s*(1 - t), kw0(b) + s*(1 - t')]``.
The phases' paddings differ by at most one row, so with their tiles shifted
by that row they all read the same x tiles: one input transform and one GEMM
per position for every phase at once (filters stacked), the phases' output
tiles interleaved into y's rows.

m is 2, 3 or 4 (``fastconv._winograd_matrices.PHASE_VARIANTS``); the transforms,
gathers and scatters are the generated C of ``fastconv/_winograd_transforms.h``.
"""

cimport openmp
from cython cimport floating
from cython.parallel cimport prange

from fastconv import _tiling
from fastconv._blas cimport gemm_nn, gemm_nt, gemm_rm_chunked


cdef extern from "_winograd_transforms.h" nogil:
    # fc_phase_<kind>_<s|d>(m, ...): the F(m x m, 2 x 2) / F(2 x 2, m x m) kernel of each kind
    void fc_phase_input_s(int m, const float *src, Py_ssize_t lds, float *dst, Py_ssize_t ldd,
                          Py_ssize_t n)
    void fc_phase_input_d(int m, const double *src, Py_ssize_t lds, double *dst,
                          Py_ssize_t ldd, Py_ssize_t n)
    void fc_phase_output_s(int m, const float *src, Py_ssize_t lds, float *dst, Py_ssize_t ldd,
                           Py_ssize_t n)
    void fc_phase_output_d(int m, const double *src, Py_ssize_t lds, double *dst,
                           Py_ssize_t ldd, Py_ssize_t n)
    void fc_phase_weight_s(int m, const float *g, Py_ssize_t ldg, Py_ssize_t inc, float *dst,
                           Py_ssize_t ldd, Py_ssize_t n)
    void fc_phase_weight_d(int m, const double *g, Py_ssize_t ldg, Py_ssize_t inc,
                           double *dst, Py_ssize_t ldd, Py_ssize_t n)
    void fc_phase_gather_s(int m, const float *plane, Py_ssize_t W, const Py_ssize_t *rows,
                           const Py_ssize_t *cols, Py_ssize_t left, Py_ssize_t TW, Py_ssize_t lo,
                           Py_ssize_t hi, float *D, Py_ssize_t ldd, Py_ssize_t step)
    void fc_phase_gather_d(int m, const double *plane, Py_ssize_t W, const Py_ssize_t *rows,
                           const Py_ssize_t *cols, Py_ssize_t left, Py_ssize_t TW, Py_ssize_t lo,
                           Py_ssize_t hi, double *D, Py_ssize_t ldd, Py_ssize_t step)
    void fc_phase_dw_x_s(int m, const float *src, Py_ssize_t lds, float *dst, Py_ssize_t ldd,
                         Py_ssize_t n)
    void fc_phase_dw_x_d(int m, const double *src, Py_ssize_t lds, double *dst, Py_ssize_t ldd,
                         Py_ssize_t n)
    void fc_phase_dw_output_s(int m, const float *src, Py_ssize_t lds, float *dst,
                              Py_ssize_t ldd, Py_ssize_t n)
    void fc_phase_dw_output_d(int m, const double *src, Py_ssize_t lds, double *dst,
                              Py_ssize_t ldd, Py_ssize_t n)
    void fc_phase_dw_gather_x_s(int m, const float *plane, Py_ssize_t W, const Py_ssize_t *rows,
                                const Py_ssize_t *cols, Py_ssize_t left, Py_ssize_t TW,
                                Py_ssize_t lo, Py_ssize_t hi, float *D, Py_ssize_t ldd,
                                Py_ssize_t step)
    void fc_phase_dw_gather_x_d(int m, const double *plane, Py_ssize_t W,
                                const Py_ssize_t *rows, const Py_ssize_t *cols, Py_ssize_t left,
                                Py_ssize_t TW, Py_ssize_t lo, Py_ssize_t hi, double *D,
                                Py_ssize_t ldd, Py_ssize_t step)
    void fc_phase_scatter_s(int m, const float *Y, Py_ssize_t ldy, float *out, Py_ssize_t OW,
                            Py_ssize_t rows, Py_ssize_t TW, float bias, int relu)
    void fc_phase_scatter_d(int m, const double *Y, Py_ssize_t ldy, double *out, Py_ssize_t OW,
                            Py_ssize_t rows, Py_ssize_t TW, double bias, int relu)


# --- dispatch on the dtype (the header dispatches on m) -----------------------------------

cdef inline void input_transform(int m, const floating *D, floating *V, Py_ssize_t ldv,
                                 Py_ssize_t n) noexcept nogil:
    """V = BT D B of n (m+1)x(m+1) input tiles (D's streams n apart)."""
    if floating is float:
        fc_phase_input_s(m, D, n, V, ldv, n)
    else:
        fc_phase_input_d(m, D, n, V, ldv, n)


cdef inline void x_transform(int m, const floating *D, floating *X, Py_ssize_t ldx,
                             Py_ssize_t n) noexcept nogil:
    """X = G x G^T of n m x m x tiles (D's streams n apart), grad_weight's filters."""
    if floating is float:
        fc_phase_dw_x_s(m, D, n, X, ldx, n)
    else:
        fc_phase_dw_x_d(m, D, n, X, ldx, n)


cdef inline void output_transform(int m, const floating *M, Py_ssize_t ldm, floating *Y,
                                  Py_ssize_t n) noexcept nogil:
    """Y = AT M A of n tiles: m*m streams of the m x m output tiles, n apart."""
    if floating is float:
        fc_phase_output_s(m, M, ldm, Y, n, n)
    else:
        fc_phase_output_d(m, M, ldm, Y, n, n)


cdef inline void filter_transform(int m, const floating *g, floating *U, Py_ssize_t ldu,
                                  Py_ssize_t n) noexcept nogil:
    """U = G g G^T of n contiguous 2x2 filters, in double."""
    if floating is float:
        fc_phase_weight_s(m, g, 1, 4, U, ldu, n)
    else:
        fc_phase_weight_d(m, g, 1, 4, U, ldu, n)


cdef inline void phase_dw_output(int m, const floating *M, Py_ssize_t ldm, floating *out,
                                 Py_ssize_t n) noexcept nogil:
    """AT M A of n pairs' sums (streams ldm apart) into 4 values per pair, interleaved."""
    if floating is float:
        fc_phase_dw_output_s(m, M, ldm, out, 0, n)
    else:
        fc_phase_dw_output_d(m, M, ldm, out, 0, n)


cdef inline void gather_tiles(int m, const floating *plane, Py_ssize_t W,
                              const Py_ssize_t *rows, const Py_ssize_t *cols, Py_ssize_t left,
                              Py_ssize_t TW, Py_ssize_t lo, Py_ssize_t hi, floating *D,
                              Py_ssize_t ldd, Py_ssize_t step) noexcept nogil:
    """One tile row's input tiles; interior tiles [lo, hi) read ``step*p - left``."""
    if floating is float:
        fc_phase_gather_s(m, plane, W, rows, cols, left, TW, lo, hi, D, ldd, step)
    else:
        fc_phase_gather_d(m, plane, W, rows, cols, left, TW, lo, hi, D, ldd, step)


cdef inline void gather_x(int m, const floating *plane, Py_ssize_t W, const Py_ssize_t *rows,
                          const Py_ssize_t *cols, Py_ssize_t TW, Py_ssize_t hi, floating *D,
                          Py_ssize_t ldd, Py_ssize_t step) noexcept nogil:
    if floating is float:
        fc_phase_dw_gather_x_s(m, plane, W, rows, cols, 0, TW, 0, hi, D, ldd, step)
    else:
        fc_phase_dw_gather_x_d(m, plane, W, rows, cols, 0, TW, 0, hi, D, ldd, step)


cdef inline void scatter_tiles(int m, const floating *Y, Py_ssize_t ldy, floating *out,
                               Py_ssize_t OW, Py_ssize_t rows, Py_ssize_t TW) noexcept nogil:
    if floating is float:
        fc_phase_scatter_s(m, Y, ldy, out, OW, rows, TW, 0, 0)
    else:
        fc_phase_scatter_d(m, Y, ldy, out, OW, rows, TW, 0, 0)


cdef inline void scatter_tiles_strided(int m, const floating *Y, Py_ssize_t ldy,
                                       floating *out, Py_ssize_t ldo, Py_ssize_t step,
                                       Py_ssize_t OW, Py_ssize_t rows,
                                       Py_ssize_t TW) noexcept nogil:
    """:func:`scatter_tiles` into one stride phase of a plane: tile row value (i, tw*m + j)
    at ``out[i*ldo + (tw*m + j)*step]`` for columns below OW."""
    cdef Py_ssize_t i, tw, j, q
    for i in range(rows):
        for tw in range(TW):
            for j in range(m):
                q = tw * m + j
                if q < OW:
                    out[i * ldo + q * step] = Y[(i * m + j) * ldy + tw]


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline void scatter_output_row(int m, const floating *T, Py_ssize_t ld_phase,
                                    Py_ssize_t ldt, floating *out, Py_ssize_t i, Py_ssize_t a,
                                    Py_ssize_t sw, Py_ssize_t OW_t, Py_ssize_t TW,
                                    const Py_ssize_t *shifts, floating bias) noexcept nogil:
    """Row i of one tile row of output phase row a, every column phase b interleaved:
    tile tw's value (i, j) of phase (a, b), ``T_b[(i*m + j)*ldt + tw]`` with ``T_b = T +
    (a*sw + b)*ld_phase``, goes to phase column ``q = m*tw - shifts[b] + j``, i.e.
    ``out[b + sw*q]`` (+ bias) where that lies in [0, OW_t); whole rows at once, so each
    cache line of y is written once."""
    cdef Py_ssize_t b, j, tw, q, col
    cdef const floating *Y
    for b in range(sw):
        Y = T + (a * sw + b) * ld_phase + i * m * ldt
        for tw in range(TW):
            for j in range(m):
                q = m * tw - shifts[b] + j
                col = b + sw * q
                if q >= 0 and col < OW_t:
                    out[col] = Y[j * ldt + tw] + bias


# --- kernels ---------------------------------------------------------------------------------

def transform_weight(const floating[:, :, :, ::1] weight, floating[:, :, ::1] U,
                     floating[:, :, :, ::1] taps, const Py_ssize_t[::1] kh0,
                     const Py_ssize_t[::1] kw0, int m, int n_threads):
    """U[s, ci, c] = (G Wsub[ci, c] G^T)[s] for grad_x's stacked phase channels c, in double.

    ``Wsub[ci, (a*sw + b)*C_out + co, t, t'] = weight[ci, co, kh0[a] + sh*t, kw0[b] + sw*t']``
    is first copied into ``taps`` (a phase's taps are not one stride apart in
    the kernel); ``sh = len(kh0)``, ``sw = len(kw0)``.

    # IN  weight: (C_in, C_out, 2*sh, 2*sw); kh0: (sh,); kw0: (sw,)
    # OUT U: ((m+1)**2, C_in, sh*sw*C_out); taps: (C_in, sh*sw*C_out, 2, 2), all written
    """
    cdef Py_ssize_t C_in = weight.shape[0], C_out = weight.shape[1]
    cdef Py_ssize_t sh = kh0.shape[0], sw = kw0.shape[0]
    cdef Py_ssize_t K = sh * sw * C_out
    cdef Py_ssize_t ci, a, b, co, c, t, u
    for ci in prange(C_in, nogil=True, num_threads=n_threads, schedule="static"):
        for a in range(sh):
            for b in range(sw):
                for co in range(C_out):
                    c = (a * sw + b) * C_out + co
                    for t in range(2):
                        for u in range(2):
                            taps[ci, c, t, u] = weight[ci, co, kh0[a] + sh * t, kw0[b] + sw * u]
        filter_transform(m, &taps[ci, 0, 0, 0], &U[0, ci, 0], C_in * K, K)


def transform_weight_forward(const floating[:, :, :, ::1] weight, floating[:, :, ::1] U,
                             floating[:, :, :, :, ::1] taps, const Py_ssize_t[::1] kh0,
                             const Py_ssize_t[::1] kw0, int m, int n_threads):
    """U[s, (a*sw + b)*C_out + co, ci] = (G Wf[a, b][co, ci] G^T)[s], the forward's phase
    filters stacked (``Wf`` as in the module docstring), in double; ``taps`` receives ``Wf``.

    # IN  weight: (C_in, C_out, 2*sh, 2*sw); kh0: (sh,); kw0: (sw,)
    # OUT U: ((m+1)**2, sh*sw*C_out, C_in); taps: (sh*sw, C_out, C_in, 2, 2), all written
    """
    cdef Py_ssize_t C_in = weight.shape[0], C_out = weight.shape[1]
    cdef Py_ssize_t sh = kh0.shape[0], sw = kw0.shape[0]
    cdef Py_ssize_t K = sh * sw * C_out
    cdef Py_ssize_t ph, a, b, co, ci, t, u
    # one output channel's phases per item: its C_in filters (one cache line each on a
    # 4x4 kernel, C_out lines apart) are read from L1 by every phase after the first
    # (dcgan-up's transform 1.13x / 1.05x at 2 / 1 threads against an item per phase)
    for co in prange(C_out, nogil=True, num_threads=n_threads, schedule="static"):
        for ph in range(sh * sw):
            a = ph // sw
            b = ph - a * sw
            for ci in range(C_in):
                for t in range(2):
                    for u in range(2):
                        taps[ph, co, ci, t, u] = weight[ci, co, kh0[a] + sh * (1 - t),
                                                        kw0[b] + sw * (1 - u)]
            filter_transform(m, &taps[ph, co, 0, 0, 0], &U[0, ph * C_out + co, 0], K * C_in,
                             C_in)


def forward(const floating[:, :, :, ::1] x, const floating[:, :, ::1] U,
            const floating[::1] bias, floating[:, :, :, ::1] y, floating[::1] workspace,
            const Py_ssize_t[::1] x_rows, const Py_ssize_t[::1] x_cols, Py_ssize_t left,
            Py_ssize_t lo, Py_ssize_t hi, const Py_ssize_t[::1] shifts_h,
            const Py_ssize_t[::1] shifts_w, int m, Py_ssize_t rows_per_block, int n_threads):
    """y = conv_transpose2d(x, weight) + bias: every output phase's F(m x m, 2 x 2)
    convolution from one transform of shared x tiles.

    Phase row ``a`` reads x rows ``q + (a + p)//sh - 1 + t``, ``t < 2``, for its output
    row ``q``; the tops ``(a + p)//sh`` differ by ``shifts_h[a]`` (0 or 1) from phase
    0's, so phase ``a``'s tiles start ``shifts_h[a]`` rows earlier and every phase
    reads the same (m+1)x(m+1) x tile: one gather and input transform, then one GEMM
    per position with the phases' filters stacked (``sh*sw*C_out`` rows). Tile row
    ``th`` of the batch (``r = n*TH + th``) gives each phase's rows
    ``m*th - shift .. + m`` (those inside the phase plane are written).

    ``x_rows[p]`` / ``x_cols[p]``: the x row / column under tile position ``p``
    (-1: zero); tiles ``[lo, hi)`` of a tile row read columns ``p - left`` (no lookup).

    # IN  x: (N, C_in, H, W); U: ((m+1)**2, sh*sw*C_out, C_in) from transform_weight_forward
    # IN  bias: (C_out,) or None; x_rows: (TH*m + 1,); x_cols: (TW*m + 1,)
    # OUT y: (N, C_out, OH_t, OW_t), every element written
    # workspace: n_threads equal slices of at least
    # tiles_per_block * ((m+1)**2 * (1 + C_in + sh*sw*C_out) + m*m * sh*sw)
    """
    cdef Py_ssize_t N = x.shape[0], C_in = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t C_out = y.shape[1], OH_t = y.shape[2], OW_t = y.shape[3]
    cdef Py_ssize_t sh = shifts_h.shape[0], sw = shifts_w.shape[0]
    cdef Py_ssize_t P = sh * sw, K = sh * sw * C_out
    cdef Py_ssize_t AA = (m + 1) * (m + 1), MM = m * m
    cdef Py_ssize_t TH = (x_rows.shape[0] - 1) // m, TW = (x_cols.shape[0] - 1) // m
    cdef Py_ssize_t total_rows = N * TH
    cdef Py_ssize_t n_blocks = ceil_div(total_rows, rows_per_block)
    cdef Py_ssize_t tb_max = rows_per_block * TW
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    # gemm_rm cuts every dimension within the BLAS limit; the leading dimensions
    # (a block's tiles, C_in) are checked by fastconv._phases.applies
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef bint has_bias = bias is not None
    cdef Py_ssize_t block, r0, r1, r, n, th, tb, a, ph, co, ci, s, i, q
    cdef floating *D
    cdef floating *V
    cdef floating *M
    cdef floating *tiles
    cdef floating bias_value
    if N == 0:
        return
    for block in prange(n_blocks, nogil=True, num_threads=n_threads, schedule="static"):
        D = &workspace[openmp.omp_get_thread_num() * per_thread]
        V = D + AA * tb_max
        M = V + AA * C_in * tb_max
        tiles = M + AA * K * tb_max
        r0 = block * rows_per_block
        r1 = min(r0 + rows_per_block, total_rows)
        tb = (r1 - r0) * TW
        # 1. V[s, ci, t] of the shared x tiles; M[s] = U[s] @ V[s] for every phase at once
        for ci in range(C_in):
            for r in range(r0, r1):
                n = r // TH
                th = r - n * TH
                gather_tiles(m, &x[n, ci, 0, 0], W, &x_rows[th * m], &x_cols[0], left, TW,
                             lo, hi, D + (r - r0) * TW, tb, 1)
            input_transform(m, D, V + ci * tb, C_in * tb, tb)
        # by fastconv's own kernel where it runs (BLAS's packed copies of U and V cost
        # dcgan-up's forward 1.06-1.13x at 2 threads); the stacked phase filters, 512 KiB
        # a position on dcgan-up, come from memory: the kernel fetches each next row
        # block of them ahead (dcgan-up's forward 1.07-1.08x at 1 and 2 threads)
        for s in range(AA):
            gemm_nn(K, tb, C_in, &U[s, 0, 0], C_in, V + s * C_in * tb, tb, 0, M + s * K * tb, tb,
                    0, limit, True, True)
        # 2. per channel: every phase's output tiles, then y's rows with the phases
        #    interleaved (phase row a holds y rows a + sh*q, q < ceil((OH_t - a)/sh))
        for co in range(C_out):
            for ph in range(P):
                output_transform(m, M + (ph * C_out + co) * tb, K * tb, tiles + ph * MM * tb,
                                 tb)
            bias_value = bias[co] if has_bias else 0
            for r in range(r0, r1):
                n = r // TH
                th = r - n * TH
                for i in range(m):
                    for a in range(sh):
                        q = m * th - shifts_h[a] + i
                        if q >= 0 and a + sh * q < OH_t:
                            scatter_output_row(m, tiles + (r - r0) * TW, MM * tb, tb,
                                               &y[n, co, a + sh * q, 0], i, a, sw, OW_t, TW,
                                               &shifts_w[0], bias_value)


def backward(const floating[:, :, :, ::1] dy, const floating[:, :, :, ::1] x,
             const floating[:, :, ::1] U, floating[:, :, :, ::1] grad_x,
             floating[:, ::1] partial, floating[::1] workspace,
             const Py_ssize_t[:, ::1] dy_rows, const Py_ssize_t[:, ::1] dy_cols,
             const Py_ssize_t[::1] dy_lefts, const Py_ssize_t[::1] dy_los,
             const Py_ssize_t[::1] dy_his, const Py_ssize_t[::1] x_rows,
             const Py_ssize_t[::1] x_cols, int m,
             Py_ssize_t rows_per_block, Py_ssize_t sum_chunk, unsigned char[::1] used,
             int n_threads, bint own_weight_grad=False, Py_ssize_t phase_rows=-1,
             Py_ssize_t phase_cols=0, Py_ssize_t row0=0, Py_ssize_t col0=0,
             Py_ssize_t step_h=1, Py_ssize_t step_w=1):
    """grad_x by F(m x m, 2 x 2) and grad_weight's per-thread transform-domain sums by
    F(2 x 2, m x m).

    grad_x's GEMMs sum ``sum_chunk`` stacked channels per BLAS call, grad_weight's
    that many tiles (``fastconv._blas.gemm_rm_chunked``; 0: all in one call);
    ``own_weight_grad``: grad_weight's by fastconv's own kernel where it runs
    (``fastconv._blas.gemm_nt``), else BLAS.

    ``dy_rows[a, p]`` is the dY row under position ``p = th*m + i`` of phase
    row ``a``'s tiles (-1 for padding), ``dy_cols[b, p]`` likewise; tiles
    ``[dy_los[b], dy_his[b])`` of phase column ``b`` read dY columns
    ``sw*p - dy_lefts[b]`` (no map lookup).
    ``x_rows[p]`` / ``x_cols[p]`` the x row / column of grad_x's tile position
    ``p``, -1 past H / W (those tiles' x values are zero, their grad_x not written).

    # IN  dy: (N, C_out, OH_t, OW_t); x: (N, C_in, H, W)
    # IN  U: ((m+1)**2, C_in, K) from transform_weight, K = sh*sw*C_out
    # IN  dy_rows: (sh, ceil(H/m)*m + 1); dy_cols: (sw, ceil(W/m)*m + 1); x_rows/x_cols: ceil*m
    # OUT grad_x: (N, C_in, H, W), every element written
    # OUT partial: (n_threads, (m+1)**2 * C_in * K): row t holds thread t's sums where
    #     used[t] is set (its first block's GEMMs overwrite the row), else garbage
    # OUT used: (n_threads,), written
    # workspace: n_threads equal slices of at least tiles_per_block * (m+1)**2 * (2 + K + C_in)

    With ``phase_rows >= 0``, x and grad_x are one stride phase of the arrays given:
    ``phase_rows x phase_cols`` values at rows ``row0 + step_h*i`` and columns
    ``col0 + step_w*j`` (``x_cols`` then holds ``step_w*j``); grad_x's other values are
    left as they are.
    """
    cdef Py_ssize_t N = x.shape[0], C_in = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t C_out = dy.shape[1], OH_t = dy.shape[2], OW_t = dy.shape[3]
    # a phase plane's rows are step_h rows of the arrays apart
    cdef Py_ssize_t ld_plane = step_h * W
    if phase_rows >= 0:
        H, W = phase_rows, phase_cols
    cdef Py_ssize_t sh = dy_rows.shape[0], sw = dy_cols.shape[0]
    cdef Py_ssize_t K = sh * sw * C_out
    cdef Py_ssize_t AA = (m + 1) * (m + 1)
    cdef Py_ssize_t TH = ceil_div(H, m), TW = ceil_div(W, m)
    cdef Py_ssize_t total_rows = N * TH
    cdef Py_ssize_t n_blocks = ceil_div(total_rows, rows_per_block)
    cdef Py_ssize_t tb_max = rows_per_block * TW
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t x_hi = min(W // m, TW)
    # gemm_rm cuts every dimension within the BLAS limit; the leading dimensions
    # (a block's tiles, K) are checked by fastconv._phases.applies
    cdef Py_ssize_t limit = _tiling.BLAS_INT_MAX
    cdef Py_ssize_t block, r0, r1, r, n, th, tb, a, b, co, c, ci, s
    cdef floating *D
    cdef floating *V
    cdef floating *M
    cdef floating *acc
    cdef floating beta
    cdef int tid
    used[:] = 0
    if N == 0:
        return
    for block in prange(n_blocks, nogil=True, num_threads=n_threads, schedule="static"):
        tid = openmp.omp_get_thread_num()
        D = &workspace[tid * per_thread]
        V = D + AA * tb_max
        M = V + AA * K * tb_max
        r0 = block * rows_per_block
        r1 = min(r0 + rows_per_block, total_rows)
        tb = (r1 - r0) * TW
        # 1. V[s, c, t]: the block's tiles of every phase plane of every dY channel,
        #    read in place (a phase plane's columns are sw apart in dY); a channel's
        #    phases one after the other, while its planes are in cache
        for co in range(C_out):
            for a in range(sh):
                for b in range(sw):
                    c = (a * sw + b) * C_out + co
                    for r in range(r0, r1):
                        n = r // TH
                        th = r - n * TH
                        gather_tiles(m, &dy[n, co, 0, 0], OW_t, &dy_rows[a, th * m],
                                     &dy_cols[b, 0], dy_lefts[b], TW, dy_los[b], dy_his[b],
                                     D + (r - r0) * TW, tb, sw)
                    input_transform(m, D, V + c * tb, K * tb, tb)
        # 2. grad_weight: partial[s, ci, c] += X_s[ci, tiles] @ V_s[c, tiles].T
        acc = &partial[tid, 0]
        # a thread's first block overwrites its sums (no memset of every thread's row)
        beta = 1 if used[tid] else 0
        used[tid] = 1
        for ci in range(C_in):
            for r in range(r0, r1):
                n = r // TH
                th = r - n * TH
                gather_x(m, &x[n, ci, row0, col0], ld_plane, &x_rows[th * m], &x_cols[0],
                         TW, x_hi, D + (r - r0) * TW, tb, step_w)
            x_transform(m, D, M + ci * tb, C_in * tb, tb)
        # 3. per position, grad_weight's GEMM, then grad_x's M_s = U_s @ V_s over X_s (which
        #    that GEMM has read): the two run back to back while V_s is in cache (dcgan-up's
        #    backward 1.03-1.04x at 1 thread, 1.02x at 2). Then AT M A into the output tiles.
        #    grad_x's by fastconv's own kernel where it runs: dcgan-up's backward 1.05x at
        #    1 and 2 threads (BLAS copies U_s, 13 MiB in all, into packed panels)
        for s in range(AA):
            gemm_nt(C_in, K, tb, M + s * C_in * tb, tb, V + s * K * tb, tb, beta,
                    acc + s * C_in * K, K, sum_chunk, limit, own_weight_grad)
            gemm_nn(C_in, tb, K, &U[s, 0, 0], K, V + s * K * tb, tb, 0, M + s * C_in * tb, tb,
                    sum_chunk, limit, True)
        for ci in range(C_in):
            output_transform(m, M + ci * tb, C_in * tb, D, tb)
            for r in range(r0, r1):
                n = r // TH
                th = r - n * TH
                if phase_rows < 0:
                    scatter_tiles(m, D + (r - r0) * TW, tb, &grad_x[n, ci, th * m, 0], W,
                                  min(m, H - th * m), TW)
                else:
                    scatter_tiles_strided(m, D + (r - r0) * TW, tb,
                                          &grad_x[n, ci, row0 + step_h * th * m, col0],
                                          ld_plane, step_w, W, min(m, H - th * m), TW)


def weight_grad_output(const floating[:, ::1] partial, const unsigned char[::1] used,
                       floating[:, :, :, ::1] grad_weight, floating[::1] scratch,
                       const Py_ssize_t[::1] kh0, const Py_ssize_t[::1] kw0, int m,
                       int n_threads):
    """grad_weight's taps from :func:`backward`'s per-thread sums: ``AT M A`` of each
    used thread's sums per pair, added (the transform is linear, so the 4 values of a
    pair add up, not the (m+1)**2 sums), then each phase's 2x2 gradient written back to
    its taps ``kh0[a] + sh*t, kw0[b] + sw*t'``.

    # IN  partial: (T, (m+1)**2 * C_in * K), K = sh*sw*C_out; used: (T,)
    # scratch: (C_in * K * 4 + n_threads * K * 4,)
    # OUT grad_weight: (C_in, C_out, 2*sh, 2*sw), every element written
    """
    cdef Py_ssize_t T = partial.shape[0]
    cdef Py_ssize_t C_in = grad_weight.shape[0], C_out = grad_weight.shape[1]
    cdef Py_ssize_t sh = kh0.shape[0], sw = kw0.shape[0]
    cdef Py_ssize_t K = sh * sw * C_out
    cdef Py_ssize_t pairs = C_in * K
    cdef Py_ssize_t ci, a, b, co, c, t, u, i
    cdef bint first
    cdef floating *total
    cdef floating *more
    for ci in prange(C_in, nogil=True, num_threads=n_threads, schedule="static"):
        total = &scratch[ci * K * 4]
        more = &scratch[pairs * 4 + openmp.omp_get_thread_num() * K * 4]
        first = True
        for t in range(T):
            if not used[t]:
                continue
            phase_dw_output(m, &partial[t, ci * K], pairs, more if not first else total, K)
            if not first:
                for i in range(K * 4):
                    total[i] = total[i] + more[i]
            first = False
        if first:           # no thread ran a block (an empty batch)
            for i in range(K * 4):
                total[i] = 0
        for a in range(sh):
            for b in range(sw):
                for co in range(C_out):
                    c = (a * sw + b) * C_out + co
                    for t in range(2):
                        for u in range(2):
                            grad_weight[ci, co, kh0[a] + sh * t, kw0[b] + sw * u] = \
                                scratch[(ci * K + c) * 4 + t * 2 + u]


def stride_phase_taps(const floating[:, :, :, ::1] weight, floating[:, :, :, ::1] taps,
                      const Py_ssize_t[::1] rows, const Py_ssize_t[::1] cols, int n_threads):
    """``taps[c, f, t, u] = weight[f, c, rows[t], cols[u]]``: a strided layer's 2x2 stride
    phase as the weight of a transposed convolution (``fastconv._stride_phases``).

    # IN  weight: (F, C, KH, KW); rows, cols: (2,)
    # OUT taps: (C, F, 2, 2), every element written
    """
    cdef Py_ssize_t F = weight.shape[0], C = weight.shape[1]
    cdef Py_ssize_t c, f, t, u
    for c in prange(C, nogil=True, num_threads=n_threads, schedule="static"):
        for f in range(F):
            for t in range(2):
                for u in range(2):
                    taps[c, f, t, u] = weight[f, c, rows[t], cols[u]]


def scatter_stride_phase_taps(const floating[:, :, :, ::1] sums,
                              floating[:, :, :, ::1] grad_weight, const Py_ssize_t[::1] rows,
                              const Py_ssize_t[::1] cols, int n_threads):
    """``grad_weight[f, c, rows[t], cols[u]] = sums[c, f, t, u]``: the transposed
    convolution's weight gradient back in the strided layer's taps (the inverse of
    :func:`stride_phase_taps`).

    # IN  sums: (C, F, 2, 2); rows, cols: (2,)
    # OUT grad_weight: (F, C, KH, KW), the four taps written
    """
    cdef Py_ssize_t F = grad_weight.shape[0], C = grad_weight.shape[1]
    cdef Py_ssize_t c, f, t, u
    for f in prange(F, nogil=True, num_threads=n_threads, schedule="static"):
        for c in range(C):
            for t in range(2):
                for u in range(2):
                    grad_weight[f, c, rows[t], cols[u]] = sums[c, f, t, u]
