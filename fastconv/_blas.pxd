# Row-major GEMM over scipy's BLAS, for float32 (sgemm) and float64 (dgemm).
from cython cimport floating

cdef void gemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                  floating alpha, const floating *a, int lda,
                  const floating *b, int ldb,
                  floating beta, floating *c, int ldc) noexcept nogil
