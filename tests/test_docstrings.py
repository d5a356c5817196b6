"""Every public op and module documents itself the way PyTorch's functional docs do: a summary,
an ``Args:`` entry for every parameter of its signature, ``Returns:``, the ``backend`` choices
where there is one, and an ``Example::`` block that runs (checked here with doctest)."""
import doctest
import inspect
import re

import pytest
import torch

import capsnet_ext
from capsnet_ext import dispatch, losses, nn as capsnn

BACKEND_NAMES = ("auto", "reference", "triton", "cuda")

# Functions: (object, is one of the routing ops that dispatch to a backend).
FUNCTIONS = [
    (capsnet_ext.predict, True),
    (capsnet_ext.dynamic_routing, True),
    (capsnet_ext.capsule_routing, True),
    (capsnet_ext.squash, False),
    (capsnet_ext.margin_loss, False),
    (capsnet_ext.reconstruction_loss, False),
    (capsnet_ext.available_backends, False),
    (capsnet_ext.backend_status, False),
    (capsnet_ext.unavailable_reason, False),
    (dispatch.preload, False),
    (dispatch.select, False),
    (losses.one_hot_targets, False),
    (capsnn.build_model, False),
    (capsnn.register_model, False),
]

# Modules: their class docstring documents the constructor, ``forward`` its own call.
MODULES = [
    capsnn.RoutingCapsules,
    capsnn.PrimaryCaps,
    capsnn.CapsNet,
    capsnn.BaselineCNN,
    capsnn.DeepCapsNet,
    capsnn.MitterreiterCapsNet,
]

# Objects whose docstring must carry an example (run below).
WITH_EXAMPLES = [f for f, _ in FUNCTIONS[:9]] + [capsnn.build_model] + MODULES


def _name(obj) -> str:
    return obj.__qualname__

_SECTION = re.compile(r"^\s*(Args|Returns|Raises|Shape|Attributes|Example|Examples)\s*:+\s*$", re.M)


def _section(doc: str, name: str) -> str:
    """The text of section ``name`` (up to the next section header), or ''."""
    match = re.search(rf"^\s*{name}\s*:+\s*$", doc, re.M)
    if match is None:
        return ""
    following = _SECTION.search(doc, match.end())
    return doc[match.end():following.start() if following else len(doc)]


def _parameters(func, skip=("self",)):
    return [p.name for p in inspect.signature(func).parameters.values()
            if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _assert_documents_parameters(obj, doc: str, params, section: str = "Args") -> None:
    body = _section(doc, section)
    assert body, f"{obj.__qualname__}: no {section}: section"
    for name in params:
        # An entry starts with the name, possibly in a comma-separated group ("a, b (int): ...").
        entry = re.compile(rf"^\s*(?:\w+,\s*)*{re.escape(name)}\b[^\n]*:", re.M)
        assert entry.search(body), f"{obj.__qualname__}: parameter {name!r} is not documented in {section}:"


def _doc(obj) -> str:
    doc = inspect.getdoc(obj)
    assert doc and len(doc.splitlines()) > 3, f"{getattr(obj, '__qualname__', obj)} has no real docstring"
    return doc


@pytest.mark.parametrize("func, is_op", [pytest.param(f, op, id=_name(f)) for f, op in FUNCTIONS])
def test_function_docstring_documents_signature(func, is_op):
    doc = _doc(func)
    _assert_documents_parameters(func, doc, _parameters(func))
    assert _section(doc, "Returns").strip(), f"{func.__name__}: no Returns: section"
    if "backend" in _parameters(func):
        for name in BACKEND_NAMES:
            assert f'"{name}"' in doc, f"{func.__name__}: backend {name!r} is not described"
    if is_op:
        assert "backend" in _parameters(func)
        assert _section(doc, "Raises").strip(), f"{func.__name__}: no Raises: section"
        for error in ("TypeError", "ValueError", "BackendUnavailableError", "NotImplementedError"):
            assert error in _section(doc, "Raises"), f"{func.__name__}: {error} not documented"


@pytest.mark.parametrize("cls", MODULES, ids=_name)
def test_module_docstrings_document_constructor_and_forward(cls):
    doc = _doc(cls)
    _assert_documents_parameters(cls, doc, _parameters(cls.__init__))
    if "backend" in _parameters(cls.__init__):
        for name in BACKEND_NAMES:
            assert f'"{name}"' in doc, f"{cls.__name__}: backend {name!r} is not described"
    # forward has a docstring of its own (not torch.nn.Module's generic one).
    forward = cls.forward
    assert forward is not torch.nn.Module.forward
    assert forward.__doc__ != torch.nn.Module.forward.__doc__
    fdoc = _doc(forward)
    _assert_documents_parameters(forward, fdoc, _parameters(forward))
    assert _section(fdoc, "Returns").strip(), f"{cls.__name__}.forward: no Returns: section"
    assert "[B" in fdoc, f"{cls.__name__}.forward: no shapes"


def test_help_of_capsule_routing_is_complete():
    """The issue's complaint: help() was four lines without arguments, return or backend."""
    doc = _doc(capsnet_ext.capsule_routing)
    assert len(doc.splitlines()) > 40
    for shape in ("[B, I, Din]", "[I, J, Dout, Din]", "[B, J, Dout]", "[B, I, J]", "[J, Dout]", "[I, J]"):
        assert shape in doc
    assert "CAPSNET_EXT_BACKEND" in doc


def test_capsnet_output_fields_are_documented():
    doc = _doc(capsnn.CapsNetOutput)
    _assert_documents_parameters(capsnn.CapsNetOutput, doc, capsnn.CapsNetOutput._fields, "Attributes")


@pytest.mark.parametrize("obj", WITH_EXAMPLES, ids=_name)
def test_docstring_examples_run(obj, monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)  # "auto" means auto here
    tests = doctest.DocTestFinder(recurse=False).find(obj, obj.__qualname__, globs={})
    examples = [t for t in tests if t.examples]
    assert examples, f"{obj.__qualname__} has no example"
    assert "Example::" in obj.__doc__
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in examples:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {obj.__qualname__} failed"


# ---------------------------------------------------------------- errors name the user's argument
def test_routing_capsules_dtype_mismatch_names_the_layer_not_W():
    layer = capsnn.RoutingCapsules(3, 2, 4, 5, backend="reference")
    with pytest.raises(TypeError, match=r"u has dtype torch.float64 but the parameters of this "
                                        r"RoutingCapsules layer are torch.float32") as info:
        layer(torch.randn(2, 3, 4, dtype=torch.float64))
    assert "W " not in str(info.value)


def test_capsnet_wrong_image_size_names_x_and_input_size():
    model = capsnn.CapsNet(conv_channels=8, primary_channels=4, decoder=False)
    with pytest.raises(ValueError, match=r"CapsNet\(input_size=28, in_channels=1\) expects images x "
                                         r"of shape \[B, 1, 28, 28\], got \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))
    deep = capsnn.DeepCapsNet(caps=[4, 10], conv_channels=8, primary_channels=4, decoder=False)
    for return_coupling in (False, True):
        with pytest.raises(ValueError, match=r"DeepCapsNet\(input_size=28, .*images x"):
            deep(torch.rand(2, 1, 32, 32), return_coupling=return_coupling)
