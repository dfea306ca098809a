"""The public API keeps the project's conventions: every module's ``__all__`` names something that
exists, and every public function or class has a docstring; public functions annotate every named
parameter and their return value, with annotations that resolve (``typing.get_type_hints``; names
imported only for type checkers are looked up among ``jaxdiff``'s own)."""

import importlib
import inspect
import pkgutil
import typing

import jaxdiff


def _public_modules():
    for info in pkgutil.walk_packages(jaxdiff.__path__, "jaxdiff."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            module = importlib.import_module(info.name)
            if hasattr(module, "__all__"):  # the CLI's and run folders' modules have none
                yield module


def test_public_names_exist_have_docstrings_and_type_hints():
    modules = [jaxdiff, *_public_modules()]
    assert {m.__name__ for m in modules} >= {"jaxdiff.samplers", "jaxdiff.nets", "jaxdiff.losses"}
    problems, checked = [], 0
    for module in modules:
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.__all__ names a missing {name!r}"
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            checked += 1
            where = f"{module.__name__}.{name}"
            if not inspect.getdoc(obj):
                problems.append(f"{where}: no docstring")
            if inspect.isfunction(obj):
                sig = inspect.signature(obj)
                named = (p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))  # fmt: skip
                missing = [p.name for p in named if p.annotation is inspect.Parameter.empty]
                if missing:
                    problems.append(f"{where}: parameters without a type hint: {missing}")
                if sig.return_annotation is inspect.Signature.empty:
                    problems.append(f"{where}: no return type hint")
                try:
                    typing.get_type_hints(obj, localns=vars(jaxdiff))
                except Exception as e:  # a misspelt or missing name in an annotation
                    problems.append(f"{where}: annotations do not resolve: {e!r}")
    assert checked > 300, checked  # measured: 391 public functions and classes in 51 modules
    assert not problems, "\n".join(problems)
