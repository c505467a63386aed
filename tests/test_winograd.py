"""Winograd F(m x m, 3 x 3): matrices, generated transforms, kernels, layer cache, accuracy."""

import itertools
import pathlib
import subprocess
import sys
import threading
from fractions import Fraction

import numpy as np
import pytest
from _helpers import assert_matches, relative_error, run_in_thread

import fastconv
from fastconv import _tiling, _winograd, _workspace, reference
from fastconv._validation import conv_geometry
from fastconv._winograd_matrices import VARIANTS, WEIGHT_GRAD_VARIANTS, winograd_matrices

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- the matrices ---------------------------------------------------------------------

def _exact_correlation(m, r, d, g):
    return [sum(g[k] * d[i + k] for k in range(r)) for i in range(m)]


@pytest.mark.parametrize("m, r, points", [
    (2, 3, (0, 1, -1)),
    (4, 3, (0, 1, -1, 2, Fraction(-1, 2))),
    (4, 3, (0, 1, -1, 2, -2)),
    (3, 3, (0, 1, -2, Fraction(-1, 2))),
    (3, 2, (0, 1, -1)),
    (6, 3, (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))),
])
def test_matrices_compute_the_correlation_exactly(m, r, points):
    """AT ((G g) * (BT d)) is the m-output correlation, in exact rational arithmetic."""
    mats = winograd_matrices(m, r, points)
    rng = np.random.default_rng(0)
    for _ in range(5):
        d = [Fraction(int(v)) for v in rng.integers(-9, 10, m + r - 1)]
        g = [Fraction(int(v)) for v in rng.integers(-9, 10, r)]
        u = [sum(row[k] * g[k] for k in range(r)) for row in mats.G]
        v = [sum(row[k] * d[k] for k in range(len(d))) for row in mats.BT]
        y = [sum(row[j] * u[j] * v[j] for j in range(len(u))) for row in mats.AT]
        assert y == _exact_correlation(m, r, d, g)


def test_matrices_reject_repeated_or_missing_points():
    with pytest.raises(ValueError, match=r"F\(4, 3\) needs 5 distinct finite points"):
        winograd_matrices(4, 3, (0, 1, -1, 2, 2))
    with pytest.raises(ValueError, match=r"F\(2, 3\) needs 3 distinct finite points"):
        winograd_matrices(2, 3, (0, 1))


def test_the_kernels_variants():
    assert sorted(VARIANTS) == list(_winograd.TILE_SIZES) == [2, 3, 4]
    assert sorted(WEIGHT_GRAD_VARIANTS) == list(_winograd.WEIGHT_GRAD_TILE_SIZES) == [2, 3]
    assert all(VARIANTS[m].alpha == m + 2 for m in VARIANTS)


def test_generated_header_is_up_to_date():
    """fastconv/_winograd_transforms.h is what tools/gen_winograd.py writes from the matrices."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_winograd.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- kernels against the reference ------------------------------------------------------

def _problem(rng, N, C, H, W, F, groups, dtype):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C // groups, 3, 3)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


def _forced(m, x, w, b, geometry, dtype, n_threads, relu=False):
    out = np.empty(geometry.output_shape, dtype)
    return _winograd.forward(np.ascontiguousarray(x), w, b, geometry, dtype, n_threads, out,
                             relu=relu, m=m)


def _forced_input_grad(m, dy, w, geometry, dtype, n_threads):
    out = np.empty(geometry.input_shape, dtype)
    return _winograd.backward_input(np.ascontiguousarray(dy), w, geometry, dtype, n_threads,
                                    out, m=m)


PADDINGS = [0, 1, 2, 3, (0, 2, 1, 0), (2, 0, 0, 3), "same", "full", "valid"]
SIZES = [(1, 1), (2, 3), (3, 3), (4, 5), (6, 6), (7, 9), (13, 10)]


def _valid(H, W, padding):
    try:
        conv_geometry((1, 1, H, W), (1, 1, 3, 3), 1, padding, 1, string_padding=True)
    except ValueError as error:
        assert "output size would be" in str(error)
        return False
    return True


SIZE_PADDING_GRID = [(H, W, p) for (H, W), p in itertools.product(SIZES, PADDINGS)
                     if _valid(H, W, p)]


@pytest.mark.parametrize("m", _winograd.TILE_SIZES)
@pytest.mark.parametrize("H,W,padding", SIZE_PADDING_GRID)
def test_every_tile_size_every_padding_and_size(m, H, W, padding, dtype):
    """Outputs of 1 .. 13 pixels: partial last tiles, tiles wholly in the padding, pad > 2."""
    rng = np.random.default_rng(1)
    x, w, b = _problem(rng, 2, 3, H, W, 5, 1, dtype)
    g = conv_geometry(x.shape, w.shape, 1, padding, 1, string_padding=True)
    assert_matches(_forced(m, x, w, b, g, dtype, 2), reference.conv2d(x, w, b, 1, padding),
                   dtype, 27, "forward")
    dy = rng.standard_normal(g.output_shape).astype(dtype)
    assert_matches(_forced_input_grad(m, dy, w, g, dtype, 2),
                   reference.conv2d_backward(dy, x, w, 1, padding)[0], dtype, 45, "grad_x")


@pytest.mark.parametrize("m", _winograd.TILE_SIZES)
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("C,F,groups", [(4, 6, 1), (4, 6, 2), (6, 6, 6), (4, 8, 4)])
@pytest.mark.parametrize("padding", [1, (2, 1, 0, 2), "same"])
def test_padding_modes_and_groups(m, mode, C, F, groups, padding, dtype, gemm_kernel):
    rng = np.random.default_rng(2)
    x, w, b = _problem(rng, 2, C, 7, 9, F, groups, dtype)
    g = conv_geometry(x.shape, w.shape, 1, padding, 1, groups, mode, string_padding=True)
    assert_matches(_forced(m, x, w, b, g, dtype, 2),
                   reference.conv2d(x, w, b, 1, padding, 1, groups, padding_mode=mode),
                   dtype, 9 * C // groups, "forward")
    if mode == "zeros":
        dy = rng.standard_normal(g.output_shape).astype(dtype)
        assert_matches(_forced_input_grad(m, dy, w, g, dtype, 2),
                       reference.conv2d_backward(dy, x, w, 1, padding, 1, groups)[0],
                       dtype, 9 * F // groups, "grad_x")


@pytest.fixture(params=_winograd.WEIGHT_GRAD_TILE_SIZES, ids=lambda n: f"dy_tile{n}")
def weight_grad_tile(request, monkeypatch):
    """Every grad_weight dY tile size, whatever choose_n_weight_grad would pick."""
    monkeypatch.setattr(_winograd, "choose_n_weight_grad", lambda geometry: request.param)
    return request.param


@pytest.mark.parametrize("H,W,padding", SIZE_PADDING_GRID)
def test_weight_grad_every_padding_and_size(H, W, padding, dtype, weight_grad_tile,
                                            gemm_kernel):
    """F(3x3, n x n) grad_weight: partial last dY tiles, tiles in the padding."""
    rng = np.random.default_rng(12)
    x, w, _ = _problem(rng, 2, 3, H, W, 5, 1, dtype)
    g = conv_geometry(x.shape, w.shape, 1, padding, 1, string_padding=True)
    dy = rng.standard_normal(g.output_shape).astype(dtype)
    got = _winograd.backward_weight(x, dy, g, 2, np.empty(w.shape, dtype))
    want = reference.conv2d_backward(dy, x, w, 1, padding)[1]
    assert_matches(got, want, dtype, 2 * g.OH * g.OW, "grad_weight")


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("C,F,groups", [(4, 6, 1), (4, 6, 2), (6, 6, 6), (4, 8, 4)])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_weight_grad_padding_modes_groups_and_threads(monkeypatch, mode, C, F, groups,
                                                       n_threads, dtype, weight_grad_tile,
                                                       gemm_kernel):
    monkeypatch.setattr(_tiling, "WINOGRAD_BLOCK_BYTES", 1)     # one tile row per block
    monkeypatch.setattr(_tiling, "WINOGRAD_MIN_TILES", 1)
    rng = np.random.default_rng(13)
    x, w, b = _problem(rng, 3, C, 7, 9, F, groups, dtype)
    args = dict(padding=(2, 1, 0, 2), groups=groups, padding_mode=mode)
    dy = rng.standard_normal(reference.conv2d(x, w, b, **args).shape).astype(dtype)
    got = fastconv.conv2d_backward(dy, x, w, algorithm="winograd", n_threads=n_threads, **args)
    want = reference.conv2d_backward(dy, x, w, **args)
    for a, e, what in zip(got, want, ["grad_x", "grad_weight", "grad_bias"]):
        assert_matches(a, e, dtype, 3 * 7 * 9, what)


def test_own_kernel_weight_grad_rule():
    """A position's sums up to OWN_KERNEL_MAX_SUMS_BYTES go to the own GEMM kernel:
    resnet-3x3's, vgg-mid's and dcgan-up's phases, not deep-7x7's 512 x 512."""
    rule = _winograd.own_kernel_pays_off
    assert rule(64, 64, 4) and rule(128, 128, 4) and rule(256, 512, 4)
    assert not rule(512, 512, 4)
    assert not rule(256, 512, 8)
    assert rule(1, _winograd.OWN_KERNEL_MAX_SUMS_BYTES // 4, 4)
    assert not rule(1, _winograd.OWN_KERNEL_MAX_SUMS_BYTES // 4 + 1, 4)


def test_auto_weight_grad_rule():
    def geometry(C, F):
        return conv_geometry((1, C, 16, 16), (F, C, 3, 3), 1, 1, 1)

    assert _winograd.pays_off_weight_grad(geometry(16, 16))
    assert _winograd.pays_off_weight_grad(geometry(64, 512))
    assert not _winograd.pays_off_weight_grad(geometry(3, 32))
    assert not _winograd.pays_off_weight_grad(geometry(32, 4))


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("N", [1, 2, 5])
@pytest.mark.parametrize("m", _winograd.TILE_SIZES)
def test_blocks_of_one_tile_row_and_many_threads(monkeypatch, N, m, n_threads, dtype):
    """The smallest blocks: every block boundary between tile rows and images is crossed."""
    monkeypatch.setattr(_tiling, "WINOGRAD_BLOCK_BYTES", 1)
    monkeypatch.setattr(_tiling, "WINOGRAD_MIN_TILES", 1)
    rng = np.random.default_rng(3)
    x, w, b = _problem(rng, N, 5, 11, 10, 7, 1, dtype)
    g = conv_geometry(x.shape, w.shape, 1, 1, 1)
    plan = _tiling.plan_winograd(N, 5, 7, g.OH, g.OW, m, dtype.itemsize, n_threads)
    assert plan.rows_per_block == 1
    assert_matches(_forced(m, x, w, b, g, dtype, n_threads), reference.conv2d(x, w, b, 1, 1),
                   dtype, 45, "forward")


@pytest.fixture(params=["blocks", "filter-blocks"])
def winograd_path(request, monkeypatch):
    """Runs a test by each Winograd driver: per-thread blocks of tiles, or the threads
    sharing chunks of tiles and splitting the filters (forced here whatever the shape)."""
    monkeypatch.setattr(_winograd, "_filter_blocks_pay",
                        lambda plan, C, F, groups: request.param == "filter-blocks"
                        and groups == 1)
    return request.param


@pytest.mark.parametrize("m", _winograd.TILE_SIZES)
@pytest.mark.parametrize("N,C,F,H,W", [(1, 5, 3, 4, 4), (3, 7, 19, 9, 11), (2, 20, 33, 6, 13)])
@pytest.mark.parametrize("padding", [1, (2, 0, 0, 1), "valid"])
@pytest.mark.parametrize("chunk_tiles", [1, 7, 256])
def test_filter_blocks_tails_chunks_and_threads(monkeypatch, winograd_path, m, N, C, F, H, W,
                                                padding, chunk_tiles, dtype):
    """Filter blocks with a tail (F not a multiple of FILTER_BLOCK), chunks of one tile
    row to the whole batch, filters transformed in the blocks or given (a layer's
    cache), forward with bias or ReLU, and grad_x: the same values on 1, 2 and 3 threads."""
    monkeypatch.setattr(_winograd, "FILTER_BLOCK_CHUNK_TILES", chunk_tiles)
    rng = np.random.default_rng(12)
    x, w, b = _problem(rng, N, C, H, W, F, 1, dtype)
    g = conv_geometry(x.shape, w.shape, 1, padding, 1, string_padding=True)
    want = reference.conv2d(x, w, b, 1, padding)
    dy = rng.standard_normal(g.output_shape).astype(dtype)
    want_dx = reference.conv2d_backward(dy, x, w, 1, padding)[0]
    # the filter blocks' GEMMs have the same shapes on any thread count: the same bits
    same = (np.testing.assert_array_equal if winograd_path == "filter-blocks"
            else lambda got, first: assert_matches(got, first, dtype, 9 * C, "forward"))
    first = _forced(m, x, w, b, g, dtype, 1)
    assert_matches(first, want, dtype, 9 * C, "forward")
    for n_threads in (2, 3):
        same(_forced(m, x, w, b, g, dtype, n_threads), first)
    U = _winograd.transformed_weight(w, 1, m, dtype, 2, out=np.empty(((m + 2) ** 2, F, C),
                                                                      dtype))
    same(_winograd.forward(x, w, b, g, dtype, 2, np.empty_like(first), m=m, U=U), first)
    relu = _forced(m, x, w, None, g, dtype, 2, relu=True)
    assert_matches(relu, np.maximum(want - b[:, None, None], 0), dtype, 9 * C, "forward")
    dx = _forced_input_grad(m, dy, w, g, dtype, 1)
    assert_matches(dx, want_dx, dtype, 9 * F, "grad_x")
    same(_forced_input_grad(m, dy, w, g, dtype, 3), dx)
    Ug = _winograd.transformed_weight(w, 1, m, dtype, 2, for_input_grad=True,
                                      out=np.empty(((m + 2) ** 2, C, F), dtype))
    same(_winograd.backward_input(dy, w, g, dtype, 2, np.empty_like(dx), m=m, U=Ug), dx)


def test_filter_blocks_rule():
    """The filter-block driver runs where the filters outweigh a block's tiles (deep-7x7),
    not on vgg-mid or resnet-3x3 (whose blocks measured faster)."""
    def pays(N, C, F, size, n_threads):
        plan = _tiling.plan_winograd(N, C, F, size, size, 4, 4, n_threads)
        return _winograd._filter_blocks_pay(plan, C, F, 1)

    assert pays(32, 512, 512, 7, 2) and pays(32, 512, 512, 7, 1)
    assert not pays(8, 128, 128, 56, 2) and not pays(8, 64, 64, 56, 2)
    plan = _tiling.plan_winograd(32, 512, 512, 7, 7, 4, 4, 2)
    assert not _winograd._filter_blocks_pay(plan, 512, 512, 2)       # groups: blocks


def test_filter_blocks_from_a_layer_and_conv2d(winograd_path):
    """The public calls on a deep layer, by either driver, against the reference;
    the layer caches its transformed filters as before."""
    rng = np.random.default_rng(13)
    x, w, b = _problem(rng, 3, 40, 5, 6, 36, 1, np.float64)
    want = reference.conv2d(x, w, b, 1, 1)
    assert relative_error(fastconv.conv2d(x, w, b, padding=1, algorithm="winograd"),
                          want) < 1e-12
    layer = fastconv.Conv2D(40, 36, 3, padding=1, algorithm="winograd", dtype=np.float64,
                            rng=0)
    layer.W[...] = w
    layer.b[...] = b
    assert relative_error(layer(x), want) < 1e-12
    assert len(layer._weight_cache._transforms) == 1
    dy = rng.standard_normal(want.shape)
    got = layer.backward(dy)
    assert relative_error(got, reference.conv2d_backward(dy, x, w, 1, 1)[0]) < 1e-12


def test_float64_is_exact_to_rounding():
    """float64 Winograd stays within 1e-12 of the reference (the issue asks <= 1e-9)."""
    rng = np.random.default_rng(4)
    x, w, b = _problem(rng, 2, 32, 20, 20, 16, 1, np.float64)
    ref = reference.conv2d(x, w, b, 1, 1)
    g = conv_geometry(x.shape, w.shape, 1, 1, 1)
    for m in _winograd.TILE_SIZES:
        assert relative_error(_forced(m, x, w, b, g, np.float64, 2), ref) < 1e-12
    dy = rng.standard_normal(ref.shape)
    ref_weight = reference.conv2d_backward(dy, x, w, 1, 1)[1]
    for n in _winograd.WEIGHT_GRAD_TILE_SIZES:
        got = _winograd.backward_weight(x, dy, g, 2, np.empty(w.shape), n=n)
        assert relative_error(got, ref_weight) < 1e-12


def test_float64_chunked_sums_are_exact_to_rounding():
    """F(4x4)'s sums in chunks of SUM_CHUNK[4] (150 channels and 70 filters: chunks
    with a remainder) in float64, forward and grad_x, within 1e-12 of the reference."""
    assert 150 % _winograd.SUM_CHUNK[4] and 70 % _winograd.SUM_CHUNK[4]
    rng = np.random.default_rng(6)
    x, w, b = _problem(rng, 2, 150, 10, 10, 70, 1, np.float64)
    g = conv_geometry(x.shape, w.shape, 1, 1, 1)
    assert _winograd.choose_m(g) == 4 and _winograd.choose_m_input_grad(g) == 4
    y = fastconv.conv2d(x, w, b, padding=1, algorithm="winograd")
    assert relative_error(y, reference.conv2d(x, w, b, 1, 1)) < 1e-12
    dy = rng.standard_normal(y.shape)
    got = fastconv.conv2d_backward(dy, x, w, padding=1, algorithm="winograd")[0]
    assert relative_error(got, reference.conv2d_backward(dy, x, w, 1, 1)[0]) < 1e-12


@pytest.mark.parametrize("C, F", [(16, 32), (64, 32), (128, 32), (256, 32), (512, 32),
                                  (1024, 16), (16, 96), (16, 256), (16, 1024)])
def test_float32_error_is_within_10x_of_im2col(C, F, gemm_kernel):
    """The tile size rules keep Winograd's float32 error within 10x of im2col's: the
    forward's sums over C channels by F(4x4) in chunks of 64 (to 1024), grad_x's over
    F filters by F(3x3) (16, 32) or chunked F(4x4) (96 and more), grad_weight on 12x12
    planes by F(3x3, 3x3)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, C, 12, 12)).astype(np.float32)
    w = (rng.standard_normal((F, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    exact = reference.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1)
    im2col = relative_error(fastconv.conv2d(x, w, padding=1, algorithm="im2col"), exact)
    winograd = relative_error(fastconv.conv2d(x, w, padding=1, algorithm="winograd"), exact)
    assert winograd <= 10 * im2col, (winograd, im2col)
    dy = rng.standard_normal((2, F, 12, 12)).astype(np.float32)
    exact = reference.conv2d_backward(dy.astype(np.float64), x.astype(np.float64),
                                      w.astype(np.float64), padding=1)
    im2col = fastconv.conv2d_backward(dy, x, w, padding=1, algorithm="im2col")
    winograd = fastconv.conv2d_backward(dy, x, w, padding=1, algorithm="winograd")
    for i, what in enumerate(("grad_x", "grad_weight")):
        assert (relative_error(winograd[i], exact[i])
                <= 10 * relative_error(im2col[i], exact[i])), what


# --- dispatch --------------------------------------------------------------------------

def test_tile_size_rule():
    def geometry(C, F, H, W, groups=1):
        return conv_geometry((1, C, H, W), (F, C // groups, 3, 3), 1, 1, 1, groups)

    assert _winograd.choose_m(geometry(64, 512, 8, 8)) == 4
    assert _winograd.choose_m(geometry(512, 64, 7, 7)) == 4       # deep-7x7: chunked sums
    assert _winograd.choose_m(geometry(1024, 64, 8, 8)) == 4
    # longer sums: F(3x3) for accuracy (3x3 tiles of 25 products against 4x4 of 16)...
    assert _winograd.choose_m(geometry(1040, 64, 8, 8)) == 3
    assert _winograd.choose_m(geometry(2048, 64, 7, 7)) == 3      # 225 < 256
    # ... unless F(2x2) tiles the plane with fewer products (4x4: 4 tiles of 25 > 4 of 16)
    assert _winograd.choose_m(geometry(2048, 64, 4, 4)) == 2
    assert _winograd.choose_m(geometry(2048, 64, 8, 8, groups=8)) == 4
    assert _winograd.choose_m(geometry(64, 64, 2, 30)) == 2       # a 2-pixel output
    # grad_x sums over the filters: F(4x4) from two chunks of 64 on
    assert _winograd.choose_m_input_grad(geometry(512, 16, 8, 8)) == 3
    assert _winograd.choose_m_input_grad(geometry(512, 64, 56, 56)) == 3   # one chunk
    assert _winograd.choose_m_input_grad(geometry(64, 65, 8, 8)) == 4
    assert _winograd.choose_m_input_grad(geometry(64, 512, 8, 8)) == 4
    assert _winograd.choose_m_input_grad(geometry(64, 1024, 8, 8)) == 4
    assert _winograd.choose_m_input_grad(geometry(64, 1040, 8, 8)) == 3
    # grad_weight: 3x3 dY tiles where they need <= 0.8 of the 2x2 tiles' products
    assert _winograd.choose_n_weight_grad(geometry(64, 64, 56, 56)) == 3     # 0.72
    assert _winograd.choose_n_weight_grad(geometry(64, 64, 14, 14)) == 3     # 0.80
    assert _winograd.choose_n_weight_grad(geometry(512, 512, 7, 7)) == 2     # 0.88
    assert _winograd.choose_n_weight_grad(geometry(64, 64, 4, 4)) == 2


@pytest.mark.parametrize("call, match", [
    (lambda: fastconv.conv2d(np.ones((1, 2, 8, 8)), np.ones((2, 2, 5, 5)), algorithm="winograd"),
     r"algorithm='winograd' needs a 3x3 kernel, stride 1, dilation 1 and layout='NCHW' .*, "
     r"got kernel 5x5, stride=\(1, 1\), dilation=\(1, 1\), layout='NCHW'"),
    (lambda: fastconv.conv2d(np.ones((1, 2, 8, 8)), np.ones((2, 2, 3, 3)), stride=(1, 2),
                             algorithm="winograd"),
     r"stride=\(1, 2\)"),
    (lambda: fastconv.conv2d(np.ones((1, 2, 8, 8)), np.ones((2, 2, 3, 3)), dilation=2,
                             algorithm="winograd"),
     r"dilation=\(2, 2\)"),
    (lambda: fastconv.conv2d(np.ones((1, 8, 8, 4)), np.ones((4, 2, 3, 3)), layout="NHWC",
                             groups=2, algorithm="winograd"),
     r"layout='NHWC', groups=2"),
    (lambda: fastconv.conv2d_backward(np.ones((1, 2, 4, 4)), np.ones((1, 2, 8, 8)),
                                      np.ones((2, 2, 5, 5)), algorithm="winograd"),
     r"algorithm='winograd' needs a 3x3 kernel"),
    (lambda: fastconv.Conv2D(2, 2, 3, algorithm="winograd", stride=2)(np.ones((1, 2, 8, 8))),
     r"algorithm='winograd' needs a 3x3 kernel, stride 1.*stride=\(2, 2\)"),
])
def test_winograd_where_it_does_not_apply_is_a_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_auto_picks_winograd_for_3x3_stride_1_nchw_where_it_pays():
    from fastconv._functional import _choose_algorithm

    def geometry(C, F, kernel=3, stride=1, dilation=1, groups=1, mode="zeros"):
        return conv_geometry((1, C, 16, 16), (F, C // groups, kernel, kernel), stride, 1,
                             dilation, groups, mode)

    def forward(g, layout="NCHW"):
        return _choose_algorithm("auto", g, layout)

    def backward(g, layout="NCHW"):
        return _choose_algorithm("auto", g, layout, backward=True)

    assert forward(geometry(64, 64)) == backward(geometry(64, 64)) == "winograd"
    # channels-last: the forward and grad_x by Winograd (from 16 channels / filters)
    assert forward(geometry(64, 64), "NHWC") == backward(geometry(64, 64), "NHWC") == "winograd"
    assert forward(geometry(8, 64), "NHWC") == "direct"     # its direct kernel's
    assert forward(geometry(64, 64, groups=2), "NHWC") == "im2col"
    # other plain layers' forwards: the implicit-GEMM direct kernel (test_implicit.py)
    assert forward(geometry(64, 64, stride=2)) == "direct"
    assert forward(geometry(64, 64, kernel=5)) == "direct"
    assert forward(geometry(64, 64, dilation=2)) == "direct"
    assert backward(geometry(64, 64, stride=2)) == "direct"     # grad_x by stride phases
    assert forward(geometry(64, 64, groups=64)) == "direct"
    # few input channels: only with few filters per channel (the forward) ...
    assert forward(geometry(6, 16)) == "winograd"
    assert forward(geometry(6, 32)) == "direct"
    assert forward(geometry(3, 8)) == "direct"          # <= 4 channels: the dense direct kernel
    # ... grad_x needs enough output channels (C) for its filters (F)
    assert backward(geometry(3, 8)) == "im2col"
    assert backward(geometry(8, 64)) == "im2col"
    assert backward(geometry(32, 64)) == "winograd"
    assert backward(geometry(64, 64, mode="reflect")) == "im2col"
    assert forward(geometry(64, 64, mode="reflect")) == "winograd"


def test_reflect_grad_x_falls_back_to_im2col():
    """grad_x runs by Winograd only with zero padding; other modes still match."""
    rng = np.random.default_rng(6)
    x, w, b = _problem(rng, 2, 4, 6, 7, 3, 1, np.float64)
    dy = rng.standard_normal((2, 3, 6, 7))
    for mode in ("reflect", "replicate", "circular"):
        got = fastconv.conv2d_backward(dy, x, w, padding=1, padding_mode=mode,
                                       algorithm="winograd")
        want = reference.conv2d_backward(dy, x, w, padding=1, padding_mode=mode)
        for a, e in zip(got, want):
            np.testing.assert_allclose(a, e, rtol=1e-11, atol=1e-11)


# --- the fused ReLU ----------------------------------------------------------------------

@pytest.mark.parametrize("layout,algorithm,groups", [
    ("NCHW", "im2col", 1), ("NCHW", "winograd", 1), ("NCHW", "direct", 4),
    ("NCHW", "im2col", 2), ("NHWC", "im2col", 1),
])
@pytest.mark.parametrize("N", [1, 6])
def test_relu_activation_forward_and_backward(layout, algorithm, groups, N, dtype):
    """act='relu' equals relu(conv2d(...)) and its backward masks where the output is 0."""
    rng = np.random.default_rng(7)
    x, w, b = _problem(rng, N, 4, 6, 7, 4, groups, dtype)
    to = (lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))) if layout == "NHWC" \
        else (lambda a: a)
    args = dict(padding=1, groups=groups, layout=layout, algorithm=algorithm)
    plain = fastconv.conv2d(to(x), w, b, **args)
    fused = fastconv.conv2d(to(x), w, b, activation="relu", **args)
    np.testing.assert_array_equal(fused, fastconv.relu(plain))
    assert (fused == 0).any() and (fused > 0).any()
    dy = rng.standard_normal(fused.shape).astype(dtype)
    got = fastconv.conv2d_backward(dy, to(x), w, activation="relu", output=fused, **args)
    want = fastconv.conv2d_backward(fastconv.relu_backward(dy, plain), to(x), w, **args)
    for a, e in zip(got, want):
        np.testing.assert_array_equal(a, e)


def test_relu_keeps_nan_and_zeroes_negative_zero():
    x = np.array([np.nan, -0.0, -1.0, 2.0]).reshape(1, 1, 1, 4)
    w = np.ones((1, 1, 1, 1))
    for algorithm in ("im2col", "auto"):
        y = fastconv.conv2d(x, w, activation="relu", algorithm=algorithm)
        assert np.isnan(y[0, 0, 0, 0])
        assert np.array_equal(y[0, 0, 0, 1:], [0.0, 0.0, 2.0])
        assert not np.signbit(y[0, 0, 0, 1])
    x3 = np.full((1, 1, 3, 3), -0.0)
    x3[0, 0, 1, 1] = np.nan
    y = fastconv.conv2d(x3, np.zeros((1, 1, 3, 3)), padding=1, algorithm="winograd",
                        activation="relu")
    assert np.isnan(y).all()


@pytest.mark.parametrize("call, match", [
    (lambda: fastconv.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), activation="gelu"),
     r"activation must be None or 'relu', got 'gelu'"),
    (lambda: fastconv.conv2d_backward(np.ones((1, 1, 2, 2)), np.ones((1, 1, 4, 4)),
                                      np.ones((1, 1, 3, 3)), activation="relu"),
     r"activation='relu' needs output="),
    (lambda: fastconv.conv2d_backward(np.ones((1, 1, 2, 2)), np.ones((1, 1, 4, 4)),
                                      np.ones((1, 1, 3, 3)), activation="relu",
                                      output=np.ones((1, 1, 3, 3))),
     r"output must have the forward output's shape \(1, 1, 2, 2\), got \(1, 1, 3, 3\)"),
    (lambda: fastconv.Conv2D(1, 1, 3, activation="tanh"), r"activation must be None or 'relu'"),
])
def test_activation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- the layer's cache of transformed filters ----------------------------------------------

def _layer(dtype=np.float32, **kwargs):
    return fastconv.Conv2D(8, 6, 3, padding=1, algorithm="winograd", dtype=dtype, rng=0,
                           **kwargs)


def test_layer_reuses_the_transform_until_W_changes():
    layer = _layer(np.float64)
    x = np.random.default_rng(8).standard_normal((2, 8, 9, 9))
    y1 = layer(x)
    cached = layer._weight_cache._transforms
    assert len(cached) == 1
    (first,) = cached.values()
    np.testing.assert_array_equal(layer(x), y1)
    assert next(iter(layer._weight_cache._transforms.values())) is first      # reused
    layer.W[0, 0, 0, 0] += 1.0                                                 # in place
    y2 = layer(x)
    assert next(iter(layer._weight_cache._transforms.values())) is not first
    assert relative_error(y2, reference.conv2d(x, layer.W, layer.b, padding=1)) < 1e-12
    layer.W = layer.W * 2                                                      # rebound
    assert relative_error(layer(x), reference.conv2d(x, layer.W, layer.b, padding=1)) < 1e-12


def test_layer_training_step_with_the_cache():
    """forward -> backward -> W update -> forward: every step uses the current W."""
    rng = np.random.default_rng(9)
    layer = _layer(np.float64, activation="relu")
    x = rng.standard_normal((3, 8, 7, 7))
    for _ in range(3):
        y = layer(x)
        want = fastconv.relu(reference.conv2d(x, layer.W, layer.b, padding=1))
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
        dy = rng.standard_normal(y.shape)
        dx = layer.backward(dy)
        masked = np.where(want > 0, dy, 0)
        rx, rw, rb = reference.conv2d_backward(masked, x, layer.W, padding=1)
        np.testing.assert_allclose(dx, rx, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(layer.dW, rw, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(layer.db, rb, rtol=1e-11, atol=1e-11)
        layer.W -= 0.1 * layer.dW
        layer.b -= 0.1 * layer.db


def test_layer_cache_follows_the_compute_dtype():
    layer = _layer(np.float32)
    x32 = np.ones((1, 8, 6, 6), np.float32)
    y32 = layer(x32)
    y64 = layer(x32.astype(np.float64))       # float64 input: a float64 transform
    assert y32.dtype == np.float32 and y64.dtype == np.float64
    assert {key[-1] for key in layer._weight_cache._transforms} == {np.dtype(np.float32),
                                                                    np.dtype(np.float64)}
    np.testing.assert_allclose(y64, y32, rtol=1e-5, atol=1e-5)


def test_shared_layer_forward_from_many_threads():
    """Concurrent forwards on one layer give the serial result, and one cached transform."""
    layer = _layer(np.float32)
    rng = np.random.default_rng(10)
    inputs = [rng.standard_normal((2, 8, 10, 10)).astype(np.float32) for _ in range(8)]
    serial = [fastconv.conv2d(x, layer.W, layer.b, padding=1, algorithm="winograd")
              for x in inputs]
    results = [None] * len(inputs)
    barrier = threading.Barrier(len(inputs))

    def run(i):
        barrier.wait()
        for _ in range(5):
            results[i] = layer.forward(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)
    assert len(layer._weight_cache._transforms) == 1


# --- bounded memory ----------------------------------------------------------------------

def test_workspace_does_not_grow_with_the_batch():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)

    def sizes():
        result = []
        for N in (4, 16, 64):
            fastconv.conv2d(np.ones((N, 16, 40, 40), np.float32), w, padding=1,
                            algorithm="winograd", n_threads=2)
            result.append(_workspace._local.buffers[("winograd", np.dtype(np.float32))].size)
        return result

    found = run_in_thread(sizes)
    TW = 10                                          # 40 output columns in 4x4 tiles
    per_tile = 36 * (1 + 16 + 16) + 16               # D, V, M and the output tiles
    bound = 2 * (_tiling.WINOGRAD_MAX_TILES + TW) * per_tile
    assert max(found) <= bound, (found, bound)
    whole_batch_transform = 64 * 100 * per_tile      # every tile of N=64 at once
    assert found[-1] < whole_batch_transform / 8
