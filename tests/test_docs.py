"""The documentation runs: doctests of the installed modules, and docstrings on the public API."""

import doctest
import inspect
import types

import pytest

import fastconv
import fastconv._functional
import fastconv._layers
import fastconv._pooling
import fastconv._transposed
import fastconv.reference


@pytest.mark.parametrize("module, has_examples", [
    (fastconv, False),                  # the package docstring has no examples
    (fastconv._functional, True),
    (fastconv._layers, True),
    (fastconv._pooling, True),
    (fastconv._transposed, True),
    (fastconv.reference, True),
], ids=lambda v: v.__name__ if isinstance(v, types.ModuleType) else str(v))
def test_doctests(module, has_examples):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False,
                             report=True)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {module.__name__}"
    if has_examples:
        assert result.attempted > 0, f"no doctests found in {module.__name__}"


def test_every_public_function_has_runnable_examples():
    """Each public function of the functional and layer modules shows an Examples section."""
    finder = doctest.DocTestFinder()
    for name in ("conv2d", "conv2d_backward", "im2col", "col2im", "Conv2D", "conv_transpose2d",
                 "conv_transpose2d_backward", "ConvTranspose2D"):
        obj = getattr(fastconv, name)
        tests = [t for t in finder.find(obj, name) if t.examples]
        assert tests, f"{name} has no doctest examples"


@pytest.mark.parametrize("name", fastconv.__all__)
def test_public_names_are_documented(name):
    obj = getattr(fastconv, name)
    doc = inspect.getdoc(obj)
    assert doc, f"fastconv.{name} has no docstring"
    if isinstance(obj, (types.ModuleType, type)):
        assert len(doc.splitlines()[0]) > 10, f"fastconv.{name}: no summary line"
    else:
        assert "Parameters" in doc, f"fastconv.{name}: docstring has no Parameters section"
    if callable(obj) and not isinstance(obj, type):
        # every parameter of the signature is described
        for parameter in inspect.signature(obj).parameters:
            assert parameter in doc, f"fastconv.{name}: parameter {parameter!r} not documented"


def test_all_lists_exactly_the_public_api():
    assert sorted(fastconv.__all__) == sorted(set(fastconv.__all__))
    for name in fastconv.__all__:
        assert hasattr(fastconv, name), name
    assert isinstance(fastconv.__version__, str)
