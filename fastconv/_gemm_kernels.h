/* Row-major C = A B (+ C) for the Winograd GEMMs, an AVX-512 build.

   The Winograd and phase convolutions multiply, per transform position, a
   filter matrix U_s (rows x channels) by the block's transformed tiles V_s
   (channels x tiles), both already in the workspace. BLAS first copies both
   into packed panels; from cold caches (25 to 36 positions, each read once per
   block) that copy costs as much as a fifth of the product. These kernels read
   the operands where they lie: blocks of FC_GEMM_ROWS rows of C by two 64-byte
   vectors of columns stay in registers while k runs, each step one load of B's
   row (both vectors) and one broadcast of A per row. Rows of A are read in
   order, B row by row with a constant stride: the hardware prefetchers follow
   both.

   The reduction is summed `chunk` terms at a time in registers, each chunk's sums
   then added to C (as fastconv._blas.gemm_rm_chunked does with one BLAS call per
   chunk): Winograd's output transform amplifies the rounding of long sums.

   float32 only (the float64 layers stay with BLAS), and only the x86-64-v4 build does
   any work; where FC_V4_BUILD_RUNS() is 0 the callers use BLAS (fastconv._blas.gemm_nn). */
#ifndef FASTCONV_GEMM_KERNELS_H
#define FASTCONV_GEMM_KERNELS_H

#include <stddef.h>
#include "_simd_target.h"

/* 12 rows x 2 vectors: 24 accumulators, 2 for B's row and 1 broadcast of the
   32 registers. 12 x 32 floats ran 107 GFLOP/s on one Zen 4 core where 8 rows ran
   104 and 4 rows 97 (OpenBLAS sgemm 94-100 on the same operands, hot in cache). */
#define FC_GEMM_ROWS 12

#if FC_HAVE_V4_BUILD
#include <immintrin.h>

/* The reduction runs in blocks of at most FC_GEMM_KC terms (or `chunk`, if shorter):
   B's block of one column panel, FC_GEMM_KC x 2 vectors, stays in L1 while every row
   block of A passes over it. */
#define FC_GEMM_KC 128

/* a block of R rows (a constant) inside fc_gemm_rows_*'s switch */
#define FC_GEMM_CASE(sfx, R)                                                               \
    case R: fc_gemm_block_##sfx(R, NV, k, a, lda, b, ldb, c, ldc, accumulate, m0, m1, pf,     \
                                pf_rows); break;

/* FC_GEMM(sfx, T, V, L, MASK, ...): one dtype's kernel, vectors V of L lanes of T,
   column masks of type MASK; the intrinsics named after their AVX-512 suffix. */
#define FC_GEMM(sfx, T, V, L, MASK, ZERO, SET1, FMADD, ADD, LOADU, STOREU)                 \
/* R rows x NV vectors of columns of C (both constants after inlining) (+)= A B over     \
   k terms */                                                                              \
static inline FC_ALWAYS_INLINE FC_V4 void                                                  \
fc_gemm_block_##sfx(const int R, const int NV, ptrdiff_t k, const T *a, ptrdiff_t lda,     \
                    const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc, int accumulate,        \
                    MASK m0, MASK m1, const T *pf, ptrdiff_t pf_rows)                      \
{                                                                                          \
    V acc0[FC_GEMM_ROWS], acc1[FC_GEMM_ROWS];                                              \
    /* pf: pf_rows rows of k values (row stride lda) fetched into L2, a line a step */    \
    const ptrdiff_t pf_lpr = (k + L - 1) / L, pf_n = pf ? pf_rows * pf_lpr : 0;          \
    ptrdiff_t pf_r = 0, pf_c = 0;                                                          \
    for (int r = 0; r < R; r++) {                                                          \
        acc0[r] = ZERO();                                                                  \
        acc1[r] = ZERO();                                                                  \
    }                                                                                      \
    for (ptrdiff_t kk = 0; kk < k; kk++, b += ldb) {                                       \
        if (kk < pf_n) {                                                                   \
            __builtin_prefetch(pf + pf_r * lda + pf_c * L, 0, 2);                          \
            if (++pf_c == pf_lpr) {                                                        \
                pf_c = 0;                                                                  \
                pf_r++;                                                                    \
            }                                                                              \
        }                                                                                  \
        V b0 = LOADU(m0, b), b1 = NV == 2 ? LOADU(m1, b + L) : ZERO();                     \
        for (int r = 0; r < R; r++) {                                                      \
            V ar = SET1(a[r * lda + kk]);                                                  \
            acc0[r] = FMADD(ar, b0, acc0[r]);                                              \
            if (NV == 2)                                                                   \
                acc1[r] = FMADD(ar, b1, acc1[r]);                                          \
        }                                                                                  \
    }                                                                                      \
    for (int r = 0; r < R; r++) {                                                          \
        T *cr = c + r * ldc;                                                               \
        if (accumulate) {                                                                  \
            acc0[r] = ADD(acc0[r], LOADU(m0, cr));                                         \
            if (NV == 2)                                                                   \
                acc1[r] = ADD(acc1[r], LOADU(m1, cr + L));                                 \
        }                                                                                  \
        STOREU(cr, m0, acc0[r]);                                                           \
        if (NV == 2)                                                                       \
            STOREU(cr + L, m1, acc1[r]);                                                   \
    }                                                                                      \
}                                                                                          \
                                                                                           \
/* one column panel's blocks of R rows (R from 1 to FC_GEMM_ROWS), inlined per R: the     \
   accumulators of each stay in registers */                                               \
static inline FC_ALWAYS_INLINE FC_V4 void                                                  \
fc_gemm_rows_##sfx(const int NV, int R, ptrdiff_t k, const T *a, ptrdiff_t lda,            \
                   const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc, int accumulate,         \
                   MASK m0, MASK m1, const T *pf, ptrdiff_t pf_rows)                       \
{                                                                                          \
    switch (R) {                                                                           \
    FC_GEMM_CASE(sfx, 12) FC_GEMM_CASE(sfx, 11) FC_GEMM_CASE(sfx, 10) FC_GEMM_CASE(sfx, 9)  \
    FC_GEMM_CASE(sfx, 8) FC_GEMM_CASE(sfx, 7) FC_GEMM_CASE(sfx, 6) FC_GEMM_CASE(sfx, 5)     \
    FC_GEMM_CASE(sfx, 4) FC_GEMM_CASE(sfx, 3) FC_GEMM_CASE(sfx, 2)                          \
    default: fc_gemm_block_##sfx(1, NV, k, a, lda, b, ldb, c, ldc, accumulate, m0, m1, pf, \
                                 pf_rows);                                                 \
        break;                                                                             \
    }                                                                                      \
}                                                                                          \
                                                                                           \
/* C (m x n, row stride ldc) = A (m x k) B (k x n) [+ C where accumulate]; prefetch_a: A  \
   lies in memory, not in cache (see fc_gemm_nt_s) */                                      \
static FC_V4 void                                                                          \
fc_gemm_nn_##sfx(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const T *a, ptrdiff_t lda,         \
                 const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc, int accumulate,           \
                 ptrdiff_t chunk, int prefetch_a)                                          \
{                                                                                          \
    /* rows split evenly into blocks of at most FC_GEMM_ROWS (64 = 6 x 11 or 10, not     \
       5 x 12 + 4: a block of few rows loads B's row for few products) */                 \
    ptrdiff_t row_blocks = (m + FC_GEMM_ROWS - 1) / FC_GEMM_ROWS;                         \
    ptrdiff_t kc = chunk > 0 && chunk < FC_GEMM_KC ? chunk : FC_GEMM_KC;                   \
    if (k <= 0) {                   /* an empty sum: C = 0 (+ C) */                        \
        if (!accumulate)                                                                   \
            for (ptrdiff_t i = 0; i < m; i++)                                              \
                for (ptrdiff_t j = 0; j < n; j++)                                          \
                    c[i * ldc + j] = 0;                                                    \
        return;                                                                            \
    }                                                                                      \
    for (ptrdiff_t k0 = 0; k0 < k; k0 += kc) {                                             \
        ptrdiff_t kn = k - k0 < kc ? k - k0 : kc;                                          \
        int add = k0 > 0 || accumulate;                                                    \
        for (ptrdiff_t j0 = 0; j0 < n; j0 += 2 * L) {                                      \
            ptrdiff_t cols = n - j0;                                                       \
            MASK m0 = cols >= L ? (MASK)~0u : (MASK)((1u << cols) - 1);                    \
            MASK m1 = cols >= 2 * L ? (MASK)~0u                                            \
                      : cols <= L ? 0 : (MASK)((1u << (cols - L)) - 1);                    \
            for (ptrdiff_t rb = 0, i0 = 0; rb < row_blocks; rb++) {                        \
                int R = (int)((m - i0) / (row_blocks - rb));                               \
                const T *ai = a + i0 * lda + k0;                                           \
                const T *bj = b + k0 * ldb + j0;                                           \
                T *cij = c + i0 * ldc + j0;                                                \
                /* prefetch_a (A in memory, as fc_gemm_nt_s's): the first column panel     \
                   fetches the next row block's part of A */                               \
                const int pf_on = prefetch_a && j0 == 0 && rb + 1 < row_blocks;            \
                const T *pf = pf_on ? ai + R * lda : NULL;                                 \
                ptrdiff_t pf_rows = pf_on ? (m - i0 - R) / (row_blocks - rb - 1) : 0;      \
                if (cols > L)                                                              \
                    fc_gemm_rows_##sfx(2, R, kn, ai, lda, bj, ldb, cij, ldc, add, m0, m1,  \
                                       pf, pf_rows);                                       \
                else                                                                       \
                    fc_gemm_rows_##sfx(1, R, kn, ai, lda, bj, ldb, cij, ldc, add, m0, m1,  \
                                       pf, pf_rows);                                       \
                i0 += R;                                                                   \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
}

FC_GEMM(s, float, __m512, 16, __mmask16, _mm512_setzero_ps, _mm512_set1_ps, _mm512_fmadd_ps,
        _mm512_add_ps, _mm512_maskz_loadu_ps, _mm512_mask_storeu_ps)

/* A 16 x 16 block of floats transposed in registers: r[i] holds row i, then column i. */
static inline FC_ALWAYS_INLINE FC_V4 void fc_transpose16_s(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 8; i++) {           /* pairs of rows interleaved by element */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {           /* ... then by pairs of elements */
        __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
        __m512d a2 = _mm512_castps_pd(t[4 * i + 2]), a3 = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    for (int i = 0; i < 2; i++)             /* ... then by 128-bit lanes */
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
}

/* panel[q][j] = b[j][q] for j < cols (<= 32), q < kn (<= FC_GEMM_KC): one column panel of
   B^T, 32 floats a row; rows j >= cols of B are not read (their panel columns are never
   loaded unmasked). */
static inline FC_ALWAYS_INLINE FC_V4 void
fc_gemm_panel_s(const float *b, ptrdiff_t ldb, ptrdiff_t cols, ptrdiff_t kn, float *panel)
{
    __m512 r[16];
    for (ptrdiff_t j0 = 0; j0 < cols; j0 += 16) {
        ptrdiff_t rows = cols - j0 < 16 ? cols - j0 : 16;
        for (ptrdiff_t q0 = 0; q0 < kn; q0 += 16) {
            ptrdiff_t width = kn - q0 < 16 ? kn - q0 : 16;
            __mmask16 mask = width == 16 ? (__mmask16)~0u : (__mmask16)((1u << width) - 1);
            for (int i = 0; i < 16; i++)
                r[i] = i < rows ? _mm512_maskz_loadu_ps(mask, b + (j0 + i) * ldb + q0)
                                : _mm512_setzero_ps();
            fc_transpose16_s(r);
            for (ptrdiff_t q = 0; q < width; q++)
                _mm512_store_ps(panel + (q0 + q) * 32 + j0, r[q]);
        }
    }
}

/* C (m x n, row stride ldc) = A (m x k) B^T [+ C where accumulate], B stored n x k (row
   stride ldb), the reduction summed `chunk` terms at a time as fc_gemm_nn_s does. A
   weight gradient's GEMM: A the input's columns, B grad_output's planes, whose rows are
   the reduction. Each panel of B^T (at most FC_GEMM_KC terms x 32 columns) is transposed
   once into a buffer that stays in L1, and every row block of A then reads it as
   fc_gemm_nn_s reads B: B is not copied whole (BLAS packs both operands). A row block
   runs all of a panel's chunks back to back, so its C block is reread from L1, not once
   per chunk after every other row's (the Winograd weight gradients' sums outgrow L2:
   dcgan-up's 512 KiB a position, chunks of 64).
   prefetch_a: A lies in memory, not in cache (an NHWC 1x1 layer's input, read in place).
   Rows of FC_GEMM_KC values FC_GEMM_ROWS rows apart are more streams than the hardware
   prefetchers follow: a 1-thread 512-row tile of resnet-1x1 (K 256, 64 filters) ran at
   77 GFLOP/s from memory, 109 from cache. With each step of the first column panel also
   fetching a line of the next row block's part into L2 it ran at 94; where A is in cache
   (a gathered column tile) the fetches cost 1-3%. */
static FC_V4 void
fc_gemm_nt_s(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float *a, ptrdiff_t lda,
             const float *b, ptrdiff_t ldb, float *c, ptrdiff_t ldc, int accumulate,
             ptrdiff_t chunk, int prefetch_a)
{
    float panel[FC_GEMM_KC * 32] __attribute__((aligned(64)));
    ptrdiff_t row_blocks = (m + FC_GEMM_ROWS - 1) / FC_GEMM_ROWS;
    ptrdiff_t kc = chunk > 0 && chunk < FC_GEMM_KC ? chunk : FC_GEMM_KC;
    /* a panel: whole chunks, as many as FC_GEMM_KC terms hold */
    ptrdiff_t kp = FC_GEMM_KC / kc * kc;
    if (k <= 0) {
        fc_gemm_nn_s(m, n, k, a, lda, b, ldb, c, ldc, accumulate, chunk, 0);
        return;
    }
    for (ptrdiff_t p0 = 0; p0 < k; p0 += kp) {
        ptrdiff_t pn = k - p0 < kp ? k - p0 : kp;
        for (ptrdiff_t j0 = 0; j0 < n; j0 += 32) {
            ptrdiff_t cols = n - j0 < 32 ? n - j0 : 32;
            __mmask16 m0 = cols >= 16 ? (__mmask16)~0u : (__mmask16)((1u << cols) - 1);
            __mmask16 m1 = cols == 32 ? (__mmask16)~0u
                           : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
            fc_gemm_panel_s(b + j0 * ldb + p0, ldb, cols, pn, panel);
            for (ptrdiff_t rb = 0, i0 = 0; rb < row_blocks; rb++) {
                int R = (int)((m - i0) / (row_blocks - rb));
                float *cij = c + i0 * ldc + j0;
                for (ptrdiff_t k0 = 0; k0 < pn; k0 += kc) {
                    ptrdiff_t kn = pn - k0 < kc ? pn - k0 : kc;
                    int add = p0 + k0 > 0 || accumulate;
                    const float *ai = a + i0 * lda + p0 + k0;
                    /* prefetch_a: the first column panel reads A from memory, the
                       next row block's part fetched into L2 meanwhile */
                    const int pf_on = prefetch_a && j0 == 0 && rb + 1 < row_blocks;
                    const float *pf = pf_on ? ai + R * lda : NULL;
                    ptrdiff_t pf_rows = pf_on ? (m - i0 - R) / (row_blocks - rb - 1) : 0;
                    if (cols > 16)
                        fc_gemm_rows_s(2, R, kn, ai, lda, panel + k0 * 32, 32, cij, ldc, add,
                                       m0, m1, pf, pf_rows);
                    else
                        fc_gemm_rows_s(1, R, kn, ai, lda, panel + k0 * 32, 32, cij, ldc, add,
                                       m0, m1, pf, pf_rows);
                }
                i0 += R;
            }
        }
    }
}

#else
/* never called: FC_V4_BUILD_RUNS() is 0 */
static void fc_gemm_nn_s(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float *a, ptrdiff_t lda,
                         const float *b, ptrdiff_t ldb, float *c, ptrdiff_t ldc, int accumulate,
                         ptrdiff_t chunk, int prefetch_a) {}
static void fc_gemm_nt_s(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float *a, ptrdiff_t lda,
                         const float *b, ptrdiff_t ldb, float *c, ptrdiff_t ldc, int accumulate,
                         ptrdiff_t chunk, int prefetch_a) {}
#endif

#endif
