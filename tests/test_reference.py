"""The NumPy reference against the loop oracles, finite differences and the seeds.

Chain of trust: ``_naive`` (loops, obviously right) -> ``fastconv.reference``
(this file) -> the compiled kernels (their own test modules).
"""

import itertools
import pathlib
import sys

import numpy as np
import pytest

# importlib mode keeps tests/ off sys.path; the loop oracles live next to this file.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _naive import (  # noqa: E402
    naive_conv2d,
    naive_im2col,
    numerical_gradients,
    seed_col2im,
    seed_im2col,
)

from fastconv import reference  # noqa: E402

SHAPES = [(5, 5), (6, 4), (7, 9)]
KERNELS = [(1, 1), (2, 2), (3, 3), (5, 5), (2, 3)]
STRIDES = [1, 2, 3, (1, 2)]
PADDINGS = [0, 1, (1, 2), (0, 1, 2, 1)]
DILATIONS = [1, 2]

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pad4(p):
    if isinstance(p, int):
        return (p,) * 4
    if len(p) == 2:
        return (p[0], p[0], p[1], p[1])
    return tuple(p)


def _fits(hw, kernel, padding, dilation):
    """Whether the dilated kernel fits the padded input (worked out here, not by the library)."""
    top, bottom, left, right = _pad4(padding)
    dh, dw = _pair(dilation)
    return (hw[0] + top + bottom >= dh * (kernel[0] - 1) + 1
            and hw[1] + left + right >= dw * (kernel[1] - 1) + 1)


def _data(seed, N, C, hw, F, kernel, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C) + tuple(hw)).astype(dtype)
    w = rng.standard_normal((F, C) + tuple(kernel)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


VALID_GRID = [
    pytest.param(hw, k, s, p, d, id=f"{hw[0]}x{hw[1]}-k{k[0]}x{k[1]}-s{s}-p{p}-d{d}")
    for hw, k, s, p, d in itertools.product(SHAPES, KERNELS, STRIDES, PADDINGS, DILATIONS)
    if _fits(hw, k, p, d)
]


# --- forward against the loop definition --------------------------------------

def test_naive_conv2d_hand_example():
    # Checks the oracle itself: a ones kernel sums each 2x2 window, plus the bias.
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    y = naive_conv2d(x, np.ones((1, 1, 2, 2)), np.array([1.0]), 1, 0, 1)
    np.testing.assert_array_equal(y, [[[[9.0, 13.0], [21.0, 25.0]]]])


@pytest.mark.parametrize("hw, kernel, stride, padding, dilation", VALID_GRID)
def test_conv2d_matches_naive_grid(hw, kernel, stride, padding, dilation):
    x, w, b = _data(0, 2, 2, hw, 3, kernel)
    expected = naive_conv2d(x, w, b, stride, padding, dilation)
    got = reference.conv2d(x, w, b, stride, padding, dilation)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, **TIGHT)


@pytest.mark.parametrize("N, C, F", list(itertools.product([1, 3], [1, 3], [1, 4])))
@pytest.mark.parametrize("hw, kernel, stride, padding, dilation", [
    ((5, 5), (3, 3), 1, 1, 1),
    ((7, 9), (2, 3), (1, 2), (0, 1, 2, 1), 2),
    ((6, 4), (1, 1), 3, (1, 2), 1),
])
def test_conv2d_matches_naive_batch_and_channels(N, C, F, hw, kernel, stride, padding, dilation):
    x, w, b = _data(1, N, C, hw, F, kernel)
    np.testing.assert_allclose(reference.conv2d(x, w, b, stride, padding, dilation),
                               naive_conv2d(x, w, b, stride, padding, dilation), **TIGHT)


@pytest.mark.parametrize("stride, padding, dilation",
                         list(itertools.product(STRIDES, PADDINGS, DILATIONS)))
@pytest.mark.parametrize("hw, kernel", [((7, 9), (2, 3)), ((6, 4), (3, 1))])
def test_im2col_layout_matches_naive(hw, kernel, stride, padding, dilation):
    x = _data(2, 2, 3, hw, 1, kernel)[0]
    np.testing.assert_array_equal(reference.im2col(x, *kernel, stride, padding, dilation),
                                  naive_im2col(x, *kernel, stride, padding, dilation))


def test_bias_none_equals_zero_bias():
    x, w, _ = _data(3, 2, 3, (6, 4), 4, (2, 3))
    np.testing.assert_array_equal(reference.conv2d(x, w, None, 2, 1),
                                  reference.conv2d(x, w, np.zeros(4), 2, 1))


def test_bias_is_added_per_filter():
    x, w, b = _data(4, 2, 3, (6, 4), 4, (2, 3))
    diff = reference.conv2d(x, w, b, 1, (0, 1, 2, 1)) - reference.conv2d(x, w, None, 1, (0, 1, 2, 1))
    np.testing.assert_allclose(diff, np.broadcast_to(b[None, :, None, None], diff.shape), **TIGHT)


# --- gradients ----------------------------------------------------------------

GRAD_CONFIGS = [
    # (N, C, F, hw, kernel, stride, padding, dilation)
    pytest.param(2, 2, 3, (5, 4), (3, 3), 1, 1, 1, id="plain"),
    pytest.param(1, 2, 2, (6, 5), (3, 2), 2, 0, 1, id="stride2-nonsquare"),
    pytest.param(2, 1, 2, (5, 5), (2, 3), 1, (0, 1, 2, 1), 1, id="asym-padding"),
    pytest.param(1, 2, 2, (7, 6), (2, 2), 1, 1, 2, id="dilation2"),
    pytest.param(2, 2, 3, (6, 7), (3, 2), (2, 3), (1, 0, 2, 1), (2, 1), id="everything"),
    pytest.param(1, 3, 2, (4, 4), (1, 1), 2, 1, 1, id="pointwise-padded"),
    pytest.param(1, 1, 1, (3, 3), (3, 3), 1, 0, 1, id="output-1x1"),
]


@pytest.mark.parametrize("N, C, F, hw, kernel, stride, padding, dilation", GRAD_CONFIGS)
def test_backward_matches_finite_differences(N, C, F, hw, kernel, stride, padding, dilation):
    x, w, b = _data(5, N, C, hw, F, kernel)
    out_shape = reference.conv2d(x, w, b, stride, padding, dilation).shape
    dy = np.random.default_rng(6).standard_normal(out_shape)

    gx, gw, gb = reference.conv2d_backward(dy, x, w, stride, padding, dilation)
    nx, nw, nb = numerical_gradients(x, w, b, dy, stride, padding, dilation)
    assert (gx.shape, gw.shape, gb.shape) == (x.shape, w.shape, b.shape)
    np.testing.assert_allclose(gx, nx, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gw, nw, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gb, nb, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("hw, kernel, padding", [
    ((5, 5), (3, 3), 0),
    ((5, 5), (3, 3), 1),
    ((6, 4), (2, 3), (1, 2)),
    ((7, 9), (3, 2), (0, 1, 2, 1)),
    ((7, 9), (5, 5), (2, 0, 1, 3)),
    ((4, 6), (1, 3), (1, 0, 0, 2)),
    # Padding wider than K - 1: the seed's dy padding goes negative (a crop).
    ((4, 5), (1, 1), 1),
    ((5, 4), (2, 3), (3, 0, 0, 4)),
])
def test_input_grad_full_matches_backward(hw, kernel, padding):
    x, w, _ = _data(7, 2, 3, hw, 4, kernel)
    dy = np.random.default_rng(8).standard_normal(reference.conv2d(x, w, padding=padding).shape)
    expected = reference.conv2d_backward(dy, x, w, padding=padding)[0]
    got = reference.conv2d_input_grad_full(dy, w, x.shape, padding)
    np.testing.assert_allclose(got, expected, **TIGHT)


def test_input_grad_full_rejects_strided_grad_output():
    x, w, _ = _data(9, 1, 2, (7, 7), 3, (3, 3))
    dy = np.ones(reference.conv2d(x, w, stride=2).shape)
    with pytest.raises(ValueError, match="stride 1 and dilation 1"):
        reference.conv2d_input_grad_full(dy, w, x.shape)


# --- im2col / col2im ------------------------------------------------------------

@pytest.mark.parametrize("stride, padding, dilation",
                         list(itertools.product(STRIDES, PADDINGS, DILATIONS)))
@pytest.mark.parametrize("hw, kernel", [((7, 9), (2, 3)), ((5, 5), (3, 3))])
def test_im2col_col2im_adjoint(hw, kernel, stride, padding, dilation):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3) + hw)
    col_x = reference.im2col(x, *kernel, stride, padding, dilation)
    c = rng.standard_normal(col_x.shape)
    lhs = np.vdot(col_x, c)
    rhs = np.vdot(x, reference.col2im(c, x.shape, *kernel, stride, padding, dilation))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


@pytest.mark.parametrize("stride, pad", list(itertools.product([1, 2, 3], [0, 1, 2])))
@pytest.mark.parametrize("hw, kernel", [((7, 9), (3, 3)), ((6, 5), (2, 3)), ((5, 5), (1, 1))])
def test_matches_seed_im2col_col2im(hw, kernel, stride, pad):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3) + hw)
    col = reference.im2col(x, *kernel, stride, pad)
    np.testing.assert_array_equal(col, seed_im2col(x, *kernel, stride, pad))
    c = rng.standard_normal(col.shape)
    np.testing.assert_allclose(reference.col2im(c, x.shape, *kernel, stride, pad),
                               seed_col2im(c, x.shape, *kernel, stride, pad), **TIGHT)


# --- dtypes, inputs, errors -------------------------------------------------------

def test_float32_in_float32_out():
    x, w, b = _data(12, 2, 3, (6, 5), 4, (3, 2), dtype=np.float32)
    kw = dict(stride=(1, 2), padding=(0, 1, 2, 1), dilation=(2, 1))
    col = reference.im2col(x, 3, 2, kw["stride"], kw["padding"], kw["dilation"])
    assert col.dtype == np.float32
    assert reference.col2im(col, x.shape, 3, 2, kw["stride"], kw["padding"],
                            kw["dilation"]).dtype == np.float32
    y = reference.conv2d(x, w, b, **kw)
    assert y.dtype == np.float32
    # Still the right numbers, not just the right dtype.
    y64 = reference.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw)
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)

    dy = np.ones_like(y)
    grads = reference.conv2d_backward(dy, x, w, **kw)
    assert [g.dtype for g in grads] == [np.float32] * 3
    grads64 = reference.conv2d_backward(dy.astype(np.float64), x.astype(np.float64),
                                        w.astype(np.float64), **kw)
    for g, g64 in zip(grads, grads64):
        np.testing.assert_allclose(g, g64, rtol=1e-5, atol=1e-5)
    full = reference.conv2d_input_grad_full(np.ones_like(reference.conv2d(x, w, padding=1)),
                                            w, x.shape, padding=1)
    assert full.dtype == np.float32


def test_float64_bias_does_not_promote_float32():
    x, w, b = _data(13, 1, 2, (5, 5), 2, (3, 3), dtype=np.float32)
    assert reference.conv2d(x, w, b.astype(np.float64)).dtype == np.float32


def test_inputs_unchanged():
    x, w, b = _data(14, 2, 2, (5, 6), 3, (2, 3))
    dy = np.random.default_rng(15).standard_normal(reference.conv2d(x, w, b, 2, 1).shape)
    copies = [a.copy() for a in (x, w, b, dy)]
    reference.conv2d(x, w, b, 2, 1)
    reference.conv2d_backward(dy, x, w, 2, 1)
    col = reference.im2col(x, 2, 3, 2, 1)
    col_copy = col.copy()
    reference.col2im(col, x.shape, 2, 3, 2, 1)
    for a, a0 in zip((x, w, b, dy, col), copies + [col_copy]):
        np.testing.assert_array_equal(a, a0)


EMPTY_OUTPUT_CALLS = {
    "im2col": lambda: reference.im2col(np.ones((1, 1, 4, 4)), 5, 1),
    "im2col-dilated": lambda: reference.im2col(np.ones((1, 1, 4, 4)), 3, 3, dilation=2),
    "col2im": lambda: reference.col2im(np.ones((1, 25)), (1, 1, 4, 4), 5, 5),
    "conv2d": lambda: reference.conv2d(np.ones((1, 2, 3, 6)), np.ones((1, 2, 2, 4)),
                                       dilation=(1, 2)),
    "conv2d-backward": lambda: reference.conv2d_backward(
        np.ones((1, 1, 1, 1)), np.ones((1, 1, 2, 2)), np.ones((1, 1, 3, 3))),
}


@pytest.mark.parametrize("call", list(EMPTY_OUTPUT_CALLS.values()),
                         ids=list(EMPTY_OUTPUT_CALLS))
def test_empty_output_raises(call):
    with pytest.raises(ValueError, match=r"output size would be .* \(< 1\)"):
        call()


def test_padding_rescues_small_input():
    # The error above is about the *padded* size: the same kernel fits once padded.
    y = reference.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 5, 5)), padding=(1, 0, 0, 1))
    assert y.shape == (1, 1, 1, 1)
    assert y[0, 0, 0, 0] == 16.0


def test_col2im_wrong_col_shape_raises():
    with pytest.raises(ValueError, match=r"col has shape \(4, 5\)"):
        reference.col2im(np.ones((4, 5)), (1, 1, 3, 3), 2, 2)


def test_backward_wrong_grad_output_shape_raises():
    x, w, _ = _data(16, 1, 2, (5, 5), 3, (3, 3))
    with pytest.raises(ValueError, match=r"grad_output has shape \(1, 3, 2, 2\)"):
        reference.conv2d_backward(np.ones((1, 3, 2, 2)), x, w)


def test_conv2d_channel_mismatch_raises():
    with pytest.raises(ValueError, match="x has 3 channels but weight expects 2"):
        reference.conv2d(np.ones((1, 3, 5, 5)), np.ones((4, 2, 3, 3)))
