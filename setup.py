"""Build the fastconv Cython extensions.

Every extension is compiled with ``-O3 -fopenmp`` and linked with ``-fopenmp``;
``_depthwise_avx2`` (x86-64 only) is ``_depthwise`` again with ``-march=x86-64-v3``.
The Cython directives live in one dictionary below; setting the environment
variable ``FASTCONV_CYTHON_DEBUG=1`` turns bounds and initialisation checks
back on (the test suite must pass under both builds). ``FASTCONV_SANITIZE=address``
compiles and links with ``-fsanitize=address -fno-omit-frame-pointer -g`` (any
``-fsanitize=`` value gcc takes, e.g. ``address,undefined``); such a build only
imports with the sanitizer runtime preloaded, see ``tools/asan.sh``.
"""

import os
import platform

import numpy as np
import scipy  # noqa: F401  (build requirement: ships scipy/linalg/cython_blas.pxd)
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("FASTCONV_CYTHON_DEBUG", "0") not in ("", "0")
SANITIZE = os.environ.get("FASTCONV_SANITIZE", "")
SANITIZE_FLAGS = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"] if SANITIZE else []

COMPILER_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": DEBUG,
    "embedsignature": True,
}

EXTENSION_NAMES = ["_blas", "_openmp", "_im2col", "_conv", "_pool", "_depthwise", "_conv_nhwc",
                   "_conv_winograd", "_conv_direct", "_conv_phases", "_conv_implicit"]
# The depthwise kernels are Cython loops (FC_TARGET clones only C functions): on x86-64
# they are built a second time for x86-64-v3, picked at import where the CPU runs it
# (fastconv/_depthwise_kernels.py).
X86_64_V3_EXTENSIONS = ["_depthwise_avx2"] if platform.machine() in ("x86_64", "AMD64") else []
EXTENSION_NAMES += X86_64_V3_EXTENSIONS
# Development shortcut: FASTCONV_BUILD_ONLY=_conv,_im2col python setup.py build_ext --inplace
# recompiles just those extensions (a full forced build takes ~2 minutes on 2 cores).
ONLY = [name for name in os.environ.get("FASTCONV_BUILD_ONLY", "").split(",") if name]
if ONLY:
    unknown = sorted(set(ONLY) - set(EXTENSION_NAMES))
    if unknown:
        raise SystemExit(f"FASTCONV_BUILD_ONLY: unknown extensions {unknown}; "
                         f"known: {EXTENSION_NAMES}")


class ForcedBuildExt(build_ext):
    """Always recompile: the release and debug builds share source files, and
    the timestamp check of a plain build_ext would keep a stale build."""

    def initialize_options(self):
        super().initialize_options()
        self.force = True
        # one compiler per core: the nine extensions took ~2 minutes one after another
        self.parallel = os.cpu_count() or 1


def make_extension(name):
    return Extension(
        f"fastconv.{name}",
        [f"fastconv/{name}.pyx"],
        include_dirs=[np.get_include(), "fastconv"],  # the C headers beside the .pyx
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-fopenmp"] + (["-g"] if DEBUG or SANITIZE else [])
        + (["-march=x86-64-v3"] if name in X86_64_V3_EXTENSIONS else []) + SANITIZE_FLAGS,
        extra_link_args=["-fopenmp"] + SANITIZE_FLAGS[:1],
    )


setup(
    ext_modules=cythonize(
        [make_extension(name) for name in (ONLY or EXTENSION_NAMES)],
        compiler_directives=COMPILER_DIRECTIVES,
        build_dir="build/cython-debug" if DEBUG else "build/cython",
        force=True,
        nthreads=os.cpu_count() or 1,
    ),
    cmdclass={"build_ext": ForcedBuildExt},
)
