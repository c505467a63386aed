"""``python -m fastconv bench --accuracy``: each algorithm's float32 error, side by side.

For every plain (ungrouped) suite shape and every transposed one whose kernel
is twice its stride, the forward, grad_x and grad_weight are computed in float32
by each algorithm that applies, and compared
with the float64 im2col result (which agrees with the NumPy reference to
~1e-15). The error is ``max|a - b| / max|b|``, the measure the tests use. The
ratio to im2col's error is what issue #6 bounds: Winograd within 10x.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

#: ``(row key, header)`` of the ``--accuracy`` table.
ACCURACY_COLUMNS = (
    ("shape", "shape"),
    ("pass", "pass"),
    ("auto", "auto picks"),
    ("im2col_err", "im2col error"),
    ("winograd_err", "winograd error"),
    ("winograd_vs_im2col", "winograd / im2col"),
    ("direct_err", "direct error"),
    ("direct_vs_im2col", "direct / im2col"),
)


def _applicable(shape) -> list[str]:
    """The explicit algorithms that accept this shape (im2col always does)."""
    import fastconv

    arrays = shape.make_inputs("float32")
    small = arrays["x"][:1]
    found = ["im2col"]
    for algorithm in ("winograd", "direct"):
        try:
            fastconv.conv2d(small, arrays["weight"], None, shape.stride, shape.pad,
                            algorithm=algorithm)
        except ValueError:
            continue
        found.append(algorithm)
    return found


def _auto(geometry, pass_: str) -> str:
    """What ``algorithm="auto"`` runs for one pass of this geometry ("winograd" for a
    strided layer's backward whose 2x2 stride phases run by Winograd)."""
    from fastconv import _stride_phases
    from fastconv._functional import _choose_algorithm, _weight_grad_algorithm

    if pass_ != "forward" and _stride_phases.winograd_pays_off(geometry):
        return "winograd"
    algorithm = _choose_algorithm("auto", geometry, "NCHW", backward=pass_ != "forward")
    if pass_ == "grad_weight":
        return _weight_grad_algorithm("auto", algorithm, geometry)
    return algorithm


def measure_accuracy(shapes: Iterable, threads: int,
                     progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """One row per plain shape and pass (forward, grad_x, grad_weight) with each algorithm's
    error."""
    import fastconv
    from fastconv import _stride_phases
    from fastconv._bench import relative_error
    from fastconv._validation import conv_geometry

    rows = []
    for shape in shapes:
        if shape.transposed and shape.groups == 1:
            rows += _transposed_rows(shape, threads, progress)
            continue
        if not shape.is_plain:
            continue
        a32 = shape.make_inputs("float32")
        a64 = {k: v.astype(np.float64) for k, v in a32.items()}
        geometry = conv_geometry(shape.input_shape, shape.weight_shape, shape.stride, shape.pad, 1)
        s, p = shape.stride, shape.pad
        exact = {
            "forward": fastconv.conv2d(a64["x"], a64["weight"], a64["bias"], s, p,
                                       algorithm="im2col", n_threads=threads),
        }
        exact["grad_x"], exact["grad_weight"], _ = fastconv.conv2d_backward(
            a64["grad_output"], a64["x"], a64["weight"], s, p, algorithm="im2col",
            n_threads=threads)
        # a strided layer's grad_x by stride phases: 'direct' runs them by the pixel-row
        # kernel; 'auto' may run its 2x2 phases by Winograd (with grad_weight's taps)
        phases = _stride_phases.applies(geometry)
        phase_winograd = _stride_phases.winograd_pays_off(geometry)
        for pass_ in ("forward", "grad_x", "grad_weight"):
            row = {"shape": shape.name, "pass": pass_, "auto": _auto(geometry, pass_)}
            algorithms = _applicable(shape)
            if pass_ != "forward" and phase_winograd:
                algorithms = algorithms + ["winograd"]
            for algorithm in algorithms:
                if pass_ == "forward":
                    got = fastconv.conv2d(a32["x"], a32["weight"], a32["bias"], s, p,
                                          algorithm=algorithm, n_threads=threads)
                elif (algorithm == "direct" and pass_ == "grad_x" and row["auto"] != "direct"
                      and not phases):
                    continue            # an explicit 'direct' runs im2col's grad_x
                else:
                    # the stride phases' Winograd is auto's; a direct grad_x of an unstrided
                    # layer is auto's too (a 1x1 layer's, read in place)
                    run = algorithm
                    if algorithm == "winograd" and phase_winograd:
                        run = "auto"
                    elif algorithm == "direct" and pass_ == "grad_x" and not phases:
                        run = "auto"
                    grads = fastconv.conv2d_backward(a32["grad_output"], a32["x"], a32["weight"],
                                                     s, p, algorithm=run, n_threads=threads)
                    got = grads[0] if pass_ == "grad_x" else grads[1]
                row[f"{algorithm}_err"] = relative_error(got, exact[pass_])
            _finish(row, rows, progress)
    return rows


def _finish(row: dict, rows: list, progress) -> None:
    """Add the ratios to im2col's error, append the row and report it."""
    for algorithm in ("winograd", "direct"):
        if row.get(f"{algorithm}_err") is not None:
            row[f"{algorithm}_vs_im2col"] = row[f"{algorithm}_err"] / row["im2col_err"]
    rows.append(row)
    if progress is not None:
        progress(f"{row['shape']} {row['pass']}: " + ", ".join(
            f"{k} {v:.2e}" for k, v in row.items() if k.endswith("_err")))


def _transposed_rows(shape, threads: int, progress) -> list[dict]:
    """The rows of a transposed shape: im2col and, where the kernel is twice the stride,
    the phase convolutions (``algorithm="winograd"``)."""
    import fastconv
    from fastconv import _phases
    from fastconv._bench import relative_error
    from fastconv._transposed import _transposed_algorithm
    from fastconv._validation import transposed_geometry

    a32 = shape.make_inputs("float32")
    a64 = {k: v.astype(np.float64) for k, v in a32.items()}
    geometry = transposed_geometry(shape.input_shape, shape.weight_shape, shape.stride,
                                   shape.pad, 0, 1, 1)
    algorithms = ["im2col"] + (["winograd"] if _phases.applies(geometry) else [])
    s, p = shape.stride, shape.pad

    def passes(arrays, algorithm):
        y = fastconv.conv_transpose2d(arrays["x"], arrays["weight"], arrays["bias"], s, p,
                                      algorithm=algorithm, n_threads=threads)
        grad_x, grad_weight, _ = fastconv.conv_transpose2d_backward(
            arrays["grad_output"], arrays["x"], arrays["weight"], s, p, algorithm=algorithm,
            n_threads=threads)
        return {"forward": y, "grad_x": grad_x, "grad_weight": grad_weight}

    exact = passes(a64, "im2col")
    got = {algorithm: passes(a32, algorithm) for algorithm in algorithms}
    rows = []
    for pass_ in ("forward", "grad_x", "grad_weight"):
        auto = _transposed_algorithm("auto", geometry, backward=pass_ != "forward")
        row = {"shape": shape.name, "pass": pass_, "auto": auto}
        for algorithm in algorithms:
            row[f"{algorithm}_err"] = relative_error(got[algorithm][pass_], exact[pass_])
        _finish(row, rows, progress)
    return rows
