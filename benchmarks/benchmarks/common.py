"""Shared pieces of the asv suite: guarded imports, the standard shapes, timing settings.

asv imports this folder from the *current* checkout but runs it against the
fastconv built from each commit it benchmarks, so nothing here may assume that
a feature exists. Every fastconv name is looked up at run time, and a
benchmark whose feature is missing on the commit under test raises
``NotImplementedError`` in ``setup``, which asv records as "skipped" (n/a).

The layer shapes come from ``fastconv._bench`` (the standard suite behind
``python -m fastconv bench``), so asv and the bench time the same work. The
commits before ``_bench`` existed get :data:`_FROZEN_SUITE`, a copy of the
suite as it was when this file was written.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import statistics
import time
import timeit

import numpy as np

try:
    import fastconv
except ImportError:  # the build of this commit failed; every setup skips
    fastconv = None

try:
    from fastconv import reference
except ImportError:  # the first commit had no NumPy reference
    reference = None

try:
    from threadpoolctl import threadpool_limits
except ImportError:
    threadpool_limits = None

try:
    from fastconv._bench import SUITE as _BENCH_SUITE
except ImportError:
    _BENCH_SUITE = None

try:
    from fastconv._bench import gemm_call as _bench_gemm_call
except ImportError:
    _bench_gemm_call = None

try:
    from fastconv._bench import _import_torch, _torch_call
except ImportError:
    _import_torch = _torch_call = None

try:
    from fastconv._bench import time_call as _bench_time_call
except ImportError:
    _bench_time_call = None


DTYPES = ("float32", "float64")
N_THREADS = (1, 2)
PASSES = ("forward", "backward")


@dataclasses.dataclass(frozen=True)
class _Shape:
    """Fallback for ``fastconv._bench.Shape``: the parts the benchmarks use."""

    name: str
    N: int
    C: int
    H: int
    W: int
    F: int
    KH: int
    KW: int
    stride: int
    pad: int

    @property
    def input_shape(self):
        return (self.N, self.C, self.H, self.W)

    @property
    def weight_shape(self):
        return (self.F, self.C, self.KH, self.KW)

    @property
    def output_shape(self):
        oh = (self.H + 2 * self.pad - self.KH) // self.stride + 1
        ow = (self.W + 2 * self.pad - self.KW) // self.stride + 1
        return (self.N, self.F, oh, ow)

    def with_batch(self, n):
        return dataclasses.replace(self, N=n)

    def make_inputs(self, dtype="float32", seed=0):
        # Same draws as _bench.Shape.make_inputs, so both give the same arrays.
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        weight = rng.standard_normal(self.weight_shape, dtype=dtype)
        weight *= dtype.type(1.0 / np.sqrt(self.C * self.KH * self.KW))
        return {
            "x": rng.standard_normal(self.input_shape, dtype=dtype),
            "weight": weight,
            "bias": rng.standard_normal(self.F, dtype=dtype),
            "grad_output": rng.standard_normal(self.output_shape, dtype=dtype),
        }


#: ``fastconv._bench.SUITE`` as of the commit that added asv.
_FROZEN_SUITE = (
    _Shape("lenet-mnist", 100, 1, 28, 28, 30, 5, 5, 1, 0),
    _Shape("cifar-3x3", 64, 3, 32, 32, 32, 3, 3, 1, 1),
    _Shape("resnet-stem", 8, 3, 224, 224, 64, 7, 7, 2, 3),
    _Shape("resnet-1x1", 8, 256, 56, 56, 64, 1, 1, 1, 0),
    _Shape("resnet-3x3", 8, 64, 56, 56, 64, 3, 3, 1, 1),
    _Shape("resnet-3x3-s2", 8, 128, 56, 56, 128, 3, 3, 2, 1),
    _Shape("vgg-mid", 8, 128, 56, 56, 128, 3, 3, 1, 1),
    _Shape("deep-7x7", 32, 512, 7, 7, 512, 3, 3, 1, 1),
)

#: Parameter values must not depend on the commit (asv keys results by them),
#: so the names are fixed here; :func:`get_shape` resolves them per commit.
SHAPE_NAMES = tuple(s.name for s in _FROZEN_SUITE)

#: Shapes whose forward + backward take over ~0.2 s per call in float64 at one
#: thread here (vgg-mid backward: ~0.35 s). They are timed in float32 only,
#: which keeps a full run per commit under ~10 minutes; float64 is still timed
#: on the other six shapes, resnet-stem and resnet-3x3-s2 included.
HEAVY_SHAPES = ("vgg-mid", "deep-7x7")


def get_shape(name: str, batch: int | None = None):
    """The suite shape ``name`` on this commit (optionally re-batched).

    Raises ``NotImplementedError`` (asv: skip) when the commit's suite lacks it.
    """
    suite = _BENCH_SUITE if _BENCH_SUITE is not None else _FROZEN_SUITE
    for shape in suite:
        if shape.name == name:
            return shape if batch is None else shape.with_batch(batch)
    raise NotImplementedError(f"shape {name!r} is not in this commit's suite")


_FASTCONV = object()


def require(*names: str, module=_FASTCONV):
    """Return ``module`` (default fastconv) after checking it has ``names``, or skip.

    Raises ``NotImplementedError`` when the module did not import (None) or a
    name is missing on the commit under test.
    """
    module = fastconv if module is _FASTCONV else module
    if module is None:
        raise NotImplementedError("module did not import on this commit")
    for name in names:
        if not hasattr(module, name):
            raise NotImplementedError(f"{module.__name__}.{name} is missing on this commit")
    return module


def require_functions(*names: str):
    """The fastconv functions ``names`` as a tuple, or skip when one is missing."""
    module = require(*names)
    return tuple(getattr(module, name) for name in names)


def require_params(func, *params: str) -> None:
    """Skip unless ``func`` accepts every keyword in ``params`` (e.g. ``groups``, ``layout``)."""
    try:
        accepted = inspect.signature(func).parameters
    except (TypeError, ValueError):
        raise NotImplementedError(f"cannot inspect {func!r}")
    missing = [p for p in params if p not in accepted]
    if missing:
        raise NotImplementedError(f"{func.__name__} has no {', '.join(missing)} argument")


def blas_threads(n: int):
    """Context manager holding BLAS at ``n`` threads (a no-op without threadpoolctl)."""
    if threadpool_limits is None:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def conv_call(module, pass_: str, shape, arrays: dict, **kwargs):
    """A no-argument forward or backward call of ``module`` (fastconv or its reference)."""
    x, w, b, g = arrays["x"], arrays["weight"], arrays["bias"], arrays["grad_output"]
    s, p = shape.stride, shape.pad
    if pass_ == "forward":
        return lambda: module.conv2d(x, w, b, s, p, **kwargs)
    return lambda: module.conv2d_backward(g, x, w, s, p, **kwargs)


def median_ms(fn, repeat: int = 3) -> float:
    """Median wall time of ``fn()`` in ms after one warm-up (``_bench.time_call`` when present).

    Used by the ``track_*`` ratios, which time two implementations in one
    process; ``time_call`` also pauses first so the previous measurement's
    spinning BLAS/OpenMP threads go idle.
    """
    if _bench_time_call is not None:
        return _bench_time_call(fn, repeat)[0]
    time.sleep(0.25)
    fn()
    times = []
    for _ in range(repeat):
        start = timeit.default_timer()
        fn()
        times.append(timeit.default_timer() - start)
    return statistics.median(times) * 1e3


def gemm_call(shape, dtype="float32"):
    """``_bench.gemm_call`` (the forward's bare ?gemm), or skip on commits without it."""
    if _bench_gemm_call is None:
        raise NotImplementedError("fastconv._bench.gemm_call is missing")
    return _bench_gemm_call(shape, dtype)


def torch_call(pass_: str, shape, arrays: dict):
    """``_bench._torch_call`` when torch imports, else skip."""
    torch = _import_torch() if _import_torch is not None else None
    if torch is None:
        raise NotImplementedError("torch is not importable (or _bench lacks the helper)")
    return torch, _torch_call(torch, pass_, shape, arrays)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Benchmark:
    """Timing settings shared by every benchmark class.

    Wall-clock timer (asv's default, made explicit). Each sample lasts at
    least 20 ms (``number`` is picked to get there), and a benchmark stops
    after 1.5 s of samples or 7 samples per round, whichever comes first, with
    at least 2; asv runs two rounds in separate processes. ``setup`` makes one
    untimed call, so cached workspaces and first-touch page faults are never
    timed, and a short warm-up covers the rest.
    """

    timer = timeit.default_timer
    sample_time = 0.02
    repeat = (2, 7, 1.5)
    warmup_time = 0.05
    timeout = 180
