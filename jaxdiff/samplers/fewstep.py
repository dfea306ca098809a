r"""Samplers that jump: MeanFlow's k-step sampler and multistep consistency sampling.

Both take one network evaluation per step, step to ``t = 0`` exactly (``reaches_zero``) and
default to one step of the grid ``ts = [1, 0]`` (``steps`` uniform steps from ``t_start`` to 0
otherwise; any decreasing ``ts`` works). Time runs from data (``t = 0``) to noise (``t = 1``), as
in both papers' own notation once their ``sigma`` or ``t`` is read as ours.

* ``meanflow()`` (Geng et al. 2025): ``x_s = x_t - (t - s) u(x_t, t, s)``, with ``u`` the average
  velocity over ``[s, t]`` (``jaxdiff.meanflow_loss``). With the exact ``u`` every grid gives the
  exact flow map of the probability-flow ODE; one step is the paper's ``x = z_1 - u(z_1, 1, 0)``.
* ``consistency()`` (Song et al. 2023, Algorithm 1): ``x0 = f(x_t, t)``, then a fresh forward draw
  ``x_s = alpha_s x0 + sigma_s z`` at the next time (``f`` itself at ``sigma_s = 0``). With the
  exact consistency function (the flow map to ``t = 0``) every grid samples the data law exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff._checks import expand_like
from jaxdiff.field import Field, batch_time
from jaxdiff.paths import GaussianPath
from jaxdiff.samplers.base import Sampler, normal
from jaxdiff.schedules import uniform_grid

Array = jax.Array

__all__ = ["meanflow", "consistency"]


class State(NamedTuple):
    x: Array


def _to_zero(path, steps, t_start, t_end):
    return uniform_grid(steps, t_start, t_end)


def _init(path, field, x, ts) -> State:
    return State(x)


def _needs_target(target: str, what: str):
    def check(path: GaussianPath, field: Field, ts: Array) -> Array:
        if field.target != target:
            raise ValueError(f"{what}; got a field of target {field.target!r}")
        return ts

    return check


def meanflow() -> Sampler:
    """MeanFlow's jumps ``x_s = x_t - (t - s) u(x_t, t, s)`` (Geng et al. 2025).

    The field predicts ``"velocity"`` and is called as ``field(x, t, s)`` with ``t`` and ``s`` of
    shape ``(batch,)``; its second time must default to the first, ``u(x, t) = u(x, t, t)``, the
    instantaneous velocity (``jaxdiff.nets.TwoTimeMLP`` does), so the same network also runs
    under every multi-step sampler. One evaluation per step; the path enters only through the
    start draw. A shortcut model (``jaxdiff.shortcut_loss``, Frans et al. 2024) is the same jump,
    sampled here; its trained jumps are ``steps = 1, 2, 4, ...``.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> u = jd.Field(lambda x, t, r=None: x / t[:, None], "velocity")  # data at 0: z_t = t e
    >>> sol = jd.sample(jax.random.key(0), jd.linear_path(), u, (5, 2), sampler=meanflow())
    >>> float(jnp.abs(sol.x).max()), int(sol.nfe)
    (0.0, 1)
    """

    def step(key, path, field, state: State, t, s) -> State:
        x = state.x
        u = field(x, batch_time(t, x), batch_time(s, x))
        return State((x - expand_like(jnp.asarray(t - s), x) * u).astype(x.dtype))

    return Sampler(
        name="meanflow()",
        init=_init,
        step=step,
        evals_per_step=1,
        grid=_to_zero,
        steps=1,
        t_end=0.0,
        reaches_zero=True,
        check=_needs_target(
            "velocity",
            "a MeanFlow network predicts the average velocity u(x, t, s), whose target is "
            "'velocity' (u(x, t, t) is the instantaneous velocity)",
        ),
    )


def consistency() -> Sampler:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1).

    ``x0 = f(x_t, t)`` from the consistency model ``f`` (a field of target ``"x0"``, e.g.
    ``Field(consistency_function(model.apply), "x0", params)``), the trajectory's point at
    ``t = 0``; then ``x_s = (alpha_s / alpha_0) x0 + sqrt(sigma_s^2 - (alpha_s sigma_0 /
    alpha_0)^2) z`` with fresh ``z ~ N(0, I)``, a draw of the path at ``s`` given that point (on a
    path with ``sigma_0 > 0``, VE's ``sigma_min``, ``x0`` holds ``sigma_0``'s noise already:
    Alg. 1's ``sqrt(tau^2 - eps^2)``). The step that ends at ``s = 0`` returns ``x0`` (a grid
    ending above 0 needs ``denoise=True`` for Alg. 1's last evaluation ``f(x, tau_N)``). A
    ``consistency_function`` with ``t_min > 0`` returns the point at ``t_min``, which this treats
    as ``t = 0``'s (an error of order ``sigma_{t_min}`` in the noise added).
    One evaluation per step; stochastic (a key is needed) unless you run a single step from
    ``x_init`` with your own loop.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> f = jd.Field(lambda x, t: jnp.zeros_like(x) + 3.0, "x0")  # every trajectory ends at 3
    >>> sol = jd.sample(jax.random.key(0), jd.linear_path(), f, (4, 2), sampler=consistency(),
    ...                 steps=2)
    >>> float(sol.x.min()), float(sol.x.max()), int(sol.nfe)
    (3.0, 3.0, 2)
    """

    def step(key, path, field, state: State, t, s) -> State:
        x = state.x
        x0 = field(x, batch_time(t, x))
        zero = jnp.zeros_like(s)
        scale = path.alpha(s) / path.alpha(zero)  # from t = 0's point, noise sigma_0, to s's
        var = jnp.square(path.sigma(s)) - jnp.square(scale * path.sigma(zero))
        fresh = jnp.sqrt(jnp.where(var > 0, var, 1.0))  # 0 at s = 0 (and rounding below): x0
        renoised = expand_like(scale, x) * x0 + expand_like(fresh, x) * normal(key, x)
        return State(jnp.where(var > 0, renoised, x0).astype(x.dtype))

    return Sampler(
        name="consistency()",
        init=_init,
        step=step,
        evals_per_step=1,
        stochastic=True,
        grid=_to_zero,
        steps=1,
        t_end=0.0,
        reaches_zero=True,
        check=_needs_target(
            "x0",
            "a consistency model predicts the trajectory's end at the data: a field of target "
            "'x0' (wrap the network with jd.consistency_function)",
        ),
    )
