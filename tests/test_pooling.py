"""Pooling and ReLU: naive loops -> NumPy reference -> Cython kernels, gradients, errors, layers.

The naive loops below are PyTorch's definition written out window by window,
with their own output-size rule (count the window starts that qualify) so a
bug in ``pool_output_size`` cannot hide in both the oracle and the code.
"""

import itertools
import math

import numpy as np
import pytest
from _helpers import assert_matches

import fastconv
from fastconv import reference
from fastconv._validation import compute_dtype, pool_geometry

KERNELS = [1, 2, 3, (2, 3)]
STRIDES = [None, 1, 2, (1, 2)]
PADDINGS = [0, 1, (0, 1)]
DILATIONS = [1, 2]
H, W = 7, 8


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _valid(kernel, stride, padding, dilation, ceil_mode, shape=(2, 3, H, W)):
    try:
        pool_geometry(shape, kernel, stride, padding, dilation, ceil_mode)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------
# naive loop oracle


def _window_starts(size, kernel, stride, pad, dilation, ceil_mode):
    """Window starts (in input coordinates, may be negative) by PyTorch's rule, counted."""
    span = dilation * (kernel - 1) + 1
    padded = size + 2 * pad
    starts = []
    o = 0
    while True:
        start = o * stride                      # in padded coordinates
        fits = start + span <= padded
        # ceil mode: one more (partial) window if it starts before the last
        # full start + stride, and inside the input or the left padding
        partial = ceil_mode and start < padded - span + stride and start < size + pad
        if not (fits or partial):
            break
        starts.append(start - pad)
        o += 1
    return starts


def _naive_windows(x_shape, kernel, stride, padding, dilation, ceil_mode):
    N, C, Hx, Wx = x_shape
    (kh, kw), (ph, pw), (dh, dw) = _pair(kernel), _pair(padding), _pair(dilation)
    sh, sw = (kh, kw) if stride is None else _pair(stride)
    rows = _window_starts(Hx, kh, sh, ph, dh, ceil_mode)
    cols = _window_starts(Wx, kw, sw, pw, dw, ceil_mode)
    return rows, cols, (kh, kw), (dh, dw), (ph, pw)


def naive_max_pool2d(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    x = np.asarray(x, dtype=np.float64)
    N, C, Hx, Wx = x.shape
    rows, cols, (kh, kw), (dh, dw), _ = _naive_windows(x.shape, kernel, stride, padding,
                                                       dilation, ceil_mode)
    y = np.empty((N, C, len(rows), len(cols)))
    idx = np.empty(y.shape, np.int64)
    for n, c, (oh, r), (ow, s) in itertools.product(range(N), range(C), enumerate(rows),
                                                    enumerate(cols)):
        taps = [(r + a * dh, s + b * dw) for a in range(kh) for b in range(kw)]
        taps = [(i, j) for i, j in taps if 0 <= i < Hx and 0 <= j < Wx]
        best, arg = -math.inf, (taps[0][0] * Wx + taps[0][1] if taps else -1)
        for i, j in taps:
            v = x[n, c, i, j]
            if v > best or math.isnan(v):
                best, arg = v, i * Wx + j
        y[n, c, oh, ow], idx[n, c, oh, ow] = best, arg
    return y, idx


def naive_avg_pool2d(x, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    x = np.asarray(x, dtype=np.float64)
    N, C, Hx, Wx = x.shape
    rows, cols, (kh, kw), _, (ph, pw) = _naive_windows(x.shape, kernel, stride, padding, 1,
                                                       ceil_mode)
    y = np.empty((N, C, len(rows), len(cols)))
    for n, c, (oh, r), (ow, s) in itertools.product(range(N), range(C), enumerate(rows),
                                                    enumerate(cols)):
        ii = [i for i in range(r, r + kh)]
        jj = [j for j in range(s, s + kw)]
        inside = [(i, j) for i in ii for j in jj if 0 <= i < Hx and 0 <= j < Wx]
        if count_include_pad:
            divisor = (sum(-ph <= i < Hx + ph for i in ii) * sum(-pw <= j < Wx + pw for j in jj))
        else:
            divisor = len(inside)
        y[n, c, oh, ow] = sum(x[n, c, i, j] for i, j in inside) / divisor
    return y


def numerical_gradient(f, x, grad_output, eps=1e-6):
    """Central differences of ``sum(f(x) * grad_output)`` with respect to x."""
    x = x.copy()
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        saved = x[i]
        x[i] = saved + eps
        plus = np.sum(f(x) * grad_output)
        x[i] = saved - eps
        minus = np.sum(f(x) * grad_output)
        x[i] = saved
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def distinct_values(rng, shape):
    """Values at least 0.01 apart (no ties, no argmax flip under a 1e-6 nudge)."""
    size = int(np.prod(shape))
    return (rng.permutation(size) * 0.01 - size * 0.005).reshape(shape)


MAX_GRID = [
    (k, s, p, d, cm)
    for k, s, p, d, cm in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS, [False, True])
    if _valid(k, s, p, d, cm)
]
AVG_GRID = [
    (k, s, p, cm, cip)
    for k, s, p, cm, cip in itertools.product(KERNELS, STRIDES, PADDINGS, [False, True],
                                              [True, False])
    if _valid(k, s, p, 1, cm)
]


def test_grids_cover_padding_and_ceil_mode():
    assert any(p == 1 and cm for _, _, p, _, cm in MAX_GRID)
    assert any(p == (0, 1) and d == 2 for _, _, p, d, _ in MAX_GRID)
    assert len(AVG_GRID) >= 40


# ---------------------------------------------------------------------------
# reference vs naive loops


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", MAX_GRID)
def test_reference_max_pool_matches_naive(kernel, stride, padding, dilation, ceil_mode):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, H, W))
    x[0, 0, :2, :2] = 0.5          # a tie
    y, idx = reference.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, True)
    y_naive, idx_naive = naive_max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    np.testing.assert_array_equal(y, y_naive)
    np.testing.assert_array_equal(idx, idx_naive)


@pytest.mark.parametrize("kernel,stride,padding,ceil_mode,count_include_pad", AVG_GRID)
def test_reference_avg_pool_matches_naive(kernel, stride, padding, ceil_mode, count_include_pad):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, H, W))
    y = reference.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)
    want = naive_avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)
    np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("size,kernel,stride,pad,dilation,ceil_mode,expected", [
    (7, 2, 2, 0, 1, False, 3),
    (7, 2, 2, 0, 1, True, 4),        # the last window starts in the input
    (6, 2, 2, 1, 1, True, 4),        # (7 // 2) + 1 = 4; start 6 - 1 = 5 < 6 + 1
    (5, 3, 3, 1, 1, True, 2),        # ceil gives 3, but that window starts at 6 >= 5 + 1
    (4, 2, 3, 1, 1, True, 2),        # ceil gives 3, start 6 >= 4 + 1: dropped
    (8, 3, 2, 1, 2, False, 3),
])
def test_output_size_rule(size, kernel, stride, pad, dilation, ceil_mode, expected):
    g = pool_geometry((1, 1, size, size), kernel, stride, pad, dilation, ceil_mode)
    assert g.OH == g.OW == expected
    assert len(_window_starts(size, kernel, stride, pad, dilation, ceil_mode)) == expected


# ---------------------------------------------------------------------------
# Cython vs reference over the grid


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", MAX_GRID)
def test_max_pool_grid(kernel, stride, padding, dilation, ceil_mode, n_threads, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, H, W)).astype(dtype)
    args = (kernel, stride, padding, dilation, ceil_mode)
    y, idx = fastconv.max_pool2d(x, *args, return_indices=True, n_threads=n_threads)
    y_ref, idx_ref = reference.max_pool2d(x, *args, return_indices=True)
    assert y.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_array_equal(fastconv.max_pool2d(x, *args, n_threads=n_threads), y)

    grad_output = rng.standard_normal(y.shape).astype(dtype)
    want = reference.max_pool2d_backward(grad_output, x, *args)
    for indices in (None, idx):
        got = fastconv.max_pool2d_backward(grad_output, x, *args, indices=indices,
                                           n_threads=n_threads)
        kk = math.prod(_pair(kernel))
        assert_matches(got, want, dtype, kk, f"grad_x (indices given: {indices is not None})")


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("kernel,stride,padding,ceil_mode,count_include_pad", AVG_GRID)
def test_avg_pool_grid(kernel, stride, padding, ceil_mode, count_include_pad, n_threads, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, H, W)).astype(dtype)
    args = (kernel, stride, padding, ceil_mode, count_include_pad)
    kk = math.prod(_pair(kernel))
    y = fastconv.avg_pool2d(x, *args, n_threads=n_threads)
    assert_matches(y, reference.avg_pool2d(x, *args), dtype, kk, "y")
    grad_output = rng.standard_normal(y.shape).astype(dtype)
    got = fastconv.avg_pool2d_backward(grad_output, x, *args, n_threads=n_threads)
    assert_matches(got, reference.avg_pool2d_backward(grad_output, x, *args), dtype, kk,
                   "grad_x")


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 2, 5), (3, 5, 9, 4), (2, 16, 33, 31)])
def test_shapes(shape, dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    for args in [(2, None, 0, 1, True), (3, 2, 1, 1, True), (1, 1, 0, 1, False)]:
        if not _valid(*args, shape=shape):
            continue
        y, idx = fastconv.max_pool2d(x, *args, return_indices=True)
        y_ref, idx_ref = reference.max_pool2d(x, *args, return_indices=True)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(idx, idx_ref)
        k, s, p, _, cm = args
        assert_matches(fastconv.avg_pool2d(x, k, s, p, cm), reference.avg_pool2d(x, k, s, p, cm),
                       dtype, 9, "avg")


# ---------------------------------------------------------------------------
# gradients vs finite differences (float64, no ties)


GRAD_CASES = [(2, None, 0, 1, False), (3, 2, 1, 1, True), ((2, 3), (1, 2), (1, 1), 2, False),
              (3, 1, 1, 1, False), (2, 2, 1, 1, True)]


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", GRAD_CASES)
def test_max_pool_gradient_vs_finite_differences(kernel, stride, padding, dilation, ceil_mode):
    rng = np.random.default_rng(5)
    x = distinct_values(rng, (2, 2, 5, 6))
    args = (kernel, stride, padding, dilation, ceil_mode)
    grad_output = rng.standard_normal(fastconv.max_pool2d(x, *args).shape)
    numeric = numerical_gradient(lambda a: reference.max_pool2d(a, *args), x, grad_output)
    np.testing.assert_allclose(reference.max_pool2d_backward(grad_output, x, *args), numeric,
                               atol=1e-8)
    np.testing.assert_allclose(fastconv.max_pool2d_backward(grad_output, x, *args), numeric,
                               atol=1e-8)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("kernel,stride,padding,_,ceil_mode", GRAD_CASES)
def test_avg_pool_gradient_vs_finite_differences(kernel, stride, padding, _, ceil_mode,
                                                 count_include_pad):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 2, 5, 6))
    args = (kernel, stride, padding, ceil_mode, count_include_pad)
    grad_output = rng.standard_normal(fastconv.avg_pool2d(x, *args).shape)
    numeric = numerical_gradient(lambda a: reference.avg_pool2d(a, *args), x, grad_output)
    np.testing.assert_allclose(reference.avg_pool2d_backward(grad_output, x, *args), numeric,
                               atol=1e-8)
    np.testing.assert_allclose(fastconv.avg_pool2d_backward(grad_output, x, *args), numeric,
                               atol=1e-8)


def test_global_avg_pool_and_relu_gradients_vs_finite_differences():
    rng = np.random.default_rng(7)
    x = distinct_values(rng, (2, 3, 4, 5))      # no exact zeros: relu is smooth there
    x[x == 0] = 0.003
    g = rng.standard_normal((2, 3))
    numeric = numerical_gradient(fastconv.global_avg_pool2d, x, g)
    np.testing.assert_allclose(fastconv.global_avg_pool2d_backward(g, x), numeric, atol=1e-8)
    g = rng.standard_normal(x.shape)
    numeric = numerical_gradient(fastconv.relu, x, g)
    np.testing.assert_allclose(fastconv.relu_backward(g, x), numeric, atol=1e-8)


# ---------------------------------------------------------------------------
# max pooling semantics: indices, ties, NaN, padding


def test_indices_are_flat_positions_in_the_input_plane():
    x = np.zeros((1, 2, 4, 6))
    x[0, 1, 3, 5] = 1.0
    x[0, 0, 2, 1] = 1.0
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    assert idx[0, 1, 1, 2] == 3 * 6 + 5
    assert idx[0, 0, 1, 0] == 2 * 6 + 1
    # every index points at the value it reports
    planes = x.reshape(2, -1)
    np.testing.assert_array_equal(np.take_along_axis(planes, idx.reshape(2, -1), axis=1),
                                  y.reshape(2, -1))


def test_ties_go_to_the_first_tap_in_scan_order(dtype):
    x = np.ones((1, 1, 4, 4), dtype)
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(idx[0, 0], [[0, 2], [8, 10]])
    # overlapping windows with padding: the first *input* tap, never padding
    _, idx = fastconv.max_pool2d(x, 3, stride=1, padding=1, return_indices=True)
    assert idx[0, 0, 0, 0] == 0 and idx[0, 0, 3, 3] == 2 * 4 + 2
    np.testing.assert_array_equal(idx, reference.max_pool2d(x, 3, 1, 1,
                                                            return_indices=True)[1])


def test_padding_never_wins_for_negative_inputs(dtype):
    """The book's bug: zero padding made max pooling of negative inputs return 0."""
    x = -np.arange(1, 17, dtype=dtype).reshape(1, 1, 4, 4)
    y = fastconv.max_pool2d(x, 3, stride=2, padding=1)
    assert (y < 0).all()
    np.testing.assert_array_equal(y, reference.max_pool2d(x, 3, 2, 1))
    np.testing.assert_array_equal(y[0, 0], [[-1, -2], [-5, -6]])


def test_minus_inf_inputs_report_the_first_input_tap(dtype):
    x = np.full((1, 1, 3, 3), -np.inf, dtype)
    y, idx = fastconv.max_pool2d(x, 2, stride=2, padding=1, ceil_mode=True,
                                 return_indices=True)
    assert np.isneginf(y).all()
    np.testing.assert_array_equal(idx[0, 0], [[0, 1], [3, 4]])
    np.testing.assert_array_equal(
        idx, reference.max_pool2d(x, 2, 2, 1, ceil_mode=True, return_indices=True)[1])


def test_nan_propagates_and_the_last_nan_is_the_index(dtype):
    x = np.arange(16, dtype=dtype).reshape(1, 1, 4, 4)
    x[0, 0, 0, 0] = np.nan
    x[0, 0, 1, 0] = np.nan          # same window, later in scan order
    x[0, 0, 3, 3] = np.nan
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 0, 1, 1])
    assert y[0, 0, 0, 1] == 7 and y[0, 0, 1, 0] == 13
    assert idx[0, 0, 0, 0] == 4 and idx[0, 0, 1, 1] == 15
    y_ref, idx_ref = reference.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    # avg pooling and relu propagate NaN as well
    assert np.isnan(fastconv.avg_pool2d(x, 2)[0, 0, 0, 0])
    assert np.isnan(fastconv.relu(x)[0, 0, 0, 0])


def test_window_without_inputs_is_minus_inf_with_index_minus_one():
    # kernel 2, padding 1, dilation 2 on a 1x1 input: taps at -1 and +1, both padding
    x = np.ones((1, 1, 1, 1))
    y, idx = fastconv.max_pool2d(x, 2, stride=1, padding=1, dilation=2, return_indices=True)
    assert y.shape == (1, 1, 1, 1) and np.isneginf(y).all() and (idx == -1).all()
    y_ref, idx_ref = reference.max_pool2d(x, 2, 1, 1, 2, return_indices=True)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    for indices in (None, idx):
        grad = fastconv.max_pool2d_backward(np.ones((1, 1, 1, 1)), x, 2, 1, 1, 2,
                                            indices=indices)
        np.testing.assert_array_equal(grad, np.zeros_like(x))


def test_backward_with_indices_uses_them():
    """Indices that are not the argmax route the gradient where they say (no recompute)."""
    x = np.zeros((1, 1, 2, 2))
    grad = fastconv.max_pool2d_backward(np.array([[[[5.0]]]]), x, 2,
                                        indices=np.array([[[[3]]]]))
    np.testing.assert_array_equal(grad[0, 0], [[0, 0], [0, 5]])
    np.testing.assert_array_equal(
        reference.max_pool2d_backward(np.array([[[[5.0]]]]), x, 2, indices=np.array([[[[3]]]])),
        grad)


def test_overlapping_windows_accumulate_gradient():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1.0             # the max of all four 2x2 windows
    grad = fastconv.max_pool2d_backward(np.ones((1, 1, 2, 2)), x, 2, stride=1)
    assert grad[0, 0, 1, 1] == 4 and grad.sum() == 4


# ---------------------------------------------------------------------------
# avg pooling divisors (PyTorch's rules)


def test_avg_divisor_rules():
    x = np.ones((1, 1, 3, 3))
    # count_include_pad: the corner window covers 1 padded row and column -> 4/9
    y = fastconv.avg_pool2d(x, 3, stride=2, padding=1)
    np.testing.assert_allclose(y[0, 0], np.full((2, 2), 4 / 9))
    np.testing.assert_allclose(fastconv.avg_pool2d(x, 3, 2, 1, count_include_pad=False), 1.0)
    # ceil_mode: a window hanging past the padded input is clipped at its border
    # for the divisor (3x3 input, k=2, s=2, no padding: the last window is 1 wide)
    y = fastconv.avg_pool2d(x, 2, ceil_mode=True)
    np.testing.assert_allclose(y[0, 0], np.ones((2, 2)))
    # with padding 1, k=3, s=2, 4x4 input: OH = ceil(3/2) + 1 = 3; the last window
    # spans padded rows 4..6 of 0..5 -> 2 rows inside the padded input
    x = np.ones((1, 1, 4, 4))
    y = fastconv.avg_pool2d(x, 3, 2, 1, ceil_mode=True)
    assert y.shape == (1, 1, 3, 3)
    # corner (0,0): 2x2 inputs / 3x3 padded; last (2,2): 1x1 input / 2x2 inside padded
    np.testing.assert_allclose([y[0, 0, 0, 0], y[0, 0, 2, 2]], [4 / 9, 1 / 4])
    np.testing.assert_allclose(y, reference.avg_pool2d(x, 3, 2, 1, ceil_mode=True))


# ---------------------------------------------------------------------------
# global average pooling and ReLU


@pytest.mark.parametrize("n_threads", [1, 2])
def test_global_avg_pool(n_threads, dtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4, 5, 6)).astype(dtype)
    y = fastconv.global_avg_pool2d(x, n_threads=n_threads)
    assert y.shape == (3, 4) and y.dtype == dtype
    assert_matches(y, reference.global_avg_pool2d(x), dtype, 30, "y")
    assert fastconv.global_avg_pool2d(x, keepdims=True).shape == (3, 4, 1, 1)
    g = rng.standard_normal((3, 4)).astype(dtype)
    grad = fastconv.global_avg_pool2d_backward(g, x, n_threads=n_threads)
    assert_matches(grad, reference.global_avg_pool2d_backward(g, x), dtype, 1, "grad_x")
    np.testing.assert_array_equal(
        fastconv.global_avg_pool2d_backward(g.reshape(3, 4, 1, 1), x, n_threads=n_threads), grad)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4, 5), (300, 400)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_relu(shape, n_threads, dtype):
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(dtype)
    if x.size:
        x.reshape(-1)[0] = 0.0
    y = fastconv.relu(x, n_threads=n_threads)
    assert y.shape == x.shape and y.dtype == dtype
    np.testing.assert_array_equal(y, reference.relu(x))
    g = rng.standard_normal(shape).astype(dtype)
    grad = fastconv.relu_backward(g, x, n_threads=n_threads)
    np.testing.assert_array_equal(grad, reference.relu_backward(g, x))


def test_relu_nan_and_zero():
    x = np.array([np.nan, 0.0, -0.0, -1.0, 2.0, np.inf, -np.inf])
    np.testing.assert_array_equal(fastconv.relu(x), [np.nan, 0, 0, 0, 2, np.inf, 0])
    np.testing.assert_array_equal(fastconv.relu_backward(np.ones(7), x), [0, 0, 0, 0, 1, 1, 0])


# ---------------------------------------------------------------------------
# dtypes, layouts, empty inputs, purity


@pytest.mark.parametrize("x_dtype,expected", [
    (np.float32, np.float32), (np.float64, np.float64), (np.float16, np.float32),
    (np.int64, np.float64), (np.uint8, np.float64), (np.bool_, np.float64),
])
def test_dtype_rules(x_dtype, expected):
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((2, 3, 6, 6)) * 4).astype(x_dtype)
    x64 = x.astype(np.float64)
    y = fastconv.max_pool2d(x, 2)
    assert y.dtype == expected
    np.testing.assert_array_equal(y, reference.max_pool2d(x64, 2).astype(expected))
    assert fastconv.avg_pool2d(x, 2).dtype == expected
    assert fastconv.global_avg_pool2d(x).dtype == expected
    assert fastconv.relu(x).dtype == expected
    g = np.ones((2, 3, 3, 3), np.float32)
    grad_dtype = compute_dtype(np.dtype(np.float32), np.dtype(x_dtype))
    assert fastconv.max_pool2d_backward(g, x, 2).dtype == grad_dtype
    assert fastconv.avg_pool2d_backward(g, x, 2).dtype == grad_dtype


def test_non_contiguous_and_read_only_inputs(dtype):
    rng = np.random.default_rng(11)
    big = rng.standard_normal((2, 6, 14, 16)).astype(dtype)
    big.flags.writeable = False
    x = big[:, ::2, 1::2, ::-2]
    y, idx = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True)
    y_ref, idx_ref = reference.max_pool2d(np.ascontiguousarray(x), 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    g = np.asfortranarray(rng.standard_normal(y.shape).astype(dtype))
    idx.flags.writeable = False
    assert_matches(fastconv.max_pool2d_backward(g, x, 3, 2, 1, indices=idx[:, :, :, :]),
                   reference.max_pool2d_backward(g, x, 3, 2, 1), dtype, 9, "max grad")
    assert_matches(fastconv.avg_pool2d(x, 3, 2, 1), reference.avg_pool2d(x, 3, 2, 1), dtype, 9,
                   "avg")
    assert_matches(fastconv.avg_pool2d_backward(g, x, 3, 2, 1),
                   reference.avg_pool2d_backward(g, x, 3, 2, 1), dtype, 9, "avg grad")
    np.testing.assert_array_equal(fastconv.relu(x), reference.relu(x))


@pytest.mark.parametrize("shape", [(0, 3, 6, 6), (2, 0, 6, 6)])
def test_empty_batch_or_channels(shape, dtype):
    x = np.zeros(shape, dtype)
    out_shape = shape[:2] + (3, 3)
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    assert y.shape == idx.shape == out_shape and y.dtype == dtype
    assert fastconv.avg_pool2d(x, 2).shape == out_shape
    g = np.zeros(out_shape, dtype)
    assert fastconv.max_pool2d_backward(g, x, 2).shape == shape
    assert fastconv.max_pool2d_backward(g, x, 2, indices=idx).shape == shape
    assert fastconv.avg_pool2d_backward(g, x, 2).shape == shape
    assert fastconv.global_avg_pool2d(x).shape == shape[:2]
    assert fastconv.global_avg_pool2d_backward(np.zeros(shape[:2]), x).shape == shape
    assert fastconv.relu(x).shape == shape


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_thread_count_does_not_change_results(n_threads, dtype):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 5, 11, 13)).astype(dtype)
    g = rng.standard_normal((3, 5, 6, 7)).astype(dtype)
    for f in (lambda n: fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True, n_threads=n),
              lambda n: fastconv.avg_pool2d(x, 3, 2, 1, ceil_mode=True, n_threads=n),
              lambda n: fastconv.max_pool2d_backward(g, x, 3, 2, 1, ceil_mode=True, n_threads=n),
              lambda n: fastconv.avg_pool2d_backward(g, x, 3, 2, 1, ceil_mode=True,
                                                     n_threads=n)):
        np.testing.assert_array_equal(f(n_threads), f(1))


# ---------------------------------------------------------------------------
# errors


X = np.zeros((2, 3, 6, 6))


@pytest.mark.parametrize("call,error,match", [
    (lambda: fastconv.max_pool2d(X, 0), ValueError, "kernel_size must be positive"),
    (lambda: fastconv.max_pool2d(X, (2, -1)), ValueError, "kernel_size must be positive"),
    (lambda: fastconv.avg_pool2d(X, 2, stride=0), ValueError, "stride must be positive"),
    (lambda: fastconv.max_pool2d(X, 2, dilation=0), ValueError, "dilation must be positive"),
    (lambda: fastconv.max_pool2d(X, 3, padding=2), ValueError,
     r"padding=2 must be at most half of kernel_size=\(3, 3\)"),
    (lambda: fastconv.avg_pool2d(X, 2, padding=(0, 2)), ValueError, "at most half"),
    (lambda: fastconv.max_pool2d(X, 1, padding=1), ValueError, "at most half"),
    (lambda: fastconv.max_pool2d(X, 2, padding=-1), ValueError, "non-negative"),
    (lambda: fastconv.max_pool2d(X, 2, padding=(1, 1, 0, 0)), ValueError,
     r"int or a pair \(ph, pw\)"),
    (lambda: fastconv.max_pool2d(X, 7), ValueError,
     r"output size would be 0x0 .*x.shape=\(2, 3, 6, 6\)"),
    (lambda: fastconv.max_pool2d(X, 3, dilation=3), ValueError, "output size would be"),
    (lambda: fastconv.max_pool2d(X[0], 2), ValueError, r"x must be 4-D .*\(3, 6, 6\)"),
    (lambda: fastconv.avg_pool2d(X.astype(complex), 2), TypeError, "unsupported dtype"),
    (lambda: fastconv.max_pool2d(None, 2), TypeError, "x must be an array"),
    (lambda: fastconv.max_pool2d(X, 2.0), TypeError, "kernel_size must be an int"),
    (lambda: fastconv.max_pool2d(X, 2, ceil_mode=1), TypeError, "ceil_mode must be True or False"),
    (lambda: fastconv.max_pool2d(X, 2, return_indices="yes"), TypeError, "return_indices"),
    (lambda: fastconv.avg_pool2d(X, 2, count_include_pad=None), TypeError, "count_include_pad"),
    (lambda: fastconv.max_pool2d(X, 2, n_threads=0), ValueError, "n_threads=0"),
    (lambda: fastconv.max_pool2d_backward(np.zeros((2, 3, 4, 3)), X, 2), ValueError,
     r"grad_output must have the forward output's shape \(2, 3, 3, 3\).*got \(2, 3, 4, 3\)"),
    (lambda: fastconv.avg_pool2d_backward(np.zeros((2, 3, 3)), X, 2), ValueError,
     "grad_output must have"),
    (lambda: fastconv.max_pool2d_backward(np.zeros((2, 3, 3, 3)), X, 2,
                                          indices=np.zeros((2, 3, 3, 3))),
     TypeError, "indices must be an int64 array, got dtype float64"),
    (lambda: fastconv.max_pool2d_backward(np.zeros((2, 3, 3, 3)), X, 2,
                                          indices=np.zeros((2, 3, 3, 2), np.int64)),
     ValueError, r"indices must have the forward output's shape \(2, 3, 3, 3\)"),
    (lambda: fastconv.max_pool2d_backward(np.zeros((2, 3, 3, 3)), X, 2,
                                          indices=np.full((2, 3, 3, 3), 36, np.int64)),
     ValueError, r"outside \[-1, H\*W\) = \[-1, 36\)"),
    (lambda: fastconv.max_pool2d_backward(np.zeros((2, 3, 3, 3)), X, 2,
                                          indices=np.full((2, 3, 3, 3), -2, np.int64)),
     ValueError, "54 value"),
    (lambda: fastconv.global_avg_pool2d(np.zeros((2, 3, 0, 4))), ValueError, "non-empty planes"),
    (lambda: fastconv.global_avg_pool2d_backward(np.zeros((2, 4)), X), ValueError,
     r"grad_output must have shape \(2, 3\)"),
    (lambda: fastconv.relu_backward(np.zeros(3), np.zeros(4)), ValueError, "shape of x"),
    (lambda: fastconv.relu(np.array(["a"])), TypeError, "unsupported dtype"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_reference_rejects_what_fastconv_rejects():
    with pytest.raises(ValueError, match="at most half"):
        reference.max_pool2d(X, 2, padding=2)
    with pytest.raises(ValueError, match="grad_output has shape"):
        reference.avg_pool2d_backward(np.zeros((1, 1, 1, 1)), X, 2)


# ---------------------------------------------------------------------------
# PyTorch, when it happens to be installed (never required)


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", MAX_GRID[::3])
def test_against_torch(kernel, stride, padding, dilation, ceil_mode):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 3, H, W))
    t = torch.from_numpy(x).requires_grad_()
    y_t, idx_t = F.max_pool2d(t, kernel, stride, padding, dilation, ceil_mode, True)
    y, idx = fastconv.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, True)
    np.testing.assert_array_equal(y, y_t.detach().numpy())
    np.testing.assert_array_equal(idx, idx_t.numpy())
    if dilation == 1:
        for cip in (True, False):
            want = F.avg_pool2d(torch.from_numpy(x), kernel, stride, padding, ceil_mode, cip)
            np.testing.assert_allclose(fastconv.avg_pool2d(x, kernel, stride, padding, ceil_mode,
                                                           cip), want.numpy(), rtol=1e-12)


# ---------------------------------------------------------------------------
# layers


def test_max_pool_layer_forward_backward(dtype):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 3, 9, 8)).astype(dtype)
    layer = fastconv.MaxPool2D(3, stride=2, padding=1, ceil_mode=True)
    y = layer(x)
    np.testing.assert_array_equal(y, fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True))
    np.testing.assert_array_equal(layer.indices,
                                  fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True,
                                                      return_indices=True)[1])
    g = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_array_equal(layer.backward(g),
                                  fastconv.max_pool2d_backward(g, x, 3, 2, 1, ceil_mode=True))


def test_avg_pool_and_relu_layers(dtype):
    rng = np.random.default_rng(16)
    x = rng.standard_normal((2, 3, 9, 8)).astype(dtype)
    layer = fastconv.AvgPool2D((2, 3), stride=(1, 2), padding=(1, 0), count_include_pad=False)
    y = layer(x)
    args = ((2, 3), (1, 2), (1, 0), False, False)
    np.testing.assert_array_equal(y, fastconv.avg_pool2d(x, *args))
    g = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_array_equal(layer.backward(g), fastconv.avg_pool2d_backward(g, x, *args))
    act = fastconv.ReLU()
    np.testing.assert_array_equal(act(x), fastconv.relu(x))
    np.testing.assert_array_equal(act.backward(x), fastconv.relu_backward(x, x))


@pytest.mark.parametrize("layer,text", [
    (fastconv.MaxPool2D(2), "MaxPool2D(kernel_size=2)"),
    (fastconv.MaxPool2D(2, stride=2), "MaxPool2D(kernel_size=2)"),
    (fastconv.MaxPool2D((3, 2), 1, (1, 0), 2, True),
     "MaxPool2D(kernel_size=(3, 2), stride=1, padding=(1, 0), dilation=2, ceil_mode=True)"),
    (fastconv.AvgPool2D(3, 2, 1), "AvgPool2D(kernel_size=3, stride=2, padding=1)"),
    (fastconv.AvgPool2D(2, ceil_mode=True, count_include_pad=False),
     "AvgPool2D(kernel_size=2, ceil_mode=True, count_include_pad=False)"),
    (fastconv.ReLU(), "ReLU()"),
])
def test_layer_repr(layer, text):
    assert repr(layer) == text


@pytest.mark.parametrize("make,error,match", [
    (lambda: fastconv.MaxPool2D(0), ValueError, "kernel_size must be positive"),
    (lambda: fastconv.MaxPool2D(2, padding=2), ValueError, "at most half"),
    (lambda: fastconv.AvgPool2D(2, stride=(1, 0)), ValueError, "stride must be positive"),
    (lambda: fastconv.AvgPool2D(2, count_include_pad="no"), TypeError, "count_include_pad"),
    (lambda: fastconv.MaxPool2D(2, dilation=0), ValueError, "dilation must be positive"),
])
def test_layer_argument_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("layer", [fastconv.MaxPool2D(2), fastconv.AvgPool2D(2), fastconv.ReLU()])
def test_layer_backward_before_forward(layer):
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.zeros((1, 1, 1, 1)))


def test_small_cnn_gradient_vs_finite_differences():
    """Conv -> ReLU -> MaxPool -> Conv -> AvgPool through the layers, float64."""
    rng = np.random.default_rng(17)
    conv1 = fastconv.Conv2D(2, 3, 3, padding=1, dtype=np.float64, rng=0)
    conv2 = fastconv.Conv2D(3, 2, 2, dtype=np.float64, rng=1)
    layers = [conv1, fastconv.ReLU(), fastconv.MaxPool2D(2, stride=2, padding=1), conv2,
              fastconv.AvgPool2D(2, ceil_mode=True)]
    x = rng.standard_normal((2, 2, 6, 5))

    def forward(a):
        for layer in layers:
            a = layer(a)
        return a

    g = rng.standard_normal(forward(x).shape)
    forward(x)
    dx = g
    for layer in reversed(layers):
        dx = layer.backward(dx)
    numeric = numerical_gradient(forward, x, g, eps=1e-6)
    np.testing.assert_allclose(dx, numeric, atol=1e-7)


def test_pooling_module_doctests():
    """fastconv._pooling's Examples run (tests/test_docs.py covers the other modules)."""
    import doctest

    import fastconv._pooling

    result = doctest.testmod(fastconv._pooling, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 10
