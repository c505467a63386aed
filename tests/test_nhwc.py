"""The channels-last engine (fastconv._nhwc, fastconv._conv_nhwc) against the NCHW engine.

Oracle: fastconv.conv2d / conv2d_backward (groups=1, zero padding; tested against
the NumPy reference in test_functional.py) on transposed copies. Groups run as
a loop of those calls over channel slices; padding modes pad the NCHW input
with np.pad and fold the padded input's gradient back through the same index
maps (np.pad of an arange) with np.add.at.
"""

import ctypes
import itertools
import mmap
import sys

import numpy as np
import pytest
from _helpers import assert_matches

import fastconv
from fastconv import _conv_nhwc, _nhwc, _tiling, _winograd, reference
from fastconv._validation import as_padding, conv_geometry, conv_output_size

NUMPY_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# ---------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------


def _pad_nchw(x, pads, mode):
    top, bottom, left, right = pads
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), mode=NUMPY_PAD_MODES[mode])


def _fold_padded(grad_padded, pads, mode, H, W):
    """The adjoint of :func:`_pad_nchw`: each padded pixel's gradient goes to the pixel it copied."""
    top, bottom, left, right = pads
    rows = np.pad(np.arange(H), (top, bottom), mode=NUMPY_PAD_MODES[mode])
    cols = np.pad(np.arange(W), (left, right), mode=NUMPY_PAD_MODES[mode])
    N, C = grad_padded.shape[:2]
    by_rows = np.zeros((N, C, H, grad_padded.shape[3]), grad_padded.dtype)
    np.add.at(by_rows, (slice(None), slice(None), rows), grad_padded)
    out = np.zeros((N, C, H, W), grad_padded.dtype)
    np.add.at(out, (slice(None), slice(None), slice(None), cols), by_rows)
    return out


def oracle(x_nhwc, weight, bias, grad_nhwc, stride, pads, dilation, groups, mode):
    """(y, grad_x, grad_weight, grad_bias) in NHWC from per-group NCHW calls."""
    x = x_nhwc.transpose(0, 3, 1, 2)
    N, C, H, W = x.shape
    F = weight.shape[0]
    Cg, Fg = C // groups, F // groups
    conv_pads = pads
    if mode != "zeros":
        x = _pad_nchw(x, pads, mode)
        conv_pads = 0
    ys, gxs, gws, gbs = [], [], [], []
    for g in range(groups):
        xs = x[:, g * Cg:(g + 1) * Cg]
        ws = weight[g * Fg:(g + 1) * Fg]
        bs = None if bias is None else bias[g * Fg:(g + 1) * Fg]
        ys.append(fastconv.conv2d(xs, ws, bs, stride, conv_pads, dilation, n_threads=1))
        dy = grad_nhwc.transpose(0, 3, 1, 2)[:, g * Fg:(g + 1) * Fg]
        gx, gw, gb = fastconv.conv2d_backward(dy, xs, ws, stride, conv_pads, dilation, n_threads=1)
        gxs.append(gx)
        gws.append(gw)
        gbs.append(gb)
    y = np.concatenate(ys, axis=1)
    gx = np.concatenate(gxs, axis=1)
    if mode != "zeros":
        gx = _fold_padded(gx, pads, mode, H, W)
    return (y.transpose(0, 2, 3, 1), gx.transpose(0, 2, 3, 1), np.concatenate(gws),
            np.concatenate(gbs))


def check(N, C, H, W, F, kernel, stride=1, padding=0, dilation=1, groups=1, mode="zeros",
          dtype=np.float64, n_threads=2, bias=True, seed=0):
    """NHWC forward and backward equal the oracle; inputs are left unchanged."""
    rng = np.random.default_rng(seed)
    KH, KW = kernel
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    weight = rng.standard_normal((F, C // groups, KH, KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    geometry = conv_geometry((N, C, H, W), weight.shape, stride, padding, dilation, groups, mode)
    pads = (geometry.pad_top, geometry.pad_bottom, geometry.pad_left, geometry.pad_right)
    dy = rng.standard_normal((N, geometry.OH, geometry.OW, F)).astype(dtype)
    saved = [a.copy() for a in (x, weight, dy)]

    y = _nhwc.forward(x, weight, b, geometry, dtype, n_threads)
    gx, gw, gb = _nhwc.backward(dy, x, weight, geometry, dtype, n_threads, with_bias=bias)
    ry, rgx, rgw, rgb = oracle(x, weight, b, dy, stride, pads, dilation, groups, mode)

    Cg = C // groups
    assert y.shape == (N, geometry.OH, geometry.OW, F)
    assert_matches(y, ry, dtype, Cg * KH * KW, "y")
    assert_matches(gx, rgx, dtype, (F // groups) * KH * KW, "grad_x")
    assert_matches(gw, rgw, dtype, N * geometry.OH * geometry.OW, "grad_weight")
    if bias:
        assert_matches(gb, rgb, dtype, N * geometry.OH * geometry.OW, "grad_bias")
    else:
        assert gb is None
    for before, after in zip(saved, (x, weight, dy)):
        np.testing.assert_array_equal(before, after)


def _fits(H, W, kernel, stride, padding, dilation):
    top, bottom, left, right = as_padding(padding)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    return (conv_output_size(H, kernel[0], sh, top, bottom, dh) >= 1
            and conv_output_size(W, kernel[1], sw, left, right, dw) >= 1)


# ---------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------

#: (C, F, groups): plain, two groups, depthwise, depthwise with two filters per channel
GROUPINGS = [(3, 4, 1), (4, 6, 2), (4, 4, 4), (3, 6, 3)]
GROUPING_IDS = ["g1", "g2", "depthwise", "depthwise-x2"]
KERNELS = [(1, 1), (3, 3), (5, 5), (2, 3)]
STRIDES = [1, 2, (1, 2)]
DILATIONS = [1, 2]
PADDINGS = [0, 1, (0, 1, 2, 1)]

GEOMETRY_GRID = [
    (kernel, stride, padding, dilation)
    for kernel, stride, padding, dilation in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS)
    if _fits(9, 8, kernel, stride, padding, dilation)
]
#: ... each with 1 or 2 threads, alternating (both counts see every kernel and stride)
GEOMETRY_GRID = [case + (1 + i % 2,) for i, case in enumerate(GEOMETRY_GRID)]


@pytest.mark.parametrize("grouping", GROUPINGS, ids=GROUPING_IDS)
@pytest.mark.parametrize("kernel,stride,padding,dilation,n_threads", GEOMETRY_GRID)
def test_geometry_grid(kernel, stride, padding, dilation, n_threads, grouping, dtype):
    C, F, groups = grouping
    check(3, C, 9, 8, F, kernel, stride, padding, dilation, groups, dtype=dtype,
          n_threads=n_threads, bias=dilation == 1)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "zeros"])
@pytest.mark.parametrize("grouping", GROUPINGS[:3], ids=GROUPING_IDS[:3])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), 1, 1, 1), ((5, 5), 1, 2, 1), ((2, 3), (1, 2), (0, 1, 2, 1), 1),
    ((3, 3), 2, (2, 1), 2), ((3, 2), 1, (3, 0, 1, 1), 1), ((1, 1), 1, 1, 1),
])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_padding_modes(mode, grouping, kernel, stride, padding, dilation, n_threads, dtype):
    C, F, groups = grouping
    check(2, C, 6, 7, F, kernel, stride, padding, dilation, groups, mode, dtype, n_threads)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("N", [0, 1, 3, 9])
@pytest.mark.parametrize("H,W,kernel,stride,padding", [
    (1, 1, (1, 1), 1, 0),       # pointwise, one pixel
    (1, 1, (3, 3), 1, 1),       # one output from a padded pixel
    (5, 5, (5, 5), 1, 0),       # output 1x1
    (17, 13, (3, 3), 1, 1),
    (17, 13, (1, 1), 2, 0),     # 1x1 but strided: not pointwise
    (1, 9, (1, 3), 1, (0, 1)),  # a single row
])
@pytest.mark.parametrize("grouping", [(1, 2, 1), (3, 5, 1), (4, 6, 2), (4, 4, 4)],
                         ids=["C1", "C3", "g2", "depthwise"])
def test_batch_and_planes(N, H, W, kernel, stride, padding, grouping, n_threads):
    C, F, groups = grouping
    check(N, C, H, W, F, kernel, stride, padding, 1, groups, dtype=np.float64,
          n_threads=n_threads)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("min_rows", [1, 5])
@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("N", [1, 3, 5])
@pytest.mark.parametrize("grouping", GROUPINGS[:3], ids=GROUPING_IDS[:3])
@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), 1, 1), ((1, 1), 1, 0),
                                                     ((3, 2), 2, 1)])
def test_many_tiles(monkeypatch, N, grouping, kernel, stride, padding, min_rows, n_threads,
                    mode, dtype, gemm_kernel):
    """Tiny tiles: tiles of 1 or 5 rows that start mid output row and span images,
    and grad_x items cut into many row tiles."""
    monkeypatch.setattr(_tiling, "NHWC_TILE_BYTES", 1)
    monkeypatch.setattr(_tiling, "NHWC_MIN_TILE_ROWS", min_rows)
    C, F, groups = grouping
    check(N, C, 5, 6, F, kernel, stride, padding, 1, groups, mode, dtype, n_threads)


# (C, groups, n_threads, N, min_block_channels, path): the grad_x paths for few images
GRAD_X_CASES = [
    (6, 1, 2, 1, 1, "blocks"),      # one group cut into 2 blocks: one gemm per tap
    (7, 1, 3, 1, 1, "blocks"),      # uneven blocks
    (5, 1, 2, 3, 1, "blocks"),      # 3 images on 2 threads: 6 items
    (8, 2, 4, 1, 1, "blocks"),      # 4 blocks, 2 groups: each group cut in two
    (6, 2, 5, 1, 1, "blocks"),      # 5 blocks of 2 groups of 3 channels: 1-channel blocks
    (8, 2, 2, 1, 16, "groups"),     # one whole group per block
    (8, 4, 2, 1, 16, "groups"),     # two whole groups per block
    (6, 3, 2, 1, 16, "groups"),     # blocks of 2 groups of 3: the last block is short
    (4, 4, 2, 1, 16, "groups"),     # depthwise
    (4, 4, 8, 1, 16, "bands"),      # depthwise, more threads than channels: bands
    (3, 1, 2, 1, 16, "bands"),      # C=3 (resnet-stem at N=1): bands of input rows
    (1, 1, 2, 1, 16, "bands"),      # C=1
    (6, 1, 3, 2, 16, "bands"),      # 2 images on 3 threads
    (4, 2, 4, 1, 16, "bands"),      # groups, 2 per group wanted but 2 channels each
    (2, 1, 7, 1, 16, "bands"),      # more bands than output rows would hold: one row each
]


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect"])
@pytest.mark.parametrize("C,groups,n_threads,N,min_block,path", GRAD_X_CASES)
def test_grad_x_paths(monkeypatch, C, groups, n_threads, N, min_block, path, mode, dtype):
    """Few images for the threads: grad_x cuts each image into channel blocks (whole
    groups, or one gemm per tap inside a group) or bands of input rows."""
    monkeypatch.setattr(_tiling, "NHWC_MIN_BLOCK_CHANNELS", min_block)
    H, W, F = 6, 5, 2 * groups
    plan = _tiling.plan_nhwc(N, H * W, C, 9, groups, 8, n_threads, OH=H)
    Cg = C // groups
    if path == "bands":
        assert plan.n_bands > 1 and plan.c_block == C
    else:
        assert plan.n_bands == 1 and plan.c_block < C
        assert (plan.c_block % Cg == 0) == (path == "groups")
    check(N, C, H, W, F, (3, 3), 1, 1, 1, groups, mode, dtype, n_threads)
    # the same with row tiles that cut the image (bands: runs cut into tiles)
    monkeypatch.setattr(_tiling, "NHWC_TILE_BYTES", 1)
    monkeypatch.setattr(_tiling, "NHWC_MIN_TILE_ROWS", 7)
    check(N, C, H, W, F, (3, 3), 1, 1, 1, groups, mode, dtype, n_threads)


@pytest.mark.parametrize("mode", ["zeros", "circular", "replicate"])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), 1, 1, 1), ((5, 3), 2, (2, 1), 1), ((3, 3), 1, (3, 0, 1, 1), 2), ((1, 3), 1, 1, 1),
])
@pytest.mark.parametrize("n_threads", [2, 3, 5])
def test_bands_geometry(kernel, stride, padding, dilation, n_threads, mode):
    """Bands of input rows under strides, dilations and padding modes that map a window's
    rows far apart (circular: the top padding reads the bottom band)."""
    check(1, 2, 9, 7, 3, kernel, stride, padding, dilation, 1, mode, np.float64, n_threads)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("N,H,W,kernel,padding", [
    (1, 4, 4, (3, 3), 1), (2, 3, 5, (2, 3), (0, 1, 1, 1)), (1, 4, 3, (1, 1), 0), (3, 1, 1, (1, 1), 0),
])
def test_filter_split(monkeypatch, N, H, W, kernel, padding, n_threads, bias, mode, dtype,
                      gemm_kernel):
    """Fewer rows than filters in one tile: forward and grad_weight split the filters."""
    monkeypatch.setattr(_tiling, "NHWC_MIN_SPLIT_FILTERS", 2)
    C, F = 5, 16 * n_threads
    geometry = conv_geometry((N, C, H, W), (F, C) + kernel, 1, padding, 1, 1, mode)
    plan = _tiling.plan_nhwc(N, geometry.OH * geometry.OW, C, kernel[0] * kernel[1], 1, 8,
                             n_threads, geometry.OH, F)
    assert plan.f_blocks == n_threads and plan.n_tiles == 1
    check(N, C, H, W, F, kernel, 1, padding, 1, 1, mode, dtype, n_threads, bias)


@pytest.mark.parametrize("shape", [(1, 64, 10, 10, 32), (2, 3, 40, 40, 8), (4, 16, 12, 12, 512)])
def test_larger_layers(shape, dtype, gemm_kernel):
    """Realistic channel counts (long chunks, memcpy) and K beyond one tile's minimum rows."""
    N, C, H, W, F = shape
    check(N, C, H, W, F, (3, 3), 1, 1, dtype=dtype, n_threads=2)


#: Kernels whose kernel-row runs (KW*C elements, C below) take the gather's fixed 8- and
#: 16-element copies, exact copies beside them (the last kernel rows, runs of 17+), or both
SHORT_RUN_KERNELS = [(1, 1), (1, 3), (2, 5), (3, 3), (5, 5), (3, 8), (4, 4), (2, 9)]


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((1, 2), (0, 1, 2, 0))])
@pytest.mark.parametrize("kernel", SHORT_RUN_KERNELS)
@pytest.mark.parametrize("C", [1, 2, 3, 5])
def test_short_runs(C, kernel, stride, padding, mode, dtype):
    """Short runs of whole pixels (lenet: C=1, 5x5): the fixed-size copies spill into
    taps written later and never past a column row, and tiles end mid output row."""
    check(3, C, 7, 9, 4, kernel, stride, padding, 1, 1, mode, dtype, n_threads=2)


def _before_guard_page(shape, dtype):
    """A C-contiguous array of ``shape`` ending exactly where an unreadable page begins,
    so that any read past its end faults. Returns (array, owner to keep alive)."""
    page = mmap.PAGESIZE
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = -(-nbytes // page) * page + page
    buf = mmap.mmap(-1, size)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + size - page, page, 0) == 0, ctypes.get_errno()   # PROT_NONE
    array = np.frombuffer(buf, dtype, count=int(np.prod(shape)), offset=size - page - nbytes)
    return array.reshape(shape), buf


@pytest.mark.skipif(sys.platform == "win32", reason="needs mprotect")
@pytest.mark.parametrize("C,kernel,padding,mode", [
    (1, (5, 5), 0, "zeros"), (1, (3, 3), 1, "replicate"), (3, (3, 3), 1, "zeros"),
    (2, (2, 4), 0, "zeros"), (1, (1, 7), (0, 3), "circular"),
])
def test_gather_reads_stay_inside_x(C, kernel, padding, mode, dtype):
    """The fixed-size copies never read past the input's last pixel (x ends at a page
    that faults when read), in the forward and in grad_weight's gather."""
    N, H, W, F = 2, 6, 7, 3
    rng = np.random.default_rng(1)
    x, owner = _before_guard_page((N, H, W, C), dtype)
    x[...] = rng.standard_normal(x.shape)
    weight = rng.standard_normal((F, C) + kernel).astype(dtype)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    y = fastconv.conv2d(x, weight, padding=padding, padding_mode=mode, layout="NHWC")
    expected = fastconv.conv2d(x_nchw, weight, padding=padding, padding_mode=mode)
    assert_matches(y, expected.transpose(0, 2, 3, 1), dtype, C * kernel[0] * kernel[1], "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    _, gw, _ = fastconv.conv2d_backward(dy, x, weight, padding=padding, padding_mode=mode,
                                        layout="NHWC")
    _, rgw, _ = fastconv.conv2d_backward(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)), x_nchw,
                                         weight, padding=padding, padding_mode=mode)
    assert_matches(gw, rgw, dtype, y.size // F, "grad_weight")
    del x, owner


# ---------------------------------------------------------------------------
# Driver contract
# ---------------------------------------------------------------------------


def _problem(rng, dtype=np.float32, N=2, C=4, H=6, W=5, F=3, groups=1):
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    w = rng.standard_normal((F, C // groups, 3, 3)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    geometry = conv_geometry((N, C, H, W), w.shape, 1, 1, 1, groups)
    return x, w, b, geometry


def test_casts_and_noncontiguous_and_readonly():
    """Inputs of other dtypes are cast to the compute dtype; views and read-only arrays work."""
    rng = np.random.default_rng(3)
    x, w, b, geometry = _problem(rng, np.float64)
    expected = _nhwc.forward(x, w, b, geometry, np.float64, 2)
    x_view = np.asfortranarray(x)
    w_ro = w.copy()
    w_ro.flags.writeable = False
    y = _nhwc.forward(x_view, w_ro, b.astype(np.float32), geometry, np.float64, 2)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    y32 = _nhwc.forward(x, w, b, geometry, np.float32, 2)
    assert y32.dtype == np.float32
    assert_matches(y32, expected, np.float32, 36, "float32 compute")
    dy = rng.standard_normal(expected.shape)
    gx, gw, gb = _nhwc.backward(dy.astype(np.float32), x, w_ro, geometry, np.float32, 2)
    assert gx.dtype == gw.dtype == gb.dtype == np.float32
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
    # read-only float64 inputs go to the kernels uncopied
    x_ro, dy_ro = x.copy(), dy.copy()
    x_ro.flags.writeable = dy_ro.flags.writeable = False
    np.testing.assert_array_equal(_nhwc.forward(x_ro, w_ro, b, geometry, np.float64, 2), expected)
    for got, want in zip(_nhwc.backward(dy_ro, x_ro, w_ro, geometry, np.float64, 2),
                         _nhwc.backward(dy, x, w, geometry, np.float64, 2)):
        np.testing.assert_array_equal(got, want)


def test_out_is_written_and_returned():
    rng = np.random.default_rng(4)
    x, w, b, geometry = _problem(rng)
    out = np.full((2, 6, 5, 3), np.nan, np.float32)
    y = _nhwc.forward(x, w, b, geometry, np.float32, 2, out=out)
    assert y is out
    # same thread count: other tile plans may round differently (OpenBLAS picks its
    # kernels by shape: SkylakeX's differ in the last bit)
    np.testing.assert_array_equal(out, _nhwc.forward(x, w, b, geometry, np.float32, 2))
    with pytest.raises(ValueError, match="out must be"):
        _nhwc.forward(x, w, b, geometry, np.float32, 2, out=np.empty((2, 6, 5, 3), np.float64))


def test_empty_batch():
    rng = np.random.default_rng(5)
    x, w, b, _ = _problem(rng, N=2)
    geometry = conv_geometry((0, 4, 6, 5), w.shape, 1, 1, 1)
    y = _nhwc.forward(x[:0], w, b, geometry, np.float32, 2)
    assert y.shape == (0, 6, 5, 3)
    gx, gw, gb = _nhwc.backward(y, x[:0], w, geometry, np.float32, 2)
    assert gx.shape == (0, 6, 5, 4)
    assert not gw.any() and gw.shape == w.shape
    assert not gb.any() and gb.shape == (3,)


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (2, 3)])
def test_weight_layout(kernel):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 3) + kernel)
    w.flags.writeable = False
    geometry = conv_geometry((2, 6, 6, 5), w.shape, 1, 1, 1, groups=2)
    wt = _nhwc.nhwc_weight(w, geometry, np.float32)
    assert wt.shape == (4, kernel[0] * kernel[1] * 3) and wt.dtype == np.float32
    # wt[f, (kh, kw, cg)] = w[f, cg, kh, kw]
    np.testing.assert_array_equal(
        wt, w.transpose(0, 2, 3, 1).reshape(4, -1).astype(np.float32))
    # a read-only weight already of the compute dtype: 1x1 passes it through
    x = rng.standard_normal((2, 6, 5, 6))
    y = _nhwc.forward(x, w, None, geometry, np.float64, 2)
    np.testing.assert_allclose(
        y, _nhwc.forward(x, w.copy(), None, geometry, np.float64, 1), rtol=1e-12)


def test_kernels_reject_wrong_arrays():
    """The memoryview signatures catch swapped or mistyped arrays before any C code runs."""
    rng = np.random.default_rng(7)
    x, w, b, geometry = _problem(rng)
    wt = _nhwc.nhwc_weight(w, geometry, np.float32)
    y = np.empty((2 * 6 * 5, 3), np.float32)
    with pytest.raises(ValueError, match="dimensions"):
        _conv_nhwc.forward(x, wt, b, y.reshape(2, 6, 5, 3), np.empty(1000, np.float32),
                           geometry, 2, 1, 1)
    with pytest.raises(ValueError, match="dtype mismatch"):
        _conv_nhwc.forward(x, wt.astype(np.float64), b, y, np.empty(1000, np.float32),
                           geometry, 2, 1, 1)


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_threads", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("N,OH,OW,C,KK,groups", [
    (1, 56, 56, 64, 9, 1), (8, 56, 56, 64, 9, 1), (100, 24, 24, 1, 25, 1), (32, 7, 7, 512, 9, 1),
    (1, 7, 7, 512, 9, 1), (3, 32, 32, 3, 9, 1), (1, 112, 112, 32, 9, 32), (2, 1, 1, 8, 1, 2),
    (5, 10, 10, 6, 9, 3), (1, 1, 1, 1, 1, 1), (1, 112, 112, 3, 49, 1), (1, 1, 5, 1, 3, 1),
])
def test_plan(N, OH, OW, C, KK, groups, n_threads):
    P = OH * OW
    F = 512
    plan = _tiling.plan_nhwc(N, P, C, KK, groups, 4, n_threads, OH, F)
    R, K = N * P, C * KK
    budget = max(_tiling.NHWC_MIN_TILE_ROWS, _tiling.NHWC_TILE_BYTES // (K * 4))
    # every thread has a tile (or a block of filters of the one tile) when there
    # are enough rows, and no tile is empty
    if plan.f_blocks > 1:
        assert plan.n_tiles == 1 and groups == 1 and R < F and plan.f_blocks == n_threads
    else:
        assert min(n_threads, R) <= plan.n_tiles <= R
    assert -(-R // plan.n_tiles) <= plan.tile_rows <= budget + 1
    # the workspace is bounded by the tile budget, not the batch
    big = _tiling.plan_nhwc(1000 * N, P, C, KK, groups, 4, n_threads, OH, F)
    assert big.workspace_per_thread(K, False) <= (budget + 1) * K
    Cg = C // groups
    if plan.n_bands > 1:
        assert plan.c_block == C and plan.n_bands <= OH
        assert N * plan.n_bands >= min(n_threads, N * OH)
    elif plan.c_block >= C:
        assert 1 <= plan.n_items <= N
        assert plan.n_items >= min(n_threads, N)
    else:
        # a block is whole groups or lies inside one group, and there are several
        assert 1 <= plan.c_block
        assert plan.c_block % Cg == 0 or plan.c_block < Cg
        assert n_threads > 1 and N < 4 * n_threads


def test_plan_rejects_blas_overflow():
    with pytest.raises(ValueError, match="32-bit BLAS"):
        _tiling.plan_nhwc(1, 1, 2**20, 2**12, 1, 4, 1)


# ---------------------------------------------------------------------------
# Winograd: the forward of plain 3x3 stride-1 layers, along the channels
# ---------------------------------------------------------------------------

def _winograd_case(rng, N, C, H, W, F, dtype, bias=True):
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    weight = rng.standard_normal((F, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    return x, weight, b


@pytest.mark.parametrize("m", _winograd.TILE_SIZES)
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("C,F,H,W", [(3, 5, 7, 9), (16, 33, 12, 13), (70, 8, 5, 6), (8, 4, 2, 3)])
@pytest.mark.parametrize("padding", [1, (2, 0, 1, 1), "same", 0])
def test_winograd_forward(monkeypatch, m, mode, C, F, H, W, padding, dtype, gemm_kernel):
    """Every tile size (forced), padding form and mode, partial last tiles, channel and
    filter counts off the vector width, against the reference."""
    monkeypatch.setattr(_winograd, "choose_m", lambda geometry: m)
    rng = np.random.default_rng(C * H + m)
    x, weight, b = _winograd_case(rng, 2, C, H, W, F, dtype)
    xn = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    args = dict(padding=padding, padding_mode=mode)
    try:
        want = reference.conv2d(xn, weight, b, **args)
    except ValueError:                  # reflect padding >= the input, an empty output
        with pytest.raises(ValueError):
            fastconv.conv2d(x, weight, b, layout="NHWC", algorithm="winograd", **args)
        return
    y = fastconv.conv2d(x, weight, b, layout="NHWC", algorithm="winograd", n_threads=2, **args)
    assert_matches(y, want.transpose(0, 2, 3, 1), dtype, 9 * C, f"m={m}")


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("N", [0, 1, 5])
def test_winograd_forward_blocks_threads_and_relu(monkeypatch, N, n_threads, dtype):
    """One tile row per block (blocks ending inside images), more threads than blocks,
    no bias, the ReLU; the input is not modified."""
    monkeypatch.setattr(_tiling, "WINOGRAD_BLOCK_BYTES", 1)
    monkeypatch.setattr(_tiling, "WINOGRAD_MIN_TILES", 1)
    rng = np.random.default_rng(N + 10 * n_threads)
    x, weight, _ = _winograd_case(rng, N, 12, 9, 10, 7, dtype, bias=False)
    saved = x.copy()
    y = fastconv.conv2d(x, weight, padding=1, layout="NHWC", algorithm="winograd",
                        activation="relu", n_threads=n_threads)
    want = reference.conv2d(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), weight, padding=1)
    assert y.shape == (N, 9, 10, 7)
    assert_matches(y, np.maximum(want, 0).transpose(0, 2, 3, 1), dtype, 9 * 12, "relu(y)")
    np.testing.assert_array_equal(x, saved)


def test_winograd_auto_rule(monkeypatch):
    """``auto`` takes NHWC Winograd for the forward where ``_winograd.pays_off_nhwc``
    does: 16 channels yes, 3 channels (cifar-3x3) no."""
    calls = []
    original = _winograd.forward_nhwc
    monkeypatch.setattr(_winograd, "forward_nhwc",
                        lambda *args: calls.append(1) or original(*args))
    rng = np.random.default_rng(3)
    for C, expected in ((16, [1]), (3, [])):
        calls.clear()
        x, weight, b = _winograd_case(rng, 2, C, 8, 8, 16, np.float32)
        fastconv.conv2d(x, weight, b, padding=1, layout="NHWC")
        assert calls == expected, C


def test_winograd_nhwc_is_for_plain_layers():
    rng = np.random.default_rng(4)
    x, weight, _ = _winograd_case(rng, 1, 4, 6, 6, 4, np.float64)
    with pytest.raises(ValueError, match="groups=2"):
        fastconv.conv2d(x, weight[:, :2], padding=1, groups=2, layout="NHWC",
                        algorithm="winograd")


@pytest.mark.parametrize("m", _winograd.TILE_SIZES)
@pytest.mark.parametrize("C,F,H,W", [(3, 5, 7, 9), (16, 33, 12, 13), (8, 70, 5, 6), (4, 8, 2, 3)])
@pytest.mark.parametrize("padding", [1, (2, 0, 1, 1), "same", 0])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_winograd_backward(monkeypatch, m, C, F, H, W, padding, n_threads, dtype, gemm_kernel):
    """algorithm='winograd' with NHWC: grad_x by Winograd (every tile size, forced),
    grad_weight and grad_bias by im2col, against the reference."""
    monkeypatch.setattr(_winograd, "choose_m_input_grad", lambda geometry: m)
    rng = np.random.default_rng(C * H + m)
    x, weight, _ = _winograd_case(rng, 2, C, H, W, F, dtype)
    xn = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    try:
        shape = reference.conv2d(xn, weight, padding=padding).shape
    except ValueError:                  # an empty output
        return
    dy = rng.standard_normal(shape).astype(dtype)
    want = reference.conv2d_backward(dy, xn, weight, padding=padding)
    got = fastconv.conv2d_backward(np.ascontiguousarray(dy.transpose(0, 2, 3, 1)), x, weight,
                                   padding=padding, layout="NHWC", algorithm="winograd",
                                   n_threads=n_threads)
    N, OH, OW = shape[0], shape[2], shape[3]
    assert_matches(got[0], want[0].transpose(0, 2, 3, 1), dtype, 9 * F, f"grad_x m={m}")
    assert_matches(got[1], want[1], dtype, N * OH * OW, "grad_weight")
    assert_matches(got[2], want[2], dtype, N * OH * OW, "grad_bias")


def test_winograd_backward_other_padding_modes_run_im2col():
    rng = np.random.default_rng(5)
    x, weight, _ = _winograd_case(rng, 2, 16, 6, 6, 16, np.float64)
    dy = rng.standard_normal((2, 6, 6, 16))
    args = dict(padding=1, padding_mode="reflect", layout="NHWC")
    for a, b in zip(fastconv.conv2d_backward(dy, x, weight, algorithm="winograd", **args),
                    fastconv.conv2d_backward(dy, x, weight, algorithm="im2col", **args)):
        np.testing.assert_array_equal(a, b)


def test_winograd_backward_auto_rule():
    """``auto`` takes NHWC Winograd for grad_x where ``_winograd.pays_off_input_grad_nhwc``
    does (NCHW's rule, groups 1, >= 16 filters)."""
    from fastconv._functional import _choose_algorithm

    def backward(C, F, mode="zeros", groups=1):
        geometry = conv_geometry((2, C, 16, 16), (F, C // groups, 3, 3), 1, 1, 1, groups, mode)
        return _choose_algorithm("auto", geometry, "NHWC", backward=True)

    assert backward(64, 64) == "winograd"
    assert backward(64, 8) == "im2col"                  # few filters: gathered vectors short
    assert backward(64, 64, mode="reflect") == "im2col"
    assert backward(64, 64, groups=2) == "im2col"
