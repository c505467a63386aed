"""The seeds' batch-layout helpers: ``im2col`` -> (N*OH*OW, C*KH*KW) and its adjoint ``col2im``."""

from .common import (
    DTYPES,
    N_THREADS,
    Benchmark,
    get_shape,
    median_ms,
    reference,
    require,
)

#: Small, medium and one large plane; the column matrix of resnet-3x3 is 58 MB in float32.
IM2COL_SHAPES = ("lenet-mnist", "cifar-3x3", "resnet-3x3")


def _seed_args(shape):
    return shape.KH, shape.KW, shape.stride, shape.pad


class SeedLayout(Benchmark):
    params = [IM2COL_SHAPES, DTYPES, N_THREADS]
    param_names = ["shape", "dtype", "n_threads"]

    def setup(self, name, dtype, n_threads):
        fastconv = require("im2col", "col2im")
        shape = get_shape(name)
        x = shape.make_inputs(dtype)["x"]
        kh, kw, s, p = _seed_args(shape)
        self.im2col = lambda: fastconv.im2col(x, kh, kw, s, p, n_threads=n_threads)
        col = self.im2col()
        self.col2im = lambda: fastconv.col2im(col, x.shape, kh, kw, s, p, n_threads=n_threads)
        self.col2im()

    def time_im2col(self, name, dtype, n_threads):
        self.im2col()

    def time_col2im(self, name, dtype, n_threads):
        self.col2im()


class SeedLayoutSpeedup(Benchmark):
    """reference ms / fastconv ms for im2col and col2im (float32, all cores)."""

    params = [IM2COL_SHAPES, ("im2col", "col2im")]
    param_names = ["shape", "function"]
    unit = "ratio"
    rounds = 1

    def setup(self, name, function):
        fastconv = require("im2col", "col2im")
        require("im2col", "col2im", module=reference)
        shape = get_shape(name)
        x = shape.make_inputs("float32")["x"]
        kh, kw, s, p = _seed_args(shape)
        if function == "im2col":
            self.fast = lambda: fastconv.im2col(x, kh, kw, s, p)
            self.ref = lambda: reference.im2col(x, kh, kw, s, p)
        else:
            col = fastconv.im2col(x, kh, kw, s, p)
            self.fast = lambda: fastconv.col2im(col, x.shape, kh, kw, s, p)
            self.ref = lambda: reference.col2im(col, x.shape, kh, kw, s, p)

    def track_speedup_vs_reference(self, name, function):
        return median_ms(self.ref) / median_ms(self.fast)
