"""Every user error of the public API, and the normalisation helpers in ``_validation``.

Each error case asserts the exception type and a message that names the
argument (and the shapes where they matter), as STYLE.md asks: "x has 3
channels but weight expects 4 (weight.shape=...)".
"""

import os
import re

import numpy as np
import pytest

from fastconv import (AvgPool2D, Conv2D, ConvTranspose2D, MaxPool2D, ReLU, avg_pool2d, col2im,
                      conv2d, conv2d_backward, conv_transpose2d, im2col, max_pool2d,
                      max_pool2d_backward)
from fastconv._validation import (
    as_pair,
    as_padding,
    as_positive_pair,
    compute_dtype,
    conv_output_size,
    resolve_n_threads,
)

# One valid problem: x (2, 3, 7, 7) * weight (4, 3, 3, 3) -> y (2, 4, 5, 5).
X = np.ones((2, 3, 7, 7))
W = np.ones((4, 3, 3, 3))
B = np.ones(4)
DY = np.ones((2, 4, 5, 5))
OUT_SHAPE = (2, 4, 5, 5)

LONGDOUBLE_SKIP = pytest.mark.skipif(np.dtype(np.longdouble).itemsize == 8,
                                     reason="long double is double on this platform")


def esc(text):
    return re.escape(text)


# --- errors shared by conv2d, conv2d_backward and Conv2D.forward ---------------
# (keyword overrides, exception, message pattern): the overrides replace the
# valid x / weight / stride / padding / dilation / n_threads above.

SHARED_ERRORS = [
    pytest.param(dict(x=np.ones((3, 7, 7))), ValueError,
                 esc("x must be 4-D (N, C, H, W), got 3-D array with shape (3, 7, 7)"),
                 id="x-3d"),
    pytest.param(dict(x=np.ones((1, 2, 3, 7, 7))), ValueError,
                 esc("x must be 4-D (N, C, H, W), got 5-D array with shape (1, 2, 3, 7, 7)"),
                 id="x-5d"),
    pytest.param(dict(weight=np.ones((4, 3, 3, 3, 1))), ValueError,
                 esc("weight must be 4-D (F, C/groups, KH, KW), got 5-D array with shape "
                     "(4, 3, 3, 3, 1)"),
                 id="weight-5d"),
    pytest.param(dict(weight=np.ones((8, 4, 3, 3))), ValueError,
                 esc("x has 3 channels but weight expects 4 (x.shape=(2, 3, 7, 7), "
                     "weight.shape=(8, 4, 3, 3))"),
                 id="channel-mismatch"),
    pytest.param(dict(weight=np.ones((0, 3, 3, 3))), ValueError,
                 esc("weight must have non-zero sizes, got weight.shape=(0, 3, 3, 3)"),
                 id="weight-zero-filters"),
    pytest.param(dict(weight=np.ones((4, 3, 9, 8))), ValueError,
                 esc("output size would be 0x0 (< 1): input 7x7") + ".*"
                 + esc("than the kernel 9x8") + ".*" + esc("weight.shape=(4, 3, 9, 8)"),
                 id="output-empty"),
    pytest.param(dict(weight=np.ones((4, 3, 3, 3)), padding=(0, 0, 1, 1), stride=1,
                      dilation=4), ValueError,
                 esc("output size would be 0x1 (< 1)") + ".*" + esc("dilated kernel 9x9")
                 + ".*" + esc("dilation=(4, 4)"),
                 id="output-empty-by-dilation"),
    pytest.param(dict(stride=0), ValueError, esc("stride must be positive, got 0"),
                 id="stride-0"),
    pytest.param(dict(stride=-2), ValueError, esc("stride must be positive, got -2"),
                 id="stride-negative"),
    pytest.param(dict(stride=(1, 0)), ValueError, esc("stride must be positive, got (1, 0)"),
                 id="stride-pair-0"),
    pytest.param(dict(stride=(1, 2, 3)), ValueError,
                 esc("stride must be an int or a pair (h, w), got (1, 2, 3)"), id="stride-len3"),
    pytest.param(dict(stride=1.5), TypeError, esc("stride must be an int, got 1.5 of type float"),
                 id="stride-float"),
    pytest.param(dict(stride=True), TypeError, esc("stride must be an int, got True of type bool"),
                 id="stride-bool"),
    pytest.param(dict(stride=(2, np.True_)), TypeError, "stride must be an int, got .*bool",
                 id="stride-numpy-bool"),
    pytest.param(dict(stride=None), TypeError, esc("stride must be an int, got None"),
                 id="stride-none"),
    pytest.param(dict(stride="2"), TypeError,
                 esc("stride must be an int or a pair of ints, got '2'"), id="stride-str"),
    pytest.param(dict(dilation=0), ValueError, esc("dilation must be positive, got 0"),
                 id="dilation-0"),
    pytest.param(dict(dilation=(1, -1)), ValueError, esc("dilation must be positive, got (1, -1)"),
                 id="dilation-negative"),
    pytest.param(dict(dilation=2.0), TypeError, esc("dilation must be an int, got 2.0"),
                 id="dilation-float"),
    pytest.param(dict(padding=-1), ValueError, esc("padding must be non-negative, got -1"),
                 id="padding-negative"),
    pytest.param(dict(padding=(0, 1, -1, 0)), ValueError,
                 esc("padding must be non-negative, got (0, 1, -1, 0)"), id="padding-4-negative"),
    pytest.param(dict(padding=(1, 2, 3)), ValueError,
                 esc("padding must be an int, (ph, pw) or (top, bottom, left, right), "
                     "got (1, 2, 3)"), id="padding-len3"),
    pytest.param(dict(padding=()), ValueError, esc("padding must be an int, (ph, pw)"),
                 id="padding-empty"),
    pytest.param(dict(padding="middle"), ValueError,
                 esc("padding='middle' is not a padding string; use one of 'valid', 'same', "
                     "'full'"), id="padding-unknown-string"),
    pytest.param(dict(padding_mode="mirror"), ValueError,
                 esc("padding_mode must be one of 'zeros', 'reflect', 'replicate', 'circular', "
                     "got 'mirror'"), id="padding_mode-unknown"),
    pytest.param(dict(padding=7, padding_mode="reflect"), ValueError,
                 esc("padding_mode='reflect' needs each padding smaller than the input size: "
                     "top padding 7 vs size 7"), id="reflect-too-big"),
    pytest.param(dict(padding=(0, 0, 0, 8), padding_mode="circular"), ValueError,
                 esc("padding_mode='circular' needs each padding at most the input size: "
                     "right padding 8 vs size 7"), id="circular-too-big"),
    pytest.param(dict(groups=0), ValueError, esc("groups must be positive, got 0"),
                 id="groups-0"),
    pytest.param(dict(groups=2.0), TypeError, esc("groups must be an int, got 2.0"),
                 id="groups-float"),
    pytest.param(dict(groups=3), ValueError,
                 esc("groups=3 must divide both the input channels C=3 and the filters F=4"),
                 id="groups-not-dividing"),
    pytest.param(dict(padding=1.5), TypeError,
                 esc("padding must be an int, got 1.5 of type float"),
                 id="padding-float"),
    pytest.param(dict(padding=(1, True)), TypeError, esc("padding must be an int, got True"),
                 id="padding-bool"),
    pytest.param(dict(padding=None), TypeError, esc("padding must be an int, got None"),
                 id="padding-none"),
    pytest.param(dict(x=np.ones((2, 3, 7, 7), np.complex128)), TypeError,
                 esc("x has unsupported dtype complex128"), id="x-complex"),
    pytest.param(dict(weight=np.ones((4, 3, 3, 3), object)), TypeError,
                 esc("weight has unsupported dtype object"), id="weight-object"),
    pytest.param(dict(x=np.full((2, 3, 7, 7), "a")), TypeError,
                 esc("x has unsupported dtype <U1"), id="x-str"),
    pytest.param(dict(x=np.zeros((2, 3, 7, 7), "datetime64[s]")), TypeError,
                 esc("x has unsupported dtype datetime64[s]"), id="x-datetime"),
    pytest.param(dict(weight=np.ones((4, 3, 3, 3), np.longdouble)), TypeError,
                 "^weight has unsupported dtype float(96|128)", id="weight-longdouble",
                 marks=LONGDOUBLE_SKIP),
    # before: "unsupported dtype float128: ..." without the argument's name
    pytest.param(dict(x=np.ones((2, 3, 7, 7), np.longdouble)), TypeError,
                 "^x has unsupported dtype float(96|128)", id="x-longdouble",
                 marks=LONGDOUBLE_SKIP),
    pytest.param(dict(x=None), TypeError, esc("x must be an array, got None"), id="x-none"),
    pytest.param(dict(weight=None), TypeError, esc("weight must be an array, got None"),
                 id="weight-none"),
    pytest.param(dict(n_threads=0), ValueError, esc("n_threads=0 is invalid"), id="n_threads-0"),
    pytest.param(dict(n_threads=True), TypeError, esc("n_threads must be an int, got True"),
                 id="n_threads-bool"),
    pytest.param(dict(n_threads=1.5), TypeError, esc("n_threads must be an int, got 1.5"),
                 id="n_threads-float"),
    pytest.param(dict(n_threads="2"), TypeError, esc("n_threads must be an int, got '2'"),
                 id="n_threads-str"),
]


def _conv2d(x=X, weight=W, stride=1, padding=0, dilation=1, groups=1, **keywords):
    return conv2d(x, weight, B, stride, padding, dilation, groups, **keywords)


def _conv2d_backward(x=X, weight=W, stride=1, padding=0, dilation=1, groups=1, **keywords):
    return conv2d_backward(DY, x, weight, stride, padding, dilation, groups, **keywords)


@pytest.mark.parametrize("overrides, error, match", SHARED_ERRORS)
@pytest.mark.parametrize("call", [_conv2d, _conv2d_backward], ids=["conv2d", "backward"])
def test_functional_argument_errors(call, overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


# Conv2D.forward takes only x; its other arguments are validated at construction.
LAYER_FORWARD_ERRORS = [p for p in SHARED_ERRORS if p.id in (
    "x-3d", "x-5d", "x-complex", "x-str", "x-datetime", "x-none")] + [
    pytest.param(dict(x=np.ones((2, 5, 7, 7))), ValueError,
                 esc("x has 5 channels but weight expects 3 (x.shape=(2, 5, 7, 7), "
                     "weight.shape=(4, 3, 3, 3))"), id="channel-mismatch"),
    pytest.param(dict(x=np.ones((2, 3, 2, 2))), ValueError,
                 esc("output size would be 0x0 (< 1): input 2x2"), id="output-empty"),
]


@pytest.mark.parametrize("overrides, error, match", LAYER_FORWARD_ERRORS)
def test_layer_forward_errors(overrides, error, match):
    layer = Conv2D.from_weights(W, B)
    with pytest.raises(error, match=match):
        layer.forward(**overrides)
    with pytest.raises(error, match=match):
        layer(**overrides)


# --- conv2d only: bias and out --------------------------------------------------

def test_conv2d_bias_errors():
    with pytest.raises(ValueError, match=esc(
            "bias must have shape (4,) to match weight.shape=(4, 3, 3, 3), got bias.shape=(5,)")):
        conv2d(X, W, np.ones(5))
    with pytest.raises(ValueError, match=esc("got bias.shape=(4, 1)")):
        conv2d(X, W, np.ones((4, 1)))
    with pytest.raises(ValueError, match=esc("got bias.shape=()")):
        conv2d(X, W, 1.0)
    with pytest.raises(TypeError, match=esc("bias has unsupported dtype complex128")):
        conv2d(X, W, np.ones(4, np.complex128))


def _overlapping_x_and_out():
    # 1x1 kernel with C == F: out = x has exactly the output's shape and dtype.
    x = np.ones((2, 4, 5, 5))
    return x, np.ones((4, 4, 1, 1)), x


def _out_inside_a_copied_x():
    # x is strided, so conv2d computes from a contiguous copy; out still aliases x's
    # memory (before: accepted, and x changed under the caller's feet)
    buffer = np.ones((2, 4, 5, 10))
    return buffer[..., ::2], np.ones((4, 4, 1, 1)), buffer.reshape(-1)[:200].reshape(2, 4, 5, 5)


def _out_inside_a_cast_x():
    buffer = np.ones(400, np.float32)
    x = buffer[:200].reshape(2, 4, 5, 5)        # float32, cast to float64 for the weight
    out = buffer.view(np.float64)[:200].reshape(2, 4, 5, 5)
    return x, np.ones((4, 4, 1, 1)), out


def _overlapping_weight_and_out():
    buffer = np.zeros(300)
    weight = buffer[:108].reshape(4, 3, 3, 3)
    out = buffer[50:250].reshape(OUT_SHAPE)
    return X, weight, out


OUT_ERRORS = [
    pytest.param(lambda: (X, W, [[0.0]]), TypeError, esc("out must be a numpy.ndarray, got list"),
                 id="list"),
    pytest.param(lambda: (X, W, np.zeros((2, 4, 5, 4))), ValueError,
                 esc("out has shape (2, 4, 5, 4) but the output shape is (2, 4, 5, 5)"),
                 id="shape"),
    pytest.param(lambda: (X, W, np.zeros((2, 4, 25))), ValueError,
                 esc("out has shape (2, 4, 25) but the output shape is (2, 4, 5, 5)"),
                 id="flattened-shape"),
    pytest.param(lambda: (X, W, np.zeros(OUT_SHAPE, np.float32)), ValueError,
                 esc("out has dtype float32 but the output dtype is float64"), id="dtype"),
    pytest.param(lambda: (X.astype(np.float32), W.astype(np.float32), np.zeros(OUT_SHAPE)),
                 ValueError, esc("out has dtype float64 but the output dtype is float32"),
                 id="dtype-wider"),
    pytest.param(lambda: (X, W, np.zeros((2, 4, 5, 10))[..., ::2]), ValueError,
                 esc("out must be a writeable C-contiguous array"), id="strided"),
    pytest.param(lambda: (X, W, np.asfortranarray(np.zeros(OUT_SHAPE))), ValueError,
                 esc("out must be a writeable C-contiguous array"), id="fortran"),
    pytest.param(lambda: (X, W, np.broadcast_to(np.zeros(1), OUT_SHAPE)), ValueError,
                 esc("out must be a writeable C-contiguous array"), id="broadcast"),
    pytest.param(_overlapping_x_and_out, ValueError, esc("out must not overlap x, weight or bias"),
                 id="overlaps-x"),
    pytest.param(_overlapping_weight_and_out, ValueError, esc("out must not overlap x, weight or bias"),
                 id="overlaps-weight"),
    pytest.param(_out_inside_a_copied_x, ValueError, esc("out must not overlap x, weight or bias"),
                 id="overlaps-strided-x"),
    pytest.param(_out_inside_a_cast_x, ValueError, esc("out must not overlap x, weight or bias"),
                 id="overlaps-cast-x"),
]


@pytest.mark.parametrize("make, error, match", OUT_ERRORS)
def test_conv2d_out_errors(make, error, match):
    x, weight, out = make()
    x_before, weight_before = np.array(x, copy=True), np.array(weight, copy=True)
    out_before = np.array(out, copy=True)
    with pytest.raises(error, match=match):
        conv2d(x, weight, out=out)
    # nothing was written: not out, not the inputs it may alias
    np.testing.assert_array_equal(np.asarray(out), out_before)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(weight, weight_before)


def test_conv2d_out_read_only():
    out = np.zeros(OUT_SHAPE)
    out.flags.writeable = False
    with pytest.raises(ValueError, match=esc("out must be a writeable C-contiguous array")):
        conv2d(X, W, out=out)
    assert not out.any()


def test_conv2d_out_overlapping_bias_is_rejected():
    x = np.ones((1, 1, 3, 3))
    weight = np.ones((2, 1, 1, 1))
    out = np.zeros((1, 2, 3, 3))
    bias = out.reshape(-1)[:2]          # lives inside out[0, 0]
    bias[:] = [1.0, 2.0]
    expected = conv2d(x, weight, bias.copy())
    try:
        result = conv2d(x, weight, bias, out=out, n_threads=1)
    except ValueError as error:
        assert "overlap" in str(error) and "bias" in str(error)
    else:
        np.testing.assert_array_equal(result, expected)


def test_errors_are_raised_before_any_work():
    """A bad argument that is checked late (n_threads, bias) still leaves out untouched."""
    sentinel = np.full(OUT_SHAPE, 7.0)
    for kwargs in (dict(n_threads=0), dict(n_threads=1.5), dict(bias=np.ones(3)),
                   dict(bias=np.ones(4, np.complex64))):
        out = sentinel.copy()
        with pytest.raises((ValueError, TypeError)):
            conv2d(X, W, out=out, **kwargs)
        np.testing.assert_array_equal(out, sentinel)


# --- conv2d_backward only: grad_output -----------------------------------------

def test_backward_grad_output_errors():
    with pytest.raises(ValueError, match=esc(
            "grad_output must have the forward output's shape (2, 4, 5, 5) "
            "(x.shape=(2, 3, 7, 7), weight.shape=(4, 3, 3, 3)), got (2, 4, 5, 4)")):
        conv2d_backward(np.ones((2, 4, 5, 4)), X, W)
    with pytest.raises(ValueError, match=esc("got (2, 4, 7, 7)")):   # the input's shape
        conv2d_backward(np.ones((2, 4, 7, 7)), X, W)
    # stride changes the output shape
    with pytest.raises(ValueError,
                       match=esc("shape (2, 4, 3, 3)") + ".*" + esc("got (2, 4, 5, 5)")):
        conv2d_backward(DY, X, W, stride=2)
    with pytest.raises(TypeError, match=esc("grad_output must be an array, got None")):
        conv2d_backward(None, X, W)
    with pytest.raises(TypeError, match=esc("grad_output has unsupported dtype complex128")):
        conv2d_backward(DY.astype(np.complex128), X, W)


# --- im2col / col2im --------------------------------------------------------------

IMG = np.ones((1, 3, 7, 7))
COL = np.ones((25, 27))          # im2col(IMG, 3, 3)

IM2COL_ERRORS = [
    pytest.param(lambda: im2col(np.ones((3, 7, 7)), 3, 3), ValueError,
                 esc("input_data must be 4-D (N, C, H, W), got 3-D array with shape (3, 7, 7)"),
                 id="input-3d"),
    pytest.param(lambda: im2col(None, 3, 3), TypeError,
                 esc("input_data must be an array, got None"), id="input-none"),
    pytest.param(lambda: im2col(IMG.astype(np.complex64), 3, 3), TypeError,
                 esc("input_data has unsupported dtype complex64"), id="input-complex"),
    pytest.param(lambda: im2col(IMG.astype(object), 3, 3), TypeError,
                 esc("input_data has unsupported dtype object"), id="input-object"),
    pytest.param(lambda: im2col(IMG, 0, 3), ValueError, esc("filter_h must be positive, got 0"),
                 id="filter_h-0"),
    pytest.param(lambda: im2col(IMG, 3, -1), ValueError, esc("filter_w must be positive, got -1"),
                 id="filter_w-negative"),
    pytest.param(lambda: im2col(IMG, 1.5, 3), TypeError, esc("filter_h must be an int, got 1.5"),
                 id="filter_h-float"),
    pytest.param(lambda: im2col(IMG, 3, True), TypeError, esc("filter_w must be an int, got True"),
                 id="filter_w-bool"),
    pytest.param(lambda: im2col(IMG, 3, 3, stride=0), ValueError,
                 esc("stride must be positive, got 0"), id="stride-0"),
    pytest.param(lambda: im2col(IMG, 3, 3, stride=1.5), TypeError,
                 esc("stride must be an int, got 1.5"), id="stride-float"),
    pytest.param(lambda: im2col(IMG, 3, 3, pad=-1), ValueError, "non-negative, got -1",
                 id="pad-negative"),
    pytest.param(lambda: im2col(IMG, 3, 3, pad=(1, 2, 3)), ValueError, esc("got (1, 2, 3)"),
                 id="pad-len3"),
    pytest.param(lambda: im2col(IMG, 3, 3, pad="same"), ValueError,
                 "pad='same': string padding is resolved against the input size and only "
                 "conv2d", id="pad-same"),
    pytest.param(lambda: im2col(IMG, 8, 3), ValueError,
                 esc("output size would be 0x5 (< 1): input 7x7"), id="output-empty"),
    pytest.param(lambda: im2col(IMG, 3, 3, n_threads=0), ValueError,
                 esc("n_threads=0 is invalid"), id="n_threads-0"),
    pytest.param(lambda: im2col(IMG, 3, 3, n_threads=True), TypeError,
                 esc("n_threads must be an int, got True"), id="n_threads-bool"),
]

COL2IM_ERRORS = [
    pytest.param(lambda: col2im(np.ones(27), (1, 3, 7, 7), 3, 3), ValueError,
                 esc("col must be 2-D (N*OH*OW, C*filter_h*filter_w), "
                     "got 1-D array with shape (27,)"), id="col-1d"),
    pytest.param(lambda: col2im(np.ones((25, 28)), (1, 3, 7, 7), 3, 3), ValueError,
                 esc("col must have shape (25, 27) for input_shape=(1, 3, 7, 7), filter 3x3, "
                     "got col.shape=(25, 28)"), id="col-shape"),
    pytest.param(lambda: col2im(COL, (1, 3, 7, 7), 3, 3, stride=2), ValueError,
                 esc("col must have shape (9, 27)") + ".*" + esc("got col.shape=(25, 27)"),
                 id="col-shape-stride"),
    pytest.param(lambda: col2im(COL.T, (1, 3, 7, 7), 3, 3), ValueError,
                 esc("got col.shape=(27, 25)"), id="col-transposed"),
    pytest.param(lambda: col2im(None, (1, 3, 7, 7), 3, 3), TypeError,
                 esc("col must be an array, got None"), id="col-none"),
    pytest.param(lambda: col2im(COL.astype(np.complex128), (1, 3, 7, 7), 3, 3), TypeError,
                 esc("col has unsupported dtype complex128"), id="col-complex"),
    pytest.param(lambda: col2im(COL, (1, 3, 7), 3, 3), ValueError,
                 esc("input_shape must be 4 non-negative ints, got (1, 3, 7)"), id="shape-len3"),
    pytest.param(lambda: col2im(COL, (1, 3, 7, 7, 1), 3, 3), ValueError,
                 esc("input_shape must be 4 non-negative ints, got (1, 3, 7, 7, 1)"),
                 id="shape-len5"),
    pytest.param(lambda: col2im(COL, (1, 3, -7, 7), 3, 3), ValueError,
                 esc("input_shape must be 4 non-negative ints, got (1, 3, -7, 7)"),
                 id="shape-negative"),
    pytest.param(lambda: col2im(COL, (1, 3, 7.0, 7), 3, 3), TypeError,
                 esc("input_shape must be an int, got 7.0"), id="shape-float"),
    pytest.param(lambda: col2im(COL, "1377", 3, 3), TypeError,
                 esc("input_shape must be a tuple of 4 ints, got '1377'"), id="shape-str"),
    pytest.param(lambda: col2im(COL, None, 3, 3), TypeError,
                 esc("input_shape must be a tuple of 4 ints, got None"), id="shape-none"),
    pytest.param(lambda: col2im(COL, 7, 3, 3), TypeError,
                 esc("input_shape must be a tuple of 4 ints, got 7"), id="shape-int"),
    pytest.param(lambda: col2im(COL, (1, 3, 7, 7), 0, 3), ValueError,
                 esc("filter_h must be positive, got 0"), id="filter_h-0"),
    pytest.param(lambda: col2im(COL, (1, 3, 7, 7), 3, 3, stride=0), ValueError,
                 esc("stride must be positive, got 0"), id="stride-0"),
    pytest.param(lambda: col2im(COL, (1, 3, 7, 7), 3, 3, pad=-1), ValueError,
                 "non-negative, got -1", id="pad-negative"),
    pytest.param(lambda: col2im(COL, (1, 3, 2, 2), 3, 3), ValueError,
                 esc("output size would be 0x0 (< 1): input 2x2"), id="output-empty"),
    pytest.param(lambda: col2im(COL, (1, 3, 7, 7), 3, 3, n_threads=-0), ValueError,
                 esc("n_threads=0 is invalid"), id="n_threads-0"),
    pytest.param(lambda: col2im(COL, (1, 3, 7, 7), 3, 3, n_threads=2.0), TypeError,
                 esc("n_threads must be an int, got 2.0"), id="n_threads-float"),
]


@pytest.mark.parametrize("call, error, match", IM2COL_ERRORS + COL2IM_ERRORS)
def test_im2col_col2im_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# a pair used to be accepted and its second value silently dropped (fixed in 75f53fc)
@pytest.mark.parametrize("call", [
    lambda: im2col(IMG, (3, 5), 3),
    lambda: col2im(COL, (1, 3, 7, 7), 3, (3, 5)),
], ids=["im2col", "col2im"])
def test_filter_size_pair_is_rejected(call):
    with pytest.raises(TypeError, match=r"filter_[hw] must be an int, got \(3, 5\)"):
        call()


@pytest.mark.parametrize("call, wrong_name", [
    (lambda: im2col(IMG, 8, 3), "weight.shape"),
    (lambda: col2im(COL, (1, 3, 2, 2), 3, 3), "weight.shape"),
    (lambda: im2col(np.ones((1, 0, 7, 7)), 3, 3), "weight"),
    (lambda: im2col(IMG, 3, 3, pad=-1), "padding"),
    (lambda: col2im(COL, (1, 3, 7, 7), 3, 3, pad=(1, 2, 3)), "padding"),
    (lambda: Conv2D.from_weights(W, pad=-1), "padding"),
], ids=["im2col-output-empty", "col2im-output-empty", "im2col-no-channels", "im2col-pad",
        "col2im-pad", "from_weights-pad"])
def test_seed_style_errors_name_the_callers_arguments(call, wrong_name):
    with pytest.raises(ValueError) as info:
        call()
    assert wrong_name not in str(info.value)


@pytest.mark.parametrize("name", ["stride", "padding", "dilation"])
def test_zero_d_array_argument_is_named(name):
    try:
        conv2d(X, W, **{name: np.array(1)})
    except TypeError as error:
        assert name in str(error)


# --- Conv2D and Conv2D.from_weights -----------------------------------------------

CONV2D_ERRORS = [
    pytest.param(dict(in_channels=0), ValueError,
                 esc("in_channels and out_channels must be positive, got 0, 4"), id="in-0"),
    pytest.param(dict(out_channels=-1), ValueError,
                 esc("in_channels and out_channels must be positive, got 3, -1"),
                 id="out-negative"),
    pytest.param(dict(in_channels=1.5), TypeError, esc("in_channels must be an int, got 1.5"),
                 id="in-float"),
    pytest.param(dict(out_channels=True), TypeError, esc("out_channels must be an int, got True"),
                 id="out-bool"),
    pytest.param(dict(kernel_size=0), ValueError, esc("kernel_size must be positive, got 0"),
                 id="kernel-0"),
    pytest.param(dict(kernel_size=(3, 3, 3)), ValueError,
                 esc("kernel_size must be an int or a pair (h, w), got (3, 3, 3)"),
                 id="kernel-len3"),
    pytest.param(dict(kernel_size=2.5), TypeError, esc("kernel_size must be an int, got 2.5"),
                 id="kernel-float"),
    pytest.param(dict(stride=0), ValueError, esc("stride must be positive, got 0"), id="stride-0"),
    pytest.param(dict(stride=True), TypeError, esc("stride must be an int, got True"),
                 id="stride-bool"),
    pytest.param(dict(padding=-1), ValueError, esc("padding must be non-negative, got -1"),
                 id="padding-negative"),
    pytest.param(dict(padding=(1, 2, 3)), ValueError, esc("got (1, 2, 3)"), id="padding-len3"),
    pytest.param(dict(padding="middle"), ValueError,
                 esc("padding='middle' is not a padding string"), id="padding-unknown-string"),
    pytest.param(dict(padding_mode="mirror"), ValueError,
                 esc("padding_mode must be one of 'zeros', 'reflect'"), id="padding_mode-unknown"),
    pytest.param(dict(groups=2), ValueError,
                 esc("groups=2 must be positive and divide in_channels=3 and out_channels=4"),
                 id="groups-not-dividing"),
    pytest.param(dict(groups=0), ValueError, esc("groups=0 must be positive"), id="groups-0"),
    pytest.param(dict(layout="CHWN"), ValueError,
                 esc("layout must be one of 'NCHW', 'NHWC', got 'CHWN'"), id="layout-unknown"),
    pytest.param(dict(algorithm="fft"), ValueError,
                 esc("algorithm must be one of 'auto', 'im2col', 'direct', 'winograd', got 'fft'"),
                 id="algorithm-unknown"),
    pytest.param(dict(dilation=0), ValueError, esc("dilation must be positive, got 0"),
                 id="dilation-0"),
    pytest.param(dict(dtype=np.int32), TypeError,
                 esc("dtype must be float32 or float64, got int32"), id="dtype-int32"),
    pytest.param(dict(dtype=np.float16), TypeError,
                 esc("dtype must be float32 or float64, got float16"), id="dtype-float16"),
    pytest.param(dict(dtype=np.complex128), TypeError,
                 esc("dtype must be float32 or float64, got complex128"), id="dtype-complex"),
    pytest.param(dict(bias="yes"), TypeError, esc("bias must be True or False, got 'yes'"),
                 id="bias-str"),
    pytest.param(dict(bias=1), TypeError, esc("bias must be True or False, got 1"), id="bias-int"),
    pytest.param(dict(bias=None), TypeError, esc("bias must be True or False, got None"),
                 id="bias-none"),
    pytest.param(dict(bias=np.ones(4)), TypeError, "bias must be True or False", id="bias-array"),
]


@pytest.mark.parametrize("overrides, error, match", CONV2D_ERRORS)
def test_conv2d_layer_constructor_errors(overrides, error, match):
    kwargs = dict(in_channels=3, out_channels=4, kernel_size=3)
    kwargs.update(overrides)
    with pytest.raises(error, match=match):
        Conv2D(**kwargs)


def test_conv2d_layer_bad_n_threads_raises_at_construction():
    with pytest.raises(ValueError, match=esc("n_threads=0 is invalid")):
        Conv2D(3, 4, 3, rng=0, n_threads=0)
    with pytest.raises(TypeError, match=esc("n_threads must be an int, got True")):
        Conv2D(3, 4, 3, rng=0, n_threads=True)


def test_backward_before_forward():
    layer = Conv2D(3, 4, 3, rng=0)
    with pytest.raises(RuntimeError, match=esc("Conv2D.backward called before forward")):
        layer.backward(DY.astype(np.float32))
    assert layer.dW is None and layer.db is None


def test_layer_backward_wrong_dout_shape():
    layer = Conv2D(3, 4, 3, rng=0)
    layer(X)
    with pytest.raises(ValueError, match=esc("grad_output must have the forward output's shape "
                                             "(2, 4, 5, 5)") + ".*" + esc("got (2, 4, 5, 4)")):
        layer.backward(np.ones((2, 4, 5, 4)))
    assert layer.dW is None and layer.db is None


FROM_WEIGHTS_ERRORS = [
    pytest.param(lambda: Conv2D.from_weights(np.ones((4, 3, 3))), ValueError,
                 esc("W must be 4-D (F, C, KH, KW), got 3-D array with shape (4, 3, 3)"),
                 id="W-3d"),
    pytest.param(lambda: Conv2D.from_weights(np.ones((4, 3, 3, 3, 1))), ValueError,
                 esc("W must be 4-D (F, C, KH, KW), got 5-D array with shape (4, 3, 3, 3, 1)"),
                 id="W-5d"),
    pytest.param(lambda: Conv2D.from_weights(None), TypeError, esc("W must be an array, got None"),
                 id="W-none"),
    pytest.param(lambda: Conv2D.from_weights(W.astype(np.complex128)), TypeError,
                 esc("W has unsupported dtype complex128"), id="W-complex"),
    pytest.param(lambda: Conv2D.from_weights(W.astype(str)), TypeError,
                 "W has unsupported dtype <U", id="W-str"),
    pytest.param(lambda: Conv2D.from_weights(W, B.astype(object)), TypeError,
                 esc("b has unsupported dtype object"), id="b-object"),
    pytest.param(lambda: Conv2D.from_weights(W, np.ones(5)), ValueError,
                 esc("b must have shape (4,) to match W.shape=(4, 3, 3, 3), got b.shape=(5,)"),
                 id="b-length"),
    pytest.param(lambda: Conv2D.from_weights(W, B, stride=0), ValueError,
                 esc("stride must be positive, got 0"), id="stride-0"),
    pytest.param(lambda: Conv2D.from_weights(W, B, stride=1.5), TypeError,
                 esc("stride must be an int, got 1.5"), id="stride-float"),
    pytest.param(lambda: Conv2D.from_weights(W, B, pad=-1), ValueError,
                 "non-negative, got -1", id="pad-negative"),
    pytest.param(lambda: Conv2D.from_weights(W, B, pad=(1, 2, 3)), ValueError,
                 esc("got (1, 2, 3)"), id="pad-len3"),
    pytest.param(lambda: Conv2D.from_weights(W, B, pad="same"), ValueError,
                 esc("pad='same': string padding is resolved against the input size"),
                 id="pad-same"),
]


@pytest.mark.parametrize("call, error, match", FROM_WEIGHTS_ERRORS)
def test_from_weights_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- the helpers ------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (3, (3, 3)),
    (0, (0, 0)),            # as_pair does not check the sign; as_positive_pair does
    (-2, (-2, -2)),
    ((2, 3), (2, 3)),
    ([4, 1], (4, 1)),
    (np.int64(5), (5, 5)),
    (np.uint8(2), (2, 2)),
    ((np.int32(1), np.int16(7)), (1, 7)),
    (np.array([2, 3]), (2, 3)),
    (range(1, 3), (1, 2)),
])
def test_as_pair(value, expected):
    result = as_pair(value, "stride")
    assert result == expected
    assert all(type(v) is int for v in result)


@pytest.mark.parametrize("value, error, match", [
    (1.5, TypeError, esc("stride must be an int, got 1.5 of type float")),
    (True, TypeError, esc("stride must be an int, got True of type bool")),
    (np.True_, TypeError, "stride must be an int, got .* of type bool"),
    ((1, 2.0), TypeError, esc("stride must be an int, got 2.0")),
    ((1, None), TypeError, esc("stride must be an int, got None")),
    ("12", TypeError, esc("stride must be an int or a pair of ints, got '12'")),
    (b"12", TypeError, esc("stride must be an int or a pair of ints, got b'12'")),
    ((1, 2, 3), ValueError, esc("stride must be an int or a pair (h, w), got (1, 2, 3)")),
    ((1,), ValueError, esc("stride must be an int or a pair (h, w), got (1,)")),
    (np.array([1, 2, 3]), ValueError, "stride must be an int or a pair"),
])
def test_as_pair_errors(value, error, match):
    with pytest.raises(error, match=match):
        as_pair(value, "stride")


def test_as_positive_pair():
    assert as_positive_pair(1, "dilation") == (1, 1)
    assert as_positive_pair((2, 3), "dilation") == (2, 3)
    for bad in (0, -1, (1, 0), (0, 1), (-3, 2)):
        with pytest.raises(ValueError, match=esc(f"dilation must be positive, got {bad!r}")):
            as_positive_pair(bad, "dilation")
    with pytest.raises(TypeError, match="dilation must be an int"):
        as_positive_pair(1.0, "dilation")


@pytest.mark.parametrize("value, expected", [
    (0, (0, 0, 0, 0)),
    (2, (2, 2, 2, 2)),
    ((1, 2), (1, 1, 2, 2)),                 # (ph, pw): top = bottom = ph, left = right = pw
    ([0, 3], (0, 0, 3, 3)),
    ((0, 1, 2, 3), (0, 1, 2, 3)),           # the seeds' (top, bottom, left, right)
    ((3,), (3, 3, 3, 3)),
    (np.int32(1), (1, 1, 1, 1)),
    (np.uint64(4), (4, 4, 4, 4)),
    ((np.int8(1), np.int64(2)), (1, 1, 2, 2)),
    (np.array([1, 2]), (1, 1, 2, 2)),
    (np.array([0, 1, 2, 3]), (0, 1, 2, 3)),
])
def test_as_padding(value, expected):
    result = as_padding(value)
    assert result == expected
    assert all(type(v) is int for v in result)


@pytest.mark.parametrize("value, error, match", [
    (-1, ValueError, esc("pad must be non-negative, got -1")),
    ((1, -1), ValueError, esc("pad must be non-negative, got (1, -1)")),
    ((1, 2, 3), ValueError, esc("pad must be an int, (ph, pw) or (top, bottom, left, right), "
                                "got (1, 2, 3)")),
    ((1, 2, 3, 4, 5), ValueError, esc("got (1, 2, 3, 4, 5)")),
    ((), ValueError, esc("got ()")),
    ("same", ValueError, esc("pad='same': string padding is resolved against the input size")),
    (b"1", TypeError, esc("pad must be an int or a tuple of ints, got b'1'")),
    (1.0, TypeError, esc("pad must be an int, got 1.0 of type float")),
    (True, TypeError, esc("pad must be an int, got True of type bool")),
    ((1, None), TypeError, esc("pad must be an int, got None")),
    ({1, 2}, TypeError, esc("pad must be an int, got {1, 2}")),
])
def test_as_padding_errors(value, error, match):
    with pytest.raises(error, match=match):
        as_padding(value, "pad")


def test_as_padding_default_name():
    with pytest.raises(ValueError, match=esc("padding must be non-negative")):
        as_padding(-1)


@pytest.mark.parametrize("args, expected", [
    ((7, 3, 1, 0, 0), 5),
    ((7, 3, 2, 1, 1), 4),          # (7 + 2 - 3) // 2 + 1
    ((8, 2, 2, 0, 0), 4),          # even kernel
    ((5, 2, 3, 0, 1), 2),          # asymmetric padding
    ((3, 3, 1, 0, 0), 1),          # exact fit
    ((5, 1, 10, 0, 0), 1),         # stride larger than the input
    ((7, 3, 1, 0, 0, 2), 3),       # dilated span 5
    ((9, 3, 2, 1, 1, 3), 3),       # span 7 in 11: (11 - 7) // 2 + 1
    ((2, 3, 1, 0, 0), 0),          # kernel larger than the input: 0, never negative
    ((1, 2, 1, 0, 0, 3), 0),       # dilated span 4 > 1
    ((0, 1, 1, 0, 0), 0),          # empty input
    ((0, 1, 1, 1, 0), 1),          # padding alone holds the window
])
def test_conv_output_size(args, expected):
    assert conv_output_size(*args) == expected


def test_conv_output_size_counts_windows():
    """The formula against counting the window positions that fit."""
    for size in range(0, 9):
        for kernel in range(1, 5):
            for stride in range(1, 4):
                for before, after in ((0, 0), (1, 0), (0, 2), (2, 1)):
                    for dilation in (1, 2, 3):
                        span = dilation * (kernel - 1) + 1
                        count = len(range(0, size + before + after - span + 1, stride))
                        got = conv_output_size(size, kernel, stride, before, after, dilation)
                        assert got == count, (size, kernel, stride, before, after, dilation)


@pytest.mark.parametrize("dtypes, expected", [
    ((np.float32,), np.float32),
    ((np.float64,), np.float64),
    ((np.float32, np.float32, np.float32), np.float32),
    ((np.float32, np.float64), np.float64),
    ((np.float16,), np.float32),
    ((np.float16, np.float16), np.float32),
    ((np.float16, np.float32), np.float32),
    ((np.float16, np.float64), np.float64),
    ((np.int8,), np.float64),
    ((np.int64,), np.float64),
    ((np.uint8,), np.float64),
    ((np.bool_,), np.float64),
    ((np.bool_, np.bool_), np.float64),
    ((np.int8, np.float32), np.float32),
    ((np.int8, np.float16), np.float32),
    ((np.int16, np.float32), np.float32),
    ((np.int64, np.float32), np.float64),
    ((np.bool_, np.float32), np.float32),
    (("<f4", ">f4"), np.float32),              # byte order is not a different dtype
    ((">f8",), np.float64),
])
def test_compute_dtype_table(dtypes, expected):
    result = compute_dtype(*(np.dtype(d) for d in dtypes))
    assert result == np.dtype(expected)
    assert result.isnative


@pytest.mark.parametrize("dtypes", [
    (np.complex64,), (np.complex128, np.float64), (np.float32, np.complex64),
    (object,), ("U3",), ("S3",), ("datetime64[s]",), ("timedelta64[s]",),
    pytest.param((np.longdouble,), marks=LONGDOUBLE_SKIP),
    pytest.param((np.float32, np.longdouble), marks=LONGDOUBLE_SKIP),
])
def test_compute_dtype_rejects(dtypes):
    with pytest.raises(TypeError, match="unsupported dtype"):
        compute_dtype(*(np.dtype(d) for d in dtypes))


@pytest.mark.parametrize("n_threads, max_threads, expected", [
    (None, 8, 8),
    (None, 1, 1),
    (1, 8, 1),
    (3, 8, 3),
    (16, 8, 16),            # more than the cores: taken as is
    (np.int64(2), 8, 2),
    (-1, 8, 8),
    (-2, 8, 7),
    (-8, 8, 1),
    (-9, 8, 1),             # counting back past zero clamps to one thread
    (-1000, 8, 1),
    (-1, 1, 1),
    (-2, 1, 1),
])
def test_resolve_n_threads(n_threads, max_threads, expected):
    result = resolve_n_threads(n_threads, max_threads)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize("n_threads, error, match", [
    (0, ValueError, esc("n_threads=0 is invalid")),
    (True, TypeError, esc("n_threads must be an int, got True of type bool")),
    (False, TypeError, esc("n_threads must be an int, got False of type bool")),
    (1.5, TypeError, esc("n_threads must be an int, got 1.5 of type float")),
    (2.0, TypeError, esc("n_threads must be an int, got 2.0 of type float")),
    ("4", TypeError, esc("n_threads must be an int, got '4' of type str")),
])
def test_resolve_n_threads_errors(n_threads, error, match):
    with pytest.raises(error, match=match):
        resolve_n_threads(n_threads, 8)


# --- sizes past what 64-bit index arithmetic and NumPy arrays can hold ------------
# Before: a stride of 2**63 was an OverflowError raised deep inside a kernel call, and
# an output too large for any array was NumPy's "Maximum allowed dimension exceeded",
# neither naming the argument.

TOO_LARGE = "is too large: strides, dilations, paddings and kernel sizes must be at most"
BIG = 2**31 - 1           # MAX_SIZE_ARGUMENT: still accepted


@pytest.mark.parametrize("call, match", [
    (lambda: conv2d(X, W, stride=2**63), esc(f"stride={2**63} {TOO_LARGE}")),
    (lambda: conv2d(X, W, stride=(1, 2**62)), esc(f"stride=(1, {2**62}) {TOO_LARGE}")),
    (lambda: conv2d(X, W, padding=2**40), esc(f"padding={2**40} {TOO_LARGE}")),
    (lambda: conv2d(X, W, padding=(0, 0, 0, 2**64)), esc(f"padding=(0, 0, 0, {2**64})")),
    (lambda: conv2d_backward(DY, X, W, dilation=2**62), esc(f"dilation={2**62} {TOO_LARGE}")),
    (lambda: conv_transpose2d(X, W.transpose(1, 0, 2, 3), stride=2**63), esc(f"stride={2**63}")),
    (lambda: conv_transpose2d(X, W.transpose(1, 0, 2, 3), stride=BIG, output_padding=2**31),
     esc(f"output_padding={2**31} {TOO_LARGE}")),
    (lambda: max_pool2d(X, 2, stride=2**63), esc(f"stride={2**63} {TOO_LARGE}")),
    (lambda: avg_pool2d(X, 2**62), esc(f"kernel_size={2**62} {TOO_LARGE}")),
    (lambda: im2col(X, 3, 3, stride=2**63), esc(f"stride={2**63} {TOO_LARGE}")),
    (lambda: im2col(X, 2**63, 3), esc(f"filter_h={2**63} is too large")),
    (lambda: col2im(np.ones((1, 27)), (1, 3, 3, 3), 3, 2**31), esc(f"filter_w={2**31} is too")),
    (lambda: Conv2D(3, 4, 3, stride=2**70), esc(f"stride={2**70} {TOO_LARGE}")),
    (lambda: MaxPool2D(2**64), esc(f"kernel_size={2**64} {TOO_LARGE}")),
], ids=["conv2d-stride", "conv2d-stride-pair", "conv2d-padding", "conv2d-padding-4",
        "backward-dilation", "transposed-stride", "transposed-output_padding", "max_pool-stride",
        "avg_pool-kernel", "im2col-stride", "im2col-filter_h", "col2im-filter_w", "Conv2D-stride",
        "MaxPool2D-kernel"])
def test_huge_size_arguments_are_named_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: conv2d(X, W, padding=BIG), "the output would have shape " + esc(
        "(2, 4, 4294967299, 4294967299), more elements than any array can hold (x.shape=")),
    (lambda: conv_transpose2d(X, W.transpose(1, 0, 2, 3), stride=BIG),
     "the output would have shape .* " + esc(f"stride=({BIG}, {BIG})")),
    (lambda: im2col(X, 3, 3, pad=BIG), "the output would have shape .*" + esc("pad (top, ")),
    (lambda: im2col(np.broadcast_to(np.ones(1), (1, 2**10, 2**20, 1)), 1, 1, pad=(0, 0, 0, BIG)),
     esc("col would have shape (2251799813685248, 1024)") + ".*" + esc("pad=(0, 0, 0, ")),
    (lambda: col2im(np.ones((9, 8)), (1, 2, 2**40, 2**40), 2, 2),
     esc("the image would have shape (1, 2, 1099511627776, 1099511627776), more elements than "
         "any array can hold (input_shape=")),
    (lambda: max_pool2d(np.broadcast_to(np.ones(1, np.int8), (2**30, 2**30, 1, 1)), 1),
     esc("a contiguous copy of x would have shape (1073741824, 1073741824, 1, 1)")),
], ids=["conv2d", "conv_transpose2d", "im2col-output", "im2col-col", "col2im", "broadcast-x"])
def test_arrays_larger_than_any_array_are_named_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_largest_size_arguments_still_compute():
    """2**31 - 1 is accepted everywhere and computes what the geometry says (no overflow)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 5, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    plain = conv2d(x, w)
    # output rows and columns at -BIG, 0, BIG: only the middle window sees the input
    y = conv2d(x, w, stride=BIG, padding=BIG)
    assert y.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(y[:, :, 1, 1], plain[:, :, 0, 0], rtol=1e-13)
    assert np.count_nonzero(y) == 3
    y_nhwc = conv2d(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, stride=BIG, padding=BIG,
                    layout="NHWC")
    np.testing.assert_allclose(y_nhwc.transpose(0, 3, 1, 2), y, rtol=1e-13)
    # 'same' with a dilation of BIG: of the three taps only the centre one lands inside
    y = conv2d(x, w, stride=BIG, dilation=BIG, padding="same")
    np.testing.assert_allclose(y[0, :, 0, 0], w[:, :, 1, 1] @ x[0, :, 2, 2], rtol=1e-13)
    depthwise = conv2d(x, w[:2, :1], groups=2, stride=BIG, dilation=BIG, padding="same")
    np.testing.assert_allclose(depthwise[0, :, 0, 0], w[:2, 0, 1, 1] * x[0, :, 2, 2], rtol=1e-13)
    gx, gw, gb = conv2d_backward(np.ones((1, 3, 1, 1)), x, w, stride=BIG)
    np.testing.assert_allclose(gw[:, :, :, :], np.broadcast_to(x[0, :, :3, :3], gw.shape))
    np.testing.assert_array_equal(max_pool2d(x, 2, stride=BIG), x[:, :, :2, :2].max(axis=(2, 3),
                                                                                   keepdims=True))
    col = im2col(x, 2, 2, stride=BIG, pad=BIG)
    assert col.shape == (9, 8) and np.array_equal(col[4], x[0, :, :2, :2].ravel())
    assert np.count_nonzero(col) == 8
    np.testing.assert_array_equal(col2im(col, x.shape, 2, 2, stride=BIG, pad=BIG)[0, :, :2, :2],
                                  x[0, :, :2, :2])


# --- n_threads past what OpenMP can start -----------------------------------------
# Before: a positive n_threads was taken as is, and max_pool2d(..., n_threads=100000)
# was a segfault inside libgomp (conv2d a MemoryError from a 100000-slice workspace).

def test_resolve_n_threads_limit():
    assert resolve_n_threads(64, 8) == 64                 # default limit: max(64, 4 * cores)
    assert resolve_n_threads(128, 32) == 128
    assert resolve_n_threads(10, 8, limit=10) == 10
    for n_threads, cores, limit in ((65, 8, None), (129, 32, None), (11, 8, 10)):
        with pytest.raises(ValueError, match=esc(f"n_threads={n_threads} is more than fastconv "
                                                 "starts")):
            resolve_n_threads(n_threads, cores, limit)
    assert resolve_n_threads(-10**9, 8) == 1             # counting back is never too many


def test_effective_n_threads_limit():
    from fastconv._threads import effective_n_threads, max_n_threads
    limit = max_n_threads()
    assert limit >= 64 and limit >= 4 * (os.cpu_count() or 1)
    assert effective_n_threads(limit) == limit
    with pytest.raises(ValueError, match=esc(f"n_threads={limit + 1} is more than fastconv "
                                             f"starts ({limit}: 4 per core, at least 64)")):
        effective_n_threads(limit + 1)


@pytest.mark.parametrize("call", [
    lambda n: max_pool2d(X, 2, n_threads=n),
    lambda n: conv2d(X, W, n_threads=n),
    lambda n: conv2d_backward(DY, X, W, n_threads=n),
    lambda n: im2col(X, 3, 3, n_threads=n),
    lambda n: Conv2D(3, 4, 3, n_threads=n),
], ids=["max_pool2d", "conv2d", "conv2d_backward", "im2col", "Conv2D"])
@pytest.mark.parametrize("n_threads", [100_000, 2**31, 2**70])
def test_huge_n_threads_is_a_value_error(call, n_threads):
    with pytest.raises(ValueError, match=esc(f"n_threads={n_threads} is more than fastconv")):
        call(n_threads)


# --- array arguments NumPy cannot convert -------------------------------------------
# Before: np.asarray's own ValueError ("setting an array element with a sequence")
# escaped without naming the argument.

class _BadArray:
    def __array__(self, dtype=None, copy=None):
        raise TypeError("no array here")


@pytest.mark.parametrize("call, name", [
    (lambda bad: conv2d(bad, W), "x"),
    (lambda bad: conv2d(X, bad), "weight"),
    (lambda bad: conv2d(X, W, bad), "bias"),
    (lambda bad: conv2d_backward(bad, X, W), "grad_output"),
    (lambda bad: max_pool2d(bad, 2), "x"),
    (lambda bad: im2col(bad, 3, 3), "input_data"),
    (lambda bad: col2im(bad, (1, 3, 3, 3), 3, 3), "col"),
], ids=["conv2d-x", "conv2d-weight", "conv2d-bias", "backward-grad_output", "max_pool2d-x",
        "im2col", "col2im"])
@pytest.mark.parametrize("bad, error", [
    ([[[[1.0, 2.0]], [[1.0]]]], ValueError),                 # ragged
    (_BadArray(), TypeError),
], ids=["ragged", "bad-__array__"])
def test_unconvertible_arrays_are_named(call, name, bad, error):
    with pytest.raises(error, match=f"^{name} cannot be converted to an array: "):
        call(bad)


# --- max_pool2d_backward: unsigned indices ------------------------------------------
# Before: uint64 2**64 - 1 became -1 ("window without inputs") in the int64 cast, and its
# gradient was silently dropped.

@pytest.mark.parametrize("dtype", [np.uint64, np.uint32, np.uint8])
def test_unsigned_indices_out_of_range_are_rejected(dtype):
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    _, indices = max_pool2d(x, 2, return_indices=True)
    grad = np.ones((1, 1, 2, 2))
    ok = indices.astype(dtype)
    np.testing.assert_array_equal(max_pool2d_backward(grad, x, 2, indices=ok),
                                  max_pool2d_backward(grad, x, 2, indices=indices))
    bad = ok.copy()
    bad[0, 0, 1, 1] = np.iinfo(dtype).max
    with pytest.raises(ValueError, match=esc("indices holds 1 value(s) outside [-1, H*W) = "
                                             "[-1, 16)")):
        max_pool2d_backward(grad, x, 2, indices=bad)


# --- layer constructors: every argument named -------------------------------------
# Before: Conv2D(dtype="banana") raised NumPy's "data type 'banana' not understood",
# a bad rng NumPy's SeedSequence message, Conv2D(2**70, ...) "Maximum allowed dimension
# exceeded", and the pooling and ReLU layers took n_threads=0 until their first call.

@pytest.mark.parametrize("make, error, match", [
    (lambda: Conv2D(3, 4, 3, dtype="banana"), TypeError,
     esc("dtype must be float32 or float64, got 'banana'")),
    (lambda: ConvTranspose2D(3, 4, 3, dtype=[1]), TypeError,
     esc("dtype must be float32 or float64, got [1]")),
    (lambda: Conv2D(3, 4, 3, rng="abc"), TypeError,
     esc("rng must be None, a non-negative int or a numpy.random.Generator, got 'abc'")),
    (lambda: Conv2D(3, 4, 3, rng=-1), ValueError, esc("rng must be None, a non-negative int")),
    (lambda: ConvTranspose2D(3, 4, 3, rng=1.5), TypeError, esc("rng must be None")),
    (lambda: Conv2D(2**70, 1, 1), ValueError,
     esc(f"in_channels={2**70} and out_channels=1 must be at most 2**31 - 1")),
    (lambda: ConvTranspose2D(1, 2**31, 3), ValueError,
     esc(f"in_channels=1 and out_channels={2**31} must be at most 2**31 - 1")),
    (lambda: ConvTranspose2D(1, 2**30, 2**31 - 1), ValueError,
     esc(f"the weight would have shape ({2**30}, 1, 2147483647, 2147483647), more elements than "
         f"any array can hold (in_channels=1, out_channels={2**30}")),
    (lambda: MaxPool2D(2, n_threads=0), ValueError, esc("n_threads=0 is invalid")),
    (lambda: AvgPool2D(2, n_threads="2"), TypeError, esc("n_threads must be an int, got '2'")),
    (lambda: ReLU(n_threads=1.0), TypeError, esc("n_threads must be an int, got 1.0")),
    (lambda: ReLU(n_threads=10**6), ValueError, esc("n_threads=1000000 is more than fastconv")),
], ids=["Conv2D-dtype-str", "ConvTranspose2D-dtype-list", "Conv2D-rng-str", "Conv2D-rng-negative",
        "ConvTranspose2D-rng-float", "Conv2D-in_channels-huge", "ConvTranspose2D-out_channels-huge",
        "ConvTranspose2D-weight-huge",
        "MaxPool2D-n_threads-0", "AvgPool2D-n_threads-str", "ReLU-n_threads-float",
        "ReLU-n_threads-huge"])
def test_layer_constructor_arguments_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()
