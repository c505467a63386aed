"""Shared fixtures and tolerances.

pytest runs in importlib mode (pyproject.toml), which keeps tests/ off
sys.path; it is added here so test modules can import the loop oracles in
``_naive.py`` and the helpers below.
"""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)
