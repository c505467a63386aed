"""fastconv's own GEMM kernels (fastconv/_gemm_kernels.h) against NumPy: ``A @ B``
(``fastconv._blas.gemm_nn``, the Winograd GEMMs) and ``A @ B.T`` (``gemm_nt``, a weight
gradient's, B transposed a panel at a time): every block of rows, every column tail, k
tails of the panels' 16 x 16 transposes, chunked and accumulated sums."""

import numpy as np
import pytest
from _helpers import assert_matches

from fastconv import _blas

ROWS = range(1, 26)                                     # blocks of 1..12 rows, 2 blocks, 3
COLS = [1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 64, 65]   # 1 or 2 vectors, full and partial


def _product(rng, m, n, k, dtype):
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    return a, b, c


def _multiply(form, a, b, c, beta=0, chunk=0):
    """``c = a @ b + beta * c`` by ``gemm_nn`` ("nn") or, given ``b`` transposed, by
    ``gemm_nt`` ("nt"); "-prefetch" fetching the rows of ``a`` ahead."""
    if form in ("nn", "nn-prefetch"):
        _blas.gemm(a, b, c, beta, chunk, True, a_in_memory=form == "nn-prefetch")
    else:
        _blas.gemm(a, np.ascontiguousarray(b.T), c, beta, chunk, True, transposed_b=True,
                   a_in_memory=form == "nt-prefetch")


@pytest.mark.parametrize("k,chunk", [(0, 0), (1, 0), (7, 0), (17, 0), (64, 64), (65, 64),
                                     (200, 0), (200, 64), (300, 7), (129, 128)])
@pytest.mark.parametrize("beta", [0, 1])
@pytest.mark.parametrize("form", ["nn", "nn-prefetch", "nt", "nt-prefetch"])
def test_every_block_and_tail(form, k, chunk, beta, dtype, gemm_kernel):
    rng = np.random.default_rng(k)
    for m in ROWS:
        for n in COLS:
            a, b, c = _product(rng, m, n, k, dtype)
            expected = a.astype(np.float64) @ b + beta * c.astype(np.float64)
            magnitude = np.abs(a.astype(np.float64)) @ np.abs(b) + beta * np.abs(c)
            _multiply(form, a, b, c, beta, chunk)
            assert_matches(c, expected, dtype, k + 1, f"{form} {m}x{n}x{k}", magnitude)


@pytest.mark.parametrize("form", ["nn", "nt"])
def test_an_empty_sum_zeroes_or_keeps_c(form, gemm_kernel):
    rng = np.random.default_rng(0)
    a, b, c = _product(rng, 13, 33, 0, np.float32)
    kept = c.copy()
    _multiply(form, a, b, c, 1)
    np.testing.assert_array_equal(c, kept)
    _multiply(form, a, b, c, 0)
    np.testing.assert_array_equal(c, 0)


@pytest.mark.parametrize("form", ["nn", "nt"])
def test_inputs_are_not_modified_and_nothing_past_c_is_written(form, gemm_kernel):
    """The masked stores of the last rows' column tails stop at C's end."""
    rng = np.random.default_rng(1)
    a, b, _ = _product(rng, 13, 33, 20, np.float32)
    before = (a.copy(), b.copy())
    buffer = np.full(13 * 33 + 64, 7.0, np.float32)
    c = buffer[:13 * 33].reshape(13, 33)
    _multiply(form, a, b, c)
    assert_matches(c, a.astype(np.float64) @ b, np.float32, 20, "c")
    np.testing.assert_array_equal(buffer[13 * 33:], 7.0)
    np.testing.assert_array_equal(a, before[0])
    np.testing.assert_array_equal(b, before[1])


@pytest.mark.parametrize("chunk", [1, 16, 64, 100])
@pytest.mark.parametrize("form", ["nn", "nn-prefetch", "nt", "nt-prefetch"])
def test_chunked_sums_add_each_chunk_to_c(form, chunk):
    """With chunks, C gets each chunk's sum in turn: bit for bit the same as one call per
    chunk, each adding to C (how gemm_rm_chunked cuts the BLAS calls; gemm_nt runs a
    panel's chunks row block by row block, in the same order for each element)."""
    if not _blas.own_kernel_runs():
        pytest.skip("this CPU does not run the AVX-512 GEMM kernel")
    rng = np.random.default_rng(chunk)
    a, b, _ = _product(rng, 14, 40, 250, np.float32)
    chunked = np.empty((14, 40), np.float32)
    _multiply(form, a, b, chunked, 0, chunk)
    by_calls = np.empty((14, 40), np.float32)
    for k0 in range(0, 250, chunk):
        _multiply(form, np.ascontiguousarray(a[:, k0:k0 + chunk]), b[k0:k0 + chunk], by_calls,
                  1 if k0 else 0)
    np.testing.assert_array_equal(chunked, by_calls)


@pytest.mark.parametrize("form", ["nn", "nt"])
@pytest.mark.parametrize("m,k,chunk", [(13, 300, 0), (100, 256, 0), (257, 130, 64)])
def test_prefetching_a_changes_no_bit(form, m, k, chunk):
    """The fetches of the next row block's rows (``a_in_memory``) only move data into
    cache, across every row block, panel and chunk."""
    rng = np.random.default_rng(m)
    a, b, c = _product(rng, m, 64, k, np.float32)
    fetched = c.copy()
    _multiply(form, a, b, c, 1, chunk)
    _multiply(form + "-prefetch", a, b, fetched, 1, chunk)
    np.testing.assert_array_equal(fetched, c)


def test_mismatched_shapes_and_beta_are_value_errors():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(5, 2\)"):
        _blas.gemm(a, np.zeros((5, 2), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="beta must be 0 or 1"):
        _blas.gemm(a, np.zeros((4, 2), np.float32), np.zeros((3, 2), np.float32), 2)
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(2, 5\)\.T"):
        _blas.gemm(a, np.zeros((2, 5), np.float32), np.zeros((3, 2), np.float32),
                   transposed_b=True)


def test_use_own_kernel_returns_the_previous_setting():
    if not _blas.own_kernel_runs():
        with pytest.raises(ValueError, match="x86-64-v4"):
            _blas.use_own_kernel(True)
        return
    previous = _blas.use_own_kernel(False)
    try:
        assert _blas.own_kernel_on() is False
        assert _blas.use_own_kernel(True) is False
        assert _blas.own_kernel_on() is True
        assert _blas.use_own_kernel(True) is True
    finally:
        _blas.use_own_kernel(previous)
