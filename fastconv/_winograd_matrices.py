"""Winograd minimal-filtering matrices F(m, r), built exactly (Toom-Cook) from interpolation points.

``F(m, r)`` computes ``m`` outputs of a 1-D correlation with an ``r``-tap filter
from ``alpha = m + r - 1`` inputs using ``alpha`` multiplications:

    y = AT @ ((G @ g) * (BT @ d))            # 1-D
    Y = AT @ ((G @ g @ G.T) * (BT @ D @ BT.T)) @ AT.T     # 2-D, nested

It is the transpose of Toom-Cook linear convolution at the ``alpha - 1``
finite points plus the point at infinity: ``G`` evaluates the filter
polynomial at the points, ``AT`` is the transposed evaluation of the output
polynomial, ``BT`` the transposed interpolation. The Lagrange denominators are
moved into ``G`` so that ``BT`` and ``AT`` stay small.

The points decide the float32 accuracy. For F(4, 3) Lavin's ``0, ±1, ±2`` gave
12-35x the rounding error of a direct float32 GEMM convolution in our
measurement (C = 64..512), while ``0, ±1, 2, -1/2`` gave 5-9x: the
transform-domain GEMM's rounding is amplified by the output transform, less so
with points of both magnitudes around 1. Both matrices and the generated C
transforms (``fastconv/_winograd_transforms.h``, written by
``tools/gen_winograd.py``) come from :data:`VARIANTS`.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple, Sequence

__all__ = ["WinogradMatrices", "winograd_matrices", "VARIANTS", "WEIGHT_GRAD_VARIANTS",
           "PHASE_VARIANTS"]


class WinogradMatrices(NamedTuple):
    """``AT`` (m x alpha), ``G`` (alpha x r) and ``BT`` (alpha x alpha), as exact Fractions."""

    m: int
    r: int
    points: tuple
    AT: tuple
    G: tuple
    BT: tuple

    @property
    def alpha(self) -> int:
        """Input tile size ``m + r - 1``."""
        return self.m + self.r - 1

    def as_floats(self):
        """``(AT, G, BT)`` as nested lists of floats (for NumPy)."""
        return tuple([[float(v) for v in row] for row in M] for M in (self.AT, self.G, self.BT))


def _poly_mul(a: Sequence[Fraction], b: Sequence[Fraction]) -> list[Fraction]:
    out = [Fraction(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def winograd_matrices(m: int, r: int, points: Sequence) -> WinogradMatrices:
    """The matrices of F(m, r) for the ``m + r - 2`` given finite points (plus infinity).

    ``points`` must be distinct; ints, Fractions or strings such as ``"-1/2"``.
    """
    pts = tuple(Fraction(p) for p in points)
    alpha = m + r - 1
    if len(pts) != alpha - 1 or len(set(pts)) != len(pts):
        raise ValueError(f"F({m}, {r}) needs {alpha - 1} distinct finite points, got {points}")
    # AT[i, j] = p_j**i: the output polynomial evaluated (transposed); infinity
    # contributes only to the highest output coefficient.
    AT = tuple(tuple(p ** i for p in pts) + (Fraction(int(i == m - 1)),) for i in range(m))
    G, BT = [], []
    for j, p in enumerate(pts):
        denominator = Fraction(1)
        basis = [Fraction(1)]           # prod_{l != j} (x - p_l), increasing powers
        for l, q in enumerate(pts):
            if l != j:
                denominator *= p - q
                basis = _poly_mul(basis, [-q, Fraction(1)])
        G.append(tuple(p ** k / denominator for k in range(r)))
        BT.append(tuple(basis) + (Fraction(0),) * (alpha - len(basis)))
    G.append(tuple(Fraction(int(k == r - 1)) for k in range(r)))
    full = [Fraction(1)]                # prod_l (x - p_l): the leading-coefficient term
    for q in pts:
        full = _poly_mul(full, [-q, Fraction(1)])
    BT.append(tuple(full))
    return WinogradMatrices(m, r, pts, AT, tuple(G), tuple(BT))


#: The variants the kernels implement: output tile size m -> interpolation points (r = 3).
#: F(3, 3), for sums too long for F(4, 3)'s accuracy, uses 0, 1, -2, -1/2: of eleven
#: sets it amplified float32 rounding least (1.4-3.9x im2col's error in the forward,
#: 4.4-7.0x in grad_x; 0, 1, -1, 1/2 gave 2.5-9x and 8-15x).
VARIANTS = {
    2: winograd_matrices(2, 3, (0, 1, -1)),
    3: winograd_matrices(3, 3, (0, 1, -2, Fraction(-1, 2))),
    4: winograd_matrices(4, 3, (0, 1, -1, 2, Fraction(-1, 2))),
}

#: grad_weight of a 3x3 convolution, by dY tile size n: each n x n tile of dY correlates
#: with its (n+2) x (n+2) input tile into the 3x3 kernel, F(3x3, n x n) (the sums over
#: tiles are GEMMs). Each shares the points of the forward's F(n x n, 3 x 3), so its
#: input transform is the forward's (tools/gen_winograd.py asserts it).
WEIGHT_GRAD_VARIANTS = {
    2: winograd_matrices(3, 2, (0, 1, -1)),
    3: winograd_matrices(3, 3, (0, 1, -2, Fraction(-1, 2))),
}

#: The 2x2 phase convolutions of a transposed convolution whose kernel is twice its
#: stride (``fastconv._conv_phases``), by output tile size m: F(m x m, 2 x 2) for the
#: forward and grad_x and, from the same transformed input tiles, F(2 x 2, m x m) for
#: grad_weight (BT depends only on the points, so both read one V). m = 2 everywhere;
#: m = 3 (points 0, ±1) for forwards whose planes it tiles with fewer products
#: (``fastconv._phases.forward_tile``): its float32 error measured 0.7-0.9x F(2x2,
#: 2x2)'s on dcgan-up. m = 4 (points 0, ±1, 1/2, the most accurate of the sets we
#: tried) only for backwards with long sums (``fastconv._phases.backward_tile``),
#: whose GEMMs then sum 64 terms per BLAS call: 4.4-4.7x im2col's float32 error on
#: dcgan-up. Not for the forward: there its max error was 14-21x im2col's for 2-1024
#: channels (im2col's own is low: col2im adds only 4 taps).
PHASE_VARIANTS = {
    2: (winograd_matrices(2, 2, (0, 1)),) * 2,
    3: (winograd_matrices(3, 2, (0, 1, -1)), winograd_matrices(2, 3, (0, 1, -1))),
    4: (winograd_matrices(4, 2, (0, 1, -1, Fraction(1, 2))),
        winograd_matrices(2, 4, (0, 1, -1, Fraction(1, 2)))),
}
