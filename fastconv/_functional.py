"""Functional API: validate -> cast/contiguity -> tile plan and workspace -> kernel."""

from __future__ import annotations

import numpy as np

from fastconv import (_blas, _conv, _direct, _im2col, _implicit, _nhwc, _pool, _stride_phases,
                      _tiling, _winograd)
from fastconv._depthwise_kernels import kernels as _depthwise
from fastconv._threads import effective_n_threads, single_threaded_blas
from fastconv._tiling import check_blas_limits, plan
from fastconv._validation import (
    ALGORITHMS,
    as_activation,
    LAYOUTS,
    MAX_SIZE_ARGUMENT,
    ConvGeometry,
    IntPair,
    Padding,
    as_array,
    as_choice,
    as_int,
    as_shape,
    check_array_size,
    check_ndim,
    compute_dtype,
    conv_geometry,
)
from fastconv._workspace import workspace

__all__ = ["conv2d", "conv2d_backward", "im2col", "col2im"]


def _conv_inputs(x, weight, stride, padding, dilation, groups, padding_mode, layout, algorithm,
                 x_name="x", backward=False):
    """Validated arrays, geometry and kernel choice shared by the forward and backward passes.

    The geometry is layout-free: for NHWC input its (N, C, H, W) are read from
    the (N, H, W, C) array.
    """
    layout = as_choice(layout, "layout", LAYOUTS)
    algorithm = as_choice(algorithm, "algorithm", ALGORITHMS)
    x = as_array(x, x_name)
    weight = as_array(weight, "weight")
    check_ndim(x, 4, x_name, "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)")
    check_ndim(weight, 4, "weight", "(F, C/groups, KH, KW)")
    x_shape = x.shape if layout == "NCHW" else (x.shape[0], x.shape[3], x.shape[1], x.shape[2])
    geometry = conv_geometry(x_shape, weight.shape, stride, padding, dilation, groups,
                             padding_mode, string_padding=True)
    check_blas_limits(geometry.weight_shape, geometry.groups, layout)
    itemsize = np.dtype(compute_dtype(x.dtype, weight.dtype)).itemsize
    return x, weight, geometry, layout, _choose_algorithm(algorithm, geometry, layout, backward,
                                                          itemsize)


def _choose_algorithm(algorithm: str, geometry: ConvGeometry, layout: str,
                      backward: bool = False, itemsize: int = 4) -> str:
    """The kernel family to run: ``'direct'`` (depthwise, NCHW; plain layers by the row
    kernel, the pixel-row kernel or, 1x1, the implicit GEMM; NHWC ones' forward by the
    pixel-row kernel),
    ``'winograd'`` (3x3, stride 1, dilation 1) or ``'im2col'``;
    ``backward`` asks for the backward pass, whose Winograd part (grad_x) pays off on
    other shapes than the forward; ``itemsize`` is the compute dtype's (4: float32).

    "auto" takes the depthwise kernel for grouped depthwise layers: they are
    memory-bound, and im2col + GEMM would run one tiny GEMM per channel. Plain
    layers with few input channels (``fastconv._direct.pays_off``) take the
    dense direct kernel in the forward, whose im2col GEMM would be too shallow; NHWC
    layers take their own where ``fastconv._direct.pays_off_nhwc`` and Winograd does not.
    Winograd is taken where ``fastconv._winograd.pays_off``
    (``pays_off_input_grad``) says it measured faster; then the forward of other
    plain layers takes the direct kernel where ``fastconv._implicit.pays_off``, and the
    grad_x of 1x1 layers where ``fastconv._implicit.pointwise_input_grad_pays_off``.
    """
    depthwise = geometry.is_depthwise and geometry.groups > 1
    # channels-last: plain layers' forward by the NHWC row kernel (its backward im2col)
    direct_applies = ((layout == "NCHW" and depthwise) or _direct.applies(geometry))
    # channels-last: plain layers (fastconv._winograd.forward_nhwc, backward_input_nhwc)
    winograd_applies = _winograd.applies(geometry) and (layout == "NCHW" or geometry.groups == 1)
    if algorithm == "direct" and not direct_applies:
        raise ValueError(
            "algorithm='direct' is the depthwise kernel (groups == C, layout='NCHW') or the "
            "dense kernel (groups == 1, its taps spanning at most 2*W + 64 padded columns "
            f"per row), got groups={geometry.groups}, C={geometry.C}, "
            f"layout={layout!r}, row span {_direct.row_span(geometry)} for W={geometry.W}"
        )
    if algorithm == "winograd" and not winograd_applies:
        raise ValueError(
            "algorithm='winograd' needs a 3x3 kernel, stride 1, dilation 1 and layout='NCHW' "
            "(with layout='NHWC': groups=1 layers), "
            f"got kernel {geometry.KH}x{geometry.KW}, "
            f"stride={(geometry.stride_h, geometry.stride_w)}, "
            f"dilation={(geometry.dilation_h, geometry.dilation_w)}, layout={layout!r}, "
            f"groups={geometry.groups}"
        )
    if algorithm == "winograd" and layout == "NHWC" and backward:
        # channels-last: grad_x by Winograd where it can (zero padding), grad_weight im2col
        nhwc_input = geometry.padding_mode == "zeros" and _winograd.fits_input_grad(geometry)
        return "winograd" if nhwc_input else "im2col"
    if algorithm == "winograd" and not backward and not _winograd.fits(geometry):
        # (the backward falls back to im2col for grad_x, see conv2d_backward)
        raise ValueError(
            f"algorithm='winograd' needs ceil(OW/2) <= the BLAS limit "
            f"{_tiling.BLAS_INT_MAX} (a tile row's tiles are one BLAS leading dimension), "
            f"got OW={geometry.OW} (x.shape={geometry.input_shape})"
        )
    if algorithm == "auto":
        if layout == "NCHW" and depthwise:
            return "direct"
        if layout == "NCHW" and not backward and _direct.pays_off(geometry):
            return "direct"
        if layout == "NCHW":
            pays_off = _winograd.pays_off_input_grad if backward else _winograd.pays_off
        else:
            pays_off = (_winograd.pays_off_input_grad_nhwc if backward
                        else _winograd.pays_off_nhwc)
        fits = _winograd.fits_input_grad if backward else _winograd.fits
        if winograd_applies and pays_off(geometry) and fits(geometry):
            return "winograd"
        if layout == "NHWC" and not backward and _direct.pays_off_nhwc(geometry):
            return "direct"
        if (layout == "NCHW" and direct_applies and not backward
                and _implicit.pays_off(geometry, itemsize)):
            return "direct"
        if (layout == "NCHW" and direct_applies and backward
                and _implicit.pointwise_input_grad_pays_off(geometry, itemsize)):
            return "direct"             # grad_x: a 1x1 layer on dY, read in place
        if (layout == "NCHW" and direct_applies and backward
                and _stride_phases.pays_off(geometry, itemsize)):
            return "direct"             # grad_x: by stride phases
        return "im2col"
    return algorithm


def _weight_grad_algorithm(requested: str, algorithm: str, geometry: ConvGeometry,
                           itemsize: int = 4) -> str:
    """The kernel family of a plain or grouped NCHW layer's grad_weight, which pays off on
    its own shapes: with ``algorithm="auto"`` it is chosen apart from grad_x's
    (``algorithm``, from :func:`_choose_algorithm`); explicit algorithms apply to both
    where they can, Winograd's F(3x3, 2x2) only within the BLAS limit; 'direct' runs the
    row kernel's weight gradient up to ``_direct.AUTO_MAX_CHANNELS`` input channels (on
    resnet-3x3-s2's 128 it took 2x im2col's time) and the implicit one
    (``fastconv._implicit.backward_weight``) on other plain layers, which 'auto' takes
    where :func:`fastconv._implicit.pays_off_weight_grad`."""
    if requested == "auto":
        if _direct.pays_off(geometry):
            return "direct"
        if (_winograd.applies(geometry) and _winograd.pays_off_weight_grad(geometry)
                and _winograd.fits(geometry)):
            return "winograd"
        if _implicit.pays_off_weight_grad(geometry, itemsize):
            return "direct"
        return "im2col"
    if algorithm == "winograd" and not _winograd.fits(geometry):
        return "im2col"
    if algorithm == "direct" and not (_direct.pays_off(geometry)
                                      or _implicit.applies(geometry)):
        return "im2col"
    return algorithm


def _relu_in_place(y: np.ndarray, n_threads: int) -> np.ndarray:
    """The ReLU of a result the kernel could not fuse it into (NHWC, depthwise)."""
    flat = y.reshape(-1)
    _pool.relu_forward(flat, flat, n_threads)
    return y


def _bias_gradient_wanted(bias, F: int) -> bool:
    """``conv2d_backward(..., bias=...)``: True/False, None (no bias) or the forward's bias."""
    if bias is None:
        return False
    if isinstance(bias, (bool, np.bool_)):
        return bool(bias)
    bias = as_array(bias, "bias")
    if bias.shape != (F,):
        raise ValueError(f"bias must have shape ({F},) (one per filter), got {bias.shape}")
    return True


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


#: Weights of fewer elements are transposed in the calling thread: waking the
#: OpenMP workers costs more than the copy.
PARALLEL_TRANSPOSE_SIZE = 1 << 16


def transposed_weight(w2d: np.ndarray, groups: int, dtype: np.dtype,
                      n_threads: int) -> np.ndarray | None:
    """Each group's (Fg, Kg) block of ``w2d`` (F, Kg) transposed, stacked (groups*Kg, Fg),
    for ``_conv.backward_input(..., transposed_weight=True)``: its GEMMs then multiply
    row-major operands as they lie (BLAS packs rows of contiguous values; fastconv's own
    kernel, where it runs, reads them in place). In a reused workspace (a fresh array
    would page-fault on every call), valid until the next call on this thread. None
    where Fg, the rows' length and so a BLAS leading dimension, passes the 32-bit limit:
    the weight is then used as it is."""
    F, Kg = w2d.shape
    if F // groups > _tiling.BLAS_INT_MAX:
        return None
    wt = workspace("transposed-weight", dtype, w2d.size).reshape(groups * Kg, -1)
    _conv.transpose_weight(w2d, wt, groups,
                           n_threads if w2d.size >= PARALLEL_TRANSPOSE_SIZE else 1)
    return wt


#: Where ``_conv.backward_weight`` keeps its sums transposed for the own GEMM kernel:
#: at most this many filters per group (their dY rows are the panels it transposes) ...
OWN_WEIGHT_GRAD_MAX_FILTERS = 128
#: ... and at least this many sums per group (Fg * Kg).
OWN_WEIGHT_GRAD_MIN_SUMS = 1024


def weight_sums_transposed(Fg: int, Kg: int, dtype: np.dtype) -> bool:
    """Whether ``_conv.backward_weight`` keeps its sums transposed (``transposed_sums``):
    its GEMM then runs by fastconv's own kernel, which reads the column tile in place
    where BLAS packs it. float32 where that kernel runs (``fastconv._blas.own_kernel_on``).

    Measured against BLAS (algorithm="im2col" backward, interleaved, median of 11, 1 / 2
    threads): resnet-1x1 1.09 / 1.12 (its grad_weight GEMM alone 1.2x at 1 thread),
    64 -> 64 3x3 on 56x56 1.12 / 1.14, resnet-stem 1.12 / 1.10, 4 groups 1.24 / 1.25,
    64 -> 8 1.09 / 1.10, 5 -> 64 1.17 / 1.16, 4 -> 32 on 32x32 1.36 / 1.33, 128 -> 128
    stride 2 1.03 / 1.04, 32 -> 128 1x1 1.05 / 1.06. Lost with more filters (128 -> 256
    3x3 0.98 / 0.99, 256 -> 512 1x1 0.97 / 0.96, 512 -> 2048 1x1 0.79 / 0.74: the sums
    outgrow L2 while the kernel's short k blocks reread them) and few sums (lenet's 6 x 25
    0.77, 16 x 25 0.97; cifar-3x3's 32 x 27 0.91-1.00): hence the bounds above.
    """
    return (np.dtype(dtype) == np.float32 and _blas.own_kernel_on()
            and Fg <= OWN_WEIGHT_GRAD_MAX_FILTERS and Fg * Kg >= OWN_WEIGHT_GRAD_MIN_SUMS)


def _plan_and_workspace(geometry: ConvGeometry, dtype: np.dtype, n_threads: int):
    """The tile plan and a scratch array of n_threads equal per-thread slices."""
    KK = geometry.KH * geometry.KW
    tiles = plan(geometry.N, geometry.C, KK, geometry.OH * geometry.OW, dtype.itemsize,
                 n_threads, geometry.is_pointwise)
    per_thread = tiles.workspace_per_thread(geometry.C * KK, geometry.F, geometry.is_pointwise)
    return tiles, workspace("columns", dtype, n_threads * max(per_thread, 1))


def conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    layout: str = "NCHW",
    algorithm: str = "auto",
    activation: str | None = None,
    out: np.ndarray | None = None,
    n_threads: int | None = None,
) -> np.ndarray:
    """2-D convolution (cross-correlation, as in every deep-learning library) of a batch.

    ``y[n, f, oh, ow] = act(bias[f] + sum_{c, kh, kw} weight[f, c, kh, kw] *
    x_padded[n, g*C/groups + c, oh*sh + kh*dh, ow*sw + kw*dw])`` with
    ``g = f // (F/groups)`` the group of filter ``f`` and ``act`` the
    identity or the ReLU (``activation``).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), or (N, H, W, C) with ``layout="NHWC"``
        Input batch.
    weight : ndarray, shape (F, C/groups, KH, KW)
        Filters (this shape in both layouts).
    bias : ndarray, shape (F,), optional
        Added to every output position of each filter.
    stride : int or (int, int), default 1
        Step between windows, ``(sh, sw)``.
    padding : int, (int, int), (int, int, int, int) or str, default 0
        All sides, ``(ph, pw)``, ``(top, bottom, left, right)``, or
        ``'valid'`` (none), ``'full'`` (``d*(k-1)`` on each side) or
        ``'same'`` (TensorFlow's rule, also for stride > 1: the output is
        ``ceil(in / stride)``, the odd pixel of padding goes bottom/right; for
        stride 1 this is PyTorch's ``'same'``).
    dilation : int or (int, int), default 1
        Spacing between kernel taps, ``(dh, dw)``.
    groups : int, default 1
        Channels and filters split into ``groups`` independent convolutions;
        ``groups == C`` is a depthwise convolution (``F = m*C``).
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}, default 'zeros'
        What the padding holds, with PyTorch's meaning. The kernels read the
        border in place; no padded copy of the input is made.
    layout : {'NCHW', 'NHWC'}, default 'NCHW'
        Memory order of ``x`` and of the result. NHWC runs a channels-last
        engine on the array as given (no transposed copy): im2col + GEMM,
        Winograd for the forward and grad_x of plain 3x3 stride-1 layers, and a
        direct kernel for the forward of other plain layers.
    algorithm : {'auto', 'im2col', 'direct', 'winograd'}, default 'auto'
        'direct' is a direct convolution kernel: the depthwise one (groups ==
        C) or, for plain layers (groups == 1), register-blocked ones: a row
        kernel for up to 4 input channels, beyond it a pixel-row kernel (blocks
        of output pixels x filters over padded copies of the input rows), 1x1
        layers an implicit GEMM over stride phase planes (the backward:
        grad_weight by a direct kernel, the rest by im2col); with
        ``layout='NHWC'`` the forward of plain layers by the pixel-row kernel's
        channels-last build (the backward by im2col). 'winograd'
        computes 3x3, stride-1, dilation-1 NCHW convolutions by F(4x4, 3x3)
        (F(3x3, 3x3) or F(2x2, 3x3) where accuracy or a tiny output needs it),
        and the forward and grad_x of such NHWC layers with groups=1 (their
        grad_weight by im2col);
        'im2col' is
        the column-tile + GEMM engine. 'auto' picks 'direct' for depthwise
        layers and plain layers of at most 4 input channels, 'winograd'
        where it measured faster, and 'direct' for the forward of other plain
        layers wider than 1x1 with at most 1.25 MiB of filters (NHWC: at most
        1152 taps C*KH*KW; see the README).
    activation : {None, 'relu'}, default None
        A ReLU applied to each output tile right after the bias, while it is
        in cache (NaN stays NaN). :func:`conv2d_backward` takes the same
        value and the forward's result.
    out : ndarray, optional
        C-contiguous array of the result's shape and dtype to write into (and return).
    n_threads : int, optional
        OpenMP threads: None = all usable cores (honours ``OMP_NUM_THREADS``),
        negative counts back from all cores (-1 = all).

    Returns
    -------
    y : ndarray, shape (N, F, OH, OW), or (N, OH, OW, F) with ``layout="NHWC"``
        ``OH = (H + top + bottom - dh*(KH-1) - 1) // sh + 1`` and likewise ``OW``.
        The dtype follows NumPy promotion of the inputs: float32 stays
        float32, integers and bools compute in float64, float16 in float32.

    Raises
    ------
    TypeError
        Non-array or unsupported dtype (complex, object, str), non-integer
        stride/padding/dilation/groups.
    ValueError
        Wrong ndim, channel mismatch, groups not dividing C and F, bias of the
        wrong length, non-positive stride or dilation, negative padding, an
        unknown padding string, padding_mode, layout, algorithm or activation,
        an algorithm that does not apply to the shape, reflect padding not
        smaller than the input (circular: larger), output size < 1, bad ``out``;
        a filter of more than 2**31 - 1 values (``C/groups*KH*KW``: BLAS takes
        it as one row), or with ``layout='NHWC'`` ``C*KH*KW`` or ``F`` above
        that (every other size is tiled within BLAS's 32-bit limit).

    Notes
    -----
    Each image's output is ``weight.reshape(F, K) @ col`` (one product per
    group) with the column matrix ``col`` of shape (K = C*KH*KW, OH*OW) built
    tile by tile in a per-thread workspace (never for the whole batch).
    Non-contiguous inputs are copied once; inputs are never modified.

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
    >>> fastconv.conv2d(np.zeros((1, 8, 15, 15)), np.zeros((8, 1, 3, 3)), stride=2,
    ...                 padding="same", groups=8).shape
    (1, 8, 8, 8)
    >>> fastconv.conv2d(x, w, padding=(0, 1, 0, 1), padding_mode="replicate")[0, 0, 3]
    array([50., 54., 58., 60.])
    """
    return _conv2d(x, weight, bias, stride, padding, dilation, groups, padding_mode, layout,
                   algorithm, activation, out, n_threads)


def _conv2d(x, weight, bias, stride, padding, dilation, groups, padding_mode, layout, algorithm,
            activation, out, n_threads, weight_cache=None) -> np.ndarray:
    """:func:`conv2d`, with a layer's cache of transformed filters (``weight_cache``)."""
    x, weight, geometry, layout, algorithm = _conv_inputs(
        x, weight, stride, padding, dilation, groups, padding_mode, layout, algorithm)
    relu = as_activation(activation) == "relu"
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
    if layout == "NHWC":
        shape = (shape[0], shape[2], shape[3], shape[1])
    y = np.empty(shape, dtype) if out is None else _check_out(out, shape, dtype)
    if geometry.N == 0:
        return y

    # the caller's arrays, not the contiguous copies: writing out must not change x either
    if out is not None and any(np.may_share_memory(out, a) for a in (x, weight, bias)
                               if a is not None):
        raise ValueError("out must not overlap x, weight or bias")
    xc = np.ascontiguousarray(x, dtype=dtype)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    if layout == "NHWC" and algorithm == "winograd":
        _winograd.forward_nhwc(xc, weight, b, geometry, n_threads, y)
        return _relu_in_place(y, n_threads) if relu else y
    if layout == "NHWC" and algorithm == "direct":
        return _direct.forward_pixel_rows(xc, weight, b, geometry, dtype, n_threads, y,
                                          relu=relu)
    if layout == "NHWC":
        _nhwc.forward(xc, weight, b, geometry, dtype, n_threads, out=y)
        return _relu_in_place(y, n_threads) if relu else y
    if algorithm == "direct" and geometry.groups == 1:
        if _implicit.preferred(geometry):
            wpack = None if weight_cache is None else weight_cache.get_or_make(
                weight, ("implicit", np.dtype(dtype)), lambda w: _direct.pack_weight(w, dtype))
            return _implicit.forward(xc, weight, b, geometry, dtype, n_threads, y, relu=relu,
                                     wpack=wpack)
        if geometry.C > _direct.AUTO_MAX_CHANNELS:
            # wider than 1x1 (fastconv._implicit.WIDER_BY_PIXEL_ROWS): NCHW pixel rows
            wpack = None if weight_cache is None else weight_cache.get_or_make(
                weight, ("pixel-rows", np.dtype(dtype)),
                lambda w: _direct.pack_weight_rows(w, dtype, layout="NCHW"))
            return _direct.forward_pixel_rows(xc, weight, b, geometry, dtype, n_threads, y,
                                              relu=relu, layout="NCHW", wpack=wpack)
        return _direct.forward(xc, weight, b, geometry, dtype, n_threads, y, relu=relu)
    if algorithm == "direct":
        w = np.ascontiguousarray(weight, dtype=dtype).reshape(geometry.F, -1)
        _depthwise.forward(xc, w, b, y, geometry, n_threads)
        return _relu_in_place(y, n_threads) if relu else y
    if algorithm == "winograd":
        m = _winograd.choose_m(geometry)
        U = None if weight_cache is None else weight_cache.get(weight, geometry.groups, m, dtype,
                                                                n_threads)
        return _winograd.forward(xc, weight, b, geometry, dtype, n_threads, y, relu=relu, m=m,
                                 U=U)
    w2d = np.ascontiguousarray(weight, dtype=dtype).reshape(geometry.F, -1)
    tiles, scratch = _plan_and_workspace(geometry, dtype, n_threads)
    with single_threaded_blas:
        _conv.forward(xc, w2d, b, y.reshape(geometry.N, geometry.F, -1), scratch, geometry,
                      tiles.images_per_tile, tiles.tile_p, n_threads, relu)
    return y


def conv2d_backward(
    grad_output: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    layout: str = "NCHW",
    algorithm: str = "auto",
    bias=True,
    activation: str | None = None,
    output: np.ndarray | None = None,
    n_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gradients of :func:`conv2d` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_output : ndarray, shape (N, F, OH, OW), or (N, OH, OW, F) with ``layout="NHWC"``
        Gradient of the loss with respect to the convolution's output.
    x : ndarray, shape (N, C, H, W), or (N, H, W, C) with ``layout="NHWC"``
        The forward pass's input.
    weight : ndarray, shape (F, C/groups, KH, KW)
        The forward pass's filters.
    stride, padding, dilation, groups, padding_mode, layout, algorithm
        As given to :func:`conv2d`.
    bias : bool, None or ndarray, default True
        Whether the forward pass had a bias: False or None skip its gradient
        (``grad_bias`` is then None); the forward's bias array counts as True.
    activation : {None, 'relu'}, default None
        The forward's activation. With 'relu', ``grad_output`` is the gradient
        with respect to the activated output and is masked where ``output``
        (the forward's result) is not positive.
    output : ndarray, optional
        The forward's result, required with ``activation='relu'``.
    n_threads : int, optional
        As in :func:`conv2d`.

    Returns
    -------
    grad_x : ndarray, the shape of ``x``
        ``col2im(weight.reshape(F, K).T @ dY)`` per image (per group): the
        full convolution of dY with the 180-degree-rotated kernel. With a
        padding_mode other than 'zeros', the gradient of each padding pixel
        is added to the input pixel it copied.
    grad_weight : ndarray, shape (F, C/groups, KH, KW)
        ``sum_n dY[n] @ col[n].T``.
    grad_bias : ndarray, shape (F,), or None
        ``grad_output`` summed over all but the channel axis; None when
        ``bias`` is False or None.

    Raises
    ------
    TypeError, ValueError
        As :func:`conv2d`, and when ``grad_output`` (or ``output``) does not
        have the shape of the forward output, or ``activation='relu'`` comes
        without ``output``.

    Notes
    -----
    The column tiles are recomputed rather than kept from the forward pass,
    grad_weight is summed per thread and reduced at the end, and grad_x is
    split by (image, channel block) so that col2im never races. With
    ``algorithm='winograd'`` grad_x (a 3x3 stride-1 convolution of dY with the
    rotated kernel) runs by Winograd too when ``padding_mode='zeros'``, and by
    im2col otherwise (or where its GEMMs would pass the 32-bit BLAS limit:
    ``W > 2**32`` or ``F/groups > 2**31 - 1``); grad_weight runs by F(3x3, 2x2)
    (every padding mode). With ``algorithm='direct'`` grad_weight runs by the
    row kernel up to 4 input channels and by the implicit GEMM over column-tap
    planes beyond (grad_x by im2col). ``'auto'`` decides grad_x and grad_weight
    separately.

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
    >>> fastconv.conv2d_backward(dy, x, w, bias=False)[2] is None
    True
    """
    return _conv2d_backward(grad_output, x, weight, stride, padding, dilation, groups,
                            padding_mode, layout, algorithm, bias, activation, output, n_threads)


def _conv2d_backward(grad_output, x, weight, stride, padding, dilation, groups, padding_mode,
                     layout, algorithm, bias, activation, output, n_threads, weight_cache=None):
    """:func:`conv2d_backward`, with a layer's cache of transformed filters (``weight_cache``)."""
    requested = algorithm
    x, weight, geometry, layout, algorithm = _conv_inputs(
        x, weight, stride, padding, dilation, groups, padding_mode, layout, algorithm,
        backward=True)
    grad_output = as_array(grad_output, "grad_output")
    expected = geometry.output_shape
    if layout == "NHWC":
        expected = (expected[0], expected[2], expected[3], expected[1])
    if grad_output.shape != expected:
        raise ValueError(
            f"grad_output must have the forward output's shape {expected} "
            f"(x.shape={x.shape}, weight.shape={weight.shape}), got {grad_output.shape}"
        )
    relu = as_activation(activation) == "relu"
    if relu:
        if output is None:
            raise ValueError("activation='relu' needs output=, the forward's result, to "
                             "mask grad_output where the ReLU was inactive")
        output = as_array(output, "output")
        if output.shape != expected:
            raise ValueError(f"output must have the forward output's shape {expected}, "
                             f"got {output.shape}")
    with_bias = _bias_gradient_wanted(bias, geometry.F)
    dtype = compute_dtype(grad_output.dtype, x.dtype, weight.dtype)
    n_threads = effective_n_threads(n_threads)
    if relu:
        # dL/dz = dL/dy where y = relu(z) > 0: one pass, into a new array (inputs stay as given)
        masked = np.empty(expected, dtype)
        _pool.relu_backward(np.ascontiguousarray(grad_output, dtype=dtype).reshape(-1),
                            np.ascontiguousarray(output, dtype=dtype).reshape(-1),
                            masked.reshape(-1), n_threads)
        grad_output = masked
    if layout == "NHWC":
        return _nhwc.backward(grad_output, x, weight, geometry, dtype, n_threads,
                              with_bias=with_bias, winograd_input=algorithm == "winograd")
    N, F = geometry.N, geometry.F
    Kg = geometry.C // geometry.groups * geometry.KH * geometry.KW
    grad_x = np.empty(geometry.input_shape, dtype)
    # grad_weight and grad_bias are reduced together from one buffer of F*Kg + F
    weight_and_bias = np.empty(F * Kg + F, dtype)
    grad_weight = weight_and_bias[: F * Kg].reshape(geometry.weight_shape)
    grad_bias = weight_and_bias[F * Kg:] if with_bias else None
    if N == 0:
        weight_and_bias.fill(0)
        return grad_x, grad_weight, grad_bias

    xc = np.ascontiguousarray(x, dtype=dtype)
    dy = np.ascontiguousarray(grad_output, dtype=dtype)
    w2d = np.ascontiguousarray(weight, dtype=dtype).reshape(F, Kg)
    if algorithm == "direct" and geometry.groups > 1:
        _depthwise.backward(xc, w2d, dy, grad_x, grad_weight.reshape(F, -1), grad_bias,
                            geometry, n_threads)
        return grad_x, grad_weight, grad_bias
    if (requested == "auto" and algorithm == "direct"
            and _stride_phases.winograd_pays_off(geometry, np.dtype(dtype).itemsize)):
        # a strided layer's 2x2 phases by Winograd, grad_x and grad_weight together
        _stride_phases.backward(dy, xc, w2d.reshape(geometry.weight_shape), geometry, dtype,
                                n_threads, grad_x, grad_weight)
        if with_bias:
            _conv.channel_sums(dy.reshape(N, F, -1), grad_bias, n_threads)
        return grad_x, grad_weight, grad_bias
    winograd_input = (algorithm == "winograd" and geometry.padding_mode == "zeros"
                      and _winograd.fits_input_grad(geometry))
    # grad_x without a column matrix: by Winograd, by stride phases, or (a 1x1 layer's
    # with "auto") by the implicit kernel on dY in place
    phases_input = algorithm == "direct" and _stride_phases.applies(geometry)
    in_place_input = winograd_input or (algorithm == "direct" and (
        phases_input or requested == "auto"))
    weight_algorithm = _weight_grad_algorithm(requested, algorithm, geometry,
                                              np.dtype(dtype).itemsize)
    direct_weight = weight_algorithm == "direct"
    winograd_weight = weight_algorithm == "winograd"
    if direct_weight and _direct.pays_off(geometry):
        _direct.backward_weight(xc, dy, geometry, dtype, n_threads, grad_weight.reshape(-1))
    elif direct_weight:
        _implicit.backward_weight(xc, dy, geometry, dtype, n_threads, grad_weight.reshape(-1))
    elif winograd_weight:
        _winograd.backward_weight(xc, dy, geometry, n_threads, grad_weight)
    if with_bias and (direct_weight or winograd_weight):
        _conv.channel_sums(dy.reshape(N, F, -1), grad_bias, n_threads)
    if not ((direct_weight or winograd_weight) and in_place_input):
        tiles, scratch = _plan_and_workspace(geometry, dtype, n_threads)
    if not (direct_weight or winograd_weight):
        partial = workspace("partial", dtype, n_threads * (F * Kg + F)).reshape(n_threads, -1)
        Fg = F // geometry.groups
        transposed = weight_sums_transposed(Fg, Kg, dtype)
        with single_threaded_blas:
            _conv.backward_weight(xc, dy.reshape(N, F, -1), partial, scratch, geometry,
                                  tiles.images_per_tile, tiles.tile_p, n_threads,
                                  transposed_sums=transposed)
        _conv.reduce_rows(partial, weight_and_bias, n_threads,
                          *((geometry.groups, Fg, Kg) if transposed else ()))
    if phases_input:
        _stride_phases.backward_input(dy, weight, geometry, dtype, n_threads, grad_x)
    elif requested == "auto" and algorithm == "direct":
        # (otherwise only a 1x1 layer's grad_x, see _choose_algorithm)
        _implicit.backward_input_in_place(dy, w2d, geometry, dtype, n_threads, grad_x)
    elif not winograd_input:
        with single_threaded_blas:
            wt = transposed_weight(w2d, geometry.groups, dtype, n_threads)
            _conv.backward_input(w2d if wt is None else wt, dy.reshape(N, F, -1), grad_x,
                                 scratch, geometry, tiles.images_per_tile, tiles.tile_p,
                                 tiles.c_block, n_threads, transposed_weight=wt is not None)
    else:
        m = _winograd.choose_m_input_grad(geometry)
        U = None if weight_cache is None else weight_cache.get(
            weight, geometry.groups, m, dtype, n_threads, for_input_grad=True)
        _winograd.backward_input(dy, weight, geometry, dtype, n_threads, grad_x, m=m, U=U)
    return grad_x, grad_weight, grad_bias


def _seed_geometry(shape, filter_h, filter_w, stride, pad, x_name) -> ConvGeometry:
    """Geometry of the seeds' im2col/col2im (no dilation, one pseudo-filter)."""
    for value, name in ((filter_h, "filter_h"), (filter_w, "filter_w")):
        if as_int(value, name) < 1:
            raise ValueError(f"{name} must be positive, got {value!r}")
        if value > MAX_SIZE_ARGUMENT:
            raise ValueError(f"{name}={value!r} is too large: at most 2**31 - 1")
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
    shape = (geometry.N * geometry.OH * geometry.OW, K)
    check_array_size(shape, "col", f"input_data.shape={x.shape}, filter_h={filter_h}, "
                     f"filter_w={filter_w}, stride={stride!r}, pad={pad!r}")
    col = np.empty(shape, dtype)
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
    check_array_size(input_shape, "the image", f"input_shape={input_shape}")
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
