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
/* also an AVX-512 clone: the same 32-byte vectors, but 32 registers to hold them */
#define FC_TARGET_WIDE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", \
                                                    "default")))
#else
#define FC_TARGET
#define FC_TARGET_WIDE
#endif

/* Whether the CPU runs x86-64-v4 (AVX-512) code: where the loader picks an
   FC_TARGET_WIDE clone, and where kernels with hand-written v4 builds dispatch to them.
   One test for both, so a kernel's block sizes always match the clone that runs. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FC_CPU_HAS_V4() __builtin_cpu_supports("x86-64-v4")
#else
#define FC_CPU_HAS_V4() 0
#endif

/* 32-byte vectors of GCC's vector extensions (one AVX2 register in the x86-64-v3
   clone, two SSE2 registers in the baseline one); _u: for unaligned loads and stores. */
typedef float fc_v8sf __attribute__((vector_size(32)));
typedef float fc_v8sf_u __attribute__((vector_size(32), aligned(4)));
typedef int fc_v8si __attribute__((vector_size(32)));
typedef double fc_v4df __attribute__((vector_size(32)));
typedef double fc_v4df_u __attribute__((vector_size(32), aligned(8)));
typedef long long fc_v4di __attribute__((vector_size(32)));

/* 64-byte vectors (one AVX-512 register) for kernels with an explicit x86-64-v4 build
   (FC_V4), which their callers pick where FC_CPU_HAS_V4(). FC_HAVE_V4_BUILD is 0 where
   there is no such build (no x86 GCC): those callers then never take it. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) \
    && !defined(FASTCONV_NO_TARGET_CLONES)
#define FC_HAVE_V4_BUILD 1
#define FC_V4 __attribute__((target("arch=x86-64-v4")))
typedef float fc_v16sf __attribute__((vector_size(64)));
typedef float fc_v16sf_u __attribute__((vector_size(64), aligned(4)));
typedef int fc_v16si __attribute__((vector_size(64)));
typedef double fc_v8df __attribute__((vector_size(64)));
typedef double fc_v8df_u __attribute__((vector_size(64), aligned(8)));
typedef long long fc_v8di __attribute__((vector_size(64)));
#else
#define FC_HAVE_V4_BUILD 0
#define FC_V4 /* a plain build of code written for v4 (FC_CPU_HAS_V4 picks it) */
#endif

/* Whether a kernel's explicit x86-64-v4 build exists and the CPU runs it: where the
   drivers may pick the 64-byte-vector builds. */
#define FC_V4_BUILD_RUNS() (FC_HAVE_V4_BUILD && FC_CPU_HAS_V4())

#if defined(__GNUC__)
#define FC_ALWAYS_INLINE __attribute__((always_inline))
#else
#define FC_ALWAYS_INLINE
#endif

#endif
