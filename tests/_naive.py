"""Obviously-correct (and slow) oracles for the tests: keep shapes tiny.

* :func:`naive_conv2d` and :func:`naive_im2col` are the definition of the
  convolution written as loops over output positions (seed 002's style), with
  their own output-size computation so a bug in ``conv_output_size`` cannot
  hide in both the oracle and the code under test. ``naive_conv2d`` also has
  groups, padding strings and padding modes, each worked out here from its
  definition (the border by index arithmetic, not ``np.pad``'s modes).
* :func:`naive_conv_transpose2d` is PyTorch's definition of the transposed
  convolution as a gather: output pixel ``o`` sums the input pixels ``i``
  and taps ``k`` with ``i*s + k*d - pad == o`` (the reference scatters).
* :func:`numerical_gradients` is central finite differences of
  ``L = sum(conv2d(x, w, b) * grad_output)`` (or of any other forward).
* :func:`seed_im2col` / :func:`seed_col2im` are the seeds' (and the book's)
  functions copied verbatim, int stride and pad only: the historical contract
  that ``fastconv.im2col`` / ``col2im`` are drop-in replacements for.

Other test modules load this file with ``sys.path.insert(0, <tests dir>)``
followed by ``import _naive`` (pytest's importlib mode does not put tests/ on
``sys.path``).
"""

from __future__ import annotations

import numpy as np

from fastconv import reference
from fastconv._validation import as_padding, as_positive_pair


def _padded_and_sizes(x, KH, KW, stride, padding, dilation):
    sh, sw = as_positive_pair(stride, "stride")
    dh, dw = as_positive_pair(dilation, "dilation")
    top, bottom, left, right = as_padding(padding)
    xp = np.pad(np.asarray(x, dtype=np.float64), [(0, 0), (0, 0), (top, bottom), (left, right)])
    span_h, span_w = dh * (KH - 1) + 1, dw * (KW - 1) + 1
    # Count the window positions that fit, rather than trusting a formula.
    OH = len(range(0, xp.shape[2] - span_h + 1, sh))
    OW = len(range(0, xp.shape[3] - span_w + 1, sw))
    if OH < 1 or OW < 1:
        raise ValueError(f"empty output {OH}x{OW}")
    return xp, (sh, sw), (dh, dw), (span_h, span_w), (OH, OW)


def _naive_source(i, size, mode):
    """The input index that padded position ``i`` (``-pad <= i < size + pad``) holds,
    or None for a zero. One reflection/wrap at most (PyTorch's limits)."""
    if 0 <= i < size:
        return i
    if mode == "zeros":
        return None
    if mode == "replicate":
        return 0 if i < 0 else size - 1
    if mode == "reflect":             # mirror about the edge pixel, which is not repeated
        return -i if i < 0 else 2 * (size - 1) - i
    if mode == "circular":
        return i % size
    raise ValueError(f"unknown padding_mode {mode!r}")


def _naive_pad(x, pads, mode):
    """``x`` (float64) with its border, one padded pixel at a time."""
    top, bottom, left, right = pads
    N, C, H, W = x.shape
    out = np.zeros((N, C, H + top + bottom, W + left + right))
    for i in range(-top, H + bottom):
        for j in range(-left, W + right):
            si, sj = _naive_source(i, H, mode), _naive_source(j, W, mode)
            if si is not None and sj is not None:
                out[:, :, i + top, j + left] = x[:, :, si, sj]
    return out


def _naive_string_padding(padding, size, kernel, stride, dilation):
    """'valid' / 'full' / 'same' as ``(top, bottom, left, right)``, by search for 'same'.

    'same' wants ``ceil(size / stride)`` outputs (counted as the number of
    strided positions in the input) from the least total padding, the odd
    pixel at the bottom/right: the smallest ``t`` whose window count reaches it.
    """
    key = padding.lower()
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        span = d * (k - 1) + 1
        if key == "valid":
            pads += [0, 0]
        elif key == "full":
            pads += [span - 1, span - 1]
        elif key == "same":
            wanted = len(range(0, n, s))
            t = 0
            while len(range(0, n + t - span + 1, s)) < wanted:
                t += 1
            pads += [t // 2, t - t // 2]
        else:
            raise ValueError(f"unknown padding string {padding!r}")
    return tuple(pads)


def naive_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros"):
    """Loop definition of conv2d; accumulates in float64, returns ``result_type(x, weight)``.

    Filter ``f`` sees the ``C/groups`` input channels of group ``f // (F/groups)``.
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    F, Cg, KH, KW = weight.shape
    N, C, H, W = x.shape
    sh, sw = as_positive_pair(stride, "stride")
    dh, dw = as_positive_pair(dilation, "dilation")
    if isinstance(padding, str):
        pads = _naive_string_padding(padding, (H, W), (KH, KW), (sh, sw), (dh, dw))
    else:
        pads = as_padding(padding)
    assert C == Cg * groups and F % groups == 0, (x.shape, weight.shape, groups)
    xp = _naive_pad(np.asarray(x, dtype=np.float64), pads, padding_mode)
    span_h, span_w = dh * (KH - 1) + 1, dw * (KW - 1) + 1
    # Count the window positions that fit, rather than trusting a formula.
    OH = len(range(0, xp.shape[2] - span_h + 1, sh))
    OW = len(range(0, xp.shape[3] - span_w + 1, sw))
    if OH < 1 or OW < 1:
        raise ValueError(f"empty output {OH}x{OW}")
    w64 = weight.astype(np.float64)
    b64 = np.zeros(F) if bias is None else np.asarray(bias, dtype=np.float64)
    filters_per_group = F // groups

    out = np.zeros((N, F, OH, OW))
    for n in range(N):
        for f in range(F):
            c0 = (f // filters_per_group) * Cg          # first input channel of f's group
            for oh in range(OH):
                for ow in range(OW):
                    i, j = oh * sh, ow * sw
                    window = xp[n, c0:c0 + Cg, i:i + span_h:dh, j:j + span_w:dw]  # (Cg, KH, KW)
                    out[n, f, oh, ow] = np.sum(window * w64[f]) + b64[f]
    return out.astype(np.result_type(x, weight))


def naive_conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0,
                           groups=1, dilation=1):
    """Loop definition of PyTorch's conv_transpose2d, gathered per output pixel.

    ``y[n, co, oh, ow] = b[co] + sum x[n, ci, ih, iw] * weight[ci, co % Cog, kh, kw]``
    over the ``ci`` of ``co``'s group and all ``(ih, kh)``, ``(iw, kw)`` with
    ``ih*sh + kh*dh - top == oh`` and ``iw*sw + kw*dw - left == ow``.
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    N, C_in, H, W = x.shape
    _, Cog, KH, KW = weight.shape
    sh, sw = as_positive_pair(stride, "stride")
    dh, dw = as_positive_pair(dilation, "dilation")
    oph, opw = (output_padding, output_padding) if np.isscalar(output_padding) \
        else tuple(output_padding)
    top, bottom, left, right = as_padding(padding)
    # PyTorch's documented output size.
    OH = (H - 1) * sh - top - bottom + dh * (KH - 1) + oph + 1
    OW = (W - 1) * sw - left - right + dw * (KW - 1) + opw + 1
    Cig = C_in // groups
    x64, w64 = x.astype(np.float64), weight.astype(np.float64)
    b64 = np.zeros(Cog * groups) if bias is None else np.asarray(bias, dtype=np.float64)

    out = np.zeros((N, Cog * groups, OH, OW))
    for co in range(Cog * groups):
        g, cog = divmod(co, Cog)
        for oh in range(OH):
            for ow in range(OW):
                total = b64[co] * np.ones(N)
                for kh in range(KH):
                    ih, rem_h = divmod(oh + top - kh * dh, sh)
                    if rem_h or not 0 <= ih < H:
                        continue
                    for kw in range(KW):
                        iw, rem_w = divmod(ow + left - kw * dw, sw)
                        if rem_w or not 0 <= iw < W:
                            continue
                        cis = slice(g * Cig, (g + 1) * Cig)
                        total += x64[:, cis, ih, iw] @ w64[cis, cog, kh, kw]
                out[:, co, oh, ow] = total
    return out.astype(np.result_type(x, weight))


def naive_im2col(x, filter_h, filter_w, stride=1, pad=0, dilation=1):
    """Loop definition of the column layout: row ``(n, oh, ow)`` is the flattened ``(c, kh, kw)`` window."""
    x = np.asarray(x)
    N = x.shape[0]
    xp, (sh, sw), (dh, dw), (span_h, span_w), (OH, OW) = _padded_and_sizes(
        x, filter_h, filter_w, stride, pad, dilation)
    rows = []
    for n in range(N):
        for oh in range(OH):
            for ow in range(OW):
                i, j = oh * sh, ow * sw
                rows.append(xp[n, :, i:i + span_h:dh, j:j + span_w:dw].ravel())
    return np.array(rows).astype(x.dtype)


def numerical_gradients(x, weight, bias, grad_output, stride=1, padding=0, dilation=1, eps=1e-6,
                        *, forward=None, **options):
    """Central differences of ``sum(forward(x, w, b, ...) * grad_output)``, in float64.

    ``forward`` defaults to ``reference.conv2d``; it is called as
    ``forward(x, w, b, stride=..., padding=..., dilation=..., **options)``
    (``options``: groups, padding_mode, output_padding, ...), so
    ``reference.conv_transpose2d`` works too. Returns ``(gx, gw, gb)``; a
    ``bias`` of None is treated as zeros (the bias gradient does not depend on
    the bias value), with as many entries as ``grad_output`` has channels.
    """
    forward = reference.conv2d if forward is None else forward
    x = np.array(x, dtype=np.float64)
    weight = np.array(weight, dtype=np.float64)
    g = np.asarray(grad_output, dtype=np.float64)
    bias = np.zeros(g.shape[1]) if bias is None else np.array(bias, dtype=np.float64)

    def loss():
        return np.sum(forward(x, weight, bias, stride=stride, padding=padding,
                              dilation=dilation, **options) * g)

    grads = []
    for arr in (x, weight, bias):
        grad = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            saved = arr[idx]
            arr[idx] = saved + eps
            plus = loss()
            arr[idx] = saved - eps
            minus = loss()
            arr[idx] = saved
            grad[idx] = (plus - minus) / (2 * eps)
        grads.append(grad)
    return tuple(grads)


# --- verbatim seed code below (float64 buffers and all) ----------------------

def seed_im2col(input_data, filter_h, filter_w, stride=1, pad=0):
    """Seed 003's im2col (the book's, with the buffer axes ordered (N, C, OH, OW, FH, FW))."""
    N, C, H, W = input_data.shape
    out_h = (H + 2*pad - filter_h)//stride + 1
    out_w = (W + 2*pad - filter_w)//stride + 1

    img = np.pad(input_data, [(0,0), (0,0), (pad, pad), (pad, pad)], 'constant')
    col = np.zeros((N, C, out_h, out_w, filter_h, filter_w))

    for y in range(filter_h):
        y_max = y + stride*out_h
        for x in range(filter_w):
            x_max = x + stride*out_w
            col[:, :, :, :, y, x] = img[:, :, y:y_max:stride, x:x_max:stride]

    col = col.transpose(0, 2, 3, 1, 4, 5).reshape(N*out_h*out_w, -1)
    return col


def seed_col2im(col, input_shape, filter_h, filter_w, stride=1, pad=0):
    """The book's col2im (common/util.py)."""
    N, C, H, W = input_shape
    out_h = (H + 2*pad - filter_h)//stride + 1
    out_w = (W + 2*pad - filter_w)//stride + 1
    col = col.reshape(N, out_h, out_w, C, filter_h, filter_w).transpose(0, 3, 4, 5, 1, 2)

    img = np.zeros((N, C, H + 2*pad + stride - 1, W + 2*pad + stride - 1))
    for y in range(filter_h):
        y_max = y + stride*out_h
        for x in range(filter_w):
            x_max = x + stride*out_w
            img[:, :, y:y_max:stride, x:x_max:stride] += col[:, :, y, x, :, :]

    return img[:, :, pad:H + pad, pad:W + pad]


def seed_convolution_class(im2col, col2im):
    """Seed 000's ``Convolution`` layer verbatim (seed 003's forward is the same), over the
    given ``im2col``/``col2im``: the seeds' own, or fastconv's for the one-import drop-in."""

    class Convolution:
        def __init__(self, W, b, stride=1, pad=0):
            self.W = W
            self.b = b
            self.stride = stride # 步长
            self.pad = pad # 填充

            # 中间数据（backward时使用）
            self.x = None
            self.col = None
            self.col_W = None

            # 权重和偏置参数的梯度
            self.dW = None
            self.db = None

        def forward(self, x):
            FN, C, FH, FW = self.W.shape # filter里面其实就是权重
            N, C, H, W = x.shape
            out_h = 1 + int((H + 2*self.pad - FH) / self.stride)
            out_w = 1 + int((W + 2*self.pad - FW) / self.stride)

            col = im2col(x, FH, FW, self.stride, self.pad)
            col_W = self.W.reshape(FN, -1).T

            out = np.dot(col, col_W) + self.b
            out = out.reshape(N, out_h, out_w, -1).transpose(0, 3, 1, 2)

            self.x = x
            self.col = col
            self.col_W = col_W

            return out

        def backward(self, dout):
            FN, C, FH, FW = self.W.shape
            dout = dout.transpose(0,2,3,1).reshape(-1, FN)

            self.db = np.sum(dout, axis=0) # 偏置的梯度
            self.dW = np.dot(self.col.T, dout)
            self.dW = self.dW.transpose(1, 0).reshape(FN, C, FH, FW)

            dcol = np.dot(dout, self.col_W.T) # x的梯度：dout点乘W^T
            dx = col2im(dcol, self.x.shape, FH, FW, self.stride, self.pad) # col2im是im2col的逆操作

            return dx

    return Convolution
