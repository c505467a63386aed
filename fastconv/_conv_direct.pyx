"""Direct convolution for layers with few input channels (the first layers of a network).

One work item is a band of output rows ``(n, oh0 .. oh0 + R)`` of every filter.
Each row's KH input rows (per channel) are copied into the thread's workspace
in *phase* form: padded
by the padding mode, and split by column residue modulo the stride, so each
kernel tap reads one contiguous run. The register-blocked C kernel
(``fastconv/_direct_kernels.h``) then sums the C*KH*KW taps for 4 filters x
up to 24 columns at a time and writes ``act(sum + bias)``, filter block by
filter block over the band, so each block's 4 output planes are written in
order. Nothing is shared between items, so the loop is a plain ``prange``;
the workspace is one band's rows per thread, whatever the batch.
"""

cimport openmp
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy


cdef extern from "_direct_kernels.h" nogil:
    void fc_direct_band_s(const float *rows, Py_ssize_t ldr, Py_ssize_t band_stride,
                          const unsigned char *live, const float *wpack, const Py_ssize_t *tap,
                          int C, int KH, int KW, int S, Py_ssize_t F, const float *bias,
                          int relu, float *out, Py_ssize_t ldo, Py_ssize_t OW, Py_ssize_t R)
    void fc_direct_band_d(const double *rows, Py_ssize_t ldr, Py_ssize_t band_stride,
                          const unsigned char *live, const double *wpack, const Py_ssize_t *tap,
                          int C, int KH, int KW, int S, Py_ssize_t F, const double *bias,
                          int relu, double *out, Py_ssize_t ldo, Py_ssize_t OW, Py_ssize_t R)


def forward(const floating[:, :, :, ::1] x, const floating[::1] wpack, const floating[::1] bias,
            floating[:, :, :, ::1] y, floating[::1] workspace, unsigned char[::1] live_flags,
            const Py_ssize_t[::1] rowmap, const Py_ssize_t[::1] colmap,
            const Py_ssize_t[::1] lo, const Py_ssize_t[::1] hi, Py_ssize_t left,
            const Py_ssize_t[::1] tap, int KH, int KW, int stride_w, Py_ssize_t ldr,
            Py_ssize_t band_rows, bint relu, int n_threads):
    """y[n, f, oh, :] = act(sum_{c, kh, kw} w[f, c, kh, kw] * x_padded[n, c, ih, iw] + bias[f]).

    ``rowmap[oh*KH + kh]`` is the input row under output row oh's tap row kh,
    ``colmap[p]`` the input column under padded column ``p``, or -1 (zero); in phase ``r`` the columns ``[lo[r], hi[r])``
    are inside the input (plane column ``q*S + r - left``: copied without a
    lookup). ``tap[kw]`` is where kernel column kw starts in a row's phases
    (see the header).

    # IN  x: (N, C, H, W); wpack: filters packed by _direct.pack_weight; bias: (F,) or None
    # IN  rowmap: (OH*KH,); colmap: (stride_w*ldr,)
    # OUT y: (N, F, OH, OW), every element written
    # workspace: n_threads * band_rows * C * KH * stride_w * ldr;
    # live_flags: n_threads * band_rows * KH
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t F = y.shape[1], OH = y.shape[2], OW = y.shape[3]
    cdef Py_ssize_t S = stride_w
    cdef Py_ssize_t row_size = C * KH * S * ldr
    cdef Py_ssize_t bands = (OH + band_rows - 1) // band_rows
    cdef Py_ssize_t per_thread = band_rows * row_size
    cdef const floating *bias_ptr = NULL
    cdef Py_ssize_t item, n, band, oh0, R, r, oh, kh, c, ph, q, src_row, src_col
    cdef int tid
    cdef floating *rows
    cdef floating *dst
    cdef const floating *plane_row
    cdef unsigned char *live
    if N == 0:
        return
    if bias is not None:
        bias_ptr = &bias[0]
    for item in prange(N * bands, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // bands
        band = item - n * bands
        oh0 = band * band_rows
        R = min(band_rows, OH - oh0)
        tid = openmp.omp_get_thread_num()
        for r in range(R):
            oh = oh0 + r
            rows = &workspace[tid * per_thread + r * row_size]
            live = &live_flags[(tid * band_rows + r) * KH]
            for kh in range(KH):
                src_row = rowmap[oh * KH + kh]
                live[kh] = src_row >= 0
                if src_row < 0:
                    continue
                for c in range(C):
                    plane_row = &x[n, c, src_row, 0]
                    for ph in range(S):
                        dst = rows + ((c * KH + kh) * S + ph) * ldr
                        # phase ph's columns [lo[ph], hi[ph]) map to plane columns
                        # q*S + ph - left
                        for q in range(lo[ph]):
                            src_col = colmap[q * S + ph]
                            dst[q] = plane_row[src_col] if src_col >= 0 else 0
                        if S == 1:
                            memcpy(dst + lo[0], plane_row + lo[0] - left,
                                   (hi[0] - lo[0]) * sizeof(floating))
                        else:
                            for q in range(lo[ph], hi[ph]):
                                dst[q] = plane_row[q * S + ph - left]
                        for q in range(hi[ph], ldr):
                            src_col = colmap[q * S + ph]
                            dst[q] = plane_row[src_col] if src_col >= 0 else 0
        rows = &workspace[tid * per_thread]
        live = &live_flags[tid * band_rows * KH]
        if floating is float:
            fc_direct_band_s(rows, ldr, row_size, live, &wpack[0], &tap[0], <int> C, KH, KW,
                             <int> S, F, bias_ptr, relu, &y[n, 0, oh0, 0], OH * OW, OW, R)
        else:
            fc_direct_band_d(rows, ldr, row_size, live, &wpack[0], &tap[0], <int> C, KH, KW,
                             <int> S, F, bias_ptr, relu, &y[n, 0, oh0, 0], OH * OW, OW, R)
