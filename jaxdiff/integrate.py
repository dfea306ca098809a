"""``integrate``: ODE and SDE solves with diffrax solvers, on a fixed grid or with adaptive steps.

``integrate`` solves ``dx = drift(x, t) dt + diffusion(x, t) dw`` (diagonal noise, or none) from
``t_start`` to ``t_end`` with any diffrax solver; ``jaxdiff.sample`` builds on it.

Two engines, chosen by the arguments:

* **Fixed grid** (``steps`` or ``ts``; the default): a ``lax.scan`` over the grid whose body is the
  diffrax solver's own ``step``. This is exactly a hand-written scan of the solver's update, so it
  runs at scan speed and compiles in the time a scan does (``diffeqsolve``'s ``while_loop``
  compiles 3-4x slower and adds a little bookkeeping per step). Noise comes from one key per step,
  split from ``key`` before the scan and fed through it (what a hand-written scan does): no tree
  search (``VirtualBrownianTree`` costs 3-8x at run time), no per-step key derivation
  (``UnsafeBrownianPath`` folds each step's times into the key, which costs 1.7x at batch 1 on
  CPU), and nothing stored. Only the final state is carried unless ``save_ts`` asks for more, so
  peak memory does not grow with the number of steps. The scan is differentiable in reverse mode
  as it stands (wrap ``field`` in ``jax.checkpoint`` to trade compute for memory).
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
import lineax as lx
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import as_time, check_finite, concrete, error_if

Array = jax.Array
PyTree = Any  # for ODEs the state may be any pytree of arrays, e.g. ``(x, logp)``
Drift = Callable[[Array, Array], Array]

__all__ = ["Solution", "integrate"]


class Solution(NamedTuple):
    """Result of ``integrate`` / ``sample``.

    ``x``: the state at ``t_end``; ``ts``/``xs``: the times asked for in ``save_ts`` and the states
    there (leading axis ``len(save_ts)``), or ``None``; ``nfe``: number of evaluations of the
    drift (the network); ``num_steps``: solver steps taken (rejected ones included).
    """

    x: Array | PyTree
    ts: Array | None
    xs: Array | PyTree | None
    nfe: Array
    num_steps: Array


class _Counter:
    """Counts the calls of a function while it is traced (for solvers without a tableau)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)

    def calls_in(self, thunk) -> int:
        before = self.calls
        jax.eval_shape(thunk)
        return self.calls - before


def _evaluations(solver, count: _Counter, init_thunk, step_thunk) -> tuple[int, int]:
    """Drift evaluations ``(at init, per step)``: exact for explicit solvers.

    Runge--Kutta solvers loop over their stages inside one traced body, so their count comes
    from the Butcher tableau (``len(c) + 1`` stages; first-same-as-last saves one per step and
    costs one at init); other solvers (Euler, EulerHeun, ...) are counted while tracing.
    """
    tableau = getattr(solver, "tableau", None)
    if isinstance(tableau, diffrax.ButcherTableau):
        stages = len(tableau.c) + 1
        return (1, stages - 1) if tableau.fsal else (0, stages)
    if isinstance(tableau, diffrax.StochasticButcherTableau):
        skipped = 0 if tableau.ignore_stage_f is None else int(np.sum(tableau.ignore_stage_f))
        return 0, len(tableau.c) + 1 - skipped
    return count.calls_in(init_thunk), count.calls_in(step_thunk)


def _grid(ts, t_start, t_end, steps) -> Array:
    if ts is not None:
        ts = as_time(ts)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"ts must be a 1-D grid of at least 2 times; got shape {ts.shape}")
        value = concrete(ts)
        if value is not None:
            d = np.diff(value)
            if not (np.all(d > 0) or np.all(d < 0)):
                raise ValueError("ts must be strictly monotone (increasing or decreasing)")
        return ts
    if t_start is None or t_end is None or steps is None:
        raise ValueError("give either ts, or t_start, t_end and steps")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    return jnp.linspace(as_time(t_start), as_time(t_end), int(steps) + 1)


def _save_slots(grid: Array, save_ts: Array) -> Array:
    """For each grid point, the index of the save time it matches (``len(save_ts)`` if none)."""
    tol = 1e-5 * jnp.maximum(1.0, jnp.max(jnp.abs(grid)))
    match = jnp.abs(grid[:, None] - save_ts[None, :]) <= tol
    n = save_ts.shape[0]
    slots = jnp.where(match.any(axis=1), jnp.argmax(match, axis=1), n)
    missing = ~match.any(axis=0)
    msg = (
        "every time in save_ts must be a point of the fixed time grid (include it in ts, or use an "
        "adaptive solver with rtol/atol, which interpolates)"
    )
    value = concrete(missing)
    if value is not None:
        if value.any():
            raise ValueError(f"{msg}; missing: {np.asarray(save_ts)[value].tolist()[:4]}")
        return slots
    return error_if(slots, missing.any(), msg)


def _terms(drift, diffusion, sign, bm):
    ode = diffrax.ODETerm(
        lambda tau, y, args: jax.tree.map(lambda v: sign * v, drift(y, sign * tau))
    )
    if diffusion is None:
        return ode

    def noise(tau, y, args):
        return lx.DiagonalLinearOperator(jnp.broadcast_to(diffusion(y, sign * tau), y.shape))

    return diffrax.MultiTerm(ode, diffrax.ControlTerm(noise, bm))


class _StepIncrement(diffrax.AbstractBrownianPath):
    """The Brownian increment over one grid step, drawn from that step's own key.

    ``W ~ N(0, dt I)`` (and the space-time Levy areas ``H ~ N(0, dt/12 I)``,
    ``K ~ N(0, dt/720 I)`` when a stochastic Runge--Kutta solver asks for them), as in
    ``diffrax.UnsafeBrownianPath`` but with the key given rather than derived from ``t0, t1``.
    Valid for solvers that query the control once per step over the whole step, which all of
    diffrax's fixed-step SDE solvers do.
    """

    shape: jax.ShapeDtypeStruct = eqx.field(static=True)
    levy_area: type = eqx.field(static=True)
    key: Array

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del left
        dt = jnp.asarray(t1 - t0, self.shape.dtype)
        std = jnp.sqrt(dt)
        draw = lambda k, scale: scale * jax.random.normal(k, self.shape.shape, self.shape.dtype)  # noqa: E731
        if self.levy_area is diffrax.BrownianIncrement:
            w = draw(self.key, std)
            return diffrax.BrownianIncrement(dt=dt, W=w) if use_levy else w
        keys = jax.random.split(self.key, 3)
        w, h = draw(keys[0], std), draw(keys[1], std / np.sqrt(12.0))
        if not use_levy:
            return w
        if self.levy_area is diffrax.SpaceTimeLevyArea:
            return diffrax.SpaceTimeLevyArea(dt=dt, W=w, H=h)
        return diffrax.SpaceTimeTimeLevyArea(dt=dt, W=w, H=h, K=draw(keys[2], std / np.sqrt(720.0)))


def _levy_area(solver):
    """The cheapest concrete Levy area that ``solver`` accepts (ShARK, SEA, SRA1 need space-time)."""
    needed = getattr(solver, "minimal_levy_area", None)
    for area in (
        diffrax.BrownianIncrement,
        diffrax.SpaceTimeLevyArea,
        diffrax.SpaceTimeTimeLevyArea,
    ):
        if needed is None or issubclass(area, needed):
            return area
    raise ValueError(f"no Brownian path provides the Levy area {needed} that {solver} needs")


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
    rtol: float | None = None,
    atol: float | None = None,
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
    if diffusion is not None and key is None:
        raise ValueError("an SDE (diffusion is not None) needs a PRNG key")
    if diffusion is not None and not isinstance(x, jax.Array):
        raise ValueError("an SDE's state must be a single array; pytree states are for ODEs")
    adaptive = rtol is not None or atol is not None
    if adaptive and steps is None:
        steps = 100  # only sets the first trial step
    grid = _grid(ts, t_start, t_end, steps)
    grid = grid.astype(jnp.result_type(*jax.tree.leaves(x), grid))
    sign = jnp.sign(grid[-1] - grid[0])
    taus = sign * grid
    count = _Counter(drift)

    if adaptive:
        return _adaptive(
            count, diffusion, x, key, solver, sign, taus, save_ts, rtol, atol, max_steps, adjoint
        )

    n_steps = taus.shape[0] - 1
    if diffusion is None:  # an ODE: one set of terms, nothing scanned for the noise
        step_keys = None
        terms_for = lambda _: _terms(count, None, sign, None)  # noqa: E731
    else:
        step_keys = jax.random.split(key, n_steps)
        shape, area = jax.ShapeDtypeStruct(x.shape, x.dtype), _levy_area(solver)
        terms_for = lambda k: _terms(count, diffusion, sign, _StepIncrement(shape, area, k))  # noqa: E731
    terms = terms_for(None if step_keys is None else step_keys[0])
    state0 = solver.init(terms, taus[0], taus[1], x, None)
    init_calls, step_calls = _evaluations(
        solver,
        count,
        lambda: solver.init(terms, taus[0], taus[1], x, None),
        lambda: solver.step(terms, taus[0], taus[1], x, None, state0, False),
    )

    save_ts = None if save_ts is None else jnp.atleast_1d(as_time(save_ts)).astype(grid.dtype)
    if save_ts is not None:
        slots = _save_slots(grid, save_ts)
        buf = jax.tree.map(
            lambda v: jnp.zeros(save_ts.shape + v.shape, v.dtype).at[slots[0]].set(v, mode="drop"),
            x,
        )
        step_slots = slots[1:]
    else:
        buf, step_slots = None, jnp.zeros((n_steps,), jnp.int32)

    def body(carry, inputs):
        y, state, buf = carry
        tau0, tau1, slot, step_key = inputs
        y, _, _, state, _ = solver.step(terms_for(step_key), tau0, tau1, y, None, state, False)
        if buf is not None:
            buf = jax.tree.map(lambda b, v: b.at[slot].set(v, mode="drop"), buf, y)
        return (y, state, buf), None

    (y, _, buf), _ = jax.lax.scan(
        body, (x, state0, buf), (taus[:-1], taus[1:], step_slots, step_keys)
    )
    y = check_finite(y, "the solution (check the field, the time range and the step size)")
    nfe = jnp.asarray(init_calls + step_calls * n_steps)
    return Solution(y, save_ts, buf, nfe, jnp.asarray(n_steps))


def _adaptive(
    count, diffusion, x, key, solver, sign, taus, save_ts, rtol, atol, max_steps, adjoint
):
    tau0, tau1 = taus[0], taus[-1]
    dt0 = taus[1] - taus[0]
    bm = None
    if diffusion is not None:
        bm = diffrax.VirtualBrownianTree(
            tau0, tau1, tol=jnp.abs(dt0) / 16, shape=x.shape, key=key, levy_area=_levy_area(solver)
        )
    terms = _terms(count, diffusion, sign, bm)
    # Closed-over arrays (network parameters) become explicit ``args``, as BacksolveAdjoint's
    # custom VJP requires; the converted drift evaluates the same jaxpr.
    drift = eqx.filter_closure_convert(
        lambda y, tau: jax.tree.map(lambda v: sign * v, count.fn(y, sign * tau)), x, tau0
    )
    ode = diffrax.ODETerm(lambda tau, y, args: args(y, tau))
    solve_terms = ode if diffusion is None else diffrax.MultiTerm(ode, terms.terms[1])
    controller = diffrax.PIDController(
        rtol=1e-3 if rtol is None else rtol, atol=1e-6 if atol is None else atol
    )
    save_ts = None if save_ts is None else jnp.atleast_1d(as_time(save_ts)).astype(taus.dtype)
    saveat = diffrax.SaveAt(t1=True, ts=None if save_ts is None else sign * save_ts)
    kwargs = {} if adjoint is None else {"adjoint": adjoint}
    sol = diffrax.diffeqsolve(
        solve_terms,
        solver,
        tau0,
        tau1,
        dt0,
        x,
        args=drift,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=False,
        **kwargs,
    )
    state0 = solver.init(terms, tau0, taus[1], x, None)
    init_calls, step_calls = _evaluations(
        solver,
        count,
        lambda: solver.init(terms, tau0, taus[1], x, None),
        lambda: solver.step(terms, tau0, taus[1], x, None, state0, False),
    )
    y = error_if(
        jax.tree.map(lambda v: v[-1], sol.ys),
        sol.result != diffrax.RESULTS.successful,
        "the adaptive solve did not finish: raise max_steps or loosen rtol/atol",
    )
    y = check_finite(y, "the solution (check the field, the time range and the tolerances)")
    n = sol.stats["num_steps"]
    xs = None if save_ts is None else jax.tree.map(lambda v: v[:-1], sol.ys)
    return Solution(y, save_ts, xs, init_calls + step_calls * n, n)
