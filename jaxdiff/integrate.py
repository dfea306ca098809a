"""``integrate``: ODE and SDE solves with diffrax solvers, on a fixed grid or with adaptive steps.

``integrate`` solves ``dx = drift(x, t) dt + diffusion(x, t) dw`` (diagonal noise, or none) from
``t_start`` to ``t_end`` with any diffrax solver; ``jaxdiff.sample`` builds on it.

Two engines, chosen by the arguments:

* **Fixed grid** (``steps`` or ``ts``; the default): a ``lax.scan`` over the grid whose body is the
  diffrax solver's own ``step``. This is exactly a hand-written scan of the solver's update, so it
  runs at scan speed and compiles in the time a scan does (``diffeqsolve``'s ``while_loop``
  compiles 3-4x slower and adds a little bookkeeping per step); it is the same engine
  (``jaxdiff._engine.scan``) as every sampler of ``jaxdiff.samplers``. Noise comes from one key per step,
  split from ``key`` before the scan and fed through it (what a hand-written scan does): no tree
  search (``VirtualBrownianTree`` costs 3-8x at run time), no per-step key derivation
  (``UnsafeBrownianPath`` folds each step's times into the key, which costs 1.7x at batch 1 on
  CPU), and nothing stored. Only the final state is carried unless ``save_ts`` asks for more, so
  peak memory does not grow with the number of steps. Reverse-mode gradients store one state per
  step and recompute each step (``jax.checkpoint``); ``adjoint`` is for adaptive solves only.
* **Adaptive** (``rtol``/``atol`` given): ``diffrax.diffeqsolve`` with a ``PIDController``,
  ``VirtualBrownianTree`` for SDEs (adaptive steps need a path that can be queried anywhere), and
  ``adjoint`` passed through (default ``RecursiveCheckpointAdjoint``; ``BacksolveAdjoint`` for
  O(1)-memory gradients of ODEs).

Time may run either way; internally both engines integrate in ``tau = sign * t`` so that time
increases, which is what Brownian paths require. Errors of the solve (``max_steps`` reached, a
non-finite state) are raised through ``equinox.error_if``; set ``EQX_ON_ERROR=nan`` before
importing to turn them into NaNs when timing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff import _diffrax, _engine
from jaxdiff._checks import (
    as_time,
    check_count,
    check_finite,
    concrete,
    error_if,
    value_check,
    wide_dtype,
)

Array = jax.Array
PyTree = Any  # for ODEs the state may be any pytree of arrays, e.g. ``(x, logp)``
Drift = Callable[[Array, Array], Array]

__all__ = ["Solution", "integrate"]


class Solution(NamedTuple):
    """Result of ``integrate`` / ``sample``.

    ``x``: the state at ``t_end``; ``ts``/``xs``: the times asked for in ``save_ts`` and the states
    there (leading axis ``len(save_ts)``, in the order given), or ``None`` (``save_ts``: points of
    the grid on a fixed grid; any times between ``t_start`` and ``t_end`` when adaptive);
    ``nfe``: number of evaluations of the drift (the network); ``num_steps``: solver steps taken
    (rejected ones included).
    """

    x: Array | PyTree
    ts: Array | None
    xs: Array | PyTree | None
    nfe: Array
    num_steps: Array


def integrate(
    drift: Drift,
    x: ArrayLike | PyTree,
    *,
    ts: ArrayLike | None = None,
    t_start: ArrayLike | None = None,
    t_end: ArrayLike | None = None,
    steps: int | None = None,
    diffusion: Callable[[Array, Array], Array] | None = None,
    key: Array | None = None,
    solver: diffrax.AbstractSolver | None = None,
    save_ts: ArrayLike | None = None,
    rtol: ArrayLike | None = None,
    atol: ArrayLike | None = None,
    max_steps: int = 4096,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> Solution:
    """Solve ``dx = drift(x, t) dt + diffusion(x, t) dw`` from ``t_start`` to ``t_end``.

    ``drift(x, t)`` returns an array shaped like ``x``; ``diffusion(x, t)`` (``None`` for an ODE)
    returns an array that broadcasts to ``x`` (independent noise per coordinate). ``t`` reaches
    both as a scalar. The grid is ``ts`` or ``steps`` uniform steps; with ``rtol``/``atol`` the
    step is adaptive, starting from ``(t_end - t_start) / steps``. ``solver`` is any diffrax
    solver (default ``diffrax.Euler()``: Euler, or Euler--Maruyama for an SDE). For an ODE, ``x``
    may be a pytree of arrays (``drift`` returns the same structure), e.g. ``(x, logp)``.

    >>> import jax.numpy as jnp
    >>> sol = integrate(lambda x, t: -x, jnp.ones(3), t_start=0.0, t_end=1.0, steps=1000)
    >>> round(float(sol.x[0]), 3), int(sol.nfe)  # exp(-1)
    (0.368, 1000)
    """
    solver = diffrax.Euler() if solver is None else solver
    x = check_finite(jax.tree.map(jnp.asarray, x), "the initial state x")
    dtypes = jax.tree.map(lambda v: v.dtype, x)
    if any(_half(d) for d in jax.tree.leaves(dtypes)):  # solved in float32, returned as given
        # (a bfloat16 state rounded every Euler update of 1e-3 x away: x(1) = 1 for exp(-1))
        def narrow(y):
            return jax.tree.map(lambda v, d: v.astype(d) if _half(d) else v, y, dtypes)

        sol = integrate(
            lambda y, t: drift(narrow(y), t),
            jax.tree.map(lambda v: v.astype(wide_dtype(v.dtype)) if _half(v.dtype) else v, x),
            ts=ts, t_start=t_start, t_end=t_end, steps=steps,
            diffusion=None if diffusion is None else lambda y, t: diffusion(narrow(y), t),
            key=key, solver=solver, save_ts=save_ts, rtol=rtol, atol=atol, max_steps=max_steps,
            adjoint=adjoint,
        )  # fmt: skip
        return sol._replace(x=narrow(sol.x), xs=None if sol.xs is None else narrow(sol.xs))
    if diffusion is not None and key is None:
        raise ValueError("an SDE (diffusion is not None) needs a PRNG key")
    if diffusion is not None and not isinstance(x, jax.Array):
        raise ValueError("an SDE's state must be a single array; pytree states are for ODEs")
    adaptive = rtol is not None or atol is not None
    if adaptive:
        rtol, atol = check_tolerances(solver, rtol, atol)
        max_steps = check_count(max_steps, "max_steps")
    elif adjoint is not None:
        raise ValueError(
            "adjoint applies to adaptive solves (rtol/atol); fixed grids differentiate through "
            "the checkpointed scan, storing one state per step"
        )
    if adaptive and steps is None and ts is None:
        steps = 100  # only sets the first trial step
    grid = _grid(ts, t_start, t_end, steps)
    # the state's precision (at least float32), not the grid's: under x64 a float64 grid made
    # diffrax's stages float64 and a float32 state failed (the grid's dtype is not the user's)
    grid = grid.astype(jnp.result_type(*jax.tree.leaves(x), jnp.float32))
    sign = jnp.sign(grid[-1] - grid[0])

    if adaptive:
        return _adaptive(
            drift, diffusion, x, key, solver, sign, sign * grid, save_ts, rtol, atol, max_steps,
            adjoint,
        )  # fmt: skip

    n_steps = grid.shape[0] - 1
    stepper = _diffrax.Stepper(solver, drift, diffusion, sign)
    keys = None if diffusion is None else jax.random.split(key, n_steps)
    init_calls, step_calls = _diffrax.evaluations(solver, diffusion is not None)

    def step(k, state, t, s):
        return stepper.step(k, state[0], state[1], t, s)

    state0 = (x, stepper.init(x, grid[0], grid[1]))
    save_ts = _engine.as_save_ts(save_ts, grid.dtype)
    buf, slots = _engine.start_buffer(grid, save_ts, x)
    (y, _), xs = _engine.scan(
        step, state0, grid, keys, get_x=lambda st: st[0], buffer=buf, slots=slots
    )
    y = check_finite(y, "the solution (check the field, the time range and the step size)")
    nfe = jnp.asarray(init_calls + step_calls * n_steps)
    return Solution(y, save_ts, xs, nfe, jnp.asarray(n_steps))


def _half(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and wide_dtype(dtype) != dtype


def _grid(ts, t_start, t_end, steps) -> Array:
    if ts is not None:
        if steps is not None or t_start is not None or t_end is not None:
            raise ValueError("give either ts, or t_start, t_end and steps, not both")
        return _engine.check_grid(ts)
    if t_start is None or t_end is None or steps is None:
        raise ValueError("give either ts, or t_start, t_end and steps")
    steps = check_count(steps, "steps")
    t0, t1 = as_time(t_start), as_time(t_end)
    return _engine.check_grid(jnp.linspace(t0, t1, steps + 1), "the grid t_start -> t_end")


def check_tolerances(
    solver: diffrax.AbstractSolver, rtol: Any, atol: Any, stochastic: bool = False
) -> tuple[Any, Any]:
    """Raise unless ``solver`` has an error estimate (for an SDE, one with a strong order: Heun,
    SPaRK, Midpoint) and ``rtol``/``atol`` are valid tolerances; return ``(rtol, atol)``. Traced
    tolerances come back tied to run-time checks (use them: a traced ``rtol = -1`` solved
    silently)."""
    name = type(solver).__name__
    if stochastic and isinstance(solver, diffrax.AbstractAdaptiveSolver):
        if solver.strong_order(None) is None:  # Tsit5, Dopri5: diffrax failed inside the solve
            raise ValueError(
                f"rtol/atol on an SDE need a solver with a strong order; {name} has none "
                "(an ODE solver): use diffrax.Heun() or SPaRK() (or drop rtol/atol)"
            )
    if not isinstance(solver, diffrax.AbstractAdaptiveSolver):
        use = "Heun() or SPaRK()" if stochastic else "Tsit5(), Dopri5() or Heun()"
        raise ValueError(
            f"rtol/atol ask for adaptive steps, but {name} has no error estimate; use "
            f"diffrax.{use} (or drop rtol/atol)"
        )
    checked = []
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None:
            value = value_check(
                value,
                lambda xp, v: ~xp.all(xp.isfinite(v) & (v >= 0)),
                f"{name} must be a finite number >= 0",
                shown=lambda v, name=name: f"{name} = {v}",
            )
        checked.append(value)
    rtol, atol = checked
    r, a = concrete(rtol), concrete(atol)
    msg = "rtol and atol cannot both be 0 (no step would ever be accepted)"
    if r is not None and a is not None:
        if r == 0 and a == 0:
            raise ValueError(msg)
    elif rtol is not None and atol is not None:  # one of them traced: tied to that one
        both_zero = (jnp.asarray(rtol) == 0) & (jnp.asarray(atol) == 0)
        if r is None:
            rtol = error_if(rtol, both_zero, msg)
        else:
            atol = error_if(atol, both_zero, msg)
    return rtol, atol


def _adaptive(
    drift, diffusion, x, key, solver, sign, taus, save_ts, rtol, atol, max_steps, adjoint
):
    tau0, tau1 = taus[0], taus[-1]
    dt0 = taus[1] - taus[0]
    bm = None
    if diffusion is not None:
        bm = diffrax.VirtualBrownianTree(
            tau0, tau1, tol=jnp.abs(dt0) / 16, shape=x.shape, key=key,
            levy_area=_diffrax.levy_area(solver),
        )  # fmt: skip
    terms = _diffrax.terms(drift, diffusion, sign, bm)
    # Closed-over arrays (network parameters) become explicit ``args``, as BacksolveAdjoint's
    # custom VJP requires; the converted drift evaluates the same jaxpr.
    converted = eqx.filter_closure_convert(
        lambda y, tau: jax.tree.map(lambda v: sign * v, drift(y, sign * tau)), x, tau0
    )
    ode = diffrax.ODETerm(lambda tau, y, args: args(y, tau))
    solve_terms = ode if diffusion is None else diffrax.MultiTerm(ode, terms.terms[1])
    controller = diffrax.PIDController(
        rtol=1e-3 if rtol is None else rtol, atol=1e-6 if atol is None else atol
    )
    save_ts = _engine.as_save_ts(save_ts, taus.dtype)
    order = None
    if save_ts is not None:  # diffrax wants them in the integration's direction, inside the run
        n_save = save_ts.shape[0]

        def outside(xp, v):  # v: the save_ts, then the run's two ends in t
            s, a, b = v[:n_save], v[n_save], v[n_save + 1]
            return (s < xp.minimum(a, b)) | (s > xp.maximum(a, b))

        both = value_check(
            jnp.concatenate([save_ts, sign * jnp.stack([tau0, tau1])]),
            lambda xp, v: xp.any(outside(xp, v)),
            "every time in save_ts must lie between t_start and t_end",
            shown=lambda v: (
                f"{v[:n_save][outside(np, v)].tolist()[:4]} outside {v[n_save:].tolist()}"
            ),
        )
        save_ts = both[:n_save]
        order = jnp.argsort(sign * save_ts)  # saved in time order, returned in the given order
    saveat = diffrax.SaveAt(t1=True, ts=None if save_ts is None else sign * save_ts[order])
    kwargs = {} if adjoint is None else {"adjoint": adjoint}
    sol = diffrax.diffeqsolve(
        solve_terms,
        solver,
        tau0,
        tau1,
        dt0,
        x,
        args=converted,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=False,
        **kwargs,
    )
    init_calls, step_calls = _diffrax.evaluations(solver, diffusion is not None)
    y = error_if(
        jax.tree.map(lambda v: v[-1], sol.ys),
        sol.result != diffrax.RESULTS.successful,
        "the adaptive solve did not finish: raise max_steps or loosen rtol/atol",
    )
    y = check_finite(y, "the solution (check the field, the time range and the tolerances)")
    n = sol.stats["num_steps"]
    undo = None if order is None else jnp.argsort(order)
    xs = None if save_ts is None else jax.tree.map(lambda v: v[:-1][undo], sol.ys)
    return Solution(y, save_ts, xs, init_calls + step_calls * n, n)
