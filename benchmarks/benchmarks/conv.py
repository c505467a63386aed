"""conv2d forward and backward: the standard suite, N = 1 latency, the 1x1 path, and ratios.

``time_*`` is wall time per call; ``peakmem_*`` is the peak resident memory of
the benchmark process (inputs included) after one call; ``track_*`` are
ratios measured in one process, so they stay comparable across machines.
"""

import dataclasses

from .common import (
    DTYPES,
    HEAVY_SHAPES,
    N_THREADS,
    PASSES,
    SHAPE_NAMES,
    Benchmark,
    blas_threads,
    conv_call,
    gemm_call,
    get_shape,
    median_ms,
    reference,
    require,
    torch_call,
    usable_cpus,
)


class _SuiteConv(Benchmark):
    """One pass of the standard suite, shape x dtype x n_threads."""

    pass_ = None
    params = [SHAPE_NAMES, DTYPES, N_THREADS]
    param_names = ["shape", "dtype", "n_threads"]

    def setup(self, name, dtype, n_threads):
        if dtype == "float64" and name in HEAVY_SHAPES:
            raise NotImplementedError("heavy shapes are timed in float32 only")
        fastconv = require("conv2d", "conv2d_backward")
        shape = get_shape(name)
        self.call = conv_call(fastconv, self.pass_, shape, shape.make_inputs(dtype),
                              n_threads=n_threads)
        self.call()


class Forward(_SuiteConv):
    """``conv2d(x, weight, bias, stride, pad)``."""

    pass_ = "forward"

    def time_forward(self, name, dtype, n_threads):
        self.call()

    def peakmem_forward(self, name, dtype, n_threads):
        self.call()


class Backward(_SuiteConv):
    """``conv2d_backward(grad_output, x, weight, stride, pad)`` -> dx, dW, db."""

    pass_ = "backward"

    def time_backward(self, name, dtype, n_threads):
        self.call()

    def peakmem_backward(self, name, dtype, n_threads):
        self.call()


class Latency(Benchmark):
    """Batch of one (inference): fastconv must parallelise inside the image."""

    params = [("cifar-3x3", "resnet-3x3", "vgg-mid", "deep-7x7"), PASSES, N_THREADS]
    param_names = ["shape", "pass", "n_threads"]

    def setup(self, name, pass_, n_threads):
        fastconv = require("conv2d", "conv2d_backward")
        shape = get_shape(name, batch=1)
        self.call = conv_call(fastconv, pass_, shape, shape.make_inputs("float32"),
                              n_threads=n_threads)
        self.call()

    def time_batch1(self, name, pass_, n_threads):
        self.call()


class Pointwise(Benchmark):
    """resnet-1x1: stride 1 skips im2col (the input plane is the column matrix);
    the same layer at stride 2 (a ResNet downsampling shortcut) goes through it.
    """

    params = [(1, 2), PASSES, N_THREADS]
    param_names = ["stride", "pass", "n_threads"]

    def setup(self, stride, pass_, n_threads):
        fastconv = require("conv2d", "conv2d_backward")
        shape = dataclasses.replace(get_shape("resnet-1x1"), stride=stride)
        self.call = conv_call(fastconv, pass_, shape, shape.make_inputs("float32"),
                              n_threads=n_threads)
        self.call()

    def time_1x1(self, stride, pass_, n_threads):
        self.call()


class SpeedupVsReference(Benchmark):
    """reference ms / fastconv ms on the suite, float32, all cores for both.

    The reference is the seeds' algorithm (NumPy im2col + one multi-threaded
    BLAS gemm). Both are timed in this process, median of 3 after a warm-up,
    so the ratio does not depend on the machine's absolute speed.
    """

    params = [SHAPE_NAMES, PASSES]
    param_names = ["shape", "pass"]
    unit = "ratio"
    rounds = 1
    timeout = 300

    def setup(self, name, pass_):
        fastconv = require("conv2d", "conv2d_backward")
        require("conv2d", "conv2d_backward", module=reference)
        self.threads = usable_cpus()
        shape = get_shape(name)
        arrays = shape.make_inputs("float32")
        self.fast = conv_call(fastconv, pass_, shape, arrays, n_threads=self.threads)
        self.ref = conv_call(reference, pass_, shape, arrays)

    def track_speedup_vs_reference(self, name, pass_):
        with blas_threads(self.threads):
            ref_ms = median_ms(self.ref)
            fast_ms = median_ms(self.fast)
        return ref_ms / fast_ms


class ForwardVsGemm(Benchmark):
    """fastconv forward ms / bare sgemm ms of the same GEMM (M=F, K=C*KH*KW, N=batch*OH*OW).

    The overhead of im2col and tiling over the one-GEMM bound; 1.0 is the
    ceiling of any im2col design. Lower is better. float32, all cores.
    """

    params = [SHAPE_NAMES]
    param_names = ["shape"]
    unit = "ratio"
    rounds = 1

    def setup(self, name):
        fastconv = require("conv2d")
        self.threads = usable_cpus()
        shape = get_shape(name)
        self.gemm = gemm_call(shape, "float32")
        self.fast = conv_call(fastconv, "forward", shape, shape.make_inputs("float32"),
                              n_threads=self.threads)

    def track_forward_vs_gemm(self, name):
        with blas_threads(self.threads):
            gemm_ms = median_ms(self.gemm)
            fast_ms = median_ms(self.fast)
        return fast_ms / gemm_ms


class SpeedupVsTorch(Benchmark):
    """torch ms / fastconv ms (torch.nn.functional.conv2d, same threads), when torch imports."""

    params = [SHAPE_NAMES, PASSES]
    param_names = ["shape", "pass"]
    unit = "ratio"
    rounds = 1

    def setup(self, name, pass_):
        fastconv = require("conv2d", "conv2d_backward")
        self.threads = usable_cpus()
        shape = get_shape(name)
        arrays = shape.make_inputs("float32")
        self.torch, self.other = torch_call(pass_, shape, arrays)
        self.fast = conv_call(fastconv, pass_, shape, arrays, n_threads=self.threads)

    def track_speedup_vs_torch(self, name, pass_):
        previous = self.torch.get_num_threads()
        self.torch.set_num_threads(self.threads)
        try:
            with blas_threads(self.threads):
                torch_ms = median_ms(self.other)
                fast_ms = median_ms(self.fast)
        finally:
            self.torch.set_num_threads(previous)
        return torch_ms / fast_ms
