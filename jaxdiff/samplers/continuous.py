r"""The reverse family integrated by any diffrax solver: ``ode`` and ``sde``.

``dx = [f x - (1 + eta^2)/2 g^2 score] dt + eta g dw`` run from the prior towards the data
(``jaxdiff.reverse_drift``): ``eta = 0`` is the probability-flow ODE, ``eta = 1`` Anderson's reverse
SDE, and any ``eta(t) >= 0`` (a number or a function of ``t``) keeps the path's marginals
(Karras et al. 2022, eq. 6). On a fixed grid each step is the diffrax solver's own ``step``
(Euler, Heun, Midpoint, Tsit5, ...; Euler--Maruyama, ShARK, SEA, SRA1 for the SDE: the noise is
additive); Euler's, and the ODE's Heun, Midpoint and Ralston from their Butcher tableaux, are
written out with the grid's coefficients tabulated (the same update at a hand-written scan's
speed). With ``rtol``/``atol`` the solve is adaptive through ``diffrax.diffeqsolve``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff import _diffrax
from jaxdiff._checks import check_count, coef_time, concrete
from jaxdiff._engine import (
    SLOPE_MESSAGE,
    slope_singular,
    slope_singular_at_one,
    stiff_at_one,
)
from jaxdiff.conversions import hub_matrix
from jaxdiff.field import Field, batch_time
from jaxdiff.integrate import Solution, check_tolerances, integrate
from jaxdiff.paths import GaussianPath
from jaxdiff.samplers.base import (
    Sampler,
    alpha_zero_at_start,
    between,
    combine,
    grid_check,
    normal,
)
from jaxdiff.schedules import default_grid, log_snr_grid
from jaxdiff.sde import Eta, _is_zero, _reverse_diffusion, _reverse_drift, check_eta, eta_at

Array = jax.Array

__all__ = ["ode", "sde", "DiffraxState"]


class DiffraxState(NamedTuple):
    x: Array
    solver_state: Any


def _stepper(path: GaussianPath, field: Field, solver, eta) -> _diffrax.Stepper:
    def drift(x, t):
        return _reverse_drift(path, field, x, t, eta)

    diffusion = None if _is_zero(eta) else (lambda x, t: _reverse_diffusion(path, t, eta))
    return _diffrax.Stepper(solver, drift, diffusion, -1.0)


# explicit Runge--Kutta solvers without first-same-as-last whose step ``ode`` writes out from
# their Butcher tableau: diffrax's generic step (a loop over stages, an error estimate and
# interpolation bookkeeping) ran 2-3x slower than a hand-written scan at small batch
_WRITTEN_OUT = (diffrax.Heun, diffrax.Midpoint, diffrax.Ralston)


def _singular_sde(path: GaussianPath) -> Array:
    return stiff_at_one(path) | slope_singular_at_one(path)


def _stiff_start_grid(eta: Eta) -> Callable[..., Array]:
    """The reverse SDE's default grid: ``default_grid``, but uniform in log-SNR where the prior
    end is singular or stiff (:func:`stiff_at_one`) and ``eta < 1`` at the start (a traced
    ``eta``, unknown at trace time, gets the log-SNR grid; pass ``ts`` for another). From
    ``1 - 1e-3`` there the drift's ``eta^2 g^2 / (2 sigma) ~ eta^2 / (1 - t)`` makes the first
    uniform step overshoot, and at ``eta < 1`` the later steps contract too weakly to undo it.
    At ``eta >= 1`` they undo it, while few log-SNR steps of ``Delta lambda ~ 3`` each compound
    Euler--Maruyama's excess noise. Energy distances to the tests' three-component mixture
    (``tests/test_sample.py``) at 10 steps on the linear path, uniform against log-SNR: 1.52
    against 0.027 at ``eta = 0.5``, 0.20 against 2.5 at ``eta = 1`` (a trained MLP on a
    two-component mixture: 42 on the log-SNR grid against 0.076)."""

    def grid(path: GaussianPath, steps: int, t_start: Any, t_end: Any) -> Array:
        with jax.ensure_compile_time_eval():
            stiff = concrete(stiff_at_one(path))
            below_one = concrete(jnp.all(eta_at(eta, t_start) < 1))  # per-sample eta: all
        if stiff is not None and bool(stiff) and (below_one is None or bool(below_one)):
            return log_snr_grid(path, steps, t_start, t_end)
        return default_grid(path, steps, t_start, t_end)

    return grid


def _reverse(
    solver: diffrax.AbstractSolver | None,
    eta: Eta,
    name: str,
    rtol: ArrayLike | None,
    atol: ArrayLike | None,
    max_steps: int,
    adjoint: diffrax.AbstractAdjoint | None,
) -> Sampler:
    solver = diffrax.Euler() if solver is None else solver
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(f"solver must be a diffrax solver; got {type(solver).__name__}")
    eta = check_eta(eta)
    max_steps = check_count(max_steps, "max_steps")
    stochastic = not _is_zero(eta)
    adaptive = None
    if rtol is not None or atol is not None:
        rtol, atol = check_tolerances(solver, rtol, atol, stochastic)

        def adaptive(key, path, field, x, ts, save_ts) -> Solution:
            """One ``diffeqsolve`` from ``ts[0]`` to ``ts[-1]``; ``ts[1]`` sets the first trial step."""
            return integrate(
                lambda x, t: _reverse_drift(path, field, x, t, eta),
                x,
                ts=ts,
                diffusion=(lambda x, t: _reverse_diffusion(path, t, eta)) if stochastic else None,
                key=key if stochastic else None,
                solver=solver,
                save_ts=save_ts,
                rtol=rtol,
                atol=atol,
                max_steps=int(max_steps),
                adjoint=adjoint,
            )

    elif adjoint is not None:
        raise ValueError(
            "adjoint applies to adaptive solves (rtol/atol); fixed grids are checkpointed"
        )
    if stochastic:
        _diffrax.queries_inside_step(solver)  # raises for wrapped solvers needing Levy areas
    at_first, per_step = _diffrax.evaluations(solver, stochastic)

    def drift_coefs(path: GaussianPath, field: Field, t, dt):
        """``dt`` times the reverse drift ``alpha' x0_hat + (sigma' + eta^2 g^2 / (2 sigma))
        eps_hat`` at ``t`` as ``p x + q value``, through the hub map of the prediction ``value``."""
        h00, h01, h10, h11 = hub_matrix(path, t, field.target)
        t = coef_time(t)
        da, c = path.d_alpha(t), path.d_sigma(t)
        if stochastic:
            c = c + 0.5 * jnp.square(eta_at(eta, t)) * path.diffusion_sq(t) / path.sigma(t)
        return dt * (da * h00 + c * h10), dt * (da * h01 + c * h11)

    def init_written(path: GaussianPath, field: Field, x: Array, ts: Array) -> DiffraxState:
        return DiffraxState(x, None)  # a written-out step carries no solver state

    init = init_written
    if type(solver) is diffrax.Euler:  # Euler / Euler--Maruyama: diffrax's update, written out

        def euler_coefs(path: GaussianPath, field: Field, t, s):
            """``x_s = x_t + p x_t + q value + n z`` (:func:`drift_coefs` over ``s - t``), the
            noise scale ``n = eta g sqrt(t - s)``."""
            p, q = drift_coefs(path, field, t, s - t)
            noise = jnp.zeros_like(p)
            if stochastic:
                u = coef_time(t)
                noise = eta_at(eta, u) * path.diffusion(u) * jnp.sqrt(t - s)
            return p, q, noise

        coefficients = between(euler_coefs)

        def step(key, path, field, state: DiffraxState, t, s, coefs=None) -> DiffraxState:
            x = state.x
            p, q, n = euler_coefs(path, field, t, s) if coefs is None else coefs
            value = field(x, batch_time(t, x))
            terms = [(1.0, x), (p, x), (q, value)]
            if stochastic:
                terms.append((n, normal(key, x)))
            return DiffraxState(combine(x, *terms), None)

    elif not stochastic and type(solver) in _WRITTEN_OUT:  # explicit RK: its tableau, written out
        tableau = solver.tableau
        cs = (0.0, *(float(c) for c in tableau.c))
        a_rows = [[float(a) for a in row] for row in tableau.a_lower]
        b = [float(v) for v in tableau.b_sol]

        def rk_coefs(path: GaussianPath, field: Field, t, s):
            """Each stage's time and ``(p_i, q_i)``: stage ``i``'s increment is ``p_i x_i + q_i
            value(x_i, t_i)`` at ``t_i = t + c_i (s - t)`` (:func:`drift_coefs` over ``s - t``)."""
            times = jnp.stack([t + c * (s - t) for c in cs])
            p, q = zip(*(drift_coefs(path, field, u, s - t) for u in times), strict=True)
            return times, jnp.stack(p), jnp.stack(q)

        coefficients = between(rk_coefs)

        def step(key, path, field, state: DiffraxState, t, s, coefs=None) -> DiffraxState:
            x = state.x
            times, p, q = rk_coefs(path, field, t, s) if coefs is None else coefs
            ks = []  # the stages' increments (diffrax's k_i = dt f(t_i, x_i))
            for i in range(len(cs)):
                xi = x if i == 0 else combine(x, (1.0, x), *zip(a_rows[i - 1], ks, strict=True))
                value = field(xi, batch_time(times[i], xi))
                ks.append(combine(x, (p[i], xi), (q[i], value)))
            return DiffraxState(combine(x, (1.0, x), *zip(b, ks, strict=True)), None)

    else:  # any other diffrax solver: its own step
        coefficients = None

        def init(path: GaussianPath, field: Field, x: Array, ts: Array) -> DiffraxState:
            return DiffraxState(x, _stepper(path, field, solver, eta).init(x, ts[0], ts[1]))

        def step(key, path, field, state: DiffraxState, t, s) -> DiffraxState:
            x, solver_state = _stepper(path, field, solver, eta).step(
                key, state.x, state.solver_state, t, s
            )
            return DiffraxState(x, solver_state)

    def check(path: GaussianPath, field: Field, ts: Array) -> Array:
        ts = grid_check(
            ts,
            lambda ts: slope_singular(path, ts[0]),
            SLOPE_MESSAGE.format(
                where="the first time of the grid",
                what="",
                fix="start at t < 1 (the default grid does) or step in closed form (ddim(), "
                "ancestral(), dpm_solver_pp())",
            ),
        )
        if not stochastic:
            return ts
        return grid_check(
            ts,
            lambda ts: alpha_zero_at_start(path, ts),
            "alpha_t = 0 at the first time of the grid, where the reverse SDE (eta != 0) is "
            "singular (f = d log alpha / dt is infinite); start at t < 1 (e.g. t_start=1 - 1e-3) "
            "or use the probability-flow ODE there",
        )

    return Sampler(
        name=name,
        init=init,
        step=step,
        evals_per_step=per_step,
        evals_first_step=at_first,
        stochastic=stochastic,
        check=check,
        singular_start=_singular_sde if stochastic else slope_singular_at_one,
        grid=_stiff_start_grid(eta) if stochastic else default_grid,
        adaptive=adaptive,
        coefficients=coefficients,
    )


def ode(
    solver: diffrax.AbstractSolver | None = None,
    *,
    rtol: ArrayLike | None = None,
    atol: ArrayLike | None = None,
    max_steps: int = 4096,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> Sampler:
    """The probability-flow ODE ``dx/dt = f x - g^2 score / 2`` (Song et al. 2021) by ``solver``.

    ``solver`` is any diffrax ODE solver (default ``diffrax.Euler()``; ``Heun()`` is second order
    at 2 evaluations per step). With ``rtol``/``atol`` the steps are adaptive (a solver with an
    error estimate: ``Tsit5``, ``Dopri5``, ``Heun``) and ``adjoint`` (e.g.
    ``diffrax.BacksolveAdjoint()``) chooses how gradients flow (``diffrax.ForwardMode()`` for
    ``jax.jvp`` / ``jax.jacfwd``: the default is reverse mode only); the evaluation count is then
    diffrax's.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.linear_path()
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "velocity"), (4096, 2),
    ...                 sampler=ode(), steps=50)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 50)
    """
    name = f"ode({type(solver or diffrax.Euler()).__name__})"
    return _reverse(solver, 0.0, name, rtol, atol, max_steps, adjoint)


def sde(
    solver: diffrax.AbstractSolver | None = None,
    *,
    eta: Eta = 1.0,
    rtol: ArrayLike | None = None,
    atol: ArrayLike | None = None,
    max_steps: int = 4096,
) -> Sampler:
    """The reverse SDE ``dx = [f x - (1 + eta^2)/2 g^2 score] dt + eta g dw`` by ``solver``.

    ``eta = 1`` (default) is Anderson's reverse SDE (Song et al. 2021); ``eta`` may be any number
    ``>= 0`` or a function ``eta(t) >= 0`` (e.g. noise only at high ``t``): every choice keeps
    the marginals (Karras et al. 2022, eq. 6). ``solver`` is Euler--Maruyama
    (``diffrax.Euler()``, default) or any diffrax SDE solver for additive noise (``ShARK``,
    ``SEA``, ``SRA1``). Each step draws its Brownian increment from its own key. With
    ``rtol``/``atol`` the steps are adaptive on a ``VirtualBrownianTree`` (a solver with an
    error estimate and a strong order: ``Heun``, ``SPaRK``; ShARK, SEA and SRA1 have no error
    estimate).

    Where ``alpha_1 = 0`` (the linear and cosine paths) the drift ``f = d log alpha / dt`` is
    infinite at ``t = 1``, and where the last beta of a discrete schedule is clipped near 1
    (``cosine_betas()``: ``alpha_1 = 4.9e-5``) it is 3.5e3 over the last ``1e-3``: there
    ``jd.sample``'s default grid starts at ``t = 1 - 1e-3`` (a grid from ``t = 1`` is refused
    where ``alpha_1 = 0``), and for ``eta < 1`` it is uniform in log-SNR, since the drift's
    ``eta^2 / (1 - t)`` made Euler--Maruyama's first uniform step overshoot (energy distance 1.52
    against 0.027 at 10 steps, ``eta = 0.5``, on the tests' mixture); at ``eta >= 1`` the
    uniform grid is better (0.20 against 2.5) for Euler--Maruyama; the multi-stage solvers take
    those stiff first steps worse (cosine path, ``eta(t) = 2t``, 100 steps: ShARK's energy
    distance 0.055 and SRA1's 0.018, Euler--Maruyama at the floor; ShARK at 400 steps or on
    ``ts=log_snr_grid(...)`` reached it). Elsewhere the grid is ``default_grid``'s. The
    discrete stochastic steps, ``ddim(eta)``, ``ancestral()``, ``dpm_solver_pp(order, eta)`` and
    ``dpm_solver_sde``, take their steps in closed form in ``alpha`` and ``sigma`` and start at
    ``t = 1`` where ``alpha_1 = 0`` (inside on a clipped schedule, as every sampler).
    """
    name = f"sde({type(solver or diffrax.Euler()).__name__}, eta={eta})"
    return _reverse(solver, eta, name, rtol, atol, max_steps, None)
