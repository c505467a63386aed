# Per-image im2col / col2im kernels in Caffe's column layout, shared by the drivers.
from cython cimport floating


ctypedef struct ConvGeom:
    Py_ssize_t C, H, W          # input channels and plane size
    Py_ssize_t KH, KW           # kernel size
    Py_ssize_t stride_h, stride_w
    Py_ssize_t pad_top, pad_left  # bottom/right padding only shows up through OH/OW
    Py_ssize_t dilation_h, dilation_w
    Py_ssize_t OH, OW           # output plane size
    Py_ssize_t groups           # channels c and filters f pair up within groups of C/groups, F/groups
    int mode                    # padding mode: one of the PAD_* codes below


# Padding modes, in the order of fastconv._validation.PADDING_MODES.
cdef enum:
    PAD_ZEROS = 0
    PAD_REFLECT = 1
    PAD_REPLICATE = 2
    PAD_CIRCULAR = 3


cdef inline Py_ssize_t source_index(Py_ssize_t i, Py_ssize_t n, int mode) noexcept nogil:
    """The input index a padded index ``i`` (in ``[-pad, n + pad)``) reads, or -1 for a zero.

    Validation guarantees one reflection/wrap is enough: reflect padding is
    < n, circular padding <= n (PyTorch's limits).
    """
    if <size_t> i < <size_t> n:
        return i
    if mode == PAD_ZEROS:
        return -1
    if mode == PAD_REFLECT:
        return -i if i < 0 else 2 * (n - 1) - i
    if mode == PAD_REPLICATE:
        return 0 if i < 0 else n - 1
    return i + n if i < 0 else i - n


cdef ConvGeom make_geom(object geometry) except *

cdef void im2col_tile(const floating *img, const ConvGeom *g,
                      Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t p0, Py_ssize_t p1,
                      floating *col, Py_ssize_t ld) noexcept nogil

cdef void col2im_tile_add(const floating *col, const ConvGeom *g,
                          Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t p0, Py_ssize_t p1,
                          Py_ssize_t ld, floating *img) noexcept nogil
