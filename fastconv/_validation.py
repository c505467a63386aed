"""Argument normalisation and every user-facing ValueError/TypeError.

The kernels assume valid input: everything a user can get wrong is checked here,
before any Cython code runs, and the messages name the argument, its value and
the shapes involved.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple, Sequence, Union

import numpy as np

IntPair = Union[int, Sequence[int]]
Padding = Union[int, str, Sequence[int]]

#: ``padding`` strings accepted by conv2d, conv2d_backward and Conv2D.
PADDING_STRINGS = ("valid", "same", "full")
#: ``padding_mode`` values, PyTorch's names; the index is the kernels' PAD_* code.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
#: ``layout`` values of conv2d / conv2d_backward.
LAYOUTS = ("NCHW", "NHWC")
#: ``algorithm`` values of conv2d / conv2d_backward ("direct": the depthwise kernel;
#: "winograd": F(m x m, 3 x 3) for 3x3 kernels at stride 1 and dilation 1).
ALGORITHMS = ("auto", "im2col", "direct", "winograd")
#: ``algorithm`` values of conv_transpose2d / conv_transpose2d_backward ("winograd": the
#: 2x2 phase convolutions of a kernel twice the stride, fastconv._phases).
TRANSPOSED_ALGORITHMS = ("auto", "im2col", "winograd")
#: ``activation`` values of conv2d / conv2d_backward / Conv2D (None: the identity).
ACTIVATIONS = (None, "relu")

#: The dtypes the kernels are compiled for.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: Largest stride, dilation, padding, output_padding or kernel size accepted.
#: The kernels index in 64-bit Py_ssize_t: with every such value below 2**31, no
#: product of two of them (``oh * stride``, ``kh * dilation``) can overflow, and a
#: value of 2**63 or more would not even convert (an OverflowError from deep
#: inside a kernel call). BLAS indexes with 32-bit ints, so nothing larger could
#: ever be computed anyway.
MAX_SIZE_ARGUMENT = 2**31 - 1
#: Largest element count of an array fastconv is asked to allocate: NumPy's own
#: limit (bytes must fit in intp) for 8-byte elements. Past it NumPy raises a
#: ValueError that names no argument; below it a too-large request is a MemoryError.
MAX_ARRAY_ELEMENTS = np.iinfo(np.intp).max // 8


def as_int(value, name: str) -> int:
    """``value`` as a Python int; bools, floats and other types are a TypeError naming ``name``."""
    if type(value) is int:      # the common case, and never a bool
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return operator.index(value)


def _unwrap_0d(value):
    """A 0-d array is a scalar (``np.array(2)`` is as good as ``2``)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def as_pair(value: IntPair, name: str) -> tuple[int, int]:
    """Normalise an int or an (h, w) pair to a tuple of two ints.

    Parameters
    ----------
    value : int or sequence of two ints
    name : str
        Argument name used in error messages.

    Returns
    -------
    (int, int)

    Raises
    ------
    TypeError
        If ``value`` (or an element) is not an integer (bools are rejected).
    ValueError
        If a sequence does not have exactly two elements, or a value is above
        :data:`MAX_SIZE_ARGUMENT` (every caller passes a size or a step).
    """
    if type(value) is int:      # the common case, and never a bool
        pair = (value, value)
        _check_size_argument(pair, value, name)
        return pair
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    value = _unwrap_0d(value)
    if isinstance(value, Sequence) or isinstance(value, np.ndarray):
        items = tuple(value)
        if len(items) != 2:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
        pair = (as_int(items[0], name), as_int(items[1], name))
    else:
        v = as_int(value, name)
        pair = (v, v)
    _check_size_argument(pair, value, name)
    return pair


def _check_size_argument(values, value, name: str) -> None:
    """Geometry values above :data:`MAX_SIZE_ARGUMENT` are a ValueError naming ``name``."""
    if max(values) > MAX_SIZE_ARGUMENT:
        raise ValueError(
            f"{name}={value!r} is too large: strides, dilations, paddings and kernel sizes "
            f"must be at most 2**31 - 1 = {MAX_SIZE_ARGUMENT}"
        )


def as_positive_pair(value: IntPair, name: str) -> tuple[int, int]:
    """Like :func:`as_pair`, and both values must be >= 1 (stride, dilation, kernel size)."""
    pair = as_pair(value, name)
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


def as_padding(value: Padding, name: str = "padding") -> tuple[int, int, int, int]:
    """Normalise padding to ``(top, bottom, left, right)``.

    Accepts an int (all four sides), an ``(ph, pw)`` pair (top = bottom = ph,
    left = right = pw) or the seeds' 4-tuple ``(top, bottom, left, right)``.

    Raises
    ------
    TypeError
        If a value is not an integer.
    ValueError
        If a value is negative or above :data:`MAX_SIZE_ARGUMENT`, or the
        sequence length is not 1, 2 or 4.
    """
    if isinstance(value, str):
        raise ValueError(
            f"{name}={value!r}: string padding is resolved against the input size and only "
            f"conv2d, conv2d_backward and Conv2D accept it; here use an int, (ph, pw) or "
            f"(top, bottom, left, right)"
        )
    if isinstance(value, bytes):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {value!r}")
    value = _unwrap_0d(value)
    if isinstance(value, Sequence) or isinstance(value, np.ndarray):
        items = tuple(as_int(v, name) for v in value)
        if len(items) == 1:
            items = items * 4
        elif len(items) == 2:
            items = (items[0], items[0], items[1], items[1])
        elif len(items) != 4:
            raise ValueError(
                f"{name} must be an int, (ph, pw) or (top, bottom, left, right), got {value!r}"
            )
    else:
        items = (as_int(value, name),) * 4
    if min(items) < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    _check_size_argument(items, value, name)
    return items


def resolve_string_padding(padding: str, name: str, size: tuple[int, int],
                           kernel: tuple[int, int], stride: tuple[int, int],
                           dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``'valid'``, ``'same'`` or ``'full'`` as ``(top, bottom, left, right)`` for one input.

    * ``'valid'``: no padding;
    * ``'full'``: ``d*(k-1)`` on every side (every partial overlap, seed 003);
    * ``'same'``: TensorFlow's rule, also for stride > 1: the output is
      ``ceil(in / stride)``, the total padding
      ``max((out - 1)*stride + d*(k - 1) + 1 - in, 0)`` is split with the
      extra pixel at the bottom/right. For stride 1 this is PyTorch's ``'same'``.

    Upper-case spellings (TensorFlow's ``'SAME'``) are accepted.
    """
    key = padding.lower()
    if key not in PADDING_STRINGS:
        raise ValueError(
            f"{name}={padding!r} is not a padding string; use one of "
            f"{', '.join(repr(p) for p in PADDING_STRINGS)}, an int or a tuple of ints"
        )
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        span = d * (k - 1)
        if key == "valid":
            pads += [0, 0]
        elif key == "full":
            pads += [span, span]
        else:
            out = -(-n // s)
            total = max((out - 1) * s + span + 1 - n, 0)
            pads += [total // 2, total - total // 2]
    return tuple(pads)


def as_choice(value, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``, else a ValueError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )
    return value


def as_activation(value, name: str = "activation") -> str | None:
    """``None`` or ``'relu'``; anything else is a ValueError listing the choices."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise ValueError(f"{name} must be None or 'relu', got {value!r}")
    return value


def conv_output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int,
                     dilation: int = 1) -> int:
    """Output length along one axis: ``(size + pads - d*(k-1) - 1) // stride + 1``.

    May be < 1; callers turn that into an error with their own context.
    """
    span = dilation * (kernel - 1) + 1
    padded = size + pad_before + pad_after
    if padded < span:
        return 0
    return (padded - span) // stride + 1


def compute_dtype(*dtypes) -> np.dtype:
    """The float dtype a computation on arrays of ``dtypes`` runs in.

    NumPy promotion, then: float16 becomes float32, integers and bools become
    float64 (as ``np.mean`` does). Complex, object, string and other kinds are
    a TypeError.
    """
    for dt in dtypes:
        if dt.kind not in "biuf":
            raise TypeError(
                f"unsupported dtype {dt}: fastconv computes in float32 or float64 "
                "(integer and bool inputs are converted to float64)"
            )
    dt = np.result_type(*dtypes)
    if dt.kind in "biu":
        return np.dtype(np.float64)
    if dt.itemsize < 4:
        return np.dtype(np.float32)
    if dt not in SUPPORTED_DTYPES:  # longdouble
        raise TypeError(f"unsupported dtype {dt}: fastconv computes in float32 or float64")
    return dt


def as_array(value, name: str) -> np.ndarray:
    """``value`` as an ndarray (without copying); None and non-numeric objects are errors."""
    if value is None:
        raise TypeError(f"{name} must be an array, got None")
    if type(value) is np.ndarray and value.dtype.kind == "f" and value.dtype.itemsize <= 8 \
            and value.flags.c_contiguous:
        return value            # the common case: nothing to convert, no copy to size
    try:
        arr = np.asarray(value)
    except TypeError as error:
        raise TypeError(f"{name} cannot be converted to an array: {error}") from error
    except (ValueError, OverflowError) as error:       # ragged nested lists, for one
        raise ValueError(f"{name} cannot be converted to an array: {error}") from error
    # long double is a float too, but no kernel takes it (and a cast would lose precision)
    if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f" and arr.dtype.itemsize > 8):
        raise TypeError(
            f"{name} has unsupported dtype {arr.dtype}: fastconv computes in float32 or "
            "float64 (integer and bool inputs are converted to float64)"
        )
    # a broadcast view can be far larger than memory; its float64 copy may not even exist
    check_array_size(arr.shape, f"a contiguous copy of {name}",
                     f"{name} is a view of shape {arr.shape} and strides {arr.strides}")
    return arr


def as_shape(value, name: str, ndim: int) -> tuple[int, ...]:
    """A shape of ``ndim`` non-negative ints."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a tuple of {ndim} ints, got {value!r}")
    shape = tuple(as_int(v, name) for v in value)
    if len(shape) != ndim or min(shape) < 0:
        raise ValueError(f"{name} must be {ndim} non-negative ints, got {value!r}")
    return shape


def check_array_size(shape, what: str, context: str) -> None:
    """A ValueError naming the arguments when an array of ``shape`` could not exist at all.

    NumPy would refuse it with "array is too big" or "Maximum allowed
    dimension exceeded", naming nothing; a merely too large request (that
    fits the address space but not the memory) stays a MemoryError.
    """
    if shape and (max(shape) > MAX_ARRAY_ELEMENTS or math.prod(shape) > MAX_ARRAY_ELEMENTS):
        raise ValueError(
            f"{what} would have shape {tuple(shape)}, more elements than any array can hold "
            f"({context})"
        )


def check_ndim(arr: np.ndarray, ndim: int, name: str, layout: str) -> None:
    if arr.ndim != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D {layout}, got {arr.ndim}-D array with shape {arr.shape}"
        )


class ConvGeometry(NamedTuple):
    """Every size of one 2-D convolution, validated (the kernels' contract)."""

    N: int
    C: int
    H: int
    W: int
    F: int
    KH: int
    KW: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    dilation_h: int
    dilation_w: int
    OH: int
    OW: int
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def mode_code(self) -> int:
        """``padding_mode`` as the kernels' PAD_* code (``fastconv/_im2col.pxd``)."""
        return PADDING_MODES.index(self.padding_mode)

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group (groups == C): each filter sees one channel."""
        return self.groups == self.C

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.F, self.OH, self.OW)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.F, self.C // self.groups, self.KH, self.KW)

    @property
    def is_pointwise(self) -> bool:
        """1x1 kernel, stride 1, no padding: the input plane already is the column matrix."""
        return (self.KH == 1 and self.KW == 1 and self.stride_h == 1 and self.stride_w == 1
                and self.pad_top == 0 and self.pad_bottom == 0
                and self.pad_left == 0 and self.pad_right == 0)


#: Validated geometries by their (plain) arguments: a training loop asks for the
#: same few again and again, and validating one costs ~30 us of Python.
_GEOMETRY_CACHE: dict = {}
_GEOMETRY_CACHE_SIZE = 512


def _plain(value) -> bool:
    """Exactly an int, a str, None or a tuple of exact ints: arguments whose equality
    means "validates the same" (a bool or a float equal to an int must not hit the cache)."""
    kind = type(value)
    return (kind is int or kind is str or value is None
            or (kind is tuple and all(type(v) is int for v in value)))


def conv_geometry(x_shape, w_shape, stride, padding, dilation, groups=1, padding_mode="zeros",
                  *, x_name: str = "x", padding_name: str = "padding",
                  kernel_desc: str | None = None, string_padding: bool = False,
                  ) -> ConvGeometry:
    """Validate and collect the sizes of ``conv2d(x, w)``.

    ``x_shape`` is (N, C, H, W) and ``w_shape`` is (F, C/groups, KH, KW); both
    have already been checked to be 4-D. ``x_name``, ``padding_name`` and
    ``kernel_desc`` let callers with other argument names (the seeds'
    ``im2col(input_data, filter_h, filter_w, stride, pad)``) get messages in
    their own terms; ``string_padding`` lets ``padding`` be ``'valid'``,
    ``'same'`` or ``'full'``.

    Results for plain arguments (exact ints, strings, tuples of ints) are
    memoised; anything else (NumPy scalars, lists, bools) is validated afresh.
    """
    key = (tuple(x_shape), tuple(w_shape), stride, padding, dilation, groups, padding_mode,
           x_name, padding_name, kernel_desc, string_padding)
    cacheable = all(_plain(v) for v in key[:-1])
    if cacheable:
        geometry = _GEOMETRY_CACHE.get(key)
        if geometry is not None:
            return geometry
    geometry = _conv_geometry(x_shape, w_shape, stride, padding, dilation, groups, padding_mode,
                              x_name, padding_name, kernel_desc, string_padding)
    if cacheable:
        if len(_GEOMETRY_CACHE) >= _GEOMETRY_CACHE_SIZE:
            _GEOMETRY_CACHE.clear()
        _GEOMETRY_CACHE[key] = geometry
    return geometry


def _conv_geometry(x_shape, w_shape, stride, padding, dilation, groups, padding_mode, x_name,
                   padding_name, kernel_desc, string_padding) -> ConvGeometry:
    """:func:`conv_geometry`, uncached."""
    sh, sw = as_positive_pair(stride, "stride")
    dh, dw = as_positive_pair(dilation, "dilation")
    groups = as_int(groups, "groups")
    padding_mode = as_choice(padding_mode, "padding_mode", PADDING_MODES)
    N, C, H, W = (int(s) for s in x_shape)
    F, CW, KH, KW = (int(s) for s in w_shape)
    x_desc = (f"{x_name}={tuple(x_shape)}" if x_name.endswith("shape")
              else f"{x_name}.shape={tuple(x_shape)}")
    if kernel_desc is None:
        kernel_desc = f"weight.shape={tuple(w_shape)}"
    if string_padding and isinstance(padding, str):
        if KH < 1 or KW < 1:
            raise ValueError(f"weight must have non-zero sizes, got {kernel_desc}")
        top, bottom, left, right = resolve_string_padding(padding, padding_name, (H, W),
                                                          (KH, KW), (sh, sw), (dh, dw))
    else:
        top, bottom, left, right = as_padding(padding, padding_name)
    if C < 1 or H < 1 or W < 1:
        raise ValueError(f"{x_name} must have at least one channel and non-empty planes "
                         f"(only N may be 0), got {x_desc}")
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    if C % groups or F % groups:
        raise ValueError(
            f"groups={groups} must divide both the input channels C={C} and the filters "
            f"F={F} ({x_desc}, {kernel_desc})"
        )
    if C != CW * groups:
        if groups == 1:
            raise ValueError(
                f"{x_name} has {C} channels but weight expects {CW} ({x_desc}, {kernel_desc})")
        raise ValueError(
            f"{x_name} has {C} channels but weight expects groups * C/groups = "
            f"{groups} * {CW} = {groups * CW} ({x_desc}, {kernel_desc}, groups={groups})"
        )
    if F < 1 or KH < 1 or KW < 1:
        raise ValueError(f"weight must have non-zero sizes, got {kernel_desc}")
    _check_padding_mode_fits(padding_mode, (top, bottom, left, right), H, W, padding_name, x_desc)
    OH = conv_output_size(H, KH, sh, top, bottom, dh)
    OW = conv_output_size(W, KW, sw, left, right, dw)
    if OH < 1 or OW < 1:
        raise ValueError(
            f"output size would be {OH}x{OW} (< 1): input {H}x{W} with "
            f"{padding_name} (top, bottom, left, right)={(top, bottom, left, right)} is smaller "
            f"than the {'dilated ' if (dh, dw) != (1, 1) else ''}kernel "
            f"{dh * (KH - 1) + 1}x{dw * (KW - 1) + 1} ({x_desc}, {kernel_desc}"
            + (f", dilation={(dh, dw)})" if (dh, dw) != (1, 1) else ")")
        )
    check_array_size((N, F, OH, OW), "the output",
                     f"{x_desc}, {kernel_desc}, stride={(sh, sw)}, {padding_name} (top, bottom, "
                     f"left, right)={(top, bottom, left, right)}, dilation={(dh, dw)}")
    return ConvGeometry(N, C, H, W, F, KH, KW, sh, sw, top, bottom, left, right, dh, dw, OH, OW,
                        groups, padding_mode)


def _check_padding_mode_fits(mode: str, pads, H: int, W: int, padding_name: str,
                             x_desc: str) -> None:
    """PyTorch's limits: reflect padding < the input size (one mirror image, no repeated
    edge), circular padding <= the input size (one wrap)."""
    if mode not in ("reflect", "circular"):
        return
    top, bottom, left, right = pads
    for pad, size, side in ((top, H, "top"), (bottom, H, "bottom"),
                            (left, W, "left"), (right, W, "right")):
        too_big = pad >= size if mode == "reflect" else pad > size
        if too_big:
            limit = "smaller than" if mode == "reflect" else "at most"
            raise ValueError(
                f"padding_mode={mode!r} needs each {padding_name} {limit} the input size: "
                f"{side} padding {pad} vs size {size} ({padding_name} (top, bottom, left, "
                f"right)={tuple(pads)}, {x_desc})"
            )


def transposed_output_size(size: int, kernel: int, stride: int, pad_before: int,
                           pad_after: int, dilation: int = 1, output_padding: int = 0) -> int:
    """``(size - 1)*stride - pads + dilation*(kernel - 1) + output_padding + 1``: PyTorch's
    ``- 2*pad`` with the pads of the two sides apart (seed 004's asymmetric padding)."""
    return ((size - 1) * stride - pad_before - pad_after + dilation * (kernel - 1)
            + output_padding + 1)


def transposed_geometry(x_shape, w_shape, stride, padding, output_padding, groups, dilation,
                        ) -> ConvGeometry:
    """Validate ``conv_transpose2d(x, w)`` and return the geometry of the convolution it is
    the adjoint of.

    ``x_shape`` is (N, C_in, H, W) and ``w_shape`` (C_in, C_out/groups, KH, KW).
    The returned geometry describes ``conv2d`` from the transposed output
    (N, C_out, H_out, W_out) back to x: F = C_in, OH = H, OW = W, the top/left
    padding of ``padding`` (an int, (ph, pw) or (top, bottom, left, right)), its
    bottom/right less ``output_padding``. That
    bottom/right padding may be negative: the ``output_padding`` extra rows
    and columns then receive no input (only the bias), as in PyTorch; the
    kernels only read it through OH/OW, which match x.
    """
    if isinstance(padding, str):
        raise ValueError(
            f"conv_transpose2d takes no string padding (got padding={padding!r}): its "
            "padding crops the output; use an int, (ph, pw) or (top, bottom, left, right)"
        )
    sh, sw = as_positive_pair(stride, "stride")
    dh, dw = as_positive_pair(dilation, "dilation")
    pads = top, bottom, left, right = as_padding(padding, "padding")
    oph, opw = as_pair(output_padding, "output_padding")
    groups = as_int(groups, "groups")
    N, C_in, H, W = (int(s) for s in x_shape)
    CW, Cg_out, KH, KW = (int(s) for s in w_shape)
    desc = f"x.shape={tuple(x_shape)}, weight.shape={tuple(w_shape)}"
    if min(oph, opw) < 0:
        raise ValueError(f"output_padding must be non-negative, got {output_padding!r}")
    if oph >= max(sh, dh) or opw >= max(sw, dw):
        raise ValueError(
            f"output_padding={(oph, opw)} must be smaller than max(stride, dilation) on each "
            f"axis, got stride={(sh, sw)}, dilation={(dh, dw)}"
        )
    if C_in < 1 or H < 1 or W < 1:
        raise ValueError("x must have at least one channel and non-empty planes "
                         f"(only N may be 0), got x.shape={tuple(x_shape)}")
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    if Cg_out < 1 or KH < 1 or KW < 1:
        raise ValueError(f"weight must have non-zero sizes, got weight.shape={tuple(w_shape)}")
    if C_in != CW:
        raise ValueError(f"x has {C_in} channels but weight expects {CW} "
                         f"(weight is (C_in, C_out/groups, KH, KW); {desc})")
    if C_in % groups:
        raise ValueError(f"groups={groups} must divide the input channels C_in={C_in} ({desc})")
    OH = transposed_output_size(H, KH, sh, top, bottom, dh, oph)
    OW = transposed_output_size(W, KW, sw, left, right, dw, opw)
    if OH < 1 or OW < 1:
        raise ValueError(
            f"output size would be {OH}x{OW} (< 1): padding={pads} crops more than "
            f"(H-1)*stride + dilation*(k-1) + output_padding + 1 ({desc}, stride={(sh, sw)}, "
            f"dilation={(dh, dw)}, output_padding={(oph, opw)})"
        )
    check_array_size((N, Cg_out * groups, OH, OW), "the output",
                     f"{desc}, stride={(sh, sw)}, padding={pads}, dilation={(dh, dw)}, "
                     f"output_padding={(oph, opw)}")
    return ConvGeometry(N, Cg_out * groups, OH, OW, C_in, KH, KW, sh, sw, top, bottom - oph,
                        left, right - opw, dh, dw, H, W, groups, "zeros")


def resolve_n_threads(n_threads, max_threads: int, limit: int | None = None) -> int:
    """scikit-learn's convention: None = all usable, k > 0 = k, k < 0 = max + 1 + k (at least 1).

    A positive count above ``limit`` (default ``max(64, 4 * max_threads)``) is a
    ValueError: OpenMP would try to start that many threads, and libgomp
    crashes when it cannot (``n_threads=100000`` was a segfault).
    """
    if n_threads is None:
        return max_threads
    n = as_int(n_threads, "n_threads")
    if n == 0:
        raise ValueError("n_threads=0 is invalid: use None for all cores, a positive count, "
                         "or a negative one to count back from all cores")
    if n < 0:
        return max(max_threads + 1 + n, 1)
    if limit is None:
        limit = max(64, 4 * max_threads)
    if n > limit:
        raise ValueError(
            f"n_threads={n} is more than fastconv starts ({limit}: 4 per core, at least 64); "
            "use None for all cores"
        )
    return n


# ---------------------------------------------------------------------------
# Pooling (fastconv._pooling): PyTorch's argument rules.
# ---------------------------------------------------------------------------


def as_bool(value, name: str) -> bool:
    """``value`` as a bool; only True/False (and NumPy bools) are accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def pool_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """PyTorch's pooling output length along one axis.

    ``(size + 2*pad - dilation*(kernel-1) - 1 [+ stride - 1 if ceil_mode]) // stride + 1``
    (floor division), and with ``ceil_mode`` the last window must start inside
    the input or the left padding: if ``(out - 1)*stride >= size + pad`` the
    last window is dropped. May be < 1; callers raise with their own context.
    """
    span = dilation * (kernel - 1) + 1
    numerator = size + 2 * pad - span + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and out > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def as_pool_padding(padding: IntPair, kernel_size: tuple[int, int]) -> tuple[int, int]:
    """Pooling padding ``(ph, pw)``: symmetric, non-negative, at most ``kernel // 2`` (PyTorch)."""
    if isinstance(padding, (Sequence, np.ndarray)) and not isinstance(padding, (str, bytes)) \
            and len(padding) != 2:
        raise ValueError(
            f"padding must be an int or a pair (ph, pw) for pooling (symmetric, as in "
            f"PyTorch), got {padding!r}"
        )
    ph, pw = as_pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    kh, kw = kernel_size
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(
            f"padding={padding!r} must be at most half of kernel_size={(kh, kw)} "
            f"(pad <= kernel // 2 on each axis, as in PyTorch)"
        )
    return ph, pw


class PoolGeometry(NamedTuple):
    """Every size of one 2-D pooling, validated (the pooling kernels' contract).

    Padding is symmetric: ``pad_h`` rows above and below, ``pad_w`` columns
    left and right; ``pad <= kernel // 2`` on both axes.
    """

    N: int
    C: int
    H: int
    W: int
    KH: int
    KW: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dilation_h: int
    dilation_w: int
    ceil_mode: bool
    OH: int
    OW: int

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.OH, self.OW)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)


def pool_geometry(x_shape, kernel_size, stride, padding, dilation, ceil_mode) -> PoolGeometry:
    """Validate and collect the sizes of ``max_pool2d``/``avg_pool2d`` of ``x``.

    ``x_shape`` is (N, C, H, W), already checked to be 4-D. ``stride=None``
    means ``stride = kernel_size``.
    """
    kh, kw = as_positive_pair(kernel_size, "kernel_size")
    sh, sw = (kh, kw) if stride is None else as_positive_pair(stride, "stride")
    ph, pw = as_pool_padding(padding, (kh, kw))
    dh, dw = as_positive_pair(dilation, "dilation")
    ceil_mode = as_bool(ceil_mode, "ceil_mode")
    N, C, H, W = (int(s) for s in x_shape)
    OH = pool_output_size(H, kh, sh, ph, dh, ceil_mode)
    OW = pool_output_size(W, kw, sw, pw, dw, ceil_mode)
    if OH < 1 or OW < 1:
        raise ValueError(
            f"output size would be {OH}x{OW} (< 1): input {H}x{W} with padding {(ph, pw)} "
            f"is smaller than the window {dh * (kh - 1) + 1}x{dw * (kw - 1) + 1} "
            f"(x.shape={tuple(x_shape)}, kernel_size={(kh, kw)}, dilation={(dh, dw)})"
        )
    check_array_size((N, C, OH, OW), "the output",
                     f"x.shape={tuple(x_shape)}, kernel_size={(kh, kw)}, stride={(sh, sw)}, "
                     f"padding={(ph, pw)}, dilation={(dh, dw)}, ceil_mode={ceil_mode}")
    return PoolGeometry(N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode, OH, OW)
