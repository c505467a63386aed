#!/usr/bin/env python3
"""Write fastconv/_winograd_transforms.h: the Winograd transforms as straight-line C.

Every transform is a small constant matrix applied to *streams*: arrays that
hold one value of every tile of a block, so each output stream is a fixed
linear combination of a few input streams, and the loop over tiles vectorises.
A 2-D transform ``X -> P X Q.T`` is two such passes through a stack buffer.
Zero coefficients are left out and +-1 needs no multiply: that is why the code
is generated from the exact matrices of ``fastconv/_winograd_matrices.py``
instead of looping over a table (a compiler may not drop ``x * 0.0`` under
IEEE rules).

Run from the repository root: ``python tools/gen_winograd.py`` (or with
``--check`` to fail if the committed header is stale; a test does that).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
from fractions import Fraction

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER = ROOT / "fastconv" / "_winograd_transforms.h"
#: Tiles per pass through the stack buffer: alpha**2 * 64 doubles = 18 KiB, within L1.
CHUNK = 64
TYPES = (("s", "float"), ("d", "double"))


def _load_matrices_module():
    if "_winograd_matrices" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "_winograd_matrices", ROOT / "fastconv" / "_winograd_matrices.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["_winograd_matrices"]


def _load_variants():
    return _load_matrices_module().VARIANTS


def _literal(value: Fraction, ctype: str) -> str:
    """An exact-as-possible C constant of ``ctype`` for ``value``."""
    if value.denominator == 1:
        text = f"{value.numerator}.0"
    else:
        text = f"({value.numerator}.0 / {value.denominator}.0)"
    return f"({ctype}){text}" if ctype == "float" else text


def _combination(row, names, ctype: str) -> str:
    terms = []
    for coefficient, name in zip(row, names):
        if coefficient == 0:
            continue
        if coefficient == 1:
            terms.append(f"+ {name}")
        elif coefficient == -1:
            terms.append(f"- {name}")
        elif coefficient > 0:
            terms.append(f"+ {_literal(coefficient, ctype)} * {name}")
        else:
            terms.append(f"- {_literal(-coefficient, ctype)} * {name}")
    text = " ".join(terms) if terms else "0"
    return text[2:] if text.startswith("+ ") else text


def apply_function(name: str, matrix, ctype: str, suffix: str) -> str:
    """``o_k[t] = sum_i matrix[k][i] * i_i[t]`` for t < n, every stream restrict."""
    rows, cols = len(matrix), len(matrix[0])
    ins = ", ".join(f"const {ctype} *restrict i{i}" for i in range(cols))
    outs = ", ".join(f"{ctype} *restrict o{k}" for k in range(rows))
    lines = [f"static inline FC_ALWAYS_INLINE void fc_apply_{name}_{suffix}(",
             f"    {ins},", f"    {outs}, ptrdiff_t n)", "{",
             "    for (ptrdiff_t t = 0; t < n; t++) {"]
    lines += [f"        const {ctype} x{i} = i{i}[t];" for i in range(cols)]
    names = [f"x{i}" for i in range(cols)]
    lines += [f"        o{k}[t] = {_combination(matrix[k], names, ctype)};" for k in range(rows)]
    lines += ["    }", "}", ""]
    return "\n".join(lines)


def _call(name, suffix, ins, outs, n="len"):
    return f"fc_apply_{name}_{suffix}({', '.join(ins)}, {', '.join(outs)}, {n});"


def separable(function: str, apply: str, rows_in: int, cols_in: int, rows_out: int,
              cols_out: int, ctype: str, suffix: str, comment: str,
              interleaved: bool = False) -> str:
    """``Y = P X Q^T`` for n tiles, as two passes of the matrix function ``apply``
    (P and Q are the same matrix in every transform here).

    src stream ``i*cols_in + j`` holds ``X[i][j]`` (row stride lds); dst stream
    ``r*cols_out + c`` gets ``Y[r][c]`` (row stride ldd), or with ``interleaved``
    each tile's outputs lie together: ``dst[t*rows_out*cols_out + r*cols_out + c]``.
    """
    outs = rows_out * cols_out
    if interleaved:
        final = (f"        for (int r = 0; r < {rows_out}; r++) {{\n"
                 f"            {_call(apply, suffix, [f'tmp + (r * {cols_in} + {j}) * FC_CHUNK' for j in range(cols_in)], [f'row + {c} * FC_CHUNK' for c in range(cols_out)])}\n"
                 f"            for (ptrdiff_t t = 0; t < len; t++)\n"
                 f"                for (int c = 0; c < {cols_out}; c++)\n"
                 f"                    dst[(t0 + t) * {outs} + r * {cols_out} + c] = row[c * FC_CHUNK + t];\n"
                 "        }")
        extra = [f"    {ctype} row[{cols_out} * FC_CHUNK];"]
    else:
        final = (f"        for (int r = 0; r < {rows_out}; r++)\n"
                 "            " + _call(apply, suffix,
                                        [f"tmp + (r * {cols_in} + {j}) * FC_CHUNK"
                                         for j in range(cols_in)],
                                        [f"dst + (r * {cols_out} + {c}) * ldd + t0"
                                         for c in range(cols_out)]))
        extra = []
    lines = [f"/* {comment} */",
             f"FC_TARGET static void fc_{function}_{suffix}(",
             f"    const {ctype} *src, ptrdiff_t lds, {ctype} *dst, ptrdiff_t ldd, ptrdiff_t n)",
             "{", f"    {ctype} tmp[{rows_out * cols_in} * FC_CHUNK];",
             *extra,
             "    (void)ldd;" if interleaved else "",
             "    for (ptrdiff_t t0 = 0; t0 < n; t0 += FC_CHUNK) {",
             "        const ptrdiff_t len = n - t0 < FC_CHUNK ? n - t0 : FC_CHUNK;",
             f"        for (int j = 0; j < {cols_in}; j++)",
             "            " + _call(apply, suffix,
                                    [f"src + ({i} * {cols_in} + j) * lds + t0"
                                     for i in range(rows_in)],
                                    [f"tmp + ({r} * {cols_in} + j) * FC_CHUNK"
                                     for r in range(rows_out)]),
             final,
             "    }", "}", ""]
    return "\n".join(line for line in lines if line != "") + "\n"


def input_transform(m: int, a: int, ctype: str, suffix: str) -> str:
    """dst[(xi, nu)] = (BT D B)[xi, nu] for every tile: alpha**2 streams in and out."""
    return separable(f"wino{m}_input", f"bt{m}", a, a, a, a, ctype, suffix,
                     f"V = BT D B for n tiles: src stream i*{a}+j holds D[i][j] (row stride "
                     f"lds),\n   dst stream xi*{a}+nu gets V[xi][nu] (row stride ldd).")


def output_transform(m: int, a: int, ctype: str, suffix: str) -> str:
    """dst[(i, j)] = (AT M A)[i, j]: alpha**2 streams in, m**2 out."""
    return separable(f"wino{m}_output", f"at{m}", a, a, m, m, ctype, suffix,
                     f"Y = AT M A for n tiles: src stream xi*{a}+nu holds M[xi][nu] (row "
                     f"stride lds),\n   dst stream i*{m}+j gets Y[i][j] (row stride ldd).")


def weight_transform(m: int, a: int, ctype: str, suffix: str, r: int = 3,
                     name: str | None = None) -> str:
    """dst[(xi, nu)] = (G g G.T)[xi, nu] of r x r filters, computed in double and rounded once."""
    apply = f"g{m}d" if name is None else f"{name}gd"
    function = f"wino{m}_weight" if name is None else f"{name}_weight"
    lines = [f"/* U = G g G^T for n {r}x{r} filters, in double: element t of tap k (= kh*{r} + kw) is",
             "   g[k*ldg + t*inc] (negative strides allowed: ldg = -1 from the last tap",
             f"   reads the kernel rotated by 180 degrees); dst stream xi*{a}+nu gets U[xi][nu]. */",
             f"FC_TARGET static void fc_{function}_{suffix}(",
             f"    const {ctype} *g, ptrdiff_t ldg, ptrdiff_t inc, {ctype} *dst, ptrdiff_t ldd,",
             "    ptrdiff_t n)", "{",
             f"    double taps[{r * r} * FC_CHUNK];",
             f"    double tmp[{a * r} * FC_CHUNK];",
             f"    double out[{a * a} * FC_CHUNK];",
             "    for (ptrdiff_t t0 = 0; t0 < n; t0 += FC_CHUNK) {",
             "        const ptrdiff_t len = n - t0 < FC_CHUNK ? n - t0 : FC_CHUNK;",
             f"        for (int k = 0; k < {r * r}; k++)",
             "            for (ptrdiff_t t = 0; t < len; t++)",
             "                taps[k * FC_CHUNK + t] = g[k * ldg + (t0 + t) * inc];",
             f"        for (int kw = 0; kw < {r}; kw++)",
             "            " + _call(apply, "d",
                                    [f"taps + ({kh} * {r} + kw) * FC_CHUNK" for kh in range(r)],
                                    [f"tmp + ({x} * {r} + kw) * FC_CHUNK" for x in range(a)]),
             f"        for (int xi = 0; xi < {a}; xi++)",
             "            " + _call(apply, "d",
                                    [f"tmp + (xi * {r} + {kw}) * FC_CHUNK" for kw in range(r)],
                                    [f"out + (xi * {a} + {v}) * FC_CHUNK" for v in range(a)]),
             f"        for (int s = 0; s < {a * a}; s++)",
             "            for (ptrdiff_t t = 0; t < len; t++)",
             f"                dst[s * ldd + t0 + t] = ({ctype})out[s * FC_CHUNK + t];",
             "    }", "}", ""]
    return "\n".join(lines)


def gather(m: int, a: int, ctype: str, suffix: str, function: str | None = None,
           strided: bool = False) -> str:
    """D[(i, j)][tw] = the input value under tap (i, j) of tile tw of one tile row
    (tiles m apart, a x a values each); ``strided`` adds a column step for the
    interior tiles (a phase plane's columns are the stride apart in its plane)."""
    dj = ", ".join(f"*restrict d{j} = D + (i * {a} + {j}) * ldd" for j in range(a))
    interior = (f"   cols[tw*{m} + j] = step*(tw*{m} + j) - left there, a strided copy. */"
                if strided else
                f"   cols[tw*{m} + j] = tw*{m} + j - left there, a strided copy. */")
    lines = [f"/* The {a}x{a} input tile of every tile tw < TW of one tile row of one plane, as",
             f"   streams: D[(i*{a} + j)*ldd + tw] = plane[rows[i]*W + cols[tw*{m} + j]], 0 where the",
             "   row or column map is -1 (padding, or past the input). Tiles [lo, hi) are interior:",
             interior,
             f"FC_TARGET static void fc_{function or f'wino{m}_gather'}_{suffix}(",
             f"    const {ctype} *plane, ptrdiff_t W, const ptrdiff_t *rows, const ptrdiff_t *cols,",
             f"    ptrdiff_t left, ptrdiff_t TW, ptrdiff_t lo, ptrdiff_t hi, {ctype} *D, ptrdiff_t ldd"
             + (", ptrdiff_t step)" if strided else ")"),
             "{",
             f"    for (int i = 0; i < {a}; i++) {{",
             f"        {ctype} {dj};",
             "        if (rows[i] < 0) {",
             "            for (ptrdiff_t tw = 0; tw < TW; tw++) {",
             "                " + " ".join(f"d{j}[tw] = 0;" for j in range(a)),
             "            }",
             "            continue;",
             "        }",
             f"        const {ctype} *src = plane + rows[i] * W;",
             f"        const {ctype} *restrict base = src - left;",
             "        for (ptrdiff_t tw = 0; tw < lo; tw++) {",
             f"            const ptrdiff_t *c = cols + tw * {m};",
             "            " + " ".join(f"d{j}[tw] = c[{j}] < 0 ? 0 : src[c[{j}]];" for j in range(a)),
             "        }",
             "        for (ptrdiff_t tw = lo; tw < hi; tw++) {",
             "            " + " ".join(f"d{j}[tw] = base[step * ({m} * tw + {j})];" if strided
                                    else f"d{j}[tw] = base[{m} * tw + {j}];" for j in range(a)),
             "        }",
             "        for (ptrdiff_t tw = hi; tw < TW; tw++) {",
             f"            const ptrdiff_t *c = cols + tw * {m};",
             "            " + " ".join(f"d{j}[tw] = c[{j}] < 0 ? 0 : src[c[{j}]];" for j in range(a)),
             "        }",
             "    }",
             "}", ""]
    return "\n".join(lines)


def scatter(m: int, ctype: str, suffix: str) -> str:
    """Y streams of one tile row -> m output rows, with the bias and ReLU fused."""
    yj = ", ".join(f"*restrict y{j} = Y + (i * {m} + {j}) * ldy" for j in range(m))

    def stores(relu: bool) -> str:
        out = []
        for j in range(m):
            value = f"y{j}[tw] + bias"
            if relu:
                # v <= 0 ? 0 : v keeps NaN and turns -0 into 0, as fastconv.relu does
                out.append(f"{{ const {ctype} v = {value}; o[{m} * tw + {j}] = v <= 0 ? 0 : v; }}")
            else:
                out.append(f"o[{m} * tw + {j}] = {value};")
        return " ".join(out)

    lines = [f"/* Output rows of one tile row: out[i*OW + tw*{m} + j] = act(Y[(i*{m} + j)*ldy + tw] + bias)",
             "   for i < rows and tw*m + j < OW; act is ReLU (NaN kept) when relu != 0. */",
             f"FC_TARGET static void fc_wino{m}_scatter_{suffix}(",
             f"    const {ctype} *Y, ptrdiff_t ldy, {ctype} *out, ptrdiff_t OW, ptrdiff_t rows,",
             f"    ptrdiff_t TW, {ctype} bias, int relu)",
             "{",
             f"    const ptrdiff_t full = OW / {m} < TW ? OW / {m} : TW;",
             "    for (ptrdiff_t i = 0; i < rows; i++) {",
             f"        {ctype} *restrict o = out + i * OW;",
             f"        const {ctype} {yj};",
             "        if (relu) {",
             "            for (ptrdiff_t tw = 0; tw < full; tw++) {",
             "                " + stores(True),
             "            }",
             "        } else {",
             "            for (ptrdiff_t tw = 0; tw < full; tw++) {",
             "                " + stores(False),
             "            }",
             "        }",
             "        for (ptrdiff_t tw = full; tw < TW; tw++) {",
             f"            for (int j = 0; j < {m} && tw * {m} + j < OW; j++) {{",
             f"                const {ctype} v = Y[(i * {m} + j) * ldy + tw] + bias;",
             f"                o[{m} * tw + j] = (relu && v <= 0) ? 0 : v;",
             "            }",
             "        }",
             "    }",
             "}", ""]
    return "\n".join(lines)


#: The per-variant kernels, by kind: (C parameter list, argument names).
KERNEL_SIGNATURES = {
    "input": ("const {T} *src, ptrdiff_t lds, {T} *dst, ptrdiff_t ldd, ptrdiff_t n",
              "src, lds, dst, ldd, n"),
    "output": ("const {T} *src, ptrdiff_t lds, {T} *dst, ptrdiff_t ldd, ptrdiff_t n",
               "src, lds, dst, ldd, n"),
    "weight": ("const {T} *g, ptrdiff_t ldg, ptrdiff_t inc, {T} *dst, ptrdiff_t ldd, ptrdiff_t n",
               "g, ldg, inc, dst, ldd, n"),
    "gather": ("const {T} *plane, ptrdiff_t W, const ptrdiff_t *rows, const ptrdiff_t *cols, "
               "ptrdiff_t left, ptrdiff_t TW, ptrdiff_t lo, ptrdiff_t hi, {T} *D, ptrdiff_t ldd",
               "plane, W, rows, cols, left, TW, lo, hi, D, ldd"),
    "scatter": ("const {T} *Y, ptrdiff_t ldy, {T} *out, ptrdiff_t OW, ptrdiff_t rows, "
                "ptrdiff_t TW, {T} bias, int relu", "Y, ldy, out, OW, rows, TW, bias, relu"),
}


#: The phase kernels' signatures (fc_phase<m>_<kind>): the transforms take streams, the
#: gathers a plane, the weight transform filters.
_STREAMS = KERNEL_SIGNATURES["input"]
# both gathers read planes with a column step (dY's phase planes; x's stride phases)
_STRIDED_GATHER = (KERNEL_SIGNATURES["gather"][0] + ", ptrdiff_t step",
                   KERNEL_SIGNATURES["gather"][1] + ", step")
PHASE_KERNEL_SIGNATURES = {
    "input": _STREAMS, "output": _STREAMS, "weight": KERNEL_SIGNATURES["weight"],
    "gather": _STRIDED_GATHER, "dw_x": _STREAMS, "dw_output": _STREAMS,
    "dw_gather_x": _STRIDED_GATHER, "scatter": KERNEL_SIGNATURES["scatter"],
}

#: grad_weight's kernels (fc_winodw<n>_<kind>, n the dY tile size).
WEIGHT_GRAD_KERNEL_SIGNATURES = {
    "grad": _STREAMS, "output": _STREAMS,
    "gather_grad": KERNEL_SIGNATURES["gather"],
}


def dispatchers(sizes, ctype: str, suffix: str, signatures=None, family: str = "wino") -> str:
    """``fc_<family>_<kind>_<suffix>(int m, ...)``: the variant's kernel for output tiles
    m x m, so the Cython side dispatches on the dtype only (the phase family's scatter
    is the Winograd one's)."""
    out = []
    for kind, (params, args) in (signatures or KERNEL_SIGNATURES).items():
        params = params.format(T=ctype)
        prefix = "wino" if kind == "scatter" else family
        body = " else ".join(f"if (m == {m}) fc_{prefix}{m}_{kind}_{suffix}({args});"
                             for m in sizes[:-1])
        last = f"fc_{prefix}{sizes[-1]}_{kind}_{suffix}({args});"
        body = f"{body} else {last}" if body else last
        out += [f"static inline void fc_{family}_{kind}_{suffix}(int m, {params})",
                "{", f"    {body}", "}", ""]
    return "\n".join(out)


def render() -> str:
    variants = _load_variants()
    parts = ["/* Generated by tools/gen_winograd.py from fastconv/_winograd_matrices.py:",
             "   do not edit by hand (a test checks that this file is up to date). */",
             "#ifndef FASTCONV_WINOGRAD_TRANSFORMS_H", "#define FASTCONV_WINOGRAD_TRANSFORMS_H",
             "", "#include <stddef.h>", "#include \"_simd_target.h\"", "",
             "/* _conv_winograd and _conv_phases each use only their part of this header */",
             "#pragma GCC diagnostic ignored \"-Wunused-function\"", "",
             f"#define FC_CHUNK {CHUNK}", ""]
    for m, mats in sorted(variants.items()):
        a = mats.alpha
        points = ", ".join(str(p) for p in mats.points)
        parts.append(f"/* ---- F({m}x{m}, 3x3): alpha = {a}, points {points}, infinity ---- */\n")
        for suffix, ctype in TYPES:
            parts.append(apply_function(f"bt{m}", mats.BT, ctype, suffix))
            parts.append(apply_function(f"at{m}", mats.AT, ctype, suffix))
        parts.append(apply_function(f"g{m}d", mats.G, "double", "d"))
        for suffix, ctype in TYPES:
            parts.append(input_transform(m, a, ctype, suffix))
            parts.append(output_transform(m, a, ctype, suffix))
            parts.append(weight_transform(m, a, ctype, suffix))
            parts.append(gather(m, a, ctype, suffix))
            parts.append(scatter(m, ctype, suffix))
    sizes = sorted(variants)
    parts.append("/* ---- the variant for output tiles m x m ---- */\n")
    for suffix, ctype in TYPES:
        parts.append(dispatchers(sizes, ctype, suffix))
    parts += weight_grad_kernels(_load_matrices_module())
    parts += phase_kernels(_load_matrices_module())
    parts += ["#endif", ""]
    return "\n".join(parts)


def weight_grad_kernels(matrices) -> list[str]:
    """grad_weight of a 3x3 convolution by F(3x3, n x n) for each dY tile size n
    (``fc_winodw<n>_*``, and ``fc_winodw_<kind>_<s|d>(int n, ...)`` dispatching on n).
    Its input transform is the forward's ``fc_wino<n>_input``: BT depends only on the
    points, which the two variants share."""
    parts = []
    for n, dw in sorted(matrices.WEIGHT_GRAD_VARIANTS.items()):
        a = dw.alpha
        assert (dw.m, dw.r, a) == (3, n, n + 2) and dw.BT == matrices.VARIANTS[n].BT
        points = ", ".join(str(p) for p in dw.points)
        name = f"winodw{n}"
        parts.append(f"/* ---- grad_weight by F(3x3, {n}x{n}): alpha = {a}, points {points}, "
                     f"infinity: the\n   3x3 kernel gradient of a {n}x{n} dY tile and its "
                     f"{a}x{a} input tile ---- */\n")
        for suffix, ctype in TYPES:
            parts.append(apply_function(f"dw{n}g", dw.G, ctype, suffix))
            parts.append(apply_function(f"dw{n}at", dw.AT, ctype, suffix))
            parts.append(separable(f"{name}_grad", f"dw{n}g", n, n, a, a, ctype, suffix,
                                   f"W = G dY G^T of the {n}x{n} dY tiles: {n * n} streams in, "
                                   f"{a * a} out."))
            parts.append(separable(f"{name}_output", f"dw{n}at", a, a, 3, 3, ctype, suffix,
                                   f"dK = AT M A for n (filter, channel) pairs: {a * a} streams "
                                   "in (row stride lds),\n   each pair's 3x3 kernel gradient at "
                                   "dst[t*9 .. t*9 + 8].", interleaved=True))
            parts.append(gather(n, n, ctype, suffix, function=f"{name}_gather_grad"))
    parts.append("/* ---- grad_weight's kernels for dY tiles n x n ---- */\n")
    sizes = sorted(matrices.WEIGHT_GRAD_VARIANTS)
    for suffix, ctype in TYPES:
        parts.append(dispatchers(sizes, ctype, suffix, WEIGHT_GRAD_KERNEL_SIGNATURES, "winodw"))
    return parts


def phase_kernels(matrices) -> list[str]:
    """The 2x2 phase convolutions of a transposed convolution (``fc_phase<m>_*``, and
    ``fc_phase_<kind>_<s|d>(int m, ...)`` dispatching on m): F(m x m, 2 x 2) for the
    forward and grad_x, F(2 x 2, m x m) for grad_weight from the same input transform
    (both have the same BT); the output tiles are scattered by ``fc_wino<m>_scatter``."""
    parts = []
    for m, (dx, dw) in sorted(matrices.PHASE_VARIANTS.items()):
        a = dx.alpha
        assert dx.BT == dw.BT and dw.alpha == a and (dx.m, dx.r, dw.m, dw.r) == (m, 2, 2, m)
        points = ", ".join(str(p) for p in dx.points)
        name = f"phase{m}"
        parts.append(f"/* ---- phase convolutions: F({m}x{m}, 2x2) for the forward and grad_x, "
                     f"F(2x2, {m}x{m})\n   for grad_weight; alpha = {a}, points {points}, "
                     "infinity ---- */\n")
        parts.append(apply_function(f"{name}gd", dx.G, "double", "d"))
        for suffix, ctype in TYPES:
            parts.append(apply_function(f"{name}bt", dx.BT, ctype, suffix))
            parts.append(apply_function(f"{name}at", dx.AT, ctype, suffix))
            parts.append(apply_function(f"{name}dwg", dw.G, ctype, suffix))
            parts.append(apply_function(f"{name}dwat", dw.AT, ctype, suffix))
            parts.append(separable(f"{name}_input", f"{name}bt", a, a, a, a, ctype, suffix,
                                   f"V = BT D B of the {a}x{a} input tiles (streams as the "
                                   "forward's)."))
            parts.append(separable(f"{name}_output", f"{name}at", a, a, m, m, ctype, suffix,
                                   f"Y = AT M A: {a * a} streams in, {m * m} out (the {m}x{m} "
                                   "output tiles)."))
            parts.append(weight_transform(m, a, ctype, suffix, r=2, name=name))
            parts.append(gather(m, a, ctype, suffix, function=f"{name}_gather", strided=True))
            parts.append(separable(f"{name}_dw_x", f"{name}dwg", m, m, a, a, ctype, suffix,
                                   f"X = G x G^T of grad_weight's {m}x{m} x tiles: {m * m} "
                                   f"streams in, {a * a} out."))
            parts.append(separable(f"{name}_dw_output", f"{name}dwat", a, a, 2, 2, ctype,
                                   suffix, f"dK = AT M A for n (filter, channel) pairs: "
                                   f"{a * a} streams in (row stride lds),\n   each pair's 2x2 "
                                   "kernel gradient at dst[t*4 .. t*4 + 3].", interleaved=True))
            parts.append(gather(m, m, ctype, suffix, function=f"{name}_dw_gather_x",
                                strided=True))
            if m not in _load_variants():
                parts.append(scatter(m, ctype, suffix))
    parts.append("/* ---- the phase kernels for output tiles m x m ---- */\n")
    sizes = sorted(matrices.PHASE_VARIANTS)
    for suffix, ctype in TYPES:
        parts.append(dispatchers(sizes, ctype, suffix, PHASE_KERNEL_SIGNATURES, "phase"))
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the header differs from what would be generated")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = HEADER.read_text() if HEADER.exists() else ""
        if current != text:
            print(f"{HEADER.relative_to(ROOT)} is stale: run python tools/gen_winograd.py")
            return 1
        return 0
    HEADER.write_text(text)
    print(f"wrote {HEADER.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
