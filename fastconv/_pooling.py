"""Pooling and activation functions: validate -> cast/contiguity -> kernel (``_pool.pyx``).

Semantics follow PyTorch (``torch.nn.functional.max_pool2d``, ``avg_pool2d``,
``relu``) for every argument combination; the dtype rules are
:func:`fastconv.conv2d`'s (float32 stays float32, integers and bools compute in
float64, float16 in float32). Inputs are never modified.
"""

from __future__ import annotations

import numpy as np

from fastconv import _pool
from fastconv._threads import effective_n_threads
from fastconv._validation import (
    IntPair,
    PoolGeometry,
    as_array,
    as_bool,
    check_ndim,
    compute_dtype,
    pool_geometry,
)

__all__ = [
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "global_avg_pool2d",
    "global_avg_pool2d_backward",
    "relu",
    "relu_backward",
]


def _pool_input(x, kernel_size, stride, padding, dilation, ceil_mode) -> tuple:
    x = as_array(x, "x")
    check_ndim(x, 4, "x", "(N, C, H, W)")
    return x, pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)


def _planes(a: np.ndarray, dtype: np.dtype, shape) -> np.ndarray:
    """``a`` as a C-contiguous (N*C, rows, cols) array of ``dtype`` (a copy only if needed)."""
    return np.ascontiguousarray(a, dtype=dtype).reshape(-1, shape[2], shape[3])


def _check_grad_output(grad_output, g: PoolGeometry, x_shape) -> np.ndarray:
    grad_output = as_array(grad_output, "grad_output")
    if grad_output.shape != g.output_shape:
        raise ValueError(
            f"grad_output must have the forward output's shape {g.output_shape} "
            f"(x.shape={tuple(x_shape)}), got {grad_output.shape}"
        )
    return grad_output


def max_pool2d(
    x: np.ndarray,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    *,
    n_threads: int | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """2-D max pooling of NCHW input, as ``torch.nn.functional.max_pool2d``.

    ``y[n, c, oh, ow] = max_{kh, kw} x[n, c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]``
    over the taps inside the input (padding never wins: it acts as -inf).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel_size : int or (int, int)
        Window size ``(KH, KW)``.
    stride : int or (int, int), optional
        Step between windows; None (default) means ``kernel_size``.
    padding : int or (int, int), default 0
        Implicit -inf padding on both sides, ``(ph, pw)``; at most half the
        kernel size (``ph <= KH // 2``), as in PyTorch.
    dilation : int or (int, int), default 1
        Spacing between the window's taps.
    ceil_mode : bool, default False
        Round the output size up instead of down (see Notes).
    return_indices : bool, default False
        Also return the argmax positions.
    n_threads : int, optional
        OpenMP threads (one (n, c) plane per work item): None = all usable
        cores, negative counts back from all cores.

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW)
        Same dtype rules as :func:`fastconv.conv2d`.
    indices : ndarray of int64, shape (N, C, OH, OW)
        Only with ``return_indices``: the flat position ``ih * W + iw`` of each
        maximum within its H x W input plane (PyTorch's convention), -1 for a
        window that holds no input element at all (only possible with a large
        dilation; its output is -inf).

    Raises
    ------
    TypeError
        Non-array or unsupported dtype, non-integer sizes, non-bool flags.
    ValueError
        ``x`` not 4-D, non-positive ``kernel_size``/``stride``/``dilation``,
        negative padding or padding larger than half the kernel, output size < 1.

    Notes
    -----
    ``OH = (H + 2*ph - dh*(KH-1) - 1) // sh + 1``; with ``ceil_mode`` the
    division rounds up, and the last window is dropped if it would start in
    the bottom padding (``(OH-1)*sh >= H + ph``). Likewise for ``OW``.

    Ties go to the first tap in row-major scan order. A NaN in a window makes
    its maximum NaN, and its index is the last NaN's (PyTorch's CPU kernel).

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> x = np.array([[[[1., 2., 5., 3.],
    ...                 [4., 0., 1., 1.],
    ...                 [7., 8., 0., 2.]]]])
    >>> y, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    >>> y
    array([[[[4., 5.]]]])
    >>> idx
    array([[[[4, 2]]]])
    >>> fastconv.max_pool2d(x, 2, ceil_mode=True)
    array([[[[4., 5.],
             [8., 2.]]]])
    """
    x, g = _pool_input(x, kernel_size, stride, padding, dilation, ceil_mode)
    return_indices = as_bool(return_indices, "return_indices")
    dtype = compute_dtype(x.dtype)
    n_threads = effective_n_threads(n_threads)
    y = np.empty(g.output_shape, dtype)
    indices = np.empty(g.output_shape, np.int64) if return_indices else None
    if y.size:
        _pool.max_pool_forward(
            _planes(x, dtype, x.shape), y.reshape(-1, g.OH, g.OW),
            None if indices is None else indices.reshape(-1, g.OH, g.OW), g, n_threads)
    return (y, indices) if return_indices else y


def max_pool2d_backward(
    grad_output: np.ndarray,
    x: np.ndarray,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    *,
    indices: np.ndarray | None = None,
    n_threads: int | None = None,
) -> np.ndarray:
    """Gradient of :func:`max_pool2d` with respect to its input.

    Parameters
    ----------
    grad_output : ndarray, shape (N, C, OH, OW)
        Gradient of the loss with respect to the pooling's output.
    x : ndarray, shape (N, C, H, W)
        The forward input (only its shape is used when ``indices`` is given).
    kernel_size, stride, padding, dilation, ceil_mode
        As given to :func:`max_pool2d`.
    indices : ndarray of int64, shape (N, C, OH, OW), optional
        The forward's ``return_indices`` output; recomputed from ``x`` when
        None (same scan, so the same argmax).
    n_threads : int, optional
        As in :func:`max_pool2d`.

    Returns
    -------
    grad_x : ndarray, shape (N, C, H, W)
        Each output's gradient added at its argmax; zero elsewhere.
        dtype: ``compute_dtype(grad_output, x)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`max_pool2d`; ``grad_output`` or ``indices`` of the wrong
        shape; ``indices`` not integer (TypeError) or outside ``[-1, H*W)``.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> x = np.array([[[[1., 2.], [4., 3.]]]])
    >>> fastconv.max_pool2d_backward(np.array([[[[10.]]]]), x, 2)
    array([[[[ 0.,  0.],
             [10.,  0.]]]])
    """
    x, g = _pool_input(x, kernel_size, stride, padding, dilation, ceil_mode)
    grad_output = _check_grad_output(grad_output, g, x.shape)
    if indices is not None:
        indices = as_array(indices, "indices")
        if indices.dtype.kind not in "iu":
            raise TypeError(f"indices must be an int64 array, got dtype {indices.dtype}")
        if indices.shape != g.output_shape:
            raise ValueError(
                f"indices must have the forward output's shape {g.output_shape} "
                f"(x.shape={x.shape}), got {indices.shape}"
            )
    dtype = compute_dtype(grad_output.dtype, x.dtype)
    n_threads = effective_n_threads(n_threads)
    grad_x = np.empty(g.input_shape, dtype)
    if grad_x.size == 0:
        return grad_x
    planes_out = grad_x.reshape(-1, g.H, g.W)
    dy = _planes(grad_output, dtype, g.output_shape)
    if indices is None:
        # the forward's scan again: same argmax, and its row sweep is faster
        # than any per-window search here
        planes_idx = np.empty((g.N * g.C, g.OH, g.OW), np.int64)
        _pool.max_pool_forward(_planes(x, dtype, x.shape), np.empty(planes_idx.shape, dtype),
                               planes_idx, g, n_threads)
        _pool.max_pool_backward_indices(dy, planes_idx, planes_out, n_threads)
    else:
        # uint64 values from 2**63 on wrap around in the int64 cast, and 2**64 - 1
        # would become a valid -1 (no gradient): count them before casting
        bad = (np.count_nonzero(indices >= g.H * g.W) if indices.dtype.kind == "u" else 0) \
            or _pool.max_pool_backward_indices(dy, _planes(indices, np.int64, g.output_shape),
                                               planes_out, n_threads)
        if bad:
            raise ValueError(
                f"indices holds {bad} value(s) outside [-1, H*W) = [-1, {g.H * g.W}): "
                f"they must be flat positions in the {g.H}x{g.W} input planes, as "
                "max_pool2d(..., return_indices=True) returns them"
            )
    return grad_x


def avg_pool2d(
    x: np.ndarray,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    *,
    n_threads: int | None = None,
) -> np.ndarray:
    """2-D average pooling of NCHW input, as ``torch.nn.functional.avg_pool2d``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        None (default) means ``kernel_size``.
    padding : int or (int, int), default 0
        Zero padding on both sides, at most half the kernel size.
    ceil_mode : bool, default False
        Output size as in :func:`max_pool2d`.
    count_include_pad : bool, default True
        Whether padded zeros count in the divisor.
    n_threads : int, optional
        As in :func:`max_pool2d`.

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW)
        ``OH = (H + 2*ph - KH) // sh + 1`` (see :func:`max_pool2d` for
        ``ceil_mode``).

    Raises
    ------
    TypeError, ValueError
        As :func:`max_pool2d`.

    Notes
    -----
    PyTorch's divisor: with ``count_include_pad`` it is the window's area
    inside the *padded* input (a ``ceil_mode`` window hanging past the bottom
    or right padding is clipped there), otherwise the number of input
    elements in the window.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> x = np.arange(9.0).reshape(1, 1, 3, 3)
    >>> fastconv.avg_pool2d(x, 2, stride=1)
    array([[[[2., 3.],
             [5., 6.]]]])
    >>> fastconv.avg_pool2d(x, 3, stride=2, padding=1)           # zeros count
    array([[[[0.88888889, 1.33333333],
             [2.22222222, 2.66666667]]]])
    >>> fastconv.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
    array([[[[2., 3.],
             [5., 6.]]]])
    """
    x, g = _pool_input(x, kernel_size, stride, padding, 1, ceil_mode)
    count_include_pad = as_bool(count_include_pad, "count_include_pad")
    dtype = compute_dtype(x.dtype)
    n_threads = effective_n_threads(n_threads)
    y = np.empty(g.output_shape, dtype)
    if y.size:
        _pool.avg_pool_forward(_planes(x, dtype, x.shape), y.reshape(-1, g.OH, g.OW), g,
                               count_include_pad, n_threads)
    return y


def avg_pool2d_backward(
    grad_output: np.ndarray,
    x: np.ndarray,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    *,
    n_threads: int | None = None,
) -> np.ndarray:
    """Gradient of :func:`avg_pool2d` with respect to its input.

    Parameters
    ----------
    grad_output : ndarray, shape (N, C, OH, OW)
    x : ndarray, shape (N, C, H, W)
        The forward input; only its shape and dtype are used.
    kernel_size, stride, padding, ceil_mode, count_include_pad
        As given to :func:`avg_pool2d`.
    n_threads : int, optional

    Returns
    -------
    grad_x : ndarray, shape (N, C, H, W)
        Each output's gradient divided by its divisor and added to every
        input element of its window.

    Raises
    ------
    TypeError, ValueError
        As :func:`avg_pool2d`, and a ``grad_output`` of the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> fastconv.avg_pool2d_backward(np.ones((1, 1, 2, 2)), np.zeros((1, 1, 3, 3)), 2, stride=1)
    array([[[[0.25, 0.5 , 0.25],
             [0.5 , 1.  , 0.5 ],
             [0.25, 0.5 , 0.25]]]])
    """
    x, g = _pool_input(x, kernel_size, stride, padding, 1, ceil_mode)
    count_include_pad = as_bool(count_include_pad, "count_include_pad")
    grad_output = _check_grad_output(grad_output, g, x.shape)
    dtype = compute_dtype(grad_output.dtype, x.dtype)
    n_threads = effective_n_threads(n_threads)
    grad_x = np.empty(g.input_shape, dtype)
    if grad_x.size:
        _pool.avg_pool_backward(_planes(grad_output, dtype, g.output_shape),
                                grad_x.reshape(-1, g.H, g.W), g, count_include_pad, n_threads)
    return grad_x


def global_avg_pool2d(x: np.ndarray, *, keepdims: bool = False,
                      n_threads: int | None = None) -> np.ndarray:
    """Mean over each H x W plane (PyTorch's ``adaptive_avg_pool2d(x, 1)``).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
        H and W must be at least 1.
    keepdims : bool, default False
        Return (N, C, 1, 1) instead of (N, C).
    n_threads : int, optional

    Returns
    -------
    y : ndarray, shape (N, C) or (N, C, 1, 1)
        Summed in double precision, returned in the compute dtype.

    Raises
    ------
    TypeError, ValueError
        Unsupported dtype, ``x`` not 4-D or with an empty plane.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> fastconv.global_avg_pool2d(np.arange(8.0).reshape(1, 2, 2, 2))
    array([[1.5, 5.5]])
    """
    x = as_array(x, "x")
    check_ndim(x, 4, "x", "(N, C, H, W)")
    keepdims = as_bool(keepdims, "keepdims")
    N, C, H, W = x.shape
    if H < 1 or W < 1:
        raise ValueError(f"x must have non-empty planes, got x.shape={x.shape}")
    dtype = compute_dtype(x.dtype)
    n_threads = effective_n_threads(n_threads)
    y = np.empty(N * C, dtype)
    if y.size:
        _pool.global_avg_forward(np.ascontiguousarray(x, dtype=dtype).reshape(N * C, H * W), y,
                                 n_threads)
    return y.reshape((N, C, 1, 1) if keepdims else (N, C))


def global_avg_pool2d_backward(grad_output: np.ndarray, x: np.ndarray, *,
                               n_threads: int | None = None) -> np.ndarray:
    """Gradient of :func:`global_avg_pool2d`: ``grad_output / (H*W)`` spread over each plane.

    Parameters
    ----------
    grad_output : ndarray, shape (N, C) or (N, C, 1, 1)
    x : ndarray, shape (N, C, H, W)
        The forward input; only its shape and dtype are used.
    n_threads : int, optional

    Returns
    -------
    grad_x : ndarray, shape (N, C, H, W)

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> fastconv.global_avg_pool2d_backward(np.array([[4.0]]), np.zeros((1, 1, 2, 2)))
    array([[[[1., 1.],
             [1., 1.]]]])
    """
    x = as_array(x, "x")
    check_ndim(x, 4, "x", "(N, C, H, W)")
    N, C, H, W = x.shape
    if H < 1 or W < 1:
        raise ValueError(f"x must have non-empty planes, got x.shape={x.shape}")
    grad_output = as_array(grad_output, "grad_output")
    if grad_output.shape not in ((N, C), (N, C, 1, 1)):
        raise ValueError(
            f"grad_output must have shape {(N, C)} or {(N, C, 1, 1)} for x.shape={x.shape}, "
            f"got {grad_output.shape}"
        )
    dtype = compute_dtype(grad_output.dtype, x.dtype)
    n_threads = effective_n_threads(n_threads)
    grad_x = np.empty(x.shape, dtype)
    if grad_x.size:
        _pool.global_avg_backward(np.ascontiguousarray(grad_output, dtype=dtype).reshape(-1),
                                  grad_x.reshape(N * C, H * W), n_threads)
    return grad_x


def relu(x: np.ndarray, *, n_threads: int | None = None) -> np.ndarray:
    """Rectified linear unit, ``max(x, 0)`` elementwise, for arrays of any shape.

    NaN propagates (``relu(nan) = nan``), as in PyTorch.

    Parameters
    ----------
    x : ndarray
    n_threads : int, optional
        OpenMP threads for large arrays (small ones run on one thread).

    Returns
    -------
    y : ndarray, same shape as ``x``, dtype as :func:`fastconv.conv2d`

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> fastconv.relu(np.array([-1.5, 0.0, 2.0]))
    array([0., 0., 2.])
    """
    x = as_array(x, "x")
    dtype = compute_dtype(x.dtype)
    n_threads = effective_n_threads(n_threads)
    y = np.empty(x.shape, dtype)
    _pool.relu_forward(np.ascontiguousarray(x, dtype=dtype).reshape(-1), y.reshape(-1),
                       n_threads)
    return y


def relu_backward(grad_output: np.ndarray, x: np.ndarray, *,
                  n_threads: int | None = None) -> np.ndarray:
    """Gradient of :func:`relu`: ``grad_output`` where ``x > 0``, else 0.

    At ``x == 0`` the gradient is 0 and NaN inputs pass no gradient
    (PyTorch's ``threshold_backward``).

    Parameters
    ----------
    grad_output : ndarray, same shape as ``x``
    x : ndarray
        The forward input.
    n_threads : int, optional

    Returns
    -------
    grad_x : ndarray, shape of ``x``, dtype ``compute_dtype(grad_output, x)``

    Raises
    ------
    ValueError
        If the shapes differ.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> fastconv.relu_backward(np.array([1.0, 2.0, 3.0]), np.array([-1.0, 0.0, 5.0]))
    array([0., 0., 3.])
    """
    grad_output = as_array(grad_output, "grad_output")
    x = as_array(x, "x")
    if grad_output.shape != x.shape:
        raise ValueError(
            f"grad_output must have the shape of x {x.shape}, got {grad_output.shape}")
    dtype = compute_dtype(grad_output.dtype, x.dtype)
    n_threads = effective_n_threads(n_threads)
    grad_x = np.empty(x.shape, dtype)
    _pool.relu_backward(np.ascontiguousarray(grad_output, dtype=dtype).reshape(-1),
                        np.ascontiguousarray(x, dtype=dtype).reshape(-1),
                        grad_x.reshape(-1), n_threads)
    return grad_x
