"""The tile plan: how many output columns a column tile holds and how work is split.

Everything that decides a tile size or a parallel split lives here, so it can
be tuned (and tested) in one place.
"""

from __future__ import annotations

import math
from typing import NamedTuple

#: Target size of one thread's column tile (K rows x tile_p columns). A tile
#: in the 1 MiB range stays in this machine's L2/L3 between im2col writing it
#: and gemm reading it; see README "Design" for the measurement.
COLUMN_TILE_BYTES = 1 << 20
#: Fewer columns than this make gemm calls too thin to run at full speed.
MIN_TILE_COLUMNS = 128
#: BLAS takes 32-bit ints for every dimension and leading dimension.
BLAS_INT_MAX = 2**31 - 1


class TilePlan(NamedTuple):
    tile_p: int     # output columns per column tile
    c_block: int    # input channels per grad_x work item


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


def check_blas_limits(F: int, K: int, P: int) -> None:
    """Leading dimensions of the weight (K) and of an output plane (P) go to BLAS whole."""
    for name, value in (("out_channels F", F), ("C*KH*KW", K), ("OH*OW", P)):
        if value > BLAS_INT_MAX:
            raise ValueError(
                f"{name}={value} exceeds the 32-bit BLAS limit {BLAS_INT_MAX}; "
                "split the input into smaller planes"
            )


def plan(N: int, C: int, KK: int, P: int, itemsize: int, n_threads: int) -> TilePlan:
    """Tile plan for one convolution of N images with K = C*KK rows and P output columns."""
    K = C * KK
    budget_p = max(MIN_TILE_COLUMNS, COLUMN_TILE_BYTES // (K * itemsize))
    tiles = _splits_per_image(N, n_threads, at_least=math.ceil(P / budget_p), at_most=P)
    tile_p = min(math.ceil(P / tiles), BLAS_INT_MAX)
    # grad_x splits an image by channel blocks instead (col2im must not race).
    blocks = _splits_per_image(N, n_threads, at_least=1, at_most=C)
    c_block = math.ceil(C / blocks)
    return TilePlan(tile_p=tile_p, c_block=c_block)
