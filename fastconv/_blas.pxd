# Row-major GEMM over scipy's BLAS, for float32 (sgemm) and float64 (dgemm).
from cython cimport floating

cdef void gemm_rm(bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                  floating alpha, const floating *a, Py_ssize_t lda,
                  const floating *b, Py_ssize_t ldb,
                  floating beta, floating *c, Py_ssize_t ldc, Py_ssize_t limit) noexcept nogil

cdef void gemm_rm_chunked(bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                          floating alpha, const floating *a, Py_ssize_t lda,
                          const floating *b, Py_ssize_t ldb,
                          floating beta, floating *c, Py_ssize_t ldc, Py_ssize_t chunk,
                          Py_ssize_t limit) noexcept nogil

cdef void gemm_nn(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating *a, Py_ssize_t lda,
                  const floating *b, Py_ssize_t ldb, floating beta, floating *c,
                  Py_ssize_t ldc, Py_ssize_t chunk, Py_ssize_t limit,
                  bint own_kernel, bint a_in_memory=*) noexcept nogil

cdef void gemm_nt(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating *a, Py_ssize_t lda,
                  const floating *b, Py_ssize_t ldb, floating beta, floating *c,
                  Py_ssize_t ldc, Py_ssize_t chunk, Py_ssize_t limit,
                  bint own_kernel, bint a_in_memory=*) noexcept nogil
