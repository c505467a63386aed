/* grad_weight as sums along output pixels, shared by the row kernel
   (fastconv/_conv_direct.pyx) and the implicit GEMM (fastconv/_conv_implicit.pyx):

     g[f*ldg + t] += sum_{r < R, ow < OW} dy[f*ldo + r*OW + ow] * rows[r*band_stride + off[t] + ow]

   for taps t < K. Each driver lays its input out so that tap t of output pixel
   (r, ow) lies at a constant offset off[t] from the pixel (the row kernel's phase rows,
   one output row at a time; the implicit GEMM's column-tap planes, a whole band as
   one row of R*OW pixels). Im2col + GEMM would write those taps out as a column matrix
   and BLAS would copy it again; for a few channels its GEMM has too few outputs
   (27 x 32 for cifar-3x3) to run well at all. A register block is FB filters x up to
   FC_WG_TB taps: per vector of pixels, FB loads of dY and one load of each tap's input
   feed FB * FC_WG_TB FMAs into independent sums, whose lanes are added once per call.
   FB is 2 with AVX2's 16 registers (12 sums) and 4 with AVX-512's 32 (24 sums: 10 loads
   per 24 FMAs instead of 8 per 12; the unaligned tap loads often split cache lines, so
   loads were the limit): kernel alone 1.28-1.39x (Zen 4).

   Two details are worth 1.45x on resnet-3x3-s2's weight gradient: GCC folds each
   tap's load into both of its FMAs (14 loads per 12 FMAs instead of 8), which an empty
   asm "modifying" the vector prevents; and the lanes are added by a transpose-and-add
   tree rather than LANES scalar adds per sum. The asm names an AVX register, which the
   baseline build has not, so the builds are written out and picked at run time
   (target_clones compiles one body for all). */
#ifndef FASTCONV_WEIGHT_GRAD_KERNELS_H
#define FASTCONV_WEIGHT_GRAD_KERNELS_H

#include <stddef.h>
#include <string.h>
#include "_simd_target.h"

#define FC_WG_TB 6
#define FC_WG_WIDE_MIN_VECTORS 8

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
/* AVX-512's "v": any of its 32 registers (x names only the first 16) */
#define FC_PIN_V(v) __asm__("" : "+v"(v))
#define FC_V3 __attribute__((target("arch=x86-64-v3")))

/* One block of FB filters x NT taps (NT <= FC_WG_TB): g[i] receives filter i's sums of
   those taps (NULL: a filter run only to fill the block, its sums dropped). */
#define FC_WEIGHT_GRAD_BLOCK(suffix, FB, NT, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN,         \
                             LANE_SUMS)                                                       \
TARGET static inline FC_ALWAYS_INLINE void fc_weight_grad_block##FB##x##NT##_##suffix(        \
    const T *rows, ptrdiff_t band_stride, const ptrdiff_t *off, const T *const *dy,           \
    ptrdiff_t OW, ptrdiff_t R, T *const *g)                                                   \
{                                                                                             \
    VEC acc[FB * NT];                                                                         \
    const ptrdiff_t full = OW / LANES * LANES, rest = OW - full;                              \
    IVEC keep;                                                                                \
    for (int l = 0; l < LANES; l++)                                                           \
        keep[l] = l < rest ? -1 : 0;                                                          \
    for (int j = 0; j < FB * NT; j++)                                                         \
        acc[j] = (VEC){0};                                                                    \
    for (ptrdiff_t r = 0; r < R; r++) {                                                       \
        const T *x = rows + r * band_stride;                                                  \
        const T *d[FB];                                                                       \
        for (int i = 0; i < FB; i++)                                                          \
            d[i] = dy[i] + r * OW;                                                            \
        for (ptrdiff_t ow = 0; ow < full; ow += LANES) {                                      \
            VEC a[FB];                                                                        \
            for (int i = 0; i < FB; i++)                                                      \
                a[i] = *(const VEC_U *)(d[i] + ow);                                           \
            for (int j = 0; j < NT; j++) {                                                    \
                VEC v = *(const VEC_U *)(x + off[j] + ow);                                    \
                PIN(v);                                                                       \
                for (int i = 0; i < FB; i++)                                                  \
                    acc[i * NT + j] += a[i] * v;                                              \
            }                                                                                 \
        }                                                                                     \
        if (rest) {                                                                           \
            /* the row's last columns: dY from a zero-filled copy, the input masked (what  \
               lies past OW is never summed, whatever its value: the driver leaves room   \
               for the vector to be read) */                                              \
            T ta[FB][LANES];                                                                  \
            VEC a[FB];                                                                        \
            for (int i = 0; i < FB; i++) {                                                    \
                for (int l = 0; l < LANES; l++)                                               \
                    ta[i][l] = 0;                                                             \
                memcpy(ta[i], d[i] + full, (size_t)rest * sizeof(T));                         \
                a[i] = *(const VEC_U *)ta[i];                                                 \
            }                                                                                 \
            for (int j = 0; j < NT; j++) {                                                    \
                const VEC v = (VEC)((IVEC) * (const VEC_U *)(x + off[j] + full) & keep);      \
                for (int i = 0; i < FB; i++)                                                  \
                    acc[i * NT + j] += a[i] * v;                                              \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    T sums[FB * NT + LANES];                                                                  \
    for (int j = 0; j < FB * NT; j += LANES)                                                  \
        LANE_SUMS(acc + j, FB * NT - j, sums + j);                                            \
    for (int i = 0; i < FB; i++)                                                              \
        if (g[i])                                                                             \
            for (int j = 0; j < NT; j++)                                                      \
                g[i][j] += sums[i * NT + j];                                                  \
}

#define FC_WEIGHT_GRAD_BLOCKS(suffix, FB, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS) \
FC_WEIGHT_GRAD_BLOCK(suffix, FB, 1, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)       \
FC_WEIGHT_GRAD_BLOCK(suffix, FB, 2, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)       \
FC_WEIGHT_GRAD_BLOCK(suffix, FB, 3, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)       \
FC_WEIGHT_GRAD_BLOCK(suffix, FB, 4, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)       \
FC_WEIGHT_GRAD_BLOCK(suffix, FB, 5, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)       \
FC_WEIGHT_GRAD_BLOCK(suffix, FB, 6, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)       \
                                                                                              \
/* filters f0 .. f0 + FB - 1 (those < F; the others run as copies of filter f0 and are \
   dropped) over every tap, FC_WG_TB at a time */                                             \
TARGET static void fc_weight_grad_filters##FB##_##suffix(                                     \
    const T *rows, ptrdiff_t band_stride, const ptrdiff_t *off, ptrdiff_t K, const T *dy,     \
    ptrdiff_t ldo, ptrdiff_t f0, ptrdiff_t F, ptrdiff_t OW, ptrdiff_t R, T *g, ptrdiff_t ldg) \
{                                                                                             \
    const T *d[FB];                                                                           \
    T *h[FB];                                                                                 \
    for (ptrdiff_t t0 = 0; t0 < K; t0 += FC_WG_TB) {                                          \
        const ptrdiff_t nt = K - t0 < FC_WG_TB ? K - t0 : FC_WG_TB;                           \
        for (int i = 0; i < FB; i++) {                                                        \
            const int real = f0 + i < F;                                                      \
            d[i] = dy + (real ? f0 + i : f0) * ldo;                                           \
            h[i] = real ? g + (f0 + i) * ldg + t0 : NULL;                                     \
        }                                                                                     \
        const ptrdiff_t *o = off + t0;                                                        \
        switch (nt) {                                                                         \
        case 6: fc_weight_grad_block##FB##x6_##suffix(rows, band_stride, o, d, OW, R, h);     \
            break;                                                                            \
        case 5: fc_weight_grad_block##FB##x5_##suffix(rows, band_stride, o, d, OW, R, h);     \
            break;                                                                            \
        case 4: fc_weight_grad_block##FB##x4_##suffix(rows, band_stride, o, d, OW, R, h);     \
            break;                                                                            \
        case 3: fc_weight_grad_block##FB##x3_##suffix(rows, band_stride, o, d, OW, R, h);     \
            break;                                                                            \
        case 2: fc_weight_grad_block##FB##x2_##suffix(rows, band_stride, o, d, OW, R, h);     \
            break;                                                                            \
        default: fc_weight_grad_block##FB##x1_##suffix(rows, band_stride, o, d, OW, R, h);    \
            break;                                                                            \
        }                                                                                     \
    }                                                                                         \
}

/* Blocks of FB filters, the last FB - 1 or fewer in pairs (an odd one paired with itself,
   its twin's sums dropped). */
#define FC_WEIGHT_GRAD(suffix, FB, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)        \
FC_WEIGHT_GRAD_BLOCKS(suffix, FB, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)         \
FC_WEIGHT_GRAD_PAIRS_##FB(suffix, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)         \
                                                                                              \
TARGET static void fc_weight_grad_band_##suffix(                                              \
    const T *rows, ptrdiff_t band_stride, const ptrdiff_t *off, ptrdiff_t K, const T *dy,     \
    ptrdiff_t ldo, ptrdiff_t F, ptrdiff_t OW, ptrdiff_t R, T *g, ptrdiff_t ldg)               \
{                                                                                             \
    ptrdiff_t f0 = 0;                                                                         \
    /* rows shorter than FC_WG_WIDE_MIN_VECTORS vectors keep pairs: 4-filter blocks ran    \
       lenet's 24 columns 0.93-0.99x and cifar's 32 0.97-1.03x, resnet-stem's 112 1.04x     \
       and the implicit GEMM's bands (one long row) 1.06-1.08x (whole backward) */           \
    if (FB == 2 || OW >= FC_WG_WIDE_MIN_VECTORS * LANES)                                      \
        for (; f0 + FB <= F; f0 += FB)                                                        \
            fc_weight_grad_filters##FB##_##suffix(rows, band_stride, off, K, dy, ldo, f0, F,  \
                                                  OW, R, g, ldg);                             \
    for (; f0 < F; f0 += 2)                                                                   \
        fc_weight_grad_filters2_##suffix(rows, band_stride, off, K, dy, ldo, f0, F, OW, R, g, \
                                         ldg);                                                \
}

/* a build with blocks of 4 filters also needs the pair blocks for the rest */
#define FC_WEIGHT_GRAD_PAIRS_2(suffix, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)
#define FC_WEIGHT_GRAD_PAIRS_4(suffix, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)    \
FC_WEIGHT_GRAD_BLOCKS(suffix, 2, T, VEC, VEC_U, IVEC, LANES, TARGET, PIN, LANE_SUMS)

#define FC_WEIGHT_GRAD_DISPATCH(suffix, T)                                                    \
static void fc_weight_grad_band_##suffix(                                                     \
    const T *rows, ptrdiff_t band_stride, const ptrdiff_t *off, ptrdiff_t K, const T *dy,     \
    ptrdiff_t ldo, ptrdiff_t F, ptrdiff_t OW, ptrdiff_t R, T *g, ptrdiff_t ldg)               \
{                                                                                             \
    if (FC_CPU_HAS_V4())                                                                      \
        fc_weight_grad_band_##suffix##_v4(rows, band_stride, off, K, dy, ldo, F, OW, R, g,    \
                                          ldg);                                               \
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))                 \
        fc_weight_grad_band_##suffix##_v3(rows, band_stride, off, K, dy, ldo, F, OW, R, g,    \
                                          ldg);                                               \
    else                                                                                      \
        fc_weight_grad_band_##suffix##_base(rows, band_stride, off, K, dy, ldo, F, OW, R, g,  \
                                            ldg);                                             \
}

FC_WEIGHT_GRAD(s_v4, 4, float, fc_v8sf, fc_v8sf_u, fc_v8si, 8, FC_V4, FC_PIN_V, fc_lane_sums_s)
FC_WEIGHT_GRAD(s_v3, 2, float, fc_v8sf, fc_v8sf_u, fc_v8si, 8, FC_V3, FC_PIN_YMM, fc_lane_sums_s)
FC_WEIGHT_GRAD(s_base, 2, float, fc_v8sf, fc_v8sf_u, fc_v8si, 8, , FC_PIN_NONE, fc_lane_sums_s)
FC_WEIGHT_GRAD(d_v4, 4, double, fc_v4df, fc_v4df_u, fc_v4di, 4, FC_V4, FC_PIN_V, fc_lane_sums_d)
FC_WEIGHT_GRAD(d_v3, 2, double, fc_v4df, fc_v4df_u, fc_v4di, 4, FC_V3, FC_PIN_YMM, fc_lane_sums_d)
FC_WEIGHT_GRAD(d_base, 2, double, fc_v4df, fc_v4df_u, fc_v4di, 4, , FC_PIN_NONE, fc_lane_sums_d)
FC_WEIGHT_GRAD_DISPATCH(s, float)
FC_WEIGHT_GRAD_DISPATCH(d, double)

#endif
