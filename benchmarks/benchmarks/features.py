"""Features added after the core engine: pooling, depthwise, transposed convolution, NHWC,
algorithms and the fused ReLU.

Each benchmark's ``setup`` looks the feature up on the commit under test
(a function with ``hasattr``, a keyword argument with ``inspect.signature``)
and raises ``NotImplementedError`` when it is missing, so these rows read
"n/a" on older commits and start their graphs on the commit that adds them.
Shapes are the bench rows the feature issues name (#3, #4, #6); float32 only.
"""

import numpy as np

from .common import (
    N_THREADS,
    PASSES,
    SHAPE_NAMES,
    Benchmark,
    get_shape,
    require_functions,
    require_params,
    usable_cpus,
)


def _randn(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


class Pooling(Benchmark):
    """``max_pool2d`` / ``avg_pool2d`` and their backward on 8x64x112x112 (issue #4's rows)."""

    #: name -> (function, kernel_size, stride, padding)
    KINDS = {
        "max 2x2 s2": ("max_pool2d", 2, 2, 0),
        "max 3x3 s2 p1": ("max_pool2d", 3, 2, 1),
        "avg 2x2 s2": ("avg_pool2d", 2, 2, 0),
    }
    params = [tuple(KINDS), PASSES, N_THREADS]
    param_names = ["kind", "pass", "n_threads"]

    def setup(self, kind, pass_, n_threads):
        function, k, s, p = self.KINDS[kind]
        forward, backward = require_functions(function, function + "_backward")
        x = _randn((8, 64, 112, 112))
        kwargs = dict(kernel_size=k, stride=s, padding=p, n_threads=n_threads)
        y = forward(x, **kwargs)
        if pass_ == "forward":
            self.call = lambda: forward(x, **kwargs)
        else:
            g = _randn(y.shape, seed=1)
            self.call = lambda: backward(g, x, **kwargs)
        self.call()

    def time_pool(self, kind, pass_, n_threads):
        self.call()


class Depthwise(Benchmark):
    """mobilenet-dw: 8x256x56x56, 3x3, stride 1, padding 1, groups = 256 (issue #3's row)."""

    params = [PASSES, N_THREADS]
    param_names = ["pass", "n_threads"]

    def setup(self, pass_, n_threads):
        conv2d, conv2d_backward = require_functions("conv2d", "conv2d_backward")
        require_params(conv2d, "groups")
        require_params(conv2d_backward, "groups")
        x = _randn((8, 256, 56, 56))
        w = _randn((256, 1, 3, 3), seed=1) / np.float32(3.0)
        b = _randn(256, seed=2)
        kwargs = dict(stride=1, padding=1, groups=256, n_threads=n_threads)
        if pass_ == "forward":
            self.call = lambda: conv2d(x, w, b, **kwargs)
        else:
            g = _randn(x.shape, seed=3)
            self.call = lambda: conv2d_backward(g, x, w, **kwargs)
        self.call()

    def time_depthwise(self, pass_, n_threads):
        self.call()


def _dcgan_up_call(pass_, required=(), **kwargs):
    """A no-argument call of dcgan-up's forward or backward (16x256x16x16 -> 128 channels,
    4x4, stride 2, padding 1; issue #3's row); ``required``: keywords a commit must take."""
    forward, backward = require_functions("conv_transpose2d", "conv_transpose2d_backward")
    require_params(forward, *required)
    require_params(backward, *required)
    x = _randn((16, 256, 16, 16))
    w = _randn((256, 128, 4, 4), seed=1) / np.float32(np.sqrt(256 * 16))
    b = _randn(128, seed=2)
    kwargs.update(stride=2, padding=1)
    if pass_ == "forward":
        return lambda: forward(x, w, b, **kwargs)
    g = _randn((16, 128, 32, 32), seed=3)
    return lambda: backward(g, x, w, **kwargs)


class Transposed(Benchmark):
    """dcgan-up by ``algorithm="auto"`` (issue #3's row)."""

    params = [PASSES, N_THREADS]
    param_names = ["pass", "n_threads"]

    def setup(self, pass_, n_threads):
        self.call = _dcgan_up_call(pass_, n_threads=n_threads)
        self.call()

    def time_conv_transpose(self, pass_, n_threads):
        self.call()


class TransposedAlgorithms(Benchmark):
    """dcgan-up by each explicit ``algorithm`` ("winograd": its 2x2 phase convolutions),
    all cores; a commit without the argument reads "n/a"."""

    params = [("im2col", "winograd"), PASSES]
    param_names = ["algorithm", "pass"]

    def setup(self, algorithm, pass_):
        self.call = _dcgan_up_call(pass_, required=("algorithm",), algorithm=algorithm)
        self.call()

    def time_conv_transpose(self, algorithm, pass_):
        self.call()


class ChannelsLast(Benchmark):
    """The standard suite with ``layout="NHWC"`` (compare with conv.Forward/Backward), all cores."""

    params = [SHAPE_NAMES, PASSES]
    param_names = ["shape", "pass"]

    def setup(self, name, pass_):
        conv2d, conv2d_backward = require_functions("conv2d", "conv2d_backward")
        require_params(conv2d, "layout")
        require_params(conv2d_backward, "layout")
        shape = get_shape(name)
        arrays = shape.make_inputs("float32")
        x = np.ascontiguousarray(arrays["x"].transpose(0, 2, 3, 1))
        g = np.ascontiguousarray(arrays["grad_output"].transpose(0, 2, 3, 1))
        w, b = arrays["weight"], arrays["bias"]
        kwargs = dict(stride=shape.stride, padding=shape.pad, layout="NHWC",
                      n_threads=usable_cpus())
        if pass_ == "forward":
            self.call = lambda: conv2d(x, w, b, **kwargs)
        else:
            self.call = lambda: conv2d_backward(g, x, w, **kwargs)
        self.call()

    def time_nhwc(self, name, pass_):
        self.call()


class Algorithms(Benchmark):
    """Each explicit ``algorithm`` on the suite shapes it applies to (issue #6), all cores.

    A commit without an algorithm, or a shape an algorithm rejects, reads "n/a".
    """

    ALGORITHMS = ("im2col", "winograd", "direct")
    #: the shapes where more than one algorithm applies (resnet-1x1 and resnet-3x3-s2:
    #: im2col and the implicit-GEMM direct forward)
    SHAPES = ("lenet-mnist", "cifar-3x3", "resnet-stem", "resnet-1x1", "resnet-3x3",
              "resnet-3x3-s2", "vgg-mid", "deep-7x7")
    params = [SHAPES, ALGORITHMS, PASSES]
    param_names = ["shape", "algorithm", "pass"]

    def setup(self, name, algorithm, pass_):
        conv2d, conv2d_backward = require_functions("conv2d", "conv2d_backward")
        require_params(conv2d, "algorithm")
        shape = get_shape(name)
        arrays = shape.make_inputs("float32")
        x, w, b, g = (arrays[k] for k in ("x", "weight", "bias", "grad_output"))
        kwargs = dict(stride=shape.stride, padding=shape.pad, algorithm=algorithm,
                      n_threads=usable_cpus())
        try:
            conv2d(x[:1], w, b, **kwargs)
        except ValueError:        # an unknown algorithm on this commit, or not for this shape
            raise NotImplementedError(f"algorithm={algorithm!r} does not apply") from None
        if pass_ == "forward":
            self.call = lambda: conv2d(x, w, b, **kwargs)
        else:
            self.call = lambda: conv2d_backward(g, x, w, **kwargs)
        self.call()

    def time_algorithm(self, name, algorithm, pass_):
        self.call()


class FusedRelu(Benchmark):
    """``activation="relu"`` against a separate ``relu`` pass on vgg-mid's forward (issue #6)."""

    params = [("fused", "separate")]
    param_names = ["epilogue"]

    def setup(self, epilogue):
        conv2d, relu = require_functions("conv2d", "relu")
        require_params(conv2d, "activation")
        arrays = get_shape("vgg-mid").make_inputs("float32")
        x, w, b = arrays["x"], arrays["weight"], arrays["bias"]
        n = usable_cpus()
        if epilogue == "fused":
            self.call = lambda: conv2d(x, w, b, padding=1, activation="relu", n_threads=n)
        else:
            self.call = lambda: relu(conv2d(x, w, b, padding=1, n_threads=n), n_threads=n)
        self.call()

    def time_conv_relu(self, epilogue):
        self.call()
