"""Every constructor argument LightningCLI exposes has help text.

jsonargparse reads argument descriptions from the Google-style ``Args:`` sections of a class and
its base classes (``docstring_parser``). A docstring it cannot parse (for example an argument list
wrapped over two lines) silently drops the help of *every* argument of that class, and an entry
naming several arguments (``a, b: ...``) documents none of them.
"""

from __future__ import annotations

import importlib
import inspect

import docstring_parser
import pytest

PACKAGES = ["lightning_meta.algorithms", "lightning_meta.backbones", "lightning_meta.datamodules",
            "lightning_meta.callbacks", "lightning_meta.strategies"]
OWN = ("lightning_meta", "datamodules", "callbacks")


def _public_classes():
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) and _init_is_ours(obj):
                yield pytest.param(obj, id=f"{pkg.rsplit('.', 1)[1]}.{name}")


def _init_is_ours(cls) -> bool:
    """Whether the constructor is this project's (a DataLoader subclass documents torch's arguments nowhere)."""
    owner = next(c for c in inspect.getmro(cls) if "__init__" in c.__dict__)
    return owner.__module__.split(".")[0] in OWN


def _own_bases(cls):
    return [c for c in inspect.getmro(cls) if c.__module__.split(".")[0] in OWN]


@pytest.mark.parametrize("cls", list(_public_classes()))
def test_constructor_arguments_have_parseable_help(cls):
    docs: dict[str, str] = {}
    for c in reversed(_own_bases(cls)):
        if not c.__doc__:
            continue
        try:
            parsed = docstring_parser.parse(c.__doc__, style=docstring_parser.DocstringStyle.GOOGLE)
        except docstring_parser.ParseError as e:
            pytest.fail(f"{c.__qualname__}'s docstring does not parse ({e}); LightningCLI shows no help for it")
        for p in parsed.params:
            assert "," not in p.arg_name, f"{c.__qualname__}: one Args entry per argument, not {p.arg_name!r}"
            if p.description:
                docs[p.arg_name] = p.description
    sig = inspect.signature(cls.__init__)
    params = [n for n, p in list(sig.parameters.items())[1:]
              if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    missing = [n for n in params if n not in docs]
    assert not missing, f"{cls.__name__}: no Args entry for {missing}"
