"""fastconv: fast CPU 2-D convolution for NumPy.

Cython + OpenMP im2col/col2im tiles feeding BLAS gemm (sgemm for float32,
dgemm for float64), behind a small NumPy-native API:

* :func:`conv2d`, :func:`conv2d_backward` - functional forward and backward
  (groups/depthwise, padding strings and modes, NCHW or NHWC);
* :func:`conv_transpose2d`, :func:`conv_transpose2d_backward` - transposed convolution;
* :class:`Conv2D`, :class:`ConvTranspose2D` - layers holding ``W``, ``b``, ``dW``, ``db``;
* :class:`MaxPool2D`, :class:`AvgPool2D`, :class:`ReLU` - parameter-free layers;
* :func:`im2col`, :func:`col2im` - the seeds' batch layout, Cython-fast;
* :func:`max_pool2d`, :func:`avg_pool2d`, :func:`global_avg_pool2d`, :func:`relu`
  and their ``*_backward`` - pooling and activations with PyTorch's semantics;
* :mod:`fastconv.reference` - the pure-NumPy oracle the tests compare against.
"""

import os

# libgomp spins ~300k iterations (here: milliseconds) after every parallel
# region before its threads sleep, stealing a core from whatever runs next: a
# multi-threaded np.dot right after a conv ran ~50% slower. A bounded spin keeps
# back-to-back convolutions as fast as before (measured in README "Threads").
# Must be set before the extensions load libgomp; the user's settings win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

from fastconv import reference  # noqa: E402
from fastconv._functional import col2im, conv2d, conv2d_backward, im2col  # noqa: E402
from fastconv._transposed import conv_transpose2d, conv_transpose2d_backward  # noqa: E402
from fastconv._layers import AvgPool2D, Conv2D, ConvTranspose2D, MaxPool2D, ReLU  # noqa: E402
from fastconv._pooling import (  # noqa: E402
    avg_pool2d,
    avg_pool2d_backward,
    global_avg_pool2d,
    global_avg_pool2d_backward,
    max_pool2d,
    max_pool2d_backward,
    relu,
    relu_backward,
)

__version__ = "0.1.0"

__all__ = ["Conv2D", "ConvTranspose2D", "col2im", "conv2d", "conv2d_backward",
           "conv_transpose2d", "conv_transpose2d_backward", "im2col", "reference",
           "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
           "global_avg_pool2d", "global_avg_pool2d_backward", "relu", "relu_backward",
           "MaxPool2D", "AvgPool2D", "ReLU"]
