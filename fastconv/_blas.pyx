"""Row-major GEMM on top of ``scipy.linalg.cython_blas``.

BLAS is column-major. A row-major matrix is the column-major storage of its
transpose, so ``C = op(A) op(B)`` in row-major order is computed as the
column-major product ``C^T = op(B)^T op(A)^T``: swap the operands (and m with
n), keep the transpose flags. No data is copied.
"""

from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, sgemm


cdef void gemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                  floating alpha, const floating *a, int lda,
                  const floating *b, int ldb,
                  floating beta, floating *c, int ldc) noexcept nogil:
    """C (m x n, row stride ldc) = alpha * op(A) (m x k) @ op(B) (k x n) + beta * C.

    ``lda``/``ldb`` are the row strides of A and B as stored (before op()).
    All dimensions must fit in a 32-bit int: callers tile to guarantee it.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float *> b, &ldb, <float *> a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double *> b, &ldb, <double *> a, &lda,
              &beta, c, &ldc)
