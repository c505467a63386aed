"""Transposed convolution: the adjoint of ``conv2d`` with respect to its input.

``conv_transpose2d(x, w)`` is exactly the grad_x pass of the convolution that
maps the (larger) transposed output back to ``x``, so it runs the engine's
backward-data kernel (GEMM, then col2im; the weight transposed first and the
bias as the planes' starting value); its backward runs the grad-weight kernel,
which also writes the forward product (grad_x) from the same im2col of
grad_output. The geometry of that convolution comes from
``fastconv._validation.transposed_geometry``, the tile plan from
``fastconv._tiling.plan_transposed``.

Layers whose kernel is twice their stride (DCGAN's 4x4 stride-2 upsampling)
split into 2x2 phase convolutions instead, run in the Winograd domain by
``fastconv._phases`` (``algorithm="winograd"``, or "auto" where
:func:`fastconv._phases.pays_off`).
"""

from __future__ import annotations

import numpy as np

from fastconv import _conv, _phases, _tiling
from fastconv._functional import _bias_gradient_wanted, transposed_weight, weight_sums_transposed
from fastconv._threads import effective_n_threads, single_threaded_blas
from fastconv._tiling import check_blas_limits, plan_transposed
from fastconv._validation import (
    TRANSPOSED_ALGORITHMS,
    IntPair,
    as_array,
    as_choice,
    check_ndim,
    compute_dtype,
    transposed_geometry,
)
from fastconv._workspace import workspace

__all__ = ["conv_transpose2d", "conv_transpose2d_backward"]

def _plan_and_workspace(geometry, dtype: np.dtype, n_threads: int):
    """The tile plan (:func:`fastconv._tiling.plan_transposed`) and a scratch array of
    n_threads equal per-thread slices."""
    KK = geometry.KH * geometry.KW
    tiles = plan_transposed(geometry.N, geometry.C, KK, geometry.OH * geometry.OW,
                            dtype.itemsize, n_threads)
    per_thread = tiles.workspace_per_thread(geometry.C * KK, geometry.F, geometry.is_pointwise)
    return tiles, workspace("columns", dtype, n_threads * max(per_thread, 1))


def _transposed_algorithm(algorithm: str, geometry, backward: bool = False) -> str:
    """``'winograd'`` (the 2x2 phase convolutions, ``fastconv._phases``) or ``'im2col'``
    for the forward or, with ``backward``, the backward pass."""
    algorithm = as_choice(algorithm, "algorithm", TRANSPOSED_ALGORITHMS)
    applies = _phases.applies(geometry)
    if algorithm == "winograd" and not applies:
        raise ValueError(
            "algorithm='winograd' needs a kernel twice the stride on both axes, dilation 1 "
            f"and groups 1, got kernel {geometry.KH}x{geometry.KW}, "
            f"stride={(geometry.stride_h, geometry.stride_w)}, "
            f"dilation={(geometry.dilation_h, geometry.dilation_w)}, groups={geometry.groups}"
        )
    fits = _phases.fits(geometry)
    if algorithm == "winograd" and applies and not fits:
        raise ValueError(
            f"algorithm='winograd' needs stride_h*stride_w*C_out, C_in and ceil((W + 3)/2) "
            f"within the BLAS limit {_tiling.BLAS_INT_MAX} (the GEMMs' leading dimensions), "
            f"got stride={(geometry.stride_h, geometry.stride_w)}, C_in={geometry.F}, "
            f"C_out={geometry.C}, W={geometry.OW}"
        )
    if algorithm == "auto":
        pays_off = _phases.pays_off_backward if backward else _phases.pays_off
        return "winograd" if applies and fits and pays_off(geometry) else "im2col"
    return algorithm


def _transposed_inputs(x, weight, stride, padding, output_padding, groups, dilation):
    x = as_array(x, "x")
    weight = as_array(weight, "weight")
    check_ndim(x, 4, "x", "(N, C_in, H, W)")
    check_ndim(weight, 4, "weight", "(C_in, C_out/groups, KH, KW)")
    geometry = transposed_geometry(x.shape, weight.shape, stride, padding, output_padding,
                                   groups, dilation)
    check_blas_limits(weight.shape, geometry.groups, row_name="C_out/groups*KH*KW")
    return x, weight, geometry


def conv_transpose2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
    *,
    algorithm: str = "auto",
    n_threads: int | None = None,
) -> np.ndarray:
    """2-D transposed convolution ("deconvolution") of NCHW input, PyTorch's semantics.

    Every input pixel scatters ``x[n, c, i, j] * weight[c, :, kh, kw]`` to
    output pixel ``(i*sh - ph + kh*dh, j*sw - pw + kw*dw)``: the adjoint of
    :func:`conv2d` with the same stride, padding, dilation and groups.

    Parameters
    ----------
    x : ndarray, shape (N, C_in, H, W)
    weight : ndarray, shape (C_in, C_out/groups, KH, KW)
        PyTorch's ``ConvTranspose2d.weight`` layout (input channels first).
    bias : ndarray, shape (C_out,), optional
    stride : int or (int, int), default 1
    padding : int, (ph, pw) or (top, bottom, left, right), default 0
        Rows/columns cropped from each side of the full output (no strings:
        padding here shrinks the output). The 4-tuple crops each side by its
        own amount, as ``conv2d``'s pads each side (seed 004), so the adjoint
        identity holds for asymmetric padding too.
    output_padding : int or (int, int), default 0
        Extra rows/columns at the bottom/right, to pick one of the output
        sizes a strided conv2d maps to the same size; must be smaller than
        ``max(stride, dilation)`` on each axis.
    groups : int, default 1
        C_in and C_out split into ``groups`` independent transposed convolutions.
    dilation : int or (int, int), default 1
    algorithm : {'auto', 'im2col', 'winograd'}, default 'auto'
        'im2col': GEMM, then col2im. 'winograd': for kernels twice the stride
        (groups 1, dilation 1), the output phases as F(2x2, 2x2) or, where its
        tiles fit the planes, F(3x3, 2x2) convolutions from shared x tiles,
        1.78-2.25x fewer multiplications at a float32 error 1-3x im2col's
        (README "Algorithms"). 'auto' takes 'winograd' where it
        measured faster (``fastconv._phases.pays_off``).
    n_threads : int, optional
        As in :func:`conv2d`.

    Returns
    -------
    y : ndarray, shape (N, C_out, H_out, W_out)
        ``H_out = (H - 1)*sh - top - bottom + dh*(KH - 1) + output_padding_h + 1``
        (``- 2*ph`` for symmetric padding), likewise ``W_out``; the dtype as in
        :func:`conv2d`.

    Raises
    ------
    TypeError, ValueError
        As :func:`conv2d`; also string padding, negative padding or
        output_padding, output_padding >= max(stride, dilation), groups not
        dividing C_in, an output size < 1.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    >>> fastconv.conv_transpose2d(x, np.ones((1, 1, 2, 2)), stride=2)
    array([[[[1., 1., 2., 2.],
             [1., 1., 2., 2.],
             [3., 3., 4., 4.],
             [3., 3., 4., 4.]]]])
    >>> fastconv.conv_transpose2d(np.zeros((16, 256, 16, 16), np.float32),
    ...                           np.zeros((256, 128, 4, 4), np.float32), stride=2,
    ...                           padding=1).shape
    (16, 128, 32, 32)
    """
    return _conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups,
                             dilation, algorithm, n_threads)


def _conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation,
                      algorithm, n_threads, weight_cache=None) -> np.ndarray:
    """:func:`conv_transpose2d`, with a layer's cache of transformed filters
    (``weight_cache``, a ``fastconv._winograd.TransformedWeights``)."""
    x, weight, geometry = _transposed_inputs(x, weight, stride, padding, output_padding, groups,
                                             dilation)
    algorithm = _transposed_algorithm(algorithm, geometry)
    dtypes = [x.dtype, weight.dtype]
    if bias is not None:
        bias = as_array(bias, "bias")
        if bias.shape != (geometry.C,):
            raise ValueError(f"bias must have shape ({geometry.C},) (C_out = weight.shape[1] "
                             f"* groups), got bias.shape={bias.shape}")
        dtypes.append(bias.dtype)
    dtype = compute_dtype(*dtypes)
    n_threads = effective_n_threads(n_threads)
    y = np.empty(geometry.input_shape, dtype)
    if geometry.N == 0:
        return y
    N, C_in = geometry.N, geometry.F
    b = None if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    if algorithm == "winograd":
        U = None
        if weight_cache is not None:
            # the filters depend on the stride, through each phase's first tap on the
            # padding modulo the stride, and on the tile size (chosen by the planes)
            key = ("phases", geometry.stride_h, geometry.stride_w, geometry.pad_top,
                   geometry.pad_left, _phases.forward_tile(geometry), np.dtype(dtype))
            U = weight_cache.get_or_make(
                weight, key,
                lambda w: _phases.forward_filters(w, geometry, dtype, n_threads,
                                                  out=np.empty(_phases.filters_shape(geometry),
                                                               dtype)))
        return _phases.forward(np.ascontiguousarray(x, dtype=dtype),
                               np.ascontiguousarray(weight, dtype=dtype), b, geometry,
                               n_threads, y, U=U)
    xc = np.ascontiguousarray(x, dtype=dtype).reshape(N, C_in, -1)
    w2d = np.ascontiguousarray(weight, dtype=dtype).reshape(C_in, -1)
    tiles, scratch = _plan_and_workspace(geometry, dtype, n_threads)
    # W_g.T row-major (see _conv.backward_input); as it is past the 32-bit BLAS limit
    # (its rows are within it, _transposed_inputs)
    wt = transposed_weight(w2d, geometry.groups, dtype, n_threads)
    with single_threaded_blas:
        _conv.backward_input(w2d if wt is None else wt, xc, y, scratch, geometry,
                             tiles.images_per_tile, tiles.tile_p, tiles.c_block, n_threads,
                             transposed_weight=wt is not None, bias=b)
    return y


def conv_transpose2d_backward(
    grad_output: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
    *,
    bias=True,
    algorithm: str = "auto",
    n_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gradients of :func:`conv_transpose2d` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_output : ndarray, shape (N, C_out, H_out, W_out)
    x : ndarray, shape (N, C_in, H, W)
        The forward pass's input.
    weight : ndarray, shape (C_in, C_out/groups, KH, KW)
    stride, padding, output_padding, groups, dilation
        As given to :func:`conv_transpose2d`.
    bias : bool, None or ndarray, default True
        Whether the forward had a bias (False/None: ``grad_bias`` is None).
    algorithm : {'auto', 'im2col', 'winograd'}, default 'auto'
        As in :func:`conv_transpose2d`: 'winograd' runs grad_x and grad_weight
        by F(2x2, 2x2) from one transform of grad_output's phase planes
        ('auto': where ``fastconv._phases.pays_off_backward``).
    n_threads : int, optional
        As in :func:`conv2d`.

    Returns
    -------
    grad_x : ndarray, shape (N, C_in, H, W)
        ``conv2d(grad_output, weight, stride, padding, dilation, groups)``.
    grad_weight : ndarray, shape (C_in, C_out/groups, KH, KW)
        ``sum_n x[n] @ im2col(grad_output[n]).T``, per group.
    grad_bias : ndarray, shape (C_out,), or None
        ``grad_output`` summed over all but the channel axis.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> x, w = np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2))
    >>> dx, dw, db = fastconv.conv_transpose2d_backward(np.ones((1, 1, 4, 4)), x, w, stride=2)
    >>> dx[0, 0], dw[0, 0], db
    (array([[4., 4.],
           [4., 4.]]), array([[4., 4.],
           [4., 4.]]), array([16.]))
    """
    x, weight, geometry = _transposed_inputs(x, weight, stride, padding, output_padding, groups,
                                             dilation)
    grad_output = as_array(grad_output, "grad_output")
    if grad_output.shape != geometry.input_shape:
        raise ValueError(
            f"grad_output must have the forward output's shape {geometry.input_shape} "
            f"(x.shape={x.shape}, weight.shape={weight.shape}), got {grad_output.shape}"
        )
    algorithm = _transposed_algorithm(algorithm, geometry, backward=True)
    with_bias = _bias_gradient_wanted(bias, geometry.C)
    dtype = compute_dtype(grad_output.dtype, x.dtype, weight.dtype)
    n_threads = effective_n_threads(n_threads)
    N, C_in, C_out = geometry.N, geometry.F, geometry.C
    Kg = C_out // geometry.groups * geometry.KH * geometry.KW
    grad_x = np.empty(x.shape, dtype)
    # room for the grad-weight kernel's per-channel sums of its "dy" (here x): left 0
    weight_and_x_sums = np.empty(C_in * Kg + C_in, dtype)
    grad_weight = weight_and_x_sums[: C_in * Kg].reshape(weight.shape)
    grad_bias = np.empty(C_out, dtype) if with_bias else None
    if N == 0:
        grad_weight.fill(0)
        if with_bias:
            grad_bias.fill(0)
        return grad_x, grad_weight, grad_bias

    dy = np.ascontiguousarray(grad_output, dtype=dtype)
    if algorithm == "winograd":
        _phases.backward(dy, np.ascontiguousarray(x, dtype=dtype),
                         np.ascontiguousarray(weight, dtype=dtype), geometry, n_threads, grad_x,
                         grad_weight)
        if with_bias:
            _conv.channel_sums(dy.reshape(N, C_out, -1), grad_bias, n_threads)
        return grad_x, grad_weight, grad_bias
    xc = np.ascontiguousarray(x, dtype=dtype).reshape(N, C_in, -1)
    w2d = np.ascontiguousarray(weight, dtype=dtype).reshape(C_in, Kg)
    tiles, scratch = _plan_and_workspace(geometry, dtype, n_threads)
    partial = workspace("partial", dtype, n_threads * (C_in * Kg + C_in)).reshape(n_threads, -1)
    Fg = C_in // geometry.groups
    transposed = weight_sums_transposed(Fg, Kg, dtype)
    with single_threaded_blas:
        # grad_x = conv2d(dy, w) and grad_weight from one im2col of dy per tile
        _conv.backward_weight(dy, xc, partial, scratch, geometry, tiles.images_per_tile,
                              tiles.tile_p, n_threads, w2d, grad_x.reshape(N, C_in, -1),
                              with_sums=False, transposed_sums=transposed)
        _conv.reduce_rows(partial, weight_and_x_sums, n_threads,
                          *((geometry.groups, Fg, Kg) if transposed else ()))
    if with_bias:
        _conv.channel_sums(dy.reshape(N, C_out, -1), grad_bias, n_threads)
    return grad_x, grad_weight, grad_bias
