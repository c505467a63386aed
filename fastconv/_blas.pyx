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

cdef extern from "_gemm_kernels.h" nogil:
    # C = A B (+ C), row-major, the reduction summed `chunk` terms at a time (x86-64-v4);
    # prefetch_a: A in memory
    void fc_gemm_nn_s(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float *a, Py_ssize_t lda,
                      const float *b, Py_ssize_t ldb, float *c, Py_ssize_t ldc, int accumulate,
                      Py_ssize_t chunk, int prefetch_a)
    # C = A B^T (+ C), B stored n x k, row-major, the same way; prefetch_a: A in memory
    void fc_gemm_nt_s(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float *a, Py_ssize_t lda,
                      const float *b, Py_ssize_t ldb, float *c, Py_ssize_t ldc, int accumulate,
                      Py_ssize_t chunk, int prefetch_a)
    bint FC_V4_BUILD_RUNS()

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


#: Whether :func:`gemm_nn` runs fastconv's own kernel (fastconv/_gemm_kernels.h) for
#: float32; BLAS where the CPU lacks AVX-512 or after ``use_own_kernel(False)``.
cdef bint _own_float = FC_V4_BUILD_RUNS()

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


cdef void gemm_nn(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating *a, Py_ssize_t lda,
                  const floating *b, Py_ssize_t ldb, floating beta, floating *c,
                  Py_ssize_t ldc, Py_ssize_t chunk, Py_ssize_t limit,
                  bint own_kernel, bint a_in_memory=False) noexcept nogil:
    """C (m x n) = A (m x k) @ B (k x n) + beta * C, beta 0 or 1, the reduction summed
    ``chunk`` terms at a time as :func:`gemm_rm_chunked` does (``chunk`` <= 0: whole).

    For the Winograd GEMMs, whose operands lie in the workspace: with ``own_kernel``
    (where the caller measured it faster), float32 by fastconv's own AVX-512 kernel
    (no packed copies of the operands) where the CPU runs it, else BLAS. The kernel
    takes any size (no ``limit``). ``a_in_memory``: as :func:`gemm_nt`'s.
    """
    if floating is float:
        if own_kernel and _own_float:
            fc_gemm_nn_s(m, n, k, a, lda, b, ldb, c, ldc, beta != 0, chunk, a_in_memory)
            return
    gemm_rm_chunked(False, False, m, n, k, 1, a, lda, b, ldb, beta, c, ldc, chunk, limit)


cdef void gemm_nt(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating *a, Py_ssize_t lda,
                  const floating *b, Py_ssize_t ldb, floating beta, floating *c,
                  Py_ssize_t ldc, Py_ssize_t chunk, Py_ssize_t limit,
                  bint own_kernel, bint a_in_memory=False) noexcept nogil:
    """C (m x n) = A (m x k) @ B.T + beta * C with B stored (n x k), beta 0 or 1, summed
    ``chunk`` terms at a time: :func:`gemm_nn`'s contract for a weight gradient's GEMM
    (both operands' rows run along the reduction). The own kernel transposes B one
    L1-sized panel at a time (``fc_gemm_nt_s``); callers pass the operand with fewer
    rows as B. ``a_in_memory``: A is read from memory rather than cache, and the own
    kernel fetches each next block of its rows ahead."""
    if floating is float:
        if own_kernel and _own_float:
            fc_gemm_nt_s(m, n, k, a, lda, b, ldb, c, ldc, beta != 0, chunk, a_in_memory)
            return
    gemm_rm_chunked(False, True, m, n, k, 1, a, lda, b, ldb, beta, c, ldc, chunk, limit)


def gemm(const floating[:, ::1] a, const floating[:, ::1] b, floating[:, ::1] c,
         floating beta=0, Py_ssize_t chunk=0, bint own_kernel=True, bint transposed_b=False,
         bint a_in_memory=False):
    """``c[...] = a @ b + beta * c`` by :func:`gemm_nn` (beta 0 or 1), for tests; with
    ``transposed_b``, ``c[...] = a @ b.T + beta * c`` by :func:`gemm_nt` (either
    prefetching ``a`` with ``a_in_memory``).

    # IN  a: (m, k); b: (k, n), or (n, k) with transposed_b; OUT c: (m, n)
    """
    cdef const floating *pa = NULL
    cdef const floating *pb = NULL
    cdef Py_ssize_t limit = 2147483647, lda = max(a.shape[1], 1)
    cdef Py_ssize_t k = b.shape[1] if transposed_b else b.shape[0]
    cdef Py_ssize_t n = b.shape[0] if transposed_b else b.shape[1]
    if a.shape[1] != k or c.shape[0] != a.shape[0] or c.shape[1] != n:
        raise ValueError(f"gemm: shapes ({a.shape[0]}, {a.shape[1]}) @ ({b.shape[0]}, "
                         f"{b.shape[1]}){'.T' if transposed_b else ''} -> ({c.shape[0]}, "
                         f"{c.shape[1]}) do not match")
    if beta != 0 and beta != 1:
        raise ValueError(f"gemm: beta must be 0 or 1, got {beta}")
    # empty operands have no data pointer to take
    if c.shape[0] == 0 or c.shape[1] == 0:
        return
    if a.shape[1] > 0:
        pa = &a[0, 0]
        pb = &b[0, 0]
    with nogil:
        if transposed_b:
            gemm_nt(c.shape[0], c.shape[1], k, pa, lda, pb, lda, beta, &c[0, 0], c.shape[1],
                    chunk, limit, own_kernel, a_in_memory)
        else:
            gemm_nn(c.shape[0], c.shape[1], k, pa, lda, pb, c.shape[1], beta, &c[0, 0],
                    c.shape[1], chunk, limit, own_kernel, a_in_memory)


def own_kernel_runs():
    """Whether the CPU runs the own GEMM kernel of :func:`gemm_nn` (x86-64-v4)."""
    return bool(FC_V4_BUILD_RUNS())


def own_kernel_on():
    """Whether :func:`gemm_nn` and :func:`gemm_nt` take the own float32 kernel now: the CPU
    runs it and :func:`use_own_kernel` has not turned it off."""
    return bool(_own_float)


def use_own_kernel(bint on):
    """Let :func:`gemm_nn` use its own float32 kernel (the default where the CPU runs it)
    or BLAS only; returns the previous setting. For tests and measurements: it is
    process-wide."""
    global _own_float
    previous = bool(_own_float)
    if on and not FC_V4_BUILD_RUNS():
        raise ValueError("use_own_kernel: this CPU (or build) has no x86-64-v4 kernel")
    _own_float = on
    return previous


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
