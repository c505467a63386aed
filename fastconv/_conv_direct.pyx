"""Direct convolution for layers with few input channels (the first layers of a network).

One work item is one output row ``(n, oh)`` of every filter. Its KH input rows
(per channel) are copied into the thread's workspace in *phase* form: padded
by the padding mode, and split by column residue modulo the stride, so each
kernel tap reads one contiguous run. The register-blocked C kernel
(``fastconv/_direct_kernels.h``) then sums the C*KH*KW taps for 4 filters x
up to 24 columns at a time and writes ``act(sum + bias)``. Nothing is shared
between items, so the loop is a plain ``prange``; the workspace is one item's
rows per thread, whatever the batch.
"""

cimport openmp
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy


cdef extern from "_direct_kernels.h" nogil:
    void fc_direct_row_s(const float *rows, Py_ssize_t ldr, const unsigned char *live,
                         const float *wpack, const Py_ssize_t *tap, int C, int KH, int KW, int S,
                         Py_ssize_t F, const float *bias, int relu, float *out, Py_ssize_t ldo,
                         Py_ssize_t OW)
    void fc_direct_row_d(const double *rows, Py_ssize_t ldr, const unsigned char *live,
                         const double *wpack, const Py_ssize_t *tap, int C, int KH, int KW,
                         int S, Py_ssize_t F, const double *bias, int relu, double *out,
                         Py_ssize_t ldo, Py_ssize_t OW)


def forward(const floating[:, :, :, ::1] x, const floating[::1] wpack, const floating[::1] bias,
            floating[:, :, :, ::1] y, floating[::1] workspace, unsigned char[::1] live_flags,
            const Py_ssize_t[::1] rowmap, const Py_ssize_t[::1] colmap,
            const Py_ssize_t[::1] lo, const Py_ssize_t[::1] hi, Py_ssize_t left,
            const Py_ssize_t[::1] tap, int KH, int KW, int stride_w, Py_ssize_t ldr, bint relu,
            int n_threads):
    """y[n, f, oh, :] = act(sum_{c, kh, kw} w[f, c, kh, kw] * x_padded[n, c, ih, iw] + bias[f]).

    ``rowmap[oh*KH + kh]`` is the input row under output row oh's tap row kh,
    ``colmap[p]`` the input column under padded column ``p``, or -1 (zero); in phase ``r`` the columns ``[lo[r], hi[r])``
    are inside the input (plane column ``q*S + r - left``: copied without a
    lookup). ``tap[kw]`` is where kernel column kw starts in a row's phases
    (see the header).

    # IN  x: (N, C, H, W); wpack: filters packed by _direct.pack_weight; bias: (F,) or None
    # IN  rowmap: (OH*KH,); colmap: (stride_w*ldr,)
    # OUT y: (N, F, OH, OW), every element written
    # workspace: n_threads * C * KH * stride_w * ldr; live_flags: n_threads * KH
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t F = y.shape[1], OH = y.shape[2], OW = y.shape[3]
    cdef Py_ssize_t S = stride_w
    cdef Py_ssize_t per_thread = C * KH * S * ldr
    cdef const floating *bias_ptr = NULL
    cdef Py_ssize_t item, n, oh, kh, c, r, q, src_row, src_col
    cdef int tid
    cdef floating *rows
    cdef floating *dst
    cdef const floating *plane_row
    cdef unsigned char *live
    if N == 0:
        return
    if bias is not None:
        bias_ptr = &bias[0]
    for item in prange(N * OH, nogil=True, num_threads=n_threads, schedule="static"):
        n = item // OH
        oh = item - n * OH
        tid = openmp.omp_get_thread_num()
        rows = &workspace[tid * per_thread]
        live = &live_flags[tid * KH]
        for kh in range(KH):
            src_row = rowmap[oh * KH + kh]
            live[kh] = src_row >= 0
            if src_row < 0:
                continue
            for c in range(C):
                plane_row = &x[n, c, src_row, 0]
                for r in range(S):
                    dst = rows + ((c * KH + kh) * S + r) * ldr
                    # phase r's columns [lo[r], hi[r]) map to plane columns q*S + r - left
                    for q in range(lo[r]):
                        src_col = colmap[q * S + r]
                        dst[q] = plane_row[src_col] if src_col >= 0 else 0
                    if S == 1:
                        memcpy(dst + lo[0], plane_row + lo[0] - left,
                               (hi[0] - lo[0]) * sizeof(floating))
                    else:
                        for q in range(lo[r], hi[r]):
                            dst[q] = plane_row[q * S + r - left]
                    for q in range(hi[r], ldr):
                        src_col = colmap[q * S + r]
                        dst[q] = plane_row[src_col] if src_col >= 0 else 0
        if floating is float:
            fc_direct_row_s(rows, ldr, live, &wpack[0], &tap[0], <int> C, KH, KW, <int> S, F,
                            bias_ptr, relu, &y[n, 0, oh, 0], OH * OW, OW)
        else:
            fc_direct_row_d(rows, ldr, live, &wpack[0], &tap[0], <int> C, KH, KW, <int> S, F,
                            bias_ptr, relu, &y[n, 0, oh, 0], OH * OW, OW)
