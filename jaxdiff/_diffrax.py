"""diffrax solvers on a fixed grid (internal): terms, the per-step Brownian increment, one step,
and the count of drift evaluations.

Fixed grids run the solver's own ``step`` inside jaxdiff's scan (``jaxdiff._engine``), which is a
hand-written scan of the solver's update: scan speed, scan compile time, no ``while_loop``
bookkeeping. Time runs in ``tau = sign * t`` so that it increases, as Brownian paths require.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from jaxdiff._checks import normal

Array = jax.Array


def terms(drift: Callable, diffusion: Callable | None, sign: Any, bm: Any) -> diffrax.AbstractTerm:
    """``dy = drift(y, t) dt + diffusion(y, t) dW`` in ``tau = sign * t`` (diagonal noise)."""
    ode = diffrax.ODETerm(  # the state's dtype (a half-precision state stays so in RK stages)
        lambda tau, y, args: jax.tree.map(
            lambda v, y0: (sign * v).astype(jnp.result_type(y0)), drift(y, sign * tau), y
        )
    )
    if diffusion is None:
        return ode

    def noise(tau, y, args):
        g = jnp.broadcast_to(diffusion(y, sign * tau), y.shape).astype(y.dtype)
        return lx.DiagonalLinearOperator(g)

    return diffrax.MultiTerm(ode, diffrax.ControlTerm(noise, bm))


class StepIncrement(diffrax.AbstractBrownianPath):
    """The Brownian motion over one grid step ``[a, b]``, drawn from that step's own key.

    ``W(b) - W(a) ~ N(0, (b - a) I)`` (and the space-time Levy areas ``H ~ N(0, h/12 I)``,
    ``K ~ N(0, h/720 I)`` when a stochastic Runge--Kutta solver asks for them), as in
    ``diffrax.UnsafeBrownianPath`` but with the key given rather than derived from the times.
    A solver that queries inside the step (``diffrax.HalfSolver``: two half steps) gets a
    consistent path: ``W(u) = (u - a)/h W + sqrt((u - a)(b - u)/h) Z``, exact for one interior
    point (one more normal draw per step, only for such solvers).
    """

    shape: jax.ShapeDtypeStruct = eqx.field(static=True)
    levy_area: type = eqx.field(static=True)
    interior: bool = eqx.field(static=True)
    key: Array
    a: Any
    b: Any

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def _draw(self, key, scale):
        return scale * normal(key, self.shape.shape, self.shape.dtype)

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del left
        dtype = self.shape.dtype
        h = jnp.asarray(self.b - self.a, dtype)
        if self.interior:  # W(t1) - W(t0) along the bridge through W(b)
            k_w, k_z = jax.random.split(self.key)
            w, z = self._draw(k_w, jnp.sqrt(h)), self._draw(k_z, 1.0)

            def at(u):
                u = jnp.asarray(u - self.a, dtype)
                return (u / h) * w + jnp.sqrt(jnp.maximum(u * (h - u), 0.0) / h) * z

            dw = at(t1) - at(t0)
            return (
                diffrax.BrownianIncrement(dt=jnp.asarray(t1 - t0, dtype), W=dw) if use_levy else dw
            )
        std = jnp.sqrt(h)
        if self.levy_area is diffrax.BrownianIncrement:
            w = self._draw(self.key, std)
            return diffrax.BrownianIncrement(dt=h, W=w) if use_levy else w
        keys = jax.random.split(self.key, 3)
        w, hh = self._draw(keys[0], std), self._draw(keys[1], std / np.sqrt(12.0))
        if not use_levy:
            return w
        if self.levy_area is diffrax.SpaceTimeLevyArea:
            return diffrax.SpaceTimeLevyArea(dt=h, W=w, H=hh)
        k = self._draw(keys[2], std / np.sqrt(720.0))
        return diffrax.SpaceTimeTimeLevyArea(dt=h, W=w, H=hh, K=k)


def levy_area(solver: diffrax.AbstractSolver) -> type:
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


def queries_inside_step(solver: diffrax.AbstractSolver) -> bool:
    """Whether ``solver`` queries the Brownian path at times inside a step (wrapped solvers)."""
    if isinstance(solver, diffrax.AbstractWrappedSolver):
        if not issubclass(levy_area(solver), diffrax.BrownianIncrement):
            raise ValueError(
                f"{type(solver).__name__} steps inside a grid step and its solver needs Levy "
                "areas, which a fixed-grid path cannot give consistently; use the solver itself"
            )
        return True
    return False


class Stepper(eqx.Module):
    """One diffrax step of ``dy = drift dt + diffusion dW`` from ``t`` to ``s`` (either direction).

    ``init(y, t, s)`` is the solver state before the first step (FSAL solvers evaluate their
    first stage lazily inside the first step); ``step(key, y, solver_state, t, s)`` returns the
    new ``(y, solver_state)``. ``key`` is ``None`` for an ODE.
    """

    solver: diffrax.AbstractSolver
    drift: Callable = eqx.field(static=True)
    diffusion: Callable | None = eqx.field(static=True)
    sign: Any

    def _terms(self, key, y, tau0, tau1):
        if self.diffusion is None:
            return terms(self.drift, None, self.sign, None)
        shape = jax.ShapeDtypeStruct(y.shape, y.dtype)
        bm = StepIncrement(
            shape, levy_area(self.solver), queries_inside_step(self.solver), key, tau0, tau1
        )
        return terms(self.drift, self.diffusion, self.sign, bm)

    def init(self, y, t, s):
        tau0, tau1 = self.sign * t, self.sign * s
        dummy = None if self.diffusion is None else jax.random.key(0)
        return self.solver.init(self._terms(dummy, y, tau0, tau1), tau0, tau1, y, None)

    def step(self, key, y, solver_state, t, s):
        tau0, tau1 = self.sign * t, self.sign * s
        out = self.solver.step(
            self._terms(key, y, tau0, tau1), tau0, tau1, y, None, solver_state, False
        )
        return out[0], out[3]


class Counter:
    """Counts the calls of a function while it is traced (for solvers without a tableau)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def evaluations(solver: diffrax.AbstractSolver, sde: bool) -> tuple[int, int]:
    """Drift evaluations ``(at the first step only, per step)``: exact for explicit solvers.

    Runge--Kutta solvers loop over their stages inside one traced body, so their count comes
    from the Butcher tableau (``len(c) + 1`` stages; first-same-as-last saves one per step and
    costs one at the first step); other solvers (Euler, EulerHeun, ...) are counted by tracing a
    toy problem.
    """
    tableau = getattr(solver, "tableau", None)
    if isinstance(tableau, diffrax.ButcherTableau):
        stages = len(tableau.c) + 1
        return (1, stages - 1) if tableau.fsal else (0, stages)
    if isinstance(tableau, diffrax.StochasticButcherTableau):
        skipped = 0 if tableau.ignore_stage_f is None else int(np.sum(tableau.ignore_stage_f))
        return 0, len(tableau.c) + 1 - skipped
    count = Counter(lambda y, t: -y)
    diffusion = (lambda y, t: jnp.ones_like(y)) if sde else None
    stepper = Stepper(solver, count, diffusion, 1.0)
    y, key = jnp.zeros((2,)), (jax.random.key(0) if sde else None)
    state = jax.eval_shape(lambda: stepper.init(y, 0.0, 0.1))
    at_init = count.calls
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    jax.eval_shape(lambda: stepper.step(key, y, state, 0.0, 0.1))
    return at_init, count.calls - at_init
