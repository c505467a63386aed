"""Implicit GEMM of plain NCHW layers: the forward (phase planes and register-blocked
strips) and the weight gradient (column-tap planes, :func:`backward_weight`).

A work item is a run of strips of NR "virtual positions" ``v = oh*Wq + ow`` of one
image (a band of output rows, which may start and end inside a row). Its thread lays
out the padded input under the band as phase planes (``planes[phase][c][rows][Wq]``,
see ``fastconv/_implicit_kernels.h``), one block of channels at a time, in its
workspace; the strips sum that block's taps for every filter into the item's
accumulator tiles; the columns ``ow < OW`` are then stored with bias and activation.
A block's planes, its packed filters and the tiles stay in L2, and laying out and
summing in the same item lets one thread's copying overlap the other's FMAs. A 1x1,
stride-1, unpadded layer reads its input in place (its planes are the input; an item
is then one strip). Workspace: one item's planes and tiles per thread, whatever the
batch.
"""

cimport openmp
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset

from fastconv._bands cimport Band, band_item
from fastconv._phase_rows cimport copy_phase_row
from fastconv._weight_grad cimport fc_weight_grad_band_d, fc_weight_grad_band_s


cdef extern from "_implicit_kernels.h" nogil:
    const int FC_IM_FB
    const int FC_IM_NV
    const int FC_IM_WIDE_NV
    int FC_V4_BUILD_RUNS()
    void fc_implicit_sum_strips_s(bint wide, const float *src, Py_ssize_t strips,
                                  const Py_ssize_t *off, Py_ssize_t K, Py_ssize_t kc,
                                  const float *wpack, Py_ssize_t ldk, Py_ssize_t F, float *acc,
                                  bint accumulate, const float *pf, Py_ssize_t pf_chunks,
                                  Py_ssize_t pf_stride, Py_ssize_t pf_chunk)
    void fc_implicit_sum_strips_d(bint wide, const double *src, Py_ssize_t strips,
                                  const Py_ssize_t *off, Py_ssize_t K, Py_ssize_t kc,
                                  const double *wpack, Py_ssize_t ldk, Py_ssize_t F,
                                  double *acc, bint accumulate, const double *pf,
                                  Py_ssize_t pf_chunks, Py_ssize_t pf_stride, Py_ssize_t pf_chunk)
    void fc_implicit_store_strip_s(bint wide, const float *acc, Py_ssize_t F, Py_ssize_t v0,
                                   Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t Wq, Py_ssize_t OW,
                                   const float *bias, int relu, float *out, Py_ssize_t ldo,
                                   Py_ssize_t pf_ahead)
    void fc_implicit_store_strip_d(bint wide, const double *acc, Py_ssize_t F, Py_ssize_t v0,
                                   Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t Wq, Py_ssize_t OW,
                                   const double *bias, int relu, double *out, Py_ssize_t ldo,
                                   Py_ssize_t pf_ahead)


def wide_kernel():
    """Whether this CPU runs the AVX-512 build of the kernel (fastconv/_implicit_kernels.h),
    whose strips are FC_IM_WIDE_NV vectors of 64 bytes."""
    return bool(FC_V4_BUILD_RUNS())


def strip_positions(Py_ssize_t itemsize, bint wide):
    """Output positions per strip: FC_IM_NV vectors of 32 bytes, or with ``wide``
    FC_IM_WIDE_NV vectors of 64 bytes."""
    return FC_IM_WIDE_NV * 64 // itemsize if wide else FC_IM_NV * 32 // itemsize


cdef inline void sum_strips(bint wide, const floating *src, Py_ssize_t strips,
                            const Py_ssize_t *off, Py_ssize_t K, Py_ssize_t kc,
                            const floating *wpack, Py_ssize_t ldk, Py_ssize_t F, floating *acc,
                            bint accumulate, const floating *pf, Py_ssize_t pf_chunks,
                            Py_ssize_t pf_stride, Py_ssize_t pf_chunk) noexcept nogil:
    """fc_implicit_sum_strips_* of the dtype."""
    if floating is float:
        fc_implicit_sum_strips_s(wide, src, strips, off, K, kc, wpack, ldk, F, acc, accumulate,
                                 pf, pf_chunks, pf_stride, pf_chunk)
    else:
        fc_implicit_sum_strips_d(wide, src, strips, off, K, kc, wpack, ldk, F, acc, accumulate,
                                 pf, pf_chunks, pf_stride, pf_chunk)


cdef inline void store_strip(bint wide, const floating *acc, Py_ssize_t F, Py_ssize_t v0,
                             Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t Wq, Py_ssize_t OW,
                             const floating *bias, bint relu, floating *out,
                             Py_ssize_t ldo, Py_ssize_t pf_ahead) noexcept nogil:
    """fc_implicit_store_strip_* of the dtype."""
    if floating is float:
        fc_implicit_store_strip_s(wide, acc, F, v0, j0, j1, Wq, OW, bias, relu, out, ldo,
                                  pf_ahead)
    else:
        fc_implicit_store_strip_d(wide, acc, F, v0, j0, j1, Wq, OW, bias, relu, out, ldo,
                                  pf_ahead)


cdef void split_rows(const floating *plane, Py_ssize_t H, Py_ssize_t W, floating *dst,
                     Py_ssize_t rows, Py_ssize_t Wq, Py_ssize_t phase_size,
                     const Py_ssize_t *rowmap, const Py_ssize_t *colmap, const Py_ssize_t *lo,
                     const Py_ssize_t *hi, Py_ssize_t left, Py_ssize_t sw,
                     const Py_ssize_t *col_slot) noexcept nogil:
    """``rows`` rows of row phase ph of one channel's planes: the plane of phase (ph, pw)
    is ``col_slot[pw]*phase_size`` past ``dst``; its row i shows input row ``rowmap[i]``
    (or zeros), its column q input column ``colmap[pw*Wq + q]`` (or zero), the columns
    ``[lo[pw], hi[pw])`` being ``q*sw + pw - left`` (no lookup).
    Phases no tap reads (``col_slot[pw]`` -1: a 1x1 stride-2 layer reads one of four)
    are neither stored nor given room."""
    cdef Py_ssize_t i, pw, src_row
    cdef floating *out
    for i in range(rows):
        src_row = rowmap[i]
        for pw in range(sw):
            if col_slot[pw] < 0:
                continue
            out = dst + col_slot[pw] * phase_size + i * Wq
            if src_row < 0:
                memset(out, 0, Wq * sizeof(floating))
                continue
            copy_phase_row(plane + src_row * W, out, Wq, colmap + pw * Wq, 1, lo[pw], hi[pw],
                           pw - left, sw)


def forward(const floating[:, :, :, ::1] x, const floating[::1] wpack, const floating[::1] bias,
            floating[:, :, :, ::1] y, floating[::1] planes, floating[::1] acc,
            const Py_ssize_t[::1] rowmap, const Py_ssize_t[::1] colmap,
            const Py_ssize_t[::1] lo, const Py_ssize_t[::1] hi,
            const Py_ssize_t[::1] row_slot, const Py_ssize_t[::1] col_slot, Py_ssize_t phases,
            Py_ssize_t top, Py_ssize_t left, const Py_ssize_t[::1] offsets, Py_ssize_t Hq,
            Py_ssize_t Wq,
            Py_ssize_t band_rows, Py_ssize_t band_strips, Py_ssize_t channel_block, int KH,
            int KW,
            Py_ssize_t reach, int stride_h, int stride_w, Py_ssize_t strip, Py_ssize_t kc,
            bint in_place, bint relu, int n_threads):
    """y[n, f, oh, ow] = act(sum_k wpack[f, k] * planes[(oh - oh0)*Wq + ow + offsets[k]]
    + bias[f]), with the planes of the item from row oh0 and of tap k's channel block.

    An image's virtual positions ``v = oh*Wq + ow`` (ow < Wq) are cut into strips of
    ``strip``; a work item is ``band_strips`` of them (fewer in an image's last item),
    from a position v0 that may lie inside plane row oh0 = v0 // Wq. Per block of
    ``channel_block`` channels its thread lays out the block's planes (the rows its
    positions touch, at most ``band_rows``, plus ``reach`` = the taps' extent in plane
    rows, of each phase and channel; only the phases some tap reads: ``row_slot[ph]`` is
    the first plane of row phase ph, ``col_slot[pw]`` the plane of column phase pw
    within it, -1 for none) in its workspace, then sums the block's taps over its
    strips. ``rowmap[ph*Hq + i]`` is the input row under padded row ``i*stride_h + ph``
    (-1: zeros), ``colmap[pw*Wq + q]`` the input column under padded column
    ``q*stride_w + pw``; in phase pw the columns ``[lo[pw], hi[pw])`` are inside the input.
    ``offsets[k]`` is where tap k = (c*KH + kh)*KW + kw of a block (c < channel_block)
    reads in its planes.
    With ``in_place`` (a 1x1, stride-1, unpadded layer with OH*OW >= strip) the planes
    are x itself, an item is a strip, and the last strip of an image ends at its last
    position.

    # IN  x: (N, C, H, W); wpack: _direct.pack_weight (F rounded up to 4); bias: (F,)/None
    # OUT y: (N, F, OH, OW), every element written
    # planes: n_threads * (phases*channel_block*(band_rows + reach)*Wq + strip + Wq),
    #   unused with in_place (a block hanging past an image's last position reads the
    #   tail)
    # acc: n_threads * (F rounded up to 4) * strip * band_strips (1 with in_place)
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = y.shape[1], OH = y.shape[2], OW = y.shape[3]
    cdef Py_ssize_t K = C * KH * KW
    cdef Py_ssize_t blocks = (C + channel_block - 1) // channel_block
    cdef Py_ssize_t sh = stride_h, sw = stride_w
    cdef Py_ssize_t band_plane = (band_rows + reach) * Wq
    cdef Py_ssize_t phase_size = channel_block * band_plane
    cdef Py_ssize_t per_thread = phases * phase_size + strip + Wq
    cdef Py_ssize_t image_positions = OH * Wq
    cdef Py_ssize_t image_strips = (image_positions + strip - 1) // strip
    cdef Py_ssize_t bands = (image_strips + band_strips - 1) // band_strips
    cdef Py_ssize_t acc_size = (F + FC_IM_FB - 1) // FC_IM_FB * FC_IM_FB * strip
    # in place, a strip reads a run of every channel (plane rows H*W apart: too many
    # streams for the hardware prefetchers), so the kernel prefetches a later strip's:
    # two strips ahead ran 1.29x one ahead on resnet-1x1's forward (1 and 2 threads;
    # three ahead on par with two, four 0.96-1.00x)
    cdef Py_ssize_t PREFETCH_STRIPS_AHEAD = 2
    cdef Py_ssize_t lanes = 8 if sizeof(floating) == 4 else 4
    cdef const floating *bias_ptr = NULL
    cdef Py_ssize_t item, n, oh0, rows, c, ph, s, v0, j0, positions, strips, band, next_band
    cdef Py_ssize_t next_n = 0, next_c = 0, next_first = 0, next_rows, first_row, last_row
    cdef Py_ssize_t block, c0, cn
    cdef floating *band_planes
    cdef floating *a
    cdef int tid
    cdef bint wide = strip == FC_IM_WIDE_NV * 2 * lanes
    if wide and not FC_V4_BUILD_RUNS():
        raise ValueError(f"strip={strip}: this CPU does not run the AVX-512 kernel")
    if strip != FC_IM_NV * lanes and not wide:
        raise ValueError(f"strip={strip} is neither the kernel's {FC_IM_NV} vectors of 32 "
                         f"bytes nor {FC_IM_WIDE_NV} of 64")
    if N == 0 or F == 0:
        return
    if bias is not None:
        bias_ptr = &bias[0]
    if in_place:
        positions = OH * OW      # = OH * Wq (Wq = OW): image_strips counts these
        for item in prange(N * image_strips, nogil=True, num_threads=n_threads,
                           schedule="static"):
            n = item // image_strips
            v0 = (item - n * image_strips) * strip
            j0 = 0
            if v0 + strip > positions:
                # the block reads strip positions: end it at the image's last one
                j0 = v0 - (positions - strip)
                v0 = positions - strip
            a = &acc[openmp.omp_get_thread_num() * acc_size]
            # the image's strip PREFETCH_STRIPS_AHEAD on, fetched while the FMAs run
            next_rows = 1 if v0 + (PREFETCH_STRIPS_AHEAD + 1) * strip <= positions else 0
            sum_strips(wide, &x[n, 0, 0, 0] + v0, 1, &offsets[0], K, kc, &wpack[0], K, F, a,
                       False,
                       &x[n, 0, 0, 0] + v0 + PREFETCH_STRIPS_AHEAD * strip if next_rows else NULL,
                       C, H * W, strip)
            store_strip(wide, a, F, v0, j0, strip, OW, OW, bias_ptr, relu, &y[n, 0, 0, 0],
                        OH * OW, PREFETCH_STRIPS_AHEAD * strip if next_rows else 0)
        return
    for item in prange(N * bands, nogil=True, num_threads=n_threads, schedule="dynamic"):
        # item: strips [band*band_strips, ...) of image n, from virtual position v0 (which
        # may lie inside a row); its planes start at the row of v0
        n = item // bands
        band = item - n * bands
        v0 = band * band_strips * strip
        strips = min(band_strips, image_strips - band * band_strips)
        positions = min(strips * strip, image_positions - v0)
        oh0 = v0 // Wq
        rows = (v0 + positions - 1) // Wq - oh0 + 1
        tid = openmp.omp_get_thread_num()
        band_planes = &planes[tid * per_thread]
        a = &acc[tid * band_strips * acc_size]
        first_row = max(0, oh0 * sh - top)
        last_row = min(H, (oh0 + rows + reach) * sh - top)
        for block in range(blocks):
            c0 = block * channel_block
            cn = min(channel_block, C - c0)
            for c in range(cn):
                for ph in range(sh):
                    if row_slot[ph] < 0:
                        continue
                    split_rows(&x[n, c0 + c, 0, 0], H, W,
                               band_planes + (row_slot[ph] * channel_block + c) * band_plane,
                               rows + reach, Wq, phase_size, &rowmap[ph * Hq + oh0], &colmap[0],
                               &lo[0], &hi[0], left, sw, &col_slot[0])
            # the next block's input rows (or the next item's, about as many), fetched
            # while the FMAs run
            next_rows = 0
            if block + 1 < blocks:
                next_n = n
                next_c = c0 + channel_block
                next_first = first_row
                next_rows = last_row - first_row
            elif item + 1 < N * bands:
                next_n = (item + 1) // bands
                next_band = item + 1 - next_n * bands
                next_c = 0
                next_first = max(0, next_band * band_strips * strip // Wq * sh - top)
                next_rows = min(H, next_first + (band_rows + reach) * sh) - next_first
            sum_strips(wide, band_planes + (v0 - oh0 * Wq), strips, &offsets[0], cn * KH * KW,
                       kc, &wpack[c0 * KH * KW * FC_IM_FB], K, F, a, block > 0,
                       &x[next_n, next_c, next_first, 0] if next_rows > 0 else NULL,
                       min(channel_block, C - next_c), H * W, next_rows * W)
        for s in range(strips):
            store_strip(wide, a + s * acc_size, F, v0 + s * strip, 0,
                        min(strip, image_positions - v0 - s * strip), Wq, OW, bias_ptr, relu,
                        &y[n, 0, 0, 0], OH * OW, 0)


def backward_weight(const floating[:, :, :, ::1] x, const floating[:, :, ::1] dy,
                    floating[:, ::1] partial, floating[::1] planes,
                    const Py_ssize_t[::1] rowmap, const Py_ssize_t[::1] colmap,
                    const Py_ssize_t[::1] lo, const Py_ssize_t[::1] hi,
                    const Py_ssize_t[::1] row_index, Py_ssize_t row_phases,
                    const Py_ssize_t[::1] offsets, Py_ssize_t Hq, Py_ssize_t Wq, Py_ssize_t OH,
                    Py_ssize_t OW, Py_ssize_t band_rows, Py_ssize_t channel_block, int KH, int KW,
                    Py_ssize_t reach, int stride_h, int stride_w, int dilation_w, Py_ssize_t left,
                    int n_threads, Py_ssize_t taps_per_channel,
                    const unsigned char[::1] plane_used):
    """partial[t, f*K + k] = thread t's share of sum_{n, oh, ow} dy[n, f, oh*OW + ow] *
    (tap k = (c*KH + kh)*KW + kw of output pixel (oh, ow)), K = C*KH*KW; or, with
    ``taps_per_channel`` < KH*KW, only the taps ``offsets`` lists for each channel,
    k = c*taps_per_channel + (the tap's place in that list), K = C*taps_per_channel;
    ``plane_used[ph*KW + kw]`` says whether those taps read plane (ph, kw) (else it is not
    laid out).

    A work item is a band of ``band_rows`` output rows of one image and a block of
    ``channel_block`` channels (consecutive items share the band's dY rows). Its thread
    lays the block's input out as column-tap planes, one per channel, row phase ph
    (``row_index[ph]``, -1 where no tap reads it) and kw: ``band_rows + reach`` rows of
    OW columns, row i, column j holding padded pixel ((oh0 + i)*sh + ph,
    j*sw + kw*dilation_w); ``offsets[k]`` is where tap k of a block reads in them.
    ``rowmap``, ``colmap``, ``lo`` and ``hi`` are the forward's phase-plane maps
    (:func:`forward`): plane (ph, kw) column j is phase pw = kw*dw % sw's column
    j + kw*dw // sw.

    # IN  x: (N, C, H, W); dy: (N, F, OH*OW)
    # OUT partial: (n_threads, F*K), every element written (per-thread sums, reduced after)
    # planes: n_threads * (channel_block * row_phases * KW * (band_rows + reach) * OW + 8)
    #   (the last tap's last vector may read 7 values past its plane, never summed)
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = dy.shape[1], P = dy.shape[2]
    cdef Py_ssize_t KK = taps_per_channel, K = C * KK
    cdef Py_ssize_t sh = stride_h, sw = stride_w
    cdef Py_ssize_t plane_size = (band_rows + reach) * OW
    cdef Py_ssize_t per_thread = planes.shape[0] // n_threads
    cdef Py_ssize_t bands = (OH + band_rows - 1) // band_rows
    cdef Py_ssize_t blocks = (C + channel_block - 1) // channel_block
    cdef Py_ssize_t item, n, block, oh0, rows, c0, cn, c, ph, kw, i, pw, shift
    cdef Band b
    cdef Py_ssize_t lo_q, hi_q, src_row, t
    cdef floating *band_planes
    cdef floating *dst
    cdef const floating *plane
    cdef floating *sums
    for t in prange(n_threads, nogil=True, num_threads=n_threads, schedule="static"):
        memset(&partial[t, 0], 0, K * F * sizeof(floating))
    if N == 0 or F == 0:
        return
    for item in prange(N * bands * blocks, nogil=True, num_threads=n_threads,
                       schedule="static"):
        b = band_item(item // blocks, bands, band_rows, OH)
        n, oh0, rows = b.n, b.oh0, b.rows
        block = item % blocks
        c0 = block * channel_block
        cn = min(channel_block, C - c0)
        t = openmp.omp_get_thread_num()
        band_planes = &planes[t * per_thread]
        for c in range(cn):
            plane = &x[n, c0 + c, 0, 0]
            for ph in range(sh):
                if row_index[ph] < 0:
                    continue
                for kw in range(KW):
                    if not plane_used[ph * KW + kw]:
                        continue
                    pw = (kw * dilation_w) % sw
                    shift = (kw * dilation_w) // sw
                    lo_q = min(OW, max(0, lo[pw] - shift))
                    hi_q = max(lo_q, min(OW, hi[pw] - shift))
                    dst = band_planes + ((c * row_phases + row_index[ph]) * KW + kw) * plane_size
                    for i in range(rows + reach):
                        src_row = rowmap[ph * Hq + oh0 + i]
                        if src_row < 0:
                            memset(dst + i * OW, 0, OW * sizeof(floating))
                        else:
                            copy_phase_row(plane + src_row * W, dst + i * OW, OW,
                                           &colmap[pw * Wq + shift], 1, lo_q, hi_q,
                                           pw - left + shift * sw, sw)
        sums = &partial[t, c0 * KK]
        # the band as one row of rows*OW pixels (the planes are OW wide, as dY's rows)
        if floating is float:
            fc_weight_grad_band_s(band_planes, 0, &offsets[0], cn * KK,
                                  &dy[n, 0, oh0 * OW], P, F, rows * OW, 1, sums, K)
        else:
            fc_weight_grad_band_d(band_planes, 0, &offsets[0], cn * KK,
                                  &dy[n, 0, oh0 * OW], P, F, rows * OW, 1, sums, K)
