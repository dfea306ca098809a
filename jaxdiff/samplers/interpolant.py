r"""The stochastic-interpolant sampler: ``dx = [b - eps_t s] dt + sqrt(2 eps_t) dW`` from t = 1 to 0.

Albergo, Boffi & Vanden-Eijnden (2023), Thm 2.8: for ``x_t = a_t x0 + b_t x1 + gamma_t z`` (jaxdiff's
convention: ``t = 0`` data, ``t = 1`` source) with velocity ``b(x, t) = E[dx_t/dt | x_t = x]`` and
score ``s(x, t)``, every diffusion ``eps_t >= 0`` of the backward SDE above keeps the marginals;
``eps_t = 0`` is the ODE ``dx = b dt``. One Euler(-Maruyama) step per grid interval, evaluated at
its left end ``t``; the grid may end at ``t = 0`` exactly.

**Which path.** The process goes where ``jaxdiff.sample`` takes its path:

* a :class:`~jaxdiff.StochasticInterpolant` (``jd.brownian_bridge(sigma)``, ...): the field
  predicts ``b`` (target ``"velocity"``) and, for ``eps_t != 0``, the factory's ``noise`` field
  predicts ``E[z | x_t]`` (``"eps"``; ``s = -E[z | x_t] / gamma_t``) or the score: with ``gamma_t
  > 0`` there are three unknowns ``(x0, x1, z)`` and one prediction no longer gives the other.
  The interpolant does not know its source: give ``jd.sample`` the ``source=`` (or
  ``x_init = source(key, shape)``).
* a :class:`~jaxdiff.GaussianPath`, the case ``gamma = 0`` with ``x1 ~ N(0, I)``: one field of any
  target gives ``b`` and ``s`` through the ``(x0, eps)`` hub (one evaluation), and ``eps_t =
  eta_t^2 g_t^2 / 2`` is the reverse family of ``jd.samplers.sde(eta=eta_t)``.

The noise network is closed over by the sampler (bind its parameters before building it): a
sampler value is otherwise free of networks, but an SDE of an interpolant needs two of them.
Integrating forwards (data to source) is ``jd.integrate`` with the drift ``b + eps_t s``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff._checks import expand_like
from jaxdiff.conversions import convert
from jaxdiff.field import Field, as_field, batch_time
from jaxdiff.paths import GaussianPath
from jaxdiff.samplers.base import Sampler, grid_check, normal
from jaxdiff.schedules import uniform_grid
from jaxdiff.sde import Eta, _is_zero, check_eta, eta_at

Array = jax.Array

__all__ = ["interpolant_sde"]


class State(NamedTuple):
    x: Array


def _to_zero(path, steps, t_start, t_end):
    return uniform_grid(steps, t_start, t_end)


def _noise_scale(path):
    """The scale of the noise whose score the SDE needs: ``sigma_t`` on a Gaussian path,
    ``gamma_t`` on a stochastic interpolant."""
    return path.sigma if isinstance(path, GaussianPath) else path.gamma


def interpolant_sde(diffusion: Eta = 0.0, *, noise: Field | None = None) -> Sampler:
    """Euler(-Maruyama) on ``dx = [b - eps_t s] dt + sqrt(2 eps_t) dW`` from ``t = 1`` to 0.

    ``diffusion``: ``eps_t``, a number or a function of ``t`` (``>= 0``; ``0``: the ODE). ``noise``:
    the field of ``E[z | x_t]`` (``"eps"``) or of the score, needed on a
    :class:`~jaxdiff.StochasticInterpolant` when ``eps_t != 0`` (see the module text). The score
    is evaluated on the grid's times before its end, so with ``eps_t != 0`` the noise scale there
    (``gamma_t``, or ``sigma_t`` on a Gaussian path) must be ``> 0``: on a Brownian bridge
    (``gamma_1 = 0``) the default grid starts at ``t = 1 - 1e-3``. Default grid: 100 uniform
    steps from 1 to 0.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> si = jd.linear_interpolant()  # x_t = (1 - t) x0 + t x1; pairs x0 = 1, x1 = 2
    >>> b = jd.Field(lambda x, t: x / (1.0 + t[:, None]), "velocity")  # x_t = 1 + t: b = 1
    >>> sol = jd.sample(None, si, b, x_init=jnp.full((3, 2), 2.0), sampler=interpolant_sde(),
    ...                 steps=4)
    >>> sol.x.tolist()[0], int(sol.nfe)  # Euler is exact here: x_s = x_t (1 + s) / (1 + t)
    ([1.0, 1.0], 4)
    """
    diffusion = check_eta(diffusion, "diffusion")
    stochastic = not _is_zero(diffusion)
    if noise is not None:
        noise = as_field(noise, "noise")
        if not stochastic:
            raise ValueError("noise (E[z | x_t] or the score) is used only with diffusion != 0")
        if noise.target not in ("eps", "score"):
            raise ValueError(
                f"noise must predict 'eps' (E[z | x_t]) or 'score'; got {noise.target!r}"
            )

    def init(path, field, x, ts) -> State:
        return State(x)

    def velocity_and_score(path, field, x, t):
        tb = batch_time(t, x)
        if isinstance(path, GaussianPath):
            value = field(x, tb)
            b = convert(path, x, t, value, src=field.target, dst="velocity")
            if not stochastic:
                return b, None
            return b, convert(path, x, t, value, src=field.target, dst="score")
        b = field(x, tb)
        if not stochastic:
            return b, None
        pred = noise(x, tb)
        if noise.target == "score":
            return b, pred
        return b, -pred / expand_like(path.gamma(t), x).astype(pred.dtype)

    def step(key, path, field, state: State, t, s) -> State:
        x = state.x
        dt = jnp.asarray(s - t)
        b, score = velocity_and_score(path, field, x, t)
        if not stochastic:
            return State((x + dt * b).astype(x.dtype))
        e = jnp.asarray(eta_at(diffusion, t), dt.dtype)
        noise_scale = jnp.sqrt(2.0 * e * jnp.abs(dt))
        return State((x + dt * (b - e * score) + noise_scale * normal(key, x)).astype(x.dtype))

    def check(path, field, ts) -> Array:
        gaussian = isinstance(path, GaussianPath)
        if gaussian and noise is not None:
            raise ValueError(
                "on a GaussianPath one field gives both the velocity and the score (through the "
                "(x0, eps) hub): drop noise=, which is for a StochasticInterpolant"
            )
        if not gaussian and field.target != "velocity":
            raise ValueError(
                f"on a stochastic interpolant the field predicts the velocity b(x, t) (target "
                f"'velocity'); got target {field.target!r}"
            )
        if not stochastic:
            return ts
        if not gaussian and noise is None:
            raise ValueError(
                "diffusion != 0 on a stochastic interpolant needs the score: give noise= (a "
                "field of E[z | x_t], target 'eps', or of the score)"
            )
        if callable(diffusion):
            ts = grid_check(
                ts,
                lambda g: (
                    ~jnp.all(jnp.isfinite(eta_at(diffusion, g)) & (eta_at(diffusion, g) >= 0))
                ),
                "diffusion(t) must be finite and >= 0 on the grid",
            )
        scale = _noise_scale(path)
        name = "sigma_t" if gaussian else "gamma_t"
        return grid_check(
            ts,
            lambda g: scale(g[:-1]) <= 0,
            f"the score is infinite where {name} = 0, and with diffusion != 0 it is evaluated at "
            "every time of the grid before its end: start where it is > 0 (e.g. t_start=1 - 1e-3)",
        )

    def singular_start(path) -> Array:  # the score, where the noise scale is 0 at t = 1
        return _noise_scale(path)(jnp.ones((), jnp.float32)) <= 0

    return Sampler(
        name=f"interpolant_sde(diffusion={diffusion})",
        init=init,
        step=step,
        evals_per_step=1 + int(noise is not None),
        stochastic=stochastic,
        grid=_to_zero,
        steps=100,
        t_end=0.0,
        reaches_zero=True,
        check=check,
        singular_start=singular_start if stochastic else None,
        interpolant=True,
    )
