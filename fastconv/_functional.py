"""Functional API: validate -> cast/contiguity -> tile plan and workspace -> kernel."""

from __future__ import annotations

import numpy as np

from fastconv import _conv, _im2col
from fastconv._threads import effective_n_threads, single_threaded_blas
from fastconv._tiling import check_blas_limits, plan
from fastconv._validation import (
    ConvGeometry,
    IntPair,
    Padding,
    as_array,
    as_int,
    as_shape,
    check_ndim,
    compute_dtype,
    conv_geometry,
)
from fastconv._workspace import workspace

__all__ = ["conv2d", "conv2d_backward", "im2col", "col2im"]


def _conv_inputs(x, weight, stride, padding, dilation, x_name="x"):
    """Validated arrays and geometry shared by the forward and backward passes."""
    x = as_array(x, x_name)
    weight = as_array(weight, "weight")
    check_ndim(x, 4, x_name, "(N, C, H, W)")
    check_ndim(weight, 4, "weight", "(F, C, KH, KW)")
    geometry = conv_geometry(x.shape, weight.shape, stride, padding, dilation)
    check_blas_limits(geometry.F, geometry.C * geometry.KH * geometry.KW,
                      geometry.OH * geometry.OW)
    return x, weight, geometry


def _check_out(out, shape, dtype) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape} but the output shape is {shape}")
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype} but the output dtype is {dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writeable C-contiguous array")
    return out


def _plan_and_workspace(geometry: ConvGeometry, dtype: np.dtype, n_threads: int):
    """The tile plan and a scratch array of n_threads equal per-thread slices."""
    KK = geometry.KH * geometry.KW
    tiles = plan(geometry.N, geometry.C, KK, geometry.OH * geometry.OW, dtype.itemsize,
                 n_threads)
    per_thread = tiles.workspace_per_thread(geometry.C * KK, geometry.F, geometry.is_pointwise)
    return tiles, workspace("columns", dtype, n_threads * max(per_thread, 1))


def conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    *,
    out: np.ndarray | None = None,
    n_threads: int | None = None,
) -> np.ndarray:
    """2-D convolution (cross-correlation, as in every deep-learning library) of NCHW input.

    ``y[n, f, oh, ow] = bias[f] + sum_{c, kh, kw} weight[f, c, kh, kw] *
    x_padded[n, c, oh*sh + kh*dh, ow*sw + kw*dw]``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
        Input batch.
    weight : ndarray, shape (F, C, KH, KW)
        Filters.
    bias : ndarray, shape (F,), optional
        Added to every output position of each filter.
    stride : int or (int, int), default 1
        Step between windows, ``(sh, sw)``.
    padding : int, (int, int) or (int, int, int, int), default 0
        Zero padding: all sides, ``(ph, pw)``, or ``(top, bottom, left, right)``.
    dilation : int or (int, int), default 1
        Spacing between kernel taps, ``(dh, dw)``.
    out : ndarray, shape (N, F, OH, OW), optional
        C-contiguous array of the result dtype to write into (and return).
    n_threads : int, optional
        OpenMP threads: None = all usable cores (honours ``OMP_NUM_THREADS``),
        negative counts back from all cores (-1 = all).

    Returns
    -------
    y : ndarray, shape (N, F, OH, OW)
        ``OH = (H + top + bottom - dh*(KH-1) - 1) // sh + 1`` and likewise ``OW``.
        The dtype follows NumPy promotion of the inputs: float32 stays
        float32, integers and bools compute in float64, float16 in float32.

    Raises
    ------
    TypeError
        Non-array or unsupported dtype (complex, object, str), non-integer
        stride/padding/dilation.
    ValueError
        Wrong ndim, channel mismatch, bias of the wrong length, non-positive
        stride or dilation, negative padding, output size < 1, bad ``out``.

    Notes
    -----
    Each image's output is ``weight.reshape(F, K) @ col`` with the column
    matrix ``col`` of shape (K = C*KH*KW, OH*OW) built tile by tile in a
    per-thread workspace (never for the whole batch). Non-contiguous inputs
    are copied once; inputs are never modified.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    >>> w = np.ones((1, 1, 2, 2))
    >>> fastconv.conv2d(x, w, stride=2)
    array([[[[10., 18.],
             [42., 50.]]]])
    >>> fastconv.conv2d(np.zeros((8, 3, 32, 32), np.float32),
    ...                 np.zeros((16, 3, 3, 3), np.float32), padding=1).shape
    (8, 16, 32, 32)
    """
    x, weight, geometry = _conv_inputs(x, weight, stride, padding, dilation)
    dtypes = [x.dtype, weight.dtype]
    if bias is not None:
        bias = as_array(bias, "bias")
        if bias.shape != (geometry.F,):
            raise ValueError(
                f"bias must have shape ({geometry.F},) to match weight.shape={weight.shape}, "
                f"got bias.shape={bias.shape}"
            )
        dtypes.append(bias.dtype)
    dtype = compute_dtype(*dtypes)
    n_threads = effective_n_threads(n_threads)
    shape = geometry.output_shape
    y = np.empty(shape, dtype) if out is None else _check_out(out, shape, dtype)
    if geometry.N == 0:
        return y

    xc = np.ascontiguousarray(x, dtype=dtype)
    w2d = np.ascontiguousarray(weight, dtype=dtype).reshape(geometry.F, -1)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    if out is not None and any(np.may_share_memory(out, a) for a in (xc, w2d, b) if a is not None):
        raise ValueError("out must not overlap x, weight or bias")
    tiles, scratch = _plan_and_workspace(geometry, dtype, n_threads)
    with single_threaded_blas:
        _conv.forward(xc, w2d, b, y.reshape(geometry.N, geometry.F, -1), scratch, geometry,
                      tiles.images_per_tile, tiles.tile_p, n_threads)
    return y


def conv2d_backward(
    grad_output: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    *,
    n_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`conv2d` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_output : ndarray, shape (N, F, OH, OW)
        Gradient of the loss with respect to the convolution's output.
    x : ndarray, shape (N, C, H, W)
        The forward pass's input.
    weight : ndarray, shape (F, C, KH, KW)
        The forward pass's filters.
    stride, padding, dilation
        As given to :func:`conv2d`.
    n_threads : int, optional
        As in :func:`conv2d`.

    Returns
    -------
    grad_x : ndarray, shape (N, C, H, W)
        ``col2im(weight.reshape(F, K).T @ dY)`` per image: the full
        convolution of dY with the 180-degree-rotated kernel.
    grad_weight : ndarray, shape (F, C, KH, KW)
        ``sum_n dY[n] @ col[n].T``.
    grad_bias : ndarray, shape (F,)
        ``grad_output.sum(axis=(0, 2, 3))``.

    Raises
    ------
    TypeError, ValueError
        As :func:`conv2d`, and when ``grad_output`` does not have the shape
        of the forward output.

    Notes
    -----
    The column tiles are recomputed rather than kept from the forward pass,
    grad_weight is summed per thread and reduced at the end, and grad_x is
    split by (image, channel block) so that col2im never races.

    Examples
    --------
    >>> import numpy as np
    >>> import fastconv
    >>> x = np.ones((2, 1, 3, 3))
    >>> w = np.ones((1, 1, 2, 2))
    >>> dy = np.ones((2, 1, 2, 2))
    >>> dx, dw, db = fastconv.conv2d_backward(dy, x, w)
    >>> dx[0, 0]
    array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]])
    >>> dw[0, 0], db
    (array([[8., 8.],
           [8., 8.]]), array([8.]))
    """
    x, weight, geometry = _conv_inputs(x, weight, stride, padding, dilation)
    grad_output = as_array(grad_output, "grad_output")
    if grad_output.shape != geometry.output_shape:
        raise ValueError(
            f"grad_output must have the forward output's shape {geometry.output_shape} "
            f"(x.shape={x.shape}, weight.shape={weight.shape}), got {grad_output.shape}"
        )
    dtype = compute_dtype(grad_output.dtype, x.dtype, weight.dtype)
    n_threads = effective_n_threads(n_threads)
    N, F = geometry.N, geometry.F
    K = geometry.C * geometry.KH * geometry.KW
    grad_x = np.empty(geometry.input_shape, dtype)
    # grad_weight and grad_bias are reduced together from one buffer of F*K + F
    weight_and_bias = np.empty(F * K + F, dtype)
    grad_weight = weight_and_bias[: F * K].reshape(geometry.weight_shape)
    grad_bias = weight_and_bias[F * K:]
    if N == 0:
        weight_and_bias.fill(0)
        return grad_x, grad_weight, grad_bias

    xc = np.ascontiguousarray(x, dtype=dtype)
    w2d = np.ascontiguousarray(weight, dtype=dtype).reshape(F, K)
    dy = np.ascontiguousarray(grad_output, dtype=dtype).reshape(N, F, -1)
    tiles, scratch = _plan_and_workspace(geometry, dtype, n_threads)
    partial = workspace("partial", dtype, n_threads * (F * K + F)).reshape(n_threads, F * K + F)
    with single_threaded_blas:
        _conv.backward_weight(xc, dy, partial, scratch, geometry, tiles.images_per_tile,
                              tiles.tile_p, n_threads)
        _conv.reduce_rows(partial, weight_and_bias, n_threads)
        _conv.backward_input(w2d, dy, grad_x, scratch, geometry, tiles.images_per_tile,
                             tiles.tile_p, tiles.c_block, n_threads)
    return grad_x, grad_weight, grad_bias


def _seed_geometry(shape, filter_h, filter_w, stride, pad, x_name) -> ConvGeometry:
    """Geometry of the seeds' im2col/col2im (no dilation, one pseudo-filter)."""
    for value, name in ((filter_h, "filter_h"), (filter_w, "filter_w")):
        if as_int(value, name) < 1:
            raise ValueError(f"{name} must be positive, got {value!r}")
    return conv_geometry(shape, (1, shape[1], int(filter_h), int(filter_w)), stride, pad, 1,
                         x_name=x_name, padding_name="pad",
                         kernel_desc=f"filter_h={int(filter_h)}, filter_w={int(filter_w)}")


def im2col(
    input_data: np.ndarray,
    filter_h: int,
    filter_w: int,
    stride: IntPair = 1,
    pad: Padding = 0,
    *,
    n_threads: int | None = None,
) -> np.ndarray:
    """Unfold windows into rows, in the seeds' layout (drop-in for the book's ``im2col``).

    Parameters
    ----------
    input_data : ndarray, shape (N, C, H, W)
    filter_h, filter_w : int
        Window size.
    stride : int or (int, int), default 1
    pad : int, (int, int) or (top, bottom, left, right), default 0
        Zero padding.
    n_threads : int, optional
        As in :func:`conv2d`.

    Returns
    -------
    col : ndarray, shape (N*OH*OW, C*filter_h*filter_w)
        Row ``(n, oh, ow)`` holds the window at that output position, channel
        major then kernel row then kernel column. float32 and float64 inputs
        keep their dtype; others are converted as in :func:`conv2d`.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import im2col
    >>> x = np.arange(9.0).reshape(1, 1, 3, 3)
    >>> im2col(x, 2, 2)
    array([[0., 1., 3., 4.],
           [1., 2., 4., 5.],
           [3., 4., 6., 7.],
           [4., 5., 7., 8.]])
    """
    x = as_array(input_data, "input_data")
    check_ndim(x, 4, "input_data", "(N, C, H, W)")
    geometry = _seed_geometry(x.shape, filter_h, filter_w, stride, pad, "input_data")
    dtype = compute_dtype(x.dtype)
    n_threads = effective_n_threads(n_threads)
    K = geometry.C * geometry.KH * geometry.KW
    col = np.empty((geometry.N * geometry.OH * geometry.OW, K), dtype)
    if col.size:
        _im2col.im2col_rows(np.ascontiguousarray(x, dtype=dtype), col, geometry, n_threads)
    return col


def col2im(
    col: np.ndarray,
    input_shape,
    filter_h: int,
    filter_w: int,
    stride: IntPair = 1,
    pad: Padding = 0,
    *,
    n_threads: int | None = None,
) -> np.ndarray:
    """Fold rows back into images, summing overlaps: the adjoint of :func:`im2col`.

    Parameters
    ----------
    col : ndarray, shape (N*OH*OW, C*filter_h*filter_w)
    input_shape : tuple of 4 ints
        ``(N, C, H, W)`` of the image the columns came from.
    filter_h, filter_w, stride, pad, n_threads
        As in :func:`im2col`.

    Returns
    -------
    img : ndarray, shape input_shape
        Same dtype as ``col`` (float32 or float64; others are converted as in
        :func:`conv2d`); the padding is cropped away.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import col2im
    >>> col2im(np.ones((4, 4)), (1, 1, 3, 3), 2, 2)
    array([[[[1., 2., 1.],
             [2., 4., 2.],
             [1., 2., 1.]]]])
    """
    col = as_array(col, "col")
    check_ndim(col, 2, "col", "(N*OH*OW, C*filter_h*filter_w)")
    input_shape = as_shape(input_shape, "input_shape", 4)
    geometry = _seed_geometry(input_shape, filter_h, filter_w, stride, pad, "input_shape")
    expected = (geometry.N * geometry.OH * geometry.OW, geometry.C * geometry.KH * geometry.KW)
    if col.shape != expected:
        raise ValueError(
            f"col must have shape {expected} for input_shape={input_shape}, "
            f"filter {geometry.KH}x{geometry.KW}, got col.shape={col.shape}"
        )
    dtype = compute_dtype(col.dtype)
    n_threads = effective_n_threads(n_threads)
    img = np.empty(input_shape, dtype)
    if img.size:
        _im2col.col2im_rows(np.ascontiguousarray(col, dtype=dtype), img, geometry, n_threads)
    return img
