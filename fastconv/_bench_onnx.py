"""ONNX Runtime as a peer in ``python -m fastconv bench --compare``.

ONNX Runtime is what a user deploying a NumPy-trained layer would most likely
run instead of fastconv for inference, so the bench times its forward pass
beside fastconv's, in the same process and with the same thread count. It has
no backward here (training needs onnxruntime-training), so only forward rows
get an ORT time. Neither ``onnx`` nor ``onnxruntime`` is a dependency: every
function here returns None when they do not import.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

#: Opset of the one-node models; Conv and ConvTranspose have been stable since 11.
OPSET = 17
#: IR version written into the model: 8 (onnx 1.12) is the first that carries
#: opset 17; a newer onnx package writes its own, newer IR version by default,
#: which an older onnxruntime refuses ("Unsupported model IR version").
IR_VERSION = 8


def import_onnxruntime():
    """``(onnx, onnxruntime)`` if both import, else None."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        return None
    return onnx, onnxruntime


def conv_model(onnx, shape, arrays: dict):
    """A one-node ONNX model computing ``shape``'s forward pass.

    ``X`` is the graph input; the weight and bias are initializers (constants),
    as in a deployed model, so ONNX Runtime may pre-pack them once.

    Parameters
    ----------
    onnx : module
    shape : fastconv._bench.Shape
    arrays : dict
        ``shape.make_inputs(...)``: ``x``, ``weight`` and ``bias`` are used.
    """
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
    element = helper.np_dtype_to_tensor_dtype(x.dtype)
    s, p = shape.stride, shape.pad
    attributes = dict(kernel_shape=[shape.KH, shape.KW], strides=[s, s], pads=[p, p, p, p],
                      group=shape.groups)
    op = "ConvTranspose" if shape.transposed else "Conv"
    node = helper.make_node(op, ["X", "W", "B"], ["Y"], **attributes)
    graph = helper.make_graph(
        [node], f"fastconv-bench-{shape.name}",
        [helper.make_tensor_value_info("X", element, list(x.shape))],
        [helper.make_tensor_value_info("Y", element, list(shape.output_shape))],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def forward_call(modules, shape, arrays: dict, threads: int) -> Optional[Callable[[], object]]:
    """A no-argument call of ONNX Runtime's forward pass of ``shape``, or None.

    The session runs ``threads`` intra-op threads (one inter-op thread, as a
    single node needs) with every graph optimisation on; its output is the
    list ``[y]``. None when ``modules`` is None.
    """
    if modules is None:
        return None
    onnx, onnxruntime = modules
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(
        conv_model(onnx, shape, arrays).SerializeToString(), options,
        providers=["CPUExecutionProvider"])
    feed = {"X": np.ascontiguousarray(arrays["x"])}
    return lambda: session.run(None, feed)
