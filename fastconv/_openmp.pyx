"""What OpenMP allows this process to use."""

cimport openmp


def omp_max_threads():
    """``omp_get_max_threads()``: honours OMP_NUM_THREADS and the CPU affinity mask."""
    return openmp.omp_get_max_threads()
