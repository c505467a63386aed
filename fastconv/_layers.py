"""Layer classes: hold parameters and gradients, delegate the arithmetic to ``_functional``."""

from __future__ import annotations

import math

import numpy as np

from fastconv._functional import _conv2d, _conv2d_backward
from fastconv._transposed import (
    _conv_transpose2d,
    _transposed_algorithm,
    conv_transpose2d_backward,
)
from fastconv._winograd import TransformedWeights
from fastconv._threads import effective_n_threads
from fastconv._pooling import (
    avg_pool2d,
    avg_pool2d_backward,
    max_pool2d,
    max_pool2d_backward,
    relu,
    relu_backward,
)
from fastconv._validation import (
    ALGORITHMS,
    as_activation,
    LAYOUTS,
    MAX_SIZE_ARGUMENT,
    PADDING_MODES,
    PADDING_STRINGS,
    IntPair,
    Padding,
    as_choice,
    as_int,
    as_array,
    as_bool,
    as_pair,
    as_padding,
    as_pool_padding,
    as_positive_pair,
    check_array_size,
    check_ndim,
    compute_dtype,
    resolve_string_padding,
    transposed_geometry,
)

__all__ = ["Conv2D", "ConvTranspose2D", "MaxPool2D", "AvgPool2D", "ReLU"]


def _uniform_init(rng, fan_in: int, weight_shape, n_bias: int, bias: bool, dtype):
    """PyTorch's default: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for the weight and the bias."""
    try:
        rng = np.random.default_rng(rng)
    except (TypeError, ValueError) as error:
        raise type(error)(f"rng must be None, a non-negative int or a numpy.random.Generator, "
                          f"got {rng!r} ({error})") from error
    bound = 1.0 / math.sqrt(fan_in)
    W = rng.uniform(-bound, bound, weight_shape).astype(dtype)
    b = rng.uniform(-bound, bound, n_bias).astype(dtype) if bias else None
    return W, b


def _layer_args(in_channels, out_channels, kernel_size, groups, bias, dtype):
    """The checks every convolution layer constructor shares."""
    in_channels = as_int(in_channels, "in_channels")
    out_channels = as_int(out_channels, "out_channels")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(
            f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}"
        )
    if max(in_channels, out_channels) > MAX_SIZE_ARGUMENT:
        # BLAS could never multiply such a weight (its dimensions are 32-bit ints)
        raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be at "
                         f"most 2**31 - 1")
    kernel_size = as_positive_pair(kernel_size, "kernel_size")
    groups = as_int(groups, "groups")
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must be positive and divide in_channels={in_channels} "
                         f"and out_channels={out_channels}")
    # np.dtype(None) would silently mean float64
    try:
        dtype = None if dtype is None else np.dtype(dtype)
    except TypeError as error:                          # np.dtype("banana")
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from error
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    check_array_size((out_channels, in_channels // groups) + kernel_size, "the weight",
                     f"in_channels={in_channels}, out_channels={out_channels}, "
                     f"kernel_size={kernel_size}, groups={groups}")
    if not isinstance(bias, (bool, np.bool_)):
        raise TypeError(f"bias must be True or False, got {bias!r}")
    return in_channels, out_channels, kernel_size, groups, dtype


def _padding_repr(padding) -> str | None:
    """``padding=...`` in the shortest form that means the same, None for no padding."""
    if isinstance(padding, str):
        return f"padding={padding!r}" if padding != "valid" else None
    top, bottom, left, right = padding
    if not any(padding):
        return None
    if top == bottom == left == right:
        return f"padding={top}"
    if top == bottom and left == right:
        return f"padding={(top, left)}"
    return f"padding={padding}"


class _ConvLayerBase:
    """What both convolution layers share: parameters, gradients and the forward's input.

    Subclasses implement :meth:`_forward` (both keep a cache of transformed filters
    for it) and name their functional backward (``_backward_function``) and the
    keyword arguments it takes (``_arguments``), or override :meth:`_backward`.
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run the layer on ``x`` and keep ``x`` (not a copy) for :meth:`backward`."""
        y = self._forward(x)
        self._x = x
        return y

    __call__ = forward

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Store ``dW``/``db`` for the last forward's input and return ``dx``."""
        if self._x is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        dx, dW, db = self._backward(dout)
        self.dW = dW.astype(np.result_type(self.W.dtype, np.float32), copy=False)
        self.db = None if self.b is None else db.astype(self.dW.dtype, copy=False)
        return dx

    def _backward(self, dout):
        return self._backward_function(dout, self._x, self.W, bias=self.b is not None,
                                       **self._arguments())

    def _common_repr_parts(self) -> list[str]:
        parts = []
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.b is None:
            parts.append("bias=False")
        if self.W.dtype != np.float32:
            parts.append(f"dtype={self.W.dtype}")
        return parts


class Conv2D(_ConvLayerBase):
    """2-D convolution layer with ``forward``/``backward``, in the seeds' style.

    ``forward(x)`` takes (N, C, H, W), or (N, H, W, C) with ``layout="NHWC"``;
    ``backward(dout)`` fills ``dW``/``db`` and returns ``dx``.

    Parameters
    ----------
    in_channels, out_channels : int
        C and F.
    kernel_size : int or (int, int)
        (KH, KW).
    stride : int or (int, int), default 1
    padding : int, (int, int), (top, bottom, left, right) or str, default 0
        As in :func:`fastconv.conv2d`; ``'same'``, ``'valid'`` and ``'full'``
        are resolved for each input's size.
    dilation : int or (int, int), default 1
    groups : int, default 1
        Must divide ``in_channels`` and ``out_channels``; ``groups ==
        in_channels`` is a depthwise layer.
    bias : bool, default True
        Whether the layer has a bias ``b`` (``b`` and ``db`` are None otherwise).
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}, default 'zeros'
    dtype : float32 or float64, default float32
        dtype of ``W`` and ``b``.
    rng : None, int or numpy.random.Generator
        Source of the initial weights: PyTorch's default,
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = C/groups*KH*KW``,
        for both ``W`` and ``b``.
    layout : {'NCHW', 'NHWC'}, default 'NCHW'
        Layout of the inputs and outputs (``W`` is (F, C/groups, KH, KW) in both).
    algorithm : {'auto', 'im2col', 'direct', 'winograd'}, default 'auto'
        As in :func:`fastconv.conv2d`.
    activation : {None, 'relu'}, default None
        A ReLU fused into the forward (and its mask into the backward).
    n_threads : int, optional
        OpenMP threads for every call (see :func:`fastconv.conv2d`).

    Attributes
    ----------
    W : ndarray, shape (F, C/groups, KH, KW)
    b : ndarray, shape (F,) or None
    dW, db : ndarray or None
        Gradients from the last :meth:`backward` (None before it).

    Notes
    -----
    :meth:`forward` keeps a reference to its input (and, with
    ``activation='relu'``, to its output) for :meth:`backward` (nothing is
    copied): do not modify them in place between the two calls. With Winograd
    the layer keeps its filters transformed between calls and transforms them
    again only when ``W`` has changed (compared byte for byte).

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import Conv2D
    >>> layer = Conv2D(3, 8, kernel_size=3, padding=1, rng=0)
    >>> layer
    Conv2D(3, 8, kernel_size=(3, 3), padding=1)
    >>> x = np.ones((2, 3, 5, 5), np.float32)
    >>> y = layer(x)
    >>> y.shape, y.dtype
    ((2, 8, 5, 5), dtype('float32'))
    >>> dx = layer.backward(np.ones_like(y))
    >>> dx.shape, layer.dW.shape, layer.db.shape
    ((2, 3, 5, 5), (8, 3, 3, 3), (8,))
    >>> Conv2D(32, 32, 3, stride=2, padding="same", groups=32, padding_mode="reflect")
    Conv2D(32, 32, kernel_size=(3, 3), stride=(2, 2), padding='same', groups=32, padding_mode='reflect')
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        dtype=np.float32,
        rng=None,
        *,
        layout: str = "NCHW",
        algorithm: str = "auto",
        activation: str | None = None,
        n_threads: int | None = None,
    ) -> None:
        in_channels, out_channels, (kh, kw), groups, dtype = _layer_args(
            in_channels, out_channels, kernel_size, groups, bias, dtype)
        W, b = _uniform_init(rng, in_channels // groups * kh * kw,
                             (out_channels, in_channels // groups, kh, kw), out_channels, bias,
                             dtype)
        self._setup(W, b, stride, padding, dilation, groups, padding_mode, layout, algorithm,
                    activation, n_threads)

    def _setup(self, W, b, stride, padding, dilation, groups, padding_mode, layout, algorithm,
               activation, n_threads, padding_name="padding") -> None:
        self.W = W
        self.b = b
        self.stride = as_positive_pair(stride, "stride")
        if isinstance(padding, str):
            # resolved per input (same/full depend on the size); checked now, lower-cased
            if padding.lower() not in PADDING_STRINGS:
                resolve_string_padding(padding, padding_name, (1, 1), (1, 1), (1, 1), (1, 1))
            self.padding = padding.lower()
        else:
            self.padding = as_padding(padding, padding_name)
        self.dilation = as_positive_pair(dilation, "dilation")
        self.groups = groups
        self.padding_mode = as_choice(padding_mode, "padding_mode", PADDING_MODES)
        self.layout = as_choice(layout, "layout", LAYOUTS)
        self.algorithm = as_choice(algorithm, "algorithm", ALGORITHMS)
        self.activation = as_activation(activation)
        effective_n_threads(n_threads)  # reject n_threads=0 or a non-int now, not at forward
        self.n_threads = n_threads
        self.dW = None
        self.db = None
        self._x = None
        self._y = None          # the forward's output, kept for the ReLU's backward
        self._weight_cache = TransformedWeights()

    @classmethod
    def from_weights(cls, W: np.ndarray, b: np.ndarray | None = None, stride: IntPair = 1,
                     pad: Padding = 0) -> "Conv2D":
        """A layer around existing parameters, like the seeds' ``Convolution(W, b, stride, pad)``.

        ``W`` (F, C, KH, KW) and ``b`` (F,) are used as given (no copy), so an
        optimiser updating them in place updates the layer.

        Examples
        --------
        >>> import numpy as np
        >>> from fastconv import Conv2D
        >>> layer = Conv2D.from_weights(np.ones((4, 3, 5, 5)), np.zeros(4), stride=1, pad=2)
        >>> layer
        Conv2D(3, 4, kernel_size=(5, 5), padding=2, dtype=float64)
        """
        W = as_array(W, "W")
        check_ndim(W, 4, "W", "(F, C, KH, KW)")
        if min(W.shape) < 1:
            raise ValueError(f"W must have non-zero sizes, got W.shape={W.shape}")
        if b is not None:
            b = as_array(b, "b")
            if b.shape != (W.shape[0],):
                raise ValueError(f"b must have shape ({W.shape[0]},) to match W.shape={W.shape}, "
                                 f"got b.shape={b.shape}")
        compute_dtype(W.dtype, *(() if b is None else (b.dtype,)))
        if isinstance(pad, str):
            # the seeds' layer takes numbers; keep its error
            as_padding(pad, "pad")
        layer = cls.__new__(cls)
        layer._setup(W, b, stride, pad, 1, 1, "zeros", "NCHW", "auto", None, None,
                     padding_name="pad")
        return layer

    @property
    def in_channels(self) -> int:
        return self.W.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.W.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.W.shape[2], self.W.shape[3])

    def _forward(self, x):
        y = _conv2d(x, self.W, self.b, self.stride, self.padding, self.dilation, self.groups,
                    self.padding_mode, self.layout, self.algorithm, self.activation, None,
                    self.n_threads, weight_cache=self._weight_cache)
        self._y = y if self.activation is not None else None
        return y

    def _backward(self, dout):
        return _conv2d_backward(dout, self._x, self.W, self.stride, self.padding, self.dilation,
                                self.groups, self.padding_mode, self.layout, self.algorithm,
                                self.b is not None, self.activation, self._y, self.n_threads,
                                weight_cache=self._weight_cache)

    def __repr__(self) -> str:
        parts = [str(self.in_channels), str(self.out_channels), f"kernel_size={self.kernel_size}"]
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride}")
        padding = _padding_repr(self.padding)
        if padding:
            parts.append(padding)
        parts += self._common_repr_parts()
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        if self.layout != "NCHW":
            parts.append(f"layout={self.layout!r}")
        if self.algorithm != "auto":
            parts.append(f"algorithm={self.algorithm!r}")
        if self.activation is not None:
            parts.append(f"activation={self.activation!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class ConvTranspose2D(_ConvLayerBase):
    """2-D transposed convolution layer (:func:`fastconv.conv_transpose2d`), PyTorch's semantics.

    Parameters
    ----------
    in_channels, out_channels : int
        C_in and C_out.
    kernel_size : int or (int, int)
    stride : int or (int, int), default 1
    padding : int, (ph, pw) or (top, bottom, left, right), default 0
        Cropped from each side of the full output.
    output_padding : int or (int, int), default 0
        Extra bottom/right rows and columns; < max(stride, dilation).
    groups : int, default 1
    bias : bool, default True
    dilation : int or (int, int), default 1
    dtype : float32 or float64, default float32
    rng : None, int or numpy.random.Generator
        PyTorch's default initialisation, ``fan_in = C_out/groups*KH*KW``.
    algorithm : {'auto', 'im2col', 'winograd'}, default 'auto'
        As in :func:`fastconv.conv_transpose2d`.
    n_threads : int, optional

    Attributes
    ----------
    W : ndarray, shape (C_in, C_out/groups, KH, KW)
    b : ndarray, shape (C_out,) or None
    dW, db : ndarray or None
        Gradients from the last :meth:`backward`.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import ConvTranspose2D
    >>> up = ConvTranspose2D(16, 8, kernel_size=4, stride=2, padding=1, rng=0)
    >>> up
    ConvTranspose2D(16, 8, kernel_size=(4, 4), stride=(2, 2), padding=1)
    >>> y = up(np.ones((2, 16, 5, 5), np.float32))
    >>> y.shape
    (2, 8, 10, 10)
    >>> up.backward(np.ones_like(y)).shape, up.dW.shape, up.db.shape
    ((2, 16, 5, 5), (16, 8, 4, 4), (8,))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        output_padding: IntPair = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: IntPair = 1,
        dtype=np.float32,
        rng=None,
        *,
        algorithm: str = "auto",
        n_threads: int | None = None,
    ) -> None:
        in_channels, out_channels, (kh, kw), groups, dtype = _layer_args(
            in_channels, out_channels, kernel_size, groups, bias, dtype)
        self.stride = as_positive_pair(stride, "stride")
        self.dilation = as_positive_pair(dilation, "dilation")
        # Validate everything now, on a stand-in input big enough for any padding
        # (transposed_geometry raises the string-padding error before parsing pads).
        pads = (0,) * 4 if isinstance(padding, str) else as_padding(padding, "padding")
        probe = max(pads[0] + pads[1], pads[2] + pads[3]) + 1
        geometry = transposed_geometry((0, in_channels, probe, probe),
                                       (in_channels, out_channels // groups, kh, kw),
                                       self.stride, padding, output_padding, groups,
                                       self.dilation)
        self.output_padding = as_pair(output_padding, "output_padding")
        self.padding = pads
        self.groups = groups
        W, b = _uniform_init(rng, out_channels // groups * kh * kw,
                             (in_channels, out_channels // groups, kh, kw), out_channels, bias,
                             dtype)
        self.W, self.b = W, b
        _transposed_algorithm(algorithm, geometry)   # raises for a layer it cannot run
        self.algorithm = algorithm
        self._weight_cache = TransformedWeights()
        effective_n_threads(n_threads)
        self.n_threads = n_threads
        self.dW = None
        self.db = None
        self._x = None

    @property
    def in_channels(self) -> int:
        return self.W.shape[0]

    @property
    def out_channels(self) -> int:
        return self.W.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.W.shape[2], self.W.shape[3])

    _backward_function = staticmethod(conv_transpose2d_backward)

    def _forward(self, x):
        # the phase forward's transformed filters are kept between calls (inference)
        return _conv_transpose2d(x, self.W, self.b, self.stride, self.padding,
                                 self.output_padding, self.groups, self.dilation,
                                 self.algorithm, self.n_threads,
                                 weight_cache=self._weight_cache)

    def _arguments(self) -> dict:
        return dict(stride=self.stride, padding=self.padding,
                    output_padding=self.output_padding, groups=self.groups,
                    dilation=self.dilation, algorithm=self.algorithm,
                    n_threads=self.n_threads)

    def __repr__(self) -> str:
        parts = [str(self.in_channels), str(self.out_channels), f"kernel_size={self.kernel_size}"]
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride}")
        padding = _padding_repr(self.padding)
        if padding:
            parts.append(padding)
        if self.output_padding != (0, 0):
            parts.append(f"output_padding={_short(self.output_padding)}")
        parts += self._common_repr_parts()
        if self.algorithm != "auto":
            parts.append(f"algorithm={self.algorithm!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _short(pair: tuple[int, int]):
    """``2`` for ``(2, 2)``, the pair otherwise (PyTorch's repr style)."""
    return pair[0] if pair[0] == pair[1] else pair


class _Pool2D:
    """Shared argument handling of :class:`MaxPool2D` and :class:`AvgPool2D`."""

    def __init__(self, kernel_size, stride, padding, ceil_mode, n_threads) -> None:
        self.kernel_size = as_positive_pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else as_positive_pair(stride, "stride")
        self.padding = as_pool_padding(padding, self.kernel_size)
        self.ceil_mode = as_bool(ceil_mode, "ceil_mode")
        effective_n_threads(n_threads)  # reject n_threads=0 or a non-int now, not at forward
        self.n_threads = n_threads
        self._x = None

    def _repr_parts(self) -> list[str]:
        parts = [f"kernel_size={_short(self.kernel_size)}"]
        if self.stride != self.kernel_size:
            parts.append(f"stride={_short(self.stride)}")
        if self.padding != (0, 0):
            parts.append(f"padding={_short(self.padding)}")
        return parts

    def _input(self, name: str):
        if self._x is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self._x


class MaxPool2D(_Pool2D):
    """2-D max pooling layer (:func:`fastconv.max_pool2d`) with ``forward``/``backward``.

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Default: ``kernel_size``.
    padding : int or (int, int), default 0
        -inf padding, at most half the kernel size.
    dilation : int or (int, int), default 1
    ceil_mode : bool, default False
    n_threads : int, optional
        OpenMP threads for every call.

    Notes
    -----
    :meth:`forward` keeps the argmax indices (int64, the size of the output)
    and a reference to its input for :meth:`backward`, which then only
    scatters the gradient.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import MaxPool2D
    >>> pool = MaxPool2D(3, stride=2, padding=1)
    >>> pool
    MaxPool2D(kernel_size=3, stride=2, padding=1)
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> pool(x)
    array([[[[ 5.,  7.],
             [13., 15.]]]])
    >>> pool.backward(np.ones((1, 1, 2, 2)))[0, 0]
    array([[0., 0., 0., 0.],
           [0., 1., 0., 1.],
           [0., 0., 0., 0.],
           [0., 1., 0., 1.]])
    """

    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
                 dilation: IntPair = 1, ceil_mode: bool = False, *,
                 n_threads: int | None = None) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, n_threads)
        self.dilation = as_positive_pair(dilation, "dilation")
        self.indices = None

    def _args(self):
        return (self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Pool ``x`` (N, C, H, W) and keep the argmax for :meth:`backward`."""
        y, self.indices = max_pool2d(x, *self._args(), return_indices=True,
                                     n_threads=self.n_threads)
        self._x = x
        return y

    __call__ = forward

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """``dx``: each ``dout`` element added at its window's argmax."""
        x = self._input("x")
        return max_pool2d_backward(dout, x, *self._args(), indices=self.indices,
                                   n_threads=self.n_threads)

    def __repr__(self) -> str:
        parts = self._repr_parts()
        if self.dilation != (1, 1):
            parts.append(f"dilation={_short(self.dilation)}")
        if self.ceil_mode:
            parts.append("ceil_mode=True")
        return f"{type(self).__name__}({', '.join(parts)})"


class AvgPool2D(_Pool2D):
    """2-D average pooling layer (:func:`fastconv.avg_pool2d`) with ``forward``/``backward``.

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Default: ``kernel_size``.
    padding : int or (int, int), default 0
    ceil_mode : bool, default False
    count_include_pad : bool, default True
    n_threads : int, optional

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import AvgPool2D
    >>> pool = AvgPool2D(2, count_include_pad=False)
    >>> pool
    AvgPool2D(kernel_size=2, count_include_pad=False)
    >>> pool(np.arange(16.0).reshape(1, 1, 4, 4))
    array([[[[ 2.5,  4.5],
             [10.5, 12.5]]]])
    >>> pool.backward(np.ones((1, 1, 2, 2)))[0, 0, 0]
    array([0.25, 0.25, 0.25, 0.25])
    """

    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True, *,
                 n_threads: int | None = None) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, n_threads)
        self.count_include_pad = as_bool(count_include_pad, "count_include_pad")

    def _args(self):
        return (self.kernel_size, self.stride, self.padding, self.ceil_mode,
                self.count_include_pad)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Average-pool ``x`` (N, C, H, W); keeps a reference to it for :meth:`backward`."""
        y = avg_pool2d(x, *self._args(), n_threads=self.n_threads)
        self._x = x
        return y

    __call__ = forward

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """``dx``: each ``dout`` element spread evenly (by PyTorch's divisor) over its window."""
        x = self._input("x")
        return avg_pool2d_backward(dout, x, *self._args(), n_threads=self.n_threads)

    def __repr__(self) -> str:
        parts = self._repr_parts()
        if self.ceil_mode:
            parts.append("ceil_mode=True")
        if not self.count_include_pad:
            parts.append("count_include_pad=False")
        return f"{type(self).__name__}({', '.join(parts)})"


class ReLU:
    """Rectified linear unit layer (:func:`fastconv.relu`), any input shape.

    Parameters
    ----------
    n_threads : int, optional

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import ReLU
    >>> act = ReLU()
    >>> act
    ReLU()
    >>> act(np.array([-1.0, 2.0]))
    array([0., 2.])
    >>> act.backward(np.array([5.0, 5.0]))
    array([0., 5.])
    """

    def __init__(self, *, n_threads: int | None = None) -> None:
        effective_n_threads(n_threads)  # reject n_threads=0 or a non-int now, not at forward
        self.n_threads = n_threads
        self._x = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``max(x, 0)``; keeps a reference to ``x`` for :meth:`backward`."""
        y = relu(x, n_threads=self.n_threads)
        self._x = x
        return y

    __call__ = forward

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """``dout`` where the forward input was positive, else 0."""
        if self._x is None:
            raise RuntimeError("ReLU.backward called before forward")
        return relu_backward(dout, self._x, n_threads=self.n_threads)

    def __repr__(self) -> str:
        return "ReLU()"
