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


#: The machine's CPU count, read once: os.cpu_count() cost ~18 us per call here (it
#: parses /sys), a visible share of a small layer's convolution.
_MACHINE_CPUS = os.cpu_count() or 1


def max_n_threads(cores: int | None = None) -> int:
    """The most threads ``n_threads`` may ask for: 4 per core, at least 64.

    Past a few per core threads only oversubscribe, and each costs a stack and
    a workspace tile; libgomp crashes when it cannot create them. The cores are
    the CPUs of the machine, or OpenMP's count (``cores``) if it is larger, so
    ``OMP_NUM_THREADS=1`` does not forbid an explicit ``n_threads=8``.
    """
    if cores is None:
        cores = omp_max_threads()
    return max(64, 4 * max(cores, _MACHINE_CPUS))


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
        """``(get, set)`` thread-count callables of every loaded BLAS, looked up once."""
        if self._libraries is None:
            controllers = ThreadpoolController().select(user_api="blas").lib_controllers
            self._libraries = [_thread_count_functions(lib) for lib in controllers]
        return self._libraries

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                libraries = self._blas_libraries()
                self._saved = [get() for get, _ in libraries]
                for (_, set_), n in zip(libraries, self._saved):
                    if n != 1:
                        set_(1)
            self._depth += 1
        return self

    def __exit__(self, *exc_info):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for (_, set_), n in zip(self._libraries, self._saved):
                    if n != 1:
                        set_(n)
        return False


def _thread_count_functions(lib):
    """``(get, set)`` for one threadpoolctl library controller.

    For a pthreads OpenBLAS these are its C functions themselves (ctypes): going
    through the controller's properties looks the symbols up on every call, and
    entering plus leaving cost 14 us per convolution, a tenth of a small
    layer's. Other libraries keep the controller's methods.
    """
    if (getattr(lib, "internal_api", None) == "openblas"
            and getattr(lib, "threading_layer", None) != "openmp"):
        get = lib._get_symbol("openblas_get_num_threads")
        set_ = lib._get_symbol("openblas_set_num_threads")
        if get is not None and set_ is not None:
            return get, set_
    return (lambda: lib.num_threads), (lambda n: _set_num_threads(lib, n))


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
