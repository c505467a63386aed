# One column phase of a padded input row, shared by the direct row kernel's and the
# implicit GEMM's drivers (fastconv/_conv_direct.pyx, fastconv/_conv_implicit.pyx).
from cython cimport floating
from libc.string cimport memcpy


cdef inline void copy_phase_row(const floating *row, floating *out, Py_ssize_t width,
                                const Py_ssize_t *colmap, Py_ssize_t map_step,
                                Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t first,
                                Py_ssize_t step) noexcept nogil:
    """``out[q]`` for ``q < width``: ``row[first + q*step]`` for q in ``[lo, hi)`` (inside
    the input: no lookup), else ``row[colmap[q*map_step]]``, or 0 where that is -1 (the
    padding mode's map of the padded column, fastconv._padding.source_map)."""
    cdef Py_ssize_t q, src
    for q in range(lo):
        src = colmap[q * map_step]
        out[q] = row[src] if src >= 0 else 0
    if step == 1:
        memcpy(out + lo, row + first + lo, (hi - lo) * sizeof(floating))
    elif step == 2:
        # constant-stride loop: the compiler vectorises it
        for q in range(lo, hi):
            out[q] = row[first + 2 * q]
    else:
        for q in range(lo, hi):
            out[q] = row[first + q * step]
    for q in range(hi, width):
        src = colmap[q * map_step]
        out[q] = row[src] if src >= 0 else 0
