"""grad_x of strided layers by stride phases (fastconv._stride_phases): every phase's
taps, paddings that crop dY, band and vector tails, both kernel builds, the auto rule."""

import numpy as np
import pytest
from _helpers import assert_matches

import fastconv
from fastconv import _conv_direct, _direct, _stride_phases, reference
from fastconv._functional import _choose_algorithm
from fastconv._validation import conv_geometry


def _geometry(x_shape, w_shape, stride, padding):
    return conv_geometry(x_shape, w_shape, stride, padding, 1, 1, "zeros", string_padding=True)


def _grad_x(rng, N, C, H, W, F, kernel, stride, padding, dtype, n_threads=2):
    """(phases' grad_x, the reference's) of one random problem; grad_x starts as NaN,
    so an element the phases leave unwritten shows."""
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, *kernel)).astype(dtype)
    g = _geometry(x.shape, w.shape, stride, padding)
    dy = rng.standard_normal(g.output_shape).astype(dtype)
    got = np.full(x.shape, np.nan, dtype)
    _stride_phases.backward_input(dy, w, g, dtype, n_threads, got)
    return got, reference.conv2d_backward(dy, x, w, stride, padding)[0]


@pytest.fixture(params=["narrow", "wide"])
def kernel_build(request, monkeypatch):
    """Both builds of the pixel-row kernel: 32-byte vectors, and 64-byte ones where the
    CPU runs them."""
    wide = request.param == "wide"
    if wide and not _conv_direct.wide_kernel():
        pytest.skip("this CPU does not run the AVX-512 kernel")
    monkeypatch.setattr(_direct, "WIDE_KERNEL", wide)
    return wide


@pytest.fixture
def one_row_bands(monkeypatch):
    """Bands of one phase row: every item boundary is crossed."""
    monkeypatch.setattr(_direct, "BAND_ELEMENTS", 1)
    _stride_phases._phase_plan.cache_clear()
    yield
    _stride_phases._phase_plan.cache_clear()


#: kernels, strides and paddings: 1 to 3 taps per phase, phases of different sizes,
#: paddings beyond the kernel's reach (a phase's correlation then crops dY) and
#: asymmetric ones, 'same' with stride 2, 'valid'
GEOMETRIES = [
    ((3, 3), 2, 1), ((3, 3), 2, 0), ((3, 3), 2, 2), ((4, 4), 2, 1), ((5, 5), 2, 2),
    ((7, 7), 2, 3), ((3, 3), 3, (0, 2, 1, 2)), ((3, 2), (2, 1), 1), ((2, 5), (1, 3), (0, 1, 2, 0)),
    ((6, 6), 3, (4, 0, 1, 3)), ((3, 3), 2, "same"), ((4, 3), (2, 3), "valid"),
    ((2, 2), 2, 0), ((1, 3), (1, 2), 0),
]


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
@pytest.mark.parametrize("H,W", [(9, 11), (12, 7)])
def test_every_geometry_matches_the_reference(kernel, stride, padding, H, W, dtype,
                                              kernel_build):
    rng = np.random.default_rng(H * W)
    got, want = _grad_x(rng, 2, 5, H, W, 7, kernel, stride, padding, dtype)
    assert_matches(got, want, dtype, 7 * kernel[0] * kernel[1], "grad_x")


@pytest.mark.parametrize("C", [1, 15, 17, 33, 70])
@pytest.mark.parametrize("F", [1, 9, 40])
def test_channel_tails_and_one_row_bands(C, F, dtype, kernel_build, one_row_bands):
    """grad_x's channels are the kernel's vectors: counts around 8 and 16 lanes and
    past 64 (blocks of up to 4 vectors); dY's channels are its taps."""
    rng = np.random.default_rng(C * 100 + F)
    got, want = _grad_x(rng, 3, C, 10, 13, F, (3, 3), 2, 1, dtype, n_threads=3)
    assert_matches(got, want, dtype, F * 9, "grad_x")


def _taps_per_phase(size, stride, pad):
    """How many kernel taps along one axis each phase of it meets: input index
    ``stride*i + p`` meets the taps ``k = p + pad (mod stride)``."""
    return [sum(1 for k in range(size) if (k - p - pad) % stride == 0) for p in range(stride)]


@pytest.mark.parametrize("kernel,stride,padding", [
    ((3, 3), 2, 1), ((3, 3), 2, 0), ((3, 3), 2, (0, 1, 1, 0)), ((5, 5), 2, 2), ((4, 4), 2, 1)])
@pytest.mark.parametrize("C", [20, 40])
def test_without_winograd_leaves_the_2x2_phases_alone(kernel, stride, padding, C, dtype,
                                                      kernel_build):
    """The pass before the Winograd one writes every other phase in place, its values
    ``s_w`` apart (masked stores spread to every other lane in the AVX-512 builds), and
    must not touch the 2x2 phases' elements, which lie between them: those stay NaN."""
    rng = np.random.default_rng(C)
    N, H, W, F = 2, 13, 15, 7
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, *kernel)).astype(dtype)
    g = _geometry(x.shape, w.shape, stride, padding)
    dy = rng.standard_normal(g.output_shape).astype(dtype)
    got = np.full(x.shape, np.nan, dtype)
    _stride_phases.backward_input(dy, w, g, dtype, 2, got, without_winograd=True)
    want = reference.conv2d_backward(dy, x, w, stride, padding)[0]
    rows = np.array(_taps_per_phase(g.KH, g.stride_h, g.pad_top))[np.arange(H) % g.stride_h]
    cols = np.array(_taps_per_phase(g.KW, g.stride_w, g.pad_left))[np.arange(W) % g.stride_w]
    winograd = (rows[:, None] == 2) & (cols[None, :] == 2)
    assert winograd.any()
    assert np.isnan(got[..., winograd]).all()
    assert_matches(got[..., ~winograd], want[..., ~winograd], dtype, F * kernel[0] * kernel[1],
                   "grad_x")


def test_many_taps_sum_in_chunks(dtype):
    """A phase of more taps than the kernel sums in one run (FC_DN_CHUNK: 256)."""
    rng = np.random.default_rng(3)
    got, want = _grad_x(rng, 1, 20, 14, 14, 150, (5, 5), 2, 2, dtype)
    assert_matches(got, want, dtype, 150 * 25, "grad_x")


@pytest.mark.parametrize("n_threads", [1, 2, 3, 5])
def test_thread_counts_are_bit_identical(n_threads):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 20, 15, 15)).astype(np.float32)
    w = rng.standard_normal((12, 20, 3, 3)).astype(np.float32)
    g = _geometry(x.shape, w.shape, 2, 1)
    dy = rng.standard_normal(g.output_shape).astype(np.float32)
    one, many = np.empty_like(x), np.empty_like(x)
    _stride_phases.backward_input(dy, w, g, np.float32, 1, one)
    _stride_phases.backward_input(dy, w, g, np.float32, n_threads, many)
    np.testing.assert_array_equal(one, many)


def test_empty_batch_writes_nothing():
    g = _geometry((0, 4, 8, 8), (3, 4, 3, 3), 2, 1)
    grad_x = np.empty((0, 4, 8, 8))
    _stride_phases.backward_input(np.empty((0, 3, 4, 4)), np.ones((3, 4, 3, 3)), g,
                                  np.float64, 2, grad_x)


def test_workspace_does_not_grow_with_the_batch():
    """The per-thread rows and pointers come from one band, whatever N."""
    small = _stride_phases._phase_plan(_geometry((8, 128, 56, 56), (128, 128, 3, 3), 2, 1), 2)
    large = _stride_phases._phase_plan(_geometry((512, 128, 56, 56), (128, 128, 3, 3), 2, 1),
                                       2)
    assert large.band_elements <= small.band_elements
    assert large.pointers <= small.pointers


def test_applies_and_auto_rule():
    def geometry(C=128, kernel=(3, 3), stride=2, dilation=1, groups=1, mode="zeros"):
        return conv_geometry((8, C, 28, 28), (64, C // groups, *kernel), stride, 1,
                             dilation, groups, mode)

    applies, pays = _stride_phases.applies, _stride_phases.pays_off
    assert applies(geometry()) and pays(geometry())
    assert applies(geometry(stride=(1, 2))) and pays(geometry(kernel=(4, 4)))
    assert not applies(geometry(stride=1))                  # no phases
    assert not applies(geometry(dilation=2))
    assert not applies(geometry(groups=2))
    assert not applies(geometry(mode="reflect"))            # gradients through the border
    assert not applies(geometry(kernel=(1, 1)))             # phases without taps
    assert applies(geometry(C=32)) and not pays(geometry(C=32))       # few channels
    assert applies(geometry(kernel=(2, 2))) and not pays(geometry(kernel=(2, 2)))
    assert not pays(geometry(kernel=(3, 3), stride=3))      # one tap a phase


def test_conv2d_backward_takes_it_where_it_pays_off(monkeypatch):
    """'auto' runs it where pays_off holds (grad_weight chosen apart), 'direct' wherever it
    applies, 'im2col' never; every choice matches the reference."""
    calls = []
    original = _stride_phases.backward_input
    monkeypatch.setattr(_stride_phases, "backward_input",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    rng = np.random.default_rng(5)
    for C, algorithm, expected in ((64, "auto", True), (16, "auto", False),
                                   (16, "direct", True), (64, "im2col", False)):
        x = rng.standard_normal((2, C, 12, 12)).astype(np.float32)
        w = rng.standard_normal((8, C, 3, 3)).astype(np.float32)
        dy = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
        calls.clear()
        got = fastconv.conv2d_backward(dy, x, w, stride=2, padding=1, algorithm=algorithm)
        assert bool(calls) == expected, (C, algorithm)
        want = reference.conv2d_backward(dy, x, w, 2, 1)
        for name, a, b in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
            assert_matches(a, b, np.float32, 8 * 9 if name == "grad_x" else 72, name)
    g = _geometry((2, 64, 12, 12), (8, 64, 3, 3), 2, 1)
    assert _choose_algorithm("auto", g, "NCHW", backward=True) == "direct"
    assert _choose_algorithm("auto", g, "NHWC", backward=True) == "im2col"


def test_inputs_untouched_and_layer_backward():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 64, 14, 14)).astype(np.float32)
    w = rng.standard_normal((16, 64, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((2, 16, 7, 7)).astype(np.float32)
    copies = [a.copy() for a in (x, w, dy)]
    grad_x = fastconv.conv2d_backward(dy, x, w, stride=2, padding=1)[0]
    for a, c in zip((x, w, dy), copies):
        np.testing.assert_array_equal(a, c)
    layer = fastconv.Conv2D(64, 16, 3, stride=2, padding=1, bias=False)
    layer.W[...] = w
    layer.forward(x)
    np.testing.assert_array_equal(layer.backward(dy), grad_x)


#: layers with 2x2 phases: 3x3 stride 2 (one), 4x4 stride 2 (all four), 5x5 stride 2
#: (one of four), strides of 3 and 1 on one axis, a phase whose correlation crops dY
#: (padding beyond the kernel's reach on the left), 'same'
WINOGRAD_GEOMETRIES = [
    ((3, 3), 2, 1), ((3, 3), 2, 0), ((3, 3), 2, 2), ((4, 4), 2, 1), ((5, 5), 2, 2),
    ((6, 5), (3, 2), (3, 2, 3, 0)), ((3, 2), (2, 1), 1), ((2, 6), (1, 3), (0, 1, 2, 4)),
    ((3, 3), 2, "same"),
]


def _winograd_backward(rng, N, C, H, W, F, kernel, stride, padding, dtype, n_threads=2):
    """(grad_x, grad_weight) of :func:`_stride_phases.backward` from NaN-filled arrays, and
    the reference's."""
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, *kernel)).astype(dtype)
    g = _geometry(x.shape, w.shape, stride, padding)
    assert _stride_phases.winograd_applies(g)
    dy = rng.standard_normal(g.output_shape).astype(dtype)
    grad_x, grad_weight = np.full(x.shape, np.nan, dtype), np.full(w.shape, np.nan, dtype)
    _stride_phases.backward(dy, x, w, g, dtype, n_threads, grad_x, grad_weight)
    want = reference.conv2d_backward(dy, x, w, stride, padding)
    return (grad_x, grad_weight), want[:2], g


@pytest.mark.parametrize("kernel,stride,padding", WINOGRAD_GEOMETRIES)
@pytest.mark.parametrize("H,W", [(11, 13), (14, 9)])
def test_winograd_route_matches_the_reference(kernel, stride, padding, H, W, dtype):
    """Each 2x2 phase (and its four taps of grad_weight) by the phase Winograd, reading x
    and writing grad_x in place; the other phases and taps by the direct kernels."""
    rng = np.random.default_rng(H + W)
    got, want, g = _winograd_backward(rng, 2, 6, H, W, 5, kernel, stride, padding, dtype)
    assert_matches(got[0], want[0], dtype, 5 * kernel[0] * kernel[1], "grad_x")
    assert_matches(got[1], want[1], dtype, 2 * g.OH * g.OW, "grad_weight")


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_winograd_route_with_f4_tiles(n_threads, dtype):
    """Enough channel pairs for F(4x4, 2x2), on planes whose tiles end part-way."""
    rng = np.random.default_rng(n_threads)
    got, want, g = _winograd_backward(rng, 2, 96, 15, 17, 96, (3, 3), 2, 1, dtype, n_threads)
    phase = [p for p in _stride_phases._phases(g) if p.winograd][0]
    assert fastconv._phases.backward_tile(phase.geometry) == 4
    assert_matches(got[0], want[0], dtype, 96 * 9, "grad_x")
    assert_matches(got[1], want[1], dtype, 2 * g.OH * g.OW, "grad_weight")


def test_winograd_auto_rule():
    def pays(N=8, C=128, size=56, F=128, kernel=3):
        g = conv_geometry((N, C, size, size), (F, C, kernel, kernel), 2, 1, 1, 1)
        return _stride_phases.winograd_pays_off(g)

    assert pays()                                   # resnet-3x3-s2
    assert pays(C=256) and pays(F=256)
    assert pays(C=64, size=32, kernel=4)            # every phase 2x2
    assert not pays(N=1)                            # few tiles for the filters
    assert not pays(C=256, size=28, F=256)
    assert not pays(C=64, F=64)                     # F(2x2, 2x2)
    assert not pays(C=32, F=512)                    # grad_x's phases: few channels
    assert not _stride_phases.winograd_applies(conv_geometry((8, 64, 56, 56), (64, 64, 3, 3),
                                                             3, 1, 1, 1))   # no 2x2 phase


def test_conv2d_backward_takes_the_winograd_route(monkeypatch):
    calls = []
    original = _stride_phases.backward
    monkeypatch.setattr(_stride_phases, "backward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 96, 32, 32)).astype(np.float32)
    w = rng.standard_normal((96, 96, 3, 3)).astype(np.float32)
    g = _geometry(x.shape, w.shape, 2, 1)
    assert _stride_phases.winograd_pays_off(g)
    dy = rng.standard_normal(g.output_shape).astype(np.float32)
    copies = [a.copy() for a in (x, w, dy)]
    got = fastconv.conv2d_backward(dy, x, w, stride=2, padding=1)
    assert calls
    for a, c in zip((x, w, dy), copies):
        np.testing.assert_array_equal(a, c)
    want = reference.conv2d_backward(dy, x, w, 2, 1)
    assert_matches(got[0], want[0], np.float32, 96 * 9, "grad_x")
    assert_matches(got[1], want[1], np.float32, 5 * 256, "grad_weight")
    assert_matches(got[2], want[2], np.float32, 5 * 256, "grad_bias")
    calls.clear()
    fastconv.conv2d_backward(dy, x, w, stride=2, padding=1, algorithm="direct")
    assert not calls                                # only 'auto' takes it
