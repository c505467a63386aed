"""Shared fixtures, tolerances and the hypothesis profiles.

pytest runs in importlib mode (pyproject.toml), which keeps tests/ off
sys.path; it is added here so test modules can import the loop oracles in
``_naive.py`` and the helpers below.

Hypothesis profiles (``tests/test_properties.py``), chosen with the environment
variable ``FASTCONV_HYPOTHESIS_PROFILE``:

* ``ci`` (the default): 40 examples per property test, 320 in all (~5 s on
  the 2-core development VM);
* ``long``: 1500 examples per property test, 12,000 in all (~2 minutes there),
  for a soak run before a release or after touching a kernel;
* ``dev``: 10 examples per test, for a quick look while editing.

No profile has a deadline: on a loaded 2-core VM an example's run time says
nothing about the code, and a deadline would only make the tests flaky.

Tests marked ``slow`` (real tensors past 2**31 elements, ``tests/test_huge.py``)
run only when asked for: ``pytest -m slow`` or ``FASTCONV_SLOW_TESTS=1 pytest``.
"""

import os
import pathlib
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(pathlib.Path(__file__).parent))

_PROFILE_DEFAULTS = dict(deadline=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, **_PROFILE_DEFAULTS)
settings.register_profile("long", max_examples=1500, **_PROFILE_DEFAULTS)
settings.register_profile("dev", max_examples=10, **_PROFILE_DEFAULTS)
settings.load_profile(os.environ.get("FASTCONV_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


def pytest_collection_modifyitems(config, items):
    """Skip ``slow`` tests unless ``-m`` names them or FASTCONV_SLOW_TESTS is set."""
    if "slow" in (config.getoption("-m") or "") or os.environ.get("FASTCONV_SLOW_TESTS",
                                                                   "0") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or FASTCONV_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["own", "blas"])
def gemm_kernel(request):
    """Both kernels of the Winograd GEMMs (``fastconv._blas.gemm_nn``): fastconv's own
    AVX-512 float32 kernel where the CPU runs it, and BLAS."""
    from fastconv import _blas

    own = request.param == "own"
    if own and not _blas.own_kernel_runs():
        pytest.skip("this CPU does not run the AVX-512 GEMM kernel")
    previous = _blas.use_own_kernel(own)
    yield own
    _blas.use_own_kernel(previous)
