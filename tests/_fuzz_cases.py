"""Bad-argument fuzz cases for every public function, and the child-process worker that runs them.

``tests/test_fuzz.py`` runs the cases in child processes (``python -c`` with
this module on ``sys.path``) so that a segfault or a hang fails one test with
the offending case named, instead of killing the pytest run. Parent and child
build the same case list from the same seed: a case is only ever referred to by
its index.

A case is one call of a public function (or layer method) on a small valid
problem with one argument (occasionally two that belong together, such as
``out`` and the ``x`` it overlaps) replaced by a bad value. It passes when the
call raises ``ValueError`` or ``TypeError`` and the message names one of the
case's argument names. An *extreme* case passes a valid but extreme value
(strides, paddings and dilations up to 2**31 - 1, inputs broadcast to enormous
sizes): it may return a result of the right shape, raise ``MemoryError``, or
raise a named ``ValueError``/``TypeError``, but never crash or hang.
"""

from __future__ import annotations

import faulthandler
import json
import math
import re
import sys
from typing import Callable, NamedTuple

import numpy as np

import fastconv

#: The seed of the case list; the tests run every case it generates.
SEED = 20240607
#: Random cases on top of one case per (function, argument, listed value).
N_RANDOM = 150
#: A case still running after this many seconds is a hang (the child is stopped).
CASE_TIMEOUT = 20.0
LARGEST = 2**31 - 1          # fastconv._validation.MAX_SIZE_ARGUMENT


class Case(NamedTuple):
    function: str                    # "conv2d", "Conv2D.forward", ...
    argument: str                    # what was made bad
    label: str                       # repr of the bad value, for the report
    names: tuple[str, ...]           # the message must name one of these
    call: Callable[[], object]
    extreme: bool = False            # a valid but extreme value: see the module docstring


# ---------------------------------------------------------------------------
# A small valid problem for each function, as keyword arguments
# ---------------------------------------------------------------------------

def _arrays():
    rng = np.random.default_rng(0)
    a = {
        "x": rng.standard_normal((2, 3, 7, 7)),
        "w": rng.standard_normal((4, 3, 3, 3)),
        "b": rng.standard_normal(4),
        "dy": rng.standard_normal((2, 4, 5, 5)),
        "xt": rng.standard_normal((2, 4, 5, 5)),        # conv_transpose2d: C_in = 4
        "wt": rng.standard_normal((4, 3, 3, 3)),        # (C_in, C_out, KH, KW)
        "bt": rng.standard_normal(3),
        "dyt": rng.standard_normal((2, 3, 7, 7)),
        "dyp": rng.standard_normal((2, 3, 3, 3)),       # pooling 2x2 of x
        "dyg": rng.standard_normal((2, 3)),
        "col": rng.standard_normal((50, 27)),           # im2col(x, 3, 3)
    }
    a["idx"] = fastconv.max_pool2d(a["x"], 2, return_indices=True)[1]
    return a


A = _arrays()


def _valid_calls():
    """name -> (function, keyword arguments of one valid call)."""
    def layer_forward(make):
        def forward(x):
            return make()(x)
        return forward

    def layer_backward(make, x):
        def backward(dout):
            layer = make()
            layer(x)
            return layer.backward(dout)
        return backward

    conv2d_layer = lambda: fastconv.Conv2D(3, 4, 3, rng=0, dtype=np.float64)  # noqa: E731
    transposed_layer = lambda: fastconv.ConvTranspose2D(4, 3, 3, rng=0)       # noqa: E731
    return {
        "conv2d": (fastconv.conv2d, dict(
            x=A["x"], weight=A["w"], bias=A["b"], stride=1, padding=0, dilation=1, groups=1,
            padding_mode="zeros", layout="NCHW", algorithm="auto", out=None, n_threads=1)),
        "conv2d_backward": (fastconv.conv2d_backward, dict(
            grad_output=A["dy"], x=A["x"], weight=A["w"], stride=1, padding=0, dilation=1,
            groups=1, padding_mode="zeros", layout="NCHW", algorithm="auto", bias=True,
            n_threads=1)),
        "conv_transpose2d": (fastconv.conv_transpose2d, dict(
            x=A["xt"], weight=A["wt"], bias=A["bt"], stride=1, padding=0, output_padding=0,
            groups=1, dilation=1, n_threads=1)),
        "conv_transpose2d_backward": (fastconv.conv_transpose2d_backward, dict(
            grad_output=A["dyt"], x=A["xt"], weight=A["wt"], stride=1, padding=0,
            output_padding=0, groups=1, dilation=1, bias=True, n_threads=1)),
        "im2col": (fastconv.im2col, dict(input_data=A["x"], filter_h=3, filter_w=3, stride=1,
                                         pad=0, n_threads=1)),
        "col2im": (fastconv.col2im, dict(col=A["col"], input_shape=(2, 3, 7, 7), filter_h=3,
                                         filter_w=3, stride=1, pad=0, n_threads=1)),
        "max_pool2d": (fastconv.max_pool2d, dict(
            x=A["x"], kernel_size=2, stride=None, padding=0, dilation=1, ceil_mode=False,
            return_indices=False, n_threads=1)),
        "max_pool2d_backward": (fastconv.max_pool2d_backward, dict(
            grad_output=A["dyp"], x=A["x"], kernel_size=2, stride=None, padding=0, dilation=1,
            ceil_mode=False, indices=A["idx"], n_threads=1)),
        "avg_pool2d": (fastconv.avg_pool2d, dict(
            x=A["x"], kernel_size=2, stride=None, padding=0, ceil_mode=False,
            count_include_pad=True, n_threads=1)),
        "avg_pool2d_backward": (fastconv.avg_pool2d_backward, dict(
            grad_output=A["dyp"], x=A["x"], kernel_size=2, stride=None, padding=0,
            ceil_mode=False, count_include_pad=True, n_threads=1)),
        "global_avg_pool2d": (fastconv.global_avg_pool2d, dict(x=A["x"], keepdims=False,
                                                               n_threads=1)),
        "global_avg_pool2d_backward": (fastconv.global_avg_pool2d_backward, dict(
            grad_output=A["dyg"], x=A["x"], n_threads=1)),
        "relu": (fastconv.relu, dict(x=A["x"], n_threads=1)),
        "relu_backward": (fastconv.relu_backward, dict(grad_output=A["x"], x=A["x"],
                                                       n_threads=1)),
        "Conv2D": (fastconv.Conv2D, dict(
            in_channels=3, out_channels=4, kernel_size=3, stride=1, padding=0, dilation=1,
            groups=1, bias=True, padding_mode="zeros", dtype=np.float32, rng=0, layout="NCHW",
            algorithm="auto", n_threads=1)),
        "Conv2D.from_weights": (fastconv.Conv2D.from_weights, dict(W=A["w"], b=A["b"],
                                                                   stride=1, pad=0)),
        "Conv2D.forward": (layer_forward(conv2d_layer), dict(x=A["x"])),
        "Conv2D.backward": (layer_backward(conv2d_layer, A["x"]), dict(dout=A["dy"])),
        "ConvTranspose2D": (fastconv.ConvTranspose2D, dict(
            in_channels=4, out_channels=3, kernel_size=3, stride=1, padding=0, output_padding=0,
            groups=1, bias=True, dilation=1, dtype=np.float32, rng=0, n_threads=1)),
        "ConvTranspose2D.forward": (layer_forward(transposed_layer), dict(x=A["xt"])),
        "ConvTranspose2D.backward": (layer_backward(transposed_layer, A["xt"]),
                                     dict(dout=A["dyt"])),
        "MaxPool2D": (fastconv.MaxPool2D, dict(kernel_size=2, stride=None, padding=0,
                                               dilation=1, ceil_mode=False, n_threads=1)),
        "MaxPool2D.forward": (layer_forward(lambda: fastconv.MaxPool2D(2)), dict(x=A["x"])),
        "MaxPool2D.backward": (layer_backward(lambda: fastconv.MaxPool2D(2), A["x"]),
                               dict(dout=A["dyp"])),
        "AvgPool2D": (fastconv.AvgPool2D, dict(kernel_size=2, stride=None, padding=0,
                                               ceil_mode=False, count_include_pad=True,
                                               n_threads=1)),
        "AvgPool2D.backward": (layer_backward(lambda: fastconv.AvgPool2D(2), A["x"]),
                               dict(dout=A["dyp"])),
        "ReLU": (fastconv.ReLU, dict(n_threads=1)),
        "ReLU.backward": (layer_backward(fastconv.ReLU, A["x"]), dict(dout=A["x"])),
    }


# ---------------------------------------------------------------------------
# Bad values, by kind of argument
# ---------------------------------------------------------------------------

def _arr(shape, dtype=np.float64):
    return np.ones(shape, dtype)


def _ragged():
    return [[[[1.0, 2.0]], [[1.0]]]]


def _common_array_values(shape, none_ok=False):
    """Values no array argument accepts, whatever its shape (None: unless it means "no bias")."""
    values = ([] if none_ok else [None]) + ["abc", b"abc", {"a": 1}, object(), _ragged(),
              _arr(shape, np.complex128), _arr(shape, object),
              np.full(shape, "a"), np.zeros(shape, "datetime64[s]"),
              np.zeros(shape, "timedelta64[s]"), np.zeros(shape, [("a", "f8")])]
    if np.dtype(np.longdouble).itemsize > 8:
        values.append(_arr(shape, np.longdouble))
    return values


def _wrong_ndim(shape):
    return [_arr(shape[1:]), _arr(shape + (1,)), np.float64(1.0), _arr(())]


def _int_values(rng, *, zero_ok=False):
    """Values no size or step argument accepts: wrong types, bools, NaN, too large."""
    values = [1.5, 2.0, float("nan"), float("inf"), -float("inf"), "2", b"2", True, False,
              None, complex(1, 0), np.float64(2.0), np.float32(1.0), np.bool_(True), {1: 2},
              {1, 2}, object(), 2**31, 2**62, 2**63, 2**64, 2**100,
              int(rng.integers(2**31, 2**62))]
    if not zero_ok:
        values += [0, -1, -int(rng.integers(2, 2**40))]
    return values


def _pair_values(rng):
    return _int_values(rng) + [
        (), (1,), (1, 2, 3), (1, 0), (0, 1), (1, -3), (1, 2.0), (1, "a"), (1, None), (1, True),
        [[1, 1]], np.array([1, 2, 3]), np.array([1.0, 2.0]), np.array([[1, 1], [1, 1]]),
        (1, 2**63), (float("nan"), 1), np.array([1, 0])]


def _padding_values(rng, *, strings_ok=False, four_ok=False):
    values = _int_values(rng, zero_ok=True) + [
        -1, -int(rng.integers(2, 2**40)), (1, 2, 3), (1, 2, 3, 4, 5), (), (1, -1), (1, 2.5),
        ((1, 1), (1, 1)), np.array([1, 2, 3]), b"same", (0, 0, 0, -1), (0, 2**40),
        np.array([[1, 1], [1, 1]]), (1, None)]
    values += ["bogus", "", "Same ", "same\0"] if strings_ok else ["same", "valid", "full"]
    if not four_ok:
        values.append((1, 1, 1, 1))
    return values


def _bool_values():
    return [1, 0, None, "True", 1.0, np.array([True]), [True], 2, "False"]


def _choice_values(valid):
    return ["", None, 1, [valid[0]], (valid[0],), b"x", valid[0].upper() + " ",
            valid[0].swapcase(), "?", object()]


def _n_threads_values(rng):
    return [0, True, False, 1.5, "2", float("nan"), 2**31, 10**6, 2**70, np.float64(2.0),
            [2], complex(2, 0), int(rng.integers(10**5, 10**9)), b"1"]


def _out_values():
    shape = (2, 4, 5, 5)
    read_only = np.zeros(shape)
    read_only.flags.writeable = False
    return [
        ("list", [[0.0]]), ("wrong-shape", np.zeros((2, 4, 5, 4))),
        ("flat", np.zeros(200)), ("float32", np.zeros(shape, np.float32)),
        ("int64", np.zeros(shape, np.int64)), ("strided", np.zeros((2, 4, 5, 10))[..., ::2]),
        ("fortran", np.asfortranarray(np.zeros(shape))), ("read-only", read_only),
        ("broadcast", np.broadcast_to(np.zeros(1), shape)), ("0-d", np.float64(0.0)),
        ("complex", np.zeros(shape, complex))]


def _overlapping_out_cases():
    """(label, overrides) of conv2d calls whose out aliases an input."""
    buffer = np.zeros(400)
    x = buffer[:294].reshape(2, 3, 7, 7)
    x[...] = A["x"]
    out_x = buffer[100:300].reshape(2, 4, 5, 5)
    wbuf = np.zeros(300)
    weight = wbuf[:108].reshape(4, 3, 3, 3)
    weight[...] = A["w"]
    out_w = wbuf[50:250].reshape(2, 4, 5, 5)
    big = np.zeros((2, 3, 7, 14))
    big[..., ::2] = A["x"]
    out_strided = big.reshape(-1)[:200].reshape(2, 4, 5, 5)
    bbuf = np.zeros(200)
    bias = bbuf[:4]
    bias[...] = A["b"]
    return [("out-overlaps-x", dict(x=x, out=out_x)),
            ("out-overlaps-weight", dict(weight=weight, out=out_w)),
            ("out-overlaps-strided-x", dict(x=big[..., ::2], out=out_strided)),
            ("out-overlaps-bias", dict(bias=bias, out=bbuf.reshape(2, 4, 5, 5)))]


def _indices_values():
    shape = (2, 3, 3, 3)
    idx = A["idx"]
    too_big = idx.copy()
    too_big[1, 2, 2, 2] = 49
    minus_two = idx.copy()
    minus_two[0, 0, 0, 0] = -2
    huge = idx.copy()
    huge[0, 1, 0, 1] = 2**40
    wrap_to_minus_one = idx.astype(np.uint64)       # the int64 cast makes it -1
    wrap_to_minus_one[1, 1, 1, 1] = 2**64 - 1
    wrap_to_negative = idx.astype(np.uint64)
    wrap_to_negative[0, 0, 1, 1] = 2**63
    return [("float", idx.astype(np.float64)), ("bool", np.zeros(shape, bool)),
            ("wrong-shape", idx[:, :, :2]), ("3-D", idx[0]), ("list", [1, 2]),
            ("str", np.full(shape, "1")), ("complex", idx.astype(complex)),
            ("value-49", too_big), ("value--2", minus_two), ("value-2**40", huge),
            ("uint64-2**64-1", wrap_to_minus_one), ("uint64-2**63", wrap_to_negative),
            ("object", idx.astype(object)), ("float16", idx.astype(np.float16))]


def _input_shape_values(rng):
    return [(2, 3, 7), (2, 3, 7, 7, 1), (2, 3, -7, 7), (2, 3, 7, 7.0), "abc", 5, None,
            (3, 3, 7, 7), (2, 3, 2**40, 2**40), (2, 3, 7, True), (2**62, 3, 1, 1),
            np.array([2, 3, 7, 7.5]), (2, 3, 2, 2), (2, 4, 7, 7), (2, 0, 7, 7), (2, 3, 0, 7),
            {2, 3, 7}, (2, 3, None, 7), (2, 3, 7, float("nan"))]


def _label(value) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray(shape={value.shape}, dtype={value.dtype}, strides={value.strides})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------
# The case list
# ---------------------------------------------------------------------------

def _argument_values(rng):
    """(function, argument, names, [(label, overrides)]) for every bad argument."""
    x, w, dy = A["x"], A["w"], A["dy"]
    table = []

    def add(function, argument, names, values, overrides=None):
        entries = []
        for v in values:
            if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) \
                    and isinstance(v[1], dict):
                entries.append(v)
            elif isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) \
                    and argument in ("out", "indices"):
                entries.append((v[0], {argument: v[1]}))
            else:
                entries.append((_label(v), {argument: v}))
        table.append((function, argument, names, entries))

    arr = _common_array_values
    conv_like = ("conv2d", "conv2d_backward")
    for f in conv_like:
        add(f, "x", ("x",), arr(x.shape) + _wrong_ndim(x.shape) + [
            _arr((2, 5, 7, 7)), _arr((2, 3, 2, 2)), _arr((2, 3, 0, 7)), _arr((2, 0, 7, 7)),
            np.broadcast_to(np.ones(1, np.int8), (2**31, 2**30, 1, 1))])
        add(f, "weight", ("weight",), arr(w.shape) + _wrong_ndim(w.shape) + [
            _arr((4, 5, 3, 3)), _arr((4, 3, 9, 9)), _arr((4, 3, 8, 1)), _arr((0, 3, 3, 3)),
            _arr((4, 3, 0, 3)), _arr((4, 1, 3, 3))])
        add(f, "stride", ("stride",), _pair_values(rng))
        add(f, "dilation", ("dilation",), _pair_values(rng) + [4, (1, 5)])
        add(f, "padding", ("padding",), _padding_values(rng, strings_ok=True, four_ok=True))
        add(f, "groups", ("groups",), _int_values(rng) + [2, 3, 4, 5, 7])
        add(f, "padding_mode", ("padding_mode",),
            _choice_values(fastconv._validation.PADDING_MODES) + ["wrap", "constant"])
        add(f, "layout", ("layout",), _choice_values(fastconv._validation.LAYOUTS) + ["CHWN"])
        add(f, "algorithm", ("algorithm",),
            _choice_values(fastconv._validation.ALGORITHMS) + ["fft"])
        add(f, "algorithm+geometry", ("algorithm",), [
            ("algorithm='winograd', stride=2", dict(algorithm="winograd", stride=2)),
            ("algorithm='winograd', dilation=2", dict(algorithm="winograd", dilation=2)),
            ("algorithm='direct', padding=100", dict(algorithm="direct", padding=100))])
        add(f, "activation", ("activation",), ["gelu", "ReLU", "", 1, True, object(), ["relu"]])
        add(f, "n_threads", ("n_threads",), _n_threads_values(rng))
        add(f, "padding+padding_mode", ("padding_mode", "padding"),
            [(f"padding={p}, padding_mode={m!r}", dict(padding=p, padding_mode=m))
             for p, m in ((7, "reflect"), ((0, 0, 0, 8), "circular"), ((0, 7, 0, 0), "reflect"),
                          ((0, 0, 8, 0), "circular"))])
    add("conv2d", "bias", ("bias",), arr(4, none_ok=True) + [
        _arr(5), _arr((4, 1)), _arr(()), 1.0, True, _arr(0)])
    add("conv2d", "out", ("out",), _out_values())
    add("conv2d", "out+inputs", ("out",), _overlapping_out_cases())
    add("conv2d_backward", "grad_output", ("grad_output",), arr(dy.shape) + _wrong_ndim(dy.shape)
        + [_arr((2, 4, 5, 4)), _arr((2, 4, 7, 7)), _arr((3, 4, 5, 5)), _arr((2, 3, 5, 5)),
           _arr((2, 5, 5, 4))])
    add("conv2d_backward", "bias", ("bias",), [
        "yes", 1, 0, 1.0, _arr(5), _arr((4, 1)), _arr(4, complex), _arr(4, object), [1, 2],
        np.str_("True")])
    add("conv2d_backward", "activation+output", ("output",), [
        ("activation='relu' without output", dict(activation="relu")),
        ("activation='relu', output of the wrong shape",
         dict(activation="relu", output=_arr((2, 4, 5, 4)))),
        ("activation='relu', complex output", dict(activation="relu", output=_arr(dy.shape, complex))),
        ("activation='relu', output='y'", dict(activation="relu", output="y")),
        ("activation='relu', output=None", dict(activation="relu", output=None))])
    add("conv2d_backward", "grad_output+layout", ("grad_output",), [
        ("NCHW grad_output with layout='NHWC'",
         dict(grad_output=dy, x=np.ascontiguousarray(x.transpose(0, 2, 3, 1)), layout="NHWC"))])

    xt, wt = A["xt"], A["wt"]
    for f in ("conv_transpose2d", "conv_transpose2d_backward"):
        add(f, "x", ("x",), arr(xt.shape) + _wrong_ndim(xt.shape) + [
            _arr((2, 5, 5, 5)), _arr((2, 4, 0, 5))])
        add(f, "weight", ("weight",), arr(wt.shape) + _wrong_ndim(wt.shape) + [
            _arr((3, 3, 3, 3)), _arr((4, 0, 3, 3)), _arr((4, 3, 3, 0))])
        add(f, "stride", ("stride",), _pair_values(rng))
        add(f, "dilation", ("dilation",), _pair_values(rng))
        add(f, "padding", ("padding",), _padding_values(rng, four_ok=True)
            + [(4, 0), (4, 4, 0, 0), 2**31 - 1])
        add(f, "output_padding", ("output_padding",), _padding_values(rng) + [1, (0, 1), (3, 3)])
        add(f, "groups", ("groups",), _int_values(rng) + [3, 8])
        add(f, "n_threads", ("n_threads",), _n_threads_values(rng))
        add(f, "stride+output_padding", ("output_padding",), [
            ("stride=2, output_padding=2", dict(stride=2, output_padding=2)),
            ("stride=(1, 3), output_padding=(1, 0)", dict(stride=(1, 3), output_padding=(1, 0)))])
    add("conv_transpose2d", "bias", ("bias",), arr(3, none_ok=True) + [_arr(4), _arr((3, 1)), 1.0])
    add("conv_transpose2d_backward", "grad_output", ("grad_output",),
        arr((2, 3, 7, 7)) + [_arr((2, 3, 7, 6)), _arr((2, 4, 7, 7)), _arr((2, 3, 5, 5))])
    add("conv_transpose2d_backward", "bias", ("bias",), ["yes", 1, _arr(4), _arr(3, complex)])

    for f in ("im2col", "col2im"):
        add(f, "filter_h", ("filter_h",), _int_values(rng) + [(3, 3), 8])
        add(f, "filter_w", ("filter_w",), _int_values(rng) + [[3], 8])
        add(f, "stride", ("stride",), _pair_values(rng))
        add(f, "pad", ("pad",), _padding_values(rng, four_ok=True))
        add(f, "n_threads", ("n_threads",), _n_threads_values(rng))
    add("im2col", "input_data", ("input_data",), arr(x.shape) + _wrong_ndim(x.shape) + [
        _arr((2, 0, 7, 7)), _arr((2, 3, 1, 7))])
    add("col2im", "col", ("col",), arr(A["col"].shape) + [
        _arr(27), _arr((50, 28)), _arr((27, 50)), _arr((50, 27, 1)), _arr((0, 27))])
    add("col2im", "input_shape", ("input_shape", "col"), _input_shape_values(rng))

    for f in ("max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward"):
        add(f, "x", ("x",), arr(x.shape) + _wrong_ndim(x.shape) + [_arr((2, 3, 1, 7))])
        add(f, "kernel_size", ("kernel_size",), _pair_values(rng) + [8, (2, 9)])
        add(f, "stride", ("stride",), [v for v in _pair_values(rng) if v is not None])
        add(f, "padding", ("padding",), _padding_values(rng) + [2, (0, 2), (1, 1, 1, 1)])
        add(f, "ceil_mode", ("ceil_mode",), _bool_values())
        add(f, "n_threads", ("n_threads",), _n_threads_values(rng))
    for f in ("max_pool2d", "max_pool2d_backward"):
        add(f, "dilation", ("dilation",), _pair_values(rng) + [7])
    add("max_pool2d", "return_indices", ("return_indices",), _bool_values())
    for f in ("avg_pool2d", "avg_pool2d_backward"):
        add(f, "count_include_pad", ("count_include_pad",), _bool_values())
    for f in ("max_pool2d_backward", "avg_pool2d_backward"):
        add(f, "grad_output", ("grad_output",), arr((2, 3, 3, 3)) + [
            _arr((2, 3, 3, 2)), _arr((2, 3, 7, 7)), _arr((2, 3, 9)), _arr((1, 3, 3, 3))])
    add("max_pool2d_backward", "indices", ("indices",), _indices_values())

    for f in ("global_avg_pool2d", "global_avg_pool2d_backward"):
        add(f, "x", ("x",), arr(x.shape) + _wrong_ndim(x.shape) + [_arr((2, 3, 0, 7))])
        add(f, "n_threads", ("n_threads",), _n_threads_values(rng))
    add("global_avg_pool2d", "keepdims", ("keepdims",), _bool_values())
    add("global_avg_pool2d_backward", "grad_output", ("grad_output",), arr((2, 3)) + [
        _arr((2, 4)), _arr((2, 3, 1)), _arr((2, 3, 2, 1)), _arr(6), _arr((3, 2))])
    add("relu", "x", ("x",), arr((2, 3)))
    add("relu", "n_threads", ("n_threads",), _n_threads_values(rng))
    add("relu_backward", "x", ("x",), arr(x.shape) + [_arr((2, 3, 7))])
    add("relu_backward", "grad_output", ("grad_output",), arr(x.shape) + [
        _arr((2, 3, 7, 6)), _arr(294)])

    for layer, extra in (("Conv2D", dict(groups=_int_values(rng) + [2, 3],
                                        padding=_padding_values(rng, strings_ok=True,
                                                                four_ok=True),
                                        padding_mode=_choice_values(
                                            fastconv._validation.PADDING_MODES),
                                        layout=_choice_values(fastconv._validation.LAYOUTS),
                                        algorithm=_choice_values(
                                            fastconv._validation.ALGORITHMS))),
                         ("ConvTranspose2D", dict(groups=_int_values(rng) + [3],
                                                  padding=_padding_values(rng, four_ok=True),
                                                  output_padding=_padding_values(rng) + [1]))):
        add(layer, "in_channels", ("in_channels",), _int_values(rng) + [2**70])
        add(layer, "out_channels", ("out_channels",), _int_values(rng))
        add(layer, "kernel_size", ("kernel_size",), _pair_values(rng))
        add(layer, "stride", ("stride",), _pair_values(rng))
        add(layer, "dilation", ("dilation",), _pair_values(rng))
        add(layer, "bias", ("bias",), _bool_values())
        add(layer, "dtype", ("dtype",), [np.int32, np.float16, np.complex64, "banana", None,
                                         object, [1], "float128"])
        add(layer, "rng", ("rng",), ["abc", -1, 1.5, object(), [[1.5]]])
        add(layer, "n_threads", ("n_threads",), _n_threads_values(rng))
        for argument, values in extra.items():
            add(layer, argument, (argument,), values)
    for f in ("Conv2D.forward",):
        add(f, "x", ("x",), arr(x.shape) + _wrong_ndim(x.shape) + [_arr((2, 4, 7, 7)),
                                                                  _arr((2, 3, 2, 2))])
    add("ConvTranspose2D.forward", "x", ("x",), arr(xt.shape) + [_arr((2, 3, 5, 5))])
    for f, shape in (("Conv2D.backward", dy.shape), ("ConvTranspose2D.backward", (2, 3, 7, 7)),
                     ("MaxPool2D.backward", (2, 3, 3, 3)), ("AvgPool2D.backward", (2, 3, 3, 3)),
                     ("ReLU.backward", x.shape)):
        bad_shape = shape[:-1] + (shape[-1] + 1,)
        add(f, "dout", ("dout", "grad_output"), arr(shape) + [_arr(bad_shape)])
    add("Conv2D.from_weights", "W", ("W",), arr(w.shape) + _wrong_ndim(w.shape)
        + [_arr((4, 3, 0, 3))])
    add("Conv2D.from_weights", "b", ("b",), arr(4, none_ok=True) + [_arr(5), _arr((4, 1)), 1.0])
    add("Conv2D.from_weights", "stride", ("stride",), _pair_values(rng))
    add("Conv2D.from_weights", "pad", ("pad",), _padding_values(rng, four_ok=True))
    for f in ("MaxPool2D", "AvgPool2D"):
        add(f, "kernel_size", ("kernel_size",), _pair_values(rng))
        add(f, "stride", ("stride",), [v for v in _pair_values(rng) if v is not None])
        add(f, "padding", ("padding",), _padding_values(rng) + [2, (1, 1, 1, 1)])
        add(f, "ceil_mode", ("ceil_mode",), _bool_values())
        add(f, "n_threads", ("n_threads",), _n_threads_values(rng))
    add("MaxPool2D", "dilation", ("dilation",), _pair_values(rng))
    add("AvgPool2D", "count_include_pad", ("count_include_pad",), _bool_values())
    add("ReLU", "n_threads", ("n_threads",), _n_threads_values(rng))
    return table


def _make_call(function: Callable, arguments: dict) -> Callable[[], object]:
    return lambda: function(**arguments)


def _extreme_cases(rng) -> list[Case]:
    """Valid but extreme values: the answer, a MemoryError or a named error; never a crash."""
    calls = _valid_calls()
    cases = []
    big = lambda: int(rng.integers(2**20, LARGEST + 1))          # noqa: E731
    for _ in range(6):
        s, p, d = big(), big(), big()
        p = min(p, 8 * s)            # at most ~17 outputs per axis: a small result
        for function, overrides in (
                ("conv2d", dict(stride=s, padding=p)),
                ("conv2d", dict(stride=(s, 1), padding=(p, 0), layout="NHWC",
                                x=np.ascontiguousarray(A["x"].transpose(0, 2, 3, 1)))),
                ("conv2d", dict(dilation=d, stride=s, padding="same")),
                ("conv2d", dict(dilation=(d, 1), stride=(s, 1), padding="same", groups=3,
                                weight=A["w"][:3, :1], bias=None)),
                ("conv2d", dict(stride=s, padding=(p, p, 0, 0), padding_mode="zeros")),
                ("conv_transpose2d", dict(stride=(s, 1), x=A["xt"][:, :, :1])),
                ("conv_transpose2d", dict(dilation=(1, d), padding=(0, d), output_padding=(0, 1))),
                ("im2col", dict(stride=s, pad=p)),
                ("max_pool2d", dict(stride=s, dilation=d, kernel_size=1)),
                ("avg_pool2d", dict(kernel_size=(s, 2), padding=(s // 2, 0), stride=s,
                                    ceil_mode=True))):
            function_obj, arguments = calls[function]
            merged = dict(arguments, **overrides)
            label = ", ".join(f"{k}={_label(v)}" for k, v in overrides.items())
            cases.append(Case(function, "+".join(overrides), label, tuple(overrides),
                              _make_call(function_obj, merged), extreme=True))
    # results of 2**48 bytes or more: past the 128 TiB of x86-64 user address space,
    # so the allocation fails even where the kernel overcommits memory
    for function, name, shape in (("conv2d", "x", (2**46, 3, 1, 1)),
                                  ("relu", "x", (2**47,)),
                                  ("max_pool2d", "x", (2**30, 2**18, 2, 2)),
                                  ("global_avg_pool2d", "x", (2**46, 8, 1, 1)),
                                  ("im2col", "input_data", (1, 2**47, 1, 1))):
        function_obj, arguments = calls[function]
        value = np.broadcast_to(np.ones(1, np.int8 if function == "conv2d" else np.float32),
                                shape)
        merged = dict(arguments, **{name: value})
        if function == "conv2d":
            merged.update(weight=np.ones((1, 3, 1, 1)), bias=None)
        if function == "im2col":
            merged.update(filter_h=1, filter_w=1)
        cases.append(Case(function, name, f"broadcast to {shape}", (name,),
                          _make_call(function_obj, merged), extreme=True))
    return cases


def build_cases(seed: int = SEED) -> list[Case]:
    """Every listed bad value once, N_RANDOM random draws on top, then the extreme cases."""
    rng = np.random.default_rng(seed)
    calls = _valid_calls()
    table = _argument_values(rng)
    cases = []
    for function, argument, names, entries in table:
        function_obj, arguments = calls[function]
        for label, overrides in entries:
            cases.append(Case(function, argument, label, names,
                              _make_call(function_obj, dict(arguments, **overrides))))
    # random draws: a bad value for one argument with a random valid n_threads, so that
    # validation order does not depend on the default threads
    for _ in range(N_RANDOM):
        function, argument, names, entries = table[int(rng.integers(len(table)))]
        label, overrides = entries[int(rng.integers(len(entries)))]
        function_obj, arguments = calls[function]
        merged = dict(arguments, **overrides)
        if "n_threads" in arguments and "n_threads" not in overrides:
            merged["n_threads"] = int(rng.choice([1, 2, 3, -1]))
            label = f"{label} (n_threads={merged['n_threads']})"
        cases.append(Case(function, argument, label, names, _make_call(function_obj, merged)))
    return cases + _extreme_cases(rng)


def names_argument(message: str, names) -> bool:
    """Whether ``message`` mentions one of ``names`` as a whole word ('x', not '7x7')."""
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message)
               for name in names)


# ---------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------

def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def run_one(index: int, case: Case, timeout: float) -> None:
    """Run one case and report it on stdout; a hang ends the process (faulthandler)."""
    _emit({"start": index})
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        result = case.call()
    except BaseException as error:                     # reported to the parent, judged there
        record = {"done": index, "raised": type(error).__name__,
                  "value_or_type_error": isinstance(error, (ValueError, TypeError)),
                  "memory_error": isinstance(error, MemoryError),
                  "message": str(error)[:2000]}
    else:
        shapes = [getattr(r, "shape", None) for r in
                  (result if isinstance(result, tuple) else (result,))]
        record = {"done": index, "returned": type(result).__name__,
                  "shapes": [list(s) if s is not None else None for s in shapes],
                  "finite": all(np.isfinite(r).all() for r in
                                (result if isinstance(result, tuple) else (result,))
                                if isinstance(r, np.ndarray) and r.dtype.kind == "f"
                                and r.size and math.prod(r.shape) < 10**7)}
    finally:
        faulthandler.cancel_dump_traceback_later()
    _emit(record)


def worker(seed: int, start: int, stop: int, timeout: float = CASE_TIMEOUT) -> None:
    """Entry point of the child: run cases [start, stop) of ``build_cases(seed)``."""
    faulthandler.enable()                  # a segfault prints the Python stack to stderr
    cases = build_cases(seed) if seed >= 0 else SELF_TEST_CASES
    for index in range(start, min(stop, len(cases))):
        run_one(index, cases[index], timeout)


def _segfault():
    import ctypes
    return ctypes.string_at(0)


def _hang():
    import time
    while True:
        time.sleep(0.05)


def _raise(error):
    raise error


#: Cases that must fail, each in its own way: the harness's own test (seed -1).
SELF_TEST_CASES = [
    Case("self-test", "x", "named ValueError", ("x",),
         lambda: _raise(ValueError("x must be 4-D"))),
    Case("self-test", "x", "returns", ("x",), lambda: 1),
    Case("self-test", "x", "segfault", ("x",), _segfault),
    Case("self-test", "x", "unnamed ValueError", ("x",),
         lambda: _raise(ValueError("something is wrong"))),
    Case("self-test", "x", "OverflowError", ("x",), lambda: _raise(OverflowError("x too big"))),
    Case("self-test", "x", "hang", ("x",), _hang),
    Case("self-test", "x", "named TypeError after a hang", ("x",),
         lambda: _raise(TypeError("x must be an array"))),
]
