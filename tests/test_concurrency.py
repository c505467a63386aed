"""Concurrency: many Python threads calling fastconv at the same time.

The kernels release the GIL, so a server or a data-parallel training loop may
run fastconv from many threads at once. ``test_threads.py`` covers the
``n_threads`` convention, the BLAS switch itself and six workers running the
NCHW convolution; this module runs 12 workers at once over every engine (NCHW
im2col, NHWC, direct depthwise, pointwise, transposed and its phase convolutions,
pooling, activations, im2col/col2im) in both dtypes and with 1-3 OpenMP threads
each, and requires:

* every result bit-identical to the same call made serially with the same
  ``n_threads`` (the per-thread workspaces are never shared), and to the same
  call in a fresh process (other buffer addresses, other thread pools);
* a layer shared by all threads gives each caller its own correct forward, and
  separate layers train bit-identically to a serial run;
* the per-thread workspaces die with their thread;
* the BLAS thread count is back to what it was once all threads are done.
"""

import concurrent.futures
import gc
import hashlib
import pathlib
import random
import subprocess
import sys
import tempfile
import threading
import weakref

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import fastconv
from fastconv import _workspace
from fastconv._threads import single_threaded_blas

N_WORKERS = 12


def _rng(seed):
    return np.random.default_rng(seed)


def _conv_job(seed, dtype, n_threads, N, C, H, W, F, kernel, groups=1, layout="NCHW",
              algorithm="auto", **args):
    rng = _rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    weight = rng.standard_normal((F, C // groups) + kernel).astype(dtype)
    bias = rng.standard_normal(F).astype(dtype)
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    common = dict(groups=groups, layout=layout, algorithm=algorithm, n_threads=n_threads, **args)
    y = fastconv.conv2d(x, weight, bias, **common)
    dy = rng.standard_normal(y.shape).astype(dtype)
    return [y, *fastconv.conv2d_backward(dy, x, weight, **common)]


def _transposed_job(seed, dtype, n_threads):
    rng = _rng(seed)
    x = rng.standard_normal((3, 4, 6, 5)).astype(dtype)
    weight = rng.standard_normal((4, 3, 4, 4)).astype(dtype)
    bias = rng.standard_normal(6).astype(dtype)
    args = dict(stride=2, padding=1, output_padding=1, groups=2, n_threads=n_threads)
    y = fastconv.conv_transpose2d(x, weight, bias, **args)
    dy = rng.standard_normal(y.shape).astype(dtype)
    return [y, *fastconv.conv_transpose2d_backward(dy, x, weight, **args)]


def _phases_job(seed, dtype, n_threads):
    """The transposed phase convolutions (algorithm="winograd"): per-thread grad_weight sums."""
    rng = _rng(seed)
    x = rng.standard_normal((3, 5, 9, 7)).astype(dtype)
    weight = rng.standard_normal((5, 4, 4, 4)).astype(dtype)
    bias = rng.standard_normal(4).astype(dtype)
    args = dict(stride=2, padding=1, output_padding=1, algorithm="winograd", n_threads=n_threads)
    y = fastconv.conv_transpose2d(x, weight, bias, **args)
    dy = rng.standard_normal(y.shape).astype(dtype)
    return [y, *fastconv.conv_transpose2d_backward(dy, x, weight, **args)]


def _pool_job(seed, dtype, n_threads):
    rng = _rng(seed)
    x = rng.standard_normal((4, 5, 13, 11)).astype(dtype)
    y, idx = fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True,
                                 n_threads=n_threads)
    dy = rng.standard_normal(y.shape).astype(dtype)
    a = fastconv.avg_pool2d(x, 3, 2, 1, count_include_pad=False, n_threads=n_threads)
    da = rng.standard_normal(a.shape).astype(dtype)
    g = fastconv.global_avg_pool2d(x, n_threads=n_threads)
    r = fastconv.relu(x, n_threads=n_threads)
    return [y, idx, fastconv.max_pool2d_backward(dy, x, 3, 2, 1, ceil_mode=True,
                                                 n_threads=n_threads),
            fastconv.max_pool2d_backward(dy, x, 3, 2, 1, ceil_mode=True, indices=idx,
                                         n_threads=n_threads),
            a, fastconv.avg_pool2d_backward(da, x, 3, 2, 1, count_include_pad=False,
                                            n_threads=n_threads),
            g, fastconv.global_avg_pool2d_backward(g, x, n_threads=n_threads),
            r, fastconv.relu_backward(x, x, n_threads=n_threads)]


def _im2col_job(seed, dtype, n_threads):
    x = _rng(seed).standard_normal((3, 4, 9, 10)).astype(dtype)
    col = fastconv.im2col(x, 3, 2, (2, 1), (1, 0, 2, 1), n_threads=n_threads)
    return [col, fastconv.col2im(col, x.shape, 3, 2, (2, 1), (1, 0, 2, 1), n_threads=n_threads)]


# (name, function(seed) -> list of arrays): every engine, both dtypes, 1-3 OpenMP threads
JOBS = [
    ("nchw-same-reflect-f32", lambda s: _conv_job(s, np.float32, 2, 2, 3, 17, 15, 8, (3, 3),
                                                  padding="same", padding_mode="reflect")),
    ("nchw-same-reflect-f64", lambda s: _conv_job(s, np.float64, 2, 2, 3, 17, 15, 8, (3, 3),
                                                  padding="same", padding_mode="reflect")),
    ("nhwc-groups-f64", lambda s: _conv_job(s, np.float64, 3, 3, 6, 12, 10, 4, (3, 2), groups=2,
                                            layout="NHWC", stride=2, padding=(1, 0, 2, 1))),
    ("nhwc-1x1-f32", lambda s: _conv_job(s, np.float32, 1, 2, 8, 7, 9, 16, (1, 1),
                                         layout="NHWC")),
    ("depthwise-direct-f32", lambda s: _conv_job(s, np.float32, 1, 2, 6, 14, 12, 12, (3, 3),
                                                 groups=6, algorithm="direct", padding=1,
                                                 padding_mode="circular")),
    ("depthwise-im2col-f64", lambda s: _conv_job(s, np.float64, 3, 2, 6, 14, 12, 6, (5, 5),
                                                 groups=6, algorithm="im2col", padding=2,
                                                 dilation=(1, 2))),
    ("pointwise-f64", lambda s: _conv_job(s, np.float64, 2, 4, 16, 8, 8, 8, (1, 1))),
    ("large-plane-n1-f32", lambda s: _conv_job(s, np.float32, 3, 1, 4, 48, 40, 6, (3, 3),
                                               padding=1, padding_mode="replicate")),
    ("many-small-images-f32", lambda s: _conv_job(s, np.float32, 2, 13, 2, 6, 6, 5, (2, 2),
                                                  stride=(1, 2))),
    ("transposed-f32", lambda s: _transposed_job(s, np.float32, 2)),
    ("transposed-f64", lambda s: _transposed_job(s, np.float64, 1)),
    ("transposed-phases-f32", lambda s: _phases_job(s, np.float32, 3)),
    ("transposed-phases-f64", lambda s: _phases_job(s, np.float64, 2)),
    ("pooling-f32", lambda s: _pool_job(s, np.float32, 3)),
    ("pooling-f64", lambda s: _pool_job(s, np.float64, 2)),
    ("im2col-f32", lambda s: _im2col_job(s, np.float32, 1)),
    ("im2col-f64", lambda s: _im2col_job(s, np.float64, 3)),
]


def _bad_call(_seed):
    """A call that fails validation: concurrent errors must not disturb the others."""
    with pytest.raises(ValueError, match="channels"):
        fastconv.conv2d(np.ones((1, 3, 5, 5)), np.ones((2, 4, 3, 3)))
    return []


def _run_concurrently(tasks, workers=N_WORKERS, rounds=2, seed=0):
    """Run ``tasks`` (callables) on ``workers`` threads, released together, in shuffled
    orders, ``rounds`` times; returns the results of every round in task order."""
    order = random.Random(seed)
    all_results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in range(rounds):
            indices = list(range(len(tasks)))
            order.shuffle(indices)
            results = [None] * len(tasks)
            for start in range(0, len(indices), workers):
                chunk = indices[start:start + workers]
                barrier = threading.Barrier(len(chunk))

                def synchronised(i, barrier=barrier):
                    barrier.wait(timeout=60)       # the chunk's workers start together
                    return tasks[i]()

                futures = {i: pool.submit(synchronised, i) for i in chunk}
                for i, future in futures.items():
                    results[i] = future.result(timeout=300)
            all_results.append(results)
    return all_results


def _assert_identical(got, want, what):
    assert len(got) == len(want), what
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        np.testing.assert_array_equal(a, b, err_msg=what)


def test_every_engine_from_many_threads_equals_serial_bit_for_bit():
    tasks = [(name, seed, job) for seed in (1, 2) for name, job in JOBS]
    tasks += [("bad-call", seed, _bad_call) for seed in range(3)]
    serial = [job(seed) for _, seed, job in tasks]
    for results in _run_concurrently([lambda job=job, seed=seed: job(seed)
                                      for _, seed, job in tasks]):
        for (name, seed, _), got, want in zip(tasks, results, serial):
            _assert_identical(got, want, f"{name} seed={seed}")


def _digest(seed):
    """SHA-256 of every JOBS result for ``seed``, in order."""
    digest = hashlib.sha256()
    for _, job in JOBS:
        for array in job(seed):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def test_a_fresh_process_computes_the_same_bits():
    code = (f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
            "import test_concurrency; print(test_concurrency._digest(5))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300, cwd=tempfile.gettempdir())
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == _digest(5)


def test_a_shared_layer_serves_concurrent_forwards():
    """One Conv2D and one MaxPool2D used by every thread: each caller gets its own answer.

    (A layer's forward keeps its input for backward, so interleaved forward/backward
    pairs on one layer need one layer per thread; see the next test.)
    """
    conv = fastconv.Conv2D(4, 8, 3, padding=1, rng=0, n_threads=2)
    depthwise = fastconv.Conv2D(4, 4, 3, padding="same", groups=4, rng=1, n_threads=1)
    pool = fastconv.MaxPool2D(2, n_threads=3)
    inputs = [_rng(i).standard_normal((1 + i % 4, 4, 9 + i % 3, 8)).astype(
        np.float32 if i % 2 else np.float64) for i in range(2 * N_WORKERS)]

    def forward(x):
        return [conv(x), depthwise(x), pool(conv(x))]

    serial = [forward(x) for x in inputs]
    for results in _run_concurrently([lambda x=x: forward(x) for x in inputs], rounds=3):
        for i, (got, want) in enumerate(zip(results, serial)):
            _assert_identical(got, want, f"input {i}")


def _train(seed, steps=4):
    """A tiny network trained for a few SGD steps on its own data; returns its parameters."""
    rng = _rng(seed)
    dtype = np.float32 if seed % 2 else np.float64
    n_threads = 1 + seed % 3
    conv = fastconv.Conv2D(3, 6, 3, padding=1, padding_mode="reflect", rng=seed, dtype=dtype,
                           n_threads=n_threads)
    dw = fastconv.Conv2D(6, 6, 3, stride=2, padding="same", groups=6, rng=seed + 1,
                         dtype=dtype, n_threads=n_threads)
    up = fastconv.ConvTranspose2D(6, 2, 2, stride=2, rng=seed + 2, dtype=dtype,
                                  n_threads=n_threads)
    layers = [conv, fastconv.ReLU(n_threads=n_threads), dw,
              fastconv.MaxPool2D(2, ceil_mode=True, n_threads=n_threads), up,
              fastconv.AvgPool2D(2, n_threads=n_threads)]
    x = rng.standard_normal((2, 3, 12, 10)).astype(dtype)
    grads = []
    for _ in range(steps):
        out = x
        for layer in layers:
            out = layer(out)
        grad = out - 0.5
        for layer in reversed(layers):
            grad = layer.backward(grad)
        grads.append(grad)
        for layer in (conv, dw, up):
            layer.W -= 0.1 * layer.dW
            layer.b -= 0.1 * layer.db
    return [p for layer in (conv, dw, up) for p in (layer.W, layer.b, layer.dW, layer.db)] + grads


def test_separate_layers_train_bit_identically_in_parallel():
    seeds = list(range(N_WORKERS))
    serial = [_train(seed) for seed in seeds]
    for results in _run_concurrently([lambda seed=seed: _train(seed) for seed in seeds]):
        for seed, got, want in zip(seeds, results, serial):
            _assert_identical(got, want, f"network {seed}")


def test_workspaces_are_per_thread_and_die_with_their_thread():
    mine = _workspace.workspace("concurrency-test", np.float32, 64)
    refs, errors = {}, []
    holding, release = threading.Barrier(5), threading.Event()

    def worker(i):
        try:
            buffer = _workspace.workspace("concurrency-test", np.float32, 64)
            buffer[:] = i
            refs[i] = weakref.ref(buffer.base)
            holding.wait(timeout=30)         # all four hold their buffer at the same time
            release.wait(timeout=30)
            again = _workspace.workspace("concurrency-test", np.float32, 64)
            assert np.shares_memory(again, buffer)       # reused within the thread
            assert (again == i).all()                    # and nobody else wrote into it
            if i == 0:
                _workspace.clear_workspaces()            # only this thread's are released
        except BaseException as error:                   # re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    holding.wait(timeout=30)
    buffers = [ref() for ref in refs.values()]
    assert len(buffers) == 4
    assert not any(np.shares_memory(a, b) for i, a in enumerate(buffers + [mine])
                   for b in (buffers + [mine])[i + 1:])
    del buffers
    release.set()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    assert np.shares_memory(_workspace.workspace("concurrency-test", np.float32, 64), mine)
    gc.collect()
    # a thread's buffers are freed when it ends (a server spawning threads must not leak)
    assert all(ref() is None for ref in refs.values())


@pytest.fixture
def blas_at_two_threads():
    if not [i for i in threadpool_info() if i["user_api"] == "blas"]:
        pytest.skip("no BLAS library found by threadpoolctl")
    with threadpool_limits(limits=2, user_api="blas"):
        if {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} != {2}:
            pytest.skip("BLAS cannot run 2 threads here")
        yield


def test_blas_threads_are_restored_after_concurrent_use(blas_at_two_threads):
    tasks = [lambda job=job, seed=seed: job(seed) for seed in (3, 4) for _, job in JOBS]
    _run_concurrently(tasks, rounds=1)
    assert single_threaded_blas._depth == 0
    assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {2}
