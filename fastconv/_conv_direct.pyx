"""Direct convolution for layers with few input channels (the first layers of a network).

One work item is a band of output rows ``(n, oh0 .. oh0 + R)`` of every filter.
The input rows under the band (per channel, each once: the output rows share them)
are copied into the thread's workspace in *phase* form: padded by the padding
mode, and split by column residue modulo the stride, so each kernel tap reads one
contiguous run. The register-blocked C kernel (``fastconv/_direct_kernels.h``)
then sums the C*KH*KW taps for 4 filters x up to 24 (32 with AVX-512) columns
at a time and writes ``act(sum + bias)``, filter block by
filter block over the band, so each block's 4 output planes are written in
order. Nothing is shared between items, so the loop is a plain ``prange``;
the workspace is one band's rows per thread, whatever the batch.

:func:`backward_weight` lays the bands out the same way and sums dY times each
tap's columns into per-thread partial sums of grad_weight.

:func:`forward_pixel_rows` is the forward of channels-last layers, and of NCHW ones
with more channels: a band's input rows are copied padded but whole (pixels of C
values as in the input, or each channel's row in turn), and the kernel
(``fastconv/_direct_nhwc_kernels.h``) sums every tap for blocks of output pixels x
vectors of filters, each pixel's sums one contiguous run of an NHWC output (through a
buffer into the planes of an NCHW one).
"""

cimport openmp
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy, memset

from fastconv._bands cimport Band, band_item
from fastconv._phase_rows cimport copy_phase_row
from fastconv._weight_grad cimport fc_weight_grad_band_d, fc_weight_grad_band_s


cdef extern from "_direct_kernels.h" nogil:
    int FC_V4_BUILD_RUNS()
    void fc_direct_band_s(bint wide, const float *rows, Py_ssize_t band_stride,
                          Py_ssize_t c_stride, Py_ssize_t kh_stride, const unsigned char *live,
                          const float *wpack, const Py_ssize_t *tap, int C, int KH, int KW,
                          Py_ssize_t F, const float *bias, int relu, float *out, Py_ssize_t ldo,
                          Py_ssize_t OW, Py_ssize_t R)
    void fc_direct_band_d(bint wide, const double *rows, Py_ssize_t band_stride,
                          Py_ssize_t c_stride, Py_ssize_t kh_stride, const unsigned char *live,
                          const double *wpack, const Py_ssize_t *tap, int C, int KH, int KW,
                          Py_ssize_t F, const double *bias, int relu, double *out,
                          Py_ssize_t ldo, Py_ssize_t OW, Py_ssize_t R)

cdef extern from "_direct_nhwc_kernels.h" nogil:
    void fc_direct_nhwc_row_s(bint wide, const float **rowp, int KH, const Py_ssize_t *off,
                              Py_ssize_t ntap, Py_ssize_t step, const float *wpack,
                              Py_ssize_t ldw, const float *bias, int relu, float *row_out,
                              Py_ssize_t F, Py_ssize_t OW, Py_ssize_t plane, Py_ssize_t ostep,
                              int vectors)
    void fc_direct_nhwc_row_d(bint wide, const double **rowp, int KH, const Py_ssize_t *off,
                              Py_ssize_t ntap, Py_ssize_t step, const double *wpack,
                              Py_ssize_t ldw, const double *bias, int relu, double *row_out,
                              Py_ssize_t F, Py_ssize_t OW, Py_ssize_t plane, Py_ssize_t ostep,
                              int vectors)
    void fc_plane_rows_s(const float *image, Py_ssize_t C, Py_ssize_t plane,
                         const Py_ssize_t *copies, Py_ssize_t n, float *rows, Py_ssize_t Wp,
                         const Py_ssize_t *colmap, Py_ssize_t lo, Py_ssize_t hi,
                         Py_ssize_t left, Py_ssize_t pf_first, Py_ssize_t pf_len,
                         Py_ssize_t ahead)
    void fc_plane_rows_d(const double *image, Py_ssize_t C, Py_ssize_t plane,
                         const Py_ssize_t *copies, Py_ssize_t n, double *rows, Py_ssize_t Wp,
                         const Py_ssize_t *colmap, Py_ssize_t lo, Py_ssize_t hi,
                         Py_ssize_t left, Py_ssize_t pf_first, Py_ssize_t pf_len,
                         Py_ssize_t ahead)

cdef enum:
    # planes ahead of the one being copied whose band rows are fetched (plane_rows)
    PLANES_AHEAD = 8


def wide_kernel():
    """Whether this CPU runs the AVX-512 build of the row kernel (fastconv/_direct_kernels.h:
    its blocks of 4 and 2 vectors of 32 bytes as 2 and 1 of 64 bytes)."""
    return bool(FC_V4_BUILD_RUNS())


cdef inline Py_ssize_t first_reader(Py_ssize_t i, Py_ssize_t R, int KH, Py_ssize_t sh,
                                     Py_ssize_t dh) noexcept nogil:
    """``r*KH + kh`` of the first tap row kh of an output row r < R that reads band input
    row i = r*sh + kh*dh, or -1 where none does."""
    cdef Py_ssize_t kh, j
    for kh in range(KH):
        j = i - kh * dh
        if j >= 0 and j % sh == 0 and j // sh < R:
            return (j // sh) * KH + kh
    return -1


cdef void phase_rows(const floating *image, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                     Py_ssize_t oh0, Py_ssize_t R, floating *rows, const Py_ssize_t *strides,
                     unsigned char *live, const Py_ssize_t *rowmap, const Py_ssize_t *colmap,
                     const Py_ssize_t *lo, const Py_ssize_t *hi, Py_ssize_t left, int KH,
                     Py_ssize_t sh, Py_ssize_t dh, Py_ssize_t S, Py_ssize_t ldr,
                     bint zero_padding_rows) noexcept nogil:
    """Copy the input rows under output rows oh0 .. oh0 + R of one image (C planes of
    H x W) into ``rows`` in phase form (see :func:`forward`): tap row kh of output row r,
    channel c at ``rows + r*strides[0] + c*strides[1] + kh*strides[2]``. With
    ``strides[3]`` the output rows share their input rows (strides[0] = sh*S*ldr,
    strides[2] = dh*S*ldr), each copied once by its first reader: a 3x3 stride-1 band of
    R rows copies R + 2 rows, not 3R.
    ``rowmap[oh*KH + kh]`` is the input row under tap row kh of output row oh (-1: all
    padding); live[r*KH + kh] = 0 where that is -1, and such a row is left unwritten
    (the forward skips it) or, with ``zero_padding_rows``, zeroed."""
    cdef Py_ssize_t r, kh, c, ph, src_row
    cdef Py_ssize_t row_len = S * ldr
    cdef const floating *plane_row
    cdef floating *out_row
    for r in range(R):
        for kh in range(KH):
            src_row = rowmap[(oh0 + r) * KH + kh]
            live[r * KH + kh] = src_row >= 0
            if strides[3] and first_reader(r * sh + kh * dh, R, KH, sh, dh) != r * KH + kh:
                continue
            out_row = rows + r * strides[0] + kh * strides[2]
            if src_row < 0:
                if zero_padding_rows:
                    for c in range(C):
                        memset(out_row + c * strides[1], 0, row_len * sizeof(floating))
                continue
            for c in range(C):
                plane_row = image + (c * H + src_row) * W
                for ph in range(S):
                    # phase ph's columns [lo[ph], hi[ph]) map to plane columns q*S + ph - left
                    copy_phase_row(plane_row, out_row + c * strides[1] + ph * ldr, ldr,
                                   colmap + ph, S, lo[ph], hi[ph], ph - left, S)


def forward(const floating[:, :, :, ::1] x, const floating[::1] wpack, const floating[::1] bias,
            floating[:, :, :, ::1] y, floating[::1] workspace, unsigned char[::1] live_flags,
            const Py_ssize_t[::1] rowmap, const Py_ssize_t[::1] colmap,
            const Py_ssize_t[::1] lo, const Py_ssize_t[::1] hi, Py_ssize_t left,
            const Py_ssize_t[::1] tap, int KH, int KW, int stride_h, int dilation_h,
            int stride_w, Py_ssize_t ldr, const Py_ssize_t[::1] strides, Py_ssize_t band_rows,
            bint relu, bint wide, int n_threads):
    """y[n, f, oh, :] = act(sum_{c, kh, kw} w[f, c, kh, kw] * x_padded[n, c, ih, iw] + bias[f]),
    by the kernel's AVX-512 build with ``wide`` (:func:`wide_kernel` must hold).

    ``rowmap[oh*KH + kh]`` is the input row under output row oh's tap row kh,
    ``colmap[p]`` the input column under padded column ``p``, each -1 for a zero; in
    phase ``r`` the columns ``[lo[r], hi[r])``
    are inside the input (plane column ``q*S + r - left``: copied without a
    lookup). ``tap[kw]`` is where kernel column kw starts in a row's phases
    (see the header). ``strides``: a band's layout (``fastconv._direct.band_layout``).

    # IN  x: (N, C, H, W); wpack: filters packed by _direct.pack_weight; bias: (F,) or None
    # IN  rowmap: (OH*KH,); colmap: (stride_w*ldr,)
    # IN  strides: (band_stride, c_stride, kh_stride, shared, elements per band)
    # OUT y: (N, F, OH, OW), every element written
    # workspace: n_threads * strides[4]; live_flags: n_threads * band_rows * KH
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = y.shape[1], OH = y.shape[2], OW = y.shape[3]
    cdef Py_ssize_t S = stride_w, sh = stride_h, dh = dilation_h
    cdef Py_ssize_t bands = (OH + band_rows - 1) // band_rows
    cdef Py_ssize_t per_thread = strides[4]
    cdef const floating *bias_ptr = NULL
    cdef Py_ssize_t item, n, oh0, R
    cdef Band b
    cdef int tid
    if wide and not FC_V4_BUILD_RUNS():
        raise ValueError("wide: this CPU does not run the AVX-512 kernel")
    cdef floating *rows
    cdef unsigned char *live
    if N == 0:
        return
    if bias is not None:
        bias_ptr = &bias[0]
    # dynamic: on a VM whose second core stalls now and then, static halves left one
    # thread waiting (resnet-stem 2 threads 17.5-22.3 ms static, 14.4-17.5 ms dynamic;
    # cifar-3x3 1.31-1.41 vs 1.02-1.09 ms; 1 thread on par). Items write disjoint rows.
    for item in prange(N * bands, nogil=True, num_threads=n_threads, schedule="dynamic"):
        b = band_item(item, bands, band_rows, OH)
        n, oh0, R = b.n, b.oh0, b.rows
        tid = openmp.omp_get_thread_num()
        rows = &workspace[tid * per_thread]
        live = &live_flags[tid * band_rows * KH]
        phase_rows(&x[n, 0, 0, 0], C, H, W, oh0, R, rows, &strides[0], live, &rowmap[0],
                   &colmap[0], &lo[0], &hi[0], left, KH, sh, dh, S, ldr, False)
        if floating is float:
            fc_direct_band_s(wide, rows, strides[0], strides[1], strides[2], live, &wpack[0],
                             &tap[0], <int> C, KH, KW, F, bias_ptr, relu, &y[n, 0, oh0, 0],
                             OH * OW, OW, R)
        else:
            fc_direct_band_d(wide, rows, strides[0], strides[1], strides[2], live, &wpack[0],
                             &tap[0], <int> C, KH, KW, F, bias_ptr, relu, &y[n, 0, oh0, 0],
                             OH * OW, OW, R)


def backward_weight(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] dy,
                    floating[:, ::1] partial, floating[::1] workspace,
                    unsigned char[::1] live_flags, const Py_ssize_t[::1] rowmap,
                    const Py_ssize_t[::1] colmap, const Py_ssize_t[::1] lo,
                    const Py_ssize_t[::1] hi, Py_ssize_t left, const Py_ssize_t[::1] offsets,
                    int KH, int stride_h, int dilation_h, int stride_w, Py_ssize_t ldr,
                    const Py_ssize_t[::1] strides, Py_ssize_t band_rows, int n_threads):
    """partial[t, f*K + k] = the sum, over thread t's bands, of dy[n, f, oh, ow] times the
    input under tap k = (c*KH + kh)*KW + kw of output (oh, ow): per-thread grad_weight sums.

    The bands' phase rows are laid out as :func:`forward`'s (an all-padding row as
    zeros); ``offsets[k]`` is where tap k's columns start for a band's first output row
    (``c*strides[1] + kh*strides[2] + tap[kw]``).

    # IN  x: (N, C, H, W); dy: (N, F, OH, OW); offsets: (K,) with K = C*KH*KW
    # OUT partial: (n_threads, >= F*K), the first F*K of each row overwritten
    # workspace, live_flags and strides: as forward's
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = dy.shape[1], OH = dy.shape[2], OW = dy.shape[3]
    cdef Py_ssize_t K = offsets.shape[0], S = stride_w, sh = stride_h, dh = dilation_h
    cdef Py_ssize_t bands = (OH + band_rows - 1) // band_rows
    cdef Py_ssize_t per_thread = strides[4]
    cdef Py_ssize_t item, n, oh0, R, t
    cdef Band b
    cdef int tid
    cdef floating *rows
    cdef unsigned char *live
    for t in range(partial.shape[0]):
        memset(&partial[t, 0], 0, F * K * sizeof(floating))
    if N == 0 or OH == 0:
        return
    for item in prange(N * bands, nogil=True, num_threads=n_threads, schedule="static"):
        b = band_item(item, bands, band_rows, OH)
        n, oh0, R = b.n, b.oh0, b.rows
        tid = openmp.omp_get_thread_num()
        rows = &workspace[tid * per_thread]
        live = &live_flags[tid * band_rows * KH]
        phase_rows(&x[n, 0, 0, 0], C, H, W, oh0, R, rows, &strides[0], live, &rowmap[0],
                   &colmap[0], &lo[0], &hi[0], left, KH, sh, dh, S, ldr, True)
        if floating is float:
            fc_weight_grad_band_s(rows, strides[0], &offsets[0], K, &dy[n, 0, oh0, 0],
                                  OH * OW, F, OW, R, &partial[tid, 0], K)
        else:
            fc_weight_grad_band_d(rows, strides[0], &offsets[0], K, &dy[n, 0, oh0, 0],
                                  OH * OW, F, OW, R, &partial[tid, 0], K)


cdef inline void mapped_pixels(const floating *in_row, floating *out_row,
                               const Py_ssize_t *colmap, Py_ssize_t p0, Py_ssize_t p1,
                               Py_ssize_t C) noexcept nogil:
    """Padded pixels p0 .. p1 - 1 of a row: input pixel ``colmap[p]``'s C values, or zeros
    where it is -1."""
    cdef Py_ssize_t p, src
    for p in range(p0, p1):
        src = colmap[p]
        if src >= 0:
            memcpy(out_row + p * C, in_row + src * C, C * sizeof(floating))
        else:
            memset(out_row + p * C, 0, C * sizeof(floating))


cdef inline Py_ssize_t row_slot(Py_ssize_t r, int kh, Py_ssize_t R, int KH, Py_ssize_t sh,
                                 Py_ssize_t dh, bint shared) noexcept nogil:
    """The padded row of a band that tap row kh of output row r reads: ``r*sh + kh*dh``
    where the output rows share their input rows, else ``r*KH + kh``."""
    return r * sh + kh * dh if shared else r * KH + kh


cdef inline bint stores_row(Py_ssize_t r, int kh, Py_ssize_t src_row, Py_ssize_t R, int KH,
                            Py_ssize_t sh, Py_ssize_t dh, bint shared) noexcept nogil:
    """Whether (r, kh) copies its padded row: it reads input (src_row >= 0) and, with
    shared rows, is that row's first reader."""
    return src_row >= 0 and (not shared or first_reader(
        row_slot(r, kh, R, KH, sh, dh, shared), R, KH, sh, dh) == r * KH + kh)


cdef void point_rows(floating *rows, Py_ssize_t row_len, bint shared, const floating **rowp,
                     const Py_ssize_t *rowmap, Py_ssize_t oh0, Py_ssize_t R, int KH,
                     Py_ssize_t sh, Py_ssize_t dh) noexcept nogil:
    """``rowp[r*KH + kh]``: tap row kh of output row r in ``rows`` (its slot, see
    :func:`row_slot`, ``row_len`` apart), or NULL where ``rowmap`` says it is all padding."""
    cdef Py_ssize_t r, kh
    for r in range(R):
        for kh in range(KH):
            rowp[r * KH + kh] = (rows + row_slot(r, kh, R, KH, sh, dh, shared) * row_len
                                 if rowmap[(oh0 + r) * KH + kh] >= 0 else NULL)


cdef void pixel_rows(const floating *image, Py_ssize_t C, Py_ssize_t W, Py_ssize_t oh0,
                     Py_ssize_t R, floating *rows, Py_ssize_t row_len, bint shared,
                     const floating **rowp, const Py_ssize_t *rowmap, const Py_ssize_t *colmap,
                     Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t left, Py_ssize_t Wp, int KH,
                     Py_ssize_t sh, Py_ssize_t dh) noexcept nogil:
    """Copy the input rows under output rows oh0 .. oh0 + R of one NHWC image (H x W
    pixels of C values) into ``rows``, padded: Wp pixels a row, padded pixel p showing
    input column ``colmap[p]`` (zeros where -1; pixels [lo, hi) are ``p - left``, copied
    as one run), and point ``rowp`` at them (:func:`point_rows`). ``shared``: padded row
    r*sh + kh*dh is stored once, by its first reader; else each (r, kh) has its own."""
    cdef Py_ssize_t r, kh, src_row
    cdef const floating *in_row
    cdef floating *out_row
    point_rows(rows, row_len, shared, rowp, rowmap, oh0, R, KH, sh, dh)
    for r in range(R):
        for kh in range(KH):
            src_row = rowmap[(oh0 + r) * KH + kh]
            if not stores_row(r, kh, src_row, R, KH, sh, dh, shared):
                continue
            out_row = rows + row_slot(r, kh, R, KH, sh, dh, shared) * row_len
            in_row = image + src_row * W * C
            mapped_pixels(in_row, out_row, colmap, 0, lo, C)
            memcpy(out_row + lo * C, in_row + (lo - left) * C,
                   (hi - lo) * C * sizeof(floating))
            mapped_pixels(in_row, out_row, colmap, hi, Wp, C)


cdef void plane_rows(const floating *image, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                     Py_ssize_t oh0, Py_ssize_t R, floating *rows, Py_ssize_t row_len,
                     bint shared, const floating **rowp, Py_ssize_t *copies,
                     const Py_ssize_t *rowmap, const Py_ssize_t *colmap, Py_ssize_t lo,
                     Py_ssize_t hi, Py_ssize_t left, Py_ssize_t Wp, int KH, Py_ssize_t sh,
                     Py_ssize_t dh) noexcept nogil:
    """:func:`pixel_rows` of one NCHW image (C planes of H x W): a padded row holds each
    channel's Wp values in turn (channel c at ``c*Wp``), copied by ``fc_plane_rows``
    (the C kernel, channel by channel: see there) from the list of (slot, input row)
    pairs made here in ``copies`` (room for 2*R*KH values). The rows of the planes
    PLANES_AHEAD on are fetched meanwhile: resnet-3x3-s2's forward 1.05x / 1.06x at 1 /
    2 threads, 8 planes on against none."""
    cdef Py_ssize_t r, kh, src_row, lo_row = H, hi_row = -1, n_copies = 0
    point_rows(rows, row_len, shared, rowp, rowmap, oh0, R, KH, sh, dh)
    for r in range(R):
        for kh in range(KH):
            src_row = rowmap[(oh0 + r) * KH + kh]
            if stores_row(r, kh, src_row, R, KH, sh, dh, shared):
                copies[2 * n_copies] = row_slot(r, kh, R, KH, sh, dh, shared) * row_len
                copies[2 * n_copies + 1] = src_row * W
                n_copies = n_copies + 1
                lo_row = min(lo_row, src_row)
                hi_row = max(hi_row, src_row)
    if floating is float:
        fc_plane_rows_s(image, C, H * W, copies, n_copies, rows, Wp, colmap, lo, hi, left,
                        lo_row * W, (hi_row + 1 - lo_row) * W, PLANES_AHEAD)
    else:
        fc_plane_rows_d(image, C, H * W, copies, n_copies, rows, Wp, colmap, lo, hi, left,
                        lo_row * W, (hi_row + 1 - lo_row) * W, PLANES_AHEAD)


def forward_pixel_rows(const floating[:, :, :, ::1] x, const floating[:, ::1] wpack,
                       const floating[::1] bias, floating[:, :, :, ::1] y,
                       floating[::1] workspace, Py_ssize_t[::1] row_pointers,
                       const Py_ssize_t[::1] rowmap, const Py_ssize_t[::1] colmap,
                       Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t left,
                       const Py_ssize_t[::1] offsets, int KH, int stride_h, int dilation_h,
                       int stride_w, bint shared, Py_ssize_t band_rows, bint relu, bint wide,
                       bint nchw, int vectors, int n_threads):
    """y = act(sum_{kh, kw, c} w[f, c, kh, kw] * x_padded[n, c, ih, iw] + bias[f]) by the
    pixel-row kernel, for channels-last arrays or, with ``nchw``, channels-first ones; its
    AVX-512 build with ``wide`` (:func:`wide_kernel` must hold), blocks of at most
    ``vectors`` vectors of filters.

    ``rowmap`` as :func:`forward`'s; ``colmap[p]``: the input column under padded pixel
    p < Wp (-1: zeros), pixels [lo, hi) being ``p - left``; ``offsets[t]``: tap t's
    place in a padded row (``kw*dilation_w*C + c`` for NHWC, ``c*Wp + kw*dilation_w``
    for NCHW rows, see :func:`plane_rows`); ``shared``: the band's output rows share
    their input rows (see :func:`pixel_rows`).

    # IN  x: (N, H, W, C), or (N, C, H, W) with nchw
    # IN  wpack: (KH*KW*C, ldw) filters, [kh][kw][c][f] ([kh][c][kw][f] with nchw), zero past F
    # IN  bias: (ldw,), zero past F (all zero for none)
    # OUT y: (N, OH, OW, F), or (N, F, OH, OW) with nchw, every element written
    # workspace: n_threads equal slices of a band's rows; row_pointers: n_threads * 3 *
    #     band_rows * KH (the rows' pointers, and plane_rows' list of copies)
    """
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t OH = y.shape[1], OW = y.shape[2], F = y.shape[3]
    if nchw:
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        F, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    cdef Py_ssize_t Wp = colmap.shape[0], row_len = Wp * C, ntap = offsets.shape[0]
    cdef Py_ssize_t bands = (OH + band_rows - 1) // band_rows
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t sh = stride_h, dh = dilation_h
    # between output pixels: sw pixels of C values, or sw values of a channel's row; an
    # NCHW row's filter runs are one output plane apart
    cdef Py_ssize_t step = stride_w if nchw else stride_w * C
    cdef Py_ssize_t plane = OH * OW if nchw else 0
    cdef Py_ssize_t item, n, oh0, R, r
    cdef Band b
    cdef int tid
    cdef floating *rows
    cdef floating *row_out
    cdef const floating **rowp
    if wide and not FC_V4_BUILD_RUNS():
        raise ValueError("wide: this CPU does not run the AVX-512 kernel")
    if N == 0:
        return
    # dynamic, as forward's: the items write disjoint rows
    for item in prange(N * bands, nogil=True, num_threads=n_threads, schedule="dynamic"):
        b = band_item(item, bands, band_rows, OH)
        n, oh0, R = b.n, b.oh0, b.rows
        tid = openmp.omp_get_thread_num()
        rows = &workspace[tid * per_thread]
        rowp = <const floating **> &row_pointers[tid * 3 * band_rows * KH]
        if nchw:
            plane_rows(&x[n, 0, 0, 0], C, H, W, oh0, R, rows, row_len, shared, rowp,
                       &row_pointers[(tid * 3 + 1) * band_rows * KH], &rowmap[0],
                       &colmap[0], lo, hi, left, Wp, KH, sh, dh)
        else:
            pixel_rows(&x[n, 0, 0, 0], C, W, oh0, R, rows, row_len, shared, rowp, &rowmap[0],
                       &colmap[0], lo, hi, left, Wp, KH, sh, dh)
        for r in range(R):
            row_out = &y[n, 0, oh0 + r, 0] if nchw else &y[n, oh0 + r, 0, 0]
            if floating is float:
                fc_direct_nhwc_row_s(wide, rowp + r * KH, KH, &offsets[0], ntap, step,
                                     &wpack[0, 0], wpack.shape[1], &bias[0], relu,
                                     row_out, F, OW, plane, 1, vectors)
            else:
                fc_direct_nhwc_row_d(wide, rowp + r * KH, KH, &offsets[0], ntap, step,
                                     &wpack[0, 0], wpack.shape[1], &bias[0], relu,
                                     row_out, F, OW, plane, 1, vectors)


cdef enum:
    # the columns of input_grad_phases' ``phases`` table
    PHASE_ROW, PHASE_COL, PHASE_OH, PHASE_OW, PHASE_KH, PHASE_TAPS, PHASE_LO, PHASE_HI,
    PHASE_LEFT, PHASE_WP, PHASE_SHARED, PHASE_WROW, PHASE_FIELDS


def input_grad_phases(const floating[:, :, :, ::1] dy, const floating[:, ::1] wpack,
                      const floating[::1] zeros, floating[:, :, :, ::1] grad_x,
                      floating[::1] workspace, Py_ssize_t[::1] row_pointers,
                      const Py_ssize_t[:, ::1] phases, const Py_ssize_t[:, ::1] rowmaps,
                      const Py_ssize_t[:, ::1] colmaps, const Py_ssize_t[:, ::1] offsets,
                      int stride_h, int stride_w, Py_ssize_t band_rows, bint wide,
                      int vectors, int n_threads):
    """grad_x of a strided convolution, phase by phase: grad_x's rows ``py + sh*i`` and
    columns ``px + sw*j`` (phase (py, px)) are a stride-1 correlation of dY with the taps
    of W that meet them, which the pixel-row kernel sums straight into those positions.

    A work item is a band of phase rows ``i0 .. i0 + band_rows`` of one image, every
    phase: grad_x's rows ``sh*i0 .. sh*(i0 + band_rows)``, so each cache line of grad_x
    is completed by one item. Per phase the dY rows under the band are copied padded
    (:func:`plane_rows`) and each phase row summed by ``fc_direct_nhwc_row`` (output
    values ``sw`` apart).

    ``phases[p]``: phase p's (py, px), output rows and columns, taps per column
    (KH), taps per row (C_out * KW), padded columns [lo, hi) that show dY column
    ``q - left``, the row length Wp, whether its rows are shared (as
    :func:`forward_pixel_rows`' ``shared``) and its first row of ``wpack``;
    ``rowmaps[p, i*KH + kh]``, ``colmaps[p, q]``, ``offsets[p, t]``: as
    :func:`forward_pixel_rows`' rowmap, colmap and offsets for the phase.

    # IN  dy: (N, C_out, OH, OW); wpack: the phases' filters (each as pack_weight_rows
    #     with NCHW rows), stacked by rows; zeros: (wpack.shape[1],) zeros
    # OUT grad_x: (N, C_in, H, W); every element written where the phases cover it
    # workspace: n_threads equal slices of the largest phase band's rows; row_pointers:
    #     n_threads * 3 * band_rows * (the largest KH)
    """
    cdef Py_ssize_t N = dy.shape[0], Cd = dy.shape[1], Hd = dy.shape[2], Wd = dy.shape[3]
    cdef Py_ssize_t C = grad_x.shape[1], plane = grad_x.shape[2] * grad_x.shape[3]
    cdef Py_ssize_t n_phases = phases.shape[0]
    cdef Py_ssize_t most_rows = 0, p
    for p in range(n_phases):
        most_rows = max(most_rows, phases[p, PHASE_OH])
    cdef Py_ssize_t bands = (most_rows + band_rows - 1) // band_rows
    cdef Py_ssize_t per_thread = workspace.shape[0] // n_threads
    cdef Py_ssize_t per_pointers = row_pointers.shape[0] // n_threads
    cdef Py_ssize_t item, n, i0, R, r, Wp, KH
    cdef Band b
    cdef int tid
    cdef floating *rows
    cdef floating *row_out
    cdef const floating **rowp
    cdef const floating *w
    if phases.shape[1] != PHASE_FIELDS:
        raise ValueError(f"phases must have {PHASE_FIELDS} columns, got {phases.shape[1]}")
    if wide and not FC_V4_BUILD_RUNS():
        raise ValueError("wide: this CPU does not run the AVX-512 kernel")
    if N == 0 or bands == 0:
        return
    for item in prange(N * bands, nogil=True, num_threads=n_threads, schedule="dynamic"):
        b = band_item(item, bands, band_rows, most_rows)
        n, i0 = b.n, b.oh0
        tid = openmp.omp_get_thread_num()
        rows = &workspace[tid * per_thread]
        rowp = <const floating **> &row_pointers[tid * per_pointers]
        for p in range(n_phases):
            R = min(band_rows, phases[p, PHASE_OH] - i0)
            if R <= 0:
                continue
            KH = phases[p, PHASE_KH]
            Wp = phases[p, PHASE_WP]
            plane_rows(&dy[n, 0, 0, 0], Cd, Hd, Wd, i0, R, rows, Wp * Cd,
                       phases[p, PHASE_SHARED], rowp, &row_pointers[tid * per_pointers
                                                                    + band_rows * KH],
                       &rowmaps[p, 0], &colmaps[p, 0], phases[p, PHASE_LO],
                       phases[p, PHASE_HI], phases[p, PHASE_LEFT], Wp, KH, 1, 1)
            w = &wpack[phases[p, PHASE_WROW], 0]
            for r in range(R):
                row_out = &grad_x[n, 0, phases[p, PHASE_ROW] + (i0 + r) * stride_h,
                                  phases[p, PHASE_COL]]
                if floating is float:
                    fc_direct_nhwc_row_s(wide, rowp + r * KH, KH, &offsets[p, 0],
                                         phases[p, PHASE_TAPS], 1, w, wpack.shape[1],
                                         &zeros[0], False, row_out, C, phases[p, PHASE_OW],
                                         plane, stride_w, vectors)
                else:
                    fc_direct_nhwc_row_d(wide, rowp + r * KH, KH, &offsets[p, 0],
                                         phases[p, PHASE_TAPS], 1, w, wpack.shape[1],
                                         &zeros[0], False, row_out, C, phases[p, PHASE_OW],
                                         plane, stride_w, vectors)


def pack_phase_weight(const floating[:, :, :, ::1] weight, floating[:, ::1] out,
                      const Py_ssize_t[::1] tap_row, const Py_ssize_t[::1] tap_step,
                      int n_threads):
    """The stride phases' filters for :func:`input_grad_phases`: tap (kh, kw) of filter f
    and channel c, ``weight[f, c, kh, kw]``, goes to ``out[tap_row[k] + f*tap_step[k],
    c]`` (k = kh*KW + kw; no row where tap_row[k] < 0), zero past C. With tap_row the
    phase's first row plus ``t*F*KWp + u`` for its tap (t, u) and tap_step KWp, this is
    :func:`fastconv._direct.pack_weight_rows` (NCHW rows) of every phase's filters with
    the channel axes swapped, stacked.

    # IN  weight: (F, C, KH, KW); tap_row, tap_step: (KH*KW,)
    # OUT out: (rows, ldw >= C), every row some tap names written
    """
    cdef Py_ssize_t F = weight.shape[0], C = weight.shape[1], KW = weight.shape[3]
    cdef Py_ssize_t taps = tap_row.shape[0], ldw = out.shape[1]
    cdef Py_ssize_t f, k, c, row
    for f in prange(F, nogil=True, num_threads=n_threads, schedule="static"):
        for k in range(taps):
            if tap_row[k] < 0:
                continue
            row = tap_row[k] + f * tap_step[k]
            for c in range(C):
                out[row, c] = weight[f, c, k // KW, k % KW]
            for c in range(C, ldw):
                out[row, c] = 0
