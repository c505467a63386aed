"""The implicit-GEMM direct kernel (algorithm="direct" on plain layers of > 4 channels):
strips, bands, channel blocks, phases, in-place 1x1 layers and the auto rule."""

import numpy as np
import pytest
from _helpers import assert_forward_matches_reference, assert_matches

import fastconv
from fastconv import _conv_implicit, _implicit, reference
from fastconv._functional import _choose_algorithm
from fastconv._validation import conv_geometry


def _problem(rng, N, C, H, W, F, kernel, dtype):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, *kernel)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


def _spy(monkeypatch, name):
    """A list that gets an entry at every call of ``_implicit.<name>``, which still runs."""
    calls = []
    original = getattr(_implicit, name)
    monkeypatch.setattr(_implicit, name, lambda *args: calls.append(1) or original(*args))
    return calls


def _geometry(x, w, **args):
    return conv_geometry(x.shape, w.shape, args.get("stride", 1), args.get("padding", 0),
                         args.get("dilation", 1), 1, args.get("padding_mode", "zeros"),
                         string_padding=True)


#: Kernels, strides, dilations and paddings (every form) that the forward and the weight
#: gradient are both tested over.
GEOMETRIES = [
    ((3, 3), 2, 1, 1), ((7, 7), 2, 1, 3), ((5, 5), 1, 1, 0), ((3, 3), 3, 1, (0, 2, 1, 2)),
    ((3, 2), (2, 3), 2, 1), ((1, 1), 2, 1, 0), ((1, 1), (1, 3), 1, (1, 0, 2, 0)),
    ((4, 4), (1, 2), (2, 3), "same"), ((2, 5), 4, 1, "full"), ((3, 3), 1, 2, "same"),
]


@pytest.fixture(autouse=True)
def every_plain_layer_runs_here(monkeypatch):
    """algorithm="direct" runs this kernel for plain layers wider than 1x1 too (by default
    those run fastconv._direct's pixel-row kernel, tests/test_direct_nhwc.py), so its
    strips, bands and phases stay tested through the API."""
    monkeypatch.setattr(_implicit, "WIDER_BY_PIXEL_ROWS", False)


@pytest.fixture
def small_blocks(monkeypatch):
    """Bands of one or two rows, channel blocks of 2-3 channels, 5 taps per pass: every
    loop of the kernel and driver runs several times and ends on a partial block."""
    monkeypatch.setattr(_implicit, "BAND_BYTES", 1)
    monkeypatch.setattr(_implicit, "TAP_BLOCK", 20)
    monkeypatch.setattr(_implicit, "K_BLOCK", 5)
    _implicit._plane_plan.cache_clear()
    yield
    _implicit._plane_plan.cache_clear()


@pytest.fixture(params=["narrow", "wide"])
def kernel_build(request, monkeypatch):
    """Both builds of the kernel: 3 vectors of 32 bytes, and 2 of 64 bytes where the CPU
    runs the AVX-512 one (its strips are longer: 32 floats, 16 doubles), here whatever
    the positions."""
    wide = request.param == "wide"
    if wide and not _conv_implicit.wide_kernel():
        pytest.skip("this CPU does not run the AVX-512 kernel")
    monkeypatch.setattr(_implicit, "WIDE_KERNEL", wide)
    monkeypatch.setattr(_implicit, "WIDE_MAX_POSITIONS", float("inf"))
    _implicit._plane_plan.cache_clear()
    yield wide
    _implicit._plane_plan.cache_clear()


def test_layers_of_more_than_four_channels_run_here():
    rng = np.random.default_rng(0)
    x, w, _ = _problem(rng, 1, 5, 8, 8, 4, (3, 3), np.float32)
    assert _implicit.preferred(_geometry(x, w))
    x, w, _ = _problem(rng, 1, 4, 8, 8, 4, (3, 3), np.float32)
    assert not _implicit.preferred(_geometry(x, w))    # the row kernel's


# filter counts around the 4-filter blocks; positions (OH x OW) around the strips of
# 24 / 12 (float32 / float64) and 32 / 16 (the AVX-512 build), with output widths that
# split a strip's rows
@pytest.mark.parametrize("F", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("OH,OW", [(1, 1), (1, 11), (2, 12), (3, 8), (1, 25), (5, 23), (7, 7),
                                   (1, 15), (1, 17), (2, 16), (1, 33), (3, 11)])
def test_filter_blocks_and_strip_tails(F, OH, OW, dtype, kernel_build):
    rng = np.random.default_rng(1)
    x, w, b = _problem(rng, 2, 6, OH + 2, OW + 2, F, (3, 3), dtype)
    y = fastconv.conv2d(x, w, b, algorithm="direct")
    assert y.shape == (2, F, OH, OW)
    assert_matches(y, reference.conv2d(x, w, b), dtype, 6 * 9, "forward")


@pytest.mark.parametrize("kernel,stride,dilation,padding", GEOMETRIES)
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_strides_dilations_padding_modes_and_blocks(kernel, stride, dilation, padding, mode,
                                                     blocks, dtype, request, kernel_build):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    rng = np.random.default_rng(2)
    x, w, b = _problem(rng, 2, 7, 19, 23, 6, kernel, dtype)
    assert_forward_matches_reference(x, w, b, dtype, 7 * kernel[0] * kernel[1], stride=stride,
                                     padding=padding, dilation=dilation, padding_mode=mode,
                                     algorithm="direct")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_and_relu_in_the_store(relu, with_bias, dtype, small_blocks, kernel_build):
    rng = np.random.default_rng(3)
    x, w, b = _problem(rng, 3, 9, 11, 13, 5, (3, 3), dtype)
    b = b if with_bias else None
    got = fastconv.conv2d(x, w, b, stride=2, padding=1, algorithm="direct",
                          activation="relu" if relu else None)
    want = reference.conv2d(x, w, b, stride=2, padding=1)
    assert_matches(got, np.maximum(want, 0) if relu else want, dtype, 81, "forward")


# 1x1, stride 1, unpadded: the input is read in place; the last strip of an image ends
# at its last position (OH*OW not a multiple of the strip), or the image is smaller than
# one strip and takes the planes after all
@pytest.mark.parametrize("H,W", [(1, 1), (2, 5), (3, 4), (5, 5), (4, 6), (7, 9), (8, 16)])
@pytest.mark.parametrize("C,F", [(5, 3), (40, 9)])
def test_pointwise_layers_read_the_input_in_place(H, W, C, F, dtype, kernel_build):
    rng = np.random.default_rng(4)
    x, w, b = _problem(rng, 3, C, H, W, F, (1, 1), dtype)
    x_before = x.copy()
    got = fastconv.conv2d(x, w, b, algorithm="direct", n_threads=2)
    assert_matches(got, reference.conv2d(x, w, b), dtype, C, "forward")
    np.testing.assert_array_equal(x, x_before)
    g = _geometry(x, w)
    strip = _implicit.strip_positions(g, np.dtype(dtype).itemsize)
    assert _implicit.in_place(g, np.dtype(dtype).itemsize) == (H * W >= strip)


def test_unread_phases_get_no_planes():
    """A 1x1 stride-2 layer reads one phase of four; 3x3 stride 2 all four; 2x2
    dilation-2 stride 2 only the even rows and columns."""
    def phases(kernel, stride, dilation=1):
        g = conv_geometry((1, 8, 16, 16), (4, 8, *kernel), stride, 0, dilation, 1)
        return _implicit._plane_plan(g, 4, 1).phases

    assert phases((1, 1), 2) == 1
    assert phases((3, 3), 2) == 4
    assert phases((2, 2), 2, dilation=2) == 1
    assert phases((3, 3), (2, 1)) == 2


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_thread_counts_are_bit_identical(n_threads):
    """Each band of rows is one work item with its own sums, in the same order whatever
    thread runs it."""
    rng = np.random.default_rng(5)
    x, w, b = _problem(rng, 3, 24, 20, 30, 10, (3, 3), np.float32)
    serial = fastconv.conv2d(x, w, b, stride=2, padding=1, algorithm="direct", n_threads=1)
    got = fastconv.conv2d(x, w, b, stride=2, padding=1, algorithm="direct", n_threads=n_threads)
    np.testing.assert_array_equal(got, serial)


def test_items_are_runs_of_strips_that_may_start_inside_a_row(monkeypatch):
    """resnet-3x3-s2: 28 rows of 29 positions are 34 strips of 24, split 9 + 9 + 9 + 7
    (items of whole rows, 9 + 9 + 9 + 1, took 35); an item's planes hold the rows its
    positions touch, from a row that its first position may start inside."""
    monkeypatch.setattr(_implicit, "WIDE_KERNEL", False)
    _implicit._plane_plan.cache_clear()
    g = conv_geometry((8, 128, 56, 56), (128, 128, 3, 3), 2, 1, 1, 1)
    plan = _implicit._plane_plan(g, 4, 2)
    strip = _implicit.strip_positions(g, 4)
    image_strips = -(-g.OH * plan.Wq // strip)
    assert (plan.Wq, strip, image_strips) == (29, 24, 34)
    assert plan.band_strips == 9
    # the last item (strips 27..33) starts at position 648 = row 22, column 10
    assert plan.band_rows * plan.Wq >= plan.band_strips * strip + plan.Wq - 1
    _implicit._plane_plan.cache_clear()


def test_the_wide_build_runs_where_its_strips_fit_the_positions(monkeypatch):
    """Strips of 32 floats where an image's positions fill them about as well as strips
    of 24: resnet-3x3-s2 (812 positions: 832 computed against 816); not 72 positions
    (96 against 72)."""
    monkeypatch.setattr(_implicit, "WIDE_KERNEL", True)
    resnet = conv_geometry((8, 128, 56, 56), (128, 128, 3, 3), 2, 1, 1, 1)
    small = conv_geometry((8, 64, 16, 16), (64, 64, 3, 3), 2, 1, 1, 1)
    assert _implicit.strip_positions(resnet, 4) == 32
    assert _implicit.strip_positions(resnet, 8) == 16
    assert _implicit.strip_positions(small, 4) == 24
    monkeypatch.setattr(_implicit, "WIDE_KERNEL", False)
    assert _implicit.strip_positions(resnet, 4) == 24


def test_both_builds_sum_alike(kernel_build, dtype, monkeypatch):
    """The AVX-512 build sums each position's taps in the same order, passes of K_BLOCK
    taps added to the stored sums: its results are the narrow build's, bit for bit."""
    rng = np.random.default_rng(9)
    x, w, b = _problem(rng, 3, 20, 29, 31, 9, (3, 3), dtype)
    got = fastconv.conv2d(x, w, b, stride=2, padding=1, algorithm="direct", n_threads=2)
    monkeypatch.setattr(_implicit, "WIDE_KERNEL", False)
    _implicit._plane_plan.cache_clear()
    narrow = fastconv.conv2d(x, w, b, stride=2, padding=1, algorithm="direct", n_threads=2)
    np.testing.assert_array_equal(got, narrow)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_items_starting_inside_rows_match_the_reference(n_threads, monkeypatch,
                                                        kernel_build):
    """Bands of a single strip: every item but the first starts inside a plane row, and
    an image's last strip runs past its last position."""
    monkeypatch.setattr(_implicit, "BAND_BYTES", 1)
    _implicit._plane_plan.cache_clear()
    rng = np.random.default_rng(8)
    x, w, b = _problem(rng, 2, 6, 21, 17, 5, (3, 3), np.float32)
    got = fastconv.conv2d(x, w, b, stride=2, padding=1, algorithm="direct",
                          n_threads=n_threads)
    _implicit._plane_plan.cache_clear()
    assert_matches(got, reference.conv2d(x, w, b, stride=2, padding=1), np.float32, 54,
                   "forward")


def test_batch_of_one_splits_into_bands():
    rng = np.random.default_rng(6)
    x, w, b = _problem(rng, 1, 32, 40, 40, 8, (5, 5), np.float32)
    g = _geometry(x, w, padding=2)
    assert _implicit._plane_plan(g, 4, 2).band_rows < g.OH
    got = fastconv.conv2d(x, w, b, padding=2, algorithm="direct", n_threads=2)
    assert_matches(got, reference.conv2d(x, w, b, padding=2), np.float32, 800, "forward")


def test_out_and_inputs_untouched():
    rng = np.random.default_rng(7)
    x, w, b = _problem(rng, 2, 8, 9, 9, 5, (3, 3), np.float64)
    copies = [a.copy() for a in (x, w, b)]
    out = np.full((2, 5, 5, 5), np.nan)
    got = fastconv.conv2d(x, w, b, stride=2, padding=1, algorithm="direct", out=out)
    assert got is out
    assert_matches(out, reference.conv2d(x, w, b, stride=2, padding=1), np.float64, 72)
    for a, c in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, c)


def test_conv2d_layer_runs_it():
    rng = np.random.default_rng(8)
    layer = fastconv.Conv2D(16, 8, 3, stride=2, padding=1, rng=rng, activation="relu")
    x = rng.standard_normal((2, 16, 12, 12)).astype(np.float32)
    want = np.maximum(reference.conv2d(x, layer.W, layer.b, stride=2, padding=1), 0)
    assert_matches(layer.forward(x), want, np.float32, 144, "forward")


def test_auto_rule():
    def auto(C, F, kernel, stride=1, itemsize=4, layout="NCHW", backward=False):
        g = conv_geometry((2, C, 28, 28), (F, C, kernel, kernel), stride, kernel // 2, 1, 1)
        return _choose_algorithm("auto", g, layout, backward, itemsize)

    assert auto(128, 128, 3, stride=2) == "direct"                  # resnet-3x3-s2
    assert auto(128, 128, 3, stride=2, itemsize=8) == "direct"      # 1.13 MiB of float64
    assert auto(192, 192, 3, stride=2) == "im2col"                  # 1.27 MiB to 14x14
    assert auto(256, 256, 3, stride=2) == "im2col"                  # 2.25 MiB
    assert auto(32, 32, 7) == "direct"
    assert auto(32, 32, 7, itemsize=8) == "direct"
    assert auto(256, 64, 1) == "im2col"                             # 1x1: a plain GEMM
    assert auto(64, 64, 3) == "winograd"
    assert auto(3, 64, 7, stride=2) == "direct"                     # the row kernel's
    assert not _implicit.preferred(conv_geometry((2, 3, 28, 28), (64, 3, 7, 7), 2, 3, 1, 1))
    assert auto(128, 128, 3, stride=2, layout="NHWC") == "direct"   # the NHWC kernel's
    # grad_x: by stride phases (tests/test_stride_phases.py)
    assert auto(128, 128, 3, stride=2, backward=True) == "direct"
    assert auto(32, 32, 3, stride=2, backward=True) == "im2col"


def test_auto_takes_larger_filters_by_the_wide_kernel_on_larger_outputs(monkeypatch):
    """Up to AUTO_MAX_WEIGHT_BYTES_WIDE of float32 filters by the AVX-512 build where each
    image has at least AUTO_WIDE_MIN_POSITIONS output pixels."""
    def auto(C, F, size, itemsize=4):
        g = conv_geometry((8, C, size, size), (F, C, 3, 3), 2, 1, 1, 1)
        return _choose_algorithm("auto", g, "NCHW", False, itemsize)

    monkeypatch.setattr(_implicit, "WIDE_KERNEL", True)
    assert auto(192, 192, 56) == "direct"               # 1.27 MiB to 28x28
    assert auto(384, 384, 56) == "direct"               # 5.1 MiB
    assert auto(512, 512, 56) == "im2col"               # 9 MiB
    assert auto(256, 256, 28) == "im2col"               # to 14x14
    assert auto(192, 192, 56, itemsize=8) == "im2col"   # float64
    monkeypatch.setattr(_implicit, "WIDE_KERNEL", False)
    assert auto(192, 192, 56) == "im2col"


def test_auto_takes_the_in_place_kernel_for_channel_reducing_1x1_layers(monkeypatch):
    """1x1 layers of at most AUTO_POINTWISE_MAX_FILTERS filters, in float32, by the
    AVX-512 build, with enough output pixels."""
    def auto(N, C, F, size, stride=1, itemsize=4):
        g = conv_geometry((N, C, size, size), (F, C, 1, 1), stride, 0, 1, 1)
        return _choose_algorithm("auto", g, "NCHW", False, itemsize)

    monkeypatch.setattr(_implicit, "WIDE_KERNEL", True)
    assert auto(8, 256, 64, 56) == "direct"                 # resnet-1x1
    assert auto(8, 512, 128, 28) == "direct"
    assert auto(64, 2048, 128, 7) == "direct"
    assert auto(8, 256, 128, 28) == "direct"
    assert auto(8, 128, 128, 56) == "direct"                # as many filters as channels
    assert auto(8, 64, 128, 56) == "direct"                 # an expansion
    assert auto(8, 64, 256, 56) == "im2col"                 # > 128 filters
    assert auto(8, 1024, 256, 14) == "im2col"               # > 128 filters
    assert auto(8, 256, 64, 56, itemsize=8) == "im2col"     # float64
    assert auto(1, 512, 128, 28) == "im2col"                # 784 output pixels
    assert auto(8, 256, 64, 56, stride=2) == "im2col"       # not read in place
    monkeypatch.setattr(_implicit, "WIDE_KERNEL", False)
    assert auto(8, 256, 64, 56) == "im2col"                 # the 32-byte build


@pytest.mark.parametrize("N,C,F,H,W", [(1, 5, 3, 6, 7), (3, 9, 17, 5, 11), (2, 40, 8, 9, 9),
                                       (2, 16, 64, 13, 13)])
def test_pointwise_input_grad_in_place(N, C, F, H, W, dtype, kernel_build):
    """grad_x of a 1x1 layer as the in-place forward of dY by the transposed filters, on
    planes whose positions end in a partial strip, with fewer and more channels than
    filters."""
    rng = np.random.default_rng(C * F)
    x, w, _ = _problem(rng, N, C, H, W, F, (1, 1), dtype)
    dy = rng.standard_normal((N, F, H, W)).astype(dtype)
    g = _geometry(x, w)
    grad_x = np.full(x.shape, np.nan, dtype)
    _implicit.backward_input_in_place(dy, w, g, dtype, 2, grad_x)
    assert_matches(grad_x, reference.conv2d_backward(dy, x, w)[0], dtype, F, "grad_x")


def test_auto_takes_the_in_place_input_grad_of_1x1_layers_on_large_planes(monkeypatch):
    """In float32 by the AVX-512 build, with at most AUTO_POINTWISE_INPUT_GRAD_MAX_CHANNELS
    channels on planes of AUTO_POINTWISE_INPUT_GRAD_MIN_PLANE pixels or more; and it is
    what conv2d_backward computes there."""
    def pays(C, F, size, itemsize=4, stride=1):
        g = conv_geometry((8, C, size, size), (F, C, 1, 1), stride, 0, 1, 1)
        return _implicit.pointwise_input_grad_pays_off(g, itemsize)

    monkeypatch.setattr(_implicit, "WIDE_KERNEL", True)
    assert pays(256, 64, 56)                    # resnet-1x1
    assert pays(64, 64, 56) and pays(128, 32, 112)
    assert not pays(256, 64, 28)                # smaller planes
    assert not pays(512, 128, 56)               # more channels
    assert not pays(256, 64, 56, itemsize=8)    # float64
    assert not pays(256, 64, 56, stride=2)      # not read in place
    monkeypatch.setattr(_implicit, "WIDE_KERNEL", False)
    assert not pays(256, 64, 56)                # the 32-byte build
    monkeypatch.setattr(_implicit, "WIDE_KERNEL", _conv_implicit.wide_kernel())
    called = _spy(monkeypatch, "backward_input_in_place")
    rng = np.random.default_rng(4)
    x, w, _ = _problem(rng, 2, 24, 56, 56, 8, (1, 1), np.float32)
    dy = rng.standard_normal((2, 8, 56, 56)).astype(np.float32)
    grad_x = fastconv.conv2d_backward(dy, x, w)[0]
    assert bool(called) == _implicit.pointwise_input_grad_pays_off(_geometry(x, w))
    assert_matches(grad_x, reference.conv2d_backward(dy, x, w)[0], np.float32, 8, "grad_x")
    called.clear()
    fastconv.conv2d_backward(dy, x, w, algorithm="im2col")
    assert not called                           # asked for im2col


def test_auto_weight_grad_rule():
    """'auto' runs the implicit weight gradient on layers wider than 1x1 with at least
    AUTO_MIN_WEIGHT_GRAD_POSITIONS output pixels per image and at most
    AUTO_MAX_WEIGHT_BYTES of filters, after the row kernel's and Winograd's."""
    from fastconv._functional import _weight_grad_algorithm

    def weight_grad(C, F, kernel, size, stride=1, itemsize=4):
        g = conv_geometry((2, C, size, size), (F, C, kernel, kernel), stride, kernel // 2, 1, 1)
        grad_x = _choose_algorithm("auto", g, "NCHW", True, itemsize)
        return _weight_grad_algorithm("auto", grad_x, g, itemsize)

    assert _implicit.AUTO_MIN_WEIGHT_GRAD_POSITIONS == 576
    assert weight_grad(128, 128, 3, 56, stride=2) == "direct"          # resnet-3x3-s2
    assert weight_grad(128, 128, 3, 48, stride=2) == "direct"          # 24x24 outputs
    assert weight_grad(128, 128, 3, 40, stride=2) == "im2col"          # 20x20
    assert weight_grad(256, 256, 3, 56, stride=2) == "im2col"          # 2.25 MiB of filters
    assert weight_grad(128, 128, 3, 56, stride=2, itemsize=8) == "direct"   # 1.13 MiB
    assert weight_grad(32, 64, 5, 28) == "direct"
    assert weight_grad(256, 64, 1, 56) == "im2col"                     # 1x1: a plain GEMM
    assert weight_grad(64, 64, 3, 56) == "winograd"
    assert weight_grad(3, 64, 7, 224, stride=2) == "direct"            # the row kernel's


def test_auto_backward_runs_the_implicit_weight_gradient(monkeypatch):
    """conv2d_backward(algorithm='auto') on a layer the rule takes: grad_weight by the
    implicit kernel (the reference's values), grad_x and grad_bias as by im2col."""
    calls = _spy(monkeypatch, "backward_weight")
    rng = np.random.default_rng(14)
    x, w, _ = _problem(rng, 2, 6, 50, 50, 5, (3, 3), np.float64)
    dy = rng.standard_normal((2, 5, 25, 25))
    got = fastconv.conv2d_backward(dy, x, w, stride=2, padding=1)
    assert calls
    want = reference.conv2d_backward(dy, x, w, 2, 1)
    for g, e in zip(got, want):
        assert_matches(g, e, np.float64, 2 * 625, "backward")


def test_layer_caches_the_packed_filters_and_notices_updates(monkeypatch):
    rng = np.random.default_rng(9)
    layer = fastconv.Conv2D(8, 8, 3, stride=2, padding=1, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 8, 10, 10))
    packs = []
    real_pack = fastconv._direct.pack_weight
    monkeypatch.setattr(fastconv._direct, "pack_weight",
                        lambda w, dtype: packs.append(1) or real_pack(w, dtype))
    first = layer.forward(x)
    assert_matches(layer.forward(x), reference.conv2d(x, layer.W, layer.b, 2, 1), np.float64, 72)
    assert len(packs) == 1
    layer.W *= 0.5                      # an in-place update: packed again
    assert_matches(layer.forward(x), reference.conv2d(x, layer.W, layer.b, 2, 1), np.float64, 72)
    assert len(packs) == 2
    assert not np.allclose(first, layer.forward(x))


def test_backward_of_direct_beyond_four_channels(dtype):
    """Beyond 4 channels 'direct' runs the implicit weight gradient (the row kernel's
    weight gradient, built for a few channels, took 2x im2col's time at 128), and grad_x
    by im2col, or by stride phases on a strided layer (tests/test_stride_phases.py)."""
    rng = np.random.default_rng(10)
    x, w, b = _problem(rng, 2, 5, 9, 9, 6, (3, 3), dtype)
    dy = rng.standard_normal((2, 6, 5, 5)).astype(dtype)
    got = fastconv.conv2d_backward(dy, x, w, stride=2, padding=1, algorithm="direct")
    want = fastconv.conv2d_backward(dy, x, w, stride=2, padding=1, algorithm="im2col")
    assert_matches(got[0], reference.conv2d_backward(dy, x, w, 2, 1)[0], dtype, 6 * 9,
                   "grad_x")
    np.testing.assert_array_equal(got[2], want[2])
    dy1 = rng.standard_normal((2, 6, 9, 9)).astype(dtype)
    np.testing.assert_array_equal(
        fastconv.conv2d_backward(dy1, x, w, padding=1, algorithm="direct")[0],
        fastconv.conv2d_backward(dy1, x, w, padding=1, algorithm="im2col")[0])
    assert_matches(got[1], reference.conv2d_backward(dy, x, w, 2, 1)[1], dtype, 2 * 25,
                   "grad_weight")


@pytest.fixture
def small_weight_grad_items(monkeypatch):
    """Weight-gradient items of one output row and one channel: every band and block
    boundary is crossed."""
    monkeypatch.setattr(_implicit, "WEIGHT_GRAD_PLANE_BYTES", 1)
    _implicit._weight_grad_plan.cache_clear()
    yield
    _implicit._weight_grad_plan.cache_clear()


def _weight_grad(x, w, dy, dtype, n_threads=2, **args):
    g = _geometry(x, w, **args)
    out = np.full(w.size, np.nan, dtype)
    return _implicit.backward_weight(np.ascontiguousarray(x, dtype), np.ascontiguousarray(dy),
                                     g, dtype, n_threads, out).reshape(w.shape)


@pytest.mark.parametrize("kernel,stride,dilation,padding", GEOMETRIES)
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("items", ["default", "small"])
def test_weight_grad_strides_dilations_padding_modes_and_items(kernel, stride, dilation,
                                                               padding, mode, items, dtype,
                                                               request):
    if items == "small":
        request.getfixturevalue("small_weight_grad_items")
    rng = np.random.default_rng(11)
    x, w, _ = _problem(rng, 2, 7, 19, 23, 6, kernel, dtype)
    args = dict(stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    try:
        g = _geometry(x, w, **args)
    except ValueError:
        return          # reflect padding >= the input: refused before any kernel
    dy = rng.standard_normal(g.output_shape).astype(dtype)
    want = reference.conv2d_backward(dy, x, w, stride, padding, dilation,
                                     padding_mode=mode)[1]
    assert_matches(_weight_grad(x, w, dy, dtype, **args), want, dtype,
                   2 * g.OH * g.OW, "grad_weight")


# filter counts around the filter pairs, taps around the blocks of 6 (1x1: 1 per channel,
# 3x3: 9), positions around the 8 (4) lanes of float32 (float64)
@pytest.mark.parametrize("F", [1, 2, 3, 5])
@pytest.mark.parametrize("C,kernel", [(1, (1, 1)), (5, (1, 1)), (6, (1, 1)), (1, (3, 3)),
                                      (3, (3, 3)), (2, (2, 3))])
@pytest.mark.parametrize("OH,OW", [(1, 1), (1, 7), (2, 4), (3, 5), (4, 9)])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_weight_grad_filter_tap_and_lane_tails(F, C, kernel, OH, OW, n_threads, dtype):
    rng = np.random.default_rng(12)
    x, w, _ = _problem(rng, 3, C, OH + kernel[0] - 1, OW + kernel[1] - 1, F, kernel, dtype)
    dy = rng.standard_normal((3, F, OH, OW)).astype(dtype)
    want = reference.conv2d_backward(dy, x, w)[1]
    assert_matches(_weight_grad(x, w, dy, dtype, n_threads), want, dtype, 3 * OH * OW,
                   "grad_weight")


def test_weight_grad_inputs_untouched_and_workspace_bounded():
    """x and dY are only read; the workspace (planes and per-thread sums) is the same
    for a batch of 2 and of 16."""
    from _helpers import run_in_thread

    from fastconv import _workspace

    def sizes():
        rng = np.random.default_rng(13)
        found = []
        for N in (2, 16):
            x, w, _ = _problem(rng, N, 9, 12, 12, 8, (3, 3), np.float32)
            dy = rng.standard_normal((N, 8, 6, 6)).astype(np.float32)
            x0, dy0 = x.copy(), dy.copy()
            _weight_grad(x, w, dy, np.float32, stride=2, padding=1)
            np.testing.assert_array_equal(x, x0)
            np.testing.assert_array_equal(dy, dy0)
            found.append({k: b.size for k, b in _workspace._local.buffers.items()})
        return found

    small, large = run_in_thread(sizes)
    assert small == large


@pytest.mark.parametrize("taps", [(0,), (1, 3, 4, 5, 7), (8, 2)])
def test_weight_grad_of_some_taps(taps, dtype):
    """``taps``: only those taps of each channel, compact, as the full gradient's."""
    rng = np.random.default_rng(len(taps))
    x, w, _ = _problem(rng, 2, 7, 13, 11, 5, (3, 3), dtype)
    g = _geometry(x, w, stride=2, padding=1)
    dy = rng.standard_normal(g.output_shape).astype(dtype)
    full = _weight_grad(x, w, dy, dtype, stride=2, padding=1).reshape(5, 7, 9)
    some = np.full(5 * 7 * len(taps), np.nan, dtype)
    _implicit.backward_weight(x, dy, g, dtype, 2, some, taps=taps)
    np.testing.assert_array_equal(some.reshape(5, 7, -1), full[:, :, list(taps)])
