"""The depthwise kernels for this CPU: the x86-64-v3 build where it runs, else the baseline.

``fastconv._depthwise`` is built for baseline x86-64 like every extension; its
loops are Cython, so they cannot take FC_TARGET's per-function clones. setup.py
builds the same source a second time with ``-march=x86-64-v3`` as
``fastconv._depthwise_avx2`` (on x86-64 only), and :data:`kernels` is that module
where the CPU runs it.
"""

from __future__ import annotations

from fastconv import _depthwise

__all__ = ["kernels", "available"]


def available() -> list:
    """The kernel modules that run here, the baseline first."""
    found = [_depthwise]
    if _depthwise.cpu_runs_x86_64_v3():
        try:
            from fastconv import _depthwise_avx2
        except ImportError:        # not built (not x86-64)
            return found
        found.append(_depthwise_avx2)
    return found


#: The module whose kernels fastconv runs.
kernels = available()[-1]
