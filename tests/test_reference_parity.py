"""Every convolution form of the NumPy reference against independent oracles.

``fastconv.reference`` is the oracle of the compiled kernels, so it is checked
here against things that share none of its code: the loop definitions in
``_naive`` (groups, padding strings, padding modes, transposed convolution),
central finite differences, the adjoint identity between ``conv2d`` and
``conv_transpose2d``, compositions of simpler calls (a grouped conv is the
per-group convs side by side, NHWC is NCHW transposed) and, when it is
installed, PyTorch. Shapes are tiny: the whole module runs in seconds.
"""

import itertools
import math
import pathlib
import sys
import zlib

import numpy as np
import pytest

# importlib mode keeps tests/ off sys.path; the loop oracles live next to this file.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _naive import naive_conv2d, naive_conv_transpose2d, numerical_gradients  # noqa: E402

from fastconv import reference  # noqa: E402

MODES = ["zeros", "reflect", "replicate", "circular"]
TIGHT = dict(rtol=1e-12, atol=1e-12)
FD = dict(rtol=1e-6, atol=1e-8)           # central differences with eps=1e-6 in float64


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pad4(p):
    if isinstance(p, int):
        return (p,) * 4
    if len(p) == 2:
        return (p[0], p[0], p[1], p[1])
    return tuple(p)


def _rng(*key):
    # crc32, not hash(): str hashes change from one interpreter run to the next.
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _problem(seed, N, C, hw, F, groups, kernel, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C) + tuple(hw)).astype(dtype)
    w = rng.standard_normal((F, C // groups) + tuple(kernel)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


def _transposed_problem(seed, N, C_in, hw, C_out, groups, kernel, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C_in) + tuple(hw)).astype(dtype)
    w = rng.standard_normal((C_in, C_out // groups) + tuple(kernel)).astype(dtype)
    b = rng.standard_normal(C_out).astype(dtype)
    return x, w, b


# --- the loop oracle itself -----------------------------------------------------

@pytest.mark.parametrize("mode, expected_row", [
    # one row [1, 2, 3] padded by 2 on each side
    ("zeros", [0, 0, 1, 2, 3, 0, 0]),
    ("reflect", [3, 2, 1, 2, 3, 2, 1]),
    ("replicate", [1, 1, 1, 2, 3, 3, 3]),
    ("circular", [2, 3, 1, 2, 3, 1, 2]),
])
def test_naive_padding_modes_by_hand(mode, expected_row):
    # A 1x1 identity kernel shows the padded input itself.
    x = np.array([[[[1.0, 2.0, 3.0]]]])
    y = naive_conv2d(x, np.ones((1, 1, 1, 1)), padding=(0, 0, 2, 2), padding_mode=mode)
    np.testing.assert_array_equal(y[0, 0, 0], expected_row)
    y = reference.conv2d(x, np.ones((1, 1, 1, 1)), padding=(0, 0, 2, 2), padding_mode=mode)
    np.testing.assert_array_equal(y[0, 0, 0], expected_row)


def test_naive_matches_numpy_pad_modes():
    # The two oracles build the border differently (index arithmetic vs np.pad).
    x = np.arange(20.0).reshape(1, 1, 4, 5)
    for mode, np_mode in zip(MODES, ["constant", "reflect", "edge", "wrap"]):
        y = naive_conv2d(x, np.ones((1, 1, 1, 1)), padding=(3, 2, 4, 1), padding_mode=mode)
        np.testing.assert_array_equal(y[0, 0], np.pad(x[0, 0], [(3, 2), (4, 1)], mode=np_mode))


def test_naive_transposed_by_hand():
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    y = naive_conv_transpose2d(x, np.ones((1, 1, 2, 2)))
    np.testing.assert_array_equal(y[0, 0], [[1, 3, 2], [4, 10, 6], [3, 7, 4]])


# --- conv2d: groups x padding forms x padding modes x stride x dilation ----------

# (C, F, groups): plain, two groups, depthwise, depthwise with multiplier 2
GROUPINGS = [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4)]
PADDINGS = [0, 1, (2, 1), (0, 2, 1, 2), "same", "valid", "full"]
GEOMETRIES = [
    # (hw, kernel, stride, dilation): odd/even kernels, non-square inputs
    ((5, 7), (3, 3), 1, 1),
    ((5, 7), (2, 3), 2, 1),
    ((6, 5), (3, 2), 3, 2),
    ((5, 6), (2, 2), (1, 2), (2, 1)),
    ((7, 5), (1, 3), (3, 1), 2),
]


def _ids(value):
    return str(value).replace(" ", "")


NAIVE_GRID = [
    pytest.param(C, F, groups, mode, padding, hw, kernel, stride, dilation,
                 id="-".join(_ids(v) for v in (C, F, groups, mode, padding, hw, kernel,
                                                 stride, dilation)))
    for (C, F, groups), mode, padding, (hw, kernel, stride, dilation)
    in itertools.product(GROUPINGS, MODES, PADDINGS, GEOMETRIES)
    # without a border every padding_mode is 'zeros'
    if mode == "zeros" or padding not in (0, "valid")
]


@pytest.mark.parametrize("C, F, groups, mode, padding, hw, kernel, stride, dilation", NAIVE_GRID)
def test_conv2d_matches_naive_grid(C, F, groups, mode, padding, hw, kernel, stride, dilation):
    x, w, b = _problem(0, 1, C, hw, F, groups, kernel)
    expected = naive_conv2d(x, w, b, stride, padding, dilation, groups, mode)
    got = reference.conv2d(x, w, b, stride, padding, dilation, groups, mode)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, **TIGHT)


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_gives_ceil_of_input_over_stride(stride, kernel, dilation):
    for H in (1, 2, 5, 7, 8):
        W = H + 3                                # non-square, a different remainder
        x, w, b = _problem(1, 1, 2, (H, W), 2, 1, (kernel, kernel))
        y = reference.conv2d(x, w, b, stride, "same", dilation)
        assert y.shape[2:] == (math.ceil(H / stride), math.ceil(W / stride))
        # ... with the padding split TensorFlow's way (the loop oracle finds it by search)
        np.testing.assert_allclose(y, naive_conv2d(x, w, b, stride, "same", dilation), **TIGHT)


@pytest.mark.parametrize("stride, kernel, dilation", [
    (2, (3, 3), 1),      # total 1 per axis: all of it bottom/right
    (1, (2, 4), 1),      # even kernels at stride 1: the odd pixel bottom/right too
    (3, (5, 5), 2),
])
def test_same_padding_explicitly(stride, kernel, dilation):
    H, W = 7, 8
    x, w, b = _problem(2, 1, 2, (H, W), 3, 1, kernel)
    pads = []
    for n, k in zip((H, W), kernel):
        out = -(-n // stride)
        total = max((out - 1) * stride + dilation * (k - 1) + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    np.testing.assert_array_equal(reference.conv2d(x, w, b, stride, "same", dilation),
                                  reference.conv2d(x, w, b, stride, tuple(pads), dilation))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel, dilation", [((3, 3), 1), ((2, 3), (2, 1)), ((1, 2), 2)])
def test_full_equals_explicit_padding(kernel, dilation, mode):
    x, w, b = _problem(3, 2, 2, (5, 6), 3, 1, kernel)
    dh, dw = _pair(dilation)
    explicit = (dh * (kernel[0] - 1), dw * (kernel[1] - 1))
    for s in (1, 2):
        np.testing.assert_array_equal(
            reference.conv2d(x, w, b, s, "full", dilation, padding_mode=mode),
            reference.conv2d(x, w, b, s, explicit, dilation, padding_mode=mode))
        dy = _rng("full", s).standard_normal(reference.conv2d(x, w, b, s, "full", dilation).shape)
        for a, e in zip(reference.conv2d_backward(dy, x, w, s, "full", dilation,
                                                  padding_mode=mode),
                        reference.conv2d_backward(dy, x, w, s, explicit, dilation,
                                                  padding_mode=mode)):
            np.testing.assert_array_equal(a, e)


def test_valid_is_no_padding_and_case_does_not_matter():
    x, w, b = _problem(4, 1, 2, (6, 5), 2, 1, (3, 2))
    np.testing.assert_array_equal(reference.conv2d(x, w, b, 2, "valid"),
                                  reference.conv2d(x, w, b, 2, 0))
    np.testing.assert_array_equal(reference.conv2d(x, w, b, 2, "VALID"),
                                  reference.conv2d(x, w, b, 2, 0))
    for upper, lower in (("SAME", "same"), ("Full", "full")):
        np.testing.assert_array_equal(reference.conv2d(x, w, b, 2, upper),
                                      reference.conv2d(x, w, b, 2, lower))


# --- conv2d gradients -------------------------------------------------------------

GRAD_CONFIGS = [
    # (N, C, F, groups, hw, kernel, stride, padding, dilation)
    pytest.param(1, 4, 4, 2, (5, 6), (3, 3), 1, 1, 1, id="groups2"),
    pytest.param(1, 4, 6, 2, (6, 5), (3, 2), 2, (2, 1, 1, 2), 1, id="groups2-stride2-asym"),
    pytest.param(1, 3, 6, 3, (5, 5), (2, 3), 2, "same", (2, 1), id="depthwise-x2-same-dilated"),
    pytest.param(2, 2, 3, 1, (4, 5), (2, 2), 1, "full", 1, id="full"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N, C, F, groups, hw, kernel, stride, padding, dilation", GRAD_CONFIGS)
def test_conv2d_backward_matches_finite_differences(N, C, F, groups, hw, kernel, stride,
                                                    padding, dilation, mode):
    x, w, b = _problem(5, N, C, hw, F, groups, kernel)
    args = (stride, padding, dilation, groups, mode)
    dy = _rng("fd", mode).standard_normal(reference.conv2d(x, w, b, *args).shape)
    gx, gw, gb = reference.conv2d_backward(dy, x, w, *args)
    nx, nw, nb = numerical_gradients(x, w, b, dy, stride, padding, dilation,
                                     groups=groups, padding_mode=mode)
    assert (gx.shape, gw.shape, gb.shape) == (x.shape, w.shape, b.shape)
    np.testing.assert_allclose(gx, nx, **FD)
    np.testing.assert_allclose(gw, nw, **FD)
    np.testing.assert_allclose(gb, nb, **FD)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_border_gradient_lands_on_the_copied_pixels(mode):
    # One row [a, b, c], a 1x1 kernel and 2 border pixels each side: the
    # gradient of each output position lands on the pixel it copied.
    x = np.array([[[[1.0, 2.0, 3.0]]]])
    dy = np.arange(1.0, 8.0).reshape(1, 1, 1, 7)        # one weight per padded position
    gx = reference.conv2d_backward(dy, x, np.ones((1, 1, 1, 1)), padding=(0, 0, 2, 2),
                                   padding_mode=mode)[0]
    source = {"reflect": [2, 1, 0, 1, 2, 1, 0], "replicate": [0, 0, 0, 1, 2, 2, 2],
              "circular": [1, 2, 0, 1, 2, 0, 1]}[mode]
    expected = np.zeros(3)
    for position, s in enumerate(source):
        expected[s] += dy[0, 0, 0, position]
    np.testing.assert_array_equal(gx[0, 0, 0], expected)


# --- groups, depthwise and layouts as compositions --------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("C, F, groups", GROUPINGS[1:], ids=_ids)
def test_grouped_is_per_group_convs_side_by_side(C, F, groups, mode):
    x, w, b = _problem(6, 2, C, (6, 5), F, groups, (3, 2))
    args = dict(stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2), padding_mode=mode)
    Cg, Fg = C // groups, F // groups
    y = reference.conv2d(x, w, b, groups=groups, **args)
    parts = [reference.conv2d(x[:, g * Cg:(g + 1) * Cg], w[g * Fg:(g + 1) * Fg],
                              b[g * Fg:(g + 1) * Fg], **args) for g in range(groups)]
    np.testing.assert_allclose(y, np.concatenate(parts, axis=1), **TIGHT)

    dy = _rng("groups", mode, groups).standard_normal(y.shape)
    gx, gw, gb = reference.conv2d_backward(dy, x, w, groups=groups, **args)
    parts = [reference.conv2d_backward(dy[:, g * Fg:(g + 1) * Fg], x[:, g * Cg:(g + 1) * Cg],
                                       w[g * Fg:(g + 1) * Fg], **args) for g in range(groups)]
    for got, i in ((gx, 0), (gw, 1), (gb, 2)):
        np.testing.assert_allclose(got, np.concatenate([p[i] for p in parts],
                                                       axis=1 if i == 0 else 0), **TIGHT)


def test_depthwise_is_each_channel_with_its_own_kernel():
    x, w, b = _problem(7, 2, 3, (5, 6), 3, 3, (3, 3))
    y = reference.conv2d(x, w, b, padding=1, groups=3)
    for c in range(3):
        y_c = reference.conv2d(x[:, c:c + 1], w[c:c + 1], b[c:c + 1], padding=1)
        np.testing.assert_allclose(y[:, c:c + 1], y_c, **TIGHT)


def test_one_group_of_everything_is_a_dense_conv():
    # groups=1 with the weight of a dense conv is the dense conv (the default).
    x, w, b = _problem(8, 2, 4, (5, 5), 3, 1, (3, 3))
    np.testing.assert_array_equal(reference.conv2d(x, w, b, 1, 1, 1, 1),
                                  reference.conv2d(x, w, b, 1, 1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding, groups", [(1, 1), ("same", 2), ((0, 1, 2, 1), 4)])
def test_nhwc_is_nchw_transposed(padding, groups, mode):
    x, w, b = _problem(9, 2, 4, (5, 6), 4, groups, (3, 2))
    args = (2, padding, (1, 2), groups, mode)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y = reference.conv2d(x, w, b, *args)
    y_nhwc = reference.conv2d(x_nhwc, w, b, *args, layout="NHWC")
    # allclose, not equal: sums over a different memory order round differently
    np.testing.assert_allclose(y_nhwc, y.transpose(0, 2, 3, 1), **TIGHT)
    assert y_nhwc.flags.c_contiguous

    dy = _rng("nhwc", mode).standard_normal(y.shape)
    gx, gw, gb = reference.conv2d_backward(dy, x, w, *args)
    hx, hw, hb = reference.conv2d_backward(np.ascontiguousarray(dy.transpose(0, 2, 3, 1)),
                                           x_nhwc, w, *args, layout="NHWC")
    np.testing.assert_allclose(hx, gx.transpose(0, 2, 3, 1), **TIGHT)
    assert hx.flags.c_contiguous
    np.testing.assert_allclose(hw, gw, **TIGHT)
    np.testing.assert_allclose(hb, gb, **TIGHT)


# --- transposed convolution -------------------------------------------------------

TRANSPOSED_GRID = [
    # (C_in, C_out, groups, hw, kernel, stride, padding, output_padding, dilation)
    pytest.param(2, 3, 1, (3, 4), (3, 3), 1, 0, 0, 1, id="plain"),
    pytest.param(2, 3, 1, (3, 4), (4, 4), 2, 1, 0, 1, id="4x4-s2-p1"),
    pytest.param(2, 3, 1, (3, 4), (3, 3), 2, 1, 1, 1, id="s2-p1-op1"),
    pytest.param(4, 6, 2, (3, 3), (2, 3), (3, 2), (1, 2), (2, 1), 1, id="groups2-op"),
    pytest.param(4, 4, 4, (4, 3), (3, 3), 2, (2, 0, 1, 1), (1, 0), (1, 2), id="depthwise-asym"),
    pytest.param(4, 8, 4, (3, 3), (3, 2), 1, 1, 0, 2, id="depthwise-x2-dilated"),
    # output_padding may reach max(stride, dilation) - 1 > stride - 1
    pytest.param(2, 2, 1, (3, 3), (3, 3), 1, 1, (1, 2), 3, id="op-ge-stride"),
    pytest.param(2, 4, 2, (2, 3), (5, 4), (2, 3), 0, (1, 2), (3, 1), id="even-odd-mix"),
]


@pytest.mark.parametrize("C_in, C_out, groups, hw, kernel, stride, padding, output_padding, "
                         "dilation", TRANSPOSED_GRID)
def test_conv_transpose2d_matches_naive(C_in, C_out, groups, hw, kernel, stride, padding,
                                        output_padding, dilation):
    x, w, b = _transposed_problem(10, 2, C_in, hw, C_out, groups, kernel)
    args = (stride, padding, output_padding, groups, dilation)
    expected = naive_conv_transpose2d(x, w, b, *args)
    got = reference.conv_transpose2d(x, w, b, *args)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, **TIGHT)


@pytest.mark.parametrize("C_in, C_out, groups, hw, kernel, stride, padding, output_padding, "
                         "dilation", TRANSPOSED_GRID)
def test_conv_transpose2d_backward_matches_finite_differences(
        C_in, C_out, groups, hw, kernel, stride, padding, output_padding, dilation):
    x, w, b = _transposed_problem(11, 1, C_in, hw, C_out, groups, kernel)
    args = (stride, padding, output_padding, groups, dilation)
    dy = _rng("tfd", C_in, hw).standard_normal(reference.conv_transpose2d(x, w, b, *args).shape)
    gx, gw, gb = reference.conv_transpose2d_backward(dy, x, w, *args)
    nx, nw, nb = numerical_gradients(x, w, b, dy, stride, padding, dilation,
                                     forward=reference.conv_transpose2d,
                                     output_padding=output_padding, groups=groups)
    assert (gx.shape, gw.shape, gb.shape) == (x.shape, w.shape, b.shape)
    np.testing.assert_allclose(gx, nx, **FD)
    np.testing.assert_allclose(gw, nw, **FD)
    np.testing.assert_allclose(gb, nb, **FD)
    np.testing.assert_allclose(gb, dy.sum(axis=(0, 2, 3)), **TIGHT)


@pytest.mark.parametrize("C_in, C_out, groups, hw, kernel, stride, padding, output_padding, "
                         "dilation", TRANSPOSED_GRID)
def test_transposed_input_grad_is_conv2d(C_in, C_out, groups, hw, kernel, stride, padding,
                                         output_padding, dilation):
    x, w, _ = _transposed_problem(12, 2, C_in, hw, C_out, groups, kernel)
    args = (stride, padding, output_padding, groups, dilation)
    dy = _rng("tgx", C_in, hw).standard_normal(reference.conv_transpose2d(x, w, None, *args).shape)
    gx = reference.conv_transpose2d_backward(dy, x, w, *args)[0]
    y = reference.conv2d(dy, w, None, stride, padding, dilation, groups)
    # With output_padding >= stride (allowed when dilation > stride) the conv
    # has windows past the H x W the transposed conv came from; they are not x's.
    np.testing.assert_allclose(gx, y[:, :, :hw[0], :hw[1]], **TIGHT)
    if all(op < s for op, s in zip(_pair(output_padding), _pair(stride))):
        assert y.shape == gx.shape


@pytest.mark.parametrize("stride, padding, dilation", list(itertools.product(
    [1, 2, 3, (2, 1)], [0, 1, (1, 2), (0, 2, 1, 1)], [1, 2])), ids=_ids)
@pytest.mark.parametrize("hw, kernel", [((7, 6), (3, 3)), ((6, 8), (2, 3))], ids=_ids)
def test_conv_transpose2d_is_the_adjoint_of_conv2d(hw, kernel, stride, padding, dilation):
    # output_padding makes the transposed conv's output exactly u's size.
    top, bottom, left, right = _pad4(padding)
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    op = ((hw[0] + top + bottom - dh * (kernel[0] - 1) - 1) % sh,
          (hw[1] + left + right - dw * (kernel[1] - 1) - 1) % sw)
    for C, F, groups in [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4)]:
        rng = _rng("adjoint", hw, kernel, stride, padding, dilation, groups, F)
        u = rng.standard_normal((2, C) + hw)
        w = rng.standard_normal((F, C // groups) + kernel)
        conv_u = reference.conv2d(u, w, None, stride, padding, dilation, groups)
        y = rng.standard_normal(conv_u.shape)
        t_y = reference.conv_transpose2d(y, w, None, stride, padding, op, groups, dilation)
        assert t_y.shape == u.shape
        lhs, rhs = np.vdot(conv_u, y), np.vdot(u, t_y)
        # relative to the size of the terms summed (lhs itself may cancel to ~0)
        assert abs(lhs - rhs) <= 1e-12 * np.vdot(np.abs(conv_u), np.abs(y)), (C, F, groups)


def test_conv_transpose2d_is_conv2d_input_gradient():
    # Same map, two code paths: the forward's scatter and conv2d_backward's col2im.
    x, w, _ = _problem(13, 2, 4, (7, 6), 6, 2, (3, 2))
    args = dict(stride=2, padding=(1, 0, 2, 1), dilation=(1, 2), groups=2)
    y = reference.conv2d(x, w, None, **args)
    dy = _rng("tcb").standard_normal(y.shape)
    gx = reference.conv2d_backward(dy, x, w, **args)[0]
    op = tuple(x.shape[2 + a] - reference.conv_transpose2d(dy, w, **args).shape[2 + a]
               for a in (0, 1))
    np.testing.assert_allclose(reference.conv_transpose2d(dy, w, None, output_padding=op, **args),
                               gx, **TIGHT)


# --- dtypes and inputs --------------------------------------------------------------

def test_float32_in_float32_out():
    x, w, b = _problem(14, 2, 4, (6, 5), 4, 2, (3, 2), dtype=np.float32)
    kw = dict(stride=(1, 2), padding="same", dilation=(2, 1), groups=2, padding_mode="reflect")
    y = reference.conv2d(x, w, b.astype(np.float64), **kw)   # a float64 bias does not promote
    assert y.dtype == np.float32
    y64 = reference.conv2d(x.astype(np.float64), w.astype(np.float64), b, **kw)
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)
    grads = reference.conv2d_backward(np.ones_like(y), x, w, **kw)
    assert [g.dtype for g in grads] == [np.float32] * 3

    xt, wt, bt = _transposed_problem(15, 2, 4, (3, 4), 6, 2, (4, 4), dtype=np.float32)
    t = reference.conv_transpose2d(xt, wt, bt.astype(np.float64), 2, 1, 1, 2)
    assert t.dtype == np.float32
    t64 = reference.conv_transpose2d(xt.astype(np.float64), wt.astype(np.float64), bt, 2, 1, 1, 2)
    np.testing.assert_allclose(t, t64, rtol=1e-5, atol=1e-5)
    grads = reference.conv_transpose2d_backward(np.ones_like(t), xt, wt, 2, 1, 1, 2)
    assert [g.dtype for g in grads] == [np.float32] * 3


def test_read_only_inputs_unchanged():
    x, w, b = _problem(16, 2, 4, (5, 6), 4, 2, (3, 2))
    xt, wt, bt = _transposed_problem(17, 2, 4, (3, 4), 6, 2, (3, 3))
    dy = _rng("ro").standard_normal(reference.conv2d(x, w, b, 2, 1, groups=2).shape)
    dyt = _rng("rot").standard_normal(reference.conv_transpose2d(xt, wt, bt, 2, 1, 1, 2).shape)
    arrays = (x, w, b, xt, wt, bt, dy, dyt)
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.setflags(write=False)
    for mode in MODES:
        reference.conv2d(x, w, b, 2, 1, groups=2, padding_mode=mode)
        reference.conv2d_backward(dy, x, w, 2, 1, groups=2, padding_mode=mode)
    reference.conv_transpose2d(xt, wt, bt, 2, 1, 1, 2)
    reference.conv_transpose2d_backward(dyt, xt, wt, 2, 1, 1, 2)
    for a, a0 in zip(arrays, copies):
        np.testing.assert_array_equal(a, a0)


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode):
    x, w, _ = _problem(18, 0, 4, (5, 5), 4, 2, (3, 3))
    y = reference.conv2d(x, w, None, 1, 1, groups=2, padding_mode=mode)
    assert y.shape == (0, 4, 5, 5)
    gx, gw, gb = reference.conv2d_backward(y, x, w, 1, 1, groups=2, padding_mode=mode)
    assert (gx.shape, gw.shape, gb.shape) == (x.shape, w.shape, (4,))
    assert not gw.any() and not gb.any()
    t = reference.conv_transpose2d(x, w, None, 2, 1, groups=2)
    assert t.shape == (0, 4, 9, 9)
    assert reference.conv_transpose2d_backward(t, x, w, 2, 1, groups=2)[0].shape == x.shape


# --- PyTorch, when it is installed ---------------------------------------------------

TORCH_TOL = dict(rtol=1e-10, atol=1e-10)


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("C, F, groups", GROUPINGS, ids=_ids)
@pytest.mark.parametrize("stride, padding, dilation", [
    (1, 0, 1), (2, 1, 1), ((1, 3), (2, 1), (2, 1)), (1, "same", 2), (1, "valid", 1),
    ((2, 1), (0, 2), 2),
], ids=_ids)
def test_conv2d_matches_torch(C, F, groups, stride, padding, dilation):
    torch = _torch()
    x, w, b = _problem(19, 2, C, (7, 6), F, groups, (3, 2))
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride, padding, dilation, groups)
    y = reference.conv2d(x, w, b, stride, padding, dilation, groups)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TORCH_TOL)
    dy = _rng("torch", C, F, groups).standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    for got, want in zip(reference.conv2d_backward(dy, x, w, stride, padding, dilation, groups),
                         (xt.grad, wt.grad, bt.grad)):
        np.testing.assert_allclose(got, want.numpy(), **TORCH_TOL)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("groups, kernel, stride, padding, dilation", [
    (1, (3, 3), 1, 1, 1),
    (2, (3, 2), 2, (2, 1), (1, 2)),
    (4, (2, 2), 1, "same", (1, 2)),          # torch has 'same' for stride 1 only
    (4, (3, 3), 1, (4, 4), 2),              # reflect up to size - 1, circular up to size
], ids=_ids)
def test_padding_modes_match_torch_nn_conv2d(mode, groups, kernel, stride, padding, dilation):
    torch = _torch()
    H, W = 5, 6
    if padding == (4, 4) and mode == "circular":
        padding = (5, 5)
    x, w, b = _problem(20, 2, 4, (H, W), 8, groups, kernel)
    conv = torch.nn.Conv2d(4, 8, kernel, stride, padding, dilation, groups, padding_mode=mode,
                           dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w))
        conv.bias.copy_(torch.tensor(b))
    xt = torch.tensor(x, requires_grad=True)
    yt = conv(xt)
    y = reference.conv2d(x, w, b, stride, padding, dilation, groups, mode)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TORCH_TOL)
    dy = _rng("torch-mode", mode).standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    for got, want in zip(reference.conv2d_backward(dy, x, w, stride, padding, dilation, groups,
                                                   mode),
                         (xt.grad, conv.weight.grad, conv.bias.grad)):
        np.testing.assert_allclose(got, want.numpy(), **TORCH_TOL)


@pytest.mark.parametrize("C_in, C_out, groups, hw, kernel, stride, padding, output_padding, "
                         "dilation", [p for p in TRANSPOSED_GRID if "asym" not in p.id])
def test_conv_transpose2d_matches_torch(C_in, C_out, groups, hw, kernel, stride, padding,
                                        output_padding, dilation):
    torch = _torch()
    x, w, b = _transposed_problem(21, 2, C_in, hw, C_out, groups, kernel)
    args = (stride, padding, output_padding, groups, dilation)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.conv_transpose2d(xt, wt, bt, *args)
    y = reference.conv_transpose2d(x, w, b, *args)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TORCH_TOL)
    dy = _rng("torch-t", C_in, hw).standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    for got, want in zip(reference.conv_transpose2d_backward(dy, x, w, *args),
                         (xt.grad, wt.grad, bt.grad)):
        np.testing.assert_allclose(got, want.numpy(), **TORCH_TOL)


# --- errors -------------------------------------------------------------------------

CONV_ERRORS = {
    "groups-not-dividing-C": (dict(x=(1, 4, 5, 5), w=(6, 2, 3, 3), groups=3),
                              r"groups=3 must .* divide .* C=4 and the filters F=6"),
    "groups-not-dividing-F": (dict(x=(1, 4, 5, 5), w=(3, 2, 3, 3), groups=2),
                              r"groups=2 must .* F=3"),
    "groups-zero": (dict(x=(1, 4, 5, 5), w=(4, 4, 3, 3), groups=0), r"groups=0 must be positive"),
    "weight-channels-vs-groups": (dict(x=(1, 4, 5, 5), w=(4, 1, 3, 3), groups=2),
                                  r"x has 4 channels but weight expects groups \* C/groups = "
                                  r"2 \* 1 = 2"),
    "unknown-padding-mode": (dict(padding_mode="mirror"),
                             r"padding_mode must be one of .*'circular', got 'mirror'"),
    "reflect-pad-equal-to-size": (dict(x=(1, 2, 3, 6), padding=(3, 1), padding_mode="reflect"),
                                  r"padding_mode='reflect' needs each padding smaller than the "
                                  r"input size: top padding 3 vs size 3"),
    "reflect-full-too-wide": (dict(x=(1, 1, 4, 4), w=(1, 1, 5, 5), padding="full",
                                   padding_mode="reflect"), r"top padding 4 vs size 4"),
    "circular-pad-over-size": (dict(x=(1, 2, 6, 3), padding=(0, 0, 0, 4),
                                    padding_mode="circular"),
                               r"'circular' needs each padding at most the input size: right "
                               r"padding 4 vs size 3"),
    "unknown-padding-string": (dict(padding="half"), r"padding='half' is not one of"),
    "unknown-layout": (dict(layout="CHWN"), r"layout must be 'NCHW' or 'NHWC', got 'CHWN'"),
    "3d-input": (dict(x=(4, 5, 5)), r"x must be 4-D NCHW, got shape \(4, 5, 5\)"),
    "empty-output": (dict(x=(1, 1, 2, 2), w=(1, 1, 3, 3)), r"output size would be 0x0"),
}


@pytest.mark.parametrize("spec, match", list(CONV_ERRORS.values()), ids=list(CONV_ERRORS))
def test_conv2d_errors(spec, match):
    spec = dict(spec)
    x = np.ones(spec.pop("x", (1, 2, 5, 5)))
    w = np.ones(spec.pop("w", (2, 2, 3, 3)))
    with pytest.raises(ValueError, match=match):
        reference.conv2d(x, w, **spec)
    if x.ndim == 4 and "layout" not in spec:
        # the backward checks the same arguments (grad_output's shape aside)
        with pytest.raises(ValueError, match=match):
            reference.conv2d_backward(np.ones((1, w.shape[0], 3, 3)), x, w, **spec)


def test_conv2d_backward_wrong_grad_output_shape():
    with pytest.raises(ValueError, match=r"grad_output has shape \(1, 4, 5, 5\) but the forward "
                                         r"output has shape \(1, 4, 3, 3\)"):
        reference.conv2d_backward(np.ones((1, 4, 5, 5)), np.ones((1, 4, 5, 5)),
                                  np.ones((4, 2, 3, 3)), groups=2)


TRANSPOSED_ERRORS = {
    "output-padding-ge-stride": (dict(stride=2, output_padding=2),
                                 r"output_padding=\(2, 2\) must be .* smaller than "
                                 r"max\(stride, dilation\) .*stride=\(2, 2\), "
                                 r"dilation=\(1, 1\)"),
    "output-padding-ge-dilation": (dict(stride=1, dilation=(2, 3), output_padding=(1, 3)),
                                   r"output_padding=\(1, 3\) must .* dilation=\(2, 3\)"),
    "output-padding-stride-1": (dict(output_padding=1), r"output_padding=\(1, 1\)"),
    "negative-output-padding": (dict(output_padding=-1), r"must be non-negative"),
    "string-padding": (dict(padding="same"), r"padding='same': conv_transpose2d takes an int"),
    "groups-not-dividing-C_in": (dict(groups=3), r"groups=3 must be positive and divide the "
                                                 r"input channels C_in=4"),
    "channel-mismatch": (dict(w=(2, 3, 3, 3)), r"x has 4 channels but weight expects 2"),
    "padding-crops-everything": (dict(x=(1, 4, 1, 1), w=(4, 3, 1, 1), padding=1),
                                 r"output size would be -1x-1"),
}


@pytest.mark.parametrize("spec, match", list(TRANSPOSED_ERRORS.values()),
                         ids=list(TRANSPOSED_ERRORS))
def test_conv_transpose2d_errors(spec, match):
    spec = dict(spec)
    x = np.ones(spec.pop("x", (1, 4, 3, 3)))
    w = np.ones(spec.pop("w", (4, 3, 3, 3)))
    with pytest.raises(ValueError, match=match):
        reference.conv_transpose2d(x, w, **spec)
    with pytest.raises(ValueError, match=match):
        reference.conv_transpose2d_backward(np.ones((1, 3, 5, 5)), x, w, **spec)


def test_conv_transpose2d_backward_wrong_grad_output_shape():
    with pytest.raises(ValueError, match=r"grad_output has shape \(1, 3, 5, 5\) but the forward "
                                         r"output has shape \(1, 3, 6, 6\)"):
        reference.conv_transpose2d_backward(np.ones((1, 3, 5, 5)), np.ones((1, 4, 3, 3)),
                                            np.ones((4, 3, 2, 2)), stride=2)
