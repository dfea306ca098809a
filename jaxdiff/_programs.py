"""Compiled programs reused across eager calls (internal).

``jd.sample`` called eagerly jits a fresh closure each time (the grid, the path and the sampler
are its constants), so ``jax.jit``'s cache, keyed on the function object, never hits: every call
compiled its program again (~0.6 s of a 0.7 s call for a mixture oracle on CPU). ``run_jit``
traces and lowers as before, then keys the compiled program on the lowered text (without
debug locations), the arguments' tree and their shardings and the default device: a call that lowers to the same text
runs the program compiled for it. Closed-over arrays (a field's constants) are part of the text,
so new values are a new program, never a stale one. Not cached: programs with host callbacks
(``pure_callback``, ``io_callback``, ``jax.debug.print``, ``equinox.error_if``: the text names a
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
    leaves, tree = jax.tree.flatten(args)
    lowered = jax.jit(fn).lower(*args)
    lowering = getattr(lowered, "_lowering", None)
    info = getattr(lowering, "compile_args", None)
    if getattr(lowering, "const_args", None) != [] or not isinstance(info, dict):
        return lowered.compile()(*args)  # constants outside the text, or JAX changed: no cache
    if any(info.get(name) for name in ("host_callbacks", "keepalive", "ordered_effects")):
        return lowered.compile()(*args)  # a callback's Python function is not in the text
    text = lowered.as_text(debug_info=False)
    if len(text) > _MAX_TEXT or any(word in text for word in _HOST):
        return lowered.compile()(*args)  # large constants; a callback's function is not in the text
    try:
        key = (
            hashlib.sha256(text.encode()).digest(),
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


def clear() -> None:
    """Drop the kept programs (``jax.clear_caches()`` does not reach them)."""
    _cache.clear()
