"""Padding read in place: which input pixel a padded position shows, for every padding mode.

The kernels that gather whole rows of a padded input (Winograd tiles, the
direct kernel's phase rows) take the padding as two index maps, one per axis,
instead of a padded copy of the input: ``map[p]`` is the input index under
padded position ``p``, or -1 where the padding holds a zero.
"""

from __future__ import annotations

import numpy as np

__all__ = ["source_map", "source_indices"]


def source_map(count: int, size: int, before: int, after: int, mode: str) -> np.ndarray:
    """Input index under padded positions ``0 .. count-1``, -1 for a zero.

    Position ``p`` is input index ``p - before`` before the padding mode
    (PyTorch's 'zeros', 'reflect', 'replicate', 'circular') maps it; positions
    past the declared padding (``p - before >= size + after``, which only the
    cropped part of a partial tile reads) are -1 too. Validation guarantees one
    reflection or wrap suffices (reflect padding < size, circular <= size).
    """
    return source_indices(np.arange(count, dtype=np.intp), size, before, after, mode)


def source_indices(positions: np.ndarray, size: int, before: int, after: int,
                   mode: str) -> np.ndarray:
    """:func:`source_map` at the given padded positions only (any integer array)."""
    p = np.asarray(positions, dtype=np.intp) - before
    inside = (p >= 0) & (p < size)
    if mode == "zeros":
        source = np.where(inside, p, -1)
    elif mode == "reflect":
        source = np.where(p < 0, -p, np.where(p >= size, 2 * (size - 1) - p, p))
    elif mode == "replicate":
        source = np.clip(p, 0, size - 1)
    else:  # circular
        source = np.where(p < 0, p + size, np.where(p >= size, p - size, p))
    return np.ascontiguousarray(np.where(p < size + after, source, -1), dtype=np.intp)
