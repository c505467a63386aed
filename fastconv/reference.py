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
  ``(top, bottom, left, right)``, and the padding strings ``'valid'``,
  ``'same'`` (TensorFlow's rule, also for stride > 1) and ``'full'``;
* pads with zeros or, like PyTorch's ``nn.Conv2d(padding_mode=...)``, with a
  reflected, replicated or circular border, whose gradient is folded back
  onto the pixels the border copied;
* has grouped (and depthwise) convolution, an NHWC layout, and the transposed
  convolution, which is the adjoint of ``conv2d`` with respect to its input;
* raises ``ValueError`` instead of returning empty or mis-shaped arrays when
  the dilated kernel does not fit into the padded input.

Layouts. The public ``im2col`` (the seeds' contract, also ``fastconv.im2col``)
returns ``(N*OH*OW, C*KH*KW)``, rows ordered ``(n, oh, ow)`` and columns
``(c, kh, kw)``, so ``col @ weight.reshape(F, -1).T`` is the output in NHWC
order. The convolutions use the same unrolled values in Caffe's per-image
order, ``(N, C*KH*KW, OH*OW)``: then with ``groups`` the rows of group ``g``
are one contiguous block, and ``y[n, g] = W[g] @ col[n, g]`` is one batched
matrix product that is already NCHW, with no transposed copy of the (large)
column matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fastconv._validation import as_int, as_pair, as_padding, as_positive_pair, conv_output_size

__all__ = ["im2col", "col2im", "conv2d", "conv2d_backward", "conv2d_input_grad_full",
           "conv_transpose2d", "conv_transpose2d_backward"]

#: ``padding_mode`` (PyTorch's names) -> the ``np.pad`` mode that builds that border.
_NUMPY_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                    "circular": "wrap"}
_LAYOUTS = ("NCHW", "NHWC")


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


def _unfold(padded, KH, KW, stride, dilation, OH, OW):
    """Every receptive field of an already padded batch, as ``(N, C, KH, KW, OH, OW)``.

    Plane ``[:, :, kh, kw]`` holds ``padded[n, c, oh*sh + kh*dh, ow*sw + kw*dw]``.
    """
    N, C = padded.shape[:2]
    (sh, sw), (dh, dw) = stride, dilation
    # np.empty is safe: the loop below writes every (y, x) plane exactly once.
    col = np.empty((N, C, KH, KW, OH, OW), dtype=padded.dtype)
    for y in range(KH):
        y0 = y * dh
        for x in range(KW):
            x0 = x * dw
            # The last tap y0 + sh*(OH-1) is inside the padded image by the
            # definition of OH, so each slice has exactly OH x OW elements.
            col[:, :, y, x, :, :] = padded[:, :, y0:y0 + sh * OH:sh, x0:x0 + sw * OW:sw]
    return col


def _fold(col, padded_hw, stride, dilation):
    """Adjoint of :func:`_unfold`: scatter-add ``(N, C, KH, KW, OH, OW)`` onto a zero
    image of the padded size ``padded_hw``."""
    N, C, KH, KW, OH, OW = col.shape
    (sh, sw), (dh, dw) = stride, dilation
    # As in the book, the buffer is stride - 1 larger than the padded image, so
    # a slice end y0 + sh*OH may run past the last tap without numpy clipping it.
    img = np.zeros((N, C, padded_hw[0] + sh - 1, padded_hw[1] + sw - 1), dtype=col.dtype)
    for y in range(KH):
        y0 = y * dh
        for x in range(KW):
            x0 = x * dw
            # += and not =: windows overlap when stride < dilated kernel size.
            img[:, :, y0:y0 + sh * OH:sh, x0:x0 + sw * OW:sw] += col[:, :, y, x, :, :]
    return img[:, :, :padded_hw[0], :padded_hw[1]]


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
    col = _unfold(img, KH, KW, (sh, sw), (dh, dw), OH, OW)
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
    img = _fold(col, (H + top + bottom, W + left + right), (sh, sw), (dh, dw))
    # A fresh array, not a view that keeps the padded buffer alive.
    return np.ascontiguousarray(img[:, :, top:top + H, left:left + W])


# ---------------------------------------------------------------------------
# Convolution arguments: padding strings, padding modes, groups, layouts
# ---------------------------------------------------------------------------

class _ConvShape(NamedTuple):
    """The sizes of one ``conv2d`` (NCHW), every argument normalised and checked."""

    N: int
    C: int
    H: int
    W: int
    F: int
    KH: int
    KW: int
    stride: tuple
    dilation: tuple
    pads: tuple          # (top, bottom, left, right)
    groups: int
    padding_mode: str
    OH: int
    OW: int

    @property
    def padded_hw(self):
        top, bottom, left, right = self.pads
        return (self.H + top + bottom, self.W + left + right)


def _resolve_padding(padding, size, kernel, stride, dilation):
    """``padding`` as ``(top, bottom, left, right)``; strings are resolved against ``size``.

    Worked out here rather than with ``fastconv._validation.resolve_string_padding``:
    the oracle must not share the code it checks, or one bug would pass as correct.
    """
    if not isinstance(padding, str):
        return as_padding(padding)
    key = padding.lower()            # TensorFlow spells them 'SAME' and 'VALID'
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        span = d * (k - 1)           # how far the last tap of a window is from its first
        if key == "valid":
            pads += [0, 0]
        elif key == "full":
            pads += [span, span]     # every window that overlaps the input at all
        elif key == "same":
            out = -(-n // s)         # ceil(n / s) outputs, TensorFlow's rule for any stride
            total = max((out - 1) * s + span + 1 - n, 0)
            pads += [total // 2, total - total // 2]   # the odd pixel goes bottom/right
        else:
            raise ValueError(f"padding={padding!r} is not one of 'valid', 'same', 'full' "
                             "(or an int or a tuple of ints)")
    return tuple(pads)


def _check_4d(arr, name, layout="NCHW"):
    if arr.ndim != 4:
        raise ValueError(f"{name} must be 4-D {layout}, got shape {arr.shape}")


def _to_nchw(arr, layout, name):
    """An NHWC argument viewed as NCHW (the reference only ever computes in NCHW)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    arr = np.asarray(arr)
    _check_4d(arr, name, layout)
    return arr.transpose(0, 3, 1, 2) if layout == "NHWC" else arr


def _from_nchw(arr, layout):
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1) if layout == "NHWC" else arr)


def _conv_shape(x_shape, w_shape, stride, padding, dilation, groups, padding_mode):
    """Check every argument of ``conv2d`` and compute the output size."""
    N, C, H, W = (int(s) for s in x_shape)
    F, CW, KH, KW = (int(s) for s in w_shape)
    stride = as_positive_pair(stride, "stride")
    dilation = as_positive_pair(dilation, "dilation")
    groups = as_int(groups, "groups")
    if min(C, H, W, F, CW, KH, KW) < 1:
        raise ValueError(f"only the batch may be empty, got x.shape={tuple(x_shape)}, "
                         f"weight.shape={tuple(w_shape)}")
    if padding_mode not in _NUMPY_PAD_MODES:
        raise ValueError(f"padding_mode must be one of 'zeros', 'reflect', 'replicate', "
                         f"'circular', got {padding_mode!r}")
    if groups < 1 or C % groups or F % groups:
        raise ValueError(f"groups={groups} must be positive and divide both the input "
                         f"channels C={C} and the filters F={F} (x.shape={tuple(x_shape)}, "
                         f"weight.shape={tuple(w_shape)})")
    if C != CW * groups:
        expects = (f"{CW}" if groups == 1
                   else f"groups * C/groups = {groups} * {CW} = {CW * groups}")
        raise ValueError(f"x has {C} channels but weight expects {expects} "
                         f"(x.shape={tuple(x_shape)}, weight.shape={tuple(w_shape)})")
    pads = _resolve_padding(padding, (H, W), (KH, KW), stride, dilation)
    top, bottom, left, right = pads
    # PyTorch's limits: np.pad would happily reflect or wrap more than once,
    # nn.Conv2d refuses (reflect needs pad < size, circular pad <= size).
    for pad, size, side in ((top, H, "top"), (bottom, H, "bottom"),
                            (left, W, "left"), (right, W, "right")):
        if (padding_mode == "reflect" and pad >= size) or (padding_mode == "circular"
                                                           and pad > size):
            limit = "smaller than" if padding_mode == "reflect" else "at most"
            raise ValueError(f"padding_mode={padding_mode!r} needs each padding {limit} the "
                             f"input size: {side} padding {pad} vs size {size} (padding "
                             f"(top, bottom, left, right)={pads}, x.shape={tuple(x_shape)})")
    OH = conv_output_size(H, KH, stride[0], top, bottom, dilation[0])
    OW = conv_output_size(W, KW, stride[1], left, right, dilation[1])
    if OH < 1 or OW < 1:
        raise ValueError(
            f"output size would be {OH}x{OW} (< 1): input {H}x{W} with padding "
            f"(top, bottom, left, right)={pads} is smaller than the dilated kernel "
            f"{dilation[0] * (KH - 1) + 1}x{dilation[1] * (KW - 1) + 1}"
        )
    return _ConvShape(N, C, H, W, F, KH, KW, stride, dilation, pads, groups, padding_mode,
                      OH, OW)


def _pad(x, g):
    """``x`` with its border: PyTorch's padding modes are exactly these ``np.pad`` modes."""
    top, bottom, left, right = g.pads
    return np.pad(x, [(0, 0), (0, 0), (top, bottom), (left, right)],
                  mode=_NUMPY_PAD_MODES[g.padding_mode])


def _source_index(size, before, after, padding_mode):
    """For each position of an axis padded by ``(before, after)`` with a reflect,
    replicate or circular border: the input index whose value it holds.

    Padding ``np.arange`` with the very ``np.pad`` mode of the forward pass
    makes the map agree with :func:`_pad` by construction.
    """
    return np.pad(np.arange(size), (before, after), mode=_NUMPY_PAD_MODES[padding_mode])


def _unpad(grad_padded, g):
    """Adjoint of :func:`_pad`: every padded pixel's gradient goes to the pixel it copied."""
    top, bottom, left, right = g.pads
    if g.padding_mode == "zeros":
        # Zeros copy nothing, so the adjoint is the crop.
        return np.ascontiguousarray(grad_padded[:, :, top:top + g.H, left:left + g.W])
    rows = _source_index(g.H, top, bottom, g.padding_mode)
    cols = _source_index(g.W, left, right, g.padding_mode)
    grad_x = np.zeros(grad_padded.shape[:2] + (g.H, g.W), dtype=grad_padded.dtype)
    # add.at, not +=: several border pixels copy the same input pixel, and
    # fancy-index += would keep only one of their gradients.
    np.add.at(grad_x, (slice(None), slice(None), rows[:, None], cols[None, :]), grad_padded)
    return grad_x


def _group_columns(x, g):
    """The unrolled padded input in Caffe's layout, split by group: ``(N, G, Kg, OH*OW)``.

    ``Kg = C/G * KH * KW``; rows are ``(c, kh, kw)`` within the group, which is
    how ``weight[f].ravel()`` is ordered.
    """
    col = _unfold(_pad(x, g), g.KH, g.KW, g.stride, g.dilation, g.OH, g.OW)
    # Sizes spelled out, not -1: N may be 0.
    return col.reshape(g.N, g.groups, g.C // g.groups * g.KH * g.KW, g.OH * g.OW)


def _group_weight(weight, groups):
    """``weight`` (F, C/G, KH, KW) as one ``(F/G, Kg)`` matrix per group: ``(G, F/G, Kg)``."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           padding_mode="zeros", layout="NCHW"):
    """2-D cross-correlation of a batch (what deep learning calls convolution).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), or (N, H, W, C) with ``layout="NHWC"``
    weight : ndarray, shape (F, C/groups, KH, KW)
        In both layouts.
    bias : ndarray, shape (F,), optional
    stride : int or (int, int), default 1
    padding : int, (ph, pw), (top, bottom, left, right) or str, default 0
        ``'valid'`` (none), ``'full'`` (``d*(k-1)`` on each side) or
        ``'same'``: TensorFlow's rule, also for stride > 1 (see Notes).
        Upper-case spellings are accepted.
    dilation : int or (int, int), default 1
    groups : int, default 1
        ``C`` and ``F`` are split into ``groups`` equal parts; filter ``f``
        sees only the input channels of group ``f // (F/groups)``.
        ``groups == C`` is a depthwise convolution.
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}, default 'zeros'
        What the padding holds, as PyTorch's ``nn.Conv2d``: zeros, the
        mirror image without the edge pixel, the edge pixel, or the opposite
        side's pixels.
    layout : {'NCHW', 'NHWC'}, default 'NCHW'
        Layout of ``x`` and of the result.

    Returns
    -------
    y : ndarray, shape (N, F, OH, OW), or (N, OH, OW, F) with ``layout="NHWC"``
        ``y[n, f, i, j] = bias[f] + sum_{c,kh,kw} weight[f, c, kh, kw] *
        padded_x[n, G(f)*C/groups + c, i*sh + kh*dh, j*sw + kw*dw]`` with
        ``G(f) = f // (F/groups)``, in dtype ``np.result_type(x, weight)``.

    Raises
    ------
    ValueError
        If the channel counts or ``groups`` do not fit, the output would be
        empty, ``padding``, ``padding_mode`` or ``layout`` is unknown, or a
        reflect (circular) padding is not smaller than (at most) the input.

    Notes
    -----
    ``OH = (H + top + bottom - dh*(KH - 1) - 1) // sh + 1``, likewise ``OW``.
    ``'same'`` gives ``OH = ceil(H / sh)`` with a total padding of
    ``max((OH - 1)*sh + dh*(KH - 1) + 1 - H, 0)``, ``top = total // 2`` and
    the odd pixel at the bottom (likewise left/right).

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> x = np.arange(9.0).reshape(1, 1, 3, 3)
    >>> w = np.ones((1, 1, 2, 2))    # sums each 2x2 window
    >>> reference.conv2d(x, w, bias=np.array([0.5]))
    array([[[[ 8.5, 12.5],
             [20.5, 24.5]]]])
    >>> reference.conv2d(x, w, padding="same", padding_mode="replicate")[0, 0]
    array([[ 8., 12., 14.],
           [20., 24., 26.],
           [26., 30., 32.]])
    """
    x = _to_nchw(x, layout, "x")
    weight = np.asarray(weight)
    _check_4d(weight, "weight")
    dtype = np.result_type(x, weight)
    g = _conv_shape(x.shape, weight.shape, stride, padding, dilation, groups, padding_mode)

    col = _group_columns(x.astype(dtype, copy=False), g)             # (N, G, Kg, P)
    w = _group_weight(weight.astype(dtype, copy=False), g.groups)    # (G, F/G, Kg)
    # y[n, g] = w[g] @ col[n, g]: matmul broadcasts w over the batch, and the
    # (N, G, F/G, P) result is NCHW because f = g*(F/G) + f_in_group.
    out = np.matmul(w, col).reshape(g.N, g.F, g.OH, g.OW)
    if bias is not None:
        # In place, so a float64 bias cannot promote a float32 result.
        out += np.asarray(bias).reshape(-1, 1, 1)
    return _from_nchw(out, layout)


def conv2d_backward(grad_output, x, weight, stride=1, padding=0, dilation=1, groups=1,
                    padding_mode="zeros", layout="NCHW"):
    """Gradients of :func:`conv2d` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_output : ndarray, shape (N, F, OH, OW), or (N, OH, OW, F) with ``layout="NHWC"``
        ``dL/dy``.
    x : ndarray, shape (N, C, H, W), or (N, H, W, C) with ``layout="NHWC"``
        The forward input.
    weight : ndarray, shape (F, C/groups, KH, KW)
    stride, padding, dilation, groups, padding_mode, layout
        As for the forward call (string padding is resolved against ``x``).

    Returns
    -------
    grad_x : ndarray, shape of ``x`` (in ``layout``)
    grad_weight : ndarray, shape (F, C/groups, KH, KW)
    grad_bias : ndarray, shape (F,)
        All in dtype ``np.result_type(grad_output, x, weight)``.

    Raises
    ------
    ValueError
        If ``grad_output`` does not have the forward output's shape, or for
        any argument :func:`conv2d` rejects.

    Notes
    -----
    With ``col = im2col(x)`` and ``dout = grad_output`` as an
    ``(N*OH*OW, F)`` matrix, the forward is ``y = col @ W2d.T + b``, so
    ``dW2d = dout.T @ col``, ``db = dout.sum(0)`` and
    ``dx = col2im(dout @ W2d)``; with groups, the same per group. With a
    reflect, replicate or circular ``padding_mode``, ``col2im`` gives the
    gradient of the padded input, and each border pixel's gradient is then
    added to the input pixel it is a copy of.

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
    grad_output = _to_nchw(grad_output, layout, "grad_output")
    x = _to_nchw(x, layout, "x")
    weight = np.asarray(weight)
    _check_4d(weight, "weight")
    dtype = np.result_type(grad_output, x, weight)
    grad_output, x, weight = (a.astype(dtype, copy=False) for a in (grad_output, x, weight))
    g = _conv_shape(x.shape, weight.shape, stride, padding, dilation, groups, padding_mode)
    if grad_output.shape != (g.N, g.F, g.OH, g.OW):
        raise ValueError(f"grad_output has shape {grad_output.shape} but the forward output "
                         f"has shape {(g.N, g.F, g.OH, g.OW)}")

    col = _group_columns(x, g)                                       # (N, G, Kg, P)
    w = _group_weight(weight, g.groups)                              # (G, F/G, Kg)
    dout = grad_output.reshape(g.N, g.groups, g.F // g.groups, g.OH * g.OW)  # (N, G, F/G, P)

    grad_bias = grad_output.sum(axis=(0, 2, 3))
    # dW[g] = sum_n dout[n, g] @ col[n, g].T
    grad_weight = np.matmul(dout, col.swapaxes(-1, -2)).sum(axis=0).reshape(weight.shape)
    # dcol[n, g] = W[g].T @ dout[n, g], then col2im onto the padded input ...
    dcol = np.matmul(w.swapaxes(-1, -2), dout)                       # (N, G, Kg, P)
    dcol = dcol.reshape(g.N, g.C, g.KH, g.KW, g.OH, g.OW)
    grad_padded = _fold(dcol, g.padded_hw, g.stride, g.dilation)
    # ... and from the padded input back to x through the border.
    grad_x = _unpad(grad_padded, g)
    return _from_nchw(grad_x, layout), np.ascontiguousarray(grad_weight), grad_bias


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


# ---------------------------------------------------------------------------
# Transposed convolution
#
# conv_transpose2d(x, w) is the adjoint of x -> conv2d(x, w) with the same
# stride, padding, dilation and groups: the weight (C_in, C_out/G, KH, KW) is
# that conv2d's (F, C/G, KH, KW), mapping C_out channels to C_in. So its
# forward is conv2d's input gradient: per group one GEMM W[g].T @ x[n, g]
# gives the column matrix, and col2im scatters it onto a canvas. PyTorch's
# output_padding adds rows/columns at the bottom/right of the canvas before
# the padding is cropped; they only receive what would have been cropped.
# ---------------------------------------------------------------------------

class _TransposedShape(NamedTuple):
    """The sizes of one ``conv_transpose2d``, every argument normalised and checked."""

    N: int
    C_in: int
    H: int
    W: int
    C_out: int
    KH: int
    KW: int
    stride: tuple
    dilation: tuple
    pads: tuple              # (top, bottom, left, right), cropped from the canvas
    output_padding: tuple
    groups: int
    canvas_hw: tuple         # what col2im fills: (H-1)*s + d*(k-1) + 1
    OH: int
    OW: int


def _transposed_shape(x_shape, w_shape, stride, padding, output_padding, groups, dilation):
    """Check every argument of ``conv_transpose2d`` and compute the output size."""
    N, C_in, H, W = (int(s) for s in x_shape)
    CW, C_out_g, KH, KW = (int(s) for s in w_shape)
    stride = as_positive_pair(stride, "stride")
    dilation = as_positive_pair(dilation, "dilation")
    groups = as_int(groups, "groups")
    if min(C_in, H, W, C_out_g, KH, KW) < 1:
        raise ValueError(f"only the batch may be empty, got x.shape={tuple(x_shape)}, "
                         f"weight.shape={tuple(w_shape)}")
    if isinstance(padding, str):
        # 'same' and friends are defined by the output size of a forward conv;
        # PyTorch's conv_transpose2d has no string padding either.
        raise ValueError(f"padding={padding!r}: conv_transpose2d takes an int, (ph, pw) or "
                         "(top, bottom, left, right), not a padding string")
    pads = as_padding(padding)
    output_padding = as_pair(output_padding, "output_padding")
    for op, s, d in zip(output_padding, stride, dilation):
        # PyTorch's rule: more would add rows that no input pixel can reach.
        if not 0 <= op < max(s, d):
            raise ValueError(f"output_padding={output_padding} must be non-negative and "
                             f"smaller than max(stride, dilation) on each axis (stride="
                             f"{stride}, dilation={dilation})")
    if groups < 1 or C_in % groups:
        raise ValueError(f"groups={groups} must be positive and divide the input channels "
                         f"C_in={C_in} (x.shape={tuple(x_shape)}, weight.shape={tuple(w_shape)})")
    if CW != C_in:
        raise ValueError(f"x has {C_in} channels but weight expects {CW} (weight is "
                         f"(C_in, C_out/groups, KH, KW); x.shape={tuple(x_shape)}, "
                         f"weight.shape={tuple(w_shape)})")
    canvas_hw = ((H - 1) * stride[0] + dilation[0] * (KH - 1) + 1,
                 (W - 1) * stride[1] + dilation[1] * (KW - 1) + 1)
    top, bottom, left, right = pads
    OH = canvas_hw[0] + output_padding[0] - top - bottom
    OW = canvas_hw[1] + output_padding[1] - left - right
    if OH < 1 or OW < 1:
        raise ValueError(f"output size would be {OH}x{OW} (< 1): padding (top, bottom, left, "
                         f"right)={pads} crops more than the {canvas_hw[0]}x{canvas_hw[1]} "
                         f"the transposed convolution produces (x.shape={tuple(x_shape)}, "
                         f"weight.shape={tuple(w_shape)})")
    return _TransposedShape(N, C_in, H, W, C_out_g * groups, KH, KW, stride, dilation, pads,
                            output_padding, groups, canvas_hw, OH, OW)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """Transposed 2-D convolution (a.k.a. fractionally strided or "deconvolution").

    The adjoint of :func:`conv2d` with respect to its input:
    ``<conv2d(u, weight, ...), x> == <u, conv_transpose2d(x, weight, ...)>``
    for the same stride, padding, dilation and groups.

    Parameters
    ----------
    x : ndarray, shape (N, C_in, H, W)
    weight : ndarray, shape (C_in, C_out/groups, KH, KW)
        PyTorch's layout: the first axis is the input channels.
    bias : ndarray, shape (C_out,), optional
    stride : int or (int, int), default 1
    padding : int, (ph, pw) or (top, bottom, left, right), default 0
        Rows and columns cropped from each side of the full result (strings
        are not accepted).
    output_padding : int or (int, int), default 0
        Extra rows (columns) at the bottom (right); must be smaller than
        ``max(stride, dilation)`` on each axis.
    groups : int, default 1
        Must divide ``C_in``; input channels of group ``g`` feed output
        channels ``[g*C_out/groups, (g+1)*C_out/groups)``.
    dilation : int or (int, int), default 1

    Returns
    -------
    y : ndarray, shape (N, C_out, OH, OW)
        In dtype ``np.result_type(x, weight)``.

    Raises
    ------
    ValueError
        If the channel counts or ``groups`` do not fit, ``padding`` is a
        string, ``output_padding`` is too large, or the output would be empty.

    Notes
    -----
    ``OH = (H - 1)*sh - top - bottom + dh*(KH - 1) + output_padding_h + 1``
    (with symmetric padding ``p``: ``(H - 1)*s - 2p + d*(k - 1) + op + 1``).
    Input pixel ``(i, j)`` adds ``x[n, c, i, j] * weight[c, :, kh, kw]`` at
    ``(i*sh + kh*dh - top, j*sw + kw*dw - left)`` of the output: the columns
    ``W[g].T @ x[n, g]`` folded by ``col2im``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    >>> w = np.ones((1, 1, 2, 2))    # each pixel spreads over a 2x2 block
    >>> reference.conv_transpose2d(x, w)
    array([[[[ 1.,  3.,  2.],
             [ 4., 10.,  6.],
             [ 3.,  7.,  4.]]]])
    >>> reference.conv_transpose2d(x, w, stride=2).shape
    (1, 1, 4, 4)
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    _check_4d(x, "x")
    _check_4d(weight, "weight")
    dtype = np.result_type(x, weight)
    x, weight = (a.astype(dtype, copy=False) for a in (x, weight))
    t = _transposed_shape(x.shape, weight.shape, stride, padding, output_padding, groups,
                          dilation)
    G = t.groups

    xg = x.reshape(t.N, G, t.C_in // G, t.H * t.W)                  # (N, G, C_in/G, P)
    w = weight.reshape(G, t.C_in // G, t.C_out // G * t.KH * t.KW)   # (G, C_in/G, Kg)
    # As conv2d_backward's dcol: col[n, g] = W[g].T @ x[n, g], rows (c_out, kh, kw).
    col = np.matmul(w.swapaxes(-1, -2), xg)                          # (N, G, Kg, P)
    col = col.reshape(t.N, t.C_out, t.KH, t.KW, t.H, t.W)
    canvas = _fold(col, t.canvas_hw, t.stride, t.dilation)
    # output_padding extends the canvas at the bottom/right, padding crops it.
    top, bottom, left, right = t.pads
    canvas = np.pad(canvas, [(0, 0), (0, 0), (0, t.output_padding[0]),
                             (0, t.output_padding[1])])
    out = np.ascontiguousarray(canvas[:, :, top:top + t.OH, left:left + t.OW])
    if bias is not None:
        # In place, so a float64 bias cannot promote a float32 result.
        out += np.asarray(bias).reshape(-1, 1, 1)
    return out


def conv_transpose2d_backward(grad_output, x, weight, stride=1, padding=0, output_padding=0,
                              groups=1, dilation=1):
    """Gradients of :func:`conv_transpose2d` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_output : ndarray, shape (N, C_out, OH, OW)
        ``dL/dy``.
    x : ndarray, shape (N, C_in, H, W)
        The forward input.
    weight : ndarray, shape (C_in, C_out/groups, KH, KW)
    stride, padding, output_padding, groups, dilation
        As for the forward call.

    Returns
    -------
    grad_x : ndarray, shape (N, C_in, H, W)
    grad_weight : ndarray, shape (C_in, C_out/groups, KH, KW)
    grad_bias : ndarray, shape (C_out,)
        ``grad_output`` summed over ``(0, 2, 3)``. All in dtype
        ``np.result_type(grad_output, x, weight)``.

    Raises
    ------
    ValueError
        If ``grad_output`` does not have the forward output's shape, or for
        any argument :func:`conv_transpose2d` rejects.

    Notes
    -----
    The forward is ``crop(col2im(W.T @ x))``, so ``dL/dx = W @ im2col(pad(dy))``
    and ``dL/dW = x @ im2col(pad(dy)).T`` per group: ``grad_x`` is
    ``conv2d(grad_output, weight)`` with the same stride, padding, dilation
    and groups (the output padding rows are simply not read).

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.normal(size=(2, 4, 3, 3)), rng.normal(size=(4, 3, 4, 4))
    >>> dy = rng.normal(size=reference.conv_transpose2d(x, w, stride=2, padding=1).shape)
    >>> gx, gw, gb = reference.conv_transpose2d_backward(dy, x, w, stride=2, padding=1)
    >>> bool(np.allclose(gx, reference.conv2d(dy, w, stride=2, padding=1)))
    True
    >>> gw.shape, gb.shape
    ((4, 3, 4, 4), (3,))
    """
    grad_output, x, weight = (np.asarray(a) for a in (grad_output, x, weight))
    for arr, name in ((grad_output, "grad_output"), (x, "x"), (weight, "weight")):
        _check_4d(arr, name)
    dtype = np.result_type(grad_output, x, weight)
    grad_output, x, weight = (a.astype(dtype, copy=False) for a in (grad_output, x, weight))
    t = _transposed_shape(x.shape, weight.shape, stride, padding, output_padding, groups,
                          dilation)
    if grad_output.shape != (t.N, t.C_out, t.OH, t.OW):
        raise ValueError(f"grad_output has shape {grad_output.shape} but the forward output "
                         f"has shape {(t.N, t.C_out, t.OH, t.OW)}")
    G = t.groups

    # Adjoint of the crop: dy back on the zero canvas; of the output padding:
    # drop those rows again. Then the canvas unrolls to exactly H x W windows.
    top, bottom, left, right = t.pads
    canvas = np.pad(grad_output, [(0, 0), (0, 0), (top, bottom), (left, right)])
    canvas = canvas[:, :, :t.canvas_hw[0], :t.canvas_hw[1]]
    col = _unfold(canvas, t.KH, t.KW, t.stride, t.dilation, t.H, t.W)
    col = col.reshape(t.N, G, t.C_out // G * t.KH * t.KW, t.H * t.W)  # (N, G, Kg, P)
    xg = x.reshape(t.N, G, t.C_in // G, t.H * t.W)                  # (N, G, C_in/G, P)
    w = weight.reshape(G, t.C_in // G, t.C_out // G * t.KH * t.KW)   # (G, C_in/G, Kg)

    grad_bias = grad_output.sum(axis=(0, 2, 3))
    grad_x = np.matmul(w, col).reshape(x.shape)
    grad_weight = np.matmul(xg, col.swapaxes(-1, -2)).sum(axis=0).reshape(weight.shape)
    return grad_x, np.ascontiguousarray(grad_weight), grad_bias


# ---------------------------------------------------------------------------
# Pooling and activations
#
# The seeds' pooling layer (the book's ``Pooling``): im2col every window into
# one row, take ``max``/``argmax`` (or the mean) of each row, and scatter the
# gradient back with col2im. Two bugs of the book's version are fixed here:
#
# * its output size ``1 + (H - pool_h) / stride`` ignores the padding, so any
#   pad > 0 produced wrongly shaped (or crashing) reshapes;
# * its im2col pads with zeros, so a window of negative inputs touching the
#   border returned 0 from max pooling. Max pooling must pad with -inf.
#
# On top of that these functions follow PyTorch: stride defaults to the kernel
# size, ``ceil_mode``, ``count_include_pad`` and dilation (max only).
# ---------------------------------------------------------------------------

from fastconv._validation import compute_dtype, pool_geometry  # noqa: E402

__all__ += ["max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
            "global_avg_pool2d", "global_avg_pool2d_backward", "relu", "relu_backward"]


def _pool_columns(x, g, fill, *, planes=None):
    """One row per window, ``(planes*OH*OW, KH*KW)``, of ``x`` padded with ``fill``.

    Each (n, c) plane is treated as a one-channel image, so rows come out in
    ``(n, c, oh, ow)`` order and ``row.reshape(N, C, OH, OW)`` is NCHW. Beyond
    the symmetric padding, ``ceil_mode`` windows may hang past the bottom and
    right edges: the padded image is extended there with ``fill`` too (such
    taps are never inputs and never padding).
    """
    x = np.asarray(x)
    planes = g.N * g.C if planes is None else planes
    span_h = g.dilation_h * (g.KH - 1) + 1
    span_w = g.dilation_w * (g.KW - 1) + 1
    extra_h = max((g.OH - 1) * g.stride_h + span_h - (g.H + 2 * g.pad_h), 0)
    extra_w = max((g.OW - 1) * g.stride_w + span_w - (g.W + 2 * g.pad_w), 0)
    padded = np.pad(x.reshape(planes, 1, g.H, g.W),
                    [(0, 0), (0, 0), (g.pad_h, g.pad_h + extra_h), (g.pad_w, g.pad_w + extra_w)],
                    mode="constant", constant_values=fill)
    return im2col(padded, g.KH, g.KW, (g.stride_h, g.stride_w), 0,
                  (g.dilation_h, g.dilation_w))


def _fold_columns(dcol, g):
    """col2im of window rows back to the padded planes, cropped to (N, C, H, W)."""
    span_h = g.dilation_h * (g.KH - 1) + 1
    span_w = g.dilation_w * (g.KW - 1) + 1
    Hp = max(g.H + 2 * g.pad_h, (g.OH - 1) * g.stride_h + span_h)
    Wp = max(g.W + 2 * g.pad_w, (g.OW - 1) * g.stride_w + span_w)
    padded = col2im(dcol, (g.N * g.C, 1, Hp, Wp), g.KH, g.KW, (g.stride_h, g.stride_w), 0,
                    (g.dilation_h, g.dilation_w))
    grad_x = padded[:, 0, g.pad_h:g.pad_h + g.H, g.pad_w:g.pad_w + g.W]
    return np.ascontiguousarray(grad_x).reshape(g.N, g.C, g.H, g.W)


def _inside(g, H_extent, W_extent, offset_h, offset_w):
    """Window rows of a one-plane mask: True where the tap is inside the given extent.

    The extent is ``H_extent x W_extent`` starting ``offset`` into the padded
    image (the input: offset = padding; the padded input: offset 0).
    """
    span_h = g.dilation_h * (g.KH - 1) + 1
    span_w = g.dilation_w * (g.KW - 1) + 1
    Hp = max(g.H + 2 * g.pad_h, (g.OH - 1) * g.stride_h + span_h)
    Wp = max(g.W + 2 * g.pad_w, (g.OW - 1) * g.stride_w + span_w)
    mask = np.zeros((1, 1, Hp, Wp), dtype=bool)
    mask[0, 0, offset_h:offset_h + H_extent, offset_w:offset_w + W_extent] = True
    return im2col(mask, g.KH, g.KW, (g.stride_h, g.stride_w), 0, (g.dilation_h, g.dilation_w))


def _max_taps(x, g):
    """Output, and the argmax tap ``kh*KW + kw`` of every window (-1: no input in it)."""
    col = _pool_columns(x, g, -np.inf)                        # (planes*OH*OW, KH*KW)
    valid = np.tile(_inside(g, g.H, g.W, g.pad_h, g.pad_w), (g.N * g.C, 1))
    y = col.max(axis=1)                                       # NaN if the window has one
    # PyTorch's scan keeps the first tap that reaches the maximum, but the
    # *last* NaN; padding (-inf) never counts, even when the inputs are -inf.
    first_max = np.argmax((col == y[:, None]) & valid, axis=1)
    nan = np.isnan(col)
    last_nan = col.shape[1] - 1 - np.argmax(nan[:, ::-1], axis=1)
    tap = np.where(np.isnan(y), last_nan, first_max)
    tap[~valid.any(axis=1)] = -1
    return y, tap


def _taps_to_indices(tap, g):
    """Window taps -> flat positions ``ih*W + iw`` in the input plane (-1 stays -1)."""
    oh = np.arange(g.OH).reshape(1, -1, 1)
    ow = np.arange(g.OW).reshape(1, 1, -1)
    tap = tap.reshape(g.N * g.C, g.OH, g.OW)
    ih = oh * g.stride_h - g.pad_h + (tap // g.KW) * g.dilation_h
    iw = ow * g.stride_w - g.pad_w + (tap % g.KW) * g.dilation_w
    return np.where(tap < 0, -1, ih * g.W + iw).astype(np.int64)


def _indices_to_taps(indices, g):
    """Inverse of :func:`_taps_to_indices` for positions inside their windows."""
    oh = np.arange(g.OH).reshape(1, -1, 1)
    ow = np.arange(g.OW).reshape(1, 1, -1)
    indices = np.asarray(indices).reshape(g.N * g.C, g.OH, g.OW)
    kh = (indices // g.W - (oh * g.stride_h - g.pad_h)) // g.dilation_h
    kw = (indices % g.W - (ow * g.stride_w - g.pad_w)) // g.dilation_w
    return np.where(indices < 0, -1, kh * g.KW + kw).reshape(-1)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max pooling with PyTorch's semantics, the seeds' im2col way.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel_size, stride, padding, dilation, ceil_mode, return_indices
        As :func:`fastconv.max_pool2d` (stride None = kernel_size; padding is
        symmetric, at most half the kernel, and acts as -inf).

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW)
    indices : ndarray of int64, only with ``return_indices``
        Flat positions ``ih*W + iw`` of the maxima in their input planes.

    Notes
    -----
    Each window is one row of ``im2col`` of the (-inf padded) planes;
    ``y`` is the row maximum. Ties go to the first tap, a NaN wins (the last
    NaN's tap is reported, like PyTorch's CPU kernel).

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> x = -np.arange(1.0, 10.0).reshape(1, 1, 3, 3)      # all negative
    >>> reference.max_pool2d(x, 2, stride=2, padding=1)    # padding never wins
    array([[[[-1., -2.],
             [-4., -5.]]]])
    """
    x = np.asarray(x)
    g = pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    x = x.astype(compute_dtype(x.dtype), copy=False)
    y, tap = _max_taps(x, g)
    y = y.reshape(g.output_shape)
    return (y, _taps_to_indices(tap, g).reshape(g.output_shape)) if return_indices else y


def max_pool2d_backward(grad_output, x, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False, indices=None):
    """Gradient of :func:`max_pool2d`: each output's gradient goes to its argmax.

    The book's backward: a zero matrix with one row per window gets the
    gradient at the argmax tap, and col2im folds it back (overlapping windows
    add up). ``indices`` (from ``return_indices=True``) replaces the argmax
    search when given.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> x = np.array([[[[1., 3.], [2., 0.]]]])
    >>> reference.max_pool2d_backward(np.ones((1, 1, 1, 1)), x, 2)
    array([[[[0., 1.],
             [0., 0.]]]])
    """
    x = np.asarray(x)
    grad_output = np.asarray(grad_output)
    g = pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    if grad_output.shape != g.output_shape:
        raise ValueError(f"grad_output has shape {grad_output.shape} but the forward output "
                         f"has shape {g.output_shape}")
    dtype = compute_dtype(grad_output.dtype, x.dtype)
    if indices is None:
        _, tap = _max_taps(x.astype(dtype, copy=False), g)
    else:
        tap = _indices_to_taps(indices, g)
    rows = np.flatnonzero(tap >= 0)
    dcol = np.zeros((tap.size, g.KH * g.KW), dtype=dtype)
    dcol[rows, tap[rows]] = grad_output.reshape(-1)[rows]
    return _fold_columns(dcol, g)


def _avg_divisor(g, count_include_pad):
    """PyTorch's divisor per window (one plane's worth, ``(OH*OW,)``)."""
    if count_include_pad:
        # the window's area inside the padded input: ceil_mode overhang excluded
        inside = _inside(g, g.H + 2 * g.pad_h, g.W + 2 * g.pad_w, 0, 0)
    else:
        inside = _inside(g, g.H, g.W, g.pad_h, g.pad_w)
    return inside.sum(axis=1)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """Average pooling with PyTorch's semantics, the seeds' im2col way.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel_size, stride, padding, ceil_mode, count_include_pad
        As :func:`fastconv.avg_pool2d`.

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW)

    Notes
    -----
    Row sums of ``im2col`` of the zero-padded planes, divided by the count of
    a boolean mask's taps: ones over the padded input (``count_include_pad``)
    or over the input only.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> reference.avg_pool2d(np.ones((1, 1, 3, 3)), 2, ceil_mode=True,
    ...                      count_include_pad=False)
    array([[[[1., 1.],
             [1., 1.]]]])
    """
    x = np.asarray(x)
    g = pool_geometry(x.shape, kernel_size, stride, padding, 1, ceil_mode)
    x = x.astype(compute_dtype(x.dtype), copy=False)
    col = _pool_columns(x, g, 0)
    divisor = np.tile(_avg_divisor(g, count_include_pad), g.N * g.C)
    return (col.sum(axis=1) / divisor).astype(x.dtype, copy=False).reshape(g.output_shape)


def avg_pool2d_backward(grad_output, x, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True):
    """Gradient of :func:`avg_pool2d`: ``grad / divisor`` to every tap, folded by col2im.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> reference.avg_pool2d_backward(np.ones((1, 1, 1, 1)), np.zeros((1, 1, 2, 2)), 2)
    array([[[[0.25, 0.25],
             [0.25, 0.25]]]])
    """
    x = np.asarray(x)
    grad_output = np.asarray(grad_output)
    g = pool_geometry(x.shape, kernel_size, stride, padding, 1, ceil_mode)
    if grad_output.shape != g.output_shape:
        raise ValueError(f"grad_output has shape {grad_output.shape} but the forward output "
                         f"has shape {g.output_shape}")
    dtype = compute_dtype(grad_output.dtype, x.dtype)
    divisor = np.tile(_avg_divisor(g, count_include_pad), g.N * g.C)
    share = (grad_output.reshape(-1) / divisor).astype(dtype, copy=False)
    dcol = np.repeat(share[:, None], g.KH * g.KW, axis=1)
    return _fold_columns(dcol, g)


def global_avg_pool2d(x, keepdims=False):
    """Mean of every (n, c) plane: shape (N, C), or (N, C, 1, 1) with ``keepdims``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> reference.global_avg_pool2d(np.arange(8.0).reshape(1, 2, 2, 2))
    array([[1.5, 5.5]])
    """
    x = np.asarray(x)
    x = x.astype(compute_dtype(x.dtype), copy=False)
    return x.mean(axis=(2, 3), keepdims=keepdims)


def global_avg_pool2d_backward(grad_output, x):
    """Gradient of :func:`global_avg_pool2d`: ``grad / (H*W)`` on every element of the plane.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> reference.global_avg_pool2d_backward(np.array([[2.0]]), np.zeros((1, 1, 1, 2)))
    array([[[[1., 1.]]]])
    """
    x = np.asarray(x)
    N, C, H, W = x.shape
    grad_output = np.asarray(grad_output).reshape(N, C, 1, 1)
    dtype = compute_dtype(grad_output.dtype, x.dtype)
    return np.broadcast_to(grad_output / (H * W), x.shape).astype(dtype)


def relu(x):
    """``max(x, 0)`` elementwise; NaN propagates (``np.maximum`` keeps NaN).

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> reference.relu(np.array([-1.0, 0.5, np.nan]))
    array([0. , 0.5, nan])
    """
    x = np.asarray(x)
    x = x.astype(compute_dtype(x.dtype), copy=False)
    return np.maximum(x, 0)


def relu_backward(grad_output, x):
    """``grad_output`` where ``x > 0``, else 0 (zero at x = 0 and at NaN).

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import reference
    >>> reference.relu_backward(np.ones(3), np.array([-1.0, 0.0, 2.0]))
    array([0., 0., 1.])
    """
    grad_output = np.asarray(grad_output)
    x = np.asarray(x)
    dtype = compute_dtype(grad_output.dtype, x.dtype)
    return np.where(x > 0, grad_output, 0).astype(dtype)
