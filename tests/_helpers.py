"""Comparison helpers with dtype-aware tolerances."""

import threading

import numpy as np


def relative_error(actual, expected, magnitude=None) -> float:
    """max |actual - expected| relative to max |expected| (the scale of the result).

    ``magnitude``, if given, replaces ``expected`` as the scale: the same
    computation on the inputs' absolute values, i.e. the sum of |terms| behind
    each element. Rounding error is bounded by that, not by the result, and a
    sum of a few terms that nearly cancel (a grad_bias of 8 values) has a tiny
    result but the rounding error of its largest term.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    scale = np.abs(expected if magnitude is None else np.asarray(magnitude, np.float64)).max()
    scale = max(scale, np.finfo(np.float64).tiny)
    return float(np.abs(actual - expected).max() / scale)


def tolerance(dtype, reduction_length: int) -> float:
    """float64: 1e-10 flat (far above what the kernels show, ~1e-15); float32: grows
    with the length of the sums behind each element (rounding error ~ sqrt(n) eps)."""
    if np.dtype(dtype) == np.float64:
        return 1e-10
    return 2e-6 * max(1.0, np.sqrt(reduction_length))


def assert_matches(actual, expected, dtype, reduction_length: int, what: str = "",
                   magnitude=None) -> None:
    assert np.asarray(actual).dtype == np.dtype(dtype), (what, np.asarray(actual).dtype, dtype)
    err = relative_error(actual, expected, magnitude)
    tol = tolerance(dtype, reduction_length)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def assert_forward_matches_reference(x, weight, bias, dtype, reduction_length: int,
                                     **args) -> None:
    """``fastconv.conv2d(x, weight, bias, **args)`` against the reference; where the
    reference refuses the arguments (reflect padding >= the input), fastconv must refuse
    them too, with the same message."""
    import pytest

    import fastconv
    from fastconv import reference

    conv_args = {k: v for k, v in args.items() if k != "algorithm"}
    try:
        want = reference.conv2d(x, weight, bias, **conv_args)
    except ValueError as error:
        with pytest.raises(ValueError, match=str(error).split(":")[0][:20]):
            fastconv.conv2d(x, weight, bias, **args)
        return
    assert_matches(fastconv.conv2d(x, weight, bias, **args), want, dtype, reduction_length,
                   "forward")


def algorithms_for(kernel, stride=1, dilation=1, layout="NCHW", depthwise=False, groups=1):
    """Every explicit ``algorithm`` that applies to a layer of this shape (mirrors
    ``fastconv._functional._choose_algorithm``): each is tested on the same grid."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    found = ["im2col"]
    if (layout == "NCHW" and depthwise) or groups == 1:
        found.append("direct")
    if (layout == "NCHW" and pair(kernel) == (3, 3) and pair(stride) == (1, 1)
            and pair(dilation) == (1, 1)):
        found.append("winograd")
    return found


def random_problem(rng, N, C, H, W, F, KH, KW, dtype):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    weight = rng.standard_normal((F, C, KH, KW)).astype(dtype)
    bias = rng.standard_normal(F).astype(dtype)
    return x, weight, bias


def run_in_thread(function):
    """``function()`` run in a fresh Python thread (fresh thread-local workspaces, not the
    main thread); its result is returned and its exception re-raised here."""
    result, errors = [], []

    def run():
        try:
            result.append(function())
        except BaseException as error:      # surfaced in the caller's thread below
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def spy_transposed_sums(monkeypatch) -> list:
    """A list that gets the ``transposed_sums`` argument of every
    ``fastconv._conv.backward_weight`` call (the call still runs)."""
    from fastconv import _conv

    seen = []
    original = _conv.backward_weight

    def spy(*args, **kwargs):
        seen.append(kwargs.get("transposed_sums", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(_conv, "backward_weight", spy)
    return seen
