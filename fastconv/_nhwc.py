"""Channels-last (NHWC) convolution: cast/contiguity -> tile plan and workspace -> kernel.

The public ``conv2d(..., layout="NHWC")`` validates its arguments and builds
the :class:`~fastconv._validation.ConvGeometry` (whose N, C, H, W, F, ... are
layout-free) before calling these drivers; here the arrays are only cast to
the compute dtype and made contiguous. Inputs are never modified.

Layouts: ``x`` is (N, H, W, C), ``y`` and ``grad_output`` are (N, OH, OW, F),
``weight`` stays (F, C/groups, KH, KW). The kernels (``fastconv._conv_nhwc``)
take the weight as ``wt`` of shape (F, Kg) with ``Kg = KH*KW*Cg`` ordered
``(kh, kw, cg)``, the order of a column row's chunks.
"""

from __future__ import annotations

import numpy as np

from fastconv import _conv_nhwc, _winograd
from fastconv._threads import single_threaded_blas
from fastconv._tiling import NhwcPlan, plan_nhwc
from fastconv._validation import ConvGeometry
from fastconv._workspace import workspace

__all__ = ["forward", "backward", "nhwc_weight"]

#: grad_weight reductions of fewer elements run in the calling thread.
PARALLEL_REDUCE_SIZE = 1 << 16


def nhwc_weight(weight: np.ndarray, geometry: ConvGeometry, dtype) -> np.ndarray:
    """(F, Cg, KH, KW) -> (F, KH*KW*Cg): ``wt[f, (kh, kw, cg)] = weight[f, cg, kh, kw]``.

    No copy for a 1x1 kernel already of ``dtype`` and contiguous. Otherwise
    the result lives in a reused workspace (valid until the next call): a
    fresh 9 MiB array for deep-7x7 cost 4 ms of page faults per call.
    """
    w = np.ascontiguousarray(weight, dtype=dtype).reshape(geometry.F, -1)
    KK = geometry.KH * geometry.KW
    if KK == 1:
        return w
    wt = workspace("nhwc-weight", w.dtype, w.size).reshape(w.shape)
    _conv_nhwc.weight_columns(w, wt, KK)
    return wt


def _plan(geometry: ConvGeometry, dtype: np.dtype, n_threads: int):
    """The tile plan and a scratch array of n_threads equal per-thread slices."""
    KK = geometry.KH * geometry.KW
    tiles: NhwcPlan = plan_nhwc(geometry.N, geometry.OH * geometry.OW, geometry.C, KK,
                                geometry.groups, dtype.itemsize, n_threads, geometry.OH,
                                geometry.F)
    per_thread = tiles.workspace_per_thread(geometry.C * KK, geometry.is_pointwise)
    return tiles, workspace("nhwc-columns", dtype, n_threads * max(per_thread, 1))


def _output_shape(geometry: ConvGeometry) -> tuple[int, int, int, int]:
    return (geometry.N, geometry.OH, geometry.OW, geometry.F)


def forward(x, weight, bias, geometry: ConvGeometry, dtype, n_threads: int,
            out: np.ndarray | None = None) -> np.ndarray:
    """Channels-last convolution: ``y[n, oh, ow, f]``, see :func:`fastconv.conv2d`.

    Parameters
    ----------
    x : ndarray, shape (N, H, W, C)
    weight : ndarray, shape (F, C/groups, KH, KW)
    bias : ndarray, shape (F,), or None
    geometry : ConvGeometry
        From ``conv_geometry((N, C, H, W), weight.shape, ...)``: validated.
    dtype : numpy dtype
        The compute dtype (float32 or float64); inputs are cast to it.
    n_threads : int
        A resolved, positive OpenMP thread count.
    out : ndarray, shape (N, OH, OW, F), optional
        A writeable C-contiguous array of ``dtype`` not overlapping the inputs.

    Returns
    -------
    y : ndarray, shape (N, OH, OW, F)
        ``out`` if given.
    """
    dtype = np.dtype(dtype)
    shape = _output_shape(geometry)
    y = np.empty(shape, dtype) if out is None else out
    if y.shape != shape or y.dtype != dtype or not y.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {shape}")
    if geometry.N == 0:
        return y
    xc = np.ascontiguousarray(x, dtype=dtype)
    wt = nhwc_weight(weight, geometry, dtype)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    tiles, scratch = _plan(geometry, dtype, n_threads)
    with single_threaded_blas:
        # by the own GEMM kernel where it runs: against BLAS (interleaved, 1 / 2 threads)
        # every suite shape's NHWC forward 1.03-1.15x / 1.05-1.14x, 1024 -> 256 and
        # 512 -> 2048 1x1 layers 1.04x / 1.02x, grouped 3x3 ones 1.16-1.29x
        _conv_nhwc.forward(xc, wt, b, y.reshape(-1, geometry.F), scratch, geometry,
                           tiles.n_tiles, tiles.f_blocks, n_threads, True)
    return y


def backward(grad_output, x, weight, geometry: ConvGeometry, dtype, n_threads: int,
             with_bias: bool = True, winograd_input: bool = False):
    """Gradients of :func:`forward` with respect to x, weight and bias.

    ``winograd_input``: grad_x by channels-last Winograd
    (``fastconv._winograd.backward_input_nhwc``: a zero-padded 3x3 stride-1 layer,
    groups 1), else by im2col like the weight gradient.

    Parameters
    ----------
    grad_output : ndarray, shape (N, OH, OW, F)
    x : ndarray, shape (N, H, W, C)
    weight : ndarray, shape (F, C/groups, KH, KW)
    geometry, dtype, n_threads
        As in :func:`forward`.
    with_bias : bool, default True
        Whether to compute grad_bias (else None is returned for it).

    Returns
    -------
    grad_x : ndarray, shape (N, H, W, C)
    grad_weight : ndarray, shape (F, C/groups, KH, KW)
    grad_bias : ndarray, shape (F,), or None
    """
    dtype = np.dtype(dtype)
    N, F = geometry.N, geometry.F
    Kg = geometry.C // geometry.groups * geometry.KH * geometry.KW
    grad_x = np.empty((N, geometry.H, geometry.W, geometry.C), dtype)
    grad_weight = np.empty(geometry.weight_shape, dtype)
    grad_bias = np.empty(F, dtype) if with_bias else None
    if N == 0:
        grad_weight.fill(0)
        if with_bias:
            grad_bias.fill(0)
        return grad_x, grad_weight, grad_bias
    xc = np.ascontiguousarray(x, dtype=dtype)
    dy = np.ascontiguousarray(grad_output, dtype=dtype).reshape(-1, F)
    tiles, scratch = _plan(geometry, dtype, n_threads)
    # per thread: grad_weight, grad_bias, and F more for a tile's bias sums
    partial = workspace("nhwc-partial", dtype, n_threads * (F * Kg + 2 * F))
    partial = partial.reshape(n_threads, F * Kg + 2 * F)
    with single_threaded_blas:
        _conv_nhwc.backward_weight(xc, dy, partial, scratch, geometry, tiles.n_tiles,
                                   tiles.f_blocks, with_bias, n_threads)
        if tiles.f_blocks > 1:
            partial = partial[:1]       # the final sums, only to be reordered
        # a parallel region costs ~1 ms of thread wake-up when the other core
        # is busy: only worth it for a large weight
        _conv_nhwc.reduce_weight_grad(partial, grad_weight.reshape(F, Kg), grad_bias,
                                      geometry.KH * geometry.KW,
                                      n_threads if F * Kg >= PARALLEL_REDUCE_SIZE else 1)
        if not winograd_input:
            # the reordered weight only for im2col's grad_x (Winograd transforms its own)
            wt = nhwc_weight(weight, geometry, dtype)
            _conv_nhwc.backward_input(wt, dy, grad_x, scratch, geometry, tiles.n_tiles,
                                      tiles.tile_rows, tiles.n_items, tiles.c_block,
                                      tiles.n_bands, n_threads)
    if winograd_input:
        _winograd.backward_input_nhwc(dy.reshape(N, geometry.OH, geometry.OW, F), weight,
                                      geometry, n_threads, grad_x)
    return grad_x, grad_weight, grad_bias
