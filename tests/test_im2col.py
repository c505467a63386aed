"""Public fastconv.im2col / col2im: the seeds' batch layout (N*OH*OW, C*FH*FW), Cython-fast.

Checked against fastconv.reference, against the seeds' verbatim functions, by the
adjoint identity, and as a one-import drop-in for the seeds' Convolution layer.
"""

import itertools

import numpy as np
import pytest
from _helpers import assert_matches
from _naive import seed_col2im, seed_convolution_class, seed_im2col

import fastconv
from fastconv import reference

STRIDES = [1, 2, 3, (1, 2)]
PADS = [0, 1, 2, (1, 2), (0, 1, 2, 1)]
KERNELS = [(1, 1), (2, 2), (3, 3), (2, 3)]
SHAPE = (2, 3, 7, 8)


def _id(value):
    return str(value).replace(" ", "")


GRID = [pytest.param(k, s, p, id=f"k{k[0]}x{k[1]}-s{_id(s)}-p{_id(p)}")
        for k, s, p in itertools.product(KERNELS, STRIDES, PADS)]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("kernel, stride, pad", GRID)
def test_matches_reference_and_seeds(kernel, stride, pad, n_threads, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(dtype)
    x_before = x.copy()
    FH, FW = kernel

    col = fastconv.im2col(x, FH, FW, stride, pad, n_threads=n_threads)
    expected = reference.im2col(x, FH, FW, stride, pad)
    assert col.dtype == dtype
    assert col.shape == expected.shape
    np.testing.assert_array_equal(col, expected)        # a copy: exact

    dcol = rng.standard_normal(col.shape).astype(dtype)
    dcol_before = dcol.copy()
    img = fastconv.col2im(dcol, SHAPE, FH, FW, stride, pad, n_threads=n_threads)
    np.testing.assert_array_equal(dcol, dcol_before)
    assert img.dtype == dtype and img.shape == SHAPE
    assert_matches(img, reference.col2im(dcol, SHAPE, FH, FW, stride, pad), dtype, FH * FW,
                   "col2im")

    if isinstance(stride, int) and isinstance(pad, int):
        # the seeds' functions (int stride and pad only; float64 buffers)
        np.testing.assert_array_equal(col, seed_im2col(x, FH, FW, stride, pad).astype(dtype))
        assert_matches(img, seed_col2im(dcol, SHAPE, FH, FW, stride, pad).astype(dtype), dtype,
                       FH * FW, "seed col2im")
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("shape, kernel, stride, pad", [
    ((2, 3, 7, 8), (3, 3), 1, 1),
    ((2, 3, 7, 8), (2, 3), (1, 2), (0, 1, 2, 1)),
    ((3, 2, 9, 6), (3, 2), 2, (1, 2)),
    ((1, 4, 5, 5), (5, 5), 3, 2),
    ((2, 1, 6, 6), (1, 1), 2, 0),
    ((1, 1, 1, 1), (1, 1), 1, 0),
])
def test_adjoint_identity(shape, kernel, stride, pad, n_threads):
    """<im2col(x), y> == <x, col2im(y)>: col2im is im2col's transpose."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    col = fastconv.im2col(x, *kernel, stride, pad, n_threads=n_threads)
    y = rng.standard_normal(col.shape)
    lhs = np.vdot(col, y)
    rhs = np.vdot(x, fastconv.col2im(y, shape, *kernel, stride, pad, n_threads=n_threads))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


@pytest.mark.parametrize("in_dtype, out_dtype", [
    (np.float32, np.float32), (np.float64, np.float64),
    (np.float16, np.float32), (np.int32, np.float64), (np.bool_, np.float64),
])
def test_dtype(in_dtype, out_dtype):
    x = (np.arange(2 * 3 * 5 * 5) % 7).reshape(2, 3, 5, 5).astype(in_dtype)
    col = fastconv.im2col(x, 2, 2, 1, 1)
    assert col.dtype == out_dtype
    np.testing.assert_array_equal(col, reference.im2col(x.astype(out_dtype), 2, 2, 1, 1))
    img = fastconv.col2im(col.astype(in_dtype), x.shape, 2, 2, 1, 1)
    assert img.dtype == out_dtype


def test_empty_batch(dtype):
    x = np.zeros((0, 3, 7, 8), dtype)
    col = fastconv.im2col(x, 3, 2, 2, 1)
    assert col.shape == (0, 3 * 3 * 2) and col.dtype == dtype
    img = fastconv.col2im(col, x.shape, 3, 2, 2, 1)
    assert img.shape == x.shape and img.dtype == dtype


def test_empty_planes_are_rejected():
    """H = 0 or W = 0 would make every tap read padding; like PyTorch, that is an error."""
    with pytest.raises(ValueError, match=r"input_data must have .*non-empty planes.*\(1, 2, 0, 0\)"):
        fastconv.im2col(np.zeros((1, 2, 0, 0)), 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"input_shape must have .*non-empty planes"):
        fastconv.col2im(np.ones((4, 2)), (1, 2, 0, 0), 1, 1, 1, 1)
    x = np.zeros((2, 1, 0, 3))
    weight = np.ones((2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"x must have .*non-empty planes.*\(2, 1, 0, 3\)"):
        fastconv.conv2d(x, weight, padding=1)
    with pytest.raises(ValueError, match="non-empty planes"):
        fastconv.conv2d_backward(np.ones((2, 2, 2, 5)), x, weight, padding=1)


def test_non_contiguous_inputs(dtype):
    rng = np.random.default_rng(2)
    big = rng.standard_normal((2, 6, 14, 16)).astype(dtype)
    x = big[:, ::2, 1::2, ::-1]                      # strided and reversed
    assert not x.flags.c_contiguous
    big.flags.writeable = False                      # read-only works too
    col = fastconv.im2col(x, 3, 2, (2, 1), 1)
    np.testing.assert_array_equal(col, reference.im2col(np.ascontiguousarray(x), 3, 2, (2, 1), 1))

    for dcol in (np.asfortranarray(col), np.repeat(col, 2, axis=1)[:, ::2]):
        assert not dcol.flags.c_contiguous
        img = fastconv.col2im(dcol, x.shape, 3, 2, (2, 1), 1)
        assert_matches(img, reference.col2im(np.ascontiguousarray(dcol), x.shape, 3, 2, (2, 1), 1),
                       dtype, 6)


def test_n_threads_do_not_change_the_result():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 11, 9))
    col = fastconv.im2col(x, 3, 3, 2, 1, n_threads=1)
    y = rng.standard_normal(col.shape)
    img = fastconv.col2im(y, x.shape, 3, 3, 2, 1, n_threads=1)
    for n_threads in (2, 3, 5, -1, None):
        np.testing.assert_array_equal(fastconv.im2col(x, 3, 3, 2, 1, n_threads=n_threads), col)
        # col2im sums overlaps per (image, channel); a thread never splits that sum
        np.testing.assert_array_equal(fastconv.col2im(y, x.shape, 3, 3, 2, 1, n_threads=n_threads),
                                      img)


# --- the one-import drop-in ---------------------------------------------------------

# the seeds' layer with `from common.util import im2col, col2im` swapped for fastconv's
Convolution = seed_convolution_class(fastconv.im2col, fastconv.col2im)


@pytest.mark.parametrize("kernel, stride, pad", [
    ((3, 3), 1, 0), ((3, 3), 1, 1), ((5, 5), 1, 2), ((2, 2), 2, 0), ((3, 3), 2, 1),
    ((1, 1), 1, 0), ((2, 3), 3, 1),
])
def test_seed_convolution_with_fastconv_im2col(kernel, stride, pad, dtype):
    rng = np.random.default_rng(4)
    N, C, H, W, F = 2, 3, 9, 8, 5
    weight = rng.standard_normal((F, C, *kernel)).astype(dtype)
    bias = rng.standard_normal(F).astype(dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    layer = Convolution(weight, bias, stride, pad)

    y = layer.forward(x)
    assert y.dtype == dtype                         # the seeds' float64 buffers are gone
    K = C * kernel[0] * kernel[1]
    assert_matches(y, fastconv.conv2d(x, weight, bias, stride, pad), dtype, K, "forward")

    dout = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dout)
    gx, gw, gb = fastconv.conv2d_backward(dout, x, weight, stride, pad)
    P = N * y.shape[2] * y.shape[3]
    assert_matches(dx, gx, dtype, F * kernel[0] * kernel[1], "dx")
    assert_matches(layer.dW, gw, dtype, P, "dW")
    assert_matches(layer.db, gb, dtype, P, "db")
