"""Bad-argument fuzzing of every public function, run in child processes.

The cases (``tests/_fuzz_cases.py``) call every public function and layer method
with one argument replaced by a bad value: wrong types, wrong shapes and ndim,
unsupported dtypes, bools and floats (NaN, inf) where ints belong, zero, negative
and huge sizes, kernels larger than the input, bad ``out`` and ``indices``,
mismatched gradients. Each must raise ValueError or TypeError whose message
names the argument. Extreme but valid values (sizes up to 2**31 - 1, inputs
broadcast to petabytes) must return, or raise MemoryError or a named error.

The cases run in child processes, so that a segfault or a hang fails a test
that names the case instead of killing pytest; a crashed child is replaced by a
new one that continues after the crashing case.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
from _fuzz_cases import CASE_TIMEOUT, SEED, SELF_TEST_CASES, build_cases, names_argument

TESTS = pathlib.Path(__file__).parent
CASES = build_cases(SEED)
N_BATCHES = 4


def run_cases(seed: int, start: int, stop: int, case_timeout: float = CASE_TIMEOUT) -> dict:
    """Run cases [start, stop) in child processes: {index: record}.

    A record is what the child reported (``raised``/``returned``), or
    ``{"crashed": ...}`` with the exit status and the end of its stderr when
    the child died inside the case (``exit=1`` after a faulthandler
    "Timeout" is a hang).
    """
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import _fuzz_cases; "
            f"_fuzz_cases.worker({seed}, int(sys.argv[1]), {stop}, {case_timeout})")
    records: dict = {}
    next_index = start
    while next_index < stop:
        # outside the repository, so the child imports the installed fastconv
        proc = subprocess.Popen([sys.executable, "-c", code, str(next_index)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tempfile.gettempdir(), env=dict(os.environ))
        try:
            stdout, stderr = proc.communicate(timeout=case_timeout * 4 + 60 * (stop - start))
        except subprocess.TimeoutExpired:    # the per-case watchdog failed: stop it here
            proc.kill()
            stdout, stderr = proc.communicate()
        started = None
        for line in stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                records[record.pop("done")] = record
                started = None
        if started is None:
            if proc.returncode != 0:            # died between cases, or at start-up
                raise AssertionError(f"fuzz worker exited with {proc.returncode}:\n{stderr}")
            break
        records[started] = {"crashed": proc.returncode, "stderr": stderr[-3000:]}
        next_index = started + 1
    return records


def judge(case, record) -> str | None:
    """Why the record is a failure of ``case``, or None when it passes."""
    if record is None:
        return "never ran"
    if "crashed" in record:
        hang = "Timeout (" in record["stderr"]
        return (f"{'hung' if hang else 'crashed'} (exit status {record['crashed']}):\n"
                f"{record['stderr']}")
    if case.extreme:
        if "returned" in record:
            return None if record["finite"] else f"returned non-finite values {record}"
        if record["memory_error"]:
            return None
    elif "returned" in record:
        return f"returned a {record['returned']} with shapes {record['shapes']}"
    if not record["value_or_type_error"]:
        return f"raised {record['raised']} (not ValueError/TypeError): {record['message']}"
    if not names_argument(record["message"], case.names):
        return f"raised {record['raised']} that names none of {case.names}: {record['message']}"
    return None


def _failures(cases, records, offset=0) -> list[str]:
    failures = []
    for index, case in enumerate(cases):
        reason = judge(case, records.get(index + offset))
        if reason:
            failures.append(f"[{index + offset}] {case.function}({case.argument}={case.label}): "
                            f"{reason}")
    return failures


def test_the_cases_cover_every_public_function():
    import fastconv
    covered = {case.function.split(".")[0] for case in CASES}
    public = set(fastconv.__all__) - {"reference"}
    assert public <= covered, sorted(public - covered)
    assert len(CASES) >= 300


@pytest.mark.parametrize("batch", range(N_BATCHES))
def test_bad_arguments_raise_named_errors(batch):
    size = -(-len(CASES) // N_BATCHES)
    start, stop = batch * size, min((batch + 1) * size, len(CASES))
    records = run_cases(SEED, start, stop)
    failures = _failures(CASES[start:stop], records, offset=start)
    assert not failures, f"{len(failures)} of {stop - start} cases failed:\n" + "\n".join(
        failures[:40])


def test_the_harness_catches_crashes_hangs_and_wrong_errors():
    """The self-test cases: one passes, the others fail, each in its own way."""
    records = run_cases(-1, 0, len(SELF_TEST_CASES), case_timeout=2.0)
    reasons = [judge(case, records.get(i)) for i, case in enumerate(SELF_TEST_CASES)]
    assert reasons[0] is None                                   # a named ValueError
    assert reasons[1].startswith("returned a int")
    assert reasons[2].startswith("crashed (exit status ")       # SIGSEGV (ASan: its exit)
    assert "names none of ('x',)" in reasons[3]
    assert reasons[4].startswith("raised OverflowError (not ValueError/TypeError)")
    assert reasons[5].startswith("hung")
    assert reasons[6] is None                                   # the next child went on
