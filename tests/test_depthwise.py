"""The direct depthwise kernels (fastconv._depthwise) against a per-channel NumPy oracle.

``fastconv.reference`` has no groups, so the oracle runs it once per input
channel c on the m filters ``c*m .. c*m + m - 1``. The non-zero padding modes
are ``np.pad`` followed by an unpadded convolution; their input gradient is
the padded-input gradient folded back onto the pixels each padded pixel copies
(``np.add.at`` over the index maps that ``np.pad`` of ``arange`` gives).
Finite differences check the gradients of one small float64 case per mode
independently of the oracle.

The kernels get read-only inputs and NaN-filled outputs, so every test also
checks that the inputs are left alone and that every output element is written.
"""

import itertools
import zlib

import numpy as np
import pytest

from _helpers import assert_matches, relative_error
from fastconv import _depthwise, _depthwise_kernels, reference
from fastconv._validation import conv_geometry

MODES = ("zeros", "reflect", "replicate", "circular")
NUMPY_PAD_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


# ---------------------------------------------------------------------------
# The kernels behind a small wrapper (geometry, allocation).


@pytest.fixture(autouse=True, params=_depthwise_kernels.available(),
                ids=lambda module: module.__name__.rsplit(".", 1)[-1])
def kernels(request, monkeypatch):
    """Every test runs each build of the kernels this CPU runs (baseline, x86-64-v3)."""
    monkeypatch.setitem(globals(), "_depthwise", request.param)
    return request.param


def test_the_x86_64_v3_build_runs_where_the_cpu_has_avx2_and_fma():
    """fastconv uses the x86-64-v3 build exactly where the CPU runs it (Linux x86-64)."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    v3 = {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"} <= set(flags)
    assert _depthwise.cpu_runs_x86_64_v3() == v3
    expected = "fastconv._depthwise_avx2" if v3 else "fastconv._depthwise"
    assert _depthwise_kernels.kernels.__name__ == expected


def geometry_of(x, weight, stride, padding, dilation, mode):
    return conv_geometry(x.shape, weight.shape, stride, padding, dilation, groups=x.shape[1],
                         padding_mode=mode, string_padding=True)


def readonly(a):
    """A read-only view (the kernels take const memoryviews); the caller's array keeps
    its flags."""
    a = np.ascontiguousarray(a).view()
    a.setflags(write=False)
    return a


def dw_forward(x, weight, bias, stride, padding, dilation, mode, n_threads):
    g = geometry_of(x, weight, stride, padding, dilation, mode)
    y = np.full(g.output_shape, np.nan, dtype=x.dtype)
    w2 = readonly(weight.reshape(g.F, g.KH * g.KW))
    _depthwise.forward(readonly(x), w2, None if bias is None else readonly(bias), y, g,
                       n_threads)
    return y


def dw_backward(dy, x, weight, with_bias, stride, padding, dilation, mode, n_threads):
    g = geometry_of(x, weight, stride, padding, dilation, mode)
    w2 = readonly(weight.reshape(g.F, g.KH * g.KW))
    dx = np.full(x.shape, np.nan, dtype=x.dtype)
    dw = np.full((g.F, g.KH * g.KW), np.nan, dtype=x.dtype)
    db = np.full(g.F, np.nan, dtype=x.dtype) if with_bias else None
    _depthwise.backward(readonly(x), w2, readonly(dy), dx, dw, db, g, n_threads)
    return dx, dw.reshape(weight.shape), db


# ---------------------------------------------------------------------------
# The per-channel oracle.


def pads_of(g):
    return g.pad_top, g.pad_bottom, g.pad_left, g.pad_right


def pad_input(x, g):
    """(x to convolve, padding to hand to reference): np.pad for the non-zero modes."""
    top, bottom, left, right = pads_of(g)
    if g.padding_mode == "zeros":
        return x, (top, bottom, left, right)
    spec = [(0, 0), (0, 0), (top, bottom), (left, right)]
    return np.pad(x, spec, mode=NUMPY_PAD_MODE[g.padding_mode]), 0


def fold_padded_grad(gxp, g):
    """The gradient w.r.t. the unpadded input: each padded pixel's gradient goes to the pixel
    it copies."""
    if g.padding_mode == "zeros":
        return gxp
    top, bottom, left, right = pads_of(g)
    mode = NUMPY_PAD_MODE[g.padding_mode]
    rows = np.pad(np.arange(g.H), (top, bottom), mode=mode)
    cols = np.pad(np.arange(g.W), (left, right), mode=mode)
    gx = np.zeros(gxp.shape[:2] + (g.H, g.W), dtype=gxp.dtype)
    np.add.at(gx, (slice(None), slice(None), rows[:, None], cols[None, :]), gxp)
    return gx


def oracle_forward(x, weight, bias, g):
    m = g.F // g.C
    xp, padding = pad_input(x, g)
    stride, dilation = (g.stride_h, g.stride_w), (g.dilation_h, g.dilation_w)
    return np.concatenate([
        reference.conv2d(xp[:, c:c + 1], weight[c * m:(c + 1) * m],
                         None if bias is None else bias[c * m:(c + 1) * m],
                         stride, padding, dilation)
        for c in range(g.C)], axis=1)


def oracle_backward(dy, x, weight, g):
    m = g.F // g.C
    xp, padding = pad_input(x, g)
    stride, dilation = (g.stride_h, g.stride_w), (g.dilation_h, g.dilation_w)
    parts = [reference.conv2d_backward(dy[:, c * m:(c + 1) * m], xp[:, c:c + 1],
                                       weight[c * m:(c + 1) * m], stride, padding, dilation)
             for c in range(g.C)]
    gx = fold_padded_grad(np.concatenate([p[0] for p in parts], axis=1), g)
    gw = np.concatenate([p[1] for p in parts], axis=0)
    gb = np.concatenate([p[2] for p in parts], axis=0)
    return gx, gw, gb


def check(actual, expected, dtype, reduction_length, what):
    """assert_matches, and float64 to ~1e-12 relative (the kernels sum the oracle's terms in
    another order, nothing more)."""
    assert_matches(actual, expected, dtype, reduction_length, what)
    if np.dtype(dtype) == np.float64:
        assert relative_error(actual, expected) <= 1e-12, what


def run_case(rng, dtype, N, C, m, H, W, KH, KW, stride, padding, dilation, mode, with_bias,
             n_threads):
    F = m * C
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    weight = rng.standard_normal((F, 1, KH, KW)).astype(dtype)
    bias = rng.standard_normal(F).astype(dtype) if with_bias else None
    g = geometry_of(x, weight, stride, padding, dilation, mode)
    dy = rng.standard_normal(g.output_shape).astype(dtype)
    saved = [a.copy() for a in (x, weight, dy)]

    y = dw_forward(x, weight, bias, stride, padding, dilation, mode, n_threads)
    check(y, oracle_forward(x, weight, bias, g), dtype, KH * KW, "y")

    dx, dw, db = dw_backward(dy, x, weight, with_bias, stride, padding, dilation, mode,
                             n_threads)
    gx, gw, gb = oracle_backward(dy, x, weight, g)
    check(dx, gx, dtype, m * KH * KW, "grad_x")
    check(dw, gw, dtype, N * g.OH * g.OW, "grad_weight")
    if with_bias:
        check(db, gb, dtype, N * g.OH * g.OW, "grad_bias")
    for before, after in zip(saved, (x, weight, dy)):
        np.testing.assert_array_equal(before, after)
    return g


# ---------------------------------------------------------------------------
# The grid: kernel x stride x dilation, each with its own plane and padding, crossed with
# every padding mode and dtype; the batch size, channel multiplier, bias and thread count
# rotate with the case index so that each mode meets all their values.

KERNELS = [(1, 1), (3, 3), (5, 5), (2, 3)]
STRIDES = [1, 2, 3, (1, 2)]
DILATIONS = [1, 2]
PLANES = [(13, 11), (7, 9), (1, 1), (5, 3), (2, 6), (11, 4), (9, 13), (3, 2)]
PADDINGS = [(1, 2, 0, 3), (0, 0, 2, 1), 1, (2, 1), (3, 0, 1, 1), "same", "valid", "full"]


def _fits(shape, kernel, stride, padding, dilation, mode):
    try:
        geometry_of(np.empty((1, 1) + shape), np.empty((1, 1) + kernel), stride, padding,
                    dilation, mode)
    except ValueError:
        return False
    return True


def _grid():
    cases = []
    for i, (kernel, stride, dilation) in enumerate(itertools.product(KERNELS, STRIDES,
                                                                     DILATIONS)):
        for mode in MODES:
            # the first plane and padding (cycling from the case index) that this mode
            # accepts: reflect needs pad < size, circular pad <= size, all an output >= 1
            for shift in range(len(PLANES) * len(PADDINGS)):
                shape = PLANES[(i + shift) % len(PLANES)]
                padding = PADDINGS[(i + shift // len(PLANES)) % len(PADDINGS)]
                if _fits(shape, kernel, stride, padding, dilation, mode):
                    break
            else:
                raise AssertionError((kernel, stride, dilation, mode))
            j = i + MODES.index(mode)
            cases.append(dict(kernel=kernel, stride=stride, dilation=dilation, mode=mode,
                              shape=shape, padding=padding, N=(0, 1, 3)[j % 3],
                              m=1 + j % 2, with_bias=(j // 2) % 2 == 0,
                              n_threads=1 + (j // 4) % 2))
    return cases


GRID = _grid()


def _case_id(c):
    return (f"k{c['kernel'][0]}x{c['kernel'][1]}-s{c['stride']}-d{c['dilation']}-{c['mode']}"
            f"-{c['shape'][0]}x{c['shape'][1]}-p{c['padding']}-N{c['N']}-m{c['m']}"
            f"-{'b' if c['with_bias'] else 'nob'}-t{c['n_threads']}").replace(" ", "")


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_grid_matches_oracle(case, dtype):
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))
    run_case(rng, dtype, case["N"], 3, case["m"], *case["shape"], *case["kernel"],
             case["stride"], case["padding"], case["dilation"], case["mode"],
             case["with_bias"], case["n_threads"])


def test_grid_covers_the_corners():
    """Every mode meets every batch size, multiplier, bias choice and thread count, and some
    case has a 1x1 output and one a padding wider than a stride."""
    for mode in MODES:
        cases = [c for c in GRID if c["mode"] == mode]
        for key, values in (("N", {0, 1, 3}), ("m", {1, 2}), ("with_bias", {True, False}),
                            ("n_threads", {1, 2})):
            assert {c[key] for c in cases} == values, (mode, key)
    outputs = [geometry_of(np.empty((1, 1) + c["shape"]), np.empty((1, 1) + c["kernel"]),
                           c["stride"], c["padding"], c["dilation"], c["mode"])
               for c in GRID]
    assert any(g.OH == 1 and g.OW == 1 for g in outputs)
    assert any(g.H == 1 and g.W == 1 for g in outputs)


# ---------------------------------------------------------------------------
# Longer rows (the vectorised interior loops and their remainders), the awkward corners.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
def test_long_rows(mode, stride, dtype):
    rng = np.random.default_rng(7 + stride)
    run_case(rng, dtype, 2, 4, 1, 21, 37, 3, 3, stride, 1, 1, mode, True, 2)


@pytest.mark.parametrize("mode", ["zeros", "circular"])
@pytest.mark.parametrize("kernel, stride, dilation", [((3, 3), 1, 1), ((3, 3), 2, 2),
                                                      ((5, 5), 1, 1), ((1, 1), 3, 1)])
def test_rows_wider_than_a_chunk(mode, kernel, stride, dilation, dtype):
    """More interior columns than grad_weight's accumulator chunk (64)."""
    rng = np.random.default_rng(stride)
    run_case(rng, dtype, 2, 2, 1, 5, 150, *kernel, stride, (1, 2, 2, 1), dilation, mode,
             True, 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel", [(7, 7), (4, 6), (6, 1)])
def test_kernels_of_several_blocks(mode, kernel, dtype):
    """Kernel rows and columns in groups of 3, 3, 1 / 3, 1 / 3, 3 and 1: full 3x3
    blocks next to partial ones."""
    rng = np.random.default_rng(sum(kernel))
    run_case(rng, dtype, 2, 2, 2, 12, 13, *kernel, (1, 2), (3, 3, 2, 3), 1, mode, True, 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel, dilation", [((1, 1), 1), ((2, 3), 1), ((3, 3), 2),
                                              ((5, 5), 1), ((7, 3), 1)])
def test_same_padding_stride_1(mode, kernel, dilation, dtype):
    """OW == W and stride 1: the interior of whole bands of rows is one flat sweep."""
    rng = np.random.default_rng(kernel[0] * 10 + kernel[1])
    run_case(rng, dtype, 2, 2, 2, 11, 12, *kernel, 1, "same", dilation, mode, True, 2)


def test_padding_wider_than_the_kernel(dtype):
    """Output rows and columns that only see zero padding, and an empty interior."""
    rng = np.random.default_rng(5)
    run_case(rng, dtype, 2, 2, 1, 4, 3, 3, 3, 1, (5, 4, 6, 3), 1, "zeros", True, 2)
    run_case(rng, dtype, 2, 2, 1, 4, 3, 3, 3, 2, (5, 4, 6, 3), 2, "zeros", True, 1)


@pytest.mark.parametrize("m", [1, 3])
def test_multiplier_and_wide_kernel(m, dtype):
    rng = np.random.default_rng(m)
    run_case(rng, dtype, 2, 2, m, 17, 19, 7, 5, 1, (3, 3, 2, 2), (2, 1), "reflect", True, 2)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("H", [5, 6, 9])
@pytest.mark.parametrize("stride", [1, (2, 1), (3, 1)])
def test_weight_grad_two_rows_at_a_time(H, stride, mode, dtype):
    """3x3 stride-1-wide sweeps take two output rows at a time: odd and even row counts
    (a last single row), vertical strides whose row pairs share no input rows, padding
    rows (zero_row) on either side of a pair."""
    rng = np.random.default_rng(H)
    run_case(rng, dtype, 2, 2, 1, H, 70, 3, 3, stride, 1, 1, mode, True, 2)


@pytest.mark.parametrize("n_threads", [1, 3, 8])
def test_fewer_planes_than_threads(n_threads, dtype):
    """One channel: the backward's split over planes (not filters) must still be right."""
    rng = np.random.default_rng(n_threads)
    run_case(rng, dtype, 5, 1, 1, 6, 8, 3, 3, 1, 1, 1, "zeros", True, n_threads)
    run_case(rng, dtype, 1, 1, 1, 6, 8, 3, 3, 1, 1, 1, "circular", True, n_threads)


def test_one_pixel_everything(dtype):
    rng = np.random.default_rng(3)
    for mode in ("zeros", "replicate", "circular"):
        run_case(rng, dtype, 3, 2, 2, 1, 1, 1, 1, 1, 0, 1, mode, True, 2)
        run_case(rng, dtype, 1, 2, 1, 1, 1, 3, 3, 1, 1, 1, mode, True, 2)


def test_empty_batch_zeroes_weight_gradient(dtype):
    x = np.empty((0, 3, 5, 5), dtype)
    weight = np.ones((6, 1, 3, 3), dtype)
    dy = np.empty((0, 6, 5, 5), dtype)
    y = dw_forward(x, weight, np.ones(6, dtype), 1, 1, 1, "zeros", 2)
    assert y.shape == (0, 6, 5, 5)
    dx, dw, db = dw_backward(dy, x, weight, True, 1, 1, 1, "reflect", 2)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_deterministic_for_fixed_n_threads(n_threads):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 3, 12, 10)).astype(np.float32)
    weight = rng.standard_normal((6, 1, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((4, 6, 12, 10)).astype(np.float32)
    first = dw_backward(dy, x, weight, True, 1, 1, 1, "reflect", n_threads)
    for _ in range(3):
        again = dw_backward(dy, x, weight, True, 1, 1, 1, "reflect", n_threads)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Finite differences: the gradients without the oracle, one small float64 case per mode.


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_finite_differences(mode):
    rng = np.random.default_rng(MODES.index(mode))
    args = dict(stride=(2, 1), padding=(2, 1, 1, 2), dilation=(1, 2), mode=mode, n_threads=2)
    x = rng.standard_normal((2, 2, 5, 4))
    weight = rng.standard_normal((4, 1, 2, 3))
    bias = rng.standard_normal(4)
    r = rng.standard_normal(dw_forward(x, weight, bias, **args).shape)

    def loss(x_, w_, b_):
        return float(np.sum(dw_forward(x_, w_, b_, **args) * r))

    def numeric(index_array, f):
        grad = np.zeros_like(index_array)
        eps = 1e-6
        for i in np.ndindex(index_array.shape):
            plus, minus = index_array.copy(), index_array.copy()
            plus[i] += eps
            minus[i] -= eps
            grad[i] = (f(plus) - f(minus)) / (2 * eps)
        return grad

    dx, dw, db = dw_backward(r, x, weight, True, **args)
    np.testing.assert_allclose(dx, numeric(x, lambda v: loss(v, weight, bias)), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(dw, numeric(weight, lambda v: loss(x, v, bias)), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(db, numeric(bias, lambda v: loss(x, weight, v)), rtol=1e-6,
                               atol=1e-7)
