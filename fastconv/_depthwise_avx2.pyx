# The depthwise kernels of fastconv/_depthwise.pyx, compiled for x86-64-v3 (AVX2 + FMA).
#
# Their loops are Cython, not the C headers that FC_TARGET clones per function, so the
# whole module is built a second time with -march=x86-64-v3 (setup.py): the interior
# sweeps vectorise 8 floats wide with FMA instead of SSE2's 4. fastconv._depthwise_kernels
# imports it only where the CPU runs x86-64-v3 (cpu_runs_x86_64_v3, the check that
# FC_TARGET's loader makes); the forward of mobilenet-dw ran 1.73x faster, its backward
# 1.15x (2 threads, two bench runs each).
include "_depthwise.pyx"
