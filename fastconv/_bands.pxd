# Work items that are bands of output rows of one image, shared by the drivers that
# split a batch that way (fastconv/_conv_direct.pyx, fastconv/_conv_implicit.pyx).

cdef struct Band:
    Py_ssize_t n      # the image
    Py_ssize_t oh0    # its first output row
    Py_ssize_t rows   # its rows: band_rows, fewer in an image's last band


cdef inline Band band_item(Py_ssize_t item, Py_ssize_t bands, Py_ssize_t band_rows,
                           Py_ssize_t OH) noexcept nogil:
    """Item ``item`` of ``N * bands``: band ``item % bands`` of image ``item // bands``."""
    cdef Band b
    b.n = item // bands
    b.oh0 = (item - b.n * bands) * band_rows
    b.rows = min(band_rows, OH - b.oh0)
    return b
