# The weight-gradient kernel shared by the row kernel's and the implicit GEMM's drivers
# (fastconv/_conv_direct.pyx, fastconv/_conv_implicit.pyx); see _weight_grad_kernels.h.

cdef extern from "_weight_grad_kernels.h" nogil:
    void fc_weight_grad_band_s(const float *rows, Py_ssize_t band_stride, const Py_ssize_t *off,
                               Py_ssize_t K, const float *dy, Py_ssize_t ldo, Py_ssize_t F,
                               Py_ssize_t OW, Py_ssize_t R, float *g, Py_ssize_t ldg)
    void fc_weight_grad_band_d(const double *rows, Py_ssize_t band_stride,
                               const Py_ssize_t *off, Py_ssize_t K, const double *dy,
                               Py_ssize_t ldo, Py_ssize_t F, Py_ssize_t OW, Py_ssize_t R,
                               double *g, Py_ssize_t ldg)
