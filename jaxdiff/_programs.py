"""Compiled programs reused across eager calls (internal).

``jd.sample`` called eagerly jits a fresh closure each time (the grid, the path and the sampler
are its constants), so ``jax.jit``'s cache, keyed on the function object, never hits: every call
compiled its program again (~0.6 s of a 0.7 s call for a mixture oracle on CPU). ``run_jit``
traces and lowers as before, then keys the compiled program on the lowered text (without
debug locations), the arguments' tree and their shardings and the default device: a call that lowers to the same text
runs the program compiled for it. Closed-over arrays (a field's constants) are part of the text,
so new values are a new program, never a stale one. Runtime checks (``equinox.error_if``, in
its default ``raise`` mode) are host callbacks whose function is fixed by their messages: the key
holds the messages, so a program of the same text and checks is reused. Not cached: programs with
other host callbacks (``pure_callback``, ``io_callback``, ``jax.debug.print``: the text names a
callback by its index, not by the Python function it calls), programs whose text exceeds 4M
characters (large closed-over arrays, which the cache would keep alive), and programs whose
lowering passes constants as arguments (so JAX internals changing can only turn the cache off).
The key also holds the inputs jit kept (it drops unused ones from the text: a field reading live
or EMA weights by a flag prints the same text) and the input and output types (weak types are
not in the text). Calls inside a trace, under ``jax.disable_jit()`` or with ``jax_debug_nans`` /
``jax_debug_infs`` (which re-run a failing program op by op) take ``jax.jit``'s own path.
``jax.clear_caches()`` does not reach the kept programs; :func:`clear` does.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["run_jit", "clear"]

_MAX = 16  # programs kept (least recently used first out); each holds its constants
_cache: OrderedDict[Any, Any] = OrderedDict()
_MAX_TEXT = 1 << 22  # longer: large constants (a sampling program of the 35.7M U-Net is 0.37M)
_HOST = ("callback", "stablehlo.send", "stablehlo.recv", "host_transfer")  # host calls


def _top_level() -> bool:
    """Whether no trace (``jit``, ``grad``, ``vmap``) is active; ``False`` if JAX cannot say."""
    try:
        from jax._src.core import trace_state_clean
    except ImportError:  # a JAX without it: no cache
        return False
    return bool(trace_state_clean())


def _uncached() -> bool:
    """Where jit's own path must run: inside a trace (``fn`` may close over tracers), and under
    ``disable_jit`` or ``debug_nans`` / ``debug_infs`` (which re-run a failing program op by op
    to name the operation)."""
    config = jax.config
    debug = config.jax_disable_jit or config.jax_debug_nans or config.jax_debug_infs
    return bool(debug) or not _top_level()


def run_jit(fn: Callable[..., Any], *args: Any) -> Any:
    """``jax.jit(fn)(*args)``, reusing an earlier call's compiled program where the lowered program
    is the same text; under an outer ``jit``, ``grad`` or ``vmap`` it is ``jax.jit(fn)(*args)``."""
    if _uncached():  # a traced argument exists only inside a trace
        return jax.jit(fn)(*args)
    jitted = jax.jit(fn)
    if not hasattr(jitted, "lower"):  # EQX_ON_ERROR=breakpoint replaces jax.jit by a wrapper
        return jitted(*args)
    leaves, tree = jax.tree.flatten(args)
    lowered = jitted.lower(*args)
    lowering = getattr(lowered, "_lowering", None)
    info = getattr(lowering, "compile_args", None)
    if getattr(lowering, "const_args", None) != [] or not isinstance(info, dict):
        return lowered.compile()(*args)  # constants outside the text, or JAX changed: no cache
    checks = _checks_of(info.get("host_callbacks"))
    if checks is None or any(info.get(name) for name in ("keepalive", "ordered_effects")):
        return lowered.compile()(*args)  # a callback's Python function is not in the text
    text = lowered.as_text(debug_info=False)
    if len(text) > _MAX_TEXT or any(word in text for word in _HOST[int(bool(checks)) :]):
        return lowered.compile()(*args)  # large constants; a callback's function is not in the text
    try:
        key = (
            hashlib.sha256(text.encode()).digest(),
            checks,
            tree,
            tuple(getattr(leaf, "sharding", None) for leaf in leaves),
            jax.config.jax_default_device,  # where uncommitted arguments run
            tuple(sorted(info["kept_var_idx"])),  # jit drops unused inputs from the text
            tuple(info["global_in_avals"]),  # weak types, which the text does not show
            tuple(info["global_out_avals"]),
        )
        hash(key)
    except (KeyError, TypeError):  # JAX internals changed: no cache
        return lowered.compile()(*args)
    compiled = _cache.pop(key, None)
    if compiled is None:
        compiled = lowered.compile()
    _cache[key] = compiled  # most recently used last
    while len(_cache) > _MAX:
        _cache.popitem(last=False)
    return compiled(*args)


def _checks_of(callbacks: Any) -> tuple | None:
    """The messages of the runtime checks (``equinox.error_if``) that are a program's only host
    callbacks, in the callbacks' order (the text's indices); ``()`` without callbacks; ``None``
    for any other callback, or a structure this code does not know (then the program is not
    cached). A check's callbacks are the same Python functions of its messages in every trace
    (equinox's ``raises`` and ``tpu_msg``, closing over ``msgs``), so two programs of the same
    text and messages behave alike; only the stack equinox keeps for ``filter_jit``'s display
    is an earlier call's."""
    if not callbacks:
        return ()
    out = []
    for callback in callbacks:
        fn = _inner(callback)
        name = getattr(fn, "__qualname__", None)
        if getattr(fn, "__module__", None) != "equinox._errors" or name not in _EQX_CHECKS:
            return None
        cells = _cells(fn)
        msgs = None if cells is None else cells.get("msgs")
        if not isinstance(msgs, (list, tuple)) or not all(isinstance(m, str) for m in msgs):
            return None
        out.append((name, tuple(msgs)))
    return tuple(out)


_EQX_CHECKS = ("_error.<locals>.raises", "_error.<locals>.tpu_msg")  # EQX_ON_ERROR=raise's


def _cells(fn: Any) -> dict | None:
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None:
        return None
    try:
        return dict(zip(code.co_freevars, (c.cell_contents for c in closure or ()), strict=True))
    except ValueError:  # an empty cell, or cells and names that do not pair
        return None


def _inner(callback: Any, depth: int = 0) -> Any:
    """The user-level function inside JAX's callback wrappers (the closure cell ``callback`` of
    ``emit_python_callback``'s and ``pure_callback_lowering``'s wrappers, then
    ``_FlatCallback.callback_func``)."""
    if depth > 4:
        return None
    inner = getattr(callback, "callback_func", None)
    if inner is not None:
        return inner
    cells = _cells(callback)
    if (
        getattr(callback, "__module__", None) == "jax._src.callback"
        and cells
        and "callback" in cells
    ):
        return _inner(cells["callback"], depth + 1)
    return callback


def clear() -> None:
    """Drop the kept programs (``jax.clear_caches()`` does not reach them)."""
    _cache.clear()
