"""Property tests: random valid configurations of every public function against the reference.

Hypothesis draws shapes (batch 1, output size 1, non-square planes, even
kernels), strides, every padding form and padding_mode, dilation, groups
(depthwise included), layouts, algorithms, dtypes, thread counts, and the
memory layout of every input (contiguous, Fortran-ordered, strided, reversed,
read-only, broadcast, an NHWC buffer viewed as NCHW). Each call is checked
against :mod:`fastconv.reference` with the tolerances of ``_helpers`` (float64
1e-10 relative, float32 growing with the reduction length), and every input
must be bit-for-bit unchanged afterwards.

The algorithms come from ``fastconv._validation.ALGORITHMS``: one that rejects
a configuration (with a ValueError naming ``algorithm``) is replaced by
``'auto'`` for that example, so an algorithm added later is covered as soon
as it is listed. The number of examples is set by the hypothesis profile
(``FASTCONV_HYPOTHESIS_PROFILE``, see ``conftest.py``).
"""

import numpy as np
from _helpers import assert_matches
from hypothesis import event, given, note
from hypothesis import strategies as st

import fastconv
from fastconv import reference
from fastconv._validation import ALGORITHMS, LAYOUTS, PADDING_MODES

DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]
#: How an input is laid out in memory; the values are the same in every case.
VARIANTS = ["contiguous", "fortran", "strided", "reversed", "read-only", "nhwc-buffer",
            "broadcast"]

small = st.integers(1, 3)
threads = st.integers(1, 3)


def pairs(low, high):
    """An int or an (h, w) pair of ints in [low, high]."""
    value = st.integers(low, high)
    return st.one_of(value, st.tuples(value, value))


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def _with_layout(data: np.ndarray, variant: str) -> np.ndarray:
    """``data``'s values in the memory layout ``variant`` (see VARIANTS)."""
    if variant == "fortran":
        return np.asfortranarray(data)
    if variant == "strided":
        big = np.zeros(data.shape[:-1] + (2 * data.shape[-1] + 1,), data.dtype)
        big[..., 1::2] = data
        return big[..., 1::2]
    if variant == "reversed":
        return np.ascontiguousarray(data[..., ::-1])[..., ::-1]
    if variant == "read-only":
        data = data.copy()
        data.flags.writeable = False
        return data
    if variant == "nhwc-buffer" and data.ndim == 4:
        return np.ascontiguousarray(data.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return data


@st.composite
def arrays(draw, shape, dtype, *, variants=VARIANTS):
    """Standard-normal data of ``shape`` in a drawn memory layout.

    The broadcast variant repeats the first column (so its values differ), and
    comes back read-only with zero strides.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.standard_normal(shape).astype(dtype)
    variant = draw(st.sampled_from(variants))
    if variant == "broadcast":
        return np.broadcast_to(data[..., :1], shape)
    return _with_layout(data, variant)


def snapshot(*arrays_):
    """Bytes of every array, to check afterwards that nothing was written."""
    return [(a, np.array(a, copy=True)) for a in arrays_ if isinstance(a, np.ndarray)]


def assert_unchanged(saved):
    for array, before in saved:
        assert array.tobytes() == before.tobytes(), "an input was modified"


def _abs(a):
    """|a| (None stays None): the inputs of the error bound, see ``_helpers.relative_error``."""
    return None if a is None else np.abs(a)


def _nhwc(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def _run_algorithm(call, algorithm):
    """``call(algorithm)``; an algorithm that rejects the configuration is replaced by 'auto'."""
    try:
        return call(algorithm), algorithm
    except ValueError as error:
        if algorithm == "auto" or "algorithm" not in str(error):
            raise
        event(f"algorithm={algorithm!r} rejected the configuration")
        return call("auto"), "auto"


# ---------------------------------------------------------------------------
# conv2d / conv2d_backward
# ---------------------------------------------------------------------------

def _min_size(span, before, after, padding, mode):
    """Smallest input length for which this padding and mode give a valid convolution."""
    if padding == "valid":
        return span
    if padding == "full":
        return {"reflect": span, "circular": max(span - 1, 1)}.get(mode, 1)
    if padding == "same":
        # H >= span keeps the larger 'same' pad (<= span - 1) inside one reflection
        return span if mode in ("reflect", "circular") else 1
    low = max(1, span - before - after)
    if mode == "reflect":
        low = max(low, before + 1, after + 1)
    elif mode == "circular":
        low = max(low, before, after)
    return low


@st.composite
def conv_configs(draw):
    depthwise = draw(st.booleans())
    if depthwise:
        C = draw(st.integers(1, 4))
        groups, F = C, C * draw(st.integers(1, 2))
    else:
        groups = draw(st.sampled_from([1, 1, 2, 3]))
        C, F = groups * draw(small), groups * draw(small)
    if draw(st.integers(0, 3)) == 0:
        # the shapes Winograd computes (3x3, stride 1, dilation 1), often enough to test it
        KH = KW = 3
        stride = dilation = 1
    else:
        KH, KW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        stride = draw(pairs(1, 3))
        dilation = draw(pairs(1, 2))
    form = draw(st.sampled_from(["int", "pair", "four", "valid", "same", "full"]))
    pad = st.integers(0, 2)
    padding = draw({"int": pad, "pair": st.tuples(pad, pad),
                    "four": st.tuples(pad, pad, pad, pad)}.get(form, st.just(form)))
    if form == "int":
        pads = (padding,) * 4
    elif form == "pair":
        pads = (padding[0], padding[0], padding[1], padding[1])
    else:
        pads = padding if form == "four" else (0, 0, 0, 0)
    mode = draw(st.sampled_from(PADDING_MODES))
    dh, dw = _pair(dilation)
    H = _min_size(dh * (KH - 1) + 1, pads[0], pads[1], padding, mode) + draw(st.integers(0, 4))
    W = _min_size(dw * (KW - 1) + 1, pads[2], pads[3], padding, mode) + draw(st.integers(0, 4))
    return dict(N=draw(small), C=C, H=H, W=W, F=F, KH=KH, KW=KW, groups=groups,
                args=dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                          padding_mode=mode))


@given(config=conv_configs(), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       algorithm=st.sampled_from(ALGORITHMS), n_threads=threads, data=st.data())
def test_conv2d_and_backward_match_the_reference(config, dtype, layout, algorithm, n_threads,
                                                 data):
    N, C, H, W, F = (config[k] for k in "NCHWF")
    KH, KW, args = config["KH"], config["KW"], config["args"]
    Cg = C // config["groups"]
    x = data.draw(arrays((N, C, H, W), dtype), "x")
    weight = data.draw(arrays((F, Cg, KH, KW), dtype), "weight")
    bias = data.draw(st.one_of(st.none(), arrays((F,), dtype)), "bias")
    y_ref = reference.conv2d(x, weight, bias, **args)
    _, _, OH, OW = y_ref.shape
    dy = data.draw(arrays(y_ref.shape, dtype), "grad_output")
    gx_ref, gw_ref, gb_ref = reference.conv2d_backward(dy, x, weight, **args)
    y_mag = reference.conv2d(_abs(x), _abs(weight), _abs(bias), **args)
    gx_mag, gw_mag, gb_mag = reference.conv2d_backward(_abs(dy), _abs(x), _abs(weight), **args)

    x_in, dy_in = (_nhwc(x), _nhwc(dy)) if layout == "NHWC" else (x, dy)
    if layout == "NHWC":          # the channels-last arrays in a drawn layout too
        x_in = _with_layout(x_in, data.draw(st.sampled_from(VARIANTS[:5]), "x layout"))
    back = _nchw if layout == "NHWC" else np.asarray
    use_out = data.draw(st.booleans(), "out")
    out = np.empty(y_ref.shape if layout == "NCHW" else _nhwc(y_ref).shape, dtype) \
        if use_out else None
    saved = snapshot(x, weight, bias, dy, x_in, dy_in)

    relu = data.draw(st.booleans(), "activation='relu'")
    activation = "relu" if relu else None
    y, used = _run_algorithm(
        lambda a: fastconv.conv2d(x_in, weight, bias, layout=layout, algorithm=a, out=out,
                                  activation=activation, n_threads=n_threads, **args), algorithm)
    note(f"algorithm used: {used}")
    if use_out:
        assert y is out
    if relu:
        # the ReLU's backward passes dy where the exact output is positive: compare the
        # gradients on outputs clear of 0 by more than the rounding, where both agree
        y_ref_act = np.maximum(y_ref, 0)
        certain = np.abs(y_ref) > 1e3 * np.finfo(dtype).eps * np.maximum(y_mag, 1)
        assert_matches(back(y), y_ref_act, dtype, Cg * KH * KW, "relu(y)", y_mag)
        dy = np.where(certain, dy, 0).astype(dtype)
        dy_in = _nhwc(dy) if layout == "NHWC" else dy
        saved = snapshot(x, weight, bias, dy, x_in, dy_in)
        gx_ref, gw_ref, gb_ref = reference.conv2d_backward(np.where(y_ref > 0, dy, 0), x, weight,
                                                           **args)
    else:
        assert_matches(back(y), y_ref, dtype, Cg * KH * KW, "y", y_mag)

    bias_flag = data.draw(st.sampled_from(["flag", "array-or-none"]), "bias argument")
    bias_arg = (bias is not None) if bias_flag == "flag" else bias
    gx, gw, gb = fastconv.conv2d_backward(dy_in, x_in, weight, layout=layout, algorithm=used,
                                          bias=bias_arg, activation=activation,
                                          output=y if relu else None, n_threads=n_threads,
                                          **args)
    assert_matches(back(gx), gx_ref, dtype, F // config["groups"] * KH * KW, "grad_x", gx_mag)
    assert_matches(gw, gw_ref, dtype, N * OH * OW, "grad_weight", gw_mag)
    if bias is None:
        assert gb is None
    else:
        assert_matches(gb, gb_ref, dtype, N * OH * OW, "grad_bias", gb_mag)
    assert_unchanged(saved)


# ---------------------------------------------------------------------------
# conv_transpose2d / conv_transpose2d_backward
# ---------------------------------------------------------------------------

@st.composite
def transposed_configs(draw):
    # a third are kernels twice the stride (groups 1, dilation 1), which the phase
    # convolutions (algorithm="winograd") also run
    phases = draw(st.integers(0, 2)) == 0
    groups = 1 if phases else draw(st.sampled_from([1, 1, 2, 3]))
    C_in, Cg_out = groups * draw(small), draw(small)
    stride, dilation = draw(pairs(1, 3)), 1 if phases else draw(pairs(1, 2))
    if phases:
        KH, KW = (2 * s for s in _pair(stride))
    else:
        KH, KW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    # an int, (ph, pw) or (top, bottom, left, right)
    padding = draw(st.one_of(pairs(0, 2), st.tuples(*[st.integers(0, 2)] * 4)))
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    pads = tuple(padding) if len(_pair(padding)) == 4 else (
        _pair(padding)[0], _pair(padding)[0], _pair(padding)[1], _pair(padding)[1])
    op = (draw(st.integers(0, max(sh, dh) - 1)), draw(st.integers(0, max(sw, dw) - 1)))
    output_padding = op if draw(st.booleans()) or op[0] != op[1] else op[0]
    sizes = []
    for s, d, k, p, o in ((sh, dh, KH, pads[0] + pads[1], op[0]),
                          (sw, dw, KW, pads[2] + pads[3], op[1])):
        # H_out = (H - 1)*s - top - bottom + d*(k - 1) + o + 1 >= 1
        low = 1 + max(0, -(-(p - d * (k - 1) - o) // s))
        sizes.append(low + draw(st.integers(0, 3)))
    algorithm = draw(st.sampled_from(["auto", "im2col"] + (["winograd"] if phases else [])))
    return dict(N=draw(small), C_in=C_in, Cg_out=Cg_out, H=sizes[0], W=sizes[1], KH=KH, KW=KW,
                groups=groups, args=dict(stride=stride, padding=padding,
                                         output_padding=output_padding, groups=groups,
                                         dilation=dilation, algorithm=algorithm))


@given(config=transposed_configs(), dtype=st.sampled_from(DTYPES), n_threads=threads,
       data=st.data())
def test_conv_transpose2d_and_backward_match_the_reference(config, dtype, n_threads, data):
    N, C_in, Cg_out, H, W = (config[k] for k in ("N", "C_in", "Cg_out", "H", "W"))
    KH, KW, groups, args = config["KH"], config["KW"], config["groups"], config["args"]
    x = data.draw(arrays((N, C_in, H, W), dtype), "x")
    weight = data.draw(arrays((C_in, Cg_out, KH, KW), dtype), "weight")
    bias = data.draw(st.one_of(st.none(), arrays((Cg_out * groups,), dtype)), "bias")
    args = dict(args)
    algorithm = args.pop("algorithm")
    y_ref = reference.conv_transpose2d(x, weight, bias, **args)
    dy = data.draw(arrays(y_ref.shape, dtype), "grad_output")
    gx_ref, gw_ref, gb_ref = reference.conv_transpose2d_backward(dy, x, weight, **args)
    y_mag = reference.conv_transpose2d(_abs(x), _abs(weight), _abs(bias), **args)
    gx_mag, gw_mag, gb_mag = reference.conv_transpose2d_backward(_abs(dy), _abs(x),
                                                                 _abs(weight), **args)
    saved = snapshot(x, weight, bias, dy)

    args["algorithm"] = algorithm
    y = fastconv.conv_transpose2d(x, weight, bias, n_threads=n_threads, **args)
    assert_matches(y, y_ref, dtype, C_in // groups * KH * KW, "y", y_mag)
    gx, gw, gb = fastconv.conv_transpose2d_backward(dy, x, weight, bias=bias is not None,
                                                    n_threads=n_threads, **args)
    _, _, OH, OW = y_ref.shape
    assert_matches(gx, gx_ref, dtype, Cg_out * KH * KW, "grad_x", gx_mag)
    assert_matches(gw, gw_ref, dtype, N * H * W, "grad_weight", gw_mag)
    if bias is None:
        assert gb is None
    else:
        assert_matches(gb, gb_ref, dtype, N * OH * OW, "grad_bias", gb_mag)
    assert_unchanged(saved)


# ---------------------------------------------------------------------------
# Pooling and activations
# ---------------------------------------------------------------------------

@st.composite
def pool_configs(draw, dilation=True):
    KH, KW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kernel_size = (KH, KW) if draw(st.booleans()) or KH != KW else KH
    stride = draw(st.one_of(st.none(), pairs(1, 3)))
    ph, pw = draw(st.integers(0, KH // 2)), draw(st.integers(0, KW // 2))
    padding = (ph, pw) if draw(st.booleans()) or ph != pw else ph
    dh, dw = _pair(draw(pairs(1, 2))) if dilation else (1, 1)
    H = max(1, dh * (KH - 1) + 1 - 2 * ph) + draw(st.integers(0, 4))
    W = max(1, dw * (KW - 1) + 1 - 2 * pw) + draw(st.integers(0, 4))
    args = dict(kernel_size=kernel_size, stride=stride, padding=padding,
                ceil_mode=draw(st.booleans()))
    if dilation:
        args["dilation"] = (dh, dw) if dh != dw else dh
    return dict(shape=(draw(small), draw(small), H, W), KK=KH * KW, args=args)


@given(config=pool_configs(), dtype=st.sampled_from(DTYPES), n_threads=threads,
       with_indices=st.booleans(), data=st.data())
def test_max_pool2d_and_backward_match_the_reference(config, dtype, n_threads, with_indices,
                                                     data):
    args = config["args"]
    x = data.draw(arrays(config["shape"], dtype), "x")
    y_ref, idx_ref = reference.max_pool2d(x, return_indices=True, **args)
    dy = data.draw(arrays(y_ref.shape, dtype), "grad_output")
    saved = snapshot(x, dy)
    y, idx = fastconv.max_pool2d(x, return_indices=True, n_threads=n_threads, **args)
    np.testing.assert_array_equal(y, y_ref)             # a max is exact
    np.testing.assert_array_equal(idx, idx_ref)         # and so is its position
    assert y.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(fastconv.max_pool2d(x, n_threads=n_threads, **args), y)
    indices = _with_layout(idx, data.draw(st.sampled_from(VARIANTS[:5]))) if with_indices \
        else None
    saved += snapshot(indices)
    gx = fastconv.max_pool2d_backward(dy, x, indices=indices, n_threads=n_threads, **args)
    assert_matches(gx, reference.max_pool2d_backward(dy, x, **args), dtype, config["KK"],
                   "grad_x", reference.max_pool2d_backward(_abs(dy), x, **args))
    assert_unchanged(saved)


@given(config=pool_configs(dilation=False), dtype=st.sampled_from(DTYPES), n_threads=threads,
       count_include_pad=st.booleans(), data=st.data())
def test_avg_pool2d_and_backward_match_the_reference(config, dtype, n_threads,
                                                     count_include_pad, data):
    args = dict(config["args"], count_include_pad=count_include_pad)
    x = data.draw(arrays(config["shape"], dtype), "x")
    y_ref = reference.avg_pool2d(x, **args)
    dy = data.draw(arrays(y_ref.shape, dtype), "grad_output")
    saved = snapshot(x, dy)
    assert_matches(fastconv.avg_pool2d(x, n_threads=n_threads, **args), y_ref, dtype,
                   config["KK"], "y", reference.avg_pool2d(_abs(x), **args))
    assert_matches(fastconv.avg_pool2d_backward(dy, x, n_threads=n_threads, **args),
                   reference.avg_pool2d_backward(dy, x, **args), dtype, config["KK"], "grad_x",
                   reference.avg_pool2d_backward(_abs(dy), x, **args))
    assert_unchanged(saved)


@given(shape=st.tuples(small, small, st.integers(1, 6), st.integers(1, 6)),
       keepdims=st.booleans(), dtype=st.sampled_from(DTYPES), n_threads=threads,
       data=st.data())
def test_global_avg_pool2d_and_backward_match_the_reference(shape, keepdims, dtype, n_threads,
                                                            data):
    x = data.draw(arrays(shape, dtype), "x")
    y_ref = reference.global_avg_pool2d(x, keepdims=keepdims)
    dy = data.draw(arrays(y_ref.shape, dtype), "grad_output")
    saved = snapshot(x, dy)
    y = fastconv.global_avg_pool2d(x, keepdims=keepdims, n_threads=n_threads)
    assert_matches(y, y_ref, dtype, shape[2] * shape[3], "y",
                   reference.global_avg_pool2d(_abs(x), keepdims=keepdims))
    assert_matches(fastconv.global_avg_pool2d_backward(dy, x, n_threads=n_threads),
                   reference.global_avg_pool2d_backward(dy, x), dtype, 1, "grad_x")
    assert_unchanged(saved)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
       dtype=st.sampled_from(DTYPES), n_threads=threads, zeros=st.booleans(), data=st.data())
def test_relu_and_backward_match_the_reference(shape, dtype, n_threads, zeros, data):
    x = data.draw(arrays(shape, dtype, variants=VARIANTS[:5] + VARIANTS[6:]), "x")
    if zeros:                       # exact zeros: the gradient there is 0, as in PyTorch
        x = np.where(np.abs(x) < 0.5, 0, x).astype(dtype)
    dy = data.draw(arrays(shape, dtype, variants=VARIANTS[:5] + VARIANTS[6:]), "grad_output")
    saved = snapshot(x, dy)
    np.testing.assert_array_equal(fastconv.relu(x, n_threads=n_threads), reference.relu(x))
    np.testing.assert_array_equal(fastconv.relu_backward(dy, x, n_threads=n_threads),
                                  reference.relu_backward(dy, x))
    assert_unchanged(saved)


# ---------------------------------------------------------------------------
# im2col / col2im
# ---------------------------------------------------------------------------

@given(N=small, C=small, filter_h=st.integers(1, 4), filter_w=st.integers(1, 4),
       stride=pairs(1, 3), pad=st.one_of(st.integers(0, 2), st.tuples(*[st.integers(0, 2)] * 2),
                                          st.tuples(*[st.integers(0, 2)] * 4)),
       extra=st.tuples(st.integers(0, 4), st.integers(0, 4)), dtype=st.sampled_from(DTYPES),
       n_threads=threads, data=st.data())
def test_im2col_and_col2im_match_the_reference(N, C, filter_h, filter_w, stride, pad, extra,
                                               dtype, n_threads, data):
    pads = (pad,) * 4 if isinstance(pad, int) else \
        (pad[0], pad[0], pad[1], pad[1]) if len(pad) == 2 else pad
    H = max(1, filter_h - pads[0] - pads[1]) + extra[0]
    W = max(1, filter_w - pads[2] - pads[3]) + extra[1]
    x = data.draw(arrays((N, C, H, W), dtype), "input_data")
    col_ref = reference.im2col(x, filter_h, filter_w, stride, pad)
    col_in = data.draw(arrays(col_ref.shape, dtype), "col")
    saved = snapshot(x, col_in)
    col = fastconv.im2col(x, filter_h, filter_w, stride, pad, n_threads=n_threads)
    np.testing.assert_array_equal(col, col_ref)          # a copy of values: exact
    assert col.dtype == dtype
    img = fastconv.col2im(col_in, x.shape, filter_h, filter_w, stride, pad, n_threads=n_threads)
    assert_matches(img, reference.col2im(col_in, x.shape, filter_h, filter_w, stride, pad),
                   dtype, filter_h * filter_w, "col2im",
                   reference.col2im(_abs(col_in), x.shape, filter_h, filter_w, stride, pad))
    assert_unchanged(saved)


# ---------------------------------------------------------------------------
# The layers: a small network's forward and backward
# ---------------------------------------------------------------------------

@given(config=conv_configs(), dtype=st.sampled_from(DTYPES), n_threads=threads,
       bias=st.booleans(), data=st.data())
def test_layers_match_the_reference(config, dtype, n_threads, bias, data):
    """Conv2D -> ReLU -> MaxPool2D -> ConvTranspose2D -> AvgPool2D, forward and backward.

    Each layer is compared on the input the previous fastconv layer produced (so
    float32 rounding cannot flip a ReLU mask or an argmax between the two chains).
    """
    N, C, H, W, F = (config[k] for k in "NCHWF")
    args = config["args"]
    conv = fastconv.Conv2D(C, F, (config["KH"], config["KW"]), bias=bias, dtype=dtype,
                           rng=data.draw(st.integers(0, 100)), n_threads=n_threads, **args)
    up = fastconv.ConvTranspose2D(F, 2, 2, stride=2, dtype=dtype, rng=1, n_threads=n_threads)
    K = conv.W[0].size
    A = _abs
    # layer, reference forward, its error bound (None: exact), reference backward and its
    # bound (None: exact), the forward's and backward's reduction lengths
    chain = [
        (conv, lambda v: reference.conv2d(v, conv.W, conv.b, **args),
         lambda v: reference.conv2d(A(v), A(conv.W), A(conv.b), **args),
         lambda g, v: reference.conv2d_backward(g, v, conv.W, **args),
         lambda g, v: reference.conv2d_backward(A(g), A(v), A(conv.W), **args), K, F * K),
        (fastconv.ReLU(n_threads=n_threads), reference.relu, None,
         lambda g, v: (reference.relu_backward(g, v),), None, 1, 1),
        (fastconv.MaxPool2D(2, ceil_mode=True, n_threads=n_threads),
         lambda v: reference.max_pool2d(v, 2, ceil_mode=True), None,
         lambda g, v: (reference.max_pool2d_backward(g, v, 2, ceil_mode=True),),
         lambda g, v: (reference.max_pool2d_backward(A(g), v, 2, ceil_mode=True),), 1, 4),
        (up, lambda v: reference.conv_transpose2d(v, up.W, up.b, stride=2),
         lambda v: reference.conv_transpose2d(A(v), A(up.W), A(up.b), stride=2),
         lambda g, v: reference.conv_transpose2d_backward(g, v, up.W, stride=2),
         lambda g, v: reference.conv_transpose2d_backward(A(g), A(v), A(up.W), stride=2),
         F * 4, 2 * 4),
        (fastconv.AvgPool2D(2, n_threads=n_threads), lambda v: reference.avg_pool2d(v, 2),
         lambda v: reference.avg_pool2d(A(v), 2),
         lambda g, v: (reference.avg_pool2d_backward(g, v, 2),),
         lambda g, v: (reference.avg_pool2d_backward(A(g), v, 2),), 4, 4),
    ]
    a = data.draw(arrays((N, C, H, W), dtype), "x")
    inputs = []
    for layer, forward, forward_bound, _, _, k_forward, _ in chain:
        inputs.append(a)
        y = layer(a)
        assert_matches(y, forward(a), dtype, k_forward, f"{type(layer).__name__} forward",
                       forward_bound and forward_bound(a))
        a = y
    g = data.draw(arrays(a.shape, dtype), "dout")
    for (layer, _, _, backward, backward_bound, _, k_backward), v in zip(reversed(chain),
                                                                         reversed(inputs)):
        name = type(layer).__name__
        expected = backward(g, v)
        bounds = backward_bound(g, v) if backward_bound else (None,) * len(expected)
        got = layer.backward(g)
        assert_matches(got, expected[0], dtype, k_backward, f"{name} dx", bounds[0])
        if len(expected) == 3:
            P = g.shape[0] * g.shape[2] * g.shape[3] if layer is conv else v[0, 0].size * N
            assert_matches(layer.dW, expected[1], dtype, P, f"{name}.dW", bounds[1])
            if layer.b is None:
                assert layer.db is None
            else:
                assert_matches(layer.db, expected[2], dtype, g.shape[0] * g[0, 0].size,
                               f"{name}.db", bounds[2])
        g = got
