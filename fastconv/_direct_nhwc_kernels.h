/* Direct convolution of channels-last (NHWC) output rows: the row kernel's NHWC build.

   An NHWC layer with few input channels (C = 1 or 3) otherwise gathers a column
   matrix of K = C*KH*KW (25 .. 147) values per output pixel and multiplies it by the
   filters: cifar-3x3's 1-thread forward spent 28% of its time gathering. Here the
   driver (fastconv/_conv_direct.pyx) copies the input rows under a band of output
   rows, padded by the padding mode, each row's pixels as C-value runs as in the input
   (Wp pixels: every column the row's taps span); tap (kh, kw, c) of output pixel ow then
   lies at `row_kh + ow*sw*C + kw*dw*C + c`, and a register block of RB pixels x NV
   vectors of filters sums every tap: per tap NV loads of the filters' weights (packed
   [kh][kw][c][F], padded with zeros to whole vectors) and one broadcast of the input
   per pixel feed RB * NV FMAs. The output is channels-last already: each pixel's F
   sums are one contiguous run (a vector past F is stored through `tail`).

   NCHW layers run the same blocks (`plane` > 0): the driver copies each channel's row
   padded (a row holds C runs of Wp values), tap (kh, c, kw) lies at
   `row_kh + ow*sw + c*Wp + kw*dw`, and the block's sums go out transposed, each
   filter's RB pixels one run of its output plane (`plane` values apart), or every
   `ostep`-th value of one (a stride phase of grad_x, fastconv/_stride_phases.py):
   transposed in registers (FC_DN_STORE_PLANAR_*), through a buffer in the 32-byte float64
   build and where taps are summed in chunks. Against the
   implicit GEMM of fastconv/_implicit_kernels.h, whose blocks load the input as
   vectors and broadcast the filters, the filters here load as aligned vectors and the
   inputs broadcast: no loads across cache lines, fewer loads per FMA (resnet-3x3-s2
   1.04-1.11x, see fastconv/_direct.py).

   Vectors use GCC's vector extensions: a 64-byte build for AVX-512 (32 registers: RB x NV
   up to 24 sums) and a 32-byte one in the target_clones of FC_TARGET_WIDE for the others
   (16 registers: up to 12 sums). */
#ifndef FASTCONV_DIRECT_NHWC_KERNELS_H
#define FASTCONV_DIRECT_NHWC_KERNELS_H

#include <stddef.h>
#include <string.h>
#include "_simd_target.h"
#if FC_HAVE_V4_BUILD
#include <immintrin.h>
#endif

/* Most pixels and filter vectors of one register block (the AVX-512 build's: 12 x 2 or
   6 x 4 sums; arrays this size hold any build's block, the constants R and NV pick the
   part in registers). */
#define FC_DN_MAX_ROWS 12
#define FC_DN_MAX_NV 4
/* Taps are summed at most this many at a time in registers (whole rows of taps where
   they fit), each chunk's sums then added to the earlier ones', as OpenBLAS sums its
   k-blocks: one running sum over K = C*KH*KW taps had 3.5x im2col's float32 error at
   K = 576, 11x at 25088 (now the same). Layers with fewer taps skip the chunk logic,
   which cost 2-7% (resnet-stem's 147 taps in chunks of 128: 6%). */
#define FC_DN_CHUNK 256

/* switch (R) over blocks of 1 .. 12, 8 or 6 pixels of NV vectors */
#define FC_DN_CASE(sfx, NV, R, CH)                                                          \
    case R: fc_dn_block_##sfx(R, NV, CH, rowp, KH, p0, off, ntap, step, wchunk, ldw,       \
                              bchunk, relu, out, ldo, nf, part, plane, ostep); break;
#define FC_DN_CASES6(sfx, NV, CH)                                                           \
    FC_DN_CASE(sfx, NV, 6, CH) FC_DN_CASE(sfx, NV, 5, CH) FC_DN_CASE(sfx, NV, 4, CH)        \
    FC_DN_CASE(sfx, NV, 3, CH) FC_DN_CASE(sfx, NV, 2, CH) default: FC_DN_CASE(sfx, NV, 1, CH)
#define FC_DN_CASES8(sfx, NV, CH)                                                           \
    FC_DN_CASE(sfx, NV, 8, CH) FC_DN_CASE(sfx, NV, 7, CH) FC_DN_CASES6(sfx, NV, CH)
#define FC_DN_NO_CASES(sfx, NV, CH) default: break;
#define FC_DN_CASES12(sfx, NV, CH)                                                          \
    FC_DN_CASE(sfx, NV, 12, CH) FC_DN_CASE(sfx, NV, 11, CH) FC_DN_CASE(sfx, NV, 10, CH)     \
    FC_DN_CASE(sfx, NV, 9, CH) FC_DN_CASES8(sfx, NV, CH)

/* acc[j][v] += the taps [t_begin, t_end) of row `row`, filters from wk (inside a block) */
#define FC_DN_SUM_TAPS(T, VEC, VEC_U, LANES, t_begin, t_end)                                 \
    for (ptrdiff_t t = (t_begin); t < (t_end); t++, wk += ldw) {                            \
        const T *src = row + off[t];                                                        \
        VEC b[FC_DN_MAX_NV];                                                                \
        for (int v = 0; v < NV; v++)                                                        \
            b[v] = *(const VEC_U *)(wk + v * LANES);                                        \
        for (int j = 0; j < R; j++) {                                                       \
            /* x - 0 is x exactly (-0 and NaN too): a plain broadcast */                   \
            const VEC a = src[j * step] - (VEC){0};                                         \
            for (int v = 0; v < NV; v++)                                                    \
                acc[j][v] += a * b[v];                                                      \
        }                                                                                   \
    }

/* the most pixels per block of NV = 1 .. 4 vectors: 64-byte vectors in 32 registers
   (12 x 2 sums: 12 broadcasts and 2 loads per 24 FMAs), 32-byte ones in 16 */
#define FC_DN_ROWS_WIDE() {0, 12, 12, 8, 6}
#define FC_DN_ROWS_NARROW() {0, 8, 6, 0, 0}

/* FC_DN_ROW(..., CH, NAME, PART): one output row of every filter, out[ow*F + f] for
   ow < OW, f < F (with `plane`: out[f*plane + ow*ostep]); wpack: [KH][ntap][ldw] (ldw >= F, a
   whole number of vectors, zero past F); bias: ldw values, zero past F (all zero for
   none); blocks of at most `vectors` vectors of filters. Two builds: CH 1 sums the taps
   in chunks (in PART, a buffer on the stack), CH 0 in one run (no buffer: with one, and
   the chunked blocks beside, lenet's and cifar's rows ran 1.07-1.18x slower) */
#define FC_DN_ROW(sfx, T, LANES, TARGET, MAX_NV, ROWS, CASES1, CASES2, CASES3, CASES4, CH,   \
                  NAME, PART)                                                               \
TARGET static void NAME(                                                                    \
    const T *const *rowp, int KH, const ptrdiff_t *off, ptrdiff_t ntap, ptrdiff_t step,     \
    const T *wpack, ptrdiff_t ldw, const T *bias, int relu, T *row_out, ptrdiff_t F,        \
    ptrdiff_t OW, ptrdiff_t plane, ptrdiff_t ostep, int vectors)                            \
{                                                                                           \
    static const int rows_for[5] = ROWS();                                                  \
    const ptrdiff_t ldo = F;                                                                \
    const ptrdiff_t width = (vectors < MAX_NV ? vectors : MAX_NV) * LANES;                  \
    PART;                                                                                   \
    for (ptrdiff_t f0 = 0; f0 < F; f0 += width) {                                           \
        const ptrdiff_t nf = F - f0 < width ? F - f0 : width;                               \
        const int NV = (int)((nf + LANES - 1) / LANES);                                     \
        const T *wchunk = wpack + f0;                                                       \
        const T *bchunk = bias + f0;                                                        \
        /* the row's pixels in blocks of at most rows_for[NV], as even as possible */       \
        const ptrdiff_t blocks = (OW + rows_for[NV] - 1) / rows_for[NV];                    \
        for (ptrdiff_t k = 0, ow0 = 0; k < blocks; k++) {                                   \
            const int R = (int)((OW - ow0) / (blocks - k));                                 \
            const ptrdiff_t p0 = ow0 * step;                                                \
            T *out = plane ? row_out + f0 * plane + ow0 * ostep : row_out + ow0 * F + f0;   \
            switch (NV) {                                                                   \
            case 1: switch (R) { CASES1(sfx, 1, CH) } break;                                \
            case 2: switch (R) { CASES2(sfx, 2, CH) } break;                                \
            case 3: switch (R) { CASES3(sfx, 3, CH) } break;                                \
            default: switch (R) { CASES4(sfx, 4, CH) } break;                               \
            }                                                                               \
            ow0 += R;                                                                       \
        }                                                                                   \
    }                                                                                       \
}

/* the first n lanes of vector v stored at p: through a buffer (any build), or by a
   masked store (AVX-512: a memcpy per pixel cost lenet's 30 filters ~10%) */
#define FC_DN_STORE_PART_COPY(T, LANES)                                                     \
    do {                                                                                    \
        T tail_[LANES];                                                                     \
        memcpy(tail_, &v_, sizeof(tail_));                                                  \
        memcpy(p_, tail_, (size_t)n_ * sizeof(T));                                          \
    } while (0)
#define FC_DN_STORE_PART_S(p, v, n)                                                         \
    do { fc_v8sf v_ = (v); float *p_ = (p); ptrdiff_t n_ = (n);                            \
         FC_DN_STORE_PART_COPY(float, 8); } while (0)
#define FC_DN_STORE_PART_D(p, v, n)                                                         \
    do { fc_v4df v_ = (v); double *p_ = (p); ptrdiff_t n_ = (n);                           \
         FC_DN_STORE_PART_COPY(double, 4); } while (0)
#define FC_DN_STORE_PART_WIDE_S(p, v, n)                                                    \
    _mm512_mask_storeu_ps((p), (__mmask16)((1u << (n)) - 1), (__m512)(v))
#define FC_DN_STORE_PART_WIDE_D(p, v, n)                                                    \
    _mm512_mask_storeu_pd((p), (__mmask8)((1u << (n)) - 1), (__m512d)(v))

/* The block's sums acc[j][v] (pixels j < R, filters v*LANES + l < nf) stored planar:
   filter f's R pixels at out[f*plane + j*ostep]. Through a buffer, value by value (any
   build, any ostep) ... */
#define FC_DN_STORE_PLANAR_COPY(T, VEC, LANES)                                              \
    do {                                                                                    \
        T planar_[FC_DN_MAX_ROWS][FC_DN_MAX_NV * LANES] __attribute__((aligned(64)));      \
        for (int j = 0; j < R; j++)                                                         \
            for (int v = 0; v < NV; v++)                                                    \
                *(VEC *)(planar_[j] + v * LANES) = acc[j][v];                              \
        for (ptrdiff_t f = 0; f < nf; f++)                                                  \
            for (int j = 0; j < R; j++)                                                     \
                out[f * plane + j * ostep] = planar_[j][f];                                 \
    } while (0)

/* FC_DN_TRANSPOSE_8X8(NAME, TARGET, VEC, IVEC, LO, HI, F1, F2): NAME(r, c) sets c[f] to
   column f of the 8 x 8 matrix whose rows are r[0 .. 7], by three rounds of two-vector
   shuffles (GCC's generic ones): LO / HI interleave rows 2i and 2i + 1 value by value
   (unpacklo / unpackhi: per 16-byte lane for floats, per lane pair for doubles), the
   second round gathers rows 0 .. 3 (4 .. 7) of two columns into one vector (columns 0
   and 4, F1 and F1 + 4, F2 and F2 + 4, 3 and 7), the third joins each column's halves. */
#define FC_DN_TRANSPOSE_8X8(NAME, TARGET, VEC, IVEC, LO, HI, F1, F2)                        \
static inline FC_ALWAYS_INLINE TARGET void NAME(const VEC *r, VEC *c)                       \
{                                                                                           \
    const IVEC lo = LO, hi = HI;                                                            \
    const IVEC even = {0, 1, 8, 9, 4, 5, 12, 13}, odd = {2, 3, 10, 11, 6, 7, 14, 15};       \
    const IVEC first = {0, 1, 2, 3, 8, 9, 10, 11}, second = {4, 5, 6, 7, 12, 13, 14, 15};   \
    const int column[4] = {0, F1, F2, 3};                                                   \
    VEC t[8], u[8];                                                                         \
    _Pragma("GCC unroll 4")                                                                 \
    for (int i = 0; i < 4; i++) {                                                           \
        t[2 * i] = __builtin_shuffle(r[2 * i], r[2 * i + 1], lo);                           \
        t[2 * i + 1] = __builtin_shuffle(r[2 * i], r[2 * i + 1], hi);                       \
    }                                                                                       \
    _Pragma("GCC unroll 2")                                                                 \
    for (int h = 0; h < 2; h++) {                                                           \
        u[4 * h] = __builtin_shuffle(t[4 * h], t[4 * h + 2], even);                         \
        u[4 * h + 1] = __builtin_shuffle(t[4 * h], t[4 * h + 2], odd);                      \
        u[4 * h + 2] = __builtin_shuffle(t[4 * h + 1], t[4 * h + 3], even);                 \
        u[4 * h + 3] = __builtin_shuffle(t[4 * h + 1], t[4 * h + 3], odd);                  \
    }                                                                                       \
    _Pragma("GCC unroll 4")                                                                 \
    for (int i = 0; i < 4; i++) {                                                           \
        c[column[i]] = __builtin_shuffle(u[i], u[4 + i], first);                            \
        c[column[i] + 4] = __builtin_shuffle(u[i], u[4 + i], second);                       \
    }                                                                                       \
}

/* floats: unpacklo / unpackhi per 16-byte lane; doubles: per lane pair */
#define FC_DN_LO_S {0, 8, 1, 9, 4, 12, 5, 13}
#define FC_DN_HI_S {2, 10, 3, 11, 6, 14, 7, 15}
#define FC_DN_LO_D {0, 8, 2, 10, 4, 12, 6, 14}
#define FC_DN_HI_D {1, 9, 3, 11, 5, 13, 7, 15}
FC_DN_TRANSPOSE_8X8(fc_dn_transpose_8x8_s, , fc_v8sf, fc_v8si, FC_DN_LO_S, FC_DN_HI_S, 1, 2)

/* ... or, in the 32-byte float build for ostep 1, by transposing each vector's 8
   filters x 8 pixels in registers (GCC's generic shuffles: AVX2's unpack / shuffle /
   permute2f128 in the x86-64-v3 clone) and storing each filter's pixels as one run
   (the x86-64-v4 clone of this build, A/B at 1 / 2 threads: cifar-3x3's forward 1.12x /
   1.28x, lenet-mnist's 1.18x / 1.22x, resnet-stem's 1.04x; the stride phases' ostep 2,
   stored value by value from the registers, ran 0.98x, so they keep the buffer).
   r: pixels 0 .. 7 (n of them valid) of 8 filters; filters past nf are not stored. */
static inline FC_ALWAYS_INLINE void fc_dn_store_8x8_s(const fc_v8sf *r, int n, float *out,
                                                      ptrdiff_t plane, ptrdiff_t nf)
{
    fc_v8sf c[8];
    fc_dn_transpose_8x8_s(r, c);
#pragma GCC unroll 8
    for (int f = 0; f < 8; f++) {
        if (f >= nf)
            continue;
        float *o = out + f * plane;
        if (n == 8)
            *(fc_v8sf_u *)o = c[f];
        else
            memcpy(o, &c[f], (size_t)n * sizeof(float));
    }
}

/* acc's pixels (FC_DN_ROWS_NARROW: at most 8), padded with zeros */
#define FC_DN_STORE_PLANAR_NARROW_S(T, VEC, LANES)                                          \
    do {                                                                                    \
        if (ostep != 1 || R > 8) {                                                          \
            FC_DN_STORE_PLANAR_COPY(T, VEC, LANES);                                         \
            break;                                                                          \
        }                                                                                   \
        _Pragma("GCC unroll 2")                                                             \
        for (int v = 0; v < NV; v++) {                                                      \
            fc_v8sf r_[8];                                                                  \
            _Pragma("GCC unroll 8")                                                         \
            for (int i = 0; i < 8; i++)                                                     \
                r_[i] = i < R ? acc[i][v] : (fc_v8sf){0};                                   \
            fc_dn_store_8x8_s(r_, R, out + v * LANES * plane, plane, nf - v * LANES);       \
        }                                                                                   \
    } while (0)

#if FC_HAVE_V4_BUILD
/* ... or, in the AVX-512 float build for ostep 1 and 2 (a stride phase of grad_x), by
   transposing each vector's 16 filters x 8 pixels in registers and storing every
   filter's pixels with one masked store, spread to the even lanes for ostep 2 (A/B
   against the buffer, 1 / 2 threads: cifar-3x3's forward 1.10x / 1.44x, lenet-mnist's
   1.48x / 1.54x, resnet-stem's 1.06x / 1.10x, resnet-3x3-s2's pixel-row stride phases
   1.01-1.04x). r: pixels 0 .. 7 (n of them valid) of 16 filters, out: the first
   filter's first pixel; filters past nf are not stored. */
static inline FC_ALWAYS_INLINE FC_V4 void fc_dn_store_8x16_s(
    const fc_v16sf *rows, int n, float *out, ptrdiff_t plane, ptrdiff_t ostep, ptrdiff_t nf)
{
    __m512 r[8];
    for (int i = 0; i < 8; i++)
        r[i] = (__m512)rows[i];
    /* per 128-bit lane b: t = rows (2i, 2i+1) of filters 4b .. 4b+3 interleaved */
    const __m512 t0 = _mm512_unpacklo_ps(r[0], r[1]), t1 = _mm512_unpackhi_ps(r[0], r[1]);
    const __m512 t2 = _mm512_unpacklo_ps(r[2], r[3]), t3 = _mm512_unpackhi_ps(r[2], r[3]);
    const __m512 t4 = _mm512_unpacklo_ps(r[4], r[5]), t5 = _mm512_unpackhi_ps(r[4], r[5]);
    const __m512 t6 = _mm512_unpacklo_ps(r[6], r[7]), t7 = _mm512_unpackhi_ps(r[6], r[7]);
    /* u[i] (u[4 + i]): rows 0 .. 3 (4 .. 7) of filter 4b + i in lane b */
    const __m512 u[8] = {
        _mm512_shuffle_ps(t0, t2, 0x44), _mm512_shuffle_ps(t0, t2, 0xEE),
        _mm512_shuffle_ps(t1, t3, 0x44), _mm512_shuffle_ps(t1, t3, 0xEE),
        _mm512_shuffle_ps(t4, t6, 0x44), _mm512_shuffle_ps(t4, t6, 0xEE),
        _mm512_shuffle_ps(t5, t7, 0x44), _mm512_shuffle_ps(t5, t7, 0xEE)};
    /* lanes 0 .. 1 (2 .. 3) of u[i] and u[4 + i]: filters i, 4 + i (8 + i, 12 + i) */
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29,
                                         30, 31);
    /* ostep 2: pixel j to lane 2j, of the first (second) filter of a vector */
    const __m512i spread0 = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i spread1 = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14,
                                              14, 15, 15);
    const __mmask8 run = (__mmask8)((1u << n) - 1);
    const __mmask16 even = (__mmask16)(0x5555u & ((1u << (2 * n)) - 1));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        const __m512 pair[2] = {_mm512_permutex2var_ps(u[i], lo, u[4 + i]),
                                _mm512_permutex2var_ps(u[i], hi, u[4 + i])};
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const ptrdiff_t f0 = 8 * h + i, f1 = 8 * h + 4 + i;
            if (ostep == 1) {
                if (f0 < nf)
                    _mm256_mask_storeu_ps(out + f0 * plane, run,
                                          _mm512_castps512_ps256(pair[h]));
                if (f1 < nf)
                    _mm256_mask_storeu_ps(out + f1 * plane, run,
                                          _mm512_extractf32x8_ps(pair[h], 1));
            } else {
                if (f0 < nf)
                    _mm512_mask_storeu_ps(out + f0 * plane, even,
                                          _mm512_permutexvar_ps(spread0, pair[h]));
                if (f1 < nf)
                    _mm512_mask_storeu_ps(out + f1 * plane, even,
                                          _mm512_permutexvar_ps(spread1, pair[h]));
            }
        }
    }
}

/* ... and in the AVX-512 float64 build likewise, 8 filters x 8 pixels (GCC's generic
   shuffles), each filter's run one masked store, or two spread to the even lanes for
   ostep 2 (A/B against the buffer, float64, 1 / 2 threads: cifar-3x3's forward 1.09x /
   1.23x, lenet-mnist's 1.28x / 1.43x, resnet-stem's 1.04x, the stride phases 1.01x) */
FC_DN_TRANSPOSE_8X8(fc_dn_transpose_8x8_d, FC_V4, fc_v8df, fc_v8di, FC_DN_LO_D, FC_DN_HI_D, 2, 1)

static inline FC_ALWAYS_INLINE FC_V4 void fc_dn_store_8x8_d(
    const fc_v8df *r, int n, double *out, ptrdiff_t plane, ptrdiff_t ostep, ptrdiff_t nf)
{
    fc_v8df c[8];
    fc_dn_transpose_8x8_d(r, c);
    const __mmask8 run = (__mmask8)((1u << n) - 1);
    const __m512i spread0 = _mm512_setr_epi64(0, 0, 1, 1, 2, 2, 3, 3);
    const __m512i spread1 = _mm512_setr_epi64(4, 4, 5, 5, 6, 6, 7, 7);
    const __mmask8 even0 = (__mmask8)(0x55u & ((1u << (2 * n)) - 1));
    const __mmask8 even1 = (__mmask8)(n > 4 ? 0x55u & ((1u << (2 * (n - 4))) - 1) : 0);
#pragma GCC unroll 8
    for (int f = 0; f < 8; f++) {
        if (f >= nf)
            continue;
        double *o = out + f * plane;
        if (ostep == 1) {
            _mm512_mask_storeu_pd(o, run, (__m512d)c[f]);
        } else {
            _mm512_mask_storeu_pd(o, even0, _mm512_permutexvar_pd(spread0, (__m512d)c[f]));
            if (n > 4)
                _mm512_mask_storeu_pd(o + 8, even1,
                                      _mm512_permutexvar_pd(spread1, (__m512d)c[f]));
        }
    }
}

/* acc's pixels in groups of 8 (the last padded with zeros, not stored), each group's
   vectors stored by STORE8 (fc_dn_store_8x16_s, fc_dn_store_8x8_d); ostep > 2 through the
   buffer */
#define FC_DN_STORE_PLANAR_GROUPS(T, VEC, LANES, STORE8)                                    \
    do {                                                                                    \
        if (ostep > 2) {                                                                    \
            FC_DN_STORE_PLANAR_COPY(T, VEC, LANES);                                         \
            break;                                                                          \
        }                                                                                   \
        _Pragma("GCC unroll 2")                                                             \
        for (int g = 0; g < R; g += 8)                                                      \
            _Pragma("GCC unroll 4")                                                         \
            for (int v = 0; v < NV; v++) {                                                  \
                VEC r_[8];                                                                  \
                _Pragma("GCC unroll 8")                                                     \
                for (int i = 0; i < 8; i++)                                                 \
                    r_[i] = g + i < R ? acc[g + i][v] : (VEC){0};                           \
                STORE8(r_, R - g < 8 ? R - g : 8, out + v * LANES * plane + g * ostep,      \
                       plane, ostep, nf - v * LANES);                                       \
            }                                                                               \
    } while (0)
#define FC_DN_STORE_PLANAR_WIDE_S(T, VEC, LANES)                                            \
    FC_DN_STORE_PLANAR_GROUPS(T, VEC, LANES, fc_dn_store_8x16_s)
#define FC_DN_STORE_PLANAR_WIDE_D(T, VEC, LANES)                                            \
    FC_DN_STORE_PLANAR_GROUPS(T, VEC, LANES, fc_dn_store_8x8_d)

#endif

/* GCC cannot see that a block reads `done` only after a chunk wrote it (`chunks`) once
   its loops are unrolled; the warning points into this macro's definition, so the
   pragma encloses the definition and the builds below */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
/* FC_DIRECT_NHWC(sfx, T, VEC, VEC_U, IVEC, LANES, BLOCK_TARGET, TARGET, MAX_NV, ROWS,
   CASES1 .. CASES4, STORE_PART, STORE_PLANAR): one build of the kernel, blocks of up to
   MAX_NV vectors of LANES, ROWS[NV] pixels at most for NV vectors (CASESn: the switch
   over those); STORE_PART stores a vector's first lanes, STORE_PLANAR a block of NCHW
   output (FC_DN_STORE_PLANAR_*). */
#define FC_DIRECT_NHWC(sfx, T, VEC, VEC_U, IVEC, LANES, BLOCK_TARGET, TARGET, MAX_NV, ROWS, \
                       CASES1, CASES2, CASES3, CASES4, STORE_PART, STORE_PLANAR)            \
/* out[j*ldo + f] = act(bias[f] + sum over taps) for pixels j < R and filters f < nf      \
   (<= NV*LANES); rowp[kh] + p0: row kh's input at the block's first pixel, rowp[kh]       \
   NULL where the row is all padding (skipped); off[t]: tap t = kw*C + c's offset in a     \
   row; step: sw*C between pixels; w: the block's filters, [KH][ntap][ldw] */             \
static inline FC_ALWAYS_INLINE BLOCK_TARGET void fc_dn_block_##sfx(                              \
    const int R, const int NV, const int CHUNKED, const T *const *rowp, int KH, ptrdiff_t p0,\
    const ptrdiff_t *off, ptrdiff_t ntap, ptrdiff_t step, const T *w, ptrdiff_t ldw,        \
    const T *bias, int relu, T *out, ptrdiff_t ldo, ptrdiff_t nf, T *part, ptrdiff_t plane, \
    ptrdiff_t ostep)                                                                       \
{                                                                                          \
    VEC acc[FC_DN_MAX_ROWS][FC_DN_MAX_NV];                                                 \
    /* done: the sums of earlier chunks of FC_DN_CHUNK taps (where `chunks`), in memory  \
       (in registers beside acc they spilled acc: lenet 1.15x slower) */                  \
    VEC_U *done = (VEC_U *)part;                                                           \
    int chunks = 0;                                                                        \
    ptrdiff_t in_chunk = 0;                                                                \
    for (int j = 0; j < R; j++)                                                            \
        for (int v = 0; v < NV; v++)                                                       \
            acc[j][v] = (VEC){0};                                                          \
    for (int kh = 0; kh < KH; kh++) {                                                      \
        if (!rowp[kh])                                                                     \
            continue;                                                                      \
        const T *row = rowp[kh] + p0;                                                      \
        const T *wk = w + kh * ntap * ldw;                                                 \
        if (!CHUNKED) {                                                                    \
            FC_DN_SUM_TAPS(T, VEC, VEC_U, LANES, 0, ntap)                                  \
            continue;                                                                      \
        }                                                                                  \
        /* chunks of whole rows, or of at most FC_DN_CHUNK taps of a longer row: the      \
           bookkeeping stays out of the taps' loop (per tap it cost resnet-stem 1.2x) */   \
        for (ptrdiff_t t0 = 0; t0 < ntap; t0 += FC_DN_CHUNK) {                             \
            const ptrdiff_t n = ntap - t0 < FC_DN_CHUNK ? ntap - t0 : FC_DN_CHUNK;         \
            if (in_chunk + n > FC_DN_CHUNK) {                                              \
                for (int j = 0; j < R; j++)                                                \
                    for (int v = 0; v < NV; v++) {                                         \
                        VEC_U *d = done + j * FC_DN_MAX_NV + v;                            \
                        *d = chunks ? *d + acc[j][v] : acc[j][v];                          \
                        acc[j][v] = (VEC){0};                                              \
                    }                                                                      \
                chunks = 1;                                                                \
                in_chunk = 0;                                                              \
            }                                                                              \
            FC_DN_SUM_TAPS(T, VEC, VEC_U, LANES, t0, t0 + n)                               \
            in_chunk += n;                                                                 \
        }                                                                                  \
    }                                                                                      \
    /* unrolled, so that acc stays in registers through the planar store */               \
    _Pragma("GCC unroll 12")                                                               \
    for (int j = 0; j < R; j++) {                                                          \
        T *o = out + j * ldo;                                                              \
        _Pragma("GCC unroll 4")                                                            \
        for (int v = 0; v < NV; v++) {                                                     \
            VEC s = (chunks ? done[j * FC_DN_MAX_NV + v] + acc[j][v] : acc[j][v])          \
                    + *(const VEC_U *)(bias + v * LANES);                                  \
            if (relu) /* keep where !(s <= 0): NaN stays, -0 becomes 0 */                 \
                s = (VEC)((IVEC)s & ~(IVEC)(s <= (VEC){0}));                               \
            if (plane) {                                                                   \
                acc[j][v] = s;                                                             \
            } else if ((v + 1) * LANES <= nf) {                                            \
                *(VEC_U *)(o + v * LANES) = s;                                             \
            } else {                                                                       \
                STORE_PART(o + v * LANES, s, nf - v * LANES);                              \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    /* planar output: each filter's R pixels one run (or every ostep-th value of one);    \
       with chunks, the taps are many and the stores' instructions few among them, and   \
       the transposes cost resnet-3x3-s2's forward 1.035x */                              \
    if (plane && CHUNKED)                                                                  \
        FC_DN_STORE_PLANAR_COPY(T, VEC, LANES);                                            \
    else if (plane)                                                                        \
        STORE_PLANAR(T, VEC, LANES);                                                       \
}                                                                                          \
                                                                                           \
FC_DN_ROW(sfx, T, LANES, TARGET, MAX_NV, ROWS, CASES1, CASES2, CASES3, CASES4, 0,        \
          fc_dn_row_##sfx, T *part = NULL)                                                 \
FC_DN_ROW(sfx, T, LANES, TARGET, MAX_NV, ROWS, CASES1, CASES2, CASES3, CASES4, 1,        \
          fc_dn_row_chunked_##sfx,                                                         \
          T part[FC_DN_MAX_ROWS * FC_DN_MAX_NV * LANES] __attribute__((aligned(64))))

FC_DIRECT_NHWC(s, float, fc_v8sf, fc_v8sf_u, fc_v8si, 8, , FC_TARGET_WIDE, 2,
               FC_DN_ROWS_NARROW, FC_DN_CASES8, FC_DN_CASES6, FC_DN_NO_CASES, FC_DN_NO_CASES,
               FC_DN_STORE_PART_S, FC_DN_STORE_PLANAR_NARROW_S)
FC_DIRECT_NHWC(d, double, fc_v4df, fc_v4df_u, fc_v4di, 4, , FC_TARGET_WIDE, 2,
               FC_DN_ROWS_NARROW, FC_DN_CASES8, FC_DN_CASES6, FC_DN_NO_CASES, FC_DN_NO_CASES,
               FC_DN_STORE_PART_D, FC_DN_STORE_PLANAR_COPY)

#if FC_HAVE_V4_BUILD
FC_DIRECT_NHWC(wide_s, float, fc_v16sf, fc_v16sf_u, fc_v16si, 16, FC_V4, FC_V4, 4,
               FC_DN_ROWS_WIDE, FC_DN_CASES12, FC_DN_CASES12, FC_DN_CASES8, FC_DN_CASES6,
               FC_DN_STORE_PART_WIDE_S, FC_DN_STORE_PLANAR_WIDE_S)
FC_DIRECT_NHWC(wide_d, double, fc_v8df, fc_v8df_u, fc_v8di, 8, FC_V4, FC_V4, 4,
               FC_DN_ROWS_WIDE, FC_DN_CASES12, FC_DN_CASES12, FC_DN_CASES8, FC_DN_CASES6,
               FC_DN_STORE_PART_WIDE_D, FC_DN_STORE_PLANAR_WIDE_D)
#else
/* never called: FC_V4_BUILD_RUNS() is 0 */
#define fc_dn_row_wide_s fc_dn_row_s
#define fc_dn_row_wide_d fc_dn_row_d
#define fc_dn_row_chunked_wide_s fc_dn_row_chunked_s
#define fc_dn_row_chunked_wide_d fc_dn_row_chunked_d
#endif
#pragma GCC diagnostic pop

/* fc_plane_rows_*: the padded rows of one NCHW band (fastconv/_conv_direct.pyx's
   plane_rows). For every channel c < C and each of the n listed copies i, the row at
   `rows + copies[2i] + c*Wp` gets the input row at `image + c*plane + copies[2i + 1]`:
   value p is src[colmap[p]] (0 where colmap[p] is -1), values [lo, hi) src[p - left],
   one run. Channel by channel, so each plane's band rows are read together, while the
   rows of the plane `ahead` on ([pf_first, pf_first + pf_len) of it) are fetched: C
   planes are more streams than the hardware prefetchers follow. Vectorised in the target
   clones (Cython's loop copied 16 bytes at a time): resnet-3x3-s2's copies alone 1.75x
   faster (1.31 -> 0.74 ms at 1 thread), its forward 1.00-1.01x (the input's traffic
   through the caches, not the copy's instructions, is what the kernel then waits on:
   with no copy at all it ran 1.10x faster). */
#define FC_PLANE_ROWS(sfx, T)                                                               \
FC_TARGET_WIDE static void fc_plane_rows_##sfx(                                             \
    const T *image, ptrdiff_t C, ptrdiff_t plane, const ptrdiff_t *copies, ptrdiff_t n,     \
    T *rows, ptrdiff_t Wp, const ptrdiff_t *colmap, ptrdiff_t lo, ptrdiff_t hi,             \
    ptrdiff_t left, ptrdiff_t pf_first, ptrdiff_t pf_len, ptrdiff_t ahead)                  \
{                                                                                           \
    for (ptrdiff_t c = 0; c < C; c++) {                                                     \
        if (c + ahead < C)                                                                  \
            for (ptrdiff_t k = 0; k < pf_len; k += 64 / (ptrdiff_t)sizeof(T))               \
                __builtin_prefetch(image + (c + ahead) * plane + pf_first + k);             \
        for (ptrdiff_t i = 0; i < n; i++) {                                                 \
            T *restrict out = rows + copies[2 * i] + c * Wp;                                \
            const T *restrict src = image + c * plane + copies[2 * i + 1];                  \
            for (ptrdiff_t p = 0; p < lo; p++)                                              \
                out[p] = colmap[p] < 0 ? 0 : src[colmap[p]];                                \
            for (ptrdiff_t p = lo; p < hi; p++)                                             \
                out[p] = src[p - left];                                                     \
            for (ptrdiff_t p = hi; p < Wp; p++)                                             \
                out[p] = colmap[p] < 0 ? 0 : src[colmap[p]];                                \
        }                                                                                   \
    }                                                                                       \
}

FC_PLANE_ROWS(s, float)
FC_PLANE_ROWS(d, double)

/* fc_direct_nhwc_row_*: the build the driver picked, the AVX-512 one with `wide` */
#define FC_DIRECT_NHWC_DISPATCH(sfx, T)                                                     \
static inline void fc_direct_nhwc_row_##sfx(                                                \
    int wide, const T *const *rowp, int KH, const ptrdiff_t *off, ptrdiff_t ntap,           \
    ptrdiff_t step, const T *wpack, ptrdiff_t ldw, const T *bias, int relu, T *row_out,     \
    ptrdiff_t F, ptrdiff_t OW, ptrdiff_t plane, ptrdiff_t ostep, int vectors)               \
{                                                                                           \
    /* chunks only where the taps outnumber one */                                          \
    const int chunked = KH * ntap > FC_DN_CHUNK;                                            \
    if (wide && chunked)                                                                    \
        fc_dn_row_chunked_wide_##sfx(rowp, KH, off, ntap, step, wpack, ldw, bias, relu,     \
                                     row_out, F, OW, plane, ostep, vectors);                \
    else if (wide)                                                                          \
        fc_dn_row_wide_##sfx(rowp, KH, off, ntap, step, wpack, ldw, bias, relu, row_out,    \
                             F, OW, plane, ostep, vectors);                                 \
    else if (chunked)                                                                       \
        fc_dn_row_chunked_##sfx(rowp, KH, off, ntap, step, wpack, ldw, bias, relu, row_out, \
                                F, OW, plane, ostep, vectors);                              \
    else                                                                                    \
        fc_dn_row_##sfx(rowp, KH, off, ntap, step, wpack, ldw, bias, relu, row_out, F, OW,  \
                        plane, ostep, vectors);                                             \
}

FC_DIRECT_NHWC_DISPATCH(s, float)
FC_DIRECT_NHWC_DISPATCH(d, double)

#endif
