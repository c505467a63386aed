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
   Vectors use GCC's vector extensions (AVX2 + FMA in the x86-64-v3 clone). */
#ifndef FASTCONV_IMPLICIT_KERNELS_H
#define FASTCONV_IMPLICIT_KERNELS_H

#include <stddef.h>
#include "_simd_target.h"

#define FC_IM_FB 4
#define FC_IM_NV 3

/* FC_IMPLICIT(suffix, T, VEC, VEC_U, LANES):

   fc_implicit_strips_*: acc[(s*Fp + f)*NR + j] (+)= sum_{k < K} wpack[f/FB][k][f%FB] *
   src[s*NR + off[k] + j] for strips s < strips of NR = FC_IM_NV*LANES positions j, every
   filter f < Fp = ceil(F/FB)*FB (wpack: [F/FB][ldk][FB] as fastconv._direct.pack_weight,
   zero past F, from the block's first tap); "+=" with accumulate. Taps are summed kc at
   a time: a strip's kc runs stay in L1 while every filter block reads them (the filters
   stream from L2). pf: input to prefetch meanwhile.

   fc_implicit_store_*: out[f*ldo + oh*OW + ow] = act(acc[f*NR + j] + bias[f]) for the
   strip's positions j in [j0, j1) whose v = v0 + j falls in a column ow < OW. */
#define FC_IMPLICIT(suffix, T, VEC, VEC_U, LANES)                                             \
static inline FC_ALWAYS_INLINE void fc_implicit_block_##suffix(                               \
    const T *src, const ptrdiff_t *off, ptrdiff_t kc, const T *w, T *acc, int first)          \
{                                                                                             \
    enum { NR = FC_IM_NV * LANES };                                                           \
    /* each pass sums its kc taps from zero and adds them to acc: float32 error then grows \
       with kc and K/kc rather than with K (one running sum over 4608 taps had 5x          \
       im2col's error, whose BLAS adds its own k-blocks into C) */                         \
    VEC sum[FC_IM_FB][FC_IM_NV];                                                              \
    for (int i = 0; i < FC_IM_FB; i++)                                                        \
        for (int j = 0; j < FC_IM_NV; j++)                                                    \
            sum[i][j] = (VEC){0};                                                             \
    for (ptrdiff_t k = 0; k < kc; k++, w += FC_IM_FB) {                                       \
        const T *b = src + off[k];                                                            \
        VEC x[FC_IM_NV];                                                                      \
        for (int j = 0; j < FC_IM_NV; j++)                                                    \
            x[j] = *(const VEC_U *)(b + j * LANES);                                           \
        for (int i = 0; i < FC_IM_FB; i++) {                                                  \
            /* w - 0 is w exactly (-0 and NaN too): a plain broadcast */                     \
            const VEC wi = w[i] - (VEC){0};                                                   \
            for (int j = 0; j < FC_IM_NV; j++)                                                \
                sum[i][j] += wi * x[j];                                                       \
        }                                                                                     \
    }                                                                                         \
    for (int i = 0; i < FC_IM_FB; i++)                                                        \
        for (int j = 0; j < FC_IM_NV; j++) {                                                  \
            VEC_U *to = (VEC_U *)(acc + i * NR + j * LANES);                                  \
            *to = first ? sum[i][j] : *to + sum[i][j];                                        \
        }                                                                                     \
}                                                                                             \
                                                                                              \
FC_TARGET static void fc_implicit_strips_##suffix(                                            \
    const T *src, ptrdiff_t strips, const ptrdiff_t *off, ptrdiff_t K, ptrdiff_t kc,          \
    const T *wpack, ptrdiff_t ldk, ptrdiff_t F, T *acc, int accumulate, const T *pf,          \
    ptrdiff_t pf_chunks, ptrdiff_t pf_stride, ptrdiff_t pf_chunk)                             \
{                                                                                             \
    enum { NR = FC_IM_NV * LANES, LINE = 64 / sizeof(T) };                                    \
    const ptrdiff_t Fp = (F + FC_IM_FB - 1) / FC_IM_FB * FC_IM_FB;                            \
    /* the next item's input (pf_chunks runs of pf_chunk values, pf_stride apart) is        \
       fetched into L2 a few lines per strip and pass, while the FMAs run: laying out its \
       planes would otherwise wait on DRAM */                                               \
    const ptrdiff_t chunk_lines = (pf_chunk + LINE - 1) / LINE;                               \
    const ptrdiff_t passes = ((K + kc - 1) / kc) * strips;                                    \
    const ptrdiff_t per_pass = (pf_chunks * chunk_lines + passes - 1) / passes;               \
    ptrdiff_t line = 0;                                                                       \
    for (ptrdiff_t k0 = 0; k0 < K; k0 += kc) {                                                \
        const ptrdiff_t kn = K - k0 < kc ? K - k0 : kc;                                       \
        for (ptrdiff_t s = 0; s < strips; s++) {                                              \
            for (ptrdiff_t f0 = 0; f0 < F; f0 += FC_IM_FB)                                    \
                fc_implicit_block_##suffix(src + s * NR, off + k0, kn,                        \
                                           wpack + (f0 * ldk + k0 * FC_IM_FB),                \
                                           acc + (s * Fp + f0) * NR, k0 == 0 && !accumulate); \
            for (ptrdiff_t i = 0; pf && i < per_pass && line < pf_chunks * chunk_lines;       \
                 i++, line++)                                                                 \
                __builtin_prefetch(pf + (line / chunk_lines) * pf_stride                      \
                                   + (line % chunk_lines) * LINE, 0, 2);                      \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
FC_TARGET static void fc_implicit_store_##suffix(                                             \
    const T *acc, ptrdiff_t F, ptrdiff_t v0, ptrdiff_t j0, ptrdiff_t j1, ptrdiff_t Wq,        \
    ptrdiff_t OW, const T *bias, int relu, T *out, ptrdiff_t ldo)                             \
{                                                                                             \
    enum { NR = FC_IM_NV * LANES };                                                           \
    ptrdiff_t oh = (v0 + j0) / Wq, ow = (v0 + j0) % Wq;                                       \
    /* one run of columns ow < OW per plane row the strip crosses */                         \
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
        }                                                                                     \
    }                                                                                         \
}

FC_IMPLICIT(s, float, fc_v8sf, fc_v8sf_u, 8)
FC_IMPLICIT(d, double, fc_v4df, fc_v4df_u, 4)

/* The weight gradient over "column-tap planes" (fastconv._implicit.backward_weight).

   dW[f][k] = sum_v dY[f][v] * x_k[v] over the output positions v = oh*OW + ow, where
   x_k[v] is the padded input under tap k = (c, kh, kw) of output pixel (oh, ow). The
   driver lays the input out as one plane per (channel, row phase, kw), OW columns wide
   and holding padded pixels (i*sh + ph, j*sw + kw*dw): tap k of pixel v is then
   plane[v + off[k]], with off[k] picking the plane and the row kh*dh // sh below, and
   dY's rows are read where they lie. Each sum runs along v, FC_DW_FB filters x FC_DW_KB
   taps at a time in vector accumulators (their lanes added at the end of the item). */
#define FC_DW_FB 2
#define FC_DW_KB 6

/* [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7], as vhaddps (a macro: a
   function returning a 32-byte vector would change the baseline clone's ABI) */
#define FC_HADD_S(a, b)                                                                       \
    (__builtin_shuffle((a), (b), (fc_v8si){0, 2, 8, 10, 4, 6, 12, 14})                        \
     + __builtin_shuffle((a), (b), (fc_v8si){1, 3, 9, 11, 5, 7, 13, 15}))

/* out[a] = the sum of v[a]'s lanes for a < min(n, lanes): a transpose-and-add tree
   (pairwise "horizontal" adds, then the halves) instead of lanes x n scalar adds, which
   cost the weight gradient 10-15% on 28x28 outputs. */
static inline FC_ALWAYS_INLINE void fc_lane_sums_s(const fc_v8sf *v, int n, float *out)
{
    fc_v8sf w[8];
    for (int a = 0; a < 8; a++)
        w[a] = a < n ? v[a] : (fc_v8sf){0};
    const fc_v8sf g0 = FC_HADD_S(FC_HADD_S(w[0], w[1]), FC_HADD_S(w[2], w[3]));
    const fc_v8sf g1 = FC_HADD_S(FC_HADD_S(w[4], w[5]), FC_HADD_S(w[6], w[7]));
    /* g0 = [s0..s3 of the low halves | s0..s3 of the high halves], g1 likewise for 4..7 */
    const fc_v8sf r = __builtin_shuffle(g0, g1, (fc_v8si){0, 1, 2, 3, 8, 9, 10, 11})
                      + __builtin_shuffle(g0, g1, (fc_v8si){4, 5, 6, 7, 12, 13, 14, 15});
    for (int a = 0; a < 8; a++)
        out[a] = r[a];
}

static inline FC_ALWAYS_INLINE void fc_lane_sums_d(const fc_v4df *v, int n, double *out)
{
    fc_v4df w[4];
    for (int a = 0; a < 4; a++)
        w[a] = a < n ? v[a] : (fc_v4df){0};
    /* [w0_0+w0_1, w1_0+w1_1 | w0_2+w0_3, w1_2+w1_3], as vhaddpd */
    const fc_v4df h0 = __builtin_shuffle(w[0], w[1], (fc_v4di){0, 4, 2, 6})
                       + __builtin_shuffle(w[0], w[1], (fc_v4di){1, 5, 3, 7});
    const fc_v4df h1 = __builtin_shuffle(w[2], w[3], (fc_v4di){0, 4, 2, 6})
                       + __builtin_shuffle(w[2], w[3], (fc_v4di){1, 5, 3, 7});
    const fc_v4df r = __builtin_shuffle(h0, h1, (fc_v4di){0, 1, 4, 5})
                      + __builtin_shuffle(h0, h1, (fc_v4di){2, 3, 6, 7});
    for (int a = 0; a < 4; a++)
        out[a] = r[a];
}

#define FC_IMPLICIT_DW(suffix, T, VEC, VEC_U, LANES, TARGET, PIN, LANE_SUMS)                  \
/* dw[f*ldw + k] += sum_{v < V} dy[f*ldy + v] * src[off[k] + v] for f < F, k < K: taps in  \
   blocks of FC_DW_KB (whose runs stay in L1 while dY's rows stream from L2), filters in   \
   pairs; a block's missing taps or filter re-read the first and are not stored */         \
TARGET static void fc_implicit_dw_##suffix(                                                   \
    const T *dy, ptrdiff_t ldy, ptrdiff_t F, const T *src, const ptrdiff_t *off, ptrdiff_t K, \
    ptrdiff_t V, T *dw, ptrdiff_t ldw)                                                        \
{                                                                                             \
    const ptrdiff_t Vv = V / LANES * LANES;                                                   \
    for (ptrdiff_t k0 = 0; k0 < K; k0 += FC_DW_KB) {                                          \
        const ptrdiff_t kn = K - k0 < FC_DW_KB ? K - k0 : FC_DW_KB;                           \
        const T *x[FC_DW_KB];                                                                 \
        for (int j = 0; j < FC_DW_KB; j++)                                                    \
            x[j] = src + off[k0 + (j < kn ? j : 0)];                                          \
        for (ptrdiff_t f0 = 0; f0 < F; f0 += FC_DW_FB) {                                      \
            const ptrdiff_t fn = F - f0 < FC_DW_FB ? F - f0 : FC_DW_FB;                       \
            const T *d[FC_DW_FB];                                                             \
            for (int i = 0; i < FC_DW_FB; i++)                                                \
                d[i] = dy + (f0 + (i < fn ? i : 0)) * ldy;                                    \
            VEC acc[FC_DW_FB][FC_DW_KB];                                                      \
            for (int i = 0; i < FC_DW_FB; i++)                                                \
                for (int j = 0; j < FC_DW_KB; j++)                                            \
                    acc[i][j] = (VEC){0};                                                     \
            for (ptrdiff_t v = 0; v < Vv; v += LANES) {                                       \
                VEC dv[FC_DW_FB];                                                             \
                for (int i = 0; i < FC_DW_FB; i++)                                            \
                    dv[i] = *(const VEC_U *)(d[i] + v);                                       \
                for (int j = 0; j < FC_DW_KB; j++) {                                          \
                    VEC xv = *(const VEC_U *)(x[j] + v);                                      \
                    PIN(xv);                                                                  \
                    for (int i = 0; i < FC_DW_FB; i++)                                        \
                        acc[i][j] += dv[i] * xv;                                              \
                }                                                                             \
            }                                                                                 \
            /* the lanes of each accumulator, LANES accumulators at a time */                \
            T sums[FC_DW_FB * FC_DW_KB + LANES];                                              \
            const VEC *flat = &acc[0][0];                                                     \
            for (int a = 0; a < FC_DW_FB * FC_DW_KB; a += LANES)                              \
                LANE_SUMS(flat + a, FC_DW_FB * FC_DW_KB - a, sums + a);                        \
            for (ptrdiff_t i = 0; i < fn; i++)                                                \
                for (ptrdiff_t j = 0; j < kn; j++) {                                          \
                    T sum = sums[i * FC_DW_KB + j];                                           \
                    for (ptrdiff_t v = Vv; v < V; v++)                                        \
                        sum += d[i][v] * x[j][v];                                             \
                    dw[(f0 + i) * ldw + k0 + j] += sum;                                       \
                }                                                                             \
        }                                                                                     \
    }                                                                                         \
}

/* GCC folds each tap's load into both of its FMAs (14 loads per 12 FMAs, not 8): an
   empty asm that "modifies" the vector keeps it in a register. The asm names an AVX
   register, which the baseline build has not, so the two builds are written out and
   picked at run time (target_clones compiles one body for both). */
#define FC_PIN_NONE(v) ((void)0)
#define FC_PIN_YMM(v) __asm__("" : "+x"(v))
#define FC_V3 __attribute__((target("arch=x86-64-v3")))
#define FC_IMPLICIT_DW_DISPATCH(suffix, T)                                                    \
static void fc_implicit_dw_##suffix(                                                          \
    const T *dy, ptrdiff_t ldy, ptrdiff_t F, const T *src, const ptrdiff_t *off, ptrdiff_t K, \
    ptrdiff_t V, T *dw, ptrdiff_t ldw)                                                        \
{                                                                                             \
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))                      \
        fc_implicit_dw_##suffix##_v3(dy, ldy, F, src, off, K, V, dw, ldw);                    \
    else                                                                                      \
        fc_implicit_dw_##suffix##_base(dy, ldy, F, src, off, K, V, dw, ldw);                  \
}

FC_IMPLICIT_DW(s_v3, float, fc_v8sf, fc_v8sf_u, 8, FC_V3, FC_PIN_YMM, fc_lane_sums_s)
FC_IMPLICIT_DW(s_base, float, fc_v8sf, fc_v8sf_u, 8, , FC_PIN_NONE, fc_lane_sums_s)
FC_IMPLICIT_DW(d_v3, double, fc_v4df, fc_v4df_u, 4, FC_V3, FC_PIN_YMM, fc_lane_sums_d)
FC_IMPLICIT_DW(d_base, double, fc_v4df, fc_v4df_u, 4, , FC_PIN_NONE, fc_lane_sums_d)
FC_IMPLICIT_DW_DISPATCH(s, float)
FC_IMPLICIT_DW_DISPATCH(d, double)

#endif
