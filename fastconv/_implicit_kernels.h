/* Implicit GEMM over phase planes: a plain convolution's forward without a column matrix.

   The driver (fastconv/_conv_implicit.pyx) lays the input under a band of output
   rows out as phase planes: the padded input split by row and column residue
   modulo the stride, plane (ph, pw) of channel c holding padded pixels
   (i*sh + ph, j*sw + pw), Wq columns per row. Output pixel (oh, ow) then reads
   tap (c, kh, kw) at v + off[k], where v = oh*Wq + ow is its "virtual position"
   and off[k] is a constant per tap: the position's row and column advance
   together, so the positions v .. v + NR - 1 of one register block read ONE
   contiguous run of every tap, across output rows. Columns ow >= OW of a plane row are computed
   and dropped (Wq - OW of every Wq: 1 of 29 on a 3x3 stride-2 layer).

   A register block is FC_IM_FB filters x FC_IM_NV vectors of positions: per tap
   FC_IM_NV loads and FC_IM_FB broadcasts feed FC_IM_FB * FC_IM_NV FMAs (12 sums:
   the 16 AVX2 registers hold them with the loads). The band's strips of NR
   positions sum their taps kc at a time (fc_implicit_strips_*), reading the runs
   where they lie; im2col + GEMM would write those runs out as a column matrix and
   BLAS would copy them once more into its packed panels.
   Vectors use GCC's vector extensions (AVX2 + FMA in the x86-64-v3 clone); an AVX-512
   build (below) takes blocks of FC_IM_FB filters x FC_IM_WIDE_NV vectors of 64 bytes. */
#ifndef FASTCONV_IMPLICIT_KERNELS_H
#define FASTCONV_IMPLICIT_KERNELS_H

#include <stddef.h>
#include "_simd_target.h"

#define FC_IM_FB 4
#define FC_IM_NV 3
/* the AVX-512 build's blocks: 2 vectors of 64 bytes (32 floats, 16 doubles) */
#define FC_IM_WIDE_NV 2

/* FC_IMPLICIT(suffix, T, VEC, VEC_U, LANES, NV, TARGET, BLOCK_TARGET): NV vectors of
   LANES per block, the strip functions built with TARGET and the block with BLOCK_TARGET.

   fc_implicit_strips_*: acc[(s*Fp + f)*NR + j] (+)= sum_{k < K} wpack[f/FB][k][f%FB] *
   src[s*NR + off[k] + j] for strips s < strips of NR = NV*LANES positions j, every
   filter f < Fp = ceil(F/FB)*FB (wpack: [F/FB][ldk][FB] as fastconv._direct.pack_weight,
   zero past F, from the block's first tap); "+=" with accumulate. Taps are summed kc at
   a time: a strip's kc runs stay in L1 while every filter block reads them (the filters
   stream from L2). pf: input to prefetch meanwhile.

   fc_implicit_store_*: out[f*ldo + oh*OW + ow] = act(acc[f*NR + j] + bias[f]) for the
   strip's positions j in [j0, j1) whose v = v0 + j falls in a column ow < OW. */
#define FC_IMPLICIT(suffix, T, VEC, VEC_U, LANES, NV, TARGET, BLOCK_TARGET)                   \
static inline FC_ALWAYS_INLINE BLOCK_TARGET void fc_implicit_block_##suffix(                  \
    const T *src, const ptrdiff_t *off, ptrdiff_t kc, const T *w, T *acc, int first)          \
{                                                                                             \
    enum { NR = NV * LANES };                                                                 \
    /* each pass sums its kc taps from zero and adds them to acc: float32 error then grows    \
       with kc and K/kc rather than with K (one running sum over 4608 taps had 5x             \
       im2col's error, whose BLAS adds its own k-blocks into C) */                            \
    VEC sum[FC_IM_FB][NV];                                                                    \
    for (int i = 0; i < FC_IM_FB; i++)                                                        \
        for (int j = 0; j < NV; j++)                                                          \
            sum[i][j] = (VEC){0};                                                             \
    for (ptrdiff_t k = 0; k < kc; k++, w += FC_IM_FB) {                                       \
        const T *b = src + off[k];                                                            \
        VEC x[NV];                                                                            \
        for (int j = 0; j < NV; j++)                                                          \
            x[j] = *(const VEC_U *)(b + j * LANES);                                           \
        for (int i = 0; i < FC_IM_FB; i++) {                                                  \
            /* w - 0 is w exactly (-0 and NaN too): a plain broadcast */                      \
            const VEC wi = w[i] - (VEC){0};                                                   \
            for (int j = 0; j < NV; j++)                                                      \
                sum[i][j] += wi * x[j];                                                       \
        }                                                                                     \
    }                                                                                         \
    for (int i = 0; i < FC_IM_FB; i++)                                                        \
        for (int j = 0; j < NV; j++) {                                                        \
            VEC_U *to = (VEC_U *)(acc + i * NR + j * LANES);                                  \
            *to = first ? sum[i][j] : *to + sum[i][j];                                        \
        }                                                                                     \
}                                                                                             \
                                                                                              \
TARGET static void fc_implicit_strips_##suffix(                                               \
    const T *src, ptrdiff_t strips, const ptrdiff_t *off, ptrdiff_t K, ptrdiff_t kc,          \
    const T *wpack, ptrdiff_t ldk, ptrdiff_t F, T *acc, int accumulate, const T *pf,          \
    ptrdiff_t pf_chunks, ptrdiff_t pf_stride, ptrdiff_t pf_chunk)                             \
{                                                                                             \
    enum { NR = NV * LANES, LINE = 64 / sizeof(T) };                                          \
    const ptrdiff_t Fp = (F + FC_IM_FB - 1) / FC_IM_FB * FC_IM_FB;                            \
    /* the next item's input (pf_chunks runs of pf_chunk values, pf_stride apart) is          \
       fetched into L2 a few lines after each filter block, while the FMAs run: laying out    \
       its planes, or reading them in place, would otherwise wait on DRAM (all of a pass's    \
       lines at once, after its last block, ran resnet-1x1 in place 1.05-1.07x slower) */    \
    const ptrdiff_t chunk_lines = (pf_chunk + LINE - 1) / LINE;                               \
    const ptrdiff_t passes = ((K + kc - 1) / kc) * strips;                                    \
    const ptrdiff_t per_block = (pf_chunks * chunk_lines + passes * (Fp / FC_IM_FB) - 1)     \
                                / (passes * (Fp / FC_IM_FB));                                 \
    ptrdiff_t line = 0;                                                                       \
    for (ptrdiff_t k0 = 0; k0 < K; k0 += kc) {                                                \
        const ptrdiff_t kn = K - k0 < kc ? K - k0 : kc;                                       \
        for (ptrdiff_t s = 0; s < strips; s++) {                                              \
            for (ptrdiff_t f0 = 0; f0 < F; f0 += FC_IM_FB) {                                  \
                fc_implicit_block_##suffix(src + s * NR, off + k0, kn,                        \
                                           wpack + (f0 * ldk + k0 * FC_IM_FB),                \
                                           acc + (s * Fp + f0) * NR, k0 == 0 && !accumulate); \
                for (ptrdiff_t i = 0; pf && i < per_block && line < pf_chunks * chunk_lines;  \
                     i++, line++)                                                             \
                    __builtin_prefetch(pf + (line / chunk_lines) * pf_stride                  \
                                       + (line % chunk_lines) * LINE, 0, 2);                  \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
TARGET static void fc_implicit_store_##suffix(                                                \
    const T *acc, ptrdiff_t F, ptrdiff_t v0, ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t Wq,        \
    ptrdiff_t OW, const T *bias, int relu, T *out, ptrdiff_t ldo, ptrdiff_t pf_ahead)         \
{                                                                                             \
    enum { NR = NV * LANES, LINE = 64 / sizeof(T) };                                          \
    ptrdiff_t oh = (v0 + j0) / Wq, ow = (v0 + j0) % Wq;                                       \
    /* one run of columns ow < OW per plane row the strip crosses */                          \
    for (ptrdiff_t j = j0; j < j1; j += Wq - ow, ow = 0, oh++) {                              \
        const ptrdiff_t len = ow >= OW ? 0 : (OW - ow < j1 - j ? OW - ow : j1 - j);           \
        for (ptrdiff_t f = 0; f < F; f++) {                                                   \
            const T b = bias ? bias[f] : 0;                                                   \
            const T *a = acc + f * NR + j;                                                    \
            T *o = out + f * ldo + oh * OW + ow;                                              \
            for (ptrdiff_t i = 0; i < len; i++) {                                             \
                T v = a[i] + b;                                                               \
                if (relu && v <= 0) /* NaN stays, -0 becomes 0 */                             \
                    v = 0;                                                                    \
                o[i] = v;                                                                     \
            }                                                                                 \
            /* the lines this run's filter writes pf_ahead positions on, fetched for          \
               writing while the FMAs run: F planes are more streams than the hardware       \
               prefetchers follow */                                                          \
            for (ptrdiff_t i = 0; pf_ahead && i < len + LINE; i += LINE)                      \
                __builtin_prefetch(o + pf_ahead + (i < len ? i : len - 1), 1, 2);             \
        }                                                                                     \
    }                                                                                         \
}

FC_IMPLICIT(s, float, fc_v8sf, fc_v8sf_u, 8, FC_IM_NV, FC_TARGET, )
FC_IMPLICIT(d, double, fc_v4df, fc_v4df_u, 4, FC_IM_NV, FC_TARGET, )

/* The AVX-512 build: blocks of 4 filters x 2 vectors of 64 bytes. On Zen 4 a 64-byte FMA
   does the work of two 32-byte ones in one instruction, so a block needs about half the
   instructions and loads per FMA. Kernel alone on resnet-3x3-s2's planes (C harness,
   interleaved, computed GFLOP/s): 110-116 against 108-114 for the 4 x 3 x 32-byte block
   when the VM ran fast, 99-110 against 75-89 when it ran slow (a busy host: the 32-byte
   block, with twice the instructions, lost most). Its strips are 32 floats / 16 doubles:
   FC_V4_BUILD_RUNS() says whether the CPU runs it. */
#if FC_HAVE_V4_BUILD
FC_IMPLICIT(wide_s, float, fc_v16sf, fc_v16sf_u, 16, FC_IM_WIDE_NV, FC_V4, FC_V4)
FC_IMPLICIT(wide_d, double, fc_v8df, fc_v8df_u, 8, FC_IM_WIDE_NV, FC_V4, FC_V4)
#else
/* never called: FC_V4_BUILD_RUNS() is 0 */
#define fc_implicit_strips_wide_s fc_implicit_strips_s
#define fc_implicit_strips_wide_d fc_implicit_strips_d
#define fc_implicit_store_wide_s fc_implicit_store_s
#define fc_implicit_store_wide_d fc_implicit_store_d
#endif

/* fc_implicit_sum_strips_* / fc_implicit_store_strip_*: the strips and store of the build
   the driver picked, the AVX-512 one with `wide` (where FC_V4_BUILD_RUNS() allows it;
   its strips are longer) */
#define FC_IMPLICIT_DISPATCH(suffix, T)                                                      \
static inline void fc_implicit_sum_strips_##suffix(                                          \
    int wide, const T *src, ptrdiff_t strips, const ptrdiff_t *off, ptrdiff_t K,             \
    ptrdiff_t kc, const T *wpack, ptrdiff_t ldk, ptrdiff_t F, T *acc, int accumulate,        \
    const T *pf, ptrdiff_t pf_chunks, ptrdiff_t pf_stride, ptrdiff_t pf_chunk)               \
{                                                                                            \
    if (wide)                                                                                \
        fc_implicit_strips_wide_##suffix(src, strips, off, K, kc, wpack, ldk, F, acc,        \
                                         accumulate, pf, pf_chunks, pf_stride, pf_chunk);    \
    else                                                                                     \
        fc_implicit_strips_##suffix(src, strips, off, K, kc, wpack, ldk, F, acc, accumulate, \
                                    pf, pf_chunks, pf_stride, pf_chunk);                     \
}                                                                                            \
                                                                                             \
static inline void fc_implicit_store_strip_##suffix(                                         \
    int wide, const T *acc, ptrdiff_t F, ptrdiff_t v0, ptrdiff_t j0, ptrdiff_t j1,           \
    ptrdiff_t Wq, ptrdiff_t OW, const T *bias, int relu, T *out, ptrdiff_t ldo,              \
    ptrdiff_t pf_ahead)                                                                      \
{                                                                                            \
    if (wide)                                                                                \
        fc_implicit_store_wide_##suffix(acc, F, v0, j0, j1, Wq, OW, bias, relu, out, ldo,    \
                                        pf_ahead);                                           \
    else                                                                                     \
        fc_implicit_store_##suffix(acc, F, v0, j0, j1, Wq, OW, bias, relu, out, ldo,         \
                                   pf_ahead);                                                \
}

FC_IMPLICIT_DISPATCH(s, float)
FC_IMPLICIT_DISPATCH(d, double)

#endif
