"""Threads: the n_threads convention, single-threaded BLAS inside kernels, the OpenMP
environment, and conv2d called from several Python threads at once."""

import concurrent.futures
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
from _helpers import run_in_thread
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

import fastconv
from fastconv._openmp import omp_max_threads
from fastconv._threads import effective_n_threads, single_threaded_blas


def blas_thread_counts():
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


# --- effective_n_threads -------------------------------------------------------------

def test_effective_n_threads():
    cores = omp_max_threads()
    assert cores >= 1
    assert effective_n_threads() == cores
    assert effective_n_threads(None) == cores
    assert effective_n_threads(1) == 1
    assert effective_n_threads(3) == 3
    assert effective_n_threads(cores + 5) == cores + 5       # taken as is
    assert effective_n_threads(np.int32(2)) == 2
    assert effective_n_threads(-1) == cores
    assert effective_n_threads(-2) == max(cores - 1, 1)
    assert effective_n_threads(-cores) == 1
    assert effective_n_threads(-cores - 10) == 1
    with pytest.raises(ValueError, match="n_threads=0"):
        effective_n_threads(0)
    with pytest.raises(TypeError, match="n_threads must be an int"):
        effective_n_threads(True)
    with pytest.raises(TypeError, match="n_threads must be an int"):
        effective_n_threads(2.0)


def _python(code, **env_changes):
    """Run ``code`` in a fresh interpreter with the OpenMP variables of this process cleared."""
    env = dict(os.environ)
    # importing fastconv here set GOMP_SPINCOUNT in this process: do not leak it
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(name, None)
    env.update(env_changes)
    # outside the repository, so the installed fastconv is imported, never the source folder
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_omp_num_threads_sets_the_default():
    code = ("from fastconv._threads import effective_n_threads as e; "
            "print(e(None), e(-1), e(-2), e(4))")
    assert _python(code, OMP_NUM_THREADS="1") == "1 1 1 4"
    assert _python(code, OMP_NUM_THREADS="3") == "3 3 2 4"


SPIN_CODE = "import os, fastconv; print(os.environ.get('GOMP_SPINCOUNT'))"


@pytest.mark.parametrize("env, expected", [
    ({}, "20000"),                                                # neither set: bounded spin
    ({"GOMP_SPINCOUNT": "123"}, "123"),                           # the user's value wins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "None"),                     # a wait policy: hands off
    ({"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "7"}, "7"),
], ids=["unset", "spincount-set", "wait-policy-set", "both-set"])
def test_gomp_spincount_only_when_unset(env, expected):
    assert _python(SPIN_CODE, **env) == expected


# --- single_threaded_blas ------------------------------------------------------------

@pytest.fixture
def blas_at_two_threads():
    """Every BLAS library at 2 threads (restored afterwards), so "1 inside" is a change."""
    if not blas_thread_counts():
        pytest.skip("no BLAS library found by threadpoolctl")
    with threadpool_limits(limits=2, user_api="blas"):
        if set(blas_thread_counts()) != {2}:
            pytest.skip("BLAS cannot run 2 threads here")
        yield


def test_single_threaded_blas_sets_and_restores(blas_at_two_threads):
    with single_threaded_blas:
        assert set(blas_thread_counts()) == {1}
    assert set(blas_thread_counts()) == {2}


def test_single_threaded_blas_restores_the_count_of_the_moment():
    if not blas_thread_counts():
        pytest.skip("no BLAS library found by threadpoolctl")
    for outside in (1, 2):
        with threadpool_limits(limits=outside, user_api="blas"):
            before = blas_thread_counts()
            with single_threaded_blas:
                assert set(blas_thread_counts()) == {1}
            assert blas_thread_counts() == before


def test_single_threaded_blas_is_reentrant(blas_at_two_threads):
    with single_threaded_blas:
        with single_threaded_blas:
            assert set(blas_thread_counts()) == {1}
        assert set(blas_thread_counts()) == {1}          # the outer block still runs
    assert set(blas_thread_counts()) == {2}


def test_single_threaded_blas_restores_after_an_exception(blas_at_two_threads):
    with pytest.raises(KeyError):
        with single_threaded_blas:
            with single_threaded_blas:
                raise KeyError("boom")
    assert set(blas_thread_counts()) == {2}
    with single_threaded_blas:                           # and it still works afterwards
        assert set(blas_thread_counts()) == {1}
    assert set(blas_thread_counts()) == {2}


def test_single_threaded_blas_covers_every_library(blas_at_two_threads):
    controller = ThreadpoolController()
    with single_threaded_blas:
        for lib in controller.select(user_api="blas").lib_controllers:
            assert lib.num_threads == 1, lib.filepath


def test_conv2d_leaves_blas_threads_as_they_were(blas_at_two_threads):
    x = np.ones((2, 3, 8, 8))
    fastconv.conv2d(x, np.ones((4, 3, 3, 3)), padding=1)
    fastconv.conv2d_backward(np.ones((2, 4, 8, 8)), x, np.ones((4, 3, 3, 3)), padding=1)
    assert set(blas_thread_counts()) == {2}


def _counts_inside():
    with single_threaded_blas:
        return set(blas_thread_counts())


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores for two BLAS threads")
def test_single_threaded_blas_in_a_fresh_process_worker_thread():
    """The first user of the switch may be any thread (here a worker, in a fresh interpreter)."""
    code = ("import threading, numpy, fastconv\n"
            "from threadpoolctl import threadpool_info\n"
            "from fastconv._threads import single_threaded_blas as s\n"
            "def counts(): return sorted({i['num_threads'] for i in threadpool_info() "
            "if i['user_api'] == 'blas'})\n"
            "out = []\n"
            "def work():\n"
            "    with s: out.append(counts())\n"
            "t = threading.Thread(target=work); t.start(); t.join()\n"
            "print(out[0], counts())\n")
    # inside: one thread; after: the two threads OpenBLAS started with
    assert _python(code, OPENBLAS_NUM_THREADS="2") == "[1] [2]"


def test_single_threaded_blas_in_a_worker_thread(blas_at_two_threads):
    """conv2d from a worker thread after the main thread used fastconv: BLAS must still be 1."""
    assert _counts_inside() == {1}                      # main thread first
    assert run_in_thread(_counts_inside) == {1}            # then a worker thread


def test_single_threaded_blas_overlapping_threads_restore(blas_at_two_threads):
    """Blocks in two threads that overlap: the count is restored when the last one ends."""
    inside = threading.Event()
    leave = threading.Event()
    seen = []

    def worker():
        with single_threaded_blas:
            inside.set()
            leave.wait(timeout=30)
            seen.append(set(blas_thread_counts()))

    thread = threading.Thread(target=worker)
    single_threaded_blas.__enter__()
    try:
        thread.start()
        assert inside.wait(timeout=30)
        single_threaded_blas.__exit__(None, None, None)   # the main thread leaves first
        assert set(blas_thread_counts()) == {1}            # the worker is still inside
    finally:
        if not inside.is_set():
            single_threaded_blas.__exit__(None, None, None)
        leave.set()
        thread.join()
    assert seen == [{1}]
    assert set(blas_thread_counts()) == {2}               # the worker left last: restored


# --- concurrent callers --------------------------------------------------------------

JOBS = [
    # (N, C, H, W, F, kernel, stride, padding, dtype, n_threads)
    (2, 3, 17, 15, 4, 3, 1, 1, np.float32, 2),
    (1, 8, 20, 20, 6, 3, 2, (0, 1, 2, 1), np.float64, 2),
    (5, 4, 9, 9, 8, 1, 1, 0, np.float32, 1),
    (3, 16, 12, 10, 8, (2, 3), (1, 2), (1, 2), np.float64, 3),
    (7, 2, 6, 6, 3, 3, 1, 1, np.float64, 2),
    (1, 4, 40, 33, 5, 5, 1, 2, np.float32, 2),
]


def _run_job(job, seed):
    N, C, H, W, F, kernel, stride, padding, dtype, n_threads = job
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    weight = rng.standard_normal((F, C, kh, kw)).astype(dtype)
    bias = rng.standard_normal(F).astype(dtype)
    y = fastconv.conv2d(x, weight, bias, stride, padding, n_threads=n_threads)
    dy = rng.standard_normal(y.shape).astype(dtype)
    grads = fastconv.conv2d_backward(dy, x, weight, stride, padding, n_threads=n_threads)
    col = fastconv.im2col(x, kh, kw, stride, padding, n_threads=n_threads)
    img = fastconv.col2im(col, x.shape, kh, kw, stride, padding, n_threads=n_threads)
    return [y, *grads, col, img]


def test_concurrent_calls_equal_serial_calls_bit_for_bit():
    """Workspaces are per Python thread: callers in parallel never share scratch memory."""
    tasks = [(job, seed) for seed in range(3) for job in JOBS]
    serial = [_run_job(job, seed) for job, seed in tasks]

    start = threading.Barrier(6)

    def synchronised(job, seed):
        start.wait(timeout=30)          # all six workers begin together
        return _run_job(job, seed)

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        for _ in range(2):
            futures = []
            for i in range(0, len(tasks), 6):
                futures += [pool.submit(synchronised, *task) for task in tasks[i:i + 6]]
            results = [f.result(timeout=60) for f in futures]
            for (job, seed), got, want in zip(tasks, results, serial):
                for a, b in zip(got, want):
                    assert a.dtype == b.dtype
                    np.testing.assert_array_equal(a, b, err_msg=str((job, seed)))
