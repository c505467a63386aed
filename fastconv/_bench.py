"""The standard benchmark suite behind ``python -m fastconv bench``.

Times :func:`fastconv.conv2d` and :func:`fastconv.conv2d_backward` on a fixed
set of layer shapes against the pure-NumPy reference, the bare BLAS gemm the
forward pass is built on, and (when it is installed) PyTorch, and prints a
GitHub-markdown table. ``--memory`` instead measures the extra peak memory of
one forward + backward pass.

A second table times max and avg pooling (:data:`POOL_SUITE`, forward,
backward and their sum) against the reference's im2col pooling.

Everything is data-driven: a row of the suite is a :class:`Shape` in
:data:`SUITE` (a :class:`PoolShape` in :data:`POOL_SUITE`), a column of the
table is an entry of :data:`SUITE_COLUMNS`, so adding either is a one-line change.
:func:`run_suite`, :func:`run_pool_suite` and :func:`format_table` are public to this
module so that the tests and asv benchmarks reuse them.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from fastconv import _bench_onnx
from fastconv._validation import conv_output_size, transposed_output_size

#: The two passes every shape is timed for, in table order.
PASSES = ("forward", "backward")

#: Default repeats per measurement (the median is reported), and with ``--quick``.
DEFAULT_REPEAT = 7
QUICK_REPEAT = 3

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Shape:
    """One convolution layer of the suite: square stride and symmetric padding.

    Parameters
    ----------
    name : str
        Row label, also what ``--only`` selects.
    N, C, H, W : int
        Input batch, channels, height and width.
    F, KH, KW : int
        Number of filters (output channels) and kernel height and width.
    stride, pad : int
        Stride and zero padding, the same along both axes and on all sides.
    groups : int, default 1
        ``groups == C``: a depthwise layer (timed with the direct kernel and,
        in the "grouped im2col" column, with ``algorithm="im2col"``).
    transposed : bool, default False
        A :func:`fastconv.conv_transpose2d` layer from C to F channels
        (weight ``(C, F/groups, KH, KW)``).
    """

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
    groups: int = 1
    transposed: bool = False

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """``(N, C, H, W)``."""
        return (self.N, self.C, self.H, self.W)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """``(F, C/groups, KH, KW)``, or ``(C, F/groups, KH, KW)`` when transposed."""
        if self.transposed:
            return (self.C, self.F // self.groups, self.KH, self.KW)
        return (self.F, self.C // self.groups, self.KH, self.KW)

    @property
    def output_hw(self) -> tuple[int, int]:
        """``(OH, OW)``: ``(H + 2*pad - KH) // stride + 1``, or for a transposed layer
        ``(H - 1)*stride - 2*pad + KH``."""
        if self.transposed:
            return (transposed_output_size(self.H, self.KH, self.stride, self.pad, self.pad),
                    transposed_output_size(self.W, self.KW, self.stride, self.pad, self.pad))
        return (conv_output_size(self.H, self.KH, self.stride, self.pad, self.pad),
                conv_output_size(self.W, self.KW, self.stride, self.pad, self.pad))

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """``(N, F, OH, OW)``."""
        return (self.N, self.F) + self.output_hw

    @property
    def is_plain(self) -> bool:
        """An ungrouped convolution: one GEMM per image, NHWC available."""
        return self.groups == 1 and not self.transposed

    @property
    def gemm_mnk(self) -> tuple[int, int, int]:
        """``(M, K, N)`` of the forward pass as one GEMM: ``W (F x C*KH*KW) @ col``.

        The whole batch is one GEMM with ``N = batch*OH*OW`` columns: the
        bound no im2col scheme can beat, whatever its per-image tiling. A
        transposed layer's forward is ``W.T (F*KH*KW x C) @ x`` (then col2im).
        Only meaningful for ungrouped layers.
        """
        if self.transposed:
            return (self.F * self.KH * self.KW, self.C, self.N * self.H * self.W)
        oh, ow = self.output_hw
        return (self.F, self.C * self.KH * self.KW, self.N * oh * ow)

    def forward_flops(self) -> int:
        """``2*N*F*OH*OW*C/groups*KH*KW``: one multiply and one add per weight tap."""
        m, k, n = self.gemm_mnk
        return 2 * m * k * n // self.groups

    def backward_flops(self) -> int:
        """Twice the forward: one GEMM of the same size each for dx and dW.

        The bias gradient (a sum over ``N*OH*OW``) is negligible and not counted.
        """
        return 2 * self.forward_flops()

    def flops(self, pass_: str) -> int:
        """:meth:`forward_flops` or :meth:`backward_flops` by pass name."""
        return self.forward_flops() if pass_ == "forward" else self.backward_flops()

    def with_batch(self, n: int) -> "Shape":
        """The same layer with batch size ``n``."""
        return dataclasses.replace(self, N=n)

    def make_inputs(self, dtype="float32", seed: int = 0) -> dict[str, np.ndarray]:
        """Random ``x``, ``weight``, ``bias`` and ``grad_output`` of ``dtype``.

        The weight is scaled by ``1/sqrt(C*KH*KW)`` so outputs stay O(1): no
        overflow in float32 and no denormals to slow anyone down.
        """
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        k = math.prod(self.weight_shape[1:])
        weight = rng.standard_normal(self.weight_shape, dtype=dtype)
        weight *= dtype.type(1.0 / np.sqrt(k))
        return {
            "x": rng.standard_normal(self.input_shape, dtype=dtype),
            "weight": weight,
            "bias": rng.standard_normal(self.F, dtype=dtype),
            "grad_output": rng.standard_normal(self.output_shape, dtype=dtype),
        }


#: The standard suite, in table order.
SUITE = (
    Shape("lenet-mnist", 100, 1, 28, 28, 30, 5, 5, 1, 0),
    Shape("cifar-3x3", 64, 3, 32, 32, 32, 3, 3, 1, 1),
    Shape("resnet-stem", 8, 3, 224, 224, 64, 7, 7, 2, 3),
    Shape("resnet-1x1", 8, 256, 56, 56, 64, 1, 1, 1, 0),
    Shape("resnet-3x3", 8, 64, 56, 56, 64, 3, 3, 1, 1),
    Shape("resnet-3x3-s2", 8, 128, 56, 56, 128, 3, 3, 2, 1),
    Shape("vgg-mid", 8, 128, 56, 56, 128, 3, 3, 1, 1),
    Shape("deep-7x7", 32, 512, 7, 7, 512, 3, 3, 1, 1),
    Shape("mobilenet-dw", 8, 256, 56, 56, 256, 3, 3, 1, 1, groups=256),
    Shape("dcgan-up", 16, 256, 16, 16, 128, 4, 4, 2, 1, transposed=True),
)

#: Shape measured by ``--memory`` when no name is given.
DEFAULT_MEMORY_SHAPE = "vgg-mid"


@dataclasses.dataclass(frozen=True)
class PoolShape:
    """One pooling layer of :data:`POOL_SUITE`: square kernel, stride and padding.

    Parameters
    ----------
    name : str
        Row label, also what ``--only`` selects.
    op : {"max", "avg"}
        :func:`fastconv.max_pool2d` (timed with ``return_indices=True`` and
        a backward that uses them, as :class:`fastconv.MaxPool2D` runs) or
        :func:`fastconv.avg_pool2d`.
    N, C, H, W : int
        Input batch, channels, height and width.
    kernel, stride, pad : int
    """

    name: str
    op: str
    N: int
    C: int
    H: int
    W: int
    kernel: int
    stride: int
    pad: int

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """``(N, C, OH, OW)`` with ``OH = (H + 2*pad - kernel) // stride + 1``."""
        oh = (self.H + 2 * self.pad - self.kernel) // self.stride + 1
        ow = (self.W + 2 * self.pad - self.kernel) // self.stride + 1
        return (self.N, self.C, oh, ow)

    def with_batch(self, n: int) -> "PoolShape":
        return dataclasses.replace(self, N=n)

    def make_inputs(self, dtype="float32", seed: int = 0) -> dict[str, np.ndarray]:
        """Random ``x`` and ``grad_output`` of ``dtype`` (continuous: no ties)."""
        rng = np.random.default_rng(seed)
        return {"x": rng.standard_normal(self.input_shape, dtype=np.dtype(dtype)),
                "grad_output": rng.standard_normal(self.output_shape, dtype=np.dtype(dtype))}


#: The pooling rows of ``python -m fastconv bench`` (a second table), in order.
POOL_SUITE = (
    PoolShape("maxpool-2x2-s2", "max", 8, 64, 112, 112, 2, 2, 0),
    PoolShape("maxpool-3x3-s2-p1", "max", 8, 64, 112, 112, 3, 2, 1),
    PoolShape("avgpool-2x2-s2", "avg", 8, 64, 112, 112, 2, 2, 0),
)

#: Passes of a pooling row: each timed alone, then their sum.
POOL_PASSES = ("forward", "backward", "fwd+bwd")

#: ``(row key, header)`` of the timing table; ``{gemm}`` becomes sgemm or dgemm.
#: A column is printed only when some row has a value for it, so optional
#: measurements (reference, gemm, torch) need no special cases.
SUITE_COLUMNS = (
    ("shape", "shape"),
    ("pass", "pass"),
    ("algorithm", "algorithm"),
    ("fastconv_ms", "fastconv ms"),
    ("reference_ms", "reference ms"),
    ("speedup", "speedup"),
    ("gflops", "GFLOP/s"),
    ("gemm_ms", "{gemm} ms"),
    ("vs_gemm", "vs {gemm}"),
    ("nhwc_ms", "NHWC ms"),
    ("nhwc_vs_nchw", "NHWC/NCHW"),
    ("im2col_ms", "grouped im2col ms"),
    ("vs_im2col", "vs im2col"),
    ("torch_ms", "torch ms"),
    ("vs_torch", "vs torch"),
    ("ort_ms", "ORT ms"),
    ("vs_ort", "vs ORT"),
)

#: ``(row key, header)`` of the ``--scaling`` table.
SCALING_COLUMNS = (
    ("shape", "shape"),
    ("N", "N"),
    ("pass", "pass"),
    ("one_thread_ms", "1 thread ms"),
    ("threads_ms", "{threads} threads ms"),
    ("scaling", "speedup"),
)

#: ``(row key, header)`` of the ``--memory`` table.
MEMORY_COLUMNS = (
    ("shape", "shape"),
    ("N", "N"),
    ("arrays_mib", "arrays MiB"),
    ("fastconv_extra_mib", "fastconv extra MiB"),
    ("reference_extra_mib", "reference extra MiB"),
)


# --------------------------------------------------------------------------
# measuring


#: Pause before each measurement so the previous one's spinning threads go idle.
SETTLE_SECONDS = 0.25

#: glibc's malloc serves blocks above its mmap threshold (128 KiB at start) with fresh
#: mmap'd pages, a page fault per 4 KiB on first touch, and raises the threshold (to at
#: most 32 MiB) the first time such a block is freed. A peer that allocates its buffers
#: per call therefore ran several times faster once anything in the process had freed a
#: large block (torch's cifar-3x3 forward 10.4 ms -> 1.19 ms, resnet-stem 34.6 -> 11.3 ms,
#: after one malloc/free of 32 MiB; an ONNX Runtime session does that), so its timings
#: depended on what ran before them. The suites fix the threshold up front at that
#: raised value (fixing it also stops glibc moving it), with the trim threshold at twice
#: it, as glibc's own raise sets it.
MALLOC_MMAP_THRESHOLD = 32 << 20


def pin_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds (see MALLOC_MMAP_THRESHOLD); False where the
    C library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3       # glibc's <malloc.h>
    return (mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD) == 1
            and mallopt(m_trim_threshold, 2 * MALLOC_MMAP_THRESHOLD) == 1)


def usable_cpus() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def time_call(fn: Callable[[], object], repeat: int,
              warmup: float = 0.0) -> tuple[float, object]:
    """Median wall time of ``fn()`` in milliseconds over ``repeat`` runs.

    One untimed warm-up run comes first, so cached workspaces, page faults and
    BLAS thread start-up stay out of the numbers. Before it, a pause lets the
    previous measurement's thread pools go idle: OpenBLAS workers spin for
    ~0.1 s after a multi-threaded call and halved the speed of an OpenMP
    region started right after (measured on resnet-3x3: 32 ms vs 16 ms).
    Returns the median and the warm-up's result (for a correctness check that
    costs no extra run). ``warmup``: seconds of untimed calls after the warm-up
    run, so the timed ones see a steady state rather than the first calls after
    the pause (on the 2-core VM fastconv's first ~0.3 s of 2-thread work after an
    idle pause ran slower: README "Threads").
    """
    time.sleep(SETTLE_SECONDS)
    result = fn()
    deadline = time.perf_counter() + warmup
    while time.perf_counter() < deadline:
        fn()
    times = []
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, result


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def relative_error(result, expected) -> float:
    """Largest ``max|a - b| / max|b|`` over the arrays of two results."""
    worst = 0.0
    for a, b in zip(_as_tuple(result), _as_tuple(expected)):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        scale = max(float(np.max(np.abs(b), initial=0.0)), np.finfo(np.float64).tiny)
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / scale)
    return worst


def _conv_call(module, pass_: str, shape: Shape, arrays: dict, **kwargs) -> Callable[[], object]:
    """A no-argument call of ``module.conv2d`` or ``module.conv2d_backward``
    (``conv_transpose2d[_backward]`` for a transposed shape).

    ``module`` is :mod:`fastconv` or :mod:`fastconv.reference`: both share the
    positional signature, only fastconv takes ``n_threads``, ``layout`` and
    ``algorithm``. With ``layout="NHWC"``, ``arrays`` must hold NHWC ``x`` and
    ``grad_output`` (see :func:`nhwc_arrays`).
    """
    x, w, b, g = arrays["x"], arrays["weight"], arrays["bias"], arrays["grad_output"]
    s, p = shape.stride, shape.pad
    if shape.transposed:
        if pass_ == "forward":
            return lambda: module.conv_transpose2d(x, w, b, s, p, groups=shape.groups, **kwargs)
        return lambda: module.conv_transpose2d_backward(g, x, w, s, p, groups=shape.groups,
                                                        **kwargs)
    if shape.groups != 1:
        kwargs["groups"] = shape.groups
    if pass_ == "forward":
        return lambda: module.conv2d(x, w, b, s, p, **kwargs)
    return lambda: module.conv2d_backward(g, x, w, s, p, **kwargs)


def auto_algorithm(shape: Shape, pass_: str) -> str:
    """What ``algorithm="auto"`` runs for this row; for the backward, grad_x's family,
    then grad_weight's after a slash where they differ (``im2col/direct``), or ``phases``
    for a strided layer's backward by stride phases with the 2x2 ones by Winograd
    (``fastconv._stride_phases.backward``)."""
    if shape.transposed:
        from fastconv._transposed import _transposed_algorithm
        from fastconv._validation import transposed_geometry

        geometry = transposed_geometry(shape.input_shape, shape.weight_shape, shape.stride,
                                       shape.pad, 0, shape.groups, 1)
        return _transposed_algorithm("auto", geometry, backward=pass_ == "backward")
    from fastconv import _stride_phases
    from fastconv._functional import _choose_algorithm, _weight_grad_algorithm
    from fastconv._validation import conv_geometry

    geometry = conv_geometry(shape.input_shape, shape.weight_shape, shape.stride, shape.pad, 1,
                             shape.groups)
    if pass_ == "backward" and _stride_phases.winograd_pays_off(geometry):
        return "phases"
    algorithm = _choose_algorithm("auto", geometry, "NCHW", backward=pass_ == "backward")
    if pass_ == "forward" or (algorithm == "direct" and shape.groups > 1):
        return algorithm                                # (depthwise: both by its kernels)
    weight_algorithm = _weight_grad_algorithm("auto", algorithm, geometry)
    return algorithm if weight_algorithm == algorithm else f"{algorithm}/{weight_algorithm}"


def nhwc_arrays(arrays: dict) -> dict:
    """``arrays`` with ``x`` and ``grad_output`` as channels-last copies (made untimed)."""
    out = dict(arrays)
    for key in ("x", "grad_output"):
        out[key] = np.ascontiguousarray(arrays[key].transpose(0, 2, 3, 1))
    return out


def gemm_call(shape: Shape, dtype="float32", seed: int = 0) -> Callable[[], object]:
    """A no-argument call of BLAS ``?gemm`` of the forward pass's size.

    ``A`` (F x K) and ``B`` (K x batch*OH*OW) are Fortran-ordered: scipy's
    f2py wrapper hands those to BLAS as they are, while C-ordered operands
    would be copied on every call and the copy timed with the product.
    """
    from scipy.linalg.blas import get_blas_funcs

    rng = np.random.default_rng(seed)
    m, k, n = shape.gemm_mnk
    a = np.asfortranarray(rng.standard_normal((m, k), dtype=dtype))
    b = np.asfortranarray(rng.standard_normal((k, n), dtype=dtype))
    gemm = get_blas_funcs("gemm", (a, b))
    return lambda: gemm(1.0, a, b)


def _import_torch():
    """:mod:`torch` if it imports, else None: torch is never a dependency."""
    try:
        import torch
    except Exception:  # ImportError, or a broken install failing in its own way
        return None
    return torch


def _torch_call(torch, pass_: str, shape: Shape, arrays: dict) -> Callable[[], object]:
    """A no-argument call of torch's conv2d forward, or of its backward alone.

    The backward runs the graph of one precomputed forward with
    ``grad_outputs=g`` (the gradient of ``(y * g).sum()``) and
    ``retain_graph=True``, so the timing holds the backward and nothing else,
    like fastconv's.
    """
    functional = torch.nn.functional
    x, w, b, g = (torch.from_numpy(arrays[k]) for k in ("x", "weight", "bias", "grad_output"))
    s, p = shape.stride, shape.pad
    if shape.transposed:
        def conv2d(x, w, b, s, p):
            return functional.conv_transpose2d(x, w, b, s, p, groups=shape.groups)
    else:
        def conv2d(x, w, b, s, p):
            return functional.conv2d(x, w, b, s, p, groups=shape.groups)
    if pass_ == "forward":
        def forward():
            with torch.no_grad():
                return conv2d(x, w, b, s, p)
        return forward
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = conv2d(x, w, b, s, p)
    return lambda: torch.autograd.grad(y, (x, w, b), grad_outputs=g, retain_graph=True)


def _suite_setup(threads, dtype, repeat, reference_repeat, reference, torch):
    """The arguments shared by :func:`run_suite` and :func:`run_pool_suite`, resolved:
    thread count, dtype, reference repeats, and the reference and torch modules (or None);
    glibc's malloc thresholds are fixed here (:func:`pin_malloc_thresholds`)."""
    threads = usable_cpus() if threads is None else int(threads)
    reference_repeat = repeat if reference_repeat is None else reference_repeat
    ref_module = None
    if reference:
        from fastconv import reference as ref_module
    torch_module = _import_torch() if torch is None or torch else None
    if torch and torch_module is None:
        raise RuntimeError("torch=True but `import torch` failed")
    pin_malloc_thresholds()         # before anything is timed, peers included
    return threads, np.dtype(dtype), reference_repeat, ref_module, torch_module


def run_suite(
    shapes: Iterable[Shape] = SUITE,
    threads: Optional[int] = None,
    dtype="float32",
    repeat: int = DEFAULT_REPEAT,
    *,
    reference: bool = True,
    reference_repeat: Optional[int] = None,
    gemm: bool = True,
    torch: Optional[bool] = None,
    onnxruntime: Optional[bool] = False,
    progress: Optional[Callable[[str], None]] = None,
    warmup: float = 0.0,
) -> list[dict]:
    """Time every shape x pass and return one dict per table row.

    Parameters
    ----------
    shapes : iterable of Shape
        Rows to time, in order (default: the whole :data:`SUITE`).
    threads : int, optional
        Thread count for everything: fastconv's ``n_threads``, the BLAS behind
        the reference and the gemm (via ``threadpoolctl``) and torch. Default:
        :func:`usable_cpus`.
    dtype : {"float32", "float64"}
    repeat : int
        Timed runs per measurement after one warm-up; the median is reported.
    reference : bool
        Time :mod:`fastconv.reference` too.
    reference_repeat : int, optional
        Timed runs of the slow reference (default: ``repeat``).
    gemm : bool
        Time the bare forward GEMM (forward rows only).
    torch : bool, optional
        Time PyTorch; None means "if it imports".
    onnxruntime : bool, optional
        Time ONNX Runtime's forward (:mod:`fastconv._bench_onnx`); None means
        "if onnx and onnxruntime import". Default False: building its sessions
        takes time and only ``--compare`` asks for it.
    progress : callable, optional
        Called with one line of text per row (``main`` sends them to stderr).
    warmup : float
        Seconds of untimed calls before each measurement's timed runs, every
        implementation alike (:func:`time_call`).

    Returns
    -------
    list of dict
        Keys: ``shape``, ``pass``, ``dtype``, ``threads``, ``flops`` and the
        keys of :data:`SUITE_COLUMNS`; times in milliseconds; a measurement
        that was not made is None. ``rel_err`` is fastconv's largest relative
        deviation from the reference (None without the reference), and
        ``ort_rel_err`` ONNX Runtime's from fastconv (None without ORT).
    """
    import fastconv
    from threadpoolctl import threadpool_limits

    threads, dtype, reference_repeat, ref_module, torch_module = _suite_setup(
        threads, dtype, repeat, reference_repeat, reference, torch)
    ort_modules = _bench_onnx.import_onnxruntime() if onnxruntime is None or onnxruntime else None
    if onnxruntime and ort_modules is None:
        raise RuntimeError("onnxruntime=True but `import onnx, onnxruntime` failed")

    rows = []
    for shape in shapes:
        arrays = shape.make_inputs(dtype)
        # One BLAS limit around everything, so the reference, the gemm and any
        # BLAS call fastconv makes outside its own OpenMP regions all get the
        # same thread count as fastconv's n_threads.
        with threadpool_limits(limits=threads, user_api="blas"):
            for pass_ in PASSES:
                row = _time_row(shape, pass_, arrays, fastconv, ref_module, torch_module,
                                threads, dtype, repeat, reference_repeat, gemm, ort_modules,
                                warmup)
                rows.append(row)
                if progress is not None:
                    progress(_progress_line(row))
    return rows


def _time_row(shape, pass_, arrays, fastconv, ref_module, torch_module,
              threads, dtype, repeat, reference_repeat, gemm, ort_modules=None,
              warmup: float = 0.0) -> dict:
    """Measure one table row (see :func:`run_suite` for the keys)."""
    flops = shape.flops(pass_)
    fast_ms, fast_result = time_call(
        _conv_call(fastconv, pass_, shape, arrays, n_threads=threads), repeat, warmup)
    row = {
        "shape": shape.name, "pass": pass_, "dtype": dtype.name, "threads": threads,
        "algorithm": auto_algorithm(shape, pass_), "flops": flops, "fastconv_ms": fast_ms, "gflops": flops / (fast_ms * 1e-3) / 1e9,
        "reference_ms": None, "speedup": None, "rel_err": None,
        "gemm_ms": None, "vs_gemm": None, "torch_ms": None, "vs_torch": None,
        "nhwc_ms": None, "nhwc_vs_nchw": None, "im2col_ms": None, "vs_im2col": None,
        "ort_ms": None, "vs_ort": None, "ort_rel_err": None,
    }
    if ref_module is not None:
        ref_ms, ref_result = time_call(
            _conv_call(ref_module, pass_, shape, arrays), reference_repeat, warmup)
        row["reference_ms"] = ref_ms
        row["speedup"] = ref_ms / fast_ms
        row["rel_err"] = relative_error(fast_result, ref_result)
        del ref_result
    if ort_modules is not None and pass_ == "forward":
        ort_call = _bench_onnx.forward_call(ort_modules, shape, arrays, threads)
        row["ort_ms"], ort_result = time_call(ort_call, repeat, warmup)
        row["vs_ort"] = row["ort_ms"] / fast_ms
        row["ort_rel_err"] = relative_error(ort_result, fast_result)
        del ort_result
    del fast_result
    if shape.is_plain:
        row["nhwc_ms"], _ = time_call(
            _conv_call(fastconv, pass_, shape, nhwc_arrays(arrays), n_threads=threads,
                       layout="NHWC"), repeat, warmup)
        row["nhwc_vs_nchw"] = row["nhwc_ms"] / fast_ms
    if shape.groups == shape.C > 1 and not shape.transposed:
        row["im2col_ms"], _ = time_call(
            _conv_call(fastconv, pass_, shape, arrays, n_threads=threads, algorithm="im2col"),
            repeat, warmup)
        row["vs_im2col"] = row["im2col_ms"] / fast_ms
    if gemm and pass_ == "forward" and shape.groups == 1:
        row["gemm_ms"], _ = time_call(gemm_call(shape, dtype), repeat, warmup)
        row["vs_gemm"] = fast_ms / row["gemm_ms"]
    if torch_module is not None:
        saved = torch_module.get_num_threads()
        torch_module.set_num_threads(threads)
        try:
            row["torch_ms"], _ = time_call(_torch_call(torch_module, pass_, shape, arrays),
                                           repeat, warmup)
        finally:
            torch_module.set_num_threads(saved)
        row["vs_torch"] = row["torch_ms"] / fast_ms
    return row


def _pool_calls(module, shape: PoolShape, arrays: dict, **kwargs):
    """``(forward, backward)`` no-argument calls of ``module``'s pooling functions.

    ``module`` is :mod:`fastconv` or :mod:`fastconv.reference` (same
    signatures; only fastconv takes ``n_threads``). Max pooling's backward
    uses the indices of one forward made here, as a layer's backward does.
    """
    x, g = arrays["x"], arrays["grad_output"]
    k, s, p = shape.kernel, shape.stride, shape.pad
    if shape.op == "max":
        _, indices = module.max_pool2d(x, k, s, p, return_indices=True, **kwargs)
        return (lambda: module.max_pool2d(x, k, s, p, return_indices=True, **kwargs),
                lambda: module.max_pool2d_backward(g, x, k, s, p, indices=indices, **kwargs))
    return (lambda: module.avg_pool2d(x, k, s, p, **kwargs),
            lambda: module.avg_pool2d_backward(g, x, k, s, p, **kwargs))


def _torch_pool_calls(torch, shape: PoolShape, arrays: dict):
    """torch's forward (no grad) and its backward alone, like :func:`_torch_call`."""
    F = torch.nn.functional
    k, s, p = shape.kernel, shape.stride, shape.pad
    x = torch.from_numpy(arrays["x"])
    g = torch.from_numpy(arrays["grad_output"])

    def pool(t):
        if shape.op == "max":
            return F.max_pool2d(t, k, s, p, return_indices=True)[0]
        return F.avg_pool2d(t, k, s, p)

    def forward():
        with torch.no_grad():
            return pool(x)

    xg = x.clone().requires_grad_()
    y = pool(xg)
    return forward, lambda: torch.autograd.grad(y, (xg,), grad_outputs=g, retain_graph=True)


def run_pool_suite(
    shapes: Iterable[PoolShape] = POOL_SUITE,
    threads: Optional[int] = None,
    dtype="float32",
    repeat: int = DEFAULT_REPEAT,
    *,
    reference: bool = True,
    reference_repeat: Optional[int] = None,
    torch: Optional[bool] = None,
    progress: Optional[Callable[[str], None]] = None,
    warmup: float = 0.0,
) -> list[dict]:
    """Time fastconv's pooling against the NumPy reference: one dict per shape x pass.

    Parameters are those of :func:`run_suite` (there is no gemm here). Rows
    have the keys of :data:`SUITE_COLUMNS` (the GEMM and FLOP ones None, so
    :func:`format_table` leaves them out) plus ``rel_err``; the ``fwd+bwd``
    row holds the sums of the forward and backward medians.
    """
    import fastconv
    from threadpoolctl import threadpool_limits

    threads, dtype, reference_repeat, ref_module, torch_module = _suite_setup(
        threads, dtype, repeat, reference_repeat, reference, torch)

    rows = []
    for shape in shapes:
        arrays = shape.make_inputs(dtype)
        with threadpool_limits(limits=threads, user_api="blas"):
            timed = {}
            for impl, module, kwargs, n in (("fastconv", fastconv, {"n_threads": threads}, repeat),
                                            ("reference", ref_module, {}, reference_repeat)):
                if module is None:
                    continue
                calls = _pool_calls(module, shape, arrays, **kwargs)
                timed[impl] = [time_call(call, n, warmup) for call in calls]
            if torch_module is not None:
                saved = torch_module.get_num_threads()
                torch_module.set_num_threads(threads)
                try:
                    timed["torch"] = [time_call(call, repeat, warmup)
                                      for call in _torch_pool_calls(torch_module, shape, arrays)]
                finally:
                    torch_module.set_num_threads(saved)
        for i, pass_ in enumerate(POOL_PASSES):
            def ms(impl):
                if impl not in timed:
                    return None
                if i < 2:
                    return timed[impl][i][0]
                return timed[impl][0][0] + timed[impl][1][0]

            fast_ms, ref_ms, torch_ms = ms("fastconv"), ms("reference"), ms("torch")
            row = {
                "shape": shape.name, "pass": pass_, "dtype": dtype.name, "threads": threads,
                "flops": None, "fastconv_ms": fast_ms, "gflops": None,
                "reference_ms": ref_ms, "speedup": None if ref_ms is None else ref_ms / fast_ms,
                "rel_err": None, "gemm_ms": None, "vs_gemm": None,
                "torch_ms": torch_ms, "vs_torch": None if torch_ms is None else torch_ms / fast_ms,
            }
            if ref_ms is not None and i < 2:
                row["rel_err"] = relative_error(timed["fastconv"][i][1], timed["reference"][i][1])
            rows.append(row)
            if progress is not None:
                progress(_progress_line(row))
    return rows


def _progress_line(row: dict) -> str:
    parts = [f"{row['shape']} {row['pass']}: fastconv {_format_value(row['fastconv_ms'])} ms"]
    for key, label in (("reference_ms", "reference"), ("gemm_ms", "gemm"), ("torch_ms", "torch"),
                       ("ort_ms", "ORT")):
        if row.get(key) is not None:
            parts.append(f"{label} {_format_value(row[key])} ms")
    if row["rel_err"] is not None:
        parts.append(f"rel err vs reference {row['rel_err']:.1e}")
    if row.get("ort_rel_err") is not None:
        parts.append(f"ORT rel err vs fastconv {row['ort_rel_err']:.1e}")
    return ", ".join(parts)


# --------------------------------------------------------------------------
# memory


def _memory_child() -> None:
    """Subprocess body of :func:`measure_memory`: print one JSON result.

    Reads a JSON spec from ``sys.argv[1]``. The inputs are made before
    tracing starts, so the traced peak is what one forward + backward
    allocates, cached workspaces of a first call included.
    """
    import tracemalloc

    from threadpoolctl import threadpool_limits

    spec = json.loads(sys.argv[1])
    shape = Shape(**spec["shape"])
    arrays = shape.make_inputs(spec["dtype"])
    if spec["impl"] == "fastconv":
        import fastconv as module
        kwargs = {"n_threads": spec["threads"]}
    else:
        from fastconv import reference as module
        kwargs = {}
    forward = _conv_call(module, "forward", shape, arrays, **kwargs)
    backward = _conv_call(module, "backward", shape, arrays, **kwargs)
    with threadpool_limits(limits=spec["threads"], user_api="blas"):
        tracemalloc.start()
        results = (forward(),) + _as_tuple(backward())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    returned = sum(np.asarray(r).nbytes for r in results if r is not None)
    print(json.dumps({"peak": peak, "returned": returned}))


def _memory_in_subprocess(shape: Shape, impl: str, threads: int, dtype) -> dict:
    """Run :func:`_memory_child` in a fresh interpreter (nothing cached yet)."""
    spec = {"shape": dataclasses.asdict(shape), "impl": impl, "threads": threads,
            "dtype": np.dtype(dtype).name}
    import fastconv

    # The child must import the same fastconv as this process, wherever that
    # came from (an installed build, a source checkout on PYTHONPATH).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastconv.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, env.get("PYTHONPATH")) if p)
    code = "from fastconv._bench import _memory_child; _memory_child()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {impl} on {shape} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(
    shape: Shape,
    threads: Optional[int] = None,
    dtype="float32",
    batches: Optional[Sequence[int]] = None,
    *,
    reference: bool = True,
    progress: Optional[Callable[[str], None]] = None,
) -> list[dict]:
    """Extra peak memory of one ``conv2d`` + ``conv2d_backward``, first call.

    Parameters
    ----------
    shape : Shape
    threads : int, optional
        As in :func:`run_suite` (per-thread workspaces grow with it).
    dtype : {"float32", "float64"}
    batches : sequence of int, optional
        Batch sizes to measure (default ``(N, 2N)``: does the workspace grow
        with the batch?).
    reference : bool
        Measure :mod:`fastconv.reference` too.
    progress : callable, optional
        Called with one line of text per measurement.

    Returns
    -------
    list of dict
        One per batch size, with the keys of :data:`MEMORY_COLUMNS` (MiB):
        ``arrays_mib`` is what the caller holds anyway (the inputs ``x, weight,
        bias, grad_output`` plus the returned arrays), split into
        ``inputs_mib`` and ``outputs_mib``; ``<impl>_extra_mib`` is on top of it.

    Notes
    -----
    Each measurement runs in a fresh subprocess under :mod:`tracemalloc`,
    which sees every NumPy array allocation (NumPy reports them), so
    workspaces cached by a first call count. It does not see raw ``malloc``
    in compiled code (per-thread buffers allocated inside a parallel region,
    BLAS's internal buffers). "Extra" is the traced peak minus the bytes of
    the returned ``y, grad_x, grad_weight, grad_bias``; the inputs are made
    before tracing starts and are not counted either.
    """
    threads = usable_cpus() if threads is None else int(threads)
    batches = (shape.N, 2 * shape.N) if batches is None else tuple(batches)
    impls = ("fastconv", "reference") if reference else ("fastconv",)
    itemsize = np.dtype(dtype).itemsize
    rows = []
    for n in batches:
        s = shape.with_batch(n)
        inputs = (math.prod(s.input_shape) + math.prod(s.weight_shape) + s.F
                  + math.prod(s.output_shape)) * itemsize
        row = {"shape": s.name, "N": n, "dtype": np.dtype(dtype).name, "threads": threads,
               "inputs_mib": inputs / MIB, "outputs_mib": None, "arrays_mib": None,
               "fastconv_extra_mib": None, "reference_extra_mib": None}
        for impl in impls:
            result = _memory_in_subprocess(s, impl, threads, dtype)
            row["outputs_mib"] = result["returned"] / MIB
            row["arrays_mib"] = row["inputs_mib"] + row["outputs_mib"]
            row[f"{impl}_extra_mib"] = (result["peak"] - result["returned"]) / MIB
            if progress is not None:
                progress(f"{s.name} N={n} {impl}: extra peak "
                         f"{_format_value(row[f'{impl}_extra_mib'])} MiB")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------
# output


def _format_value(value) -> str:
    """Three significant digits without exponents (10.1, 1.23, 1234), '' for None."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01 or magnitude == 0:
        return f"{value:.2f}"
    return f"{value:.2g}"


def format_table(rows: Sequence[dict], columns=SUITE_COLUMNS) -> str:
    """A GitHub-markdown table of ``rows``: header, separator, one line per row.

    Parameters
    ----------
    rows : sequence of dict
        As returned by :func:`run_suite` or :func:`measure_memory`.
    columns : sequence of (key, header)
        Columns in order. A column whose key is None (or missing) in every
        row is left out; ``{gemm}`` in a header becomes ``sgemm`` or ``dgemm``
        after the rows' dtype.

    Returns
    -------
    str
        Without a trailing newline. Text columns are left-aligned, numbers
        right-aligned, and cells are padded so the table also reads as text.
    """
    dtype = rows[0].get("dtype", "float32") if rows else "float32"
    gemm = "dgemm" if dtype == "float64" else "sgemm"
    shown = [(key, header.format(gemm=gemm)) for key, header in columns
             if any(row.get(key) is not None for row in rows)]
    cells = [[_format_value(row.get(key)) for key, _ in shown] for row in rows]
    numeric = [all(not isinstance(row.get(key), str) for row in rows) for key, _ in shown]
    widths = [max([len(header)] + [len(line[i]) for line in cells])
              for i, (_, header) in enumerate(shown)]

    def line(values):
        padded = (v.rjust(w) if num else v.ljust(w)
                  for v, w, num in zip(values, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line([h for _, h in shown]), rule] + [line(c) for c in cells])


def describe_environment(threads: int, dtype, how: str) -> str:
    """One line naming what the numbers depend on: versions, BLAS, threads, ``how``."""
    import platform

    import fastconv
    from threadpoolctl import threadpool_info

    blas = sorted({f"{i.get('internal_api')} {i.get('version')}"
                   + (f" ({i['architecture']})" if i.get("architecture") else "")
                   for i in threadpool_info() if i.get("user_api") == "blas"})
    version = getattr(fastconv, "__version__", "?")
    return (f"fastconv {version}, numpy {np.__version__}, BLAS: {', '.join(blas) or '?'}; "
            f"{platform.machine()} {platform.processor() or ''}".rstrip()
            + f"; {np.dtype(dtype).name}, {threads} thread{'s' if threads != 1 else ''}, {how}")


# --------------------------------------------------------------------------
# command line


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastconv bench",
        description="Time fastconv's conv2d forward and backward on a standard suite of "
                    "layer shapes, then its max/avg pooling, and print GitHub-markdown "
                    "tables to stdout (progress goes to stderr).",
        epilog="shapes: " + ", ".join(s.name for s in SUITE)
               + "; pooling shapes: " + ", ".join(s.name for s in POOL_SUITE),
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_REPEAT} repeats instead of {DEFAULT_REPEAT}, and 1 for the "
                             "reference")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="T",
                        help="threads for fastconv, BLAS and torch (default: all usable cores, "
                             f"here {usable_cpus()})")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="time only these shapes (repeatable, or a comma-separated list)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeat", type=_positive_int, default=None, metavar="R",
                        help="timed runs per measurement, after one warm-up "
                             f"(default {DEFAULT_REPEAT})")
    parser.add_argument("--warmup", type=_non_negative_float, default=0.0, metavar="SECONDS",
                        help="untimed calls for this long before each measurement's timed "
                             "runs (every implementation alike): a steady state instead of "
                             "the first calls after the settle pause (default 0)")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the pure-NumPy reference")
    parser.add_argument("--no-torch", dest="torch", action="store_false",
                        help="skip PyTorch even if it is installed")
    parser.add_argument("--compare", action="store_true",
                        help="also time ONNX Runtime's forward (needs onnx and onnxruntime) "
                             "beside fastconv and PyTorch, with its ratio; a peer that does "
                             "not import is reported on stderr and left out")
    parser.add_argument("--batch", type=_positive_int, default=None, metavar="N",
                        help="override the batch size of the selected shapes")
    parser.add_argument("--scaling", action="store_true",
                        help="instead of the suite table, time fastconv at 1 thread and at "
                             "--threads threads side by side (e.g. --only vgg-mid --batch 1)")
    parser.add_argument("--accuracy", action="store_true",
                        help="instead of timing, print each algorithm's float32 error against "
                             "float64 for the plain shapes (forward and grad_x)")
    parser.add_argument("--memory", nargs="?", const=DEFAULT_MEMORY_SHAPE, default=None,
                        metavar="NAME",
                        help="instead of timing, measure the extra peak memory of one "
                             "forward + backward at batch N and 2N "
                             f"(default shape: {DEFAULT_MEMORY_SHAPE})")
    return parser


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def select_shapes(names: Optional[Iterable[str]]) -> tuple[Shape, ...]:
    """The suite shapes named in ``names`` (comma lists allowed), in suite order.

    Raises
    ------
    ValueError
        If a name is not in :data:`SUITE`; the message lists the valid names.
    """
    if not names:
        return SUITE
    wanted = {n.strip() for item in names for n in item.split(",") if n.strip()}
    known = {s.name for s in SUITE}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"unknown shape name(s) {', '.join(unknown)}; "
                         f"valid names: {', '.join(s.name for s in SUITE)}")
    return tuple(s for s in SUITE if s.name in wanted)


def select_suites(names: Optional[Iterable[str]]) -> tuple[tuple[Shape, ...],
                                                           tuple[PoolShape, ...]]:
    """The convolution and pooling shapes named in ``names`` (both suites when empty).

    Raises
    ------
    ValueError
        If a name is in neither :data:`SUITE` nor :data:`POOL_SUITE`; the
        message lists the valid names.
    """
    if not names:
        return SUITE, POOL_SUITE
    wanted = {n.strip() for item in names for n in item.split(",") if n.strip()}
    every = SUITE + POOL_SUITE
    unknown = sorted(wanted - {s.name for s in every})
    if unknown:
        raise ValueError(f"unknown shape name(s) {', '.join(unknown)}; "
                         f"valid names: {', '.join(s.name for s in every)}")
    return (tuple(s for s in SUITE if s.name in wanted),
            tuple(s for s in POOL_SUITE if s.name in wanted))


def measure_scaling(shapes: Iterable[Shape], threads: int, dtype="float32",
                    repeat: int = DEFAULT_REPEAT, *, progress=None) -> list[dict]:
    """fastconv at 1 thread and at ``threads`` threads, side by side in this process.

    Returns one dict per shape x pass with the keys of :data:`SCALING_COLUMNS`.
    """
    import fastconv
    from threadpoolctl import threadpool_limits

    rows = []
    for shape in shapes:
        arrays = shape.make_inputs(dtype)
        for pass_ in PASSES:
            times = {}
            for n in (1, threads):
                with threadpool_limits(limits=n, user_api="blas"):
                    times[n], _ = time_call(
                        _conv_call(fastconv, pass_, shape, arrays, n_threads=n), repeat)
            row = {"shape": shape.name, "N": shape.N, "pass": pass_,
                   "one_thread_ms": times[1], "threads_ms": times[threads],
                   "scaling": times[1] / times[threads]}
            rows.append(row)
            if progress is not None:
                progress(f"{shape.name} N={shape.N} {pass_}: 1 thread {times[1]:.3g} ms, "
                         f"{threads} threads {times[threads]:.3g} ms")
    return rows


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fastconv bench``; returns the exit status.

    Invalid options (an unknown ``--only`` name included) exit with status 2
    and a message on stderr, as argparse does.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        shapes, pool_shapes = select_suites(args.only)
        memory_shape = select_shapes([args.memory])[0] if args.memory else None
    except ValueError as exc:
        parser.error(str(exc))
    threads = args.threads or usable_cpus()
    if args.batch is not None:
        shapes = tuple(s.with_batch(args.batch) for s in shapes)
        pool_shapes = tuple(s.with_batch(args.batch) for s in pool_shapes)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)

    if args.scaling:
        rows = measure_scaling(shapes, threads, args.dtype, repeat, progress=_stderr)
        columns = tuple((key, header.format(threads=threads)) for key, header in SCALING_COLUMNS)
        print(format_table(rows, columns))
        print()
        print(describe_environment(threads, args.dtype, f"median of {repeat} runs after a warm-up"))
        return 0

    if args.accuracy:
        from fastconv._bench_accuracy import ACCURACY_COLUMNS, measure_accuracy

        rows = measure_accuracy(shapes, threads, progress=_stderr)
        print(format_table(rows, ACCURACY_COLUMNS))
        print()
        print(describe_environment(threads, "float32", "error vs the float64 im2col result"))
        return 0

    if memory_shape is not None:
        rows = measure_memory(memory_shape, threads, args.dtype,
                              reference=args.reference, progress=_stderr)
        print(format_table(rows, MEMORY_COLUMNS))
        print()
        print(describe_environment(threads, args.dtype, "first call in a fresh process"))
        return 0

    reference_repeat = 1 if args.quick else repeat
    torch = None if args.torch else False
    onnxruntime = None if args.compare else False
    if args.compare:
        missing = [name for name, found in (("torch", _import_torch() is not None),
                                            ("onnx/onnxruntime",
                                             _bench_onnx.import_onnxruntime() is not None))
                   if not found]
        if missing:
            _stderr(f"--compare: {', '.join(missing)} not importable, left out")
    if shapes:
        _stderr(f"timing {len(shapes)} shape(s) x {len(PASSES)} passes, {args.dtype}, "
                f"{threads} threads, {repeat} repeats")
        rows = run_suite(shapes, threads, args.dtype, repeat, reference=args.reference,
                         reference_repeat=reference_repeat, torch=torch,
                         onnxruntime=onnxruntime, progress=_stderr, warmup=args.warmup)
        print(format_table(rows))
        print()
    if pool_shapes:
        _stderr(f"timing {len(pool_shapes)} pooling shape(s), forward and backward")
        rows = run_pool_suite(pool_shapes, threads, args.dtype, repeat, reference=args.reference,
                              reference_repeat=reference_repeat, torch=torch, progress=_stderr,
                              warmup=args.warmup)
        print(format_table(rows))
        print()
    how = f"median of {repeat} runs after a warm-up"
    if args.warmup > 0:
        how += f" and {args.warmup:g} s of untimed calls"
    print(describe_environment(threads, args.dtype, how))
    return 0
