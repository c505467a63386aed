"""Pure-NumPy reference convolution: the oracle the compiled kernels are tested against.

This module is written to be read, not to be fast. It follows the seed
algorithm (Saito, *Deep Learning from Scratch*, ch. 7): ``im2col`` unrolls
every receptive field into one row of a matrix, the convolution is then a
single matrix product with the flattened filters, and the backward pass is the
transposed product followed by ``col2im``, the exact adjoint of ``im2col``.

The only Python loops run over the ``KH x KW`` kernel offsets: for one offset
``(y, x)`` the pixels it touches in every output position form one strided
slice of the padded image, so a whole plane of the column matrix is copied at
once (darknet's ``im2col_cpu`` does the same walk one element at a time).

Compared with the seed code this version

* keeps the input dtype (the seed's ``np.zeros`` buffers silently made
  everything float64);
* accepts a stride and dilation per axis and asymmetric padding
  ``(top, bottom, left, right)``;
* raises ``ValueError`` instead of returning empty or mis-shaped arrays when
  the dilated kernel does not fit into the padded input.

Layout (the seeds', also the public ``fastconv.im2col`` contract): the column
matrix has shape ``(N*OH*OW, C*KH*KW)``, rows ordered ``(n, oh, ow)`` and
columns ``(c, kh, kw)``, so ``col @ weight.reshape(F, -1).T`` is the output in
NHWC order.
"""

from __future__ import annotations

import numpy as np

from fastconv._validation import as_padding, as_positive_pair, conv_output_size

__all__ = ["im2col", "col2im", "conv2d", "conv2d_backward", "conv2d_input_grad_full"]


def _geometry(input_shape, filter_h, filter_w, stride, pad, dilation):
    """Normalise the arguments shared by im2col/col2im and compute OH, OW."""
    N, C, H, W = (int(s) for s in input_shape)
    KH, KW = as_positive_pair((filter_h, filter_w), "(filter_h, filter_w)")
    sh, sw = as_positive_pair(stride, "stride")
    dh, dw = as_positive_pair(dilation, "dilation")
    top, bottom, left, right = as_padding(pad, "pad")
    OH = conv_output_size(H, KH, sh, top, bottom, dh)
    OW = conv_output_size(W, KW, sw, left, right, dw)
    if OH < 1 or OW < 1:
        raise ValueError(
            f"output size would be {OH}x{OW} (< 1): input {H}x{W} with padding "
            f"(top, bottom, left, right)={(top, bottom, left, right)} is smaller than the "
            f"dilated kernel {dh * (KH - 1) + 1}x{dw * (KW - 1) + 1}"
        )
    return N, C, H, W, KH, KW, sh, sw, dh, dw, (top, bottom, left, right), OH, OW


def im2col(input_data, filter_h, filter_w, stride=1, pad=0, dilation=1):
    """Unroll every receptive field of a batch of images into one row.

    Parameters
    ----------
    input_data : ndarray, shape (N, C, H, W)
    filter_h, filter_w : int
        Kernel height and width.
    stride : int or (int, int), default 1
    pad : int, (ph, pw) or (top, bottom, left, right), default 0
        Zero padding.
    dilation : int or (int, int), default 1

    Returns
    -------
    col : ndarray, shape (N*OH*OW, C*filter_h*filter_w)
        Rows ordered ``(n, oh, ow)``, columns ``(c, kh, kw)``; same dtype as
        ``input_data``.

    Raises
    ------
    ValueError
        If the output would be empty (OH or OW < 1).

    Notes
    -----
    ``OH = (H + top + bottom - dh*(filter_h - 1) - 1) // sh + 1``, and likewise
    for ``OW``. Row ``(n, oh, ow)`` column ``(c, kh, kw)`` holds
    ``padded[n, c, oh*sh + kh*dh, ow*sw + kw*dw]``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> reference.im2col(x, 2, 2, stride=2)
    array([[ 0.,  1.,  4.,  5.],
           [ 2.,  3.,  6.,  7.],
           [ 8.,  9., 12., 13.],
           [10., 11., 14., 15.]])
    """
    img = np.asarray(input_data)
    N, C, H, W, KH, KW, sh, sw, dh, dw, pads, OH, OW = _geometry(
        img.shape, filter_h, filter_w, stride, pad, dilation)
    top, bottom, left, right = pads
    img = np.pad(img, [(0, 0), (0, 0), (top, bottom), (left, right)], mode="constant")

    # np.empty is safe: the loop below writes every (y, x) plane exactly once.
    col = np.empty((N, C, KH, KW, OH, OW), dtype=img.dtype)
    for y in range(KH):
        y0 = y * dh
        for x in range(KW):
            x0 = x * dw
            # The last tap y0 + sh*(OH-1) is inside the padded image by the
            # definition of OH, so each slice has exactly OH x OW elements.
            col[:, :, y, x, :, :] = img[:, :, y0:y0 + sh * OH:sh, x0:x0 + sw * OW:sw]

    return col.transpose(0, 4, 5, 1, 2, 3).reshape(N * OH * OW, C * KH * KW)


def col2im(col, input_shape, filter_h, filter_w, stride=1, pad=0, dilation=1):
    """Scatter-add the rows of a column matrix back into images (adjoint of :func:`im2col`).

    A pixel covered by several receptive fields receives the sum of all its
    copies, so ``col2im(im2col(x))`` is *not* ``x`` in general; instead
    ``<im2col(x), c> == <x, col2im(c)>`` for every ``x`` and ``c``.

    Parameters
    ----------
    col : ndarray, shape (N*OH*OW, C*filter_h*filter_w)
        Same layout as returned by :func:`im2col`.
    input_shape : tuple of 4 ints
        ``(N, C, H, W)`` of the image that was (or would be) unrolled.
    filter_h, filter_w, stride, pad, dilation
        As for :func:`im2col`.

    Returns
    -------
    img : ndarray, shape (N, C, H, W)
        Same dtype as ``col``; contributions that fall into the padding are
        dropped.

    Raises
    ------
    ValueError
        If the output would be empty or ``col`` has the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> col = np.ones((4, 4))        # 3x3 image, 2x2 kernel, stride 1
    >>> reference.col2im(col, (1, 1, 3, 3), 2, 2)[0, 0]  # how many windows cover each pixel
    array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]])
    """
    col = np.asarray(col)
    N, C, H, W, KH, KW, sh, sw, dh, dw, pads, OH, OW = _geometry(
        input_shape, filter_h, filter_w, stride, pad, dilation)
    top, bottom, left, right = pads
    expected = (N * OH * OW, C * KH * KW)
    if col.shape != expected:
        raise ValueError(
            f"col has shape {col.shape} but input_shape={tuple(input_shape)} with a "
            f"{KH}x{KW} kernel needs {expected} (OH={OH}, OW={OW})"
        )
    col = col.reshape(N, OH, OW, C, KH, KW).transpose(0, 3, 4, 5, 1, 2)

    # As in the book, the buffer is stride - 1 larger than the padded image, so
    # a slice end y0 + sh*OH may run past the last tap without numpy clipping it.
    img = np.zeros((N, C, H + top + bottom + sh - 1, W + left + right + sw - 1), dtype=col.dtype)
    for y in range(KH):
        y0 = y * dh
        for x in range(KW):
            x0 = x * dw
            # += and not =: windows overlap when stride < dilated kernel size.
            img[:, :, y0:y0 + sh * OH:sh, x0:x0 + sw * OW:sw] += col[:, :, y, x, :, :]

    # A fresh array, not a view that keeps the padded buffer alive.
    return np.ascontiguousarray(img[:, :, top:top + H, left:left + W])


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """2-D cross-correlation of a batch (what deep learning calls convolution).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    weight : ndarray, shape (F, C, KH, KW)
    bias : ndarray, shape (F,), optional
    stride : int or (int, int), default 1
    padding : int, (ph, pw) or (top, bottom, left, right), default 0
    dilation : int or (int, int), default 1

    Returns
    -------
    y : ndarray, shape (N, F, OH, OW)
        ``y[n, f, i, j] = bias[f] + sum_{c,kh,kw} weight[f, c, kh, kw] *
        padded_x[n, c, i*sh + kh*dh, j*sw + kw*dw]``, in dtype
        ``np.result_type(x, weight)``.

    Raises
    ------
    ValueError
        If the channel counts differ or the output would be empty.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> x = np.arange(9.0).reshape(1, 1, 3, 3)
    >>> w = np.ones((1, 1, 2, 2))    # sums each 2x2 window
    >>> reference.conv2d(x, w, bias=np.array([0.5]))
    array([[[[ 8.5, 12.5],
             [20.5, 24.5]]]])
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    dtype = np.result_type(x, weight)
    F, CW, KH, KW = weight.shape
    N, C, H, W = x.shape
    if C != CW:
        raise ValueError(f"x has {C} channels but weight expects {CW} "
                         f"(x.shape={x.shape}, weight.shape={weight.shape})")
    *_, OH, OW = _geometry(x.shape, KH, KW, stride, padding, dilation)

    col = im2col(x.astype(dtype, copy=False), KH, KW, stride, padding, dilation)
    out = col @ weight.astype(dtype, copy=False).reshape(F, -1).T   # (N*OH*OW, F)
    if bias is not None:
        # In place, so a float64 bias cannot promote a float32 result.
        out += np.asarray(bias)
    # Rows are (n, oh, ow) and columns f, i.e. NHWC; the API is NCHW.
    return np.ascontiguousarray(out.reshape(N, OH, OW, F).transpose(0, 3, 1, 2))


def conv2d_backward(grad_output, x, weight, stride=1, padding=0, dilation=1):
    """Gradients of :func:`conv2d` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_output : ndarray, shape (N, F, OH, OW)
        ``dL/dy``.
    x : ndarray, shape (N, C, H, W)
        The forward input.
    weight : ndarray, shape (F, C, KH, KW)
    stride, padding, dilation
        As for the forward call.

    Returns
    -------
    grad_x : ndarray, shape (N, C, H, W)
    grad_weight : ndarray, shape (F, C, KH, KW)
    grad_bias : ndarray, shape (F,)
        All in dtype ``np.result_type(grad_output, x, weight)``.

    Raises
    ------
    ValueError
        If ``grad_output`` does not have the forward output's shape.

    Notes
    -----
    With ``col = im2col(x)`` and ``dout = grad_output`` as an
    ``(N*OH*OW, F)`` matrix, the forward is ``y = col @ W2d.T + b``, so
    ``dW2d = dout.T @ col``, ``db = dout.sum(0)`` and
    ``dx = col2im(dout @ W2d)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> x = np.ones((1, 1, 3, 3))
    >>> w = np.ones((1, 1, 2, 2))
    >>> gx, gw, gb = reference.conv2d_backward(np.ones((1, 1, 2, 2)), x, w)
    >>> gx[0, 0]
    array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]])
    >>> gw.shape, gb
    ((1, 1, 2, 2), array([4.]))
    """
    grad_output, x, weight = (np.asarray(a) for a in (grad_output, x, weight))
    dtype = np.result_type(grad_output, x, weight)
    grad_output, x, weight = (a.astype(dtype, copy=False) for a in (grad_output, x, weight))
    F, C, KH, KW = weight.shape
    N = x.shape[0]
    *_, OH, OW = _geometry(x.shape, KH, KW, stride, padding, dilation)
    if grad_output.shape != (N, F, OH, OW):
        raise ValueError(f"grad_output has shape {grad_output.shape} but the forward output "
                         f"has shape {(N, F, OH, OW)}")

    col = im2col(x, KH, KW, stride, padding, dilation)          # (N*OH*OW, C*KH*KW)
    W2d = weight.reshape(F, -1)                                   # (F, C*KH*KW)
    dout = grad_output.transpose(0, 2, 3, 1).reshape(-1, F)       # (N*OH*OW, F)

    grad_bias = dout.sum(axis=0)
    grad_weight = (col.T @ dout).T.reshape(F, C, KH, KW)
    dcol = dout @ W2d
    grad_x = col2im(dcol, x.shape, KH, KW, stride, padding, dilation)
    return grad_x, np.ascontiguousarray(grad_weight), grad_bias


def conv2d_input_grad_full(grad_output, weight, input_shape, padding=0):
    """``dL/dx`` as a full convolution of ``dL/dy`` with the 180-degree-rotated kernel.

    The seeds' second derivation of the input gradient, valid for stride 1 and
    dilation 1 only: pad ``dy`` so that it has height ``H + KH - 1`` and width
    ``W + KW - 1``, then correlate it (valid, stride 1) with
    ``weight[:, :, ::-1, ::-1]`` with input and output channels swapped.

    Parameters
    ----------
    grad_output : ndarray, shape (N, F, OH, OW)
        ``dL/dy`` of a stride-1, dilation-1 :func:`conv2d`.
    weight : ndarray, shape (F, C, KH, KW)
    input_shape : tuple of 4 ints
        ``(N, C, H, W)`` of the forward input.
    padding : int, (ph, pw) or (top, bottom, left, right), default 0
        The forward padding.

    Returns
    -------
    grad_x : ndarray, shape (N, C, H, W)

    Raises
    ------
    ValueError
        If ``grad_output`` is not the shape a stride-1, dilation-1 forward
        produces (this function has no stride or dilation to offer).

    Notes
    -----
    ``dy`` is padded by ``(KH-1-top, H+top-OH, KW-1-left, W+left-OW)``; with
    ``OH = H + top + bottom - KH + 1`` the second entry is ``KH-1-bottom``. A
    forward padding wider than ``K - 1`` makes an entry negative: those output
    rows saw only zeros of ``x`` and are cropped from ``dy`` instead.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(4, 3, 2, 3))
    >>> dy = rng.normal(size=reference.conv2d(x, w, padding=1).shape)
    >>> gx = reference.conv2d_input_grad_full(dy, w, x.shape, padding=1)
    >>> bool(np.allclose(gx, reference.conv2d_backward(dy, x, w, padding=1)[0]))
    True
    """
    grad_output = np.asarray(grad_output)
    weight = np.asarray(weight)
    F, C, KH, KW = weight.shape
    N, CX, H, W = (int(s) for s in input_shape)
    top, bottom, left, right = as_padding(padding)
    OH = conv_output_size(H, KH, 1, top, bottom)
    OW = conv_output_size(W, KW, 1, left, right)
    if CX != C or OH < 1 or OW < 1 or grad_output.shape != (N, F, OH, OW):
        raise ValueError(
            f"grad_output has shape {grad_output.shape}, but a stride-1, dilation-1 conv2d of "
            f"input_shape={tuple(input_shape)} with weight.shape={weight.shape} and padding "
            f"{(top, bottom, left, right)} gives {(N, F, OH, OW)}; the full-convolution "
            "identity only holds for stride 1 and dilation 1"
        )

    # Seed 004's (K-1-pt, HI-HO+pt, K-1-pl, WI-WO+pl), with K split into KH, KW.
    pads = (KH - 1 - top, H + top - OH, KW - 1 - left, W + left - OW)
    dy = np.pad(grad_output, [(0, 0), (0, 0), (max(pads[0], 0), max(pads[1], 0)),
                              (max(pads[2], 0), max(pads[3], 0))])
    Hp, Wp = dy.shape[2:]
    dy = dy[:, :, max(-pads[0], 0):Hp - max(-pads[1], 0), max(-pads[2], 0):Wp - max(-pads[3], 0)]

    w_rot = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)      # (C, F, KH, KW)
    return conv2d(dy, w_rot)
