"""The dense direct kernel (algorithm="direct" on plain layers): blocks, tails, strides, modes."""

import itertools

import numpy as np
import pytest
from _helpers import assert_forward_matches_reference, assert_matches

import fastconv
from fastconv import _conv_direct, _direct, reference
from fastconv._functional import _choose_algorithm
from fastconv._validation import conv_geometry


def _problem(rng, N, C, H, W, F, kernel, dtype):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, *kernel)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


@pytest.fixture(params=["narrow", "wide"])
def kernel_build(request, monkeypatch):
    """Both builds of the row kernel: 32-byte vectors, and where the CPU runs the AVX-512
    one, its blocks of 4 and 2 such vectors as 2 and 1 of 64 bytes."""
    wide = request.param == "wide"
    if wide and not _conv_direct.wide_kernel():
        pytest.skip("this CPU does not run the AVX-512 kernel")
    monkeypatch.setattr(_direct, "WIDE_KERNEL", wide)
    return wide


# output widths around the kernel's 8-column vectors and its 3- and (with AVX-512) 4-vector
# blocks, filter counts around its 4-blocks
@pytest.mark.parametrize("OW", [1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 47, 49, 65])
@pytest.mark.parametrize("F", [1, 3, 4, 5, 9])
def test_column_and_filter_block_tails(OW, F, dtype, kernel_build):
    rng = np.random.default_rng(0)
    x, w, b = _problem(rng, 2, 2, 5, OW + 2, F, (3, 3), dtype)
    y = fastconv.conv2d(x, w, b, algorithm="direct")
    assert y.shape == (2, F, 3, OW)
    assert_matches(y, reference.conv2d(x, w, b), dtype, 18, "forward")


@pytest.mark.parametrize("kernel,stride,dilation,padding", [
    ((7, 7), 2, 1, 3), ((5, 5), 1, 1, 0), ((3, 3), 3, 1, (0, 2, 1, 2)), ((3, 2), (2, 3), 2, 1),
    ((1, 1), 2, 1, 0), ((4, 4), (1, 2), (2, 3), "same"), ((2, 5), 4, 1, "full"),
])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_strides_dilations_and_padding_modes(kernel, stride, dilation, padding, mode, dtype,
                                             kernel_build):
    rng = np.random.default_rng(1)
    x, w, b = _problem(rng, 2, 3, 19, 33, 6, kernel, dtype)
    assert_forward_matches_reference(x, w, b, dtype, 3 * kernel[0] * kernel[1], stride=stride,
                                     padding=padding, dilation=dilation, padding_mode=mode,
                                     algorithm="direct")


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_thread_counts_are_bit_identical(n_threads):
    """Each output row is one work item with its own sums: the result does not depend
    on the thread count."""
    rng = np.random.default_rng(2)
    x, w, b = _problem(rng, 3, 3, 20, 30, 10, (5, 5), np.float32)
    serial = fastconv.conv2d(x, w, b, padding=2, algorithm="direct", n_threads=1)
    np.testing.assert_array_equal(
        fastconv.conv2d(x, w, b, padding=2, algorithm="direct", n_threads=n_threads), serial)


@pytest.mark.parametrize("OW", [16, 32, 40, 112])
def test_both_builds_sum_alike(OW, dtype, monkeypatch):
    """The AVX-512 build's 64-byte blocks sum each column's taps in the 32-byte blocks'
    order: bit-identical results (relu and bias in the store too)."""
    if not _conv_direct.wide_kernel():
        pytest.skip("this CPU does not run the AVX-512 kernel")
    rng = np.random.default_rng(3)
    x, w, b = _problem(rng, 2, 3, 9, OW + 4, 7, (5, 5), dtype)
    got = {}
    for wide in (False, True):
        monkeypatch.setattr(_direct, "WIDE_KERNEL", wide)
        got[wide] = fastconv.conv2d(x, w, b, algorithm="direct", activation="relu")
    np.testing.assert_array_equal(got[True], got[False])


@pytest.mark.parametrize("stride_h,expect_shared", [(1, True), (3, True), (10**6, False)])
def test_bands_share_input_rows_unless_the_stride_skips_them(stride_h, expect_shared):
    """Output rows share their input rows where they overlap or abut; a stride beyond the
    kernel's reach keeps one copy per tap row (a shared band would span the gap: a
    million rows here), and both layouts give im2col's results."""
    rng = np.random.default_rng(5)
    x, w, b = _problem(rng, 8, 3, 6, 11, 5, (3, 3), np.float64)
    args = dict(stride=(stride_h, 1), padding=(stride_h // 2, stride_h // 2, 1, 1))
    geometry = conv_geometry(x.shape, w.shape, dilation=1, **args)
    assert geometry.OH >= 2
    layout = _direct.band_layout(geometry, 2)
    assert bool(layout[3]) == expect_shared
    # never more than one copy per (output row, tap row, channel), a row's S*ldr values
    assert layout[4] <= 2 * 3 * 3 * layout[2]
    got = fastconv.conv2d(x, w, b, algorithm="direct", n_threads=1, **args)
    np.testing.assert_allclose(got, fastconv.conv2d(x, w, b, algorithm="im2col", **args),
                               rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(got.shape)
    got_w = fastconv.conv2d_backward(dy, x, w, algorithm="direct", n_threads=1, **args)[1]
    want_w = fastconv.conv2d_backward(dy, x, w, algorithm="im2col", **args)[1]
    np.testing.assert_allclose(got_w, want_w, rtol=1e-12, atol=1e-12)


def test_backward_of_direct_runs_grad_x_by_the_im2col_engine(dtype):
    rng = np.random.default_rng(3)
    x, w, b = _problem(rng, 2, 3, 9, 9, 5, (3, 3), dtype)
    dy = rng.standard_normal((2, 5, 9, 9)).astype(dtype)
    got = fastconv.conv2d_backward(dy, x, w, padding=1, algorithm="direct")
    want = fastconv.conv2d_backward(dy, x, w, padding=1, algorithm="im2col")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[2], want[2])
    assert_matches(got[1], want[1], dtype, 2 * 9 * 9, "grad_weight")


def _backward_reference(dy, x, w, **args):
    wide = [a.astype(np.float64) for a in (dy, x, w)]
    return reference.conv2d_backward(*wide, **args)


# output widths around the 8-column vectors and past the 8 vectors from which AVX-512 takes
# 4-filter blocks, filter counts around those blocks and pairs (the last filter unpaired)
# and tap counts around the 6-tap blocks (C*KH*KW = 1, 5, 6, 7, 12, 27)
@pytest.mark.parametrize("OW", [1, 7, 8, 9, 17, 32, 67])
@pytest.mark.parametrize("F,C,kernel", [(1, 1, (1, 1)), (3, 1, (1, 5)), (2, 2, (1, 3)),
                                        (5, 1, (7, 1)), (4, 3, (2, 2)), (7, 3, (3, 3)),
                                        (6, 1, (1, 3))])
def test_direct_grad_weight_blocks_and_tails(OW, F, C, kernel, dtype):
    rng = np.random.default_rng(4)
    x, w, _ = _problem(rng, 3, C, 8, OW + kernel[1] - 1, F, kernel, dtype)
    dy = rng.standard_normal((3, F, 9 - kernel[0], OW)).astype(dtype)
    _, grad_weight, grad_bias = fastconv.conv2d_backward(dy, x, w, algorithm="direct")
    want = _backward_reference(dy, x, w)
    assert_matches(grad_weight, want[1], dtype, dy[:, 0].size, "grad_weight")
    assert_matches(grad_bias, want[2], dtype, dy[:, 0].size, "grad_bias")


@pytest.mark.parametrize("kernel,stride,dilation,padding", [
    ((7, 7), 2, 1, 3), ((5, 5), 1, 1, 0), ((3, 3), 3, 1, (0, 2, 1, 2)), ((3, 2), (2, 3), 2, 1),
    ((4, 4), (1, 2), (2, 3), "same"), ((2, 5), 4, 1, "full"),
])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_direct_grad_weight_strides_dilations_and_padding_modes(kernel, stride, dilation,
                                                                padding, mode, dtype):
    """Padding rows (all-padding input rows are zeros in the phase rows) and every mode's
    border fold into grad_weight as the reference's."""
    rng = np.random.default_rng(5)
    x, w, _ = _problem(rng, 2, 3, 19, 33, 5, kernel, dtype)
    args = dict(stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    try:
        output_shape = reference.conv2d(x, w, **args).shape
    except ValueError:                    # reflect padding >= the input: refused by both
        return
    dy = rng.standard_normal(output_shape).astype(dtype)
    want = _backward_reference(dy, x, w, **args)
    got = fastconv.conv2d_backward(dy, x, w, algorithm="direct", **args)
    assert_matches(got[1], want[1], dtype, dy[:, 0].size, "grad_weight")
    # grad_x: by stride phases where they apply (fastconv._stride_phases), else im2col's
    assert_matches(got[0], want[0], dtype, w.shape[0] * kernel[0] * kernel[1], "grad_x")


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_direct_grad_weight_is_deterministic_for_a_thread_count(n_threads):
    """Each thread sums a fixed set of bands (a static schedule) and the per-thread sums
    are reduced in thread order: the same call gives the same bits."""
    rng = np.random.default_rng(6)
    x, w, _ = _problem(rng, 5, 3, 20, 30, 10, (5, 5), np.float32)
    dy = rng.standard_normal((5, 10, 20, 30)).astype(np.float32)
    first = fastconv.conv2d_backward(dy, x, w, padding=2, algorithm="direct", n_threads=n_threads)
    again = fastconv.conv2d_backward(dy, x, w, padding=2, algorithm="direct", n_threads=n_threads)
    np.testing.assert_array_equal(first[1], again[1])


def test_auto_takes_the_direct_grad_weight_for_few_channels():
    rng = np.random.default_rng(7)
    x, w, _ = _problem(rng, 2, 3, 12, 12, 8, (3, 3), np.float64)
    dy = rng.standard_normal((2, 8, 12, 12))
    auto = fastconv.conv2d_backward(dy, x, w, padding=1)
    direct = fastconv.conv2d_backward(dy, x, w, padding=1, algorithm="direct")
    for a, e in zip(auto, direct):
        np.testing.assert_array_equal(a, e)


def test_pack_weight_puts_four_filters_innermost():
    w = np.arange(5 * 2 * 3 * 3, dtype=np.float64).reshape(5, 2, 3, 3)
    packed = _direct.pack_weight(w, np.float64).reshape(2, 2, 3, 3, 4)
    np.testing.assert_array_equal(packed[0, 1, 2, 0], w[0:4, 1, 2, 0])
    np.testing.assert_array_equal(packed[1, 0, 0, 1], [w[4, 0, 0, 1], 0, 0, 0])


def test_auto_takes_the_direct_kernel_for_few_channels():
    def geometry(C, groups=1, kernel=3, stride=1):
        return conv_geometry((2, C, 16, 16), (8, C // groups, kernel, kernel), stride, 1, 1,
                             groups)

    for C, kernel, stride in itertools.product([1, 3, 4], [3, 5, 7], [1, 2]):
        assert _choose_algorithm("auto", geometry(C, kernel=kernel, stride=stride),
                                 "NCHW") == "direct"
        assert _choose_algorithm("auto", geometry(C, kernel=kernel, stride=stride), "NCHW",
                                 backward=True) != "direct"
    assert _choose_algorithm("auto", geometry(5), "NCHW") != "direct"
    assert _choose_algorithm("auto", geometry(4, groups=2), "NCHW") != "direct"
    assert _choose_algorithm("auto", geometry(3), "NHWC") == "direct"   # its own kernel
