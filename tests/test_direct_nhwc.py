"""The channels-last direct kernel (layout="NHWC", algorithm="direct"): pixel blocks and
filter-vector tails, strides, dilations, padding modes, chunked sums, the fused epilogue."""

import itertools

import numpy as np
import pytest
from _helpers import assert_matches

import fastconv
from fastconv import _conv_direct, _direct, reference
from fastconv._functional import _choose_algorithm
from fastconv._validation import conv_geometry


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _problem(rng, N, C, H, W, F, kernel, dtype):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, *kernel)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


def _check(x, w, b, dtype, n_threads=2, **args):
    """The NHWC direct forward of NCHW data ``x`` against the reference, transposed."""
    want = reference.conv2d(x, w, b, **args).transpose(0, 2, 3, 1)
    got = fastconv.conv2d(_nhwc(x), w, b, layout="NHWC", algorithm="direct",
                          n_threads=n_threads, **args)
    assert got.shape == want.shape
    assert_matches(got, want, dtype, w[0].size, "forward")
    return got


@pytest.fixture(params=["narrow", "wide"])
def kernel_build(request, monkeypatch):
    """Both builds: 32-byte vectors (blocks of up to 8 pixels x 2 vectors), and where the
    CPU runs it the AVX-512 one (up to 12 pixels x 2 or 6 x 4 vectors of 64 bytes)."""
    wide = request.param == "wide"
    if wide and not _conv_direct.wide_kernel():
        pytest.skip("this CPU does not run the AVX-512 kernel")
    monkeypatch.setattr(_direct, "WIDE_KERNEL", wide)
    return wide


# output widths around the blocks of 6, 8 and 12 pixels (one block, two, a short last one);
# filter counts around the vectors of 4, 8 and 16 values and the 64-value filter chunks
@pytest.mark.parametrize("OW", [1, 5, 6, 7, 8, 9, 12, 13, 23, 25, 37])
@pytest.mark.parametrize("F", [1, 3, 8, 15, 16, 17, 30, 33, 48, 64, 65, 100, 129])
def test_pixel_and_filter_block_tails(OW, F, dtype, kernel_build):
    rng = np.random.default_rng(OW * 131 + F)
    x, w, b = _problem(rng, 2, 3, 5, OW + 2, F, (3, 3), dtype)
    assert _check(x, w, b, dtype).shape == (2, 3, OW, F)


@pytest.mark.parametrize("kernel,stride,dilation,padding", [
    ((7, 7), 2, 1, 3), ((5, 5), 1, 1, 0), ((3, 3), 3, 1, (0, 2, 1, 2)), ((3, 2), (2, 3), 2, 1),
    ((1, 1), 2, 1, 0), ((1, 1), 1, 1, 0), ((4, 4), (1, 2), (2, 3), "same"), ((2, 5), 4, 1, "full"),
])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("C", [1, 3, 8])
def test_strides_dilations_and_padding_modes(kernel, stride, dilation, padding, mode, C, dtype,
                                             kernel_build):
    rng = np.random.default_rng(1)
    x, w, b = _problem(rng, 2, C, 19, 33, 6, kernel, dtype)
    _check(x, w, b, dtype, stride=stride, padding=padding, dilation=dilation,
           padding_mode=mode)


# taps (C*KH*KW) past the 256 summed in one run: rows of taps grouped into chunks (C=40:
# 120 a row), and rows longer than a chunk cut (C=100: 300 a row)
@pytest.mark.parametrize("C,kernel", [(29, (3, 3)), (40, (3, 3)), (100, (3, 3)), (6, (7, 7)),
                                      (300, (1, 1))])
def test_long_sums_run_in_chunks(C, kernel, dtype, kernel_build):
    rng = np.random.default_rng(C)
    x, w, b = _problem(rng, 2, C, 9, 10, 20, kernel, dtype)
    _check(x, (w / np.sqrt(w[0].size)).astype(dtype), b, dtype, padding=1)


def test_chunked_float32_error_is_im2cols():
    """Summed in chunks as the GEMMs sum theirs, the float32 error stays near im2col's
    (one run over 4608 taps had 6.7x its error)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 512, 14, 14))
    w = rng.standard_normal((64, 512, 3, 3)) / np.sqrt(512 * 9)
    want = reference.conv2d(x, w, stride=2, padding=1).transpose(0, 2, 3, 1)
    errors = {}
    for algorithm in ("direct", "im2col"):
        got = fastconv.conv2d(_nhwc(x).astype(np.float32), w.astype(np.float32), stride=2,
                              padding=1, layout="NHWC", algorithm=algorithm)
        errors[algorithm] = np.abs(got - want).max() / np.abs(want).max()
    assert errors["direct"] <= 2 * errors["im2col"], errors


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_thread_counts_are_bit_identical(n_threads):
    """Each output row's sums are its own: the result does not depend on the threads."""
    rng = np.random.default_rng(2)
    x, w, b = _problem(rng, 3, 3, 20, 30, 10, (5, 5), np.float32)
    args = dict(padding=2, layout="NHWC", algorithm="direct")
    serial = fastconv.conv2d(_nhwc(x), w, b, n_threads=1, **args)
    np.testing.assert_array_equal(fastconv.conv2d(_nhwc(x), w, b, n_threads=n_threads, **args),
                                  serial)


@pytest.mark.parametrize("F", [7, 40])
def test_both_builds_sum_alike(F, dtype, monkeypatch):
    """Both builds sum each output's taps in the same order: bit-identical results, with
    the bias and the ReLU of the store."""
    if not _conv_direct.wide_kernel():
        pytest.skip("this CPU does not run the AVX-512 kernel")
    rng = np.random.default_rng(3)
    x, w, b = _problem(rng, 2, 3, 9, 30, F, (5, 5), dtype)
    got = {}
    for wide in (False, True):
        monkeypatch.setattr(_direct, "WIDE_KERNEL", wide)
        got[wide] = fastconv.conv2d(_nhwc(x), w, b, layout="NHWC", algorithm="direct",
                                    activation="relu")
    np.testing.assert_array_equal(got[True], got[False])


@pytest.mark.parametrize("stride_h,expect_shared", [(1, True), (3, True), (10**6, False)])
def test_bands_share_input_rows_unless_the_stride_skips_them(stride_h, expect_shared):
    rng = np.random.default_rng(5)
    x, w, b = _problem(rng, 8, 3, 6, 11, 5, (3, 3), np.float64)
    args = dict(stride=(stride_h, 1), padding=(stride_h // 2, stride_h // 2, 1, 1))
    geometry = conv_geometry(x.shape, w.shape, dilation=1, **args)
    assert geometry.OH >= 2
    assert _direct._pixel_row_plan(geometry, 1).shared == expect_shared
    got = fastconv.conv2d(_nhwc(x), w, b, layout="NHWC", algorithm="direct", n_threads=1,
                          **args)
    np.testing.assert_allclose(got, _nhwc(fastconv.conv2d(x, w, b, algorithm="im2col", **args)),
                               rtol=1e-12, atol=1e-12)


def test_relu_bias_none_and_inputs_kept(dtype):
    rng = np.random.default_rng(6)
    x, w, b = _problem(rng, 2, 3, 8, 9, 20, (3, 3), dtype)
    xh = _nhwc(x)
    kept = (xh.copy(), w.copy(), b.copy())
    args = dict(padding=1, layout="NHWC", algorithm="direct")
    plain = fastconv.conv2d(xh, w, b, **args)
    np.testing.assert_array_equal(fastconv.conv2d(xh, w, b, activation="relu", **args),
                                  np.maximum(plain, 0))
    no_bias = fastconv.conv2d(xh, w, None, **args)
    assert_matches(no_bias, reference.conv2d(x, w, None, padding=1).transpose(0, 2, 3, 1),
                   dtype, 27, "no bias")
    for array, before in zip((xh, w, b), kept):
        np.testing.assert_array_equal(array, before)
    # a non-contiguous input and an `out` array
    out = np.empty_like(plain)
    strided = np.zeros((2, 8, 9, 6), dtype)[..., ::2]
    strided[...] = xh
    assert fastconv.conv2d(strided, w, b, out=out, **args) is out
    np.testing.assert_array_equal(out, plain)


def test_backward_of_direct_runs_by_im2col(dtype):
    """The NHWC kernel is a forward: ``algorithm='direct'`` runs the backward by im2col."""
    rng = np.random.default_rng(8)
    x, w, b = _problem(rng, 2, 3, 9, 9, 5, (3, 3), dtype)
    dy = _nhwc(rng.standard_normal((2, 5, 9, 9)).astype(dtype))
    args = dict(padding=1, layout="NHWC")
    got = fastconv.conv2d_backward(dy, _nhwc(x), w, algorithm="direct", **args)
    want = fastconv.conv2d_backward(dy, _nhwc(x), w, algorithm="im2col", **args)
    for g, v in zip(got, want):
        np.testing.assert_array_equal(g, v)


def test_pack_weight_nhwc_puts_filters_innermost():
    w = np.arange(5 * 2 * 3 * 4, dtype=np.float64).reshape(5, 2, 3, 4)
    packed = _direct.pack_weight_nhwc(w, np.float64)
    assert packed.shape == (3 * 4 * 2, 8)           # filters padded to a 64-byte vector
    grid = packed.reshape(3, 4, 2, 8)
    np.testing.assert_array_equal(grid[1, 2, 0, :5], w[:, 0, 1, 2])
    np.testing.assert_array_equal(grid[..., 5:], 0)
    assert _direct.pack_weight_nhwc(w, np.float32).shape == (24, 16)


def test_auto_takes_the_nhwc_kernel_where_it_measured_faster():
    def geometry(C, kernel=3, stride=1, groups=1, F=8):
        return conv_geometry((2, C, 16, 16), (F, C // groups, kernel, kernel), stride, 1, 1,
                             groups)

    for C, kernel, stride in itertools.product([1, 3, 8, 64], [3, 5, 7], [1, 2]):
        taps = C * kernel * kernel
        g = geometry(C, kernel, stride)
        winograd = _choose_algorithm("winograd", g, "NHWC") if kernel == 3 and stride == 1 \
            else None
        chosen = _choose_algorithm("auto", g, "NHWC")
        if taps > _direct.AUTO_MAX_TAPS_NHWC:
            assert chosen == "im2col", (C, kernel, stride)
        elif winograd and C >= 16:
            assert chosen == "winograd", (C, kernel, stride)   # resnet-3x3 and the like
        else:
            assert chosen == "direct", (C, kernel, stride)
        assert _choose_algorithm("auto", g, "NHWC", backward=True) != "direct"
    assert _choose_algorithm("auto", geometry(64, kernel=1), "NHWC") == "im2col"
    assert _choose_algorithm("auto", geometry(4, groups=2), "NHWC") == "im2col"
    with pytest.raises(ValueError, match="algorithm='direct'"):
        _choose_algorithm("direct", geometry(4, groups=4, F=4), "NHWC")
