/* Direct convolution of one output row: every filter, register-blocked.

   For layers with few input channels (a network's first layers: C = 1 or 3)
   im2col + GEMM multiplies a K = C*KH*KW (25 .. 147) deep column matrix, too
   shallow for BLAS to run well, and im2col writes KH*KW copies of the input.
   Here each output row is computed from its KH input rows directly: a block of
   FC_FB filters times FC_V vectors of output columns stays in registers while
   the C*KH*KW taps stream past, each tap one broadcast weight per filter and
   one vector load per column vector.

   The driver (fastconv/_conv_direct.pyx) prepares, per band of output rows, the
   input rows in "phase" form: padded, and split by column parity for stride s
   (phase r holds padded columns r, r + s, r + 2s, ...), so that the columns
   ow*s + kw*d of every tap are one contiguous run of phase (kw*d) % s.
   Vectors use GCC's vector extensions, so the same code becomes AVX2 + FMA in
   the x86-64-v3 clone and SSE2 pairs in the baseline one. */
#ifndef FASTCONV_DIRECT_KERNELS_H
#define FASTCONV_DIRECT_KERNELS_H

#include <stddef.h>
#include <string.h>
#include "_simd_target.h"

/* Filters per register block and the most column vectors per block: 3 (12 sums + 3
   columns + 1 weight fill AVX2's 16 registers), 4 where AVX-512 gives 32 registers.
   4 x 4 sums halve the weight broadcasts per FMA and run a 32-wide row (cifar's) as
   one block instead of two: kernel alone 1.26x on cifar-3x3, 1.04x on resnet-stem,
   1.02x on lenet (Zen 4). */
#define FC_FB 4
#define FC_V 3
#define FC_V_WIDE 4

/* fc_direct_band_narrow_* / fc_direct_band_wide_* (FC_DIRECT_BAND below): R consecutive
   output rows of all filters.

   rows   the phase rows of the band's input (see above): tap row kh of channel c for
          output row r at rows + r*band_stride + c*c_stride + kh*kh_stride, [S][ldr]
          (the driver stores each input row once: output rows share them)
   live   R x [KH]: 0 where the input row is all padding (its taps are skipped)
   wpack  [ceil(F/FB)][C][KH][KW][FB] the filters, zero past F
   tap    [KW]: where kernel column kw starts in a row's phases,
          (kw*d % S)*ldr + kw*d / S
   out    out[f*ldo + r*OW + ow] for f < F, r < R, ow < OW: act(sum + bias[f]) */
/* One register block: FC_FB filters x NV column vectors from ow0, summed over every tap,
   then stored as act(sum + bias) (through `tail` when the block hangs past OW). */
#define FC_DIRECT_BLOCK(suffix, NV, T, VEC, VEC_U, IVEC, LANES, BLOCK_TARGET)                 \
static inline FC_ALWAYS_INLINE BLOCK_TARGET void fc_direct_block##NV##_##suffix(              \
    const T *rows, ptrdiff_t c_stride, ptrdiff_t kh_stride, const unsigned char *live,         \
    const T *wblock, const ptrdiff_t *tap, int C, int KH, int KW, ptrdiff_t ow0, ptrdiff_t nf, \
    const T *bias, int relu, T *out, ptrdiff_t ldo, ptrdiff_t width)                          \
{                                                                                             \
    VEC acc[FC_FB][NV];                                                                       \
    T tail[NV * LANES];                                                                       \
    for (int i = 0; i < FC_FB; i++)                                                           \
        for (int j = 0; j < NV; j++)                                                          \
            acc[i][j] = (VEC){0};                                                             \
    for (int c = 0; c < C; c++) {                                                             \
        for (int kh = 0; kh < KH; kh++) {                                                     \
            const T *w = wblock + ((ptrdiff_t)c * KH + kh) * KW * FC_FB;                      \
            if (!live[kh])                                                                    \
                continue;                                                                     \
            const T *row = rows + c * c_stride + kh * kh_stride + ow0;                        \
            for (int kw = 0; kw < KW; kw++, w += FC_FB) {                                     \
                const T *src = row + tap[kw];                                                 \
                VEC x[NV];                                                                    \
                for (int j = 0; j < NV; j++)                                                  \
                    x[j] = *(const VEC_U *)(src + j * LANES);                                 \
                for (int i = 0; i < FC_FB; i++) {                                             \
                    /* w - 0 is w exactly (-0 and NaN too): a plain broadcast */             \
                    const VEC wi = w[i] - (VEC){0};                                           \
                    for (int j = 0; j < NV; j++)                                              \
                        acc[i][j] += wi * x[j];                                               \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    for (int i = 0; i < FC_FB && i < nf; i++) {                                               \
        const T b = bias ? bias[i] : 0;                                                       \
        T *dst = out + i * ldo + ow0;                                                         \
        T *to = width == NV * LANES ? dst : tail;                                             \
        for (int j = 0; j < NV; j++) {                                                        \
            VEC v = acc[i][j] + b;                                                            \
            if (relu) /* keep where !(v <= 0): NaN stays, -0 becomes 0 */                    \
                v = (VEC)((IVEC)v & ~(IVEC)(v <= (VEC){0}));                                  \
            *(VEC_U *)(to + j * LANES) = v;                                                   \
        }                                                                                     \
        if (to == tail)                                                                       \
            memcpy(dst, tail, (size_t)width * sizeof(T));                                     \
    }                                                                                         \
}

/* FC_DIRECT_BAND(name, TARGET, T, LANES, MAX_VECTORS, BLOCK4, BLOCK3, BLOCK2, BLOCK1): the
   band function `name` built with TARGET, blocks of nvec vectors of LANES by BLOCKnvec. */
#define FC_DIRECT_BAND(name, TARGET, T, LANES, MAX_VECTORS, BLOCK4, BLOCK3, BLOCK2, BLOCK1)   \
TARGET static void name(                                                                      \
    const T *rows, ptrdiff_t band_stride, ptrdiff_t c_stride, ptrdiff_t kh_stride,            \
    const unsigned char *live, const T *wpack, const ptrdiff_t *tap, int C, int KH, int KW,   \
    ptrdiff_t F,                                                                              \
    const T *bias, int relu, T *out, ptrdiff_t ldo, ptrdiff_t OW, ptrdiff_t R)               \
{                                                                                             \
    const ptrdiff_t block_size = (ptrdiff_t)C * KH * KW * FC_FB;                              \
    /* the row's vectors in blocks of at most max_vectors, as even as possible (40 columns \
       run as 24 + 16 rather than 32 + 8 with a 4-FMA block); computed once: a 64-bit      \
       division per block cost as much as the block's FMAs on lenet's 24-wide rows */     \
    const ptrdiff_t max_vectors = MAX_VECTORS;                                               \
    const ptrdiff_t nv = (OW + LANES - 1) / LANES;                                           \
    const ptrdiff_t blocks = (nv + max_vectors - 1) / max_vectors;                           \
    const ptrdiff_t base_vectors = nv / blocks, wider_blocks = nv % blocks;                  \
    /* filter blocks outermost: a block's 4 output planes are written row after row, 4      \
       streams instead of F (lenet's 30 planes at once stalled on the store buffer) */      \
    for (ptrdiff_t f0 = 0; f0 < F; f0 += FC_FB) {                                             \
        const T *wblock = wpack + (f0 / FC_FB) * block_size;                                  \
        const T *b = bias ? bias + f0 : NULL;                                                 \
        const ptrdiff_t nf = F - f0;                                                          \
        for (ptrdiff_t r = 0; r < R; r++) {                                                   \
            const T *row_in = rows + r * band_stride;                                        \
            const unsigned char *row_live = live + r * KH;                                   \
            T *o = out + f0 * ldo + r * OW;                                                  \
            ptrdiff_t ow0 = 0;                                                               \
            for (ptrdiff_t k = 0; k < blocks; k++) {                                         \
                const int nvec = (int)(base_vectors + (k < wider_blocks));                    \
                const ptrdiff_t width = OW - ow0 < nvec * LANES ? OW - ow0 : nvec * LANES;   \
                if (nvec == 4)                                                               \
                    BLOCK4(row_in, c_stride, kh_stride, row_live, wblock, tap, C, KH, KW,    \
                           ow0, nf, b, relu, o, ldo, width);                                  \
                else if (nvec == 3)                                                          \
                    BLOCK3(row_in, c_stride, kh_stride, row_live, wblock, tap, C, KH, KW,    \
                           ow0, nf, b, relu, o, ldo, width);                                  \
                else if (nvec == 2)                                                          \
                    BLOCK2(row_in, c_stride, kh_stride, row_live, wblock, tap, C, KH, KW,    \
                           ow0, nf, b, relu, o, ldo, width);                                  \
                else                                                                         \
                    BLOCK1(row_in, c_stride, kh_stride, row_live, wblock, tap, C, KH, KW,    \
                           ow0, nf, b, relu, o, ldo, width);                                  \
                ow0 += width;                                                                \
            }                                                                                \
        }                                                                                     \
    }                                                                                         \
}

#define FC_DIRECT_BLOCKS(suffix, T, VEC, VEC_U, IVEC, LANES)                                 \
FC_DIRECT_BLOCK(suffix, 1, T, VEC, VEC_U, IVEC, LANES, )                                      \
FC_DIRECT_BLOCK(suffix, 2, T, VEC, VEC_U, IVEC, LANES, )                                      \
FC_DIRECT_BLOCK(suffix, 3, T, VEC, VEC_U, IVEC, LANES, )                                      \
FC_DIRECT_BLOCK(suffix, 4, T, VEC, VEC_U, IVEC, LANES, )
FC_DIRECT_BLOCKS(s, float, fc_v8sf, fc_v8sf_u, fc_v8si, 8)
FC_DIRECT_BLOCKS(d, double, fc_v4df, fc_v4df_u, fc_v4di, 4)

/* The clones: 4-vector blocks only where the loader picks the AVX-512 clone (exactly
   where FC_CPU_HAS_V4() holds), so the others never take 4 (which would spill, still
   correct). */
FC_DIRECT_BAND(fc_direct_band_narrow_s, FC_TARGET_WIDE, float, 8,
               FC_CPU_HAS_V4() ? FC_V_WIDE : FC_V, fc_direct_block4_s, fc_direct_block3_s,
               fc_direct_block2_s, fc_direct_block1_s)
FC_DIRECT_BAND(fc_direct_band_narrow_d, FC_TARGET_WIDE, double, 4,
               FC_CPU_HAS_V4() ? FC_V_WIDE : FC_V, fc_direct_block4_d, fc_direct_block3_d,
               fc_direct_block2_d, fc_direct_block1_d)

/* The AVX-512 build: the same blocks, but those of 4 and 2 vectors of 32 bytes as 2 and 1
   of 64 bytes (the same columns in half the instructions and loads; the implicit GEMM's
   kernel gained most where the VM ran slow, see _implicit_kernels.h). Blocks of 3 and 1
   stay 32-byte vectors: lenet's 24-wide rows ran 0.6x as one 64-byte block and a half. */
#if FC_HAVE_V4_BUILD
FC_DIRECT_BLOCK(wide_s, 1, float, fc_v16sf, fc_v16sf_u, fc_v16si, 16, FC_V4)
FC_DIRECT_BLOCK(wide_s, 2, float, fc_v16sf, fc_v16sf_u, fc_v16si, 16, FC_V4)
FC_DIRECT_BLOCK(wide_d, 1, double, fc_v8df, fc_v8df_u, fc_v8di, 8, FC_V4)
FC_DIRECT_BLOCK(wide_d, 2, double, fc_v8df, fc_v8df_u, fc_v8di, 8, FC_V4)
FC_DIRECT_BAND(fc_direct_band_wide_s, FC_V4, float, 8, FC_V_WIDE, fc_direct_block2_wide_s,
               fc_direct_block3_s, fc_direct_block1_wide_s, fc_direct_block1_s)
FC_DIRECT_BAND(fc_direct_band_wide_d, FC_V4, double, 4, FC_V_WIDE, fc_direct_block2_wide_d,
               fc_direct_block3_d, fc_direct_block1_wide_d, fc_direct_block1_d)
#else
/* never called: FC_V4_BUILD_RUNS() is 0 */
#define fc_direct_band_wide_s fc_direct_band_narrow_s
#define fc_direct_band_wide_d fc_direct_band_narrow_d
#endif

/* fc_direct_band_*: the build the driver picked, the AVX-512 one with `wide` (where
   FC_V4_BUILD_RUNS() allows it) */
#define FC_DIRECT_DISPATCH(suffix, T)                                                        \
static inline void fc_direct_band_##suffix(                                                  \
    int wide, const T *rows, ptrdiff_t band_stride, ptrdiff_t c_stride, ptrdiff_t kh_stride, \
    const unsigned char *live, const T *wpack, const ptrdiff_t *tap, int C, int KH, int KW,  \
    ptrdiff_t F, const T *bias, int relu, T *out, ptrdiff_t ldo, ptrdiff_t OW, ptrdiff_t R)  \
{                                                                                            \
    if (wide)                                                                                \
        fc_direct_band_wide_##suffix(rows, band_stride, c_stride, kh_stride, live, wpack,    \
                                     tap, C, KH, KW, F, bias, relu, out, ldo, OW, R);        \
    else                                                                                     \
        fc_direct_band_narrow_##suffix(rows, band_stride, c_stride, kh_stride, live, wpack,  \
                                       tap, C, KH, KW, F, bias, relu, out, ldo, OW, R);      \
}

FC_DIRECT_DISPATCH(s, float)
FC_DIRECT_DISPATCH(d, double)

#endif
