"""The pixel-row direct kernel: channels-last layers (layout="NHWC", algorithm="direct")
and NCHW plain layers wider than 1x1 with more than four channels (its NCHW rows): pixel
blocks and filter-vector tails, strides, dilations, padding modes, chunked sums, the fused
epilogue."""

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


def _check(x, w, b, dtype, n_threads=2, layout="NHWC", **args):
    """The direct forward of NCHW data ``x`` (transposed to channels-last, or with
    ``layout="NCHW"`` as it is) against the reference."""
    want = reference.conv2d(x, w, b, **args)
    if layout == "NHWC":
        want, x = want.transpose(0, 2, 3, 1), _nhwc(x)
    got = fastconv.conv2d(x, w, b, layout=layout, algorithm="direct", n_threads=n_threads,
                          **args)
    assert got.shape == want.shape
    assert_matches(got, want, dtype, w[0].size, "forward")
    return got


@pytest.fixture(params=["NHWC", "NCHW"])
def layout(request, monkeypatch):
    """Both layouts of the kernel's rows; NCHW layers take it with more than four channels
    (fewer run the phase-row kernel of fastconv._direct.forward), wider than 1x1, which
    every call here asserts."""
    calls = []
    real = _direct.forward_pixel_rows
    monkeypatch.setattr(_direct, "forward_pixel_rows",
                        lambda *a, **k: calls.append(k.get("layout", "NHWC")) or real(*a, **k))
    yield request.param
    assert calls and set(calls) == {request.param}


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
@pytest.mark.parametrize("OW", [1, 5, 6, 7, 8, 9, 11, 12, 13, 23, 25, 37])
@pytest.mark.parametrize("F", [1, 3, 8, 15, 16, 17, 30, 33, 48, 64, 65, 100, 129])
def test_pixel_and_filter_block_tails(OW, F, dtype, kernel_build, layout):
    rng = np.random.default_rng(OW * 131 + F)
    C = 3 if layout == "NHWC" else 5
    x, w, b = _problem(rng, 2, C, 5, OW + 2, F, (3, 3), dtype)
    got = _check(x, w, b, dtype, layout=layout)
    assert got.shape == ((2, 3, OW, F) if layout == "NHWC" else (2, F, 3, OW))


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


@pytest.mark.parametrize("kernel,stride,dilation,padding", [
    ((3, 3), 2, 1, 1), ((7, 7), 2, 1, 3), ((5, 5), 1, 1, 0), ((3, 3), 3, 1, (0, 2, 1, 2)),
    ((3, 2), (2, 3), 2, 1), ((4, 4), (1, 2), (2, 3), "same"), ((2, 5), 4, 1, "full"),
    ((3, 3), 1, 2, "same"),
])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("C", [5, 12])
def test_nchw_strides_dilations_and_padding_modes(kernel, stride, dilation, padding, mode, C,
                                                  dtype, kernel_build, monkeypatch):
    """NCHW rows: each channel's row padded by the mode, taps C*Wp apart."""
    rng = np.random.default_rng(11)
    x, w, b = _problem(rng, 2, C, 19, 33, 6, kernel, dtype)
    calls = []
    real = _direct.forward_pixel_rows
    monkeypatch.setattr(_direct, "forward_pixel_rows",
                        lambda *a, **k: calls.append(k["layout"]) or real(*a, **k))
    _check(x, w, b, dtype, layout="NCHW", stride=stride, padding=padding, dilation=dilation,
           padding_mode=mode)
    assert calls == ["NCHW"]


# taps (C*KH*KW) past the 256 summed in one run: rows of taps grouped into chunks (C=40:
# 120 a row), and rows longer than a chunk cut (C=100: 300 a row)
@pytest.mark.parametrize("C,kernel", [(29, (3, 3)), (40, (3, 3)), (100, (3, 3)), (6, (7, 7)),
                                      (300, (1, 2))])
def test_long_sums_run_in_chunks(C, kernel, dtype, kernel_build, layout):
    rng = np.random.default_rng(C)
    x, w, b = _problem(rng, 2, C, 9, 10, 20, kernel, dtype)
    _check(x, (w / np.sqrt(w[0].size)).astype(dtype), b, dtype, padding=1, layout=layout)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_chunked_float32_error_is_im2cols(layout):
    """Summed in chunks as the GEMMs sum theirs, the float32 error stays near im2col's
    (one run over 4608 taps had 6.7x its error)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 512, 14, 14))
    w = rng.standard_normal((64, 512, 3, 3)) / np.sqrt(512 * 9)
    want = reference.conv2d(x, w, stride=2, padding=1)
    if layout == "NHWC":
        want, x = want.transpose(0, 2, 3, 1), _nhwc(x)
    errors = {}
    for algorithm in ("direct", "im2col"):
        got = fastconv.conv2d(x.astype(np.float32), w.astype(np.float32), stride=2,
                              padding=1, layout=layout, algorithm=algorithm)
        errors[algorithm] = np.abs(got - want).max() / np.abs(want).max()
    assert errors["direct"] <= 2 * errors["im2col"], errors


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_thread_counts_are_bit_identical(n_threads, layout):
    """Each output row's sums are its own: the result does not depend on the threads."""
    rng = np.random.default_rng(2)
    x, w, b = _problem(rng, 3, 6, 20, 30, 10, (5, 5), np.float32)
    if layout == "NHWC":
        x = _nhwc(x)
    args = dict(padding=2, layout=layout, algorithm="direct")
    serial = fastconv.conv2d(x, w, b, n_threads=1, **args)
    np.testing.assert_array_equal(fastconv.conv2d(x, w, b, n_threads=n_threads, **args),
                                  serial)


@pytest.mark.parametrize("F", [7, 40])
def test_both_builds_sum_alike(F, dtype, monkeypatch, layout):
    """Both builds sum each output's taps in the same order: bit-identical results, with
    the bias and the ReLU of the store."""
    if not _conv_direct.wide_kernel():
        pytest.skip("this CPU does not run the AVX-512 kernel")
    rng = np.random.default_rng(3)
    x, w, b = _problem(rng, 2, 6, 9, 30, F, (5, 5), dtype)
    if layout == "NHWC":
        x = _nhwc(x)
    got = {}
    for wide in (False, True):
        monkeypatch.setattr(_direct, "WIDE_KERNEL", wide)
        got[wide] = fastconv.conv2d(x, w, b, layout=layout, algorithm="direct",
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


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_relu_bias_none_and_inputs_kept(dtype, layout):
    rng = np.random.default_rng(6)
    x, w, b = _problem(rng, 2, 3 if layout == "NHWC" else 6, 8, 9, 20, (3, 3), dtype)
    want, want_no_bias = (reference.conv2d(x, w, bias, padding=1) for bias in (b, None))
    if layout == "NHWC":
        x, want, want_no_bias = (a.transpose(0, 2, 3, 1) for a in (x, want, want_no_bias))
        x = np.ascontiguousarray(x)
    kept = (x.copy(), w.copy(), b.copy())
    args = dict(padding=1, layout=layout, algorithm="direct")
    plain = fastconv.conv2d(x, w, b, **args)
    assert_matches(plain, want, dtype, w[0].size, "forward")
    np.testing.assert_array_equal(fastconv.conv2d(x, w, b, activation="relu", **args),
                                  np.maximum(plain, 0))
    assert_matches(fastconv.conv2d(x, w, None, **args), want_no_bias, dtype, w[0].size,
                   "no bias")
    for array, before in zip((x, w, b), kept):
        np.testing.assert_array_equal(array, before)
    # a non-contiguous input and an `out` array
    out = np.full_like(plain, np.nan)
    strided = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype)[..., ::2]
    strided[...] = x
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


def test_pack_weight_rows_puts_filters_innermost():
    w = np.arange(5 * 2 * 3 * 4, dtype=np.float64).reshape(5, 2, 3, 4)
    packed = _direct.pack_weight_rows(w, np.float64)
    assert packed.shape == (3 * 4 * 2, 8)           # filters padded to a 64-byte vector
    grid = packed.reshape(3, 4, 2, 8)               # [kh][kw][c]: an NHWC row's order
    np.testing.assert_array_equal(grid[1, 2, 0, :5], w[:, 0, 1, 2])
    np.testing.assert_array_equal(grid[..., 5:], 0)
    assert _direct.pack_weight_rows(w, np.float32).shape == (24, 16)
    grid = _direct.pack_weight_rows(w, np.float64, layout="NCHW").reshape(3, 2, 4, 8)
    np.testing.assert_array_equal(grid[1, 0, 2, :5], w[:, 0, 1, 2])   # [kh][c][kw]
    np.testing.assert_array_equal(grid[..., 5:], 0)


def test_nchw_rows_take_long_blocks_where_rows_are_short():
    """Rows narrower than NARROW_ROW: blocks of 2 filter vectors (12 pixels), else 4."""
    def vectors(size, layout="NCHW"):
        g = conv_geometry((2, 16, size, size), (32, 16, 3, 3), 2, 1, 1)
        return _direct._pixel_row_plan(g, 1, layout).vectors

    assert _direct.NARROW_ROW == 12
    assert vectors(22) == 2 and vectors(24) == 4     # 11 and 12 output columns
    assert vectors(22, "NHWC") == 4


def test_layer_caches_the_nchw_rows_filters_and_notices_updates(monkeypatch):
    rng = np.random.default_rng(9)
    layer = fastconv.Conv2D(8, 8, 3, stride=2, padding=1, rng=rng, dtype=np.float64,
                            algorithm="direct")
    x = rng.standard_normal((2, 8, 10, 10))
    packs = []
    real_pack = _direct.pack_weight_rows
    monkeypatch.setattr(_direct, "pack_weight_rows",
                        lambda *a, **k: packs.append(k) or real_pack(*a, **k))
    first = layer.forward(x)
    assert_matches(layer.forward(x), reference.conv2d(x, layer.W, layer.b, 2, 1), np.float64, 72)
    assert packs == [{"layout": "NCHW"}]
    layer.W *= 0.5                      # an in-place update: packed again
    assert_matches(layer.forward(x), reference.conv2d(x, layer.W, layer.b, 2, 1), np.float64, 72)
    assert len(packs) == 2
    assert not np.allclose(first, layer.forward(x))


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


def test_nchw_direct_runs_wider_layers_here_and_1x1_by_the_implicit_gemm(monkeypatch):
    """algorithm="direct" (and "auto" where fastconv._implicit.pays_off) on plain NCHW
    layers of more than four channels: pixel rows wider than 1x1, the implicit GEMM's
    in-place 1x1 kernel otherwise, the phase-row kernel with fewer channels."""
    from fastconv import _implicit

    ran = []
    for module, name in ((_direct, "forward_pixel_rows"), (_implicit, "forward"),
                         (_direct, "forward")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k:
                            ran.append((_name, k.get("layout"))) or _real(*a, **k))
    rng = np.random.default_rng(12)
    for C, kernel, algorithm, expect in [
            (8, (3, 3), "direct", ("forward_pixel_rows", "NCHW")),
            (8, (1, 1), "direct", ("forward", None)),
            (3, (3, 3), "direct", ("forward", None))]:
        x, w, b = _problem(rng, 2, C, 10, 10, 4, kernel, np.float64)
        ran.clear()
        got = fastconv.conv2d(x, w, b, stride=2, algorithm=algorithm)
        assert ran == [expect], (C, kernel)
        assert_matches(got, reference.conv2d(x, w, b, stride=2), np.float64, w[0].size)
    resnet = conv_geometry((8, 128, 56, 56), (128, 128, 3, 3), 2, 1, 1)
    assert _choose_algorithm("auto", resnet, "NCHW") == "direct"
    assert not _implicit.preferred(resnet)
    monkeypatch.setattr(_implicit, "WIDER_BY_PIXEL_ROWS", False)
    assert _implicit.preferred(resnet)


def test_auto_takes_nchw_pixel_rows_up_to_the_measured_filter_sizes(monkeypatch):
    """``fastconv._direct.pays_off_rows``: up to 6 MiB of float32 filters and 3 MiB of
    float64 ones with the AVX-512 build, the implicit GEMM's 1.25 MiB without it."""
    def auto(C, F, size, itemsize=4):
        g = conv_geometry((8, C, size, size), (F, C, 3, 3), 2, 1, 1, 1)
        return _choose_algorithm("auto", g, "NCHW", False, itemsize)

    monkeypatch.setattr(_direct, "WIDE_KERNEL", True)
    assert auto(128, 128, 56) == "direct"               # resnet-3x3-s2
    assert auto(192, 192, 28) == "direct"               # 1.27 MiB to 14x14
    assert auto(256, 256, 14) == "direct"               # 2.25 MiB to 7x7
    assert auto(384, 384, 28) == "direct"               # 5.06 MiB
    assert auto(512, 512, 14) == "im2col"               # 9 MiB
    assert auto(192, 192, 28, itemsize=8) == "direct"   # 2.53 MiB of float64
    assert auto(256, 256, 28, itemsize=8) == "im2col"   # 4.5 MiB of float64
    monkeypatch.setattr(_direct, "WIDE_KERNEL", False)
    assert auto(128, 128, 56) == "direct"               # 0.56 MiB
    assert auto(192, 192, 28) == "im2col"
