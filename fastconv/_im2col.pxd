# Per-image im2col / col2im kernels in Caffe's column layout, shared by the drivers.
from cython cimport floating


ctypedef struct ConvGeom:
    Py_ssize_t C, H, W          # input channels and plane size
    Py_ssize_t KH, KW           # kernel size
    Py_ssize_t stride_h, stride_w
    Py_ssize_t pad_top, pad_left  # bottom/right padding only shows up through OH/OW
    Py_ssize_t dilation_h, dilation_w
    Py_ssize_t OH, OW           # output plane size


cdef ConvGeom make_geom(object geometry) except *

cdef void im2col_tile(const floating *img, const ConvGeom *g,
                      Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t p0, Py_ssize_t p1,
                      floating *col, Py_ssize_t ld) noexcept nogil

cdef void col2im_tile_add(const floating *col, const ConvGeom *g,
                          Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t p0, Py_ssize_t p1,
                          Py_ssize_t ld, floating *img) noexcept nogil
