"""Properties of the tile plan (fastconv._tiling) and of the workspace it sizes.

The plan decides how a convolution is cut into work items; these tests check
what must hold whatever the tuning constants are: tiles never exceed a plane,
per-thread scratch is bounded independently of the batch size, a single image
still feeds every thread, and few work items are split evenly across threads.
"""

import itertools
import re
import math

import numpy as np
import pytest
from _helpers import run_in_thread

import fastconv
from fastconv import _tiling, _workspace
from fastconv._tiling import BLAS_INT_MAX, check_blas_limits, plan

NS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 33]
CS = [1, 3, 16, 64, 256]
KKS = [1, 9, 25]
PS = [1, 2, 7, 64, 196, 784, 3136, 50176]
ITEMSIZES = [4, 8]
THREADS = [1, 2, 3, 4, 8]
GRID = list(itertools.product(NS, CS, KKS, PS, ITEMSIZES, THREADS))

F = 32   # filters, for workspace sizes (the plan does not depend on F)


def budget_columns(C, KK, itemsize):
    """The planner's target columns per tile, from its own constants."""
    return max(_tiling.MIN_TILE_COLUMNS, _tiling.COLUMN_TILE_BYTES // (C * KK * itemsize))


def work_items(N, P, tiles):
    """(forward/grad_weight items, grad_x items) the drivers in _conv.pyx run for this plan."""
    if tiles.images_per_tile > 1:
        groups = math.ceil(N / tiles.images_per_tile)
        return groups, groups
    return N * math.ceil(P / tiles.tile_p), None


def test_plan_is_well_formed():
    for N, C, KK, P, itemsize, T in GRID:
        tiles = plan(N, C, KK, P, itemsize, T)
        where = (N, C, KK, P, itemsize, T, tiles)
        assert 1 <= tiles.tile_p <= P, where
        assert 1 <= tiles.images_per_tile <= N, where
        assert 1 <= tiles.c_block <= C, where
        assert tiles.tile_p <= BLAS_INT_MAX, where
        if tiles.images_per_tile > 1:
            # a tile of whole images: every plane complete
            assert tiles.tile_p == P and tiles.c_block == C, where


def test_workspace_per_thread_is_bounded_independently_of_the_batch():
    """Scratch per thread never exceeds (K + F) x (budget + P), whatever N is.

    It is *not* constant in N: for small planes the planner stacks more whole
    images per tile as the batch grows (N=3 -> 6 on 2 threads goes from 2 to 3
    images per tile), up to the tile budget. What must hold is that it stops
    there: N, 2N and 8N all stay under one bound that does not involve N.
    """
    for N, C, KK, P, itemsize, T in GRID:
        K = C * KK
        bound = (K + F) * (budget_columns(C, KK, itemsize) + P)
        for n in (N, 2 * N, 8 * N, 1000 * N):
            tiles = plan(n, C, KK, P, itemsize, T)
            for pointwise in (False, True):
                size = tiles.workspace_per_thread(K, F, pointwise)
                assert size <= bound, (n, C, KK, P, itemsize, T, tiles, size, bound)
            columns = tiles.images_per_tile * tiles.tile_p
            if tiles.images_per_tile == 1:
                assert columns <= budget_columns(C, KK, itemsize), (n, C, KK, P, itemsize, T)


def test_workspace_per_thread_for_cut_images():
    """Images cut into column tiles: K x tile_p, and nothing for 1x1 stride-1 kernels."""
    tiles = _tiling.TilePlan(images_per_tile=1, tile_p=100, c_block=3)
    assert tiles.workspace_per_thread(K=27, F=8, pointwise=False) == 27 * 100
    assert tiles.workspace_per_thread(K=27, F=8, pointwise=True) == 0
    groups = _tiling.TilePlan(images_per_tile=4, tile_p=50, c_block=3)
    assert groups.workspace_per_thread(K=27, F=8, pointwise=False) == (27 + 8) * 4 * 50
    assert groups.workspace_per_thread(K=27, F=8, pointwise=True) == (27 + 8) * 4 * 50


@pytest.mark.parametrize("T", [2, 3, 4, 8])
def test_single_image_feeds_every_thread(T):
    """N = 1 inference: the image is cut into >= T column tiles and >= T channel blocks."""
    for C, KK, P, itemsize in itertools.product(CS, KKS, PS, ITEMSIZES):
        tiles = plan(1, C, KK, P, itemsize, T)
        where = (C, KK, P, itemsize, T, tiles)
        assert tiles.images_per_tile == 1, where
        per_image = math.ceil(P / tiles.tile_p)
        if P > T * (T - 1):    # then ceil(P / ceil(P / T)) == T: T equal tiles exist
            assert per_image >= T, where
        elif P >= 2:
            assert per_image >= 2, where
        blocks = math.ceil(C / tiles.c_block)
        if C >= T:
            assert blocks >= T, where
        if C >= 2:
            assert tiles.c_block < C, where


def test_n1_two_threads_has_two_work_items():
    for C, KK, P, itemsize in itertools.product(CS, KKS, PS, ITEMSIZES):
        tiles = plan(1, C, KK, P, itemsize, 2)
        if P >= 2:
            assert math.ceil(P / tiles.tile_p) >= 2, (C, KK, P, itemsize, tiles)
        if C >= 2:
            assert tiles.c_block < C, (C, KK, P, itemsize, tiles)


def test_pointwise_planes_are_cut_only_for_the_threads(monkeypatch):
    """A 1x1 layer's GEMMs read and write its planes in place: no column tile bounds its
    tiles, unless the plane passes the BLAS limit (then it is staged)."""
    assert plan(8, 256, 1, 3136, 4, 2, pointwise=True).tile_p == 3136     # resnet-1x1
    assert plan(8, 256, 1, 3136, 4, 2).tile_p == 1568                     # its column tiles
    assert plan(1, 256, 1, 3136, 4, 2, pointwise=True).tile_p == 1568     # two threads
    assert plan(2, 64, 1, 1 << 20, 4, 2, pointwise=True).tile_p == 1 << 20
    monkeypatch.setattr(_tiling, "BLAS_INT_MAX", 1000)
    assert plan(2, 64, 1, 1 << 20, 4, 2, pointwise=True).tile_p <= 1000


def _exact_splits(total, s):
    """Whether ``total`` things cut into pieces of ceil(total / s) give exactly s pieces."""
    return math.ceil(total / math.ceil(total / s)) == s


def test_cut_images_are_split_evenly_across_threads():
    """Few work items (< 4T): a multiple of T of them whenever an exact split allows it."""
    checked = 0
    for N, C, KK, P, itemsize, T in GRID:
        tiles = plan(N, C, KK, P, itemsize, T)
        if tiles.images_per_tile > 1:
            continue
        items, _ = work_items(N, P, tiles)
        if items >= 4 * T:
            continue
        at_least = math.ceil(P / budget_columns(C, KK, itemsize))
        possible = any(N * s % T == 0 and N * s < 4 * T and _exact_splits(P, s)
                       for s in range(at_least, P + 1))
        if possible:
            checked += 1
            assert items % T == 0, (N, C, KK, P, itemsize, T, tiles, items)
    assert checked > 100


@pytest.fixture
def pinned_constants(monkeypatch):
    """The constants of the bug report, so retuning them does not move the example."""
    monkeypatch.setattr(_tiling, "COLUMN_TILE_BYTES", 2 << 20)
    monkeypatch.setattr(_tiling, "MIN_TILE_COLUMNS", 512)
    monkeypatch.setattr(_tiling, "GROUP_BELOW_COLUMNS", 512, raising=False)


def test_image_groups_are_split_evenly_across_threads(pinned_constants):
    failures = []
    for N, C, KK, P, itemsize, T in GRID:
        tiles = plan(N, C, KK, P, itemsize, T)
        if tiles.images_per_tile == 1:
            continue
        items, _ = work_items(N, P, tiles)
        if items >= 4 * T:
            continue
        # group counts that uniform groups reach exactly, within the planner's tile budget
        at_least = math.ceil(N * P / budget_columns(C, KK, itemsize))
        possible = [g for g in range(at_least, N + 1)
                    if g % T == 0 and g < 4 * T and _exact_splits(N, g)]
        if possible and items % T:
            failures.append((N, C, KK, P, itemsize, T, tiles.images_per_tile, items))
    assert not failures, failures[:10]


def test_image_groups_minimal_example(pinned_constants):
    tiles = plan(6, 64, 9, 196, 8, 2)          # 64 -> 64 channels, 3x3, 14x14, float64
    groups = math.ceil(6 / tiles.images_per_tile)
    assert groups % 2 == 0, tiles


def test_plan_transposed_caps_image_groups():
    """A transposed convolution's plan is plan()'s, except that image groups hold at most
    TRANSPOSED_GROUP_COLUMNS columns (or one image), and single-image tiles cut grad_x
    into enough channel blocks for the threads."""
    cap = _tiling.TRANSPOSED_GROUP_COLUMNS
    for N, C, KK, P, itemsize, T in GRID:
        base = plan(N, C, KK, P, itemsize, T)
        tiles = _tiling.plan_transposed(N, C, KK, P, itemsize, T)
        where = (N, C, KK, P, itemsize, T, base, tiles)
        if base.images_per_tile == 1:
            assert tiles == base, where
            continue
        assert tiles.tile_p == P and 1 <= tiles.images_per_tile <= base.images_per_tile, where
        assert tiles.images_per_tile * P <= max(cap, P), where
        assert tiles.images_per_tile == max(1, min(base.images_per_tile, cap // P)), where
        # never more scratch than plan()'s, so still bounded independently of N
        K = C * KK
        assert (tiles.workspace_per_thread(K, F, False)
                <= base.workspace_per_thread(K, F, False)), where
        if tiles.images_per_tile == 1:
            # grad_x items (image, channel block) feed every thread
            assert 1 <= tiles.c_block <= C, where
            assert N * math.ceil(C / tiles.c_block) >= min(T, N * C), where
        else:
            assert tiles.c_block == C, where


def test_plan_transposed_dcgan_up():
    """dcgan-up (16 x 256 x 16x16 -> 128, 4x4, stride 2): one image a tile, whole planes;
    a 4x4 input stacks 64 columns' worth of images."""
    assert _tiling.plan_transposed(16, 128, 16, 256, 4, 2) == _tiling.TilePlan(1, 256, 128)
    assert _tiling.plan(16, 128, 16, 256, 4, 2).images_per_tile == 2
    assert _tiling.plan_transposed(256, 128, 16, 16, 4, 2).images_per_tile == 4
    assert _tiling.plan_transposed(1, 128, 16, 256, 4, 2).c_block == 64


def test_check_blas_limits():
    """Only rows of an operand as stored are refused: every other size is tiled
    (tests/test_huge.py runs them under a lowered limit)."""
    check_blas_limits((BLAS_INT_MAX, 1, 1, BLAS_INT_MAX), 1)           # at the limit: fine
    check_blas_limits((2**40, 1, 1, 1), 1)                            # F: cut into pieces
    check_blas_limits((BLAS_INT_MAX, 1, 1, 1), 1, "NHWC")
    check_blas_limits((4, 2**18, 2**10, 2), 4, "NCHW")    # C*KH*KW = 2**31, per group 2**29
    for args, name, value in [(((1, 2**20, 2**10, 2), 1), "C/groups*KH*KW", 2**31),
                              (((1, 2**20, 2**10, 2), 1, "NCHW", "C_out/groups*KH*KW"),
                               "C_out/groups*KH*KW", 2**31),
                              (((4, 2**18, 2**10, 2), 4, "NHWC"), "C*KH*KW", 2**31),
                              (((BLAS_INT_MAX + 1, 1, 1, 1), 1, "NHWC"), "out_channels F",
                               2**31)]:
        with pytest.raises(ValueError, match=rf"{re.escape(name)}={value} exceeds the 32-bit "
                           rf"BLAS limit {BLAS_INT_MAX}"):
            check_blas_limits(*args)


def test_blas_limits_checked_before_allocating():
    """A filter row over 2**31 - 1 values is refused up front (broadcast inputs: no memory
    used); a plane over 2**31 - 1 outputs is not (its tiles are staged)."""
    x = np.broadcast_to(np.float32(0), (1, 2**16, 2**8, 2**7))
    weight = np.broadcast_to(np.float32(0), (1, 2**16, 2**8, 2**7))
    with pytest.raises(ValueError, match=rf"C/groups\*KH\*KW={2**31} exceeds the 32-bit BLAS "
                       "limit"):
        fastconv.conv2d(x, weight)
    side = math.isqrt(BLAS_INT_MAX) + 1                   # side**2 > 2**31 - 1
    tiles = plan(1, 1, 1, side * side, 4, 2)
    assert tiles.wide and tiles.tile_p <= BLAS_INT_MAX


# --- end to end: the cached column buffer does not scale with N -----------------

def _columns_buffer_sizes(calls):
    """Run ``calls`` in a fresh thread (fresh workspaces); the "columns" buffer size after each."""
    def sizes():
        result = []
        for call in calls:
            dtype = call()
            result.append(_workspace._local.buffers[("columns", np.dtype(dtype))].size)
        return result

    return run_in_thread(sizes)


def _large_plane_hw(C, KK, itemsize):
    """A square plane with 2P > budget, so the planner cuts images instead of stacking them."""
    return math.isqrt(budget_columns(C, KK, itemsize) // 2) + 2


def test_conv2d_column_buffer_does_not_grow_with_the_batch():
    C, F_, T = 16, 8, 2
    side = _large_plane_hw(C, 9, 4)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((F_, C, 3, 3)).astype(np.float32)

    def forward(N):
        def call():
            x = np.ones((N, C, side, side), np.float32)
            fastconv.conv2d(x, weight, padding=1, n_threads=T, algorithm="im2col")
            return np.float32
        return call

    def backward(N):
        def call():
            x = np.ones((N, C, side, side), np.float32)
            fastconv.conv2d_backward(np.ones((N, F_, side, side), np.float32), x, weight,
                                     padding=1, n_threads=T, algorithm="im2col")
            return np.float32
        return call

    N = 4 * T
    sizes = _columns_buffer_sizes([forward(N), forward(4 * N), backward(N), backward(4 * N)])
    assert sizes[0] == sizes[1] == sizes[2] == sizes[3], sizes
    whole_batch_columns = 4 * N * C * 9 * side * side
    assert sizes[1] <= whole_batch_columns / (2 * N)


def test_conv2d_column_buffer_is_bounded_for_small_planes():
    """Small planes stack images per tile; the buffer still stops at the tile budget."""
    C, F_, T, side = 8, 8, 2, 6
    K, P = C * 9, side * side
    weight = np.ones((F_, C, 3, 3))

    def forward(N):
        def call():
            fastconv.conv2d(np.ones((N, C, side, side)), weight, padding=1, n_threads=T,
                            algorithm="im2col")
            return np.float64
        return call

    batches = [3, 12, 48, 192, 768, 3072]
    sizes = _columns_buffer_sizes([forward(N) for N in batches])
    bound = T * (K + F_) * (budget_columns(C, 9, 8) + P)
    assert max(sizes) <= bound, (sizes, bound)
    assert sizes[-1] < batches[-1] * K * P / 8        # far from the whole batch's columns
