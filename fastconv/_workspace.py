"""Reusable scratch buffers for the kernels.

Fresh pages cost about 2 us per 4 KiB on first touch, a visible share of a
small layer, so the per-thread column tiles and grad_weight partial sums are
kept between calls. Buffers are per Python thread (``threading.local``), so
concurrent callers never share scratch memory, and their size is bounded by
the tile budget and ``n_threads`` (``fastconv._tiling``), not by the batch size.
"""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def workspace(slot: str, dtype: np.dtype, size: int) -> np.ndarray:
    """A 1-D scratch array of ``size`` elements of ``dtype``, reused across calls.

    Contents are undefined; the kernels overwrite what they read.
    """
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (slot, np.dtype(dtype))
    buffer = buffers.get(key)
    if buffer is None or buffer.size < size:
        buffer = np.empty(max(size, 1), dtype=dtype)
        buffers[key] = buffer
    return buffer[:max(size, 1)]


def clear_workspaces() -> None:
    """Release this thread's cached scratch buffers."""
    _local.__dict__.pop("buffers", None)
