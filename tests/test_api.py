"""The public API keeps the project's conventions: every module's ``__all__`` names something that
exists; every public function, class and public method has a docstring; public functions and
methods annotate every named parameter and their return value, with annotations that resolve
(``typing.get_type_hints``; names imported only for type checkers are looked up in ``jaxdiff``)."""

import dataclasses
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


def _problems(where, obj, method=False):
    out = [] if inspect.getdoc(obj) else [f"{where}: no docstring"]
    if inspect.isfunction(obj):
        sig = inspect.signature(obj)
        named = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # fmt: skip
        missing = [p.name for p in named[int(method) :] if p.annotation is inspect.Parameter.empty]
        if missing:
            out.append(f"{where}: parameters without a type hint: {missing}")
        if sig.return_annotation is inspect.Signature.empty:
            out.append(f"{where}: no return type hint")
        try:
            typing.get_type_hints(obj, localns=vars(jaxdiff))
        except Exception as e:  # a misspelt or missing name in an annotation
            out.append(f"{where}: annotations do not resolve: {e!r}")
    return out


def test_public_names_exist_have_docstrings_and_type_hints():
    modules = [jaxdiff, *_public_modules()]
    assert {m.__name__ for m in modules} >= {"jaxdiff.samplers", "jaxdiff.nets", "jaxdiff.losses"}
    problems, checked, methods = [], 0, 0
    for module in modules:
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.__all__ names a missing {name!r}"
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            checked += 1
            problems += _problems(f"{module.__name__}.{name}", obj)
            if inspect.isclass(obj) and obj.__module__.startswith("jaxdiff"):
                fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()  # fmt: skip
                for attr, fn in vars(obj).items():  # its own public methods, not its fields
                    if inspect.isfunction(fn) and not attr.startswith("_") and attr not in fields:
                        methods += 1
                        problems += _problems(f"{module.__name__}.{name}.{attr}", fn, method=True)
    # measured: 391 public functions and classes in 51 modules, and 121 of their methods
    assert checked > 300 and methods > 100, (checked, methods)
    assert not problems, "\n".join(problems)
