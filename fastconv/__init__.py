"""fastconv: fast CPU 2-D convolution for NumPy.

Cython + OpenMP im2col/col2im tiles feeding BLAS gemm (sgemm for float32,
dgemm for float64), behind a small NumPy-native API:

* :func:`conv2d`, :func:`conv2d_backward` - functional forward and backward;
* :class:`Conv2D` - a layer holding ``W``, ``b``, ``dW``, ``db``;
* :func:`im2col`, :func:`col2im` - the seeds' batch layout, Cython-fast;
* :mod:`fastconv.reference` - the pure-NumPy oracle the tests compare against.
"""

from fastconv import reference
from fastconv._functional import col2im, conv2d, conv2d_backward, im2col
from fastconv._layers import Conv2D

__version__ = "0.1.0"

__all__ = ["Conv2D", "col2im", "conv2d", "conv2d_backward", "im2col", "reference"]
