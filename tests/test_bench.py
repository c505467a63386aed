"""Tests of the benchmark harness (``python -m fastconv bench``).

Only the plumbing is checked: shapes, FLOP counts, table layout, option
handling. Timing values and ratios are never asserted on.
"""

import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from fastconv import _bench
from fastconv._bench import SUITE, Shape, format_table, run_suite

TINY = Shape("tiny", N=2, C=3, H=8, W=8, F=4, KH=3, KW=3, stride=1, pad=1)
SUITE_NAMES = [s.name for s in SUITE]


def _row(shape="a", pass_="forward", **values):
    row = {"shape": shape, "pass": pass_, "dtype": "float32", "fastconv_ms": 1.5,
           "reference_ms": None, "speedup": None, "gflops": 12.0, "gemm_ms": None,
           "vs_gemm": None, "torch_ms": None, "vs_torch": None}
    row.update(values)
    return row


def test_suite_names_are_unique():
    assert len(set(SUITE_NAMES)) == len(SUITE_NAMES)


def test_flops_of_suite_shape_match_hand_computation():
    vgg = {s.name: s for s in SUITE}["vgg-mid"]
    assert vgg.output_hw == (56, 56)
    # 2 * N * F * OH * OW * C * KH * KW
    assert vgg.forward_flops() == 2 * 8 * 128 * 56 * 56 * 128 * 3 * 3 == 7_398_752_256
    assert vgg.backward_flops() == 2 * 7_398_752_256
    stem = {s.name: s for s in SUITE}["resnet-stem"]
    assert stem.output_shape == (8, 64, 112, 112)
    assert stem.gemm_mnk == (64, 3 * 7 * 7, 8 * 112 * 112)
    assert stem.flops("forward") == 2 * 8 * 64 * 112 * 112 * 3 * 7 * 7


def test_make_inputs_shapes_and_dtype():
    arrays = TINY.make_inputs("float64")
    assert arrays["x"].shape == (2, 3, 8, 8)
    assert arrays["weight"].shape == (4, 3, 3, 3)
    assert arrays["bias"].shape == (4,)
    assert arrays["grad_output"].shape == (2, 4, 8, 8)
    assert all(a.dtype == np.float64 for a in arrays.values())
    np.testing.assert_array_equal(arrays["x"], TINY.make_inputs("float64")["x"])


def test_format_table_has_header_and_one_line_per_row():
    rows = [_row("a", "forward", gemm_ms=0.5, vs_gemm=3.0), _row("a", "backward"),
            _row("bb", "forward", gemm_ms=0.25, vs_gemm=6.0)]
    lines = format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["shape", "pass", "fastconv ms", "GFLOP/s", "sgemm ms", "vs sgemm"]
    assert set(lines[1]) <= set("|-:")
    # every line has the same number of cells, empty ones included
    assert {line.count("|") for line in lines} == {len(header) + 1}
    assert lines[2].split("|")[1].strip() == "a"


def test_format_table_shows_optional_columns_and_dgemm():
    rows = [_row(dtype="float64", reference_ms=30.0, speedup=20.0, gemm_ms=1.0,
                 vs_gemm=1.5, torch_ms=2.0, vs_torch=1.33)]
    header = format_table(rows).splitlines()[0]
    for name in ("reference ms", "speedup", "dgemm ms", "vs dgemm", "torch ms", "vs torch"):
        assert name in header


def test_select_shapes_accepts_comma_lists_and_repeats():
    shapes = _bench.select_shapes(["vgg-mid,lenet-mnist", "vgg-mid"])
    assert [s.name for s in shapes] == ["lenet-mnist", "vgg-mid"]
    assert _bench.select_shapes(None) == SUITE


def test_only_unknown_name_exits_nonzero_listing_valid_names(capsys):
    with pytest.raises(SystemExit) as info:
        _bench.main(["--only", "lenet-mnist,no-such-net"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "no-such-net" in err
    assert all(name in err for name in SUITE_NAMES)


def test_module_without_subcommand_exits_2(capsys):
    from fastconv.__main__ import main

    assert main([]) == 2
    assert "bench" in capsys.readouterr().err


def test_run_suite_on_tiny_shape():
    rows = run_suite([TINY], threads=1, dtype="float32", repeat=1, torch=False)
    assert [(r["shape"], r["pass"]) for r in rows] == [("tiny", "forward"), ("tiny", "backward")]
    forward_flops = 2 * 2 * 4 * 8 * 8 * 3 * 3 * 3
    assert [r["flops"] for r in rows] == [forward_flops, 2 * forward_flops]
    for r in rows:
        assert r["fastconv_ms"] > 0 and r["reference_ms"] > 0 and r["gflops"] > 0
        assert r["torch_ms"] is None
        # the harness compares fastconv with the reference on the same arrays
        assert r["rel_err"] < 1e-4
    assert rows[0]["gemm_ms"] > 0 and rows[1]["gemm_ms"] is None
    assert len(format_table(rows).splitlines()) == 4


def test_suites_fix_the_malloc_thresholds_first(monkeypatch):
    """Both suites pin glibc's mmap threshold before timing anything: a peer's per-call
    buffers would otherwise cost page faults or not depending on what ran earlier."""
    import platform

    calls = []
    monkeypatch.setattr(_bench, "pin_malloc_thresholds", lambda: calls.append(1) or True)
    run_suite([TINY], threads=1, repeat=1, torch=False, reference=False, gemm=False)
    _bench.run_pool_suite([_bench.POOL_SUITE[0].with_batch(1)], threads=1, repeat=1,
                          torch=False, reference=False)
    assert len(calls) == 2
    monkeypatch.undo()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert _bench.pin_malloc_thresholds()


TINY_DEPTHWISE = Shape("tiny-dw", N=2, C=4, H=7, W=6, F=8, KH=3, KW=3, stride=1, pad=1,
                       groups=4)
TINY_TRANSPOSED = Shape("tiny-up", N=2, C=4, H=5, W=6, F=6, KH=4, KW=4, stride=2, pad=1,
                        transposed=True)


def test_parity_rows_shapes_and_flops():
    assert TINY_DEPTHWISE.weight_shape == (8, 1, 3, 3)
    assert TINY_DEPTHWISE.forward_flops() == 2 * 2 * 8 * 7 * 6 * 1 * 3 * 3
    assert TINY_TRANSPOSED.weight_shape == (4, 6, 4, 4)
    assert TINY_TRANSPOSED.output_shape == (2, 6, 10, 12)     # (H-1)*2 - 2 + 4
    assert TINY_TRANSPOSED.forward_flops() == 2 * 2 * 5 * 6 * 4 * 6 * 4 * 4
    suite = {s.name: s for s in SUITE}
    assert suite["mobilenet-dw"].weight_shape == (256, 1, 3, 3)
    assert suite["dcgan-up"].output_shape == (16, 128, 32, 32)
    assert [s.is_plain for s in SUITE].count(False) == 2


def test_run_suite_on_parity_rows():
    """The NHWC column on plain shapes, the grouped-im2col column on depthwise ones, the
    transposed row against the reference's conv_transpose2d."""
    rows = run_suite([TINY, TINY_DEPTHWISE, TINY_TRANSPOSED], threads=1, repeat=1, torch=False)
    by_shape = {(r["shape"], r["pass"]): r for r in rows}
    for pass_ in ("forward", "backward"):
        plain, dw, up = (by_shape[(name, pass_)] for name in ("tiny", "tiny-dw", "tiny-up"))
        assert plain["nhwc_ms"] > 0 and plain["nhwc_vs_nchw"] > 0 and plain["im2col_ms"] is None
        assert dw["im2col_ms"] > 0 and dw["vs_im2col"] > 0 and dw["nhwc_ms"] is None
        assert up["nhwc_ms"] is None and up["im2col_ms"] is None
        for row in (plain, dw, up):
            assert row["rel_err"] < 1e-4
        assert dw["gemm_ms"] is None
    table = format_table(rows)
    assert "NHWC/NCHW" in table and "grouped im2col ms" in table


def test_run_suite_with_torch():
    pytest.importorskip("torch")
    rows = run_suite([TINY], threads=1, repeat=1, reference=False, gemm=False, torch=True)
    assert all(r["torch_ms"] > 0 and r["vs_torch"] > 0 for r in rows)
    assert "torch ms" in format_table(rows)


def test_run_suite_with_onnxruntime_on_every_row_kind():
    """ONNX Runtime times forward rows only, and computes what fastconv computes."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    rows = run_suite([TINY, TINY_DEPTHWISE, TINY_TRANSPOSED], threads=1, repeat=1,
                     reference=False, gemm=False, torch=False, onnxruntime=True)
    for row in rows:
        if row["pass"] == "forward":
            assert row["ort_ms"] > 0 and row["vs_ort"] > 0
            assert row["ort_rel_err"] < 1e-5, row
        else:
            assert row["ort_ms"] is None and row["vs_ort"] is None
    assert "ORT ms" in format_table(rows)


def test_onnxruntime_off_by_default_and_missing_is_an_error(monkeypatch):
    rows = run_suite([TINY], threads=1, repeat=1, reference=False, gemm=False, torch=False)
    assert all(r["ort_ms"] is None for r in rows)
    assert "ORT" not in format_table(rows)
    monkeypatch.setattr(_bench._bench_onnx, "import_onnxruntime", lambda: None)
    with pytest.raises(RuntimeError, match="onnxruntime"):
        run_suite([TINY], threads=1, repeat=1, torch=False, onnxruntime=True)
    rows = run_suite([TINY], threads=1, repeat=1, reference=False, gemm=False, torch=False,
                     onnxruntime=None)
    assert all(r["ort_ms"] is None for r in rows)


def test_cli_compare_reports_a_missing_peer(monkeypatch, capsys):
    monkeypatch.setattr(_bench._bench_onnx, "import_onnxruntime", lambda: None)
    monkeypatch.setattr(_bench, "_import_torch", lambda: None)
    monkeypatch.setattr(_bench, "SUITE", (TINY,))
    assert _bench.main(["--compare", "--only", "tiny", "--repeat", "1", "--no-reference"]) == 0
    captured = capsys.readouterr()
    assert "--compare: torch, onnx/onnxruntime not importable, left out" in captured.err
    assert "| tiny" in captured.out and "ORT" not in captured.out


def test_gemm_operands_are_not_copied():
    # scipy's f2py gemm copies operands that are not Fortran-ordered; such a
    # copy would be timed as part of "sgemm ms".
    shape = Shape("gemm", N=4, C=16, H=16, W=16, F=8, KH=3, KW=3, stride=1, pad=1)
    call = _bench.gemm_call(shape, "float32")
    call()
    tracemalloc.start()
    c = call()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    m, k, n = shape.gemm_mnk
    assert c.shape == (m, n)
    assert peak < 1.5 * c.nbytes  # the result only; B alone is 18x larger


def test_measure_memory_on_tiny_shape():
    rows = _bench.measure_memory(TINY, threads=1, batches=(2,))
    (row,) = rows
    returned = (2 * 4 * 8 * 8 + 2 * 3 * 8 * 8 + 4 * 3 * 3 * 3 + 4) * 4
    assert row["outputs_mib"] * _bench.MIB == pytest.approx(returned)
    assert row["fastconv_extra_mib"] is not None and row["reference_extra_mib"] is not None
    assert len(format_table(rows, _bench.MEMORY_COLUMNS).splitlines()) == 3


def test_cli_quick_prints_a_table(tmp_path):
    # One small shape, --quick, no reference, no torch import: a few seconds.
    # The timeout only guards against a hang.
    proc = subprocess.run(
        [sys.executable, "-m", "fastconv", "bench", "--only", "lenet-mnist", "--quick",
         "--no-reference", "--no-torch"],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 4
    assert "fastconv ms" in table[0] and "lenet-mnist" in table[2]
    assert "lenet-mnist" in proc.stderr  # progress goes to stderr


def test_scaling_table_with_batch_override(capsys):
    """--scaling --batch times the selected shape at 1 and T threads and prints both columns."""
    from fastconv import _bench

    assert _bench.main(["--only", "lenet-mnist", "--batch", "2", "--scaling", "--repeat", "1",
                        "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 1 thread ms | 2 threads ms | speedup |" in out
    lines = [line for line in out.splitlines() if line.startswith("| lenet-mnist")]
    assert len(lines) == 2 and all("| 2 |" in line for line in lines)


# --------------------------------------------------------------------------
# pooling rows

TINY_POOLS = (_bench.PoolShape("tiny-max", "max", 2, 3, 9, 8, 3, 2, 1),
              _bench.PoolShape("tiny-avg", "avg", 2, 3, 8, 8, 2, 2, 0))


def test_pool_suite_shapes():
    names = [s.name for s in _bench.POOL_SUITE]
    assert names == ["maxpool-2x2-s2", "maxpool-3x3-s2-p1", "avgpool-2x2-s2"]
    assert not set(names) & set(SUITE_NAMES)
    assert all(s.input_shape == (8, 64, 112, 112) for s in _bench.POOL_SUITE)
    assert [s.output_shape for s in _bench.POOL_SUITE] == [(8, 64, 56, 56)] * 3
    arrays = TINY_POOLS[0].make_inputs("float64")
    assert arrays["x"].shape == (2, 3, 9, 8) and arrays["grad_output"].shape == (2, 3, 5, 4)


def test_run_pool_suite_on_tiny_shapes():
    rows = _bench.run_pool_suite(TINY_POOLS, threads=1, repeat=1, torch=False)
    assert [(r["shape"], r["pass"]) for r in rows] == [
        (name, p) for name in ("tiny-max", "tiny-avg") for p in ("forward", "backward", "fwd+bwd")]
    for forward, backward, total in (rows[:3], rows[3:]):
        assert total["fastconv_ms"] == pytest.approx(forward["fastconv_ms"]
                                                     + backward["fastconv_ms"])
        assert total["speedup"] == pytest.approx(total["reference_ms"] / total["fastconv_ms"])
        assert forward["rel_err"] < 1e-6 and backward["rel_err"] < 1e-6
        assert total["rel_err"] is None
    header = format_table(rows).splitlines()[0]
    assert "reference ms" in header and "speedup" in header
    assert "GFLOP/s" not in header and "sgemm" not in header


def test_select_suites_splits_names_and_rejects_unknown():
    conv, pool = _bench.select_suites(["lenet-mnist,avgpool-2x2-s2"])
    assert [s.name for s in conv] == ["lenet-mnist"]
    assert [s.name for s in pool] == ["avgpool-2x2-s2"]
    assert _bench.select_suites(None) == (SUITE, _bench.POOL_SUITE)
    with pytest.raises(ValueError, match="maxpool-2x2-s2"):
        _bench.select_suites(["maxpool-9x9"])


def test_cli_pool_rows_only(capsys):
    """--only with a pooling name prints only the pooling table."""
    assert _bench.main(["--only", "avgpool-2x2-s2", "--batch", "1", "--repeat", "1",
                        "--no-reference", "--no-torch", "--threads", "1"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3
    assert all("avgpool-2x2-s2" in line for line in table[2:])


def test_accuracy_rows_compare_every_applicable_algorithm():
    from fastconv._bench_accuracy import ACCURACY_COLUMNS, measure_accuracy

    strided = Shape("tiny-s2", N=2, C=3, H=9, W=9, F=4, KH=3, KW=3, stride=2, pad=1)
    rows = measure_accuracy([TINY, strided, TINY_DEPTHWISE], threads=2)
    assert [(r["shape"], r["pass"]) for r in rows] == [
        (name, pass_) for name in ("tiny", "tiny-s2") for pass_ in ("forward", "grad_x",
                                                                    "grad_weight")]
    tiny_forward, tiny_grad, tiny_weight, strided_forward = rows[:4]
    # 3 channels: grad_weight by the row kernel's weight gradient (auto's pick, as run)
    assert tiny_weight["auto"] == "direct" and tiny_weight["winograd_err"] < 1e-5
    assert 0 < tiny_weight["direct_err"] < 1e-5
    assert tiny_forward["auto"] == "direct" and tiny_grad["auto"] == "im2col"
    for row in (tiny_forward, tiny_grad):
        assert 0 < row["im2col_err"] < 1e-5 and 0 < row["winograd_err"] < 1e-5
        assert row["winograd_vs_im2col"] == row["winograd_err"] / row["im2col_err"]
    assert strided_forward.get("winograd_err") is None          # stride 2: not Winograd's
    assert strided_forward["direct_err"] < 1e-5
    assert "grad_x" in format_table(rows, ACCURACY_COLUMNS)


def test_accuracy_rows_of_a_strided_layer_with_winograd_phases():
    """A stride-2 layer whose backward runs its 2x2 phases by Winograd ('auto' only):
    its winograd column is auto's, its direct grad_x the pixel-row phases'."""
    from fastconv._bench_accuracy import measure_accuracy

    wide = Shape("wide-s2", N=5, C=96, H=32, W=32, F=96, KH=3, KW=3, stride=2, pad=1)
    forward, grad_x, grad_weight = measure_accuracy([wide], threads=2)
    assert forward["auto"] == "direct" and forward.get("winograd_err") is None
    for row in (grad_x, grad_weight):
        assert row["auto"] == "winograd"
        assert 0 < row["winograd_err"] < 1e-5 and 0 < row["direct_err"] < 1e-5
        assert row["winograd_vs_im2col"] < 10


def test_cli_accuracy(capsys):
    assert _bench.main(["--accuracy", "--only", "cifar-3x3", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "winograd / im2col" in out and "cifar-3x3" in out


def test_auto_algorithm_names_the_stride_phases():
    """resnet-3x3-s2's backward runs by stride phases, its 2x2 phase by Winograd."""
    shape = {s.name: s for s in _bench.SUITE}["resnet-3x3-s2"]
    assert _bench.auto_algorithm(shape, "backward") == "phases"
    assert _bench.auto_algorithm(shape, "forward") == "direct"
    stem = {s.name: s for s in _bench.SUITE}["resnet-stem"]
    assert _bench.auto_algorithm(stem, "backward") == "im2col/direct"    # 3 channels


def test_time_call_warmup_runs_untimed_calls_first(monkeypatch):
    """``warmup`` seconds of untimed calls come between the warm-up run and the timed
    ones; without it, one warm-up run and ``repeat`` timed ones."""
    monkeypatch.setattr(_bench, "SETTLE_SECONDS", 0)
    calls = []
    _bench.time_call(lambda: calls.append(1), 3)
    assert len(calls) == 4
    calls.clear()
    _bench.time_call(lambda: calls.append(1) or time.sleep(0.002), 3, warmup=0.05)
    assert len(calls) >= 4 + 10


def test_cli_warmup(capsys):
    assert _bench.main(["--only", "cifar-3x3", "--batch", "1", "--repeat", "1",
                        "--no-reference", "--no-torch", "--warmup", "0.01"]) == 0
    assert "0.01 s of untimed calls" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _bench.main(["--warmup", "-1"])
    with pytest.raises(SystemExit):
        _bench.main(["--warmup", "nan"])
