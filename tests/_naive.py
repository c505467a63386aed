"""Obviously-correct (and slow) oracles for the tests: keep shapes tiny.

* :func:`naive_conv2d` and :func:`naive_im2col` are the definition of the
  convolution written as loops over output positions (seed 002's style), with
  their own output-size computation so a bug in ``conv_output_size`` cannot
  hide in both the oracle and the code under test.
* :func:`numerical_gradients` is central finite differences of
  ``L = sum(conv2d(x, w, b) * grad_output)``.
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


def naive_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """Loop definition of conv2d; accumulates in float64, returns ``result_type(x, weight)``."""
    x = np.asarray(x)
    weight = np.asarray(weight)
    F, C, KH, KW = weight.shape
    N = x.shape[0]
    xp, (sh, sw), (dh, dw), (span_h, span_w), (OH, OW) = _padded_and_sizes(
        x, KH, KW, stride, padding, dilation)
    w64 = weight.astype(np.float64)
    b64 = np.zeros(F) if bias is None else np.asarray(bias, dtype=np.float64)

    out = np.zeros((N, F, OH, OW))
    for n in range(N):
        for f in range(F):
            for oh in range(OH):
                for ow in range(OW):
                    i, j = oh * sh, ow * sw
                    window = xp[n, :, i:i + span_h:dh, j:j + span_w:dw]   # (C, KH, KW)
                    out[n, f, oh, ow] = np.sum(window * w64[f]) + b64[f]
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


def numerical_gradients(x, weight, bias, grad_output, stride=1, padding=0, dilation=1, eps=1e-6):
    """Central differences of ``sum(reference.conv2d(x, w, b) * grad_output)``, in float64.

    Returns ``(gx, gw, gb)``; a ``bias`` of None is treated as zeros (the bias
    gradient does not depend on the bias value).
    """
    x = np.array(x, dtype=np.float64)
    weight = np.array(weight, dtype=np.float64)
    F = weight.shape[0]
    bias = np.zeros(F) if bias is None else np.array(bias, dtype=np.float64)
    g = np.asarray(grad_output, dtype=np.float64)

    def loss():
        return np.sum(reference.conv2d(x, weight, bias, stride, padding, dilation) * g)

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
