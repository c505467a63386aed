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


def _load_variants():
    spec = importlib.util.spec_from_file_location(
        "_winograd_matrices", ROOT / "fastconv" / "_winograd_matrices.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.VARIANTS


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


def input_transform(m: int, a: int, ctype: str, suffix: str) -> str:
    """dst[(xi, nu)] = (BT D B)[xi, nu] for every tile: alpha**2 streams in and out."""
    name = f"bt{m}"
    lines = [f"/* V = BT D B for n tiles: src stream i*{a}+j holds D[i][j] (row stride lds),",
             f"   dst stream xi*{a}+nu gets V[xi][nu] (row stride ldd). */",
             f"FC_TARGET static void fc_wino{m}_input_{suffix}(",
             f"    const {ctype} *src, ptrdiff_t lds, {ctype} *dst, ptrdiff_t ldd, ptrdiff_t n)",
             "{", f"    {ctype} tmp[{a * a} * FC_CHUNK];",
             "    for (ptrdiff_t t0 = 0; t0 < n; t0 += FC_CHUNK) {",
             "        const ptrdiff_t len = n - t0 < FC_CHUNK ? n - t0 : FC_CHUNK;",
             f"        for (int j = 0; j < {a}; j++)",
             "            " + _call(name, suffix,
                                    [f"src + ({i} * {a} + j) * lds + t0" for i in range(a)],
                                    [f"tmp + ({x} * {a} + j) * FC_CHUNK" for x in range(a)]),
             f"        for (int xi = 0; xi < {a}; xi++)",
             "            " + _call(name, suffix,
                                    [f"tmp + (xi * {a} + {j}) * FC_CHUNK" for j in range(a)],
                                    [f"dst + (xi * {a} + {v}) * ldd + t0" for v in range(a)]),
             "    }", "}", ""]
    return "\n".join(lines)


def output_transform(m: int, a: int, ctype: str, suffix: str) -> str:
    """dst[(i, j)] = (AT M A)[i, j]: alpha**2 streams in, m**2 out."""
    name = f"at{m}"
    lines = [f"/* Y = AT M A for n tiles: src stream xi*{a}+nu holds M[xi][nu] (row stride lds),",
             f"   dst stream i*{m}+j gets Y[i][j] (row stride ldd). */",
             f"FC_TARGET static void fc_wino{m}_output_{suffix}(",
             f"    const {ctype} *src, ptrdiff_t lds, {ctype} *dst, ptrdiff_t ldd, ptrdiff_t n)",
             "{", f"    {ctype} tmp[{m * a} * FC_CHUNK];",
             "    for (ptrdiff_t t0 = 0; t0 < n; t0 += FC_CHUNK) {",
             "        const ptrdiff_t len = n - t0 < FC_CHUNK ? n - t0 : FC_CHUNK;",
             f"        for (int nu = 0; nu < {a}; nu++)",
             "            " + _call(name, suffix,
                                    [f"src + ({x} * {a} + nu) * lds + t0" for x in range(a)],
                                    [f"tmp + ({i} * {a} + nu) * FC_CHUNK" for i in range(m)]),
             f"        for (int i = 0; i < {m}; i++)",
             "            " + _call(name, suffix,
                                    [f"tmp + (i * {a} + {v}) * FC_CHUNK" for v in range(a)],
                                    [f"dst + (i * {m} + {j}) * ldd + t0" for j in range(m)]),
             "    }", "}", ""]
    return "\n".join(lines)


def weight_transform(m: int, a: int, ctype: str, suffix: str) -> str:
    """dst[(xi, nu)] = (G g G.T)[xi, nu], computed in double and rounded once."""
    name = f"g{m}"
    lines = [f"/* U = G g G^T for n filters, in double: element t of tap k (= kh*3 + kw) is",
             "   g[k*ldg + t*inc] (negative strides allowed: ldg = -1 from the last tap",
             f"   reads the kernel rotated by 180 degrees); dst stream xi*{a}+nu gets U[xi][nu]. */",
             f"FC_TARGET static void fc_wino{m}_weight_{suffix}(",
             f"    const {ctype} *g, ptrdiff_t ldg, ptrdiff_t inc, {ctype} *dst, ptrdiff_t ldd,",
             "    ptrdiff_t n)", "{",
             "    double taps[9 * FC_CHUNK];",
             f"    double tmp[{a * 3} * FC_CHUNK];",
             f"    double out[{a * a} * FC_CHUNK];",
             "    for (ptrdiff_t t0 = 0; t0 < n; t0 += FC_CHUNK) {",
             "        const ptrdiff_t len = n - t0 < FC_CHUNK ? n - t0 : FC_CHUNK;",
             "        for (int k = 0; k < 9; k++)",
             "            for (ptrdiff_t t = 0; t < len; t++)",
             "                taps[k * FC_CHUNK + t] = g[k * ldg + (t0 + t) * inc];",
             "        for (int kw = 0; kw < 3; kw++)",
             "            " + _call(name + "d", "d",
                                    [f"taps + ({kh} * 3 + kw) * FC_CHUNK" for kh in range(3)],
                                    [f"tmp + ({x} * 3 + kw) * FC_CHUNK" for x in range(a)]),
             f"        for (int xi = 0; xi < {a}; xi++)",
             "            " + _call(name + "d", "d",
                                    [f"tmp + (xi * 3 + {kw}) * FC_CHUNK" for kw in range(3)],
                                    [f"out + (xi * {a} + {v}) * FC_CHUNK" for v in range(a)]),
             f"        for (int s = 0; s < {a * a}; s++)",
             "            for (ptrdiff_t t = 0; t < len; t++)",
             f"                dst[s * ldd + t0 + t] = ({ctype})out[s * FC_CHUNK + t];",
             "    }", "}", ""]
    return "\n".join(lines)


def gather(m: int, a: int, ctype: str, suffix: str) -> str:
    """D[(i, j)][tw] = the input value under tap (i, j) of tile tw of one tile row."""
    dj = ", ".join(f"*restrict d{j} = D + (i * {a} + {j}) * ldd" for j in range(a))
    lines = [f"/* The {a}x{a} input tile of every tile tw < TW of one tile row of one plane, as",
             f"   streams: D[(i*{a} + j)*ldd + tw] = plane[rows[i]*W + cols[tw*{m} + j]], 0 where the",
             "   row or column map is -1 (padding, or past the input). Tiles [lo, hi) are interior:",
             f"   cols[tw*{m} + j] = tw*{m} + j - left there, a strided copy. */",
             f"FC_TARGET static void fc_wino{m}_gather_{suffix}(",
             f"    const {ctype} *plane, ptrdiff_t W, const ptrdiff_t *rows, const ptrdiff_t *cols,",
             f"    ptrdiff_t left, ptrdiff_t TW, ptrdiff_t lo, ptrdiff_t hi, {ctype} *D, ptrdiff_t ldd)",
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
             "            " + " ".join(f"d{j}[tw] = base[{m} * tw + {j}];" for j in range(a)),
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


def render() -> str:
    variants = _load_variants()
    parts = ["/* Generated by tools/gen_winograd.py from fastconv/_winograd_matrices.py:",
             "   do not edit by hand (a test checks that this file is up to date). */",
             "#ifndef FASTCONV_WINOGRAD_TRANSFORMS_H", "#define FASTCONV_WINOGRAD_TRANSFORMS_H",
             "", "#include <stddef.h>", "#include \"_simd_target.h\"", "",
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
    parts += ["#endif", ""]
    return "\n".join(parts)


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
