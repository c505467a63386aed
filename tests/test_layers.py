"""Conv2D: the layer's wiring (forward/backward against the reference), initialisation,
repr, the seeds' ``Convolution(W, b, stride, pad)`` constructor, and a tiny SGD run."""

import math

import numpy as np
import pytest
from _helpers import assert_matches
from _naive import seed_col2im, seed_convolution_class, seed_im2col

import fastconv
from fastconv import Conv2D, reference

LAYER_CONFIGS = [
    # (in, out, kernel_size, stride, padding, dilation)
    (3, 4, 3, 1, 0, 1),
    (3, 4, 3, 1, 1, 1),
    (2, 5, (2, 3), 2, (1, 2), 1),
    (4, 3, 3, (1, 2), (0, 1, 2, 1), 2),
    (1, 2, 5, 3, 2, (2, 1)),
    (3, 3, 1, 1, 0, 1),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("config", LAYER_CONFIGS,
                         ids=[f"{c[2]}-s{c[3]}-p{c[4]}-d{c[5]}" for c in LAYER_CONFIGS])
def test_forward_backward_match_reference(config, bias, dtype):
    C, F, kernel_size, stride, padding, dilation = config
    layer = Conv2D(C, F, kernel_size, stride, padding, dilation, bias=bias, dtype=dtype, rng=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, C, 9, 10)).astype(dtype)
    KH, KW = layer.kernel_size

    y = layer.forward(x)
    assert y.dtype == dtype
    assert_matches(y, reference.conv2d(x, layer.W, layer.b, stride, padding, dilation),
                   dtype, C * KH * KW, "y")

    dout = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dout)
    rx, rw, rb = reference.conv2d_backward(dout, x, layer.W, stride, padding, dilation)
    P = y.shape[0] * y.shape[2] * y.shape[3]
    assert_matches(dx, rx, dtype, F * KH * KW, "dx")
    assert_matches(layer.dW, rw, dtype, P, "dW")
    if bias:
        assert_matches(layer.db, rb, dtype, P, "db")
    else:
        assert layer.b is None and layer.db is None


def test_no_bias_forward_equals_plain_convolution(dtype):
    layer = Conv2D(3, 4, 3, padding=1, bias=False, dtype=dtype, rng=3)
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 6)).astype(dtype)
    assert layer.b is None
    np.testing.assert_array_equal(layer(x), fastconv.conv2d(x, layer.W, padding=1))
    with_zero_bias = Conv2D.from_weights(layer.W, np.zeros(4, dtype), pad=1)
    np.testing.assert_array_equal(layer(x), with_zero_bias(x))


def test_call_is_forward():
    assert Conv2D.__call__ is Conv2D.forward
    layer = Conv2D(2, 3, 3, rng=0)
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), layer.forward(x))
    # __call__ keeps the input for backward just like forward
    other = Conv2D(2, 3, 3, rng=0)
    other(x)
    np.testing.assert_array_equal(other.backward(np.ones((1, 3, 3, 3), np.float32)),
                                  layer.backward(np.ones((1, 3, 3, 3), np.float32)))


def test_backward_uses_the_last_forward_input():
    layer = Conv2D(2, 3, 3, dtype=np.float64, rng=0)
    rng = np.random.default_rng(1)
    x1, x2 = rng.standard_normal((2, 1, 2, 5, 5))
    layer(x1)
    layer(x2)
    dout = rng.standard_normal((1, 3, 3, 3))
    layer.backward(dout)
    _, dW2, _ = reference.conv2d_backward(dout, x2, layer.W)
    np.testing.assert_allclose(layer.dW, dW2, rtol=1e-12, atol=1e-12)


# --- initialisation ---------------------------------------------------------------

@pytest.mark.parametrize("C, F, kernel_size", [(3, 8, 3), (16, 32, (3, 5)), (64, 32, 1)])
def test_default_init_is_uniform_within_fan_in_bound(C, F, kernel_size, dtype):
    layer = Conv2D(C, F, kernel_size, dtype=dtype, rng=12)
    KH, KW = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    bound = 1.0 / math.sqrt(C * KH * KW)
    assert layer.W.shape == (F, C, KH, KW) and layer.W.dtype == dtype
    assert layer.b.shape == (F,) and layer.b.dtype == dtype
    # drawn in float64 below the bound, then rounded to dtype
    limit = bound * (1 + np.finfo(dtype).eps)
    assert np.abs(layer.W).max() <= limit
    assert np.abs(layer.b).max() <= limit
    w = layer.W.astype(np.float64).ravel()
    # U(-bound, bound): mean 0, variance bound^2 / 3; five standard errors of slack
    assert abs(w.mean()) <= 5 * bound / math.sqrt(3 * w.size)
    assert abs(w.var() / (bound ** 2 / 3) - 1) <= 5 * math.sqrt(0.8 / w.size)
    assert np.abs(w).max() >= bound * (1 - 10 / w.size)   # fills the interval


def test_init_statistics_on_a_large_layer():
    layer = Conv2D(64, 64, 3, dtype=np.float64, rng=5)
    bound = 1 / math.sqrt(64 * 9)
    w = layer.W.ravel()
    histogram, _ = np.histogram(w, bins=10, range=(-bound, bound))
    expected = w.size / 10
    assert np.all(np.abs(histogram - expected) < 5 * math.sqrt(expected))   # flat


def test_same_seed_same_weights_different_seed_different_weights():
    a = Conv2D(3, 8, 3, rng=7)
    b = Conv2D(3, 8, 3, rng=7)
    c = Conv2D(3, 8, 3, rng=8)
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.b, b.b)
    assert not np.array_equal(a.W, c.W)
    assert not np.array_equal(a.b, c.b)


def test_rng_accepts_none_int_and_generator():
    from_int = Conv2D(3, 8, 3, rng=5)
    from_generator = Conv2D(3, 8, 3, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(from_int.W, from_generator.W)
    np.testing.assert_array_equal(from_int.b, from_generator.b)

    generator = np.random.default_rng(5)
    first = Conv2D(3, 8, 3, rng=generator)
    second = Conv2D(3, 8, 3, rng=generator)       # the generator was advanced, not copied
    assert not np.array_equal(first.W, second.W)

    limit = 1 / math.sqrt(27) * (1 + np.finfo(np.float32).eps)
    unseeded = [Conv2D(3, 8, 3, rng=None), Conv2D(3, 8, 3)]
    for layer in unseeded:
        assert np.abs(layer.W).max() <= limit
    assert not np.array_equal(unseeded[0].W, unseeded[1].W)


def test_dtype_argument():
    assert Conv2D(2, 2, 1).W.dtype == np.float32
    assert Conv2D(2, 2, 1, dtype="float64").W.dtype == np.float64
    assert Conv2D(2, 2, 1, dtype=np.dtype(np.float32)).b.dtype == np.float32


# --- repr -------------------------------------------------------------------------

@pytest.mark.parametrize("layer, text", [
    (lambda: Conv2D(3, 8, 3), "Conv2D(3, 8, kernel_size=(3, 3))"),
    (lambda: Conv2D(3, 8, (3, 5)), "Conv2D(3, 8, kernel_size=(3, 5))"),
    (lambda: Conv2D(3, 8, 3, stride=1, padding=0, dilation=1, bias=True, dtype=np.float32),
     "Conv2D(3, 8, kernel_size=(3, 3))"),
    (lambda: Conv2D(3, 8, 3, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)),
     "Conv2D(3, 8, kernel_size=(3, 3))"),
    (lambda: Conv2D(3, 8, 3, padding=1), "Conv2D(3, 8, kernel_size=(3, 3), padding=1)"),
    (lambda: Conv2D(3, 8, 3, padding=(2, 2)), "Conv2D(3, 8, kernel_size=(3, 3), padding=2)"),
    (lambda: Conv2D(3, 8, 3, padding=(1, 2)),
     "Conv2D(3, 8, kernel_size=(3, 3), padding=(1, 2))"),
    (lambda: Conv2D(3, 8, 3, padding=(1, 1, 2, 2)),
     "Conv2D(3, 8, kernel_size=(3, 3), padding=(1, 2))"),
    (lambda: Conv2D(3, 8, 3, padding=(0, 1, 2, 1)),
     "Conv2D(3, 8, kernel_size=(3, 3), padding=(0, 1, 2, 1))"),
    (lambda: Conv2D(3, 8, 3, stride=2), "Conv2D(3, 8, kernel_size=(3, 3), stride=(2, 2))"),
    (lambda: Conv2D(3, 8, 3, stride=(1, 2)), "Conv2D(3, 8, kernel_size=(3, 3), stride=(1, 2))"),
    (lambda: Conv2D(3, 8, 3, dilation=2), "Conv2D(3, 8, kernel_size=(3, 3), dilation=(2, 2))"),
    (lambda: Conv2D(3, 8, 3, bias=False), "Conv2D(3, 8, kernel_size=(3, 3), bias=False)"),
    (lambda: Conv2D(3, 8, 3, dtype=np.float64), "Conv2D(3, 8, kernel_size=(3, 3), dtype=float64)"),
    (lambda: Conv2D(16, 32, (3, 1), stride=(2, 1), padding=(1, 0, 0, 0), dilation=(1, 3),
                    bias=False, dtype=np.float64),
     "Conv2D(16, 32, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0, 0, 0), "
     "dilation=(1, 3), bias=False, dtype=float64)"),
    (lambda: Conv2D.from_weights(np.ones((4, 3, 5, 5)), np.zeros(4), stride=1, pad=2),
     "Conv2D(3, 4, kernel_size=(5, 5), padding=2, dtype=float64)"),
    (lambda: Conv2D.from_weights(np.ones((4, 3, 5, 5), np.float32)),
     "Conv2D(3, 4, kernel_size=(5, 5), bias=False)"),
])
def test_repr_shows_only_non_default_arguments(layer, text):
    assert repr(layer()) == text


# --- from_weights: the seeds' Convolution(W, b, stride, pad) ------------------------

SeedConvolution = seed_convolution_class(seed_im2col, seed_col2im)


@pytest.mark.parametrize("stride, pad", [(1, 0), (1, 1), (2, 0), (2, 1), (3, 2)])
def test_from_weights_matches_seed_convolution(stride, pad):
    rng = np.random.default_rng(20)
    W = rng.standard_normal((5, 3, 3, 3))
    b = rng.standard_normal(5)
    x = rng.standard_normal((2, 3, 9, 8))
    seed = SeedConvolution(W, b, stride, pad)
    layer = Conv2D.from_weights(W, b, stride, pad)

    y = layer.forward(x)
    np.testing.assert_allclose(y, seed.forward(x), rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(y.shape)
    np.testing.assert_allclose(layer.backward(dout), seed.backward(dout), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.dW, seed.dW, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.db, seed.db, rtol=1e-12, atol=1e-12)


def test_from_weights_uses_parameters_without_copying(dtype):
    rng = np.random.default_rng(21)
    W = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    layer = Conv2D.from_weights(W, b, stride=1, pad=1)
    assert layer.W is W and layer.b is b
    x = rng.standard_normal((2, 3, 6, 6)).astype(dtype)
    before = layer(x)

    # an optimiser updating the arrays in place updates the layer
    W *= 2
    b += 1
    after = layer(x)
    assert_matches(after, reference.conv2d(x, W, b, 1, 1), dtype, 27)
    assert not np.allclose(after, before)


def test_from_weights_defaults_and_properties():
    W = np.ones((6, 2, 3, 5), np.float32)
    layer = Conv2D.from_weights(W)
    assert layer.b is None
    assert layer.stride == (1, 1) and layer.padding == (0, 0, 0, 0) and layer.dilation == (1, 1)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size) == (2, 6, (3, 5))
    layer = Conv2D.from_weights(W, pad=(1, 2, 0, 3), stride=(2, 1))
    assert layer.padding == (1, 2, 0, 3) and layer.stride == (2, 1)


def test_from_weights_rejects_mismatched_b():
    W = np.ones((4, 3, 3, 3))
    for b, shape in [(np.ones(3), "(3,)"), (np.ones(5), "(5,)"), (np.ones((4, 1)), "(4, 1)"),
                     (np.ones((1, 4)), "(1, 4)")]:
        with pytest.raises(ValueError, match=r"b must have shape \(4,\) to match "
                           r"W\.shape=\(4, 3, 3, 3\), got b\.shape=" + shape.replace("(", r"\(")
                           .replace(")", r"\)")):
            Conv2D.from_weights(W, b)


# --- properties and gradient dtypes ------------------------------------------------

def test_properties():
    layer = Conv2D(3, 7, (2, 5), rng=0)
    assert layer.in_channels == 3
    assert layer.out_channels == 7
    assert layer.kernel_size == (2, 5)
    assert layer.W.shape == (7, 3, 2, 5)
    assert layer.dW is None and layer.db is None


@pytest.mark.parametrize("layer_dtype, x_dtype", [
    (np.float32, np.float32), (np.float32, np.float64),
    (np.float64, np.float32), (np.float64, np.float64),
])
def test_gradient_dtypes_follow_W(layer_dtype, x_dtype):
    layer = Conv2D(2, 3, 3, dtype=layer_dtype, rng=0)
    x = np.ones((1, 2, 5, 5), x_dtype)
    y = layer(x)
    result = np.result_type(layer_dtype, x_dtype)
    assert y.dtype == result
    dx = layer.backward(np.ones(y.shape, x_dtype))
    assert dx.dtype == result
    assert layer.dW.dtype == layer_dtype and layer.dW.shape == layer.W.shape
    assert layer.db.dtype == layer_dtype and layer.db.shape == layer.b.shape


# --- end to end -----------------------------------------------------------------

def test_sgd_fits_a_teacher_layer():
    """A few SGD steps towards another layer's outputs: forward/backward wiring end to end."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 10, 10))
    teacher = Conv2D(3, 4, 3, padding=1, dtype=np.float64, rng=1)
    target = teacher(x)
    student = Conv2D(3, 4, 3, padding=1, dtype=np.float64, rng=2)
    losses = []
    for _ in range(8):
        diff = student(x) - target
        losses.append(0.5 * np.mean(diff ** 2))
        student.backward(diff / diff.size)        # d(loss)/dy
        student.W -= 2.0 * student.dW
        student.b -= 2.0 * student.db
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] / 2, losses
    # and the student approaches the teacher's parameters, not just its outputs
    assert (np.abs(student.W - teacher.W).max()
            < np.abs(Conv2D(3, 4, 3, padding=1, dtype=np.float64, rng=2).W - teacher.W).max())
