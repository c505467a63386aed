"""fastconv.conv2d / conv2d_backward against the NumPy reference, over the grid the API accepts."""

import itertools

import numpy as np
import pytest
from _helpers import algorithms_for, assert_matches, random_problem, spy_transposed_sums

import fastconv
from fastconv import _blas, _functional, _tiling, reference
from fastconv._validation import as_padding, conv_output_size

KERNELS = [(1, 1), (2, 2), (3, 3), (5, 5), (2, 3)]
STRIDES = [1, 2, 3, (1, 2)]
PADDINGS = [0, 1, (1, 2), (0, 1, 2, 1)]
DILATIONS = [1, 2]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _fits(H, W, kernel, stride, padding, dilation):
    top, bottom, left, right = as_padding(padding)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    return (conv_output_size(H, kernel[0], sh, top, bottom, dh) >= 1
            and conv_output_size(W, kernel[1], sw, left, right, dw) >= 1)


def check_against_reference(x, weight, bias, stride, padding, dilation, n_threads, dtype, rng):
    """Forward and all three gradients of fastconv equal the reference's, for every
    algorithm that applies to the shape (and "auto")."""
    F, C, KH, KW = weight.shape
    y_ref = reference.conv2d(x, weight, bias, stride, padding, dilation)
    grad_output = rng.standard_normal(y_ref.shape).astype(dtype)
    rx, rw, rb = reference.conv2d_backward(grad_output, x, weight, stride, padding, dilation)
    N, _, OH, OW = y_ref.shape
    for algorithm in ["auto"] + algorithms_for((KH, KW), stride, dilation):
        y = fastconv.conv2d(x, weight, bias, stride, padding, dilation, algorithm=algorithm,
                            n_threads=n_threads)
        assert_matches(y, y_ref, dtype, C * KH * KW, f"{algorithm} y")
        gx, gw, gb = fastconv.conv2d_backward(grad_output, x, weight, stride, padding, dilation,
                                              algorithm=algorithm, n_threads=n_threads)
        assert_matches(gx, rx, dtype, F * KH * KW, f"{algorithm} grad_x")
        assert_matches(gw, rw, dtype, N * OH * OW, f"{algorithm} grad_weight")
        assert_matches(gb, rb, dtype, N * OH * OW, f"{algorithm} grad_bias")


GEOMETRY_GRID = [
    (kernel, stride, padding, dilation)
    for kernel, stride, padding, dilation in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS)
    if _fits(7, 8, kernel, stride, padding, dilation)
]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("kernel,stride,padding,dilation", GEOMETRY_GRID)
def test_geometry_grid(kernel, stride, padding, dilation, n_threads, dtype):
    rng = np.random.default_rng(1)
    x, weight, bias = random_problem(rng, 3, 3, 7, 8, 4, *kernel, dtype)
    check_against_reference(x, weight, bias, stride, padding, dilation, n_threads, dtype, rng)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("C,F", [(1, 1), (3, 4), (5, 2)])
@pytest.mark.parametrize("H,W", [(7, 7), (8, 8), (6, 11)])
@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), 1, 1), ((2, 3), 2, (0, 1, 2, 1)),
                                                     ((1, 1), 1, 0), ((5, 5), 3, (1, 2))])
def test_shape_grid(N, C, F, H, W, kernel, stride, padding, n_threads, dtype, gemm_kernel):
    rng = np.random.default_rng(2)
    x, weight, bias = random_problem(rng, N, C, H, W, F, *kernel, dtype)
    check_against_reference(x, weight, bias, stride, padding, 1, n_threads, dtype, rng)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("N", [1, 2, 5])
@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), 1, 1), ((1, 1), 1, 0), ((3, 2), 2, 1)])
def test_many_tiles(monkeypatch, N, kernel, stride, padding, n_threads, dtype, gemm_kernel):
    """Tiny tiles force tile boundaries inside output rows and many work items per image
    (Winograd: one tile row per block)."""
    monkeypatch.setattr(_tiling, "COLUMN_TILE_BYTES", 1)
    monkeypatch.setattr(_tiling, "MIN_TILE_COLUMNS", 5)
    monkeypatch.setattr(_tiling, "WINOGRAD_BLOCK_BYTES", 1)
    monkeypatch.setattr(_tiling, "WINOGRAD_MIN_TILES", 1)
    rng = np.random.default_rng(3)
    x, weight, bias = random_problem(rng, N, 6, 9, 13, 4, *kernel, dtype)
    check_against_reference(x, weight, bias, stride, padding, 1, n_threads, dtype, rng)


@pytest.mark.parametrize("tiny_tiles", [False, True])
@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("N,C,H,W,F,kernel,stride,padding,groups", [
    (2, 8, 10, 9, 16, (3, 3), 1, 1, 1),              # 16 filters x 72 sums
    (3, 64, 6, 7, 16, (1, 1), 1, 0, 1),              # 1x1: x's planes read in place
    (2, 16, 9, 9, 32, (3, 3), 2, (0, 1, 2, 1), 2),   # 2 groups of 16 filters x 72
    (1, 24, 12, 12, 40, (2, 3), 1, 1, 1),            # a 32-filter panel and a tail of 8
])
def test_weight_grad_by_the_own_kernel(monkeypatch, N, C, H, W, F, kernel, stride, padding,
                                       groups, n_threads, tiny_tiles, gemm_kernel):
    """float32 layers whose im2col grad_weight keeps its sums transposed for the own GEMM
    kernel (``_functional.weight_sums_transposed``) where it runs, against the reference;
    with BLAS the sums keep their layout."""
    if tiny_tiles:
        monkeypatch.setattr(_tiling, "COLUMN_TILE_BYTES", 1)
        monkeypatch.setattr(_tiling, "MIN_TILE_COLUMNS", 5)
    seen = spy_transposed_sums(monkeypatch)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    weight = rng.standard_normal((F, C // groups, *kernel)).astype(np.float32)
    args = dict(stride=stride, padding=padding, groups=groups)
    dy = rng.standard_normal(reference.conv2d(x, weight, **args).shape).astype(np.float32)
    rx, rw, rb = reference.conv2d_backward(dy, x, weight, **args)
    gx, gw, gb = fastconv.conv2d_backward(dy, x, weight, **args, algorithm="im2col",
                                          n_threads=n_threads)
    assert seen == [gemm_kernel]
    reduction = N * dy.shape[2] * dy.shape[3]
    assert_matches(gw, rw, np.float32, reduction, "grad_weight")
    assert_matches(gb, rb, np.float32, reduction, "grad_bias")
    assert_matches(gx, rx, np.float32, F // groups * kernel[0] * kernel[1], "grad_x")


def test_own_weight_grad_rule():
    """The bounds of ``weight_sums_transposed`` (measured: see its docstring)."""
    rule = _functional.weight_sums_transposed
    most, least = _functional.OWN_WEIGHT_GRAD_MAX_FILTERS, _functional.OWN_WEIGHT_GRAD_MIN_SUMS
    on = _blas.own_kernel_on()
    assert rule(64, 256, np.float32) is on                  # resnet-1x1
    assert rule(most, least, np.float32) is on
    assert not rule(most + 1, least, np.float32)            # more filters than panels pay
    assert not rule(30, 25, np.float32)                     # lenet: few sums
    assert not rule(16, least // 16 - 1, np.float32)
    assert not rule(64, 256, np.float64)                    # the kernel is float32's


def test_larger_layer_with_default_tiles(dtype):
    """K*P big enough that the default plan uses several tiles per image."""
    rng = np.random.default_rng(4)
    C, H, W = 64, 40, 36
    # enough columns that one image's column matrix exceeds the tile budget
    while C * 9 * H * W * dtype.itemsize <= 2 * _tiling.COLUMN_TILE_BYTES:
        H *= 2
    plan = _tiling.plan(2, C, 9, H * W, dtype.itemsize, 2)
    assert plan.images_per_tile == 1 and plan.tile_p < H * W
    x, weight, bias = random_problem(rng, 2, C, H, W, 8, 3, 3, dtype)
    check_against_reference(x, weight, bias, 1, 1, 1, 2, dtype, rng)


def test_input_grad_is_full_convolution_with_rotated_kernel(dtype):
    """Seeds 001/004: for stride 1, dX = conv(pad(dY), rot180(W)) with in/out channels swapped."""
    rng = np.random.default_rng(5)
    for padding, kernel in [(0, (3, 3)), (1, (3, 3)), ((0, 2, 1, 0), (2, 3)), ((2, 1), (5, 3))]:
        x, weight, _ = random_problem(rng, 2, 3, 8, 7, 4, *kernel, dtype)
        y = fastconv.conv2d(x, weight, padding=padding)
        grad_output = rng.standard_normal(y.shape).astype(dtype)
        gx, _, _ = fastconv.conv2d_backward(grad_output, x, weight, padding=padding)
        full = reference.conv2d_input_grad_full(grad_output, weight, x.shape, padding=padding)
        assert_matches(gx, full, dtype, 4 * kernel[0] * kernel[1], f"padding={padding}")


def test_no_bias_equals_zero_bias(dtype):
    rng = np.random.default_rng(6)
    x, weight, bias = random_problem(rng, 2, 3, 6, 6, 4, 3, 3, dtype)
    np.testing.assert_array_equal(fastconv.conv2d(x, weight),
                                  fastconv.conv2d(x, weight, np.zeros(4, dtype)))


def test_out_parameter(dtype):
    rng = np.random.default_rng(7)
    x, weight, bias = random_problem(rng, 2, 3, 6, 6, 4, 3, 3, dtype)
    out = np.full((2, 4, 4, 4), np.nan, dtype)
    result = fastconv.conv2d(x, weight, bias, out=out)
    assert result is out
    assert_matches(out, reference.conv2d(x, weight, bias), dtype, 27)


def test_non_contiguous_and_read_only_inputs(dtype):
    rng = np.random.default_rng(8)
    x_big, weight_big, bias_big = random_problem(rng, 2, 6, 12, 14, 8, 3, 3, dtype)
    x = x_big[:, ::2, ::2, 1::2]            # strided view
    weight = np.asfortranarray(weight_big[::2, ::2])
    bias = bias_big[::2]
    for array in (x_big, weight, bias_big):
        array.flags.writeable = False
    y = fastconv.conv2d(x, weight, bias, padding=1)
    assert_matches(y, reference.conv2d(x, weight, bias, padding=1), dtype, 27)
    grad_output = np.ones(y.shape, dtype)[:, :, ::-1]   # negative strides
    for got, want in zip(fastconv.conv2d_backward(grad_output, x, weight, padding=1),
                         reference.conv2d_backward(grad_output, x, weight, padding=1)):
        assert_matches(got, want, dtype, 2 * 6 * 7)


def test_empty_batch(dtype):
    x = np.zeros((0, 3, 6, 6), dtype)
    weight = np.ones((4, 3, 3, 3), dtype)
    y = fastconv.conv2d(x, weight, np.ones(4, dtype))
    assert y.shape == (0, 4, 4, 4) and y.dtype == dtype
    gx, gw, gb = fastconv.conv2d_backward(np.zeros((0, 4, 4, 4), dtype), x, weight)
    assert gx.shape == x.shape
    np.testing.assert_array_equal(gw, np.zeros_like(weight))
    np.testing.assert_array_equal(gb, np.zeros(4, dtype))


@pytest.mark.parametrize("x_dtype,w_dtype,expected", [
    (np.float32, np.float32, np.float32),
    (np.float32, np.float64, np.float64),
    (np.float16, np.float16, np.float32),
    (np.int64, np.int64, np.float64),
    (np.int8, np.float32, np.float32),
    (np.bool_, np.float64, np.float64),
])
def test_dtype_promotion(x_dtype, w_dtype, expected):
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((2, 3, 5, 5)) * 3).astype(x_dtype)
    weight = (rng.standard_normal((4, 3, 3, 3)) * 3).astype(w_dtype)
    y = fastconv.conv2d(x, weight)
    assert y.dtype == expected
    want = reference.conv2d(x.astype(np.float64), weight.astype(np.float64))
    assert_matches(y, want.astype(expected), expected, 27)
    gx, gw, gb = fastconv.conv2d_backward(np.ones(y.shape, x_dtype), x, weight)
    assert gx.dtype == gw.dtype == gb.dtype == expected


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_repeated_calls_are_bit_identical(n_threads, dtype):
    """For a fixed n_threads the tile plan, the work split and the reduction order are fixed."""
    rng = np.random.default_rng(11)
    x, weight, bias = random_problem(rng, 3, 8, 20, 20, 8, 3, 3, dtype)
    grad_output = rng.standard_normal((3, 8, 20, 20)).astype(dtype)
    for algorithm in algorithms_for(3):
        args = dict(padding=1, algorithm=algorithm, n_threads=n_threads)
        first = [fastconv.conv2d(x, weight, bias, **args),
                 *fastconv.conv2d_backward(grad_output, x, weight, **args)]
        for _ in range(3):
            again = [fastconv.conv2d(x, weight, bias, **args),
                     *fastconv.conv2d_backward(grad_output, x, weight, **args)]
            for a, b in zip(first, again):
                np.testing.assert_array_equal(a, b)
