"""``python -m fastconv bench --accuracy``: each algorithm's float32 error, side by side.

For every plain (ungrouped, not transposed) suite shape, the forward, grad_x
and grad_weight are computed in float32 by each algorithm that applies, and compared
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
    """What ``algorithm="auto"`` runs for one pass of this geometry."""
    from fastconv import _winograd
    from fastconv._functional import _choose_algorithm

    if pass_ == "grad_weight":
        winograd = _winograd.applies(geometry) and _winograd.pays_off_weight_grad(geometry)
        return "winograd" if winograd else "im2col"
    return _choose_algorithm("auto", geometry, "NCHW", backward=pass_ == "grad_x")


def measure_accuracy(shapes: Iterable, threads: int,
                     progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """One row per plain shape and pass (forward, grad_x, grad_weight) with each algorithm's
    error."""
    import fastconv
    from fastconv._bench import relative_error
    from fastconv._validation import conv_geometry

    rows = []
    for shape in shapes:
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
        for pass_ in ("forward", "grad_x", "grad_weight"):
            row = {"shape": shape.name, "pass": pass_, "auto": _auto(geometry, pass_)}
            for algorithm in _applicable(shape):
                if pass_ == "forward":
                    got = fastconv.conv2d(a32["x"], a32["weight"], a32["bias"], s, p,
                                          algorithm=algorithm, n_threads=threads)
                elif algorithm == "direct":
                    continue            # its backward is im2col's
                else:
                    grads = fastconv.conv2d_backward(a32["grad_output"], a32["x"], a32["weight"],
                                                     s, p, algorithm=algorithm,
                                                     n_threads=threads)
                    got = grads[0] if pass_ == "grad_x" else grads[1]
                row[f"{algorithm}_err"] = relative_error(got, exact[pass_])
            for algorithm in ("winograd", "direct"):
                if row.get(f"{algorithm}_err") is not None:
                    row[f"{algorithm}_vs_im2col"] = row[f"{algorithm}_err"] / row["im2col_err"]
            rows.append(row)
            if progress is not None:
                progress(f"{shape.name} {pass_}: " + ", ".join(
                    f"{k} {v:.2e}" for k, v in row.items() if k.endswith("_err")))
    return rows
