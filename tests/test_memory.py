"""Memory: no leaks, MemoryError instead of a crash, bounded workspaces, inputs never written.

* thousands of forward/backward calls of every engine leave the resident set
  and Python's allocated blocks flat after a warm-up;
* a valid but enormous request raises MemoryError (in process, for every
  public function), and so does running out of address space in a child
  under ``RLIMIT_AS``, after which the same process computes correctly again;
* the cached workspaces of every engine do not grow with the batch;
* no public function or layer method ever writes to its inputs (the one
  place this is checked for every one of them).
"""

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
from _helpers import run_in_thread

import fastconv
from fastconv import _tiling, _workspace

PAGE = os.sysconf("SC_PAGE_SIZE")
#: Under AddressSanitizer (tools/asan.sh) freed memory sits in a quarantine of up to
#: 256 MiB before reuse, so the resident set grows without a leak.
UNDER_ASAN = os.path.exists("/proc/self/maps") and "libasan" in open("/proc/self/maps").read()


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# Every public function once: (name, function, arguments)
# ---------------------------------------------------------------------------

def public_calls(dtype=np.float64):
    """One call of every public function and layer method on small inputs.

    Returns ``(name, call)`` pairs; ``call()`` runs it and returns the arrays it
    was given (to check they are unchanged) and its result.
    """
    rng = _rng(1)

    def arr(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x, w, b = arr(2, 4, 9, 8), arr(6, 4, 3, 3), arr(6)
    dy = arr(2, 6, 9, 8)
    xh, dyh = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), np.ascontiguousarray(
        dy.transpose(0, 2, 3, 1))
    wd, dyd = arr(8, 1, 3, 3), arr(2, 8, 5, 4)
    xt, wt, bt = arr(2, 6, 4, 5), arr(6, 2, 4, 4), arr(4)
    dyt = arr(2, 4, 8, 10)
    dyp = arr(2, 4, 5, 5)
    idx = fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)[1]
    col = arr(2 * 9 * 8, 4 * 9)
    strided = arr(2, 4, 9, 16)[..., ::2]
    args = dict(padding=1, padding_mode="reflect")

    def layer_pair(make, x_, dout):
        def call():
            layer = make()
            params = [a for a in (getattr(layer, "W", None), getattr(layer, "b", None))
                      if a is not None]
            saved = [a.copy() for a in params]
            y = layer(x_)
            dx = layer.backward(dout)
            for a, before in zip(params, saved):      # the layer's own parameters too
                assert a.tobytes() == before.tobytes()
            return y, dx
        return call

    calls = [
        ("conv2d", lambda: fastconv.conv2d(x, w, b, **args), (x, w, b)),
        ("conv2d-out", lambda: fastconv.conv2d(x, w, b, out=np.empty((2, 6, 9, 8), dtype),
                                               **args), (x, w, b)),
        ("conv2d-strided-x", lambda: fastconv.conv2d(strided, w, b, stride=2), (strided, w, b)),
        ("conv2d-nhwc", lambda: fastconv.conv2d(xh, w, b, layout="NHWC", **args), (xh, w, b)),
        ("conv2d-direct", lambda: fastconv.conv2d(x, wd, b[:1].repeat(8), groups=4, stride=2,
                                                  padding=1, algorithm="direct"), (x, wd)),
        ("conv2d_backward", lambda: fastconv.conv2d_backward(dy, x, w, **args), (dy, x, w)),
        ("conv2d_backward-bias-array", lambda: fastconv.conv2d_backward(dy, x, w, bias=b, **args),
         (dy, x, w, b)),
        ("conv2d_backward-nhwc", lambda: fastconv.conv2d_backward(dyh, xh, w, layout="NHWC",
                                                                  **args), (dyh, xh, w)),
        ("conv2d_backward-direct", lambda: fastconv.conv2d_backward(
            dyd, x, wd, groups=4, stride=2, padding=1, algorithm="direct"), (dyd, x, wd)),
        ("conv_transpose2d", lambda: fastconv.conv_transpose2d(
            xt, wt, bt, stride=2, padding=1, groups=2), (xt, wt, bt)),
        ("conv_transpose2d_backward", lambda: fastconv.conv_transpose2d_backward(
            dyt, xt, wt, stride=2, padding=1, groups=2), (dyt, xt, wt)),
        ("im2col", lambda: fastconv.im2col(x, 3, 3, 1, 1), (x,)),
        ("col2im", lambda: fastconv.col2im(col, x.shape, 3, 3, 1, 1), (col,)),
        ("max_pool2d", lambda: fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True,
                                                   return_indices=True), (x,)),
        ("max_pool2d_backward", lambda: fastconv.max_pool2d_backward(
            dyp, x, 3, 2, 1, ceil_mode=True), (dyp, x)),
        ("max_pool2d_backward-indices", lambda: fastconv.max_pool2d_backward(
            dyp, x, 3, 2, 1, ceil_mode=True, indices=idx), (dyp, x, idx)),
        ("avg_pool2d", lambda: fastconv.avg_pool2d(x, 3, 2, 1, ceil_mode=True,
                                                   count_include_pad=False), (x,)),
        ("avg_pool2d_backward", lambda: fastconv.avg_pool2d_backward(
            dyp, x, 3, 2, 1, ceil_mode=True, count_include_pad=False), (dyp, x)),
        ("global_avg_pool2d", lambda: fastconv.global_avg_pool2d(x, keepdims=True), (x,)),
        ("global_avg_pool2d_backward", lambda: fastconv.global_avg_pool2d_backward(
            dyp[:, :, 0, 0], x), (dyp, x)),
        ("relu", lambda: fastconv.relu(x), (x,)),
        ("relu_backward", lambda: fastconv.relu_backward(dy[:, :4], x), (dy, x)),
        ("Conv2D", layer_pair(lambda: fastconv.Conv2D(4, 6, 3, padding="same", rng=0,
                                                      dtype=dtype), x, dy), (x, dy)),
        ("Conv2D-from_weights", layer_pair(lambda: fastconv.Conv2D.from_weights(w, b, 1, 1),
                                           x, dy), (x, dy, w, b)),
        ("ConvTranspose2D", layer_pair(lambda: fastconv.ConvTranspose2D(
            6, 4, 4, stride=2, padding=1, groups=2, rng=0, dtype=dtype), xt, dyt), (xt, dyt)),
        ("MaxPool2D", layer_pair(lambda: fastconv.MaxPool2D(3, 2, 1, ceil_mode=True), x, dyp),
         (x, dyp)),
        ("AvgPool2D", layer_pair(lambda: fastconv.AvgPool2D(3, 2, 1, ceil_mode=True), x, dyp),
         (x, dyp)),
        ("ReLU", layer_pair(fastconv.ReLU, x, dy[:, :4]), (x, dy)),
    ]
    return calls


CALL_NAMES = [name for name, _, _ in public_calls()]


def test_public_calls_cover_every_public_function():
    names = {name.split("-")[0] for name in CALL_NAMES}
    assert set(fastconv.__all__) - {"reference"} <= names


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", CALL_NAMES)
def test_inputs_are_never_modified(name, dtype):
    call, inputs = next((c, i) for n, c, i in public_calls(dtype) if n == name)
    before = [(a, a.copy()) for a in inputs]
    assert all(a.flags.writeable for a in inputs)       # so a write would go through
    call()
    call()                      # the second call reuses warm workspaces
    for array, copy in before:
        assert array.tobytes() == copy.tobytes(), f"{name} modified an input"


# ---------------------------------------------------------------------------
# No leaks
# ---------------------------------------------------------------------------

def _leak_iteration(calls):
    for _, call, _ in calls:
        call()
    # error paths allocate too (messages, tracebacks): they must not leak either
    for bad in (lambda: fastconv.conv2d(np.ones((1, 3, 4, 4)), np.ones((2, 4, 3, 3))),
                lambda: fastconv.max_pool2d(np.ones((1, 1, 4, 4)), 2, n_threads=0),
                lambda: fastconv.im2col(np.ones((1, 1, 4, 4)), 9, 9)):
        try:
            bad()
        except ValueError:
            pass


def test_no_leak_over_thousands_of_calls():
    """Three phases of 200 iterations (about 6,000 calls each) after a warm-up.

    A leak grows every phase by the same amount; one-off growth (a free list, a
    cache filling up) does not, so the smallest growth of the three is judged.
    """
    calls = public_calls(np.float32)
    threshold, iterations = 8 << 20, 200
    result_bytes = 0
    for _, call, _ in calls:
        result = call()
        result_bytes += sum(a.nbytes for a in (result if isinstance(result, tuple)
                                                else (result,)) if isinstance(a, np.ndarray))
    # keeping one iteration's results each time would pass the resident-set threshold
    # twice over; a single leaked array per iteration shows in Python's block count
    # (an ndarray's header is a pymalloc block)
    assert iterations * result_bytes >= 2 * threshold
    for _ in range(100):                      # warm-up: workspaces, thread pools, caches
        _leak_iteration(calls)
    rss_growth, block_growth = [], []
    for _ in range(3):
        gc.collect()
        rss0, blocks0 = resident_bytes(), sys.getallocatedblocks()
        for _ in range(iterations):
            _leak_iteration(calls)
        gc.collect()
        rss_growth.append(resident_bytes() - rss0)
        block_growth.append(sys.getallocatedblocks() - blocks0)
    n_calls = iterations * (len(calls) + 3)
    assert UNDER_ASAN or min(rss_growth) < threshold, (
        f"resident set grew by {[g >> 10 for g in rss_growth]} KiB in phases of {n_calls} calls")
    # Python objects: less than one per four iterations
    assert min(block_growth) < iterations / 4, (
        f"{block_growth} more Python blocks in phases of {n_calls} calls")


# ---------------------------------------------------------------------------
# Allocation failure is a MemoryError
# ---------------------------------------------------------------------------

def _huge(shape, dtype=np.float32):
    """A broadcast view: no memory of its own, but its copy or result cannot exist.

    Every result below is >= 2**48 bytes, past the 128 TiB of x86-64 user address
    space, so the allocation fails even where the kernel overcommits memory.
    """
    return np.broadcast_to(np.ones(1, dtype), shape)


HUGE = 2**46


@pytest.mark.parametrize("call", [
    lambda: fastconv.conv2d(_huge((HUGE, 3, 1, 1), np.int8), np.ones((1, 3, 1, 1))),
    lambda: fastconv.conv2d(_huge((HUGE, 1, 1, 1)), np.ones((1, 1, 1, 1), np.float32),
                            layout="NHWC"),
    lambda: fastconv.conv2d_backward(_huge((HUGE, 1, 1, 1)), _huge((HUGE, 3, 1, 1), np.int8),
                                     np.ones((1, 3, 1, 1))),
    lambda: fastconv.conv_transpose2d(_huge((HUGE, 1, 1, 1)), np.ones((1, 2, 1, 1))),
    lambda: fastconv.conv_transpose2d_backward(_huge((HUGE, 2, 1, 1)), _huge((HUGE, 1, 1, 1)),
                                               np.ones((1, 2, 1, 1))),
    lambda: fastconv.im2col(_huge((1, HUGE, 1, 1)), 1, 1),
    lambda: fastconv.col2im(_huge((HUGE, 1)), (HUGE, 1, 1, 1), 1, 1),
    lambda: fastconv.max_pool2d(_huge((HUGE, 4, 2, 2)), 1, return_indices=True),
    lambda: fastconv.max_pool2d_backward(_huge((HUGE, 4, 1, 1)), _huge((HUGE, 4, 1, 1)), 1),
    lambda: fastconv.avg_pool2d(_huge((HUGE, 4, 1, 1)), 1),
    lambda: fastconv.avg_pool2d_backward(_huge((HUGE, 4, 1, 1)), _huge((HUGE, 4, 1, 1)), 1),
    lambda: fastconv.global_avg_pool2d(_huge((HUGE, 8, 1, 1))),
    lambda: fastconv.global_avg_pool2d_backward(_huge((1, 1)), _huge((1, 1, HUGE, 4))),
    lambda: fastconv.relu(_huge((4 * HUGE,))),
    lambda: fastconv.relu_backward(_huge((4 * HUGE,)), _huge((4 * HUGE,))),
    lambda: fastconv.Conv2D(2**20, 2**20, 2**4),
    lambda: fastconv.ConvTranspose2D(2**21, 2**21, 2**3),
], ids=["conv2d", "conv2d-nhwc", "conv2d_backward", "conv_transpose2d",
        "conv_transpose2d_backward", "im2col", "col2im", "max_pool2d", "max_pool2d_backward",
        "avg_pool2d", "avg_pool2d_backward", "global_avg_pool2d", "global_avg_pool2d_backward",
        "relu", "relu_backward", "Conv2D", "ConvTranspose2D"])
def test_enormous_valid_requests_raise_memory_error(call):
    with pytest.raises(MemoryError):
        call()
    # and everything still works afterwards
    x = np.ones((1, 2, 4, 4))
    np.testing.assert_array_equal(fastconv.conv2d(x, np.ones((1, 2, 1, 1))), 2 * x[:, :1])


ADDRESS_SPACE_CHILD = textwrap.dedent("""
    import json, resource
    import numpy as np
    import fastconv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 32, 32, 32)).astype(np.float32)     # 2 MiB
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    expected = fastconv.conv2d(x, w, padding=1, n_threads=2)         # thread pools warm
    expected_back = fastconv.conv2d_backward(expected, x, w, padding=1, n_threads=2)
    expected_pool = fastconv.max_pool2d(x, 2, n_threads=2)
    with open("/proc/self/status") as status:
        vm = next(int(l.split()[1]) for l in status if l.startswith("VmSize")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (192 << 20), resource.RLIM_INFINITY))

    report = {}
    def attempt(name, call):
        try:
            call()
            report[name] = "returned"
        except MemoryError:
            report[name] = "MemoryError"
        except BaseException as error:
            report[name] = f"{type(error).__name__}: {error}"

    big = np.ones((1, 1, 2048, 2048), np.float32)          # 16 MiB, fits
    attempt("output", lambda: fastconv.conv2d(big, np.ones((64, 1, 3, 3), np.float32),
                                              padding=1, n_threads=2))      # 1 GiB output
    attempt("cast copy", lambda: fastconv.conv2d(big.astype(np.int8).repeat(16, axis=1),
                                                 np.ones((1, 16, 1, 1)), n_threads=2))
    attempt("backward", lambda: fastconv.conv2d_backward(          # 1 GiB grad_output copy
        np.broadcast_to(np.float32(1), (1, 64, 2048, 2048)), big,
        np.ones((64, 1, 3, 3), np.float32), padding=1, n_threads=2))
    attempt("transposed", lambda: fastconv.conv_transpose2d(
        big, np.ones((1, 64, 2, 2), np.float32), stride=2, n_threads=2))
    attempt("pool", lambda: fastconv.max_pool2d(
        np.broadcast_to(np.float32(1), (64, 64, 512, 512)), 1, return_indices=True))
    attempt("relu", lambda: fastconv.relu(np.broadcast_to(np.float32(1), (2**28,))))
    attempt("layer", lambda: fastconv.Conv2D(2048, 2048, 7, rng=0))
    # after every failure: the same results as before the limit
    y = fastconv.conv2d(x, w, padding=1, n_threads=2)
    back = fastconv.conv2d_backward(expected, x, w, padding=1, n_threads=2)
    report["recovered"] = bool(
        np.array_equal(y, expected) and all(np.array_equal(a, b)
                                            for a, b in zip(back, expected_back))
        and np.array_equal(fastconv.max_pool2d(x, 2, n_threads=2), expected_pool))
    print(json.dumps(report))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc")
def test_running_out_of_address_space_is_a_memory_error():
    """In a child under RLIMIT_AS: each too-large call raises MemoryError, then the process
    computes exactly as before. (The thread pools are started before the limit: libgomp
    aborts the process if it cannot create a thread, which fastconv cannot catch.)"""
    result = subprocess.run([sys.executable, "-c", ADDRESS_SPACE_CHILD], capture_output=True,
                            text=True, timeout=300, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("recovered") is True
    assert report == dict.fromkeys(report, "MemoryError"), report
    assert len(report) == 7


# ---------------------------------------------------------------------------
# Bounded workspaces
# ---------------------------------------------------------------------------

def _workspace_bytes_after(calls):
    """Total bytes of the cached workspaces after each call, in a fresh thread."""
    def run():
        sizes = []
        for call in calls:
            call()
            sizes.append(sum(b.nbytes for b in _workspace._local.__dict__.get("buffers",
                                                                              {}).values()))
        return sizes
    return run_in_thread(run)


@pytest.mark.parametrize("engine", ["nchw", "nhwc", "direct", "transposed", "pooling"])
def test_workspaces_do_not_grow_with_the_batch(engine):
    rng = _rng(2)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    wd = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)

    def call(N):
        x = np.ones((N, 8, 40, 40), np.float32)
        def run():
            if engine == "nchw":
                y = fastconv.conv2d(x, w, padding=1, n_threads=2)
                fastconv.conv2d_backward(y, x, w, padding=1, n_threads=2)
            elif engine == "nhwc":
                xh = np.ones((N, 40, 40, 8), np.float32)
                y = fastconv.conv2d(xh, w, padding=1, layout="NHWC", n_threads=2)
                fastconv.conv2d_backward(y, xh, w, padding=1, layout="NHWC", n_threads=2)
            elif engine == "direct":
                y = fastconv.conv2d(x, wd, padding=1, groups=8, n_threads=2)
                fastconv.conv2d_backward(y, x, wd, padding=1, groups=8, n_threads=2)
            elif engine == "transposed":
                y = fastconv.conv_transpose2d(x, w, stride=2, n_threads=2)
                fastconv.conv_transpose2d_backward(y, x, w, stride=2, n_threads=2)
            else:
                y, idx = fastconv.max_pool2d(x, 2, return_indices=True, n_threads=2)
                fastconv.max_pool2d_backward(y, x, 2, indices=idx, n_threads=2)
        return run

    sizes = _workspace_bytes_after([call(4), call(32), call(128)])
    # a bound that does not depend on N: per thread one column tile of the budget (plus
    # an F-row staging tile and a plane), the grad_weight partial sums and the weight
    T, K, F, P, item = 2, 8 * 9, 8, 40 * 40, 4
    columns = max(_tiling.MIN_TILE_COLUMNS, _tiling.COLUMN_TILE_BYTES // (K * item))
    bound = T * (K + F) * (columns + P) * item + (T + 1) * (F * K + F) * item
    assert max(sizes) <= bound, (sizes, bound)
    assert sizes[2] < 128 * K * P * item / 8, sizes      # nowhere near the batch's columns
