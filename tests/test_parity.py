"""Parameter parity: groups/depthwise, padding strings and modes, NHWC, transposed convolution.

Every compiled path (im2col engine NCHW and NHWC, the direct depthwise kernel,
transposed convolution) against the NumPy reference over the grid the API
accepts, plus identities that tie the paths to each other.
"""

import itertools

import numpy as np
import pytest
from _helpers import algorithms_for, assert_matches, spy_transposed_sums

import fastconv
from fastconv import _conv, _tiling, reference
from fastconv._validation import transposed_geometry

# (C, F, groups): plain, grouped, depthwise, depthwise with multiplier 2, 3-channel depthwise
GROUPINGS = [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4), (3, 3, 3)]
MODES = ["zeros", "reflect", "replicate", "circular"]
# (kernel, stride, padding, dilation) on a 7x8 input
GEOMETRIES = [
    ((3, 3), 1, 1, 1),
    ((3, 3), 2, (1, 2), 1),
    ((2, 3), 1, (0, 1, 2, 1), 2),
    ((5, 5), 3, "same", 1),
    ((3, 3), 2, "same", 1),
    ((3, 2), (1, 2), "same", 2),
    ((1, 1), 1, 0, 1),
    ((3, 3), 1, "full", 1),
    ((4, 4), 2, "valid", 1),
]


def _algorithms(C, groups, layout, kernel, stride, dilation):
    return algorithms_for(kernel, stride, dilation, layout, depthwise=groups == C, groups=groups)


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _nchw(a):
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def check_conv(x, weight, bias, dtype, rng, n_threads=2, layout="NCHW", algorithm="auto",
               **args):
    """fastconv's forward and three gradients equal the reference's (NCHW data in, any layout)."""
    F, Cg, KH, KW = weight.shape
    y_ref = reference.conv2d(x, weight, bias, **args)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    rx, rw, rb = reference.conv2d_backward(dy, x, weight, **args)
    convert = _nhwc if layout == "NHWC" else (lambda a: a)
    back = _nchw if layout == "NHWC" else (lambda a: a)
    y = fastconv.conv2d(convert(x), weight, bias, layout=layout, algorithm=algorithm,
                        n_threads=n_threads, **args)
    assert_matches(back(y), y_ref, dtype, Cg * KH * KW, "y")
    gx, gw, gb = fastconv.conv2d_backward(convert(dy), convert(x), weight, layout=layout,
                                          algorithm=algorithm, bias=bias is not None,
                                          n_threads=n_threads, **args)
    N, _, OH, OW = y_ref.shape
    assert_matches(back(gx), rx, dtype, F * KH * KW, "grad_x")
    assert_matches(gw, rw, dtype, N * OH * OW, "grad_weight")
    if bias is None:
        assert gb is None
    else:
        assert_matches(gb, rb, dtype, N * OH * OW, "grad_bias")


def _problem(rng, N, C, H, W, F, groups, kernel, dtype, bias=True):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    weight = rng.standard_normal((F, C // groups, *kernel)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    return x, weight, b


CONV_GRID = [
    pytest.param(C, F, groups, mode, kernel, stride, padding, dilation, layout, algorithm,
                 id=f"C{C}F{F}g{groups}-{mode}-k{kernel}s{stride}p{padding}d{dilation}"
                    f"-{layout}-{algorithm}")
    for (C, F, groups), mode, (kernel, stride, padding, dilation), layout in itertools.product(
        GROUPINGS, MODES, GEOMETRIES, ["NCHW", "NHWC"])
    for algorithm in _algorithms(C, groups, layout, kernel, stride, dilation)
]


@pytest.mark.parametrize("C,F,groups,mode,kernel,stride,padding,dilation,layout,algorithm",
                         CONV_GRID)
def test_conv_grid(C, F, groups, mode, kernel, stride, padding, dilation, layout, algorithm,
                   dtype):
    rng = np.random.default_rng(3)
    x, weight, bias = _problem(rng, 2, C, 7, 8, F, groups, kernel, dtype)
    check_conv(x, weight, bias, dtype, rng, layout=layout, algorithm=algorithm, stride=stride,
               padding=padding, dilation=dilation, groups=groups, padding_mode=mode)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("N", [1, 3, 9])
@pytest.mark.parametrize("C,F,groups", [(4, 6, 2), (6, 6, 6), (6, 12, 3)])
@pytest.mark.parametrize("layout,algorithm", [("NCHW", "im2col"), ("NCHW", "auto"),
                                              ("NCHW", "winograd"), ("NHWC", "im2col")])
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_tiles_threads_and_batches(monkeypatch, N, C, F, groups, layout, algorithm, mode,
                                   n_threads, dtype):
    """Tiny tiles: tile edges inside rows, image groups, channel blocks crossing groups,
    Winograd blocks of one tile row."""
    monkeypatch.setattr(_tiling, "COLUMN_TILE_BYTES", 1)
    monkeypatch.setattr(_tiling, "MIN_TILE_COLUMNS", 5)
    monkeypatch.setattr(_tiling, "WINOGRAD_BLOCK_BYTES", 1)
    monkeypatch.setattr(_tiling, "WINOGRAD_MIN_TILES", 1)
    rng = np.random.default_rng(4)
    x, weight, bias = _problem(rng, N, C, 6, 9, F, groups, (3, 3), dtype)
    check_conv(x, weight, bias, dtype, rng, n_threads=n_threads, layout=layout,
               algorithm=algorithm, stride=1, padding=(1, 2, 2, 1), groups=groups,
               padding_mode=mode)


@pytest.mark.parametrize("layout,algorithm", [("NCHW", "im2col"), ("NCHW", "direct"),
                                              ("NCHW", "winograd"), ("NHWC", "im2col")])
def test_bias_none(layout, algorithm, dtype):
    rng = np.random.default_rng(5)
    x, weight, _ = _problem(rng, 2, 4, 6, 6, 8, 4, (3, 3), dtype)
    check_conv(x, weight, None, dtype, rng, layout=layout, algorithm=algorithm, padding="same",
               groups=4)


def test_backward_accepts_the_forward_bias_or_none():
    rng = np.random.default_rng(6)
    x, weight, bias = _problem(rng, 2, 3, 5, 5, 4, 1, (3, 3), np.float64)
    dy = rng.standard_normal((2, 4, 3, 3))
    with_array = fastconv.conv2d_backward(dy, x, weight, bias=bias)
    assert with_array[2] is not None
    np.testing.assert_allclose(with_array[2], dy.sum(axis=(0, 2, 3)), rtol=1e-12)
    assert fastconv.conv2d_backward(dy, x, weight, bias=None)[2] is None
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        fastconv.conv2d_backward(dy, x, weight, bias=np.ones(3))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("groups", [1, 3])
def test_empty_batch(layout, groups, dtype):
    x = np.zeros((0, 3, 5, 5), dtype)
    weight = np.ones((6, 3 // groups, 3, 3), dtype)
    xin = _nhwc(x) if layout == "NHWC" else x
    y = fastconv.conv2d(xin, weight, np.ones(6, dtype), padding="same", groups=groups,
                        layout=layout)
    assert y.shape == ((0, 5, 5, 6) if layout == "NHWC" else (0, 6, 5, 5))
    gx, gw, gb = fastconv.conv2d_backward(np.zeros_like(y), xin, weight, padding="same",
                                          groups=groups, layout=layout)
    assert gx.shape == xin.shape
    assert not gw.any() and gw.shape == weight.shape and not gb.any()


# --- identities ---------------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2, 3, (2, 3)])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dilation", [1, 2])
def test_same_padding_output_is_ceil_input_over_stride(stride, kernel, dilation):
    x = np.zeros((1, 1, 9, 10))
    y = fastconv.conv2d(x, np.zeros((1, 1, kernel, kernel)), stride=stride, padding="same",
                        dilation=dilation)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    assert y.shape[2:] == (-(-9 // sh), -(-10 // sw))


def test_same_padding_puts_the_odd_pixel_bottom_right():
    """TensorFlow's rule: a 4x4 kernel at stride 1 pads (1, 2, 1, 2)."""
    rng = np.random.default_rng(7)
    x, weight, _ = _problem(rng, 1, 2, 6, 6, 3, 1, (4, 4), np.float64)
    np.testing.assert_allclose(fastconv.conv2d(x, weight, padding="same"),
                               fastconv.conv2d(x, weight, padding=(1, 2, 1, 2)), rtol=1e-13)
    np.testing.assert_allclose(fastconv.conv2d(x, weight, padding="SAME"),
                               fastconv.conv2d(x, weight, padding=(1, 2, 1, 2)), rtol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_nhwc_equals_nchw_transposed(mode, dtype):
    rng = np.random.default_rng(8)
    x, weight, bias = _problem(rng, 3, 6, 9, 7, 4, 2, (3, 3), dtype)
    args = dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2, padding_mode=mode)
    y = fastconv.conv2d(x, weight, bias, **args)
    y_nhwc = fastconv.conv2d(_nhwc(x), weight, bias, layout="NHWC", **args)
    assert_matches(_nchw(y_nhwc), y, dtype, 27, "NHWC forward")
    dy = rng.standard_normal(y.shape).astype(dtype)
    grads = fastconv.conv2d_backward(dy, x, weight, **args)
    grads_nhwc = fastconv.conv2d_backward(_nhwc(dy), _nhwc(x), weight, layout="NHWC", **args)
    assert_matches(_nchw(grads_nhwc[0]), grads[0], dtype, 36, "NHWC grad_x")
    assert_matches(grads_nhwc[1], grads[1], dtype, 3 * 9 * 4, "NHWC grad_weight")
    assert_matches(grads_nhwc[2], grads[2], dtype, 3 * 9 * 4, "NHWC grad_bias")


@pytest.mark.parametrize("multiplier", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_depthwise_direct_equals_grouped_im2col(multiplier, mode, dtype):
    rng = np.random.default_rng(9)
    x, weight, bias = _problem(rng, 2, 5, 8, 9, 5 * multiplier, 5, (3, 3), dtype)
    args = dict(stride=2, padding="same", groups=5, padding_mode=mode)
    direct = fastconv.conv2d(x, weight, bias, algorithm="direct", **args)
    grouped = fastconv.conv2d(x, weight, bias, algorithm="im2col", **args)
    assert_matches(direct, grouped, dtype, 9, "forward")
    dy = rng.standard_normal(direct.shape).astype(dtype)
    for a, b, what in zip(fastconv.conv2d_backward(dy, x, weight, algorithm="direct", **args),
                          fastconv.conv2d_backward(dy, x, weight, algorithm="im2col", **args),
                          ["grad_x", "grad_weight", "grad_bias"]):
        assert_matches(a, b, dtype, 40, what)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (3, 2, 2), (2, 0, 3)])
def test_conv_transpose_is_the_adjoint_of_conv(groups, stride, padding, dilation):
    """<conv2d(x), y> == <x, conv_transpose2d(y)> for the same weight and arguments."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 4, 11, 10))
    weight = rng.standard_normal((6, 4 // groups, 3, 3))
    y = rng.standard_normal(fastconv.conv2d(x, weight, None, stride, padding, dilation,
                                            groups).shape)
    # output_padding recovers the rows the strided conv dropped
    out_h = (y.shape[2] - 1) * stride - 2 * padding + dilation * 2 + 1
    out_w = (y.shape[3] - 1) * stride - 2 * padding + dilation * 2 + 1
    output_padding = (11 - out_h, 10 - out_w)
    left = np.vdot(fastconv.conv2d(x, weight, None, stride, padding, dilation, groups), y)
    right = np.vdot(x, fastconv.conv_transpose2d(y, weight, None, stride, padding,
                                                 output_padding, groups, dilation))
    assert abs(left - right) <= 1e-12 * abs(left)


@pytest.mark.parametrize("padding", [(1, 0, 0, 2), (2, 1, 1, 0), (0, 2, 2, 1)])
@pytest.mark.parametrize("algorithm", ["im2col", "winograd"])
def test_conv_transpose_is_the_adjoint_of_conv_with_asymmetric_padding(padding, algorithm):
    """The adjoint identity with (top, bottom, left, right) padding: conv2d pads each side
    by its own amount, conv_transpose2d crops it (4x4 stride-2 kernels: the phase
    convolutions too)."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3, 12, 11))
    weight = rng.standard_normal((5, 3, 4, 4))
    y = rng.standard_normal(fastconv.conv2d(x, weight, None, 2, padding).shape)
    top, bottom, left, right = padding
    # output_padding recovers the rows and columns the strided conv dropped
    output_padding = (12 - ((y.shape[2] - 1) * 2 - top - bottom + 4),
                      11 - ((y.shape[3] - 1) * 2 - left - right + 4))
    forward = fastconv.conv_transpose2d(y, weight, None, 2, padding, output_padding,
                                        algorithm=algorithm)
    assert forward.shape == x.shape
    left_side = np.vdot(fastconv.conv2d(x, weight, None, 2, padding), y)
    assert abs(left_side - np.vdot(x, forward)) <= 1e-12 * abs(left_side)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_gradients_by_finite_differences(mode):
    rng = np.random.default_rng(11)
    x, weight, bias = _problem(rng, 2, 4, 5, 6, 4, 2, (3, 3), np.float64)
    args = dict(stride=(2, 1), padding=(2, 1, 1, 2), groups=2, padding_mode=mode)
    dy = rng.standard_normal(fastconv.conv2d(x, weight, bias, **args).shape)
    gx, gw, gb = fastconv.conv2d_backward(dy, x, weight, **args)

    def loss(x_, w_, b_):
        return np.vdot(fastconv.conv2d(x_, w_, b_, **args), dy)

    step = 1e-6
    for array, grad in ((x, gx), (weight, gw), (bias, gb)):
        numeric = np.empty_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + step
            up = loss(x, weight, bias)
            array[index] = saved - step
            down = loss(x, weight, bias)
            array[index] = saved
            numeric[index] = (up - down) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


# --- transposed convolution ------------------------------------------------------------

TRANSPOSED_GRID = [
    # stride, padding, output_padding, dilation, kernel
    (1, 0, 0, 1, (3, 3)),
    (2, 1, 1, 1, (3, 3)),
    (2, 1, 0, 1, (4, 4)),
    (3, 2, 2, 1, (3, 3)),
    (1, 1, 1, 2, (3, 3)),
    (2, 0, 1, 3, (2, 2)),
    ((2, 1), (1, 0), (1, 0), 1, (3, 2)),
    (2, 3, 0, 1, (5, 5)),
    # (top, bottom, left, right): each side cropped by its own amount
    (2, (1, 0, 2, 1), 1, 1, (3, 3)),
    ((1, 2), (0, 2, 1, 0), (0, 1), (2, 1), (3, 3)),
]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("C_in,C_out,groups", [(4, 6, 1), (4, 6, 2), (4, 4, 4)])
@pytest.mark.parametrize("stride,padding,output_padding,dilation,kernel", TRANSPOSED_GRID)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_grid(N, C_in, C_out, groups, stride, padding, output_padding, dilation,
                             kernel, bias, n_threads, dtype):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((N, C_in, 5, 6)).astype(dtype)
    weight = rng.standard_normal((C_in, C_out // groups, *kernel)).astype(dtype)
    b = rng.standard_normal(C_out).astype(dtype) if bias else None
    args = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                dilation=dilation)
    y_ref = reference.conv_transpose2d(x, weight, b, **args)
    y = fastconv.conv_transpose2d(x, weight, b, n_threads=n_threads, **args)
    Cg = C_in // groups
    assert_matches(y, y_ref, dtype, Cg * kernel[0] * kernel[1], "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    rx, rw, rb = reference.conv_transpose2d_backward(dy, x, weight, **args)
    gx, gw, gb = fastconv.conv_transpose2d_backward(dy, x, weight, bias=bias,
                                                    n_threads=n_threads, **args)
    assert_matches(gx, rx, dtype, C_out // groups * kernel[0] * kernel[1], "grad_x")
    assert_matches(gw, rw, dtype, N * 30, "grad_weight")
    if bias:
        assert_matches(gb, rb, dtype, dy[:, 0].size, "grad_bias")
    else:
        assert gb is None


@pytest.mark.parametrize("N", [1, 5])
def test_conv_transpose_many_tiles(monkeypatch, N, dtype):
    monkeypatch.setattr(_tiling, "COLUMN_TILE_BYTES", 1)
    monkeypatch.setattr(_tiling, "MIN_TILE_COLUMNS", 5)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((N, 6, 7, 5)).astype(dtype)
    weight = rng.standard_normal((6, 2, 4, 4)).astype(dtype)
    args = dict(stride=2, padding=1, groups=3)
    assert_matches(fastconv.conv_transpose2d(x, weight, None, n_threads=2, **args),
                   reference.conv_transpose2d(x, weight, None, **args), dtype, 32, "y")
    dy = rng.standard_normal((N, 6, 14, 10)).astype(dtype)
    for a, b, what in zip(fastconv.conv_transpose2d_backward(dy, x, weight, n_threads=2, **args),
                          reference.conv_transpose2d_backward(dy, x, weight, **args),
                          ["grad_x", "grad_weight", "grad_bias"]):
        assert_matches(a, b, dtype, N * 140, what)


@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("C_in,C_out,groups,kernel,stride,padding,output_padding", [
    (16, 8, 1, (3, 3), 2, 1, 1),        # 16 x 72 sums
    (32, 48, 2, (2, 3), 1, (1, 0), 0),  # 2 groups of 16 x 144
    (40, 64, 1, (1, 1), 1, 0, 0),       # a 32-row panel of x's and a tail of 8
])
def test_conv_transpose_weight_grad_by_the_own_kernel(monkeypatch, C_in, C_out, groups, kernel,
                                                      stride, padding, output_padding,
                                                      n_threads, gemm_kernel):
    """conv_transpose2d_backward's grad_weight with its sums transposed for the own GEMM
    kernel (x plays dY's part: its C_in/groups rows are the transposed panels)."""
    seen = spy_transposed_sums(monkeypatch)
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, C_in, 6, 7)).astype(np.float32)
    weight = rng.standard_normal((C_in, C_out // groups, *kernel)).astype(np.float32)
    args = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups)
    dy = rng.standard_normal(reference.conv_transpose2d(x, weight, **args).shape
                             ).astype(np.float32)
    grads = fastconv.conv_transpose2d_backward(dy, x, weight, algorithm="im2col",
                                               n_threads=n_threads, **args)
    assert seen == [gemm_kernel]
    for got, want, what, reduction in zip(
            grads, reference.conv_transpose2d_backward(dy, x, weight, **args),
            ["grad_x", "grad_weight", "grad_bias"],
            [C_out // groups * kernel[0] * kernel[1], 2 * 42, dy[:, 0].size]):
        assert_matches(got, want, np.float32, reduction, what)


#: Tile plans that take each branch of the transposed kernels: image groups (staged
#: planes), whole images, and channel blocks that cross a group boundary (C_out = 6,
#: groups 2: blocks of 2 channels)
TRANSPOSED_PLANS = {
    "images": lambda P, C: _tiling.TilePlan(2, P, C),
    "whole": lambda P, C: _tiling.TilePlan(1, P, C),
    "blocks": lambda P, C: _tiling.TilePlan(1, max(1, P // 2), 2),
}


def _transposed_problem(kernel, stride, padding, groups, dtype, N=3):
    rng = np.random.default_rng(17)
    C_in, C_out = 4, 6
    x = rng.standard_normal((N, C_in, 5, 4)).astype(dtype)
    weight = rng.standard_normal((C_in, C_out // groups, *kernel)).astype(dtype)
    geometry = transposed_geometry(x.shape, weight.shape, stride, padding, 0, groups, 1)
    dy = rng.standard_normal(geometry.input_shape).astype(dtype)
    return x, weight, dy, geometry


def _scratch(tiles, geometry, dtype, n_threads):
    K = geometry.C * geometry.KH * geometry.KW
    per_thread = tiles.workspace_per_thread(K, geometry.F, geometry.is_pointwise)
    return np.empty(n_threads * max(per_thread, 1), dtype)


TRANSPOSED_KERNEL_CASES = [((4, 4), 2, 1, 1), ((3, 3), 1, 1, 2), ((1, 1), 1, 0, 2),
                           ((1, 1), 1, 0, 1), ((2, 3), (2, 1), 0, 1)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("plan_kind", sorted(TRANSPOSED_PLANS))
@pytest.mark.parametrize("kernel,stride,padding,groups", TRANSPOSED_KERNEL_CASES)
def test_backward_input_transposed_weight(kernel, stride, padding, groups, plan_kind,
                                          n_threads, bias, dtype):
    """_conv.backward_input with the weight given as W_g.T and the planes started from the
    bias (conv_transpose2d's forward) equals the reference on every branch, pointwise and
    grouped included."""
    x, weight, _, geometry = _transposed_problem(kernel, stride, padding, groups, dtype)
    N, C_in = x.shape[:2]
    P = geometry.OH * geometry.OW
    tiles = TRANSPOSED_PLANS[plan_kind](P, geometry.C)
    w2d = weight.reshape(C_in, -1)
    Kg = w2d.shape[1]
    wt = np.full((groups * Kg, C_in // groups), np.nan, dtype)
    _conv.transpose_weight(w2d, wt, groups, n_threads)
    expected = np.concatenate([w2d[g * (C_in // groups):(g + 1) * (C_in // groups)].T
                               for g in range(groups)])
    np.testing.assert_array_equal(wt, expected)
    b = np.arange(1.0, geometry.C + 1, dtype=dtype) if bias else None
    y = np.full(geometry.input_shape, np.nan, dtype)
    _conv.backward_input(wt, x.reshape(N, C_in, -1), y, _scratch(tiles, geometry, dtype, n_threads),
                         geometry, tiles.images_per_tile, tiles.tile_p, tiles.c_block, n_threads,
                         transposed_weight=True, bias=b)
    args = dict(stride=stride, padding=padding, groups=groups)
    assert_matches(y, reference.conv_transpose2d(x, weight, b, **args), dtype,
                   C_in // groups * kernel[0] * kernel[1], "y")


def _weight_grad_problem(kernel, stride, padding, groups, plan_kind, n_threads, dtype):
    """A transposed layer's problem for ``_conv.backward_weight`` (x in dY's part): ``x,
    weight, dy, geometry``, the plan's tiles, the 2-D weight, x's planes and a scratch."""
    x, weight, dy, geometry = _transposed_problem(kernel, stride, padding, groups, dtype)
    tiles = TRANSPOSED_PLANS[plan_kind](geometry.OH * geometry.OW, geometry.C)
    w2d = weight.reshape(x.shape[1], -1)
    xc = x.reshape(x.shape[0], x.shape[1], -1)
    return x, weight, dy, geometry, tiles, w2d, xc, _scratch(tiles, geometry, dtype, n_threads)


@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("plan_kind", sorted(TRANSPOSED_PLANS))
@pytest.mark.parametrize("kernel,stride,padding,groups", TRANSPOSED_KERNEL_CASES)
def test_backward_weight_fused_forward(kernel, stride, padding, groups, plan_kind, n_threads,
                                       dtype):
    """_conv.backward_weight given w2d and y also writes conv2d(dy, w) from the same column
    tiles (conv_transpose2d_backward's grad_x), and its partial sums are unchanged."""
    x, weight, dy, geometry, tiles, w2d, xc, scratch = _weight_grad_problem(
        kernel, stride, padding, groups, plan_kind, n_threads, dtype)
    N, C_in = x.shape[:2]
    P = geometry.OH * geometry.OW
    Kg = w2d.shape[1]
    plain = np.empty((n_threads, C_in * Kg + C_in), dtype)
    _conv.backward_weight(dy, xc, plain, scratch, geometry, tiles.images_per_tile, tiles.tile_p,
                          n_threads)
    fused = np.full_like(plain, np.nan)
    y = np.full((N, C_in, P), np.nan, dtype)
    _conv.backward_weight(dy, xc, fused, scratch, geometry, tiles.images_per_tile, tiles.tile_p,
                          n_threads, w2d, y, with_sums=False)
    np.testing.assert_array_equal(fused[:, :C_in * Kg], plain[:, :C_in * Kg])
    assert not fused[:, C_in * Kg:].any()
    args = dict(stride=stride, padding=padding, groups=groups)
    assert_matches(y.reshape(x.shape), reference.conv2d(dy, weight, **args), dtype,
                   geometry.C // groups * kernel[0] * kernel[1], "grad_x")


@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("plan_kind", sorted(TRANSPOSED_PLANS))
@pytest.mark.parametrize("kernel,stride,padding,groups", TRANSPOSED_KERNEL_CASES)
def test_backward_weight_transposed_sums(kernel, stride, padding, groups, plan_kind, n_threads,
                                         dtype, gemm_kernel):
    """_conv.backward_weight's ``transposed_sums`` (each group's sums as (Kg, Fg), by the
    own kernel's gemm_nt where it runs, else BLAS), put back by reduce_rows with the
    groups: the same grad_weight, and the bias sums and fused output unchanged."""
    x, weight, dy, geometry, tiles, w2d, xc, scratch = _weight_grad_problem(
        kernel, stride, padding, groups, plan_kind, n_threads, dtype)
    N, C_in = x.shape[:2]
    P = geometry.OH * geometry.OW
    Kg = w2d.shape[1]
    results = []
    for transposed in (False, True):
        partial = np.full((n_threads, C_in * Kg + C_in), np.nan, dtype)
        y = np.full((N, C_in, P), np.nan, dtype)
        _conv.backward_weight(dy, xc, partial, scratch, geometry, tiles.images_per_tile,
                              tiles.tile_p, n_threads, w2d, y, transposed_sums=transposed)
        out = np.full(C_in * Kg + C_in, np.nan, dtype)
        _conv.reduce_rows(partial, out, n_threads,
                          *((groups, C_in // groups, Kg) if transposed else ()))
        results.append((out, y))
    (plain, y_plain), (transposed, y_transposed) = results
    assert_matches(transposed[:C_in * Kg], plain[:C_in * Kg].astype(np.float64), dtype,
                   N * P, "grad_weight")
    np.testing.assert_array_equal(transposed[C_in * Kg:], plain[C_in * Kg:])
    np.testing.assert_array_equal(y_transposed, y_plain)


def test_backward_weight_fused_needs_y():
    x, weight, dy, geometry = _transposed_problem((3, 3), 1, 1, 1, np.float64)
    tiles = TRANSPOSED_PLANS["whole"](geometry.OH * geometry.OW, geometry.C)
    with pytest.raises(ValueError, match="w2d given without y"):
        _conv.backward_weight(dy, x.reshape(3, 4, -1), np.empty((1, 4 * 54 + 4)),
                              _scratch(tiles, geometry, np.float64, 1), geometry, 1,
                              tiles.tile_p, 1, weight.reshape(4, -1), None)


@pytest.mark.parametrize("group_columns", [1, 40, 10**6])
@pytest.mark.parametrize("N,n_threads", [(1, 3), (5, 2), (8, 3)])
def test_conv_transpose_group_columns(monkeypatch, group_columns, N, n_threads, dtype):
    """Whatever TRANSPOSED_GROUP_COLUMNS allows (one image a tile, a few, plan()'s groups),
    forward and backward match the reference."""
    monkeypatch.setattr(_tiling, "TRANSPOSED_GROUP_COLUMNS", group_columns)
    rng = np.random.default_rng(18)
    x = rng.standard_normal((N, 6, 4, 5)).astype(dtype)
    weight = rng.standard_normal((6, 2, 4, 4)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    args = dict(stride=2, padding=1, groups=2)
    y = fastconv.conv_transpose2d(x, weight, b, n_threads=n_threads, **args)
    assert_matches(y, reference.conv_transpose2d(x, weight, b, **args), dtype, 48, "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    for a, r, what in zip(fastconv.conv_transpose2d_backward(dy, x, weight, n_threads=n_threads,
                                                             **args),
                          reference.conv_transpose2d_backward(dy, x, weight, **args),
                          ["grad_x", "grad_weight", "grad_bias"]):
        assert_matches(a, r, dtype, N * 80, what)


def test_conv_transpose_empty_batch():
    y = fastconv.conv_transpose2d(np.zeros((0, 4, 3, 3)), np.ones((4, 2, 3, 3)), np.ones(2),
                                  stride=2)
    assert y.shape == (0, 2, 7, 7)
    gx, gw, gb = fastconv.conv_transpose2d_backward(y, np.zeros((0, 4, 3, 3)),
                                                    np.ones((4, 2, 3, 3)), stride=2)
    assert gx.shape == (0, 4, 3, 3) and not gw.any() and not gb.any()


def test_conv_transpose_grad_x_is_conv2d():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 4, 5, 5))
    weight = rng.standard_normal((4, 3, 3, 3))
    dy = rng.standard_normal(fastconv.conv_transpose2d(x, weight, stride=2, padding=1).shape)
    gx = fastconv.conv_transpose2d_backward(dy, x, weight, stride=2, padding=1)[0]
    np.testing.assert_allclose(gx, fastconv.conv2d(dy, weight, stride=2, padding=1), rtol=1e-12)


# --- layers ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_conv2d_layer_with_every_parameter(layout, dtype):
    rng = np.random.default_rng(15)
    layer = fastconv.Conv2D(6, 12, 3, stride=2, padding="same", groups=3, bias=True,
                            padding_mode="circular", dtype=dtype, rng=1, layout=layout)
    x = rng.standard_normal((2, 6, 9, 8)).astype(dtype)
    args = dict(stride=2, padding="same", groups=3, padding_mode="circular")
    y = layer(_nhwc(x) if layout == "NHWC" else x)
    y_ref = reference.conv2d(x, layer.W, layer.b, **args)
    assert_matches(_nchw(y) if layout == "NHWC" else y, y_ref, dtype, 18, "forward")
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx = layer.backward(_nhwc(dy) if layout == "NHWC" else dy)
    rx, rw, rb = reference.conv2d_backward(dy, x, layer.W, **args)
    assert_matches(_nchw(dx) if layout == "NHWC" else dx, rx, dtype, 36, "dx")
    assert_matches(layer.dW, rw, dtype, 40, "dW")
    assert_matches(layer.db, rb, dtype, 40, "db")
    assert layer.in_channels == 6 and layer.W.shape == (12, 2, 3, 3)


def test_conv2d_layer_without_bias_has_no_db():
    layer = fastconv.Conv2D(4, 4, 3, groups=4, bias=False, rng=0)
    y = layer(np.ones((1, 4, 5, 5), np.float32))
    layer.backward(np.ones_like(y))
    assert layer.b is None and layer.db is None and layer.dW.shape == (4, 1, 3, 3)


def test_conv_transpose_layer(dtype):
    rng = np.random.default_rng(16)
    layer = fastconv.ConvTranspose2D(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                     dtype=dtype, rng=2)
    x = rng.standard_normal((2, 4, 5, 4)).astype(dtype)
    args = dict(stride=2, padding=1, output_padding=1, groups=2)
    y = layer(x)
    assert y.shape == (2, 6, 10, 8)
    assert_matches(y, reference.conv_transpose2d(x, layer.W, layer.b, **args), dtype, 18, "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    rx, rw, rb = reference.conv_transpose2d_backward(dy, x, layer.W, **args)
    assert_matches(dx, rx, dtype, 27, "dx")
    assert_matches(layer.dW, rw, dtype, 160, "dW")
    assert_matches(layer.db, rb, dtype, 160, "db")


@pytest.mark.parametrize("layer, text", [
    (lambda: fastconv.Conv2D(8, 16, 3, groups=8),
     "Conv2D(8, 16, kernel_size=(3, 3), groups=8)"),
    (lambda: fastconv.Conv2D(8, 16, 3, padding="same", padding_mode="reflect"),
     "Conv2D(8, 16, kernel_size=(3, 3), padding='same', padding_mode='reflect')"),
    (lambda: fastconv.Conv2D(8, 16, 3, padding="VALID"), "Conv2D(8, 16, kernel_size=(3, 3))"),
    (lambda: fastconv.Conv2D(8, 16, 3, padding="full", layout="NHWC", algorithm="im2col"),
     "Conv2D(8, 16, kernel_size=(3, 3), padding='full', layout='NHWC', algorithm='im2col')"),
    (lambda: fastconv.ConvTranspose2D(8, 4, 4), "ConvTranspose2D(8, 4, kernel_size=(4, 4))"),
    (lambda: fastconv.ConvTranspose2D(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2,
                                      bias=False, dilation=1, dtype=np.float64),
     "ConvTranspose2D(8, 4, kernel_size=(3, 3), stride=(2, 2), padding=1, output_padding=1, "
     "groups=2, bias=False, dtype=float64)"),
    (lambda: fastconv.ConvTranspose2D(8, 4, 4, stride=2, padding=(1, 2)),
     "ConvTranspose2D(8, 4, kernel_size=(4, 4), stride=(2, 2), padding=(1, 2))"),
    (lambda: fastconv.ConvTranspose2D(8, 4, 4, stride=2, padding=(1, 0, 1, 0)),
     "ConvTranspose2D(8, 4, kernel_size=(4, 4), stride=(2, 2), padding=(1, 0, 1, 0))"),
])
def test_repr(layer, text):
    assert repr(layer()) == text


# --- errors --------------------------------------------------------------------------

X = np.ones((2, 4, 5, 5))


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: fastconv.conv_transpose2d(X, np.ones((4, 2, 3, 3)), padding="same"),
                 ValueError, r"conv_transpose2d takes no string padding \(got padding='same'\)",
                 id="string-padding"),
    pytest.param(lambda: fastconv.conv_transpose2d(X, np.ones((4, 2, 3, 3)), stride=2,
                                                   output_padding=2),
                 ValueError, r"output_padding=\(2, 2\) must be smaller than max\(stride, "
                 r"dilation\) on each axis, got stride=\(2, 2\), dilation=\(1, 1\)",
                 id="output-padding-too-big"),
    pytest.param(lambda: fastconv.conv_transpose2d(X, np.ones((4, 2, 3, 3)), groups=3),
                 ValueError, r"groups=3 must divide the input channels C_in=4", id="groups"),
    pytest.param(lambda: fastconv.conv_transpose2d(X, np.ones((3, 2, 3, 3))),
                 ValueError, r"x has 4 channels but weight expects 3", id="channels"),
    pytest.param(lambda: fastconv.conv_transpose2d(X, np.ones((4, 2, 1, 1)), padding=3),
                 ValueError, r"output size would be -1x-1 \(< 1\)", id="output-empty"),
    pytest.param(lambda: fastconv.conv_transpose2d(X, np.ones((4, 2, 3, 3)), np.ones(4)),
                 ValueError, r"bias must have shape \(2,\)", id="bias"),
    pytest.param(lambda: fastconv.conv_transpose2d_backward(np.ones((2, 2, 5, 5)), X,
                                                            np.ones((4, 2, 3, 3))),
                 ValueError, r"grad_output must have the forward output's shape \(2, 2, 7, 7\)",
                 id="grad-output-shape"),
    pytest.param(lambda: fastconv.conv2d(X, np.ones((4, 2, 3, 3)), groups=2,
                                         algorithm="direct"),
                 ValueError, r"algorithm='direct' is the depthwise kernel \(groups == C, "
                 r"layout='NCHW'\) or the dense kernel \(groups == 1, its taps spanning at most "
                 r"2\*W \+ 64 padded columns per row\)", id="direct-not-depthwise"),
    pytest.param(lambda: fastconv.conv2d(np.ones((2, 5, 5, 4)), np.ones((4, 1, 3, 3)), groups=4,
                                         layout="NHWC", algorithm="direct"),
                 ValueError, r"layout='NCHW'\) or .* got groups=4, C=4, layout='NHWC'",
                 id="direct-nhwc-depthwise"),
    pytest.param(lambda: fastconv.conv2d(X, np.ones((4, 4, 3, 3)), layout="NHWC"),
                 ValueError, r"x has 5 channels but weight expects 4", id="nhwc-channels"),
    pytest.param(lambda: fastconv.conv2d(X, np.ones((4, 4, 3, 3)), padding=5,
                                         padding_mode="reflect"),
                 ValueError, r"padding_mode='reflect' needs each padding smaller than the input "
                 r"size: top padding 5 vs size 5", id="reflect"),
    pytest.param(lambda: fastconv.ConvTranspose2D(4, 2, 3, stride=2, output_padding=2),
                 ValueError, r"output_padding=\(2, 2\) must be smaller", id="layer-output-padding"),
    pytest.param(lambda: fastconv.ConvTranspose2D(4, 2, 3, padding="same"),
                 ValueError, r"takes no string padding", id="layer-string-padding"),
    pytest.param(lambda: fastconv.ConvTranspose2D(4, 2, 3, groups=4),
                 ValueError, r"groups=4 must be positive and divide in_channels=4 and "
                 r"out_channels=2", id="layer-groups"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
