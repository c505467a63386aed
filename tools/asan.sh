#!/usr/bin/env bash
# AddressSanitizer run of the test suite.
#
#   bash tools/asan.sh [pytest arguments]     # e.g. bash tools/asan.sh -x tests/test_fuzz.py
#
# 1. rebuilds the extensions in place with FASTCONV_SANITIZE=address
#    (-fsanitize=address -fno-omit-frame-pointer -g), with the python on PATH
#    (an editable install, `pip install -e ".[test]"`, picks them up);
# 2. runs pytest with libasan preloaded (CPython itself is not instrumented, so the
#    runtime must come first) and these ASAN_OPTIONS:
#      detect_leaks=0              CPython keeps its objects until exit: "leaks" by design
#      allocator_may_return_null=1 a failed or too-large malloc returns NULL, so NumPy raises
#                                  MemoryError as it does without ASan (the tests check it)
#      abort_on_error=1            an ASan report ends the run with SIGABRT
#    Extra options can be appended through ASAN_OPTIONS in the environment;
# 3. rebuilds the regular extensions (an ASan build cannot be imported without the
#    preloaded runtime), unless FASTCONV_ASAN_KEEP=1.
#
# Exit status: pytest's (nonzero on an ASan report). Takes ~6 minutes on 2 cores:
# two full builds (~2 minutes each) and the suite (~2 minutes under ASan).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python}"
libasan="$(gcc -print-file-name=libasan.so)"
if [[ ! -f "$libasan" ]]; then
    echo "asan.sh: gcc has no libasan.so (got '$libasan'); install libasan for your gcc" >&2
    exit 2
fi

restore() {
    if [[ "${FASTCONV_ASAN_KEEP:-0}" != "1" ]]; then
        echo "=== asan.sh: rebuilding the regular extensions"
        "$python" setup.py -q build_ext --inplace >/dev/null
    fi
}
trap restore EXIT

echo "=== asan.sh: building with FASTCONV_SANITIZE=address"
FASTCONV_SANITIZE=address "$python" setup.py -q build_ext --inplace >/dev/null
for so in fastconv/_*.so; do      # a silently uninstrumented build would prove nothing
    if ! grep -q __asan_init "$so"; then
        echo "asan.sh: $so is not instrumented" >&2
        exit 2
    fi
done

echo "=== asan.sh: pytest with $libasan preloaded"
options="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1"
export ASAN_OPTIONS="$options${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
LD_PRELOAD="$libasan" "$python" -m pytest "$@"
