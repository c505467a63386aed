/* Where the C kernels of fastconv may use AVX2 + FMA.

   The extensions are built for the baseline instruction set (a wheel must run
   on any x86-64), which leaves the compiler 128-bit SSE2 vectors and no FMA.
   Kernels marked FC_TARGET are compiled twice, for x86-64-v3 (AVX2, FMA) and
   for the baseline, and the dynamic loader picks the clone the CPU supports
   (GCC's target_clones, an ELF ifunc). Elsewhere they are plain functions. */
#ifndef FASTCONV_SIMD_TARGET_H
#define FASTCONV_SIMD_TARGET_H

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(FASTCONV_NO_TARGET_CLONES)
#define FC_TARGET __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FC_TARGET
#endif

#if defined(__GNUC__)
#define FC_ALWAYS_INLINE __attribute__((always_inline))
#else
#define FC_ALWAYS_INLINE
#endif

#endif
