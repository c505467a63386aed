"""Row-major GEMM on top of ``scipy.linalg.cython_blas``.

BLAS is column-major. A row-major matrix is the column-major storage of its
transpose, so ``C = op(A) op(B)`` in row-major order is computed as the
column-major product ``C^T = op(B)^T op(A)^T``: swap the operands (and m with
n), keep the transpose flags. No data is copied.

BLAS takes every dimension and leading dimension as a 32-bit int.
:func:`gemm_rm` takes them as ``Py_ssize_t`` and cuts m, n and k into
pieces of at most ``limit`` (``fastconv._tiling.BLAS_INT_MAX``, which tests
lower); the leading dimensions cannot be cut, so callers keep them within
``limit`` (staging a tile through their workspace where a plane is wider).

Debugging aid for the tests (:func:`record_calls`): while recording, every
BLAS call's largest argument is kept, so a test can check that no dimension
or leading dimension handed to BLAS exceeded the limit. Off, it costs one
predictable branch per GEMM.
"""

from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, sgemm

cdef extern from *:
    """
    /* relaxed atomics: the counters are read after the parallel region ends */
    static inline void fc_atomic_add(long long *p, long long v) {
        __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    }
    static inline void fc_atomic_max(long long *p, long long v) {
        long long seen = __atomic_load_n(p, __ATOMIC_RELAXED);
        while (v > seen && !__atomic_compare_exchange_n(p, &seen, v, 1, __ATOMIC_RELAXED,
                                                        __ATOMIC_RELAXED)) {
        }
    }
    """
    void fc_atomic_add(long long *p, long long v) noexcept nogil
    void fc_atomic_max(long long *p, long long v) noexcept nogil


cdef bint _recording = False
cdef long long _calls = 0          # BLAS calls made while recording
cdef long long _largest = 0        # the largest m, n, k or leading dimension among them
cdef long long _over = 0           # calls with an argument above the limit they were given


cdef inline void _record(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, Py_ssize_t lda,
                         Py_ssize_t ldb, Py_ssize_t ldc, Py_ssize_t limit) noexcept nogil:
    cdef Py_ssize_t top = max(m, n, k, lda, ldb, ldc)
    fc_atomic_add(&_calls, 1)
    fc_atomic_max(&_largest, top)
    if top > limit:
        fc_atomic_add(&_over, 1)


cdef inline void _gemm(char *ta, char *tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                       floating alpha, const floating *a, Py_ssize_t lda,
                       const floating *b, Py_ssize_t ldb,
                       floating beta, floating *c, Py_ssize_t ldc,
                       Py_ssize_t limit) noexcept nogil:
    """One BLAS call: every argument already within ``limit`` (<= 2**31 - 1)."""
    cdef int im = <int> m, in_ = <int> n, ik = <int> k
    cdef int ilda = <int> lda, ildb = <int> ldb, ildc = <int> ldc
    if _recording:
        _record(m, n, k, lda, ldb, ldc, limit)
    if floating is float:
        sgemm(tb, ta, &in_, &im, &ik, &alpha, <float *> b, &ildb, <float *> a, &ilda,
              &beta, c, &ildc)
    else:
        dgemm(tb, ta, &in_, &im, &ik, &alpha, <double *> b, &ildb, <double *> a, &ilda,
              &beta, c, &ildc)


cdef void gemm_rm(bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                  floating alpha, const floating *a, Py_ssize_t lda,
                  const floating *b, Py_ssize_t ldb,
                  floating beta, floating *c, Py_ssize_t ldc, Py_ssize_t limit) noexcept nogil:
    """C (m x n, row stride ldc) = alpha * op(A) (m x k) @ op(B) (k x n) + beta * C.

    ``lda``/``ldb`` are the row strides of A and B as stored (before op()).
    m, n and k may exceed ``limit``: the product is cut into blocks of at
    most ``limit`` rows, columns and reduction terms (the k blocks after the
    first add to C). ``lda``, ``ldb`` and ``ldc`` must be at most ``limit``.
    In practice one block: the loops cost nothing next to the product.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef Py_ssize_t i0, j0, l0, mc, nc, kc
    cdef floating beta_l
    if m <= 0 or n <= 0:
        return
    i0 = 0
    while i0 < m:
        mc = min(m - i0, limit)
        j0 = 0
        while j0 < n:
            nc = min(n - j0, limit)
            # k == 0 still makes one call: it scales C by beta
            l0 = 0
            beta_l = beta
            while True:
                kc = min(k - l0, limit)
                # A (m x k): row i at i*lda (not trans_a) or column i at i (trans_a)
                _gemm(&ta, &tb, mc, nc, kc, alpha,
                      a + (i0 + l0 * lda if trans_a else i0 * lda + l0), lda,
                      b + (j0 * ldb + l0 if trans_b else l0 * ldb + j0), ldb,
                      beta_l, c + i0 * ldc + j0, ldc, limit)
                beta_l = 1
                l0 += kc
                if l0 >= k:
                    break
            j0 += nc
        i0 += mc


cdef void gemm_rm_chunked(bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                          floating alpha, const floating *a, Py_ssize_t lda,
                          const floating *b, Py_ssize_t ldb,
                          floating beta, floating *c, Py_ssize_t ldc, Py_ssize_t chunk,
                          Py_ssize_t limit) noexcept nogil:
    """:func:`gemm_rm` with the reduction cut into calls of at most ``chunk`` terms, each
    after the first adding to C (``chunk`` <= 0: one call).

    The BLAS kernel sums all k terms of an element in one register, so its float
    rounding grows with k; summed ``chunk`` at a time, then chunk by chunk, it
    grows with about ``chunk + k/chunk``. Winograd's output transform amplifies
    that rounding (``fastconv._winograd.SUM_CHUNK``). Each call after the first
    reads and writes C once more, so chunks must stay long enough for the
    products to dominate.
    """
    cdef Py_ssize_t l0 = 0, kc
    cdef floating beta_l = beta
    if chunk <= 0:
        chunk = max(k, 1)       # one call, as gemm_rm
    while True:
        kc = min(k - l0, chunk)
        gemm_rm(trans_a, trans_b, m, n, kc, alpha,
                a + (l0 * lda if trans_a else l0), lda,
                b + (l0 if trans_b else l0 * ldb), ldb,
                beta_l, c, ldc, limit)
        beta_l = 1
        l0 += kc
        if l0 >= k:
            break


def record_calls(bint on):
    """Start (resetting the counters) or stop recording BLAS calls; see :func:`recorded`.

    For tests only: the counters are process-wide, so recording while another
    Python thread runs a convolution mixes its calls in.
    """
    global _recording, _calls, _largest, _over
    if on:
        _calls = 0
        _largest = 0
        _over = 0
    _recording = on


def recorded():
    """``(calls, largest, over_limit)`` since :func:`record_calls` (True): BLAS calls made, the
    largest m, n, k, lda, ldb or ldc among them, and how many had one above their limit."""
    return int(_calls), int(_largest), int(_over)
