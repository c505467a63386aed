/* grad_weight as sums along output pixels, shared by the row kernel
   (fastconv/_conv_direct.pyx) and the implicit GEMM (fastconv/_conv_implicit.pyx):

     g[f*ldg + t] += sum_{r < R, ow < OW} dy[f*ldo + r*OW + ow] * rows[r*band_stride + off[t] + ow]

   for taps t < K. Each driver lays its input out so that tap t of output pixel
   (r, ow) lies at a constant offset off[t] from the pixel (the row kernel's phase rows,
   one output row at a time; the implicit GEMM's column-tap planes, a whole band as
   one row of R*OW pixels). Im2col + GEMM would write those taps out as a column matrix
   and BLAS would copy it again; for a few channels its GEMM has too few outputs
   (27 x 32 for cifar-3x3) to run well at all. A register block is FC_WG_FB filters x up
   to FC_WG_TB taps: per vector of pixels, FC_WG_FB loads of dY and one load of each
   tap's input feed FC_WG_FB * FC_WG_TB FMAs into independent sums, whose lanes are
   added once per call.

   Two details are worth 1.45x on resnet-3x3-s2's weight gradient: GCC folds each
   tap's load into both of its FMAs (14 loads per 12 FMAs instead of 8), which an empty
   asm "modifying" the vector prevents; and the lanes are added by a transpose-and-add
   tree rather than LANES scalar adds per sum. The asm names an AVX register, which the
   baseline build has not, so the two builds are written out and picked at run time
   (target_clones compiles one body for both). */
#ifndef FASTCONV_WEIGHT_GRAD_KERNELS_H
#define FASTCONV_WEIGHT_GRAD_KERNELS_H

#include <stddef.h>
#include <string.h>
#include "_simd_target.h"

#define FC_WG_FB 2
#define FC_WG_TB 6

/* [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7], as vhaddps (a macro: a
   function returning a 32-byte vector would change the baseline build's ABI) */
#define FC_HADD_S(a, b)                                                                       \
    (__builtin_shuffle((a), (b), (fc_v8si){0, 2, 8, 10, 4, 6, 12, 14})                        \
     + __builtin_shuffle((a), (b), (fc_v8si){1, 3, 9, 11, 5, 7, 13, 15}))

/* out[a] = the sum of v[a]'s lanes for a < min(n, lanes), by a transpose-and-add tree */
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

#define FC_PIN_NONE(v) ((void)0)
#define FC_PIN_YMM(v) __asm__("" : "+x"(v))
#define FC_V3 __attribute__((target("arch=x86-64-v3")))

/* One block of NT taps (NT <= FC_WG_TB) for a filter pair: g0/g1 are the pair's sums
   of those taps (g1 NULL: an odd last filter, paired with itself). */
#define FC_WEIGHT_GRAD_BLOCK(suffix, NT, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)  \
TARGET static inline FC_ALWAYS_INLINE void fc_weight_grad_block##NT##_##suffix(               \
    const T *rows, ptrdiff_t band_stride, const ptrdiff_t *off, const T *dy0, const T *dy1,   \
    ptrdiff_t OW, ptrdiff_t R, T *g0, T *g1)                                                  \
{                                                                                             \
    VEC acc[2 * NT];                                                                          \
    const ptrdiff_t full = OW / LANES * LANES, rest = OW - full;                              \
    IVEC keep;                                                                                \
    for (int l = 0; l < LANES; l++)                                                           \
        keep[l] = l < rest ? -1 : 0;                                                          \
    for (int j = 0; j < 2 * NT; j++)                                                          \
        acc[j] = (VEC){0};                                                                    \
    for (ptrdiff_t r = 0; r < R; r++) {                                                       \
        const T *x = rows + r * band_stride, *d0 = dy0 + r * OW, *d1 = dy1 + r * OW;          \
        for (ptrdiff_t ow = 0; ow < full; ow += LANES) {                                      \
            const VEC a = *(const VEC_U *)(d0 + ow), b = *(const VEC_U *)(d1 + ow);           \
            for (int j = 0; j < NT; j++) {                                                    \
                VEC v = *(const VEC_U *)(x + off[j] + ow);                                    \
                PIN(v);                                                                       \
                acc[j] += a * v;                                                              \
                acc[NT + j] += b * v;                                                         \
            }                                                                                 \
        }                                                                                     \
        if (rest) {                                                                           \
            /* the row's last columns: dY from a zero-filled copy, the input masked (what  \
               lies past OW is never summed, whatever its value: the driver leaves room   \
               for the vector to be read) */                                              \
            T ta[LANES], tb[LANES];                                                           \
            for (int l = 0; l < LANES; l++)                                                   \
                ta[l] = tb[l] = 0;                                                            \
            memcpy(ta, d0 + full, (size_t)rest * sizeof(T));                                  \
            memcpy(tb, d1 + full, (size_t)rest * sizeof(T));                                  \
            const VEC a = *(const VEC_U *)ta, b = *(const VEC_U *)tb;                         \
            for (int j = 0; j < NT; j++) {                                                    \
                const VEC v = (VEC)((IVEC) * (const VEC_U *)(x + off[j] + full) & keep);      \
                acc[j] += a * v;                                                              \
                acc[NT + j] += b * v;                                                         \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    T sums[2 * NT + LANES];                                                                   \
    for (int j = 0; j < 2 * NT; j += LANES)                                                   \
        LANE_SUMS(acc + j, 2 * NT - j, sums + j);                                             \
    for (int j = 0; j < NT; j++) {                                                            \
        g0[j] += sums[j];                                                                     \
        if (g1)                                                                               \
            g1[j] += sums[NT + j];                                                            \
    }                                                                                         \
}

#define FC_WEIGHT_GRAD(suffix, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)            \
FC_WEIGHT_GRAD_BLOCK(suffix, 1, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)           \
FC_WEIGHT_GRAD_BLOCK(suffix, 2, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)           \
FC_WEIGHT_GRAD_BLOCK(suffix, 3, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)           \
FC_WEIGHT_GRAD_BLOCK(suffix, 4, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)           \
FC_WEIGHT_GRAD_BLOCK(suffix, 5, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)           \
FC_WEIGHT_GRAD_BLOCK(suffix, 6, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)           \
                                                                                              \
TARGET static void fc_weight_grad_band_##suffix(                                              \
    const T *rows, ptrdiff_t band_stride, const ptrdiff_t *off, ptrdiff_t K, const T *dy,     \
    ptrdiff_t ldo, ptrdiff_t F, ptrdiff_t OW, ptrdiff_t R, T *g, ptrdiff_t ldg)               \
{                                                                                             \
    for (ptrdiff_t f0 = 0; f0 < F; f0 += FC_WG_FB) {                                          \
        /* an odd last filter runs paired with itself, its twin's sums dropped */            \
        const int pair = f0 + 1 < F;                                                          \
        const T *dy0 = dy + f0 * ldo, *dy1 = pair ? dy0 + ldo : dy0;                          \
        T *g0 = g + f0 * ldg, *g1 = pair ? g0 + ldg : NULL;                                   \
        for (ptrdiff_t t0 = 0; t0 < K; t0 += FC_WG_TB) {                                      \
            const ptrdiff_t nt = K - t0 < FC_WG_TB ? K - t0 : FC_WG_TB;                       \
            const ptrdiff_t *o = off + t0;                                                    \
            T *h1 = g1 ? g1 + t0 : NULL;                                                      \
            switch (nt) {                                                                     \
            case 6: fc_weight_grad_block6_##suffix(rows, band_stride, o, dy0, dy1, OW, R,     \
                                                   g0 + t0, h1); break;                       \
            case 5: fc_weight_grad_block5_##suffix(rows, band_stride, o, dy0, dy1, OW, R,     \
                                                   g0 + t0, h1); break;                       \
            case 4: fc_weight_grad_block4_##suffix(rows, band_stride, o, dy0, dy1, OW, R,     \
                                                   g0 + t0, h1); break;                       \
            case 3: fc_weight_grad_block3_##suffix(rows, band_stride, o, dy0, dy1, OW, R,     \
                                                   g0 + t0, h1); break;                       \
            case 2: fc_weight_grad_block2_##suffix(rows, band_stride, o, dy0, dy1, OW, R,     \
                                                   g0 + t0, h1); break;                       \
            default: fc_weight_grad_block1_##suffix(rows, band_stride, o, dy0, dy1, OW, R,    \
                                                    g0 + t0, h1); break;                      \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}

#define FC_WEIGHT_GRAD_DISPATCH(suffix, T)                                                    \
static void fc_weight_grad_band_##suffix(                                                     \
    const T *rows, ptrdiff_t band_stride, const ptrdiff_t *off, ptrdiff_t K, const T *dy,     \
    ptrdiff_t ldo, ptrdiff_t F, ptrdiff_t OW, ptrdiff_t R, T *g, ptrdiff_t ldg)               \
{                                                                                             \
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))                      \
        fc_weight_grad_band_##suffix##_v3(rows, band_stride, off, K, dy, ldo, F, OW, R, g,    \
                                          ldg);                                               \
    else                                                                                      \
        fc_weight_grad_band_##suffix##_base(rows, band_stride, off, K, dy, ldo, F, OW, R, g,  \
                                            ldg);                                             \
}

FC_WEIGHT_GRAD(s_v3, float, fc_v8sf, fc_v8sf_u, fc_v8si, 8, FC_V3, FC_PIN_YMM, fc_lane_sums_s)
FC_WEIGHT_GRAD(s_base, float, fc_v8sf, fc_v8sf_u, fc_v8si, 8, , FC_PIN_NONE, fc_lane_sums_s)
FC_WEIGHT_GRAD(d_v3, double, fc_v4df, fc_v4df_u, fc_v4di, 4, FC_V3, FC_PIN_YMM, fc_lane_sums_d)
FC_WEIGHT_GRAD(d_base, double, fc_v4df, fc_v4df_u, fc_v4di, 4, , FC_PIN_NONE, fc_lane_sums_d)
FC_WEIGHT_GRAD_DISPATCH(s, float)
FC_WEIGHT_GRAD_DISPATCH(d, double)

#endif
