"""Huge tensors: GEMM dimensions past the 32-bit BLAS limit are tiled, indices are 64-bit.

BLAS takes every dimension and leading dimension as a 32-bit int. Shapes whose
F, OH*OW, N*OH*OW or tiles pass 2**31 - 1 are tested cheaply by lowering the
limit the planners and kernels honour (``fastconv._tiling.BLAS_INT_MAX``) to
7, 50 or 1000: every engine must then still match the reference, and no BLAS
call may receive a dimension above the lowered limit
(``fastconv._blas.record_calls``). Two real cases (an input of more than 2**31
elements; an output plane of more than 2**31 elements) are marked slow:
``pytest -m slow tests/test_huge.py``.
"""

import os

import numpy as np
import pytest
from _helpers import assert_matches

import fastconv
from fastconv import _blas, _tiling, _winograd, reference


@pytest.fixture
def blas_limit(monkeypatch):
    """Lower the BLAS limit and record BLAS calls; ``check()`` asserts what was recorded.
    The Winograd GEMMs run by BLAS here too (not by fastconv's own kernel, which takes
    any size), so that their arguments are checked."""

    class Limit:
        def set(self, value):
            self.value = value
            monkeypatch.setattr(_tiling, "BLAS_INT_MAX", value)
            _blas.record_calls(True)
            return self

        def check(self, expect_calls=True):
            calls, largest, over = _blas.recorded()
            if expect_calls:
                assert calls > 0, "no BLAS call recorded"
            assert over == 0 and largest <= self.value, (
                f"{over} BLAS calls got a dimension above the limit {self.value} "
                f"(largest {largest})")
            _blas.record_calls(True)      # fresh counters for the next check

    own_kernel = _blas.use_own_kernel(False)
    limit = Limit()
    yield limit
    _blas.record_calls(False)
    _blas.use_own_kernel(own_kernel)


def problem(rng, N, C, H, W, F, KH, KW, groups, dtype):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    weight = rng.standard_normal((F, C // groups, KH, KW)).astype(dtype)
    bias = rng.standard_normal(F).astype(dtype)
    return x, weight, bias


def beyond(limit, *sizes):
    """The shape is meant to pass the limit somewhere: F, P, N*P, ..."""
    assert max(sizes) > limit, (limit, sizes)


# (limit, N, C, H, W, F, KH, KW, stride, padding, groups): C/groups*KH*KW stays within
# the limit (a filter row is one BLAS leading dimension); F, OH*OW and N*OH*OW do not.
CONV_CASES = [
    (7, 3, 1, 10, 9, 9, 2, 2, 1, 1, 1),        # F = 9, P = 110 > 7: wide planes
    (7, 2, 5, 6, 7, 11, 1, 1, 1, 0, 1),        # pointwise, wide: no in-place planes
    (7, 3, 4, 8, 8, 10, 1, 3, 1, (0, 1), 2),   # grouped, Fg = 5, P = 72
    (7, 9, 2, 2, 3, 8, 1, 2, 1, 0, 1),         # small planes (P = 4): groups of images
    (50, 4, 5, 9, 9, 60, 3, 3, 1, 1, 1),       # F = 60, P = 81, N*P = 324
    (50, 40, 3, 2, 2, 20, 2, 2, 1, 1, 1),      # P = 9, image groups of <= 5
    (50, 2, 8, 12, 10, 52, 1, 1, 1, 0, 2),     # pointwise grouped, Fg = 26, P = 120
    (1000, 2, 16, 40, 40, 24, 3, 3, 1, 1, 1),  # P = 1600: resnet-like, wide planes
    (1000, 1, 4, 20, 50, 1100, 1, 1, 1, 0, 1),  # F = 1100, P = 1000 (not wide)
    (1000, 4, 6, 33, 35, 12, 3, 3, 2, 1, 3),   # strided, grouped: P = 306, N*P = 1224
]
THREADS = [1, 2, 3]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("n_threads", THREADS)
def test_im2col_forward_and_backward(blas_limit, case, n_threads):
    limit, N, C, H, W, F, KH, KW, stride, padding, groups = case
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        x, weight, bias = problem(rng, N, C, H, W, F, KH, KW, groups, dtype)
        expected = reference.conv2d(x, weight, bias, stride, padding, groups=groups)
        OH, OW = expected.shape[2:]
        beyond(limit, F, OH * OW, N * OH * OW)
        blas_limit.set(limit)
        K = C // groups * KH * KW
        for relu in (False, True):
            y = fastconv.conv2d(x, weight, bias, stride, padding, groups=groups,
                                algorithm="im2col", n_threads=n_threads,
                                activation="relu" if relu else None)
            blas_limit.check()
            want = np.maximum(expected, 0) if relu else expected
            assert_matches(y, want, dtype, K, f"forward relu={relu}")
        dy = rng.standard_normal(expected.shape).astype(dtype)
        dx, dw, db = fastconv.conv2d_backward(dy, x, weight, stride, padding, groups=groups,
                                              algorithm="im2col", n_threads=n_threads)
        blas_limit.check()
        rdx, rdw, rdb = reference.conv2d_backward(dy, x, weight, stride, padding,
                                                  groups=groups)
        assert_matches(dx, rdx, dtype, F * KH * KW, "grad_x")
        assert_matches(dw, rdw, dtype, N * OH * OW, "grad_weight")
        assert_matches(db, rdb, dtype, N * OH * OW, "grad_bias",
                       magnitude=np.abs(dy).sum(axis=(0, 2, 3)))


# NHWC keeps F and C*KH*KW within the limit (BLAS rows); the batch's rows pass it
NHWC_CASES = [case for case in CONV_CASES
              if case[5] <= case[0] and case[2] * case[6] * case[7] <= case[0]] + [
    (7, 3, 1, 10, 9, 6, 2, 2, 1, 1, 1),
    (7, 4, 6, 5, 5, 6, 1, 1, 1, 0, 2),         # pointwise grouped
    (50, 1, 5, 20, 20, 40, 3, 3, 1, 1, 1),     # one image: grad_x in bands or blocks
    (50, 3, 4, 9, 9, 48, 3, 3, 2, 1, 4),       # grouped, strided: N*P = 75
]


@pytest.mark.parametrize("case", NHWC_CASES, ids=str)
@pytest.mark.parametrize("n_threads", THREADS)
def test_nhwc_forward_and_backward(blas_limit, case, n_threads):
    """NHWC keeps F and C*KH*KW as BLAS rows (checked); its row tiles of the batch are cut.
    (im2col: the forward the direct kernel would take calls no BLAS.)"""
    limit, N, C, H, W, F, KH, KW, stride, padding, groups = case
    rng = np.random.default_rng(1)
    for dtype in (np.float64, np.float32):
        x, weight, bias = problem(rng, N, C, H, W, F, KH, KW, groups, dtype)
        expected = reference.conv2d(x, weight, bias, stride, padding, groups=groups)
        OH, OW = expected.shape[2:]
        beyond(limit, N * OH * OW)
        xh = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        blas_limit.set(limit)
        y = fastconv.conv2d(xh, weight, bias, stride, padding, groups=groups, layout="NHWC",
                            algorithm="im2col", n_threads=n_threads)
        blas_limit.check()
        assert_matches(y, expected.transpose(0, 2, 3, 1), dtype, C * KH * KW, "forward")
        dy = rng.standard_normal(expected.shape).astype(dtype)
        dx, dw, db = fastconv.conv2d_backward(np.ascontiguousarray(dy.transpose(0, 2, 3, 1)),
                                              xh, weight, stride, padding, groups=groups,
                                              layout="NHWC", n_threads=n_threads)
        blas_limit.check()
        rdx, rdw, rdb = reference.conv2d_backward(dy, x, weight, stride, padding,
                                                  groups=groups)
        assert_matches(dx, rdx.transpose(0, 2, 3, 1), dtype, F * KH * KW, "grad_x")
        assert_matches(dw, rdw, dtype, N * OH * OW, "grad_weight")
        assert_matches(db, rdb, dtype, N * OH * OW, "grad_bias",
                       magnitude=np.abs(dy).sum(axis=(0, 2, 3)))


# (limit, N, C, H, W, F, groups, padding)
WINOGRAD_CASES = [
    (50, 2, 5, 14, 30, 60, 1, 1),      # F = 60: the alpha**2 GEMMs' rows cut; TW = 8 or 15
    (50, 3, 4, 9, 11, 40, 1, 0),       # grad_x by Winograd (F/groups = 40 <= 50)
    (50, 2, 10, 12, 13, 120, 2, 1),    # grouped: Fg = 60 rows, Cg = 5
    (1000, 2, 16, 40, 44, 1040, 1, 1),  # F = 1040, P = 1760
]


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=str)
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("weight_grad_tile", _winograd.WEIGHT_GRAD_TILE_SIZES)
def test_winograd_forward_and_backward(blas_limit, monkeypatch, case, n_threads,
                                       weight_grad_tile):
    limit, N, C, H, W, F, groups, padding = case
    monkeypatch.setattr(_winograd, "choose_n_weight_grad", lambda geometry: weight_grad_tile)
    rng = np.random.default_rng(3)
    runs, weight_runs = [], []
    original = _winograd.backward_input
    monkeypatch.setattr(_winograd, "backward_input",
                        lambda *a, **k: runs.append(1) or original(*a, **k))
    original_weight = _winograd.backward_weight
    monkeypatch.setattr(_winograd, "backward_weight",
                        lambda *a, **k: weight_runs.append(1) or original_weight(*a, **k))
    for dtype in (np.float64, np.float32):
        x, weight, bias = problem(rng, N, C, H, W, F, 3, 3, groups, dtype)
        expected = reference.conv2d(x, weight, bias, 1, padding, groups=groups)
        OH, OW = expected.shape[2:]
        beyond(limit, F // groups, OH * OW, N * OH * OW)
        blas_limit.set(limit)
        y = fastconv.conv2d(x, weight, bias, 1, padding, groups=groups, algorithm="winograd",
                            n_threads=n_threads)
        blas_limit.check()
        assert_matches(y, expected, dtype, 9 * C // groups, "forward")
        dy = rng.standard_normal(expected.shape).astype(dtype)
        runs.clear()
        weight_runs.clear()
        dx, dw, db = fastconv.conv2d_backward(dy, x, weight, 1, padding, groups=groups,
                                              algorithm="winograd", n_threads=n_threads)
        blas_limit.check()
        assert weight_runs == [1]          # grad_weight by F(3x3, n x n), within the limit
        # grad_x by Winograd where its GEMMs fit (U's rows hold F/groups values), else im2col
        assert len(runs) == (F // groups <= limit), runs
        rdx, rdw, rdb = reference.conv2d_backward(dy, x, weight, 1, padding, groups=groups)
        assert_matches(dx, rdx, dtype, 9 * F // groups, "grad_x")
        assert_matches(dw, rdw, dtype, N * OH * OW, "grad_weight")


def test_winograd_wider_than_the_limit(blas_limit):
    """A tile row is one leading dimension: ceil(OW/2) past the limit refuses an explicit
    algorithm='winograd' (im2col runs; auto takes the direct kernel, which calls no BLAS)."""
    rng = np.random.default_rng(4)
    x, weight, bias = problem(rng, 1, 5, 4, 103, 3, 3, 3, 1, np.float64)
    blas_limit.set(50)
    with pytest.raises(ValueError, match=r"algorithm='winograd' needs ceil\(OW/2\) <= the "
                       r"BLAS limit 50 .*got OW=101 \(x.shape=\(1, 5, 4, 103\)\)"):
        fastconv.conv2d(x, weight, algorithm="winograd")
    y = fastconv.conv2d(x, weight, bias, algorithm="im2col")
    blas_limit.check()
    assert_matches(y, reference.conv2d(x, weight, bias), np.float64, 45)
    assert_matches(fastconv.conv2d(x, weight, bias), reference.conv2d(x, weight, bias),
                   np.float64, 45)
    dy = rng.standard_normal(y.shape)
    dx, dw, _ = fastconv.conv2d_backward(dy, x, weight, algorithm="winograd")
    blas_limit.check()
    rdx, rdw, _ = reference.conv2d_backward(dy, x, weight)
    assert_matches(dx, rdx, np.float64, 27)
    assert_matches(dw, rdw, np.float64, 101 * 2)


# (limit, N, C_in, H, W, C_out, KH, KW, stride, padding, groups)
TRANSPOSED_CASES = [
    (7, 3, 10, 5, 5, 1, 2, 2, 2, 0, 1),      # C_in/groups = 10: the weight is used untransposed
    (7, 2, 6, 4, 5, 2, 1, 3, 1, (0, 1), 1),  # C_in = 6: transposed weight; P = 20 wide
    (7, 12, 4, 2, 2, 3, 2, 1, 1, 0, 1),      # small planes: groups of images
    (50, 2, 16, 6, 7, 8, 2, 2, 2, 1, 2),     # grouped
    (50, 1, 60, 8, 8, 5, 3, 3, 2, 1, 1),     # C_in = 60 > 50, one image: channel blocks
    (1000, 2, 32, 36, 30, 16, 4, 4, 2, 1, 1),
]


@pytest.mark.parametrize("case", TRANSPOSED_CASES, ids=str)
@pytest.mark.parametrize("n_threads", THREADS)
def test_transposed_forward_and_backward(blas_limit, case, n_threads):
    limit, N, C_in, H, W, C_out, KH, KW, stride, padding, groups = case
    rng = np.random.default_rng(5)
    for dtype in (np.float64, np.float32):
        x = rng.standard_normal((N, C_in, H, W)).astype(dtype)
        weight = rng.standard_normal((C_in, C_out // groups, KH, KW)).astype(dtype)
        bias = rng.standard_normal(C_out).astype(dtype)
        beyond(limit, C_in, H * W, N * H * W)
        blas_limit.set(limit)
        y = fastconv.conv_transpose2d(x, weight, bias, stride, padding, groups=groups,
                                      n_threads=n_threads)
        blas_limit.check()
        expected = reference.conv_transpose2d(x, weight, bias, stride, padding, groups=groups)
        assert_matches(y, expected, dtype, C_in * KH * KW, "forward")
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx, dw, db = fastconv.conv_transpose2d_backward(dy, x, weight, stride, padding,
                                                        groups=groups, n_threads=n_threads)
        blas_limit.check()
        rdx, rdw, rdb = reference.conv_transpose2d_backward(dy, x, weight, stride, padding,
                                                            groups=groups)
        assert_matches(dx, rdx, dtype, C_out * KH * KW, "grad_x")
        assert_matches(dw, rdw, dtype, N * H * W, "grad_weight")
        assert_matches(db, rdb, dtype, dy[0, 0].size * N, "grad_bias",
                       magnitude=np.abs(dy).sum(axis=(0, 2, 3)))


# (limit, N, C_in, H, W, C_out, stride, padding): kernels twice the stride whose filter
# rows (C_out * KH * KW) stay within the limit; a batch's tiles do not
PHASE_CASES = [
    (50, 3, 20, 6, 30, 3, 2, 1),        # 12 stacked phase channels, 17-tile rows
    (50, 2, 45, 5, 12, 1, 3, 2),        # 9 phases, C_in = 45
    (1000, 2, 64, 20, 40, 60, 2, 1),    # 240 stacked channels
]


@pytest.mark.parametrize("case", PHASE_CASES, ids=str)
@pytest.mark.parametrize("n_threads", THREADS)
def test_transposed_phases_under_a_low_limit(blas_limit, case, n_threads):
    limit, N, C_in, H, W, C_out, stride, padding = case
    rng = np.random.default_rng(9)
    x = rng.standard_normal((N, C_in, H, W))
    weight = rng.standard_normal((C_in, C_out, 2 * stride, 2 * stride))
    bias = rng.standard_normal(C_out)
    args = dict(stride=stride, padding=padding, algorithm="winograd", n_threads=n_threads)
    blas_limit.set(limit)
    y = fastconv.conv_transpose2d(x, weight, bias, **args)
    blas_limit.check()
    assert_matches(y, reference.conv_transpose2d(x, weight, bias, stride, padding),
                   np.float64, 4 * C_in)
    dy = rng.standard_normal(y.shape)
    got = fastconv.conv_transpose2d_backward(dy, x, weight, **args)
    blas_limit.check()
    for a, e in zip(got, reference.conv_transpose2d_backward(dy, x, weight, stride, padding)):
        assert_matches(a, e, np.float64, N * H * W)
    # one more input channel than the limit: C_in is the forward's U rows' length
    wide_x = rng.standard_normal((1, limit + 1, H, W))
    wide_w = rng.standard_normal((limit + 1, C_out, 2 * stride, 2 * stride))
    with pytest.raises(ValueError, match=rf"within the BLAS limit {limit} .*C_in={limit + 1}"):
        fastconv.conv_transpose2d(wide_x, wide_w, None, **args)
    assert_matches(fastconv.conv_transpose2d(wide_x, wide_w, None, stride, padding),  # im2col
                   reference.conv_transpose2d(wide_x, wide_w, None, stride, padding),
                   np.float64, 4 * limit)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_other_engines_under_a_low_limit(blas_limit, n_threads):
    """The direct and depthwise kernels call no BLAS; auto picks them or im2col."""
    rng = np.random.default_rng(6)
    blas_limit.set(50)
    x, weight, bias = problem(rng, 3, 3, 20, 17, 60, 3, 3, 1, np.float64)
    y = fastconv.conv2d(x, weight, bias, padding=1, algorithm="direct", n_threads=n_threads)
    blas_limit.check(expect_calls=False)
    assert_matches(y, reference.conv2d(x, weight, bias, padding=1), np.float64, 27)
    x, weight, bias = problem(rng, 2, 8, 11, 9, 16, 3, 3, 8, np.float64)
    for algorithm in ("auto", "im2col"):
        y = fastconv.conv2d(x, weight, bias, padding=1, groups=8, algorithm=algorithm,
                            n_threads=n_threads)
        blas_limit.check(expect_calls=algorithm == "im2col")
        assert_matches(y, reference.conv2d(x, weight, bias, padding=1, groups=8),
                       np.float64, 9)
    # im2col/col2im (no BLAS) on a batch whose rows pass the limit
    x = rng.standard_normal((3, 2, 9, 8))
    col = fastconv.im2col(x, 3, 2, stride=1, pad=1, n_threads=n_threads)
    np.testing.assert_array_equal(col, reference.im2col(x, 3, 2, 1, 1))
    np.testing.assert_allclose(fastconv.col2im(col, x.shape, 3, 2, 1, 1, n_threads=n_threads),
                               reference.col2im(col, x.shape, 3, 2, 1, 1), rtol=1e-13)


def test_recorder_sees_the_leading_dimensions(blas_limit):
    """The default limit hands a pointwise plane (ld = P = 4096) to BLAS in place; the
    lowered one stages it: the recorder tells the two apart, so the checks above can fail."""
    rng = np.random.default_rng(7)
    x, weight, bias = problem(rng, 1, 4, 64, 64, 8, 1, 1, 1, np.float64)
    _blas.record_calls(True)
    y = fastconv.conv2d(x, weight, bias, algorithm="im2col", n_threads=1)
    calls, largest, over = _blas.recorded()
    assert calls > 0 and largest == 64 * 64 and over == 0
    blas_limit.set(1000)
    np.testing.assert_allclose(fastconv.conv2d(x, weight, bias, algorithm="im2col",
                                               n_threads=1), y, rtol=1e-13)
    calls, largest, over = _blas.recorded()
    assert calls > 1 and largest <= 1000 and over == 0


@pytest.mark.parametrize("limit", [7, 50, 1000, 4096])
def test_plans_stay_within_the_limit(monkeypatch, limit):
    """Every plan's tiles (the GEMMs' columns and the staging tile's leading dimension)
    fit the limit, and wide planes are flagged for staging."""
    monkeypatch.setattr(_tiling, "BLAS_INT_MAX", limit)
    for N in (1, 2, 5, 40, 300):
        for P in (1, 3, 7, 8, 50, 81, 1000, 1001, 5000, 50176):
            for C, KK in ((1, 1), (3, 2), (16, 9), (64, 9)):
                for T in (1, 2, 3):
                    where = (limit, N, P, C, KK, T)
                    for planner in (_tiling.plan, _tiling.plan_transposed):
                        tiles = planner(N, C, KK, P, 4, T)
                        assert tiles.images_per_tile * tiles.tile_p <= limit, (where, tiles)
                        assert tiles.wide == (P > limit), (where, tiles)
                    if C * KK <= limit:     # else refused (a column row is a BLAS row)
                        rows = _tiling.plan_nhwc(N, P, C, KK, 1, 4, T, 1, 8)
                        assert rows.tile_rows <= limit, (where, rows)
    for N, OH, OW, m in ((1, 3, 10, 2), (4, 30, 30, 4), (2, 56, 98, 2), (8, 8, 8, 4)):
        if -(-OW // 2) > limit:
            continue
        wino = _tiling.plan_winograd(N, 5, 8, OH, OW, m, 4, 2)
        assert wino.rows_per_block * wino.tile_cols <= limit, (limit, N, OH, OW, m, wino)


def test_untileable_dimensions_are_refused(blas_limit):
    """What no tiling can cut: a filter row of C/groups*KH*KW values (every engine), and
    NHWC's column rows (C*KH*KW) and output pixels (F)."""
    blas_limit.set(20)
    x = np.zeros((1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"C/groups\*KH\*KW=27 exceeds the 32-bit BLAS limit "
                       r"20 \(weight.shape=\(2, 3, 3, 3\), groups=1\): each filter's values "
                       r"form one BLAS row"):
        fastconv.conv2d(x, np.zeros((2, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"C/groups\*KH\*KW=27"):
        fastconv.conv2d_backward(np.zeros((1, 2, 6, 6)), x, np.zeros((2, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"C_out/groups\*KH\*KW=27 exceeds the 32-bit BLAS "
                       r"limit 20 \(weight.shape=\(3, 3, 3, 3\), groups=1\)"):
        fastconv.conv_transpose2d(x, np.zeros((3, 3, 3, 3)))
    fastconv.conv2d(x, np.zeros((3, 1, 3, 3)), groups=3)      # 9 per filter: fine
    xh = np.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"C\*KH\*KW=27 exceeds the 32-bit BLAS limit 20 with "
                       r"layout='NHWC' \(weight.shape=\(3, 1, 3, 3\), groups=3\).*use "
                       r"layout='NCHW'"):
        fastconv.conv2d(xh, np.zeros((3, 1, 3, 3)), groups=3, layout="NHWC")
    with pytest.raises(ValueError, match=r"out_channels F=21 exceeds the 32-bit BLAS limit 20 "
                       r"with layout='NHWC'"):
        fastconv.conv2d(xh, np.zeros((21, 3, 1, 1)), layout="NHWC")
    fastconv.conv2d(x, np.zeros((21, 3, 1, 1)), algorithm="im2col")   # NCHW cuts F
    blas_limit.check()


def test_real_limit_refuses_a_filter_row_over_2_31():
    """At the real limit (broadcast inputs: no memory used)."""
    x = np.broadcast_to(np.float32(0), (1, 2**16, 2**8, 2**7))
    weight = np.broadcast_to(np.float32(0), (1, 2**16, 2**8, 2**7))
    with pytest.raises(ValueError, match=rf"C/groups\*KH\*KW={2**31} exceeds the 32-bit BLAS "
                       rf"limit {2**31 - 1}"):
        fastconv.conv2d(x, weight)


def test_float32_bias_sums_of_a_large_batch():
    """2**25 ones sum to 2**25: a single float32 accumulator would stop at 2**24. NHWC's
    grad_bias and conv_transpose2d's sum blocks first (256 MiB of arrays)."""
    x = np.zeros((1, 4096, 8192, 1), np.float32)
    dy = np.ones_like(x)
    weight = np.ones((1, 1, 1, 1), np.float32)
    _, _, db = fastconv.conv2d_backward(dy, x, weight, layout="NHWC", n_threads=1)
    assert db[0] == 2**25
    nchw = x.reshape(1, 1, 4096, 8192)
    _, _, db = fastconv.conv_transpose2d_backward(dy.reshape(nchw.shape), nchw, weight,
                                                  n_threads=1)
    assert db[0] == 2**25


# --- real cases ---------------------------------------------------------------------------

def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
def test_real_input_over_2_31_elements():
    """A float32 image of 46341 x 46341 > 2**31 pixels (8 GiB), 2x2 stride 2 (K*P > 2**31
    too): every engine that applies, checked on its first and last output rows and on
    random samples against NumPy. Needs ~10.1 GiB of memory."""
    side = 46341
    need = side * side * 4 + (side // 2) ** 2 * 4
    if _available_bytes() < need + (2 << 30):
        pytest.skip(f"needs {need / 2**30:.1f} GiB + 2 GiB of headroom, "
                    f"{_available_bytes() / 2**30:.1f} GiB available")
    assert side * side > 2**31
    rng = np.random.default_rng(8)
    x = np.empty((1, 1, side, side), np.float32)
    for r0 in range(0, side, 4096):
        rng.random(out=x[0, 0, r0:r0 + 4096], dtype=np.float32)
    weight = np.array([[[[0.25, -0.5], [1.0, 0.75]]]], np.float32)
    bias = np.array([0.125], np.float32)
    OH = side // 2
    y = np.empty((1, 1, OH, OH), np.float32)
    rows = np.concatenate([[0, 1, OH - 2, OH - 1], rng.integers(0, OH, 60)])
    cols = np.concatenate([[0, OH - 1], rng.integers(0, OH, 60)])
    w = weight[0, 0].astype(np.float64)

    def expected_rows(i):
        two = x[0, 0, 2 * i:2 * i + 2, :2 * OH].astype(np.float64).reshape(2, OH, 2)
        return np.einsum("kjl,kl->j", two, w) + 0.125

    for layout, algorithm in (("NCHW", "auto"), ("NCHW", "im2col"), ("NHWC", "auto")):
        y.fill(np.nan)                       # each engine must write what it is checked on
        if layout == "NHWC":
            out = fastconv.conv2d(x.reshape(1, side, side, 1), weight, bias, stride=2,
                                  layout="NHWC", out=y.reshape(1, OH, OH, 1))
        else:
            out = fastconv.conv2d(x, weight, bias, stride=2, algorithm=algorithm, out=y)
        plane = out.reshape(OH, OH)
        for i in rows[:4]:
            assert_matches(plane[i], expected_rows(i), np.float32, 4, f"{layout} {algorithm}")
        picked = plane[rows[4:], cols[2:]]
        want = [expected_rows(i)[j] for i, j in zip(rows[4:], cols[2:])]
        assert_matches(picked, np.array(want), np.float32, 4, f"{layout} {algorithm} samples")


@pytest.mark.slow
def test_real_plane_over_2_31_outputs():
    """One 1x1 pixel padded to a 46343 x 46343 output plane: P = OH*OW > 2**31 - 1, so
    the plane's row stride cannot be a BLAS leading dimension and the NCHW tiles are
    staged for real (and NHWC's N*OH*OW rows pass the limit). 8 GiB of float32 output,
    every element checked; the backward runs on an 8 GiB grad_output of random values."""
    pad = 23171
    OH = 2 * pad + 1
    need = OH * OH * 4
    if _available_bytes() < need + (2 << 30):
        pytest.skip(f"needs {need / 2**30:.1f} GiB + 2 GiB of headroom, "
                    f"{_available_bytes() / 2**30:.1f} GiB available")
    assert OH * OH > 2**31 - 1
    x = np.full((1, 1, 1, 1), 3.0, np.float32)
    weight = np.full((1, 1, 1, 1), -0.5, np.float32)
    bias = np.array([0.25], np.float32)
    assert _tiling.plan(1, 1, 1, OH * OH, 4, 2).wide
    y = np.empty((1, 1, OH, OH), np.float32)
    for layout in ("NCHW", "NHWC"):
        y.fill(np.nan)
        if layout == "NCHW":
            fastconv.conv2d(x, weight, bias, padding=pad, algorithm="im2col", out=y)
        else:
            fastconv.conv2d(x, weight, bias, padding=pad, layout="NHWC",
                            out=y.reshape(1, OH, OH, 1))
        plane = y.reshape(OH, OH)
        # exact: every output is 0.25, except the centre's 3 * -0.5 + 0.25
        assert plane[pad, pad] == np.float32(-1.25), layout
        plane[pad, pad] = 0.25
        for r0 in range(0, OH, 4096):
            assert np.all(plane[r0:r0 + 4096] == np.float32(0.25)), (layout, r0)
    rng = np.random.default_rng(9)
    dy = y
    for r0 in range(0, OH, 4096):
        rng.random(out=dy[0, 0, r0:r0 + 4096], dtype=np.float32)
    centre = np.float64(dy[0, 0, pad, pad])
    total = sum(float(dy[0, 0, r0:r0 + 4096].sum(dtype=np.float64)) for r0 in range(0, OH, 4096))
    for layout in ("NCHW", "NHWC"):
        if layout == "NCHW":
            dx, dw, db = fastconv.conv2d_backward(dy, x, weight, padding=pad, algorithm="im2col")
        else:
            dx, dw, db = fastconv.conv2d_backward(dy.reshape(1, OH, OH, 1), x, weight,
                                                  padding=pad, layout="NHWC")
        # only the centre output reads the pixel: the rest of the sums add zeros
        assert_matches(dx.reshape(1), np.array([-0.5 * centre]), np.float32, 1, layout)
        assert_matches(dw.reshape(1), np.array([3.0 * centre]), np.float32, 1, layout)
        assert_matches(db, np.array([total]), np.float32, OH * OH, layout)
