"""Thread counts: the ``n_threads`` convention and single-threaded BLAS inside OpenMP regions.

fastconv parallelises with OpenMP over work items and calls BLAS from every
thread. BLAS must then run single-threaded, or the two thread pools would
oversubscribe the cores.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController

from fastconv._openmp import omp_max_threads
from fastconv._validation import resolve_n_threads


def effective_n_threads(n_threads: int | None = None) -> int:
    """Resolve ``n_threads`` to a positive count.

    None means every core OpenMP may use (``OMP_NUM_THREADS`` and the CPU
    affinity mask are honoured), a positive int is taken as is, and a negative
    one counts back from all cores (-1 = all, -2 = all but one, at least 1).
    0 is a ValueError; non-integers (bools included) are a TypeError; more
    than :func:`max_n_threads` is a ValueError.
    """
    cores = omp_max_threads()
    return resolve_n_threads(n_threads, cores, max_n_threads(cores))


def max_n_threads(cores: int | None = None) -> int:
    """The most threads ``n_threads`` may ask for: 4 per core, at least 64.

    Past a few per core threads only oversubscribe, and each costs a stack and
    a workspace tile; libgomp crashes when it cannot create them. The cores are
    the CPUs of the machine, or OpenMP's count (``cores``) if it is larger, so
    ``OMP_NUM_THREADS=1`` does not forbid an explicit ``n_threads=8``.
    """
    if cores is None:
        cores = omp_max_threads()
    return max(64, 4 * max(cores, os.cpu_count() or 1))


class _SingleThreadedBlas:
    """Re-entrant, thread-safe "BLAS uses one thread" switch.

    The BLAS library handles are looked up once (threadpoolctl scans the loaded
    libraries, which costs far more than a convolution of a small layer); after
    that, entering costs a ctypes call per library. A counter keeps concurrent
    callers from restoring the thread count while another one still runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._libraries = None
        self._saved: list[int] = []

    def _blas_libraries(self):
        if self._libraries is None:
            self._libraries = ThreadpoolController().select(user_api="blas").lib_controllers
        return self._libraries

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                libraries = self._blas_libraries()
                self._saved = [lib.num_threads for lib in libraries]
                for lib, n in zip(libraries, self._saved):
                    if n != 1:
                        _set_num_threads(lib, 1)
            self._depth += 1
        return self

    def __exit__(self, *exc_info):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in zip(self._libraries, self._saved):
                    if n != 1:
                        _set_num_threads(lib, n)
        return False


def _set_num_threads(lib, n: int) -> None:
    """Set a BLAS library's thread count from whichever Python thread we are on.

    threadpoolctl (>= 3.6) lets only one "controlling" Python thread change a
    pthreads OpenBLAS and silently ignores the others, so a conv called from a
    worker thread would run BLAS multi-threaded inside its OpenMP region (and a
    worker leaving last could never restore the count). The lock and depth
    counter of :class:`_SingleThreadedBlas` already serialise our changes
    process-wide, so the raw setter is safe here.
    """
    getattr(lib, "_real_set_num_threads", lib.set_num_threads)(n)


#: Context manager: ``with single_threaded_blas: ...`` around every kernel call.
single_threaded_blas = _SingleThreadedBlas()
