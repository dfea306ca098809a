"""Input checks and broadcasting helpers shared by the whole package (internal).

Checks on concrete values run in Python and raise ``ValueError`` at trace time; checks on traced
values use ``equinox.error_if``, which raises at run time (set ``EQX_ON_ERROR=nan`` to turn them
into NaNs where the few microseconds they cost matter, as the benchmarks do).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

try:  # equinox's runtime errors misfire under jax.ensure_compile_time_eval: step out of it
    from jax._src.config import eager_constant_folding as _eager_constant_folding
except ImportError:  # pragma: no cover - a future jax without this flag
    _eager_constant_folding = None

Array = jax.Array


def concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array if its value is known at trace time, else ``None``."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        # an array over several processes' devices: its value is not on this host (np.asarray
        # raised "Fetching value ... non-addressable devices" in every eager sample and
        # likelihood of a multi-host program); it is checked when the program runs
        return None
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return None


def renamed(value: Any, old_value: Any, name: str, old_name: str, fn: str) -> Any:
    """``value`` of the keyword ``name``, or ``old_value`` of its old name ``old_name`` with a
    ``DeprecationWarning``; both given is an error."""
    if old_value is None:
        return value
    if value is not None:
        raise ValueError(f"{fn}: give {name}= (the new name of {old_name}=), not both")
    warnings.warn(
        f"{fn}({old_name}=) is now {fn}({name}=), as in sample and integrate",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


def check_shape_tuple(shape: Any) -> Any:
    """``shape`` (a sample's ``(batch, *event)``), refusing an integer, which failed with Python's
    bare "'int' object is not iterable" (the data sets and ``GaussianMixture.sample`` take one)."""
    if isinstance(shape, (int, np.integer)):
        raise TypeError(
            f"shape is a sample's (batch, *event), a tuple: e.g. ({shape}, 2) for {shape} points "
            f"in 2-D, ({shape},) for scalars; got {shape!r}"
        )
    return shape


def as_time(t: Any, dtype: Any = None) -> Array:
    """``t`` as a floating array (integers are promoted; ``dtype`` wins when given)."""
    t = jnp.asarray(t)
    if dtype is not None:
        return t.astype(dtype)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    return t


def vector_length(n: int) -> int:
    """A power of two ``>= max(n, 16)``: the length grids are computed on and then cut, so that
    sizes share a compiled program (eager ops compile one program per shape, ~25 ms each) and
    every element runs in XLA's vector loop (a grid's numbers then do not depend on its length)."""
    return max(16, 1 << (n - 1).bit_length())


def cut(values: Array, n: int) -> Array:
    """``values[:n]`` of a grid computed on a :func:`vector_length`, on the host where the values
    are known (an eager slice compiles per length)."""
    known = concrete(values)
    return values[:n] if known is None else jnp.asarray(known[:n])


def coef_time(t: Any) -> Array:
    """``t`` as a floating array of at least float32: the dtype schedule coefficients are computed in.

    The precision policy: times and coefficients never take the data's dtype; a bfloat16 or
    float16 ``t`` is promoted to float32, float32 and float64 stay, integers become the default
    float. A weakly typed ``t`` (a Python float) stays weak.
    """
    t = as_time(t)
    wide = jnp.promote_types(t.dtype, jnp.float32)
    return t if t.dtype == wide else t.astype(wide)


def data_dtype(x: Any) -> Any:
    """The dtype of outputs shaped like ``x``: ``x``'s own if floating, else the default float."""
    dtype = jnp.result_type(x)
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.result_type(float)


def wide_dtype(dtype: Any) -> Any:
    """The dtype arithmetic on data of ``dtype`` runs in: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def widen(x: Any, *arrays: Any, out: Any = None) -> tuple:
    """``(out, x, *arrays)`` with the arrays cast to ``max(float32, out)`` for the arithmetic;
    ``out`` (default: ``data_dtype(x)``) is the dtype to return results in."""
    out = data_dtype(x) if out is None else out
    wide = wide_dtype(out)
    return (out,) + tuple(jnp.asarray(a).astype(wide) for a in (x, *arrays))


def normal(key: Array, shape: tuple[int, ...], dtype: Any = None) -> Array:
    """``N(0, I)`` of ``shape`` in ``dtype`` (default float), drawn in ``max(float32, dtype)``.

    ``jax.random.normal`` in bfloat16 inverts a bfloat16 uniform: 128 distinct values, none beyond
    2.9 (variance 0.994, fourth moment 2.88); float16 has 1024 values, none beyond 3.5. Drawn in
    float32 and rounded once, the noise is N(0, 1) up to that rounding; float32 and float64 draws
    are those of ``jax.random.normal``, bit for bit."""
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    return jax.random.normal(key, tuple(shape), wide_dtype(dtype)).astype(dtype)


def normal_like(key: Array, x: Any) -> Array:
    """``N(0, I)`` shaped like ``x``, in ``data_dtype(x)`` (see :func:`normal`)."""
    return normal(key, jnp.shape(x), data_dtype(x))


def check_time(t: Any, name: str = "t", lo: float = 0.0, hi: float = 1.0) -> Array:
    """Return ``t`` as an array after checking ``lo <= t <= hi`` (NaN fails).

    A Python ``ValueError`` when ``t`` is concrete; under ``jit`` the returned array is tied to an
    ``error_if`` check, so use it (a dropped result drops the check)."""
    value = concrete(t)  # before any jnp op: under jit, jnp.asarray(2.0) is already traced
    t = as_time(t)
    if value is not None:
        _check_range_now(value, name, lo, hi)
        return t
    return error_if(t, ~((t >= lo) & (t <= hi)), f"{name} must lie in [{lo}, {hi}]")


def _check_range_now(value: np.ndarray, name: str, lo: float | int, hi: float | int) -> None:
    bad = ~((value >= lo) & (value <= hi))  # NaN fails
    if np.any(bad):
        raise ValueError(
            f"{name} must lie in [{lo}, {hi}] (t = 0 is data, t = 1 the prior); "
            f"got {name} = {value[bad].ravel()[:4].tolist()}"
        )


def check_time_interval(t_min: Any, t_max: Any) -> None:
    """Check ``0 <= t_min < t_max <= 1`` (a time sampler's interval), eagerly or under ``jit``."""
    check_order(0.0, t_min, "0", "t_min", strict=False)
    check_order(t_min, t_max, "t_min", "t_max")
    check_order(t_max, 1.0, "t_max", "1", strict=False)


def _staged() -> Any:
    """A context that steps out of ``jax.ensure_compile_time_eval`` (equinox's runtime errors
    misfire inside it)."""
    if _eager_constant_folding is None:
        return contextlib.nullcontext()
    return _eager_constant_folding(False)


def check_known_time(t: Any, name: str = "t") -> None:
    """Raise if ``t`` is known at trace time (a constant under ``jit`` too) and outside
    ``[0, 1]``; free at run time: a traced ``t`` is left to the samplers' and losses' checks."""
    value = concrete(t)  # before any jnp op: under jit, jnp.asarray(2.0) is already traced
    if value is not None:
        _check_range_now(value, name, 0, 1)


def check_known_order(lo: Any, hi: Any, lo_name: str, hi_name: str, *, strict: bool = True) -> None:
    """:func:`check_order` where both are known at trace time; free at run time (for the inner
    functions of losses, whose drawn times are checked where they are drawn)."""
    if concrete(lo) is not None and concrete(hi) is not None:
        check_order(lo, hi, lo_name, hi_name, strict=strict)


def _invariant(bad: Any) -> Any:
    """``bad`` made the same on every device of a ``shard_map`` it varies over (``pmax`` over
    those manual axes): equinox's ``lax.cond`` needs branch types that agree, and a per-device
    flag against its error branch's plain one failed every loss, training step and sample inside
    ``shard_map(check_vma=True)`` at trace time ("cond branches must have equal output types").
    Elsewhere (plain ``jit``, eager, ``check_vma=False``) ``bad`` is returned as it is."""
    aval = jax.typeof(bad)
    axes = getattr(aval, "vma", None)  # the varying manual axes, as newer JAX names them
    if axes is None:
        axes = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    if not axes:
        return bad
    return jax.lax.pmax(bad.astype(jnp.int32), tuple(sorted(axes))) > 0


def error_if(x: Any, pred: Any, msg: str) -> Any:
    """``equinox.error_if(x, pred, msg)`` with only a scalar flag in the error branch.

    ``eqx.error_if`` routes ``x`` through a ``lax.cond`` whose error branch is a host callback; under
    ``jit`` with ``x`` sharded over several devices the partitioner then replicates ``x`` and
    everything computed from it. Here the cond carries ``any(pred)`` alone and the first floating
    leaf of ``x`` (else its first array leaf: integer labels) is tied to it by a select (NaN, or
    the integer minimum, where the check failed), so the check stays alive and ``x`` keeps its
    sharding.
    """
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(x) if _inexact(leaf)]
    leaves = leaves or [leaf for leaf in jax.tree_util.tree_leaves(x) if _array(leaf)]
    with _staged():
        bad = _invariant(jnp.any(jnp.asarray(pred)))
        if not leaves:
            return eqx.error_if(x, bad, msg)
        flag = eqx.error_if(bad, bad, msg)
    first = jnp.asarray(leaves[0])
    # NaN where the check failed; an integer (labels) takes its dtype's minimum: either way, the
    # value depends on the flag (integer labels had gone through the cond: replicated on device 0)
    if _inexact(first):
        bad_value = jnp.nan
    elif jnp.issubdtype(first.dtype, jnp.integer):
        bad_value = jnp.iinfo(first.dtype).min
    else:
        bad_value = False
    tied = jnp.where(flag, jnp.asarray(bad_value, first.dtype), first)
    return jax.tree_util.tree_map(lambda leaf: tied if leaf is leaves[0] else leaf, x)


def value_check(
    x: Any,
    bad: Callable[[Any, Any], Any],
    msg: str,
    shown: Callable[[np.ndarray], str] = lambda v: str(np.ravel(v).tolist()[:8]),
) -> Any:
    """Raise ``ValueError(msg)`` where ``bad(xp, value)`` holds, and return ``x``.

    Known at trace time, ``x`` is checked now in NumPy (``xp = np``: no XLA program per shape) and
    the message ends with ``; got {shown(value)}``; traced, it is checked when the program runs
    (``xp = jnp``, through :func:`error_if` threaded into the returned ``x``). (``_engine.grid_check``
    does the same for checks that call a path's or a user's functions, which need ``jnp``.)
    """
    v = concrete(x)
    if v is None:
        return error_if(x, bad(jnp, x), msg)
    if bad(np, v):
        raise ValueError(f"{msg}; got {shown(v)}")
    return x


def _array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray)


def _inexact(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray) and jnp.issubdtype(leaf.dtype, jnp.inexact)


def check_finite(x: Any, name: str, into: Any = None) -> Any:
    """Raise if any leaf of ``x`` holds a NaN or an infinity; return ``x``, or ``into`` with the
    run-time check tied to it (under ``jit``, a check tied to a value nothing reads is dropped:
    tie it to an output, e.g. the loss). Leaves that are not floating are not checked."""
    out = x if into is None else into
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(x) if _floating_leaf(leaf)]
    if not leaves:  # nothing to check: x (and its sharding) untouched
        return out
    values = [concrete(leaf) for leaf in leaves]
    msg = f"{name} contains non-finite values (NaN or inf)"
    if all(v is not None for v in values):
        if any(not np.all(np.isfinite(v)) for v in values):
            raise ValueError(msg)
        return out
    bad = jnp.array(False)
    for leaf in leaves:
        bad = bad | ~jnp.all(jnp.isfinite(leaf))
    return error_if(out, bad, msg)


def _floating_leaf(leaf: Any) -> bool:
    """An inexact leaf: a Python float or complex, or an array of an inexact dtype, bfloat16
    included (NumPy's ``issubdtype`` misses it)."""
    if isinstance(leaf, float | complex):
        return True
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def expand_like(coef: Array, x: Array, name: str = "t") -> Array:
    """Right-pad ``coef`` (shaped like ``t``) with unit axes so it broadcasts against ``x``.

    ``t`` is a scalar or has a shape that broadcasts to a prefix of ``x.shape``: per-sample times
    of shape ``(batch,)`` multiply ``x`` of shape ``(batch, *event)``.
    """
    coef = jnp.asarray(coef)
    x_shape = jnp.shape(x)
    if coef.ndim > len(x_shape) or not _broadcastable(coef.shape, x_shape[: coef.ndim]):
        raise ValueError(
            f"{name} has shape {coef.shape}; expected a scalar or a shape that broadcasts to a "
            f"prefix of x's shape {tuple(x_shape)}"
            + ("" if name == "t" else " (one per sample; one per coordinate: (1, *event))")
        )
    return coef.reshape(coef.shape + (1,) * (len(x_shape) - coef.ndim))


def _broadcastable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return all(i == j or i == 1 for i, j in zip(a, b, strict=True))


def check_same_shape(value: Any, x: Any, what: str) -> None:
    """Raise unless ``value`` and ``x`` have the same shape (shapes are static: trace time)."""
    if jnp.shape(value) != jnp.shape(x):
        raise ValueError(
            f"{what} has shape {tuple(jnp.shape(value))} but x has shape {tuple(jnp.shape(x))}; "
            "they must match"
        )


def check_count(value: Any, name: str, *, minimum: int = 1, what: str = "") -> int:
    """``value`` as a Python ``int`` >= ``minimum`` (a number of steps, bins, points: static under
    ``jit``). Integral floats such as ``3.0`` pass; bools, fractions, strings and traced values
    do not. ``what`` is said in the error after the name (e.g. "a number of points")."""
    try:
        ok = not isinstance(value, bool) and np.dtype(getattr(value, "dtype", int)).kind != "b"
        ok = ok and int(value) == value and int(value) >= minimum
    except (TypeError, ValueError, OverflowError):  # a string, None, inf, an array, a traced value
        ok = False
    if not ok:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        note = f" ({what})" if what else ""
        if isinstance(value, jax.core.Tracer):  # a shape or a loop length: it cannot be traced
            note += " known at trace time (pass it as a static argument under jit)"
        raise ValueError(f"{name} must be {kind}{note}; got {value!r}")
    return int(value)


def check_positive(value: Any, name: str, *, strict: bool = True) -> Any:
    """Check that ``value`` is finite and (strictly) positive; return it.

    A Python ``ValueError`` when ``value`` is concrete. A traced ``value`` comes back as a floating
    array tied to an ``error_if`` check: use the returned value, or the check vanishes under ``jit``.
    """
    kind = "> 0" if strict else ">= 0"
    v = concrete(value)
    if v is None:
        x = _floating(value)
        ok = jnp.isfinite(x) & ((x > 0) if strict else (x >= 0))
        return tie_check(x, ~ok, f"{name} must be finite and {kind}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite; got {name} = {v.tolist()}")
    if (strict and np.any(v <= 0)) or (not strict and np.any(v < 0)):
        raise ValueError(f"{name} must be {kind}; got {name} = {v.tolist()}")
    return value


def check_order(lo: Any, hi: Any, lo_name: str, hi_name: str, *, strict: bool = True) -> Any:
    """Check ``lo < hi`` (or ``<=`` when not strict; NaN fails); return ``(lo, hi)``.

    A Python ``ValueError`` when both are concrete; traced values come back tied to an
    ``error_if`` check (see :func:`check_positive`)."""
    op = "<" if strict else "<="
    a, b = concrete(lo), concrete(hi)
    if a is None or b is None:
        x, y = _floating(lo), _floating(hi)
        ok = (x < y) if strict else (x <= y)
        return tie_check((x, y), ~ok, f"expected {lo_name} {op} {hi_name}")
    if (strict and np.any(a >= b)) or (not strict and np.any(a > b)) or np.any(np.isnan(a - b)):
        raise ValueError(
            f"expected {lo_name} {op} {hi_name}; got {lo_name} = {a.tolist()}, "
            f"{hi_name} = {b.tolist()}"
        )
    return lo, hi


def _floating(value: Any) -> Array:
    value = jnp.asarray(value)
    return value if jnp.issubdtype(value.dtype, jnp.inexact) else value.astype(float)


def tie_check(values: Any, bad: Any, msg: str) -> Any:
    """Tie every floating array leaf of ``values`` to one ``error_if`` check on ``any(bad)``.

    Each leaf comes back NaN where the check failed (and the check raises), so any later use of any
    leaf keeps the check alive under ``jit``; derivatives pass through. For parameters checked
    once, where a path or a schedule is built (not on hot paths)."""
    with _staged():  # under ensure_compile_time_eval (sample's grid) the check misfired
        bad = _invariant(jnp.any(jnp.asarray(bad)))
        flag = eqx.error_if(bad, bad, msg)
        leaves = jax.tree_util.tree_leaves(values)
        if not any(_inexact(leaf) for leaf in leaves):
            return eqx.error_if(values, bad, msg)

    def tie(leaf):
        if not _inexact(leaf):
            return leaf
        return jnp.where(flag, jnp.asarray(jnp.nan, leaf.dtype), leaf)

    return jax.tree_util.tree_map(tie, values)


def safe_sqrt(value: Any) -> Array:
    """``sqrt(max(value, 0))`` whose derivative is 0 (not ``inf * 0 = NaN``) where ``value <= 0``.

    ``sigma_0 = sqrt(1 - alpha_0^2) = 0`` whatever a schedule's parameters are, so its derivative
    with respect to them is 0; ``jnp.sqrt``'s infinite slope at 0 times that 0 made every gradient
    of a sampler ending at ``t = 0`` NaN. A NaN ``value`` stays NaN."""
    value = jnp.asarray(value)
    zero = value <= 0
    return jnp.where(zero, jnp.zeros_like(value), jnp.sqrt(jnp.where(zero, 1.0, value)))


def refuse_known_time(t: Any, coef: Callable, bad: Callable, what: str) -> None:
    """Refuse a ``t`` known at trace time where ``bad(coef(t))`` (an end of the bridge, sigma = 0),
    naming the offending times; a traced ``t`` (or a traced coefficient) is not checked."""
    known = concrete(t)
    if known is None:
        return
    with jax.ensure_compile_time_eval():
        value = concrete(coef(known))
    if value is None:
        return
    mask = np.broadcast_to(bad(np.asarray(value)), np.shape(known))
    if np.any(mask):
        raise ValueError(
            f"{what} at t = {np.asarray(known)[mask].ravel()[:4].tolist()}; take t inside (0, 1)"
        )
