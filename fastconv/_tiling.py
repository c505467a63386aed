"""The tile plan: how many output columns a column tile holds and how work is split.

Everything that decides a tile size or a parallel split lives here, so it can
be tuned (and tested) in one place.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

#: Target size of one thread's column tile (K rows x tile columns): it stays in
#: this machine's 32 MiB L3 between im2col writing it and gemm reading it.
#: 1, 2 and 8 MiB measured within noise of each other on the suite; 2 MiB was
#: best or tied on every shape (minimum of 9 runs, 2 threads).
COLUMN_TILE_BYTES = 2 << 20
#: Fewer columns make gemm calls too thin: single-threaded sgemm with F=512,
#: K=4608 ran at 57 GFLOP/s with 49 columns, 84 with 196, 97 with 784.
MIN_TILE_COLUMNS = 512
#: Images are stacked into one tile only when a plane has fewer than half this
#: many columns: stacking stages the output through a buffer, an extra pass
#: that cost lenet-mnist (P=576, K=25, bound by output writes) ~20%.
GROUP_BELOW_COLUMNS = MIN_TILE_COLUMNS
#: BLAS takes 32-bit ints for every dimension and leading dimension. The
#: planners keep every tile's columns (rows, for NHWC; tiles of a block, for
#: Winograd) within it, the kernels read it at every call and cut longer GEMM
#: dimensions (``fastconv._blas.gemm_rm``), and a plane wider than it is staged
#: through the workspace. Tests lower it (monkeypatch) to run all of that on
#: small shapes; it is part of every planner's memo key.
BLAS_INT_MAX = 2**31 - 1


def _memoised(function):
    """Memoise a planner: plans are pure functions of their int arguments and of the
    module's tuning constants (part of the key: tests lower them), and planning costs
    ~6 us of Python, a visible share of a small layer."""
    cache: dict = {}
    constants = globals()

    @functools.wraps(function)
    def planner(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())),
               tuple([constants[name] for name in _TUNING_CONSTANTS]))
        found = cache.get(key)
        if found is None:
            if len(cache) >= 512:
                cache.clear()
            found = cache[key] = function(*args, **kwargs)
        return found

    return planner


class TilePlan(NamedTuple):
    """How one convolution is cut into work items (see ``fastconv._conv``)."""

    images_per_tile: int  # > 1: a tile is a group of whole images (then tile_p == P)
    tile_p: int           # output columns per tile within one image
    c_block: int          # input channels per grad_x work item when images are cut
    wide: bool = False    # P > BLAS_INT_MAX: tiles are staged (a plane's row stride P
                          # cannot be a BLAS leading dimension)

    def workspace_per_thread(self, K: int, F: int, pointwise: bool) -> int:
        """Elements of scratch one thread needs: the tile's columns (K x total) and,
        for image groups and wide planes, an F x total staging tile for the output
        or grad_output (a wide pointwise layer builds its columns too)."""
        total = self.images_per_tile * self.tile_p
        if self.images_per_tile > 1 or self.wide:
            return (K + F) * total
        return 0 if pointwise else K * total


def _splits_per_image(n_images: int, n_threads: int, at_least: int, at_most: int) -> int:
    """Split each image into s >= at_least pieces so that N*s work items keep every thread busy.

    With few items, s is also chosen so that N*s is a multiple of n_threads
    (N=3 on 2 threads would otherwise leave one thread idle a third of the time).
    """
    splits = max(at_least, math.ceil(n_threads / max(n_images, 1)))
    if n_images * splits < 4 * n_threads:
        candidate = splits
        while candidate <= at_most and (n_images * candidate) % n_threads:
            candidate += 1
        if candidate <= at_most:
            splits = candidate
    return max(1, min(splits, at_most))


def check_blas_limits(weight_shape: tuple, groups: int, layout: str = "NCHW",
                      row_name: str = "C/groups*KH*KW") -> None:
    """Refuse what no tiling can bring within the 32-bit BLAS limit: leading dimensions
    that are rows of an operand as stored.

    Every engine hands the weight's rows (C/groups*KH*KW values for conv2d's
    (F, C/groups, KH, KW) weight, C_out/groups*KH*KW for conv_transpose2d's
    (C_in, C_out/groups, KH, KW)) to BLAS as one leading dimension: a filter
    over 2**31 - 1 values (8 GiB of float32) is refused. The NHWC engine
    also stores a column row (C*KH*KW values) and an output pixel (F values)
    as BLAS rows. Everything else (F, OH*OW, N*OH*OW) is tiled.
    """
    F, Cg, KH, KW = weight_shape
    row = Cg * KH * KW
    where = f"(weight.shape={tuple(weight_shape)}, groups={groups})"
    if row > BLAS_INT_MAX:
        raise ValueError(
            f"{row_name}={row} exceeds the 32-bit BLAS limit {BLAS_INT_MAX} {where}: each "
            "filter's values form one BLAS row, which cannot be tiled"
        )
    if layout == "NHWC":
        for name, value in (("C*KH*KW", row * groups), ("out_channels F", F)):
            if value > BLAS_INT_MAX:
                raise ValueError(
                    f"{name}={value} exceeds the 32-bit BLAS limit {BLAS_INT_MAX} with "
                    f"layout='NHWC' {where}: the NHWC engine stores it as one BLAS row; "
                    "use layout='NCHW'"
                )


@_memoised
def plan(N: int, C: int, KK: int, P: int, itemsize: int, n_threads: int,
         pointwise: bool = False) -> TilePlan:
    """Tile plan for N images with K = C*KK column rows and P output columns each.

    ``pointwise``: a 1x1 stride-1 unpadded layer, whose GEMMs read x and dY and write y and
    dx in place: a tile of one image has no column tile to keep in cache, so only the
    threads cut its plane (if within the BLAS limit). Whole 56x56 planes rather than halves
    ran resnet-1x1's backward 1.05x / 1.03x faster (1 / 2 threads).
    """
    K = C * KK
    # a tile's columns are gemm's n and the staging tile's leading dimension
    budget = min(max(MIN_TILE_COLUMNS, COLUMN_TILE_BYTES // (K * itemsize)), BLAS_INT_MAX)
    if 2 * P <= min(budget, GROUP_BELOW_COLUMNS) and N > n_threads:
        # Small planes: stack whole images so each gemm has enough columns,
        # keeping at least one group per thread.
        groups = _splits_per_image(1, n_threads, at_least=math.ceil(N * P / budget), at_most=N)
        images_per_tile = math.ceil(N / groups)
        # ceil(N / images_per_tile) groups may not be the balanced count asked
        # for (N=6 in 4 groups gives 3 groups of 2): shrink the groups until the
        # few there are split evenly across the threads.
        while (images_per_tile > 1 and math.ceil(N / images_per_tile) < 4 * n_threads
               and math.ceil(N / images_per_tile) % n_threads):
            images_per_tile -= 1
        # the rounding up above may overshoot the budget by a plane
        images_per_tile = min(images_per_tile, BLAS_INT_MAX // P)
        if images_per_tile > 1:
            return TilePlan(images_per_tile=images_per_tile, tile_p=P, c_block=C)
    # Large planes, or too few images for the threads (N = 1 inference): cut images
    # (a plane wider than the BLAS limit is staged through a column tile, pointwise too)
    in_place = pointwise and P <= BLAS_INT_MAX
    at_least = 1 if in_place else math.ceil(P / budget)
    tiles = _splits_per_image(N, n_threads, at_least=at_least, at_most=P)
    tile_p = math.ceil(P / tiles)
    # grad_x splits an image by channel blocks instead (col2im must not race).
    blocks = _splits_per_image(N, n_threads, at_least=1, at_most=C)
    return TilePlan(images_per_tile=1, tile_p=tile_p, c_block=math.ceil(C / blocks),
                    wide=P > BLAS_INT_MAX)


#: A transposed convolution stacks images into one tile only up to this many
#: columns. Its GEMMs have the weight's Kg = C_out*KH*KW rows (forward) or
#: reduction (backward) as the long side, so a thin tile costs little while a
#: wide one makes the column tile (Kg x columns) fall out of the cache.
#: Measured against plan()'s 512 columns (2 threads, float32, 256 -> 128
#: channels, 4x4 stride 2): 16x16 inputs (dcgan-up) forward 1.11 -> 1.00 of
#: the bare GEMM, backward 2.48 -> 2.13 (one image a tile); 4x4 inputs forward
#: 1.54 -> 1.19 and backward 2.80 -> 2.38 (4 images: 64 columns); 8x8 inputs
#: forward and backward within noise of each other from 1 to 8 images.
TRANSPOSED_GROUP_COLUMNS = 64


def plan_transposed(N: int, C: int, KK: int, P: int, itemsize: int, n_threads: int) -> TilePlan:
    """:func:`plan` for a transposed convolution (``fastconv._transposed``): the same
    tiles, but image groups of at most TRANSPOSED_GROUP_COLUMNS columns.

    N, C, KK and P are those of the convolution the transposed one is the
    adjoint of (C = C_out, P = the transposed input's H*W).
    """
    base = plan(N, C, KK, P, itemsize, n_threads)
    if base.images_per_tile == 1:
        return base
    images_per_tile = min(base.images_per_tile, max(1, TRANSPOSED_GROUP_COLUMNS // P))
    if images_per_tile > 1:
        return TilePlan(images_per_tile=images_per_tile, tile_p=P, c_block=C)
    # One image a tile (whole planes: plan() only groups planes of <= 256
    # columns); grad_x cuts images into channel blocks only when there are
    # too few images for the threads, as in plan().
    blocks = _splits_per_image(N, n_threads, at_least=1, at_most=C)
    return TilePlan(images_per_tile=1, tile_p=P, c_block=math.ceil(C / blocks))


# ---------------------------------------------------------------------------
# Channels-last (NHWC) engine, fastconv._conv_nhwc: tiles are ranges of the
# batch's output rows r = (n*OH + oh)*OW + ow, whose column rows hold K values.
# ---------------------------------------------------------------------------

#: Target size of one thread's NHWC column tile (rows x K). Smaller than the
#: NCHW tile: the tile and its output rows then stay in this machine's 512 KiB
#: L2 from the gather to BLAS's packing (and the bias rows to the gemm). Against
#: 2 MiB, interleaved with NCHW in one process (2 threads, median of 7-21):
#: lenet-mnist forward 0.98 -> 0.84 of NCHW, cifar-3x3 0.96 -> 0.88,
#: resnet-stem 0.91 -> 0.63, resnet-3x3 0.92 -> 0.79, and no backward slower.
#: Shapes with K >= 128 get NHWC_MIN_TILE_ROWS rows whatever this is.
NHWC_TILE_BYTES = 256 << 10
#: Fewer rows make gemm calls too thin (the rows are gemm's long dimension).
NHWC_MIN_TILE_ROWS = MIN_TILE_COLUMNS
#: Forward and grad_weight split the filters among the threads (each packing
#: only its part of the weight) when one row tile holds the batch and there
#: are fewer rows than filters, and each thread gets at least this many filters.
NHWC_MIN_SPLIT_FILTERS = 32
#: grad_x channel blocks narrower than this (inside one group) cost one thin
#: gemm per kernel tap: resnet-stem (C=3) at N=1 ran 5x slower than NCHW with
#: blocks of 1-2 channels. Bands of input rows are cut instead.
NHWC_MIN_BLOCK_CHANNELS = 16


class NhwcPlan(NamedTuple):
    """How one NHWC convolution is cut into work items (see ``fastconv._conv_nhwc``)."""

    n_tiles: int          # forward, grad_weight (and pointwise grad_x): row tiles of the batch
    tile_rows: int        # most rows in any tile: the workspace holds tile_rows x K
    n_items: int          # grad_x: items of whole images (when c_block >= C and n_bands == 1)
    c_block: int          # grad_x: channels per (image, block) item when < C
    n_bands: int = 1      # grad_x: bands of input rows per image when > 1
    f_blocks: int = 1     # forward, grad_weight: blocks of filters per row tile

    def workspace_per_thread(self, K: int, pointwise: bool) -> int:
        """Elements of scratch one thread needs: one column tile (tile_rows x K).

        A pointwise forward and grad_weight read the input in place and a
        pointwise grad_x writes dx directly: no scratch at all.
        """
        return 0 if pointwise else self.tile_rows * K


def _balanced_count(at_least: int, n_threads: int, at_most: int) -> int:
    """A work-item count >= at_least (and >= n_threads) that keeps the threads evenly busy.

    The count is rounded up to a multiple of n_threads where there are enough
    items (13 equal tiles on 2 threads leave one thread idle 1/14 of the time).
    """
    count = max(at_least, n_threads)
    candidate = count
    while candidate <= at_most and candidate % n_threads:
        candidate += 1
    if candidate <= at_most:
        count = candidate
    return max(1, min(count, at_most))


@_memoised
def plan_nhwc(N: int, P: int, C: int, KK: int, groups: int, itemsize: int,
              n_threads: int, OH: int = 1, F: int = 1) -> NhwcPlan:
    """Tile plan for N images of P = OH*OW output positions, K = C*KK column values per
    row, and F filters.

    Row tiles (forward, grad_weight) may span images; when the whole batch
    fits one tile with fewer rows than filters (groups=1), the threads split
    the filters instead (``f_blocks``). grad_x must never let two threads
    scatter into one image: it runs items of whole images when they spread
    evenly over the threads, else cuts each image into blocks of whole
    groups, or blocks of at least NHWC_MIN_BLOCK_CHANNELS channels of one
    group, or else bands of input rows (OH > 1).
    """
    K = C * KK
    if K > BLAS_INT_MAX:
        raise ValueError(f"C*KH*KW={K} exceeds the 32-bit BLAS limit {BLAS_INT_MAX}")
    R = N * P
    budget = min(max(NHWC_MIN_TILE_ROWS, NHWC_TILE_BYTES // (K * itemsize), 1), BLAS_INT_MAX)
    f_blocks = 1
    if (groups == 1 and n_threads > 1 and 0 < R <= budget and R < F
            and F >= NHWC_MIN_SPLIT_FILTERS * n_threads):
        n_tiles, f_blocks = 1, n_threads
    else:
        n_tiles = _balanced_count(math.ceil(R / budget), n_threads, max(R, 1))
    tile_rows = math.ceil(R / n_tiles) if R else 1
    pieces = _splits_per_image(N, n_threads, at_least=1, at_most=max(C, OH))
    if pieces == 1:
        images_per_item = max(1, budget // max(P, 1))
        n_items = _balanced_count(math.ceil(N / images_per_item), n_threads, max(N, 1))
        # grad_x cuts an item's rows into tiles of at most tile_rows too
        item_rows = math.ceil(N / n_items) * P
        return NhwcPlan(n_tiles, max(tile_rows, min(budget, item_rows)), n_items, C,
                        f_blocks=f_blocks)
    tile_rows = max(tile_rows, min(budget, P))
    Cg = C // groups
    if pieces <= groups:
        return NhwcPlan(n_tiles, tile_rows, 0, math.ceil(groups / pieces) * Cg,
                        f_blocks=f_blocks)
    c_block = math.ceil(Cg / math.ceil(pieces / groups))
    if OH > 1 and c_block < NHWC_MIN_BLOCK_CHANNELS:
        return NhwcPlan(n_tiles, tile_rows, 0, C, n_bands=min(pieces, OH), f_blocks=f_blocks)
    if c_block < C:
        return NhwcPlan(n_tiles, tile_rows, 0, c_block, f_blocks=f_blocks)
    # one channel and one output row: nothing to cut
    return NhwcPlan(n_tiles, tile_rows, N, C, f_blocks=f_blocks)


# ---------------------------------------------------------------------------
# Winograd engine, fastconv._conv_winograd: work items are blocks of tile rows
# (r = n*TH + th) of the batch; a block's tiles share one set of GEMMs.
# ---------------------------------------------------------------------------

#: Target size of one thread's transform-domain workspace (V and M for a block). The
#: alpha**2 filter matrices are each read whole by every block's GEMM (1 MiB a position
#: on deep-7x7), so a block needs enough tiles (its GEMMs' columns) to pay for reading
#: them: 16 MiB gives deep-7x7's 512 + 512 channels 256 tiles where 4 MiB gave 64, and
#: ran 1.11-1.26x faster forward, 1.11-1.13x backward (1 and 2 threads, median of 9,
#: alternating; a 1-thread sgemm of 512 x 512 filters by 64 columns, cycling through 16
#: filter matrices, ran at 60 GFLOP/s against 90 with 256 columns, AMD EPYC AVX-512).
#: resnet-3x3 and vgg-mid, which had 113-256 tiles, were on par (0.97-1.05x). With
#: F(4x4) on deep-7x7 (36 positions: 147 KiB a tile) 16 MiB gave 113 tiles, two blocks
#: at 1 thread; 32 MiB gives one of 128, which ran the forward 1.08-1.12x and the
#: backward 1.05x faster at 1 thread (alternating, median of 18-15; at 2 threads
#: both have a block per thread, on par). Layers with C + F < 456 stay at 256 tiles.
WINOGRAD_BLOCK_BYTES = 32 << 20
#: Fewer tiles per block make the alpha**2 GEMMs too thin (the tiles are their
#: columns); more leave the block's V and M in memory rather than cache.
WINOGRAD_MIN_TILES = 64
WINOGRAD_MAX_TILES = 256


class WinogradPlan(NamedTuple):
    """How one Winograd convolution is cut into work items (see ``fastconv._conv_winograd``)."""

    m: int                # output tile size: F(m x m, 3 x 3)
    rows_per_block: int   # tile rows per work item; a block has rows_per_block * TW tiles
    tile_cols: int        # TW = ceil(OW / m)

    @property
    def alpha(self) -> int:
        return self.m + 2

    def workspace_per_thread(self, C: int, F: int) -> int:
        """Elements of scratch one thread needs: gathered tiles D, V, M and output tiles."""
        tiles = self.rows_per_block * self.tile_cols
        aa = self.alpha * self.alpha
        return tiles * (aa * (1 + C + F) + self.m * self.m)


@_memoised
def plan_winograd(N: int, C: int, F: int, OH: int, OW: int, m: int, itemsize: int,
                  n_threads: int) -> WinogradPlan:
    """Blocks of whole tile rows holding WINOGRAD_MIN_TILES..WINOGRAD_MAX_TILES tiles (as the
    byte budget allows), as many blocks as keep the threads evenly busy."""
    TH, TW = math.ceil(OH / m), math.ceil(OW / m)
    rows = N * TH
    aa = (m + 2) ** 2
    per_tile = aa * (C + F) * itemsize
    target = min(WINOGRAD_MAX_TILES, max(WINOGRAD_MIN_TILES, WINOGRAD_BLOCK_BYTES // per_tile))
    blocks = _balanced_count(math.ceil(rows * TW / target), n_threads, max(rows, 1))
    # a block's tiles are its GEMMs' columns and leading dimension
    # (fastconv._winograd.fits keeps TW itself within the limit)
    rows_per_block = min(math.ceil(rows / blocks), max(1, BLAS_INT_MAX // TW))
    return WinogradPlan(m, max(1, rows_per_block), TW)


#: The transposed convolution's phase forward (fastconv._conv_phases.forward) runs one
#: GEMM per transform position with the phases' filters stacked and a block's tiles as
#: its columns: on dcgan-up 128-144 tiles ran 1.8x faster than 18 and 1.1x faster than
#: 288 (1 and 2 threads, median of 11); on a 128 -> 64-channel 32x32 layer likewise.
PHASE_FORWARD_TILES = 128

#: The phase backward's blocks (fastconv._conv_phases.backward) hold this many tiles:
#: each block's grad_weight GEMMs read and write the thread's transform-domain sums
#: (9 * C_in * 4 * C_out values, 4.5 MiB on dcgan-up), so fewer, larger blocks pay:
#: 256 tiles ran 1.15x faster than 80 on dcgan-up at 2 threads, on par elsewhere.
PHASE_BACKWARD_TILES = 256


@_memoised
def plan_phase_forward(N: int, TH: int, TW: int, n_threads: int) -> int:
    """Tile rows per block of the phase forward: PHASE_FORWARD_TILES tiles, as many
    blocks as keep the threads evenly busy."""
    return _phase_rows(N * TH, TW, PHASE_FORWARD_TILES, n_threads)


@_memoised
def plan_phase_backward(N: int, TH: int, TW: int, n_threads: int) -> int:
    """Tile rows per block of the phase backward: PHASE_BACKWARD_TILES tiles, as many
    blocks as keep the threads evenly busy."""
    return _phase_rows(N * TH, TW, PHASE_BACKWARD_TILES, n_threads)


def _phase_rows(rows: int, TW: int, target: int, n_threads: int) -> int:
    """Tile rows per block for blocks of about ``target`` tiles (a block's tiles are its
    GEMMs' leading dimension: within the BLAS limit)."""
    blocks = _balanced_count(math.ceil(rows * TW / max(target, 1)), n_threads, max(rows, 1))
    return max(1, min(math.ceil(rows / blocks), BLAS_INT_MAX // TW))


#: The tuning constants above, in every planner's memo key.
_TUNING_CONSTANTS = tuple(name for name, value in list(globals().items())
                          if name.isupper() and isinstance(value, int))
