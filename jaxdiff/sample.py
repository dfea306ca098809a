"""``sample``: draw from a path's data distribution with its reverse dynamics.

``sample`` builds the reverse family of a path (``jaxdiff.sde``) from a field predicting any target
and integrates it with ``jaxdiff.integrate`` from the prior at ``t = 1`` down to ``t_end = 1e-3``:
``eta = 0`` is the probability-flow ODE, ``eta = 1`` the reverse SDE. Fixed grids run at the speed
of a hand-written ``lax.scan`` (see ``jaxdiff.integrate``).
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import check_time, concrete
from jaxdiff.conversions import Target, _check_target
from jaxdiff.integrate import Solution, integrate
from jaxdiff.paths import GaussianPath
from jaxdiff.sde import _is_zero, reverse_diffusion, reverse_drift

Array = jax.Array

__all__ = ["Solution", "integrate", "sample"]


def sample(
    key: Array | None,
    path: GaussianPath,
    field: Callable[[Array, Array], Array],
    shape: tuple[int, ...] | None = None,
    *,
    target: Target = "score",
    eta: ArrayLike = 0.0,
    x_init: ArrayLike | None = None,
    steps: int = 100,
    ts: ArrayLike | None = None,
    t_start: ArrayLike = 1.0,
    t_end: ArrayLike = 1e-3,
    solver: diffrax.AbstractSolver | None = None,
    save_ts: ArrayLike | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 4096,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> Solution:
    """Sample a path's data distribution by integrating its reverse dynamics from ``t = 1``.

    ``field(x, t)`` predicts ``target`` (``"score"``, ``"eps"``, ``"x0"``, ``"v"`` or
    ``"velocity"``) at a scalar ``t``, e.g. ``functools.partial(model.apply, params)`` or an
    oracle. ``eta = 0`` integrates the probability-flow ODE, ``eta = 1`` the reverse SDE
    (Song et al. 2021), values between interpolate (Karras et al. 2022). Starts from
    ``path.prior_sample`` (``shape``) or from ``x_init``, at ``t_start`` (default 1); ends at
    ``t_end`` (default ``1e-3``: scores blow up as ``sigma -> 0``). ``ts`` overrides the uniform
    grid (see ``jaxdiff.schedules`` for Karras and log-SNR grids). ``key`` may be ``None`` for an
    ODE (``eta = 0``) started from ``x_init``.

    >>> import jax, jax.numpy as jnp
    >>> import jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.linear_path()
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "velocity"), (4096, 2), steps=50,
    ...                 target="velocity")
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1)
    2.0
    """
    _check_target(target)
    check_time(t_start, "t_start")
    check_time(t_end, "t_end")
    sde = not _is_zero(eta)
    _check_endpoints(path, target, sde, t_start, t_end, ts)
    if key is None and (x_init is None or sde):
        raise ValueError("sampling from the prior or with eta != 0 needs a PRNG key")
    prior_key, noise_key = jax.random.split(key) if key is not None else (None, None)
    if x_init is None:
        if shape is None:
            raise ValueError("give the sample shape, or x_init")
        x_init = path.prior_sample(prior_key, tuple(shape))
    x_init = jnp.asarray(x_init)
    t_probe = jnp.asarray(t_start, x_init.dtype)
    out = jax.eval_shape(field, x_init, t_probe)
    if out.shape != x_init.shape:
        raise ValueError(
            f"field(x, t) returned shape {out.shape} but x has shape {x_init.shape}; the field "
            f"must predict the {target!r} target with x's shape"
        )

    def drift(x, t):
        return reverse_drift(path, x, t, field(x, t), target=target, eta=eta)

    diffusion = (lambda x, t: reverse_diffusion(path, t, eta)) if sde else None
    return integrate(
        drift,
        x_init,
        ts=ts,
        t_start=t_start,
        t_end=t_end,
        steps=steps,
        diffusion=diffusion,
        key=noise_key if sde else None,
        solver=solver,
        save_ts=save_ts,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        adjoint=adjoint,
    )


def _check_endpoints(path, target, sde, t_start, t_end, ts) -> None:
    """Raise at trace time when the dynamics are singular at the requested end times."""
    if ts is not None:
        value = concrete(ts)
        if value is None:
            return
        t_start, t_end = value[0], value[-1]
    a = concrete(path.alpha(jnp.asarray([t_start, t_end])))
    s = concrete(path.sigma(jnp.asarray([t_start, t_end])))
    if a is None or s is None:
        return
    if np.any(a == 0) and (sde or target in ("eps", "score")):
        raise ValueError(
            f"alpha_t = 0 at t = {float(t_start) if a[0] == 0 else float(t_end)} on this path, where "
            f"the reverse SDE (eta != 0) and the {target!r} target are singular; start at t < 1 "
            "(e.g. t_start=1 - 1e-3) or use the 'x0' / 'velocity' target with eta = 0"
        )
    if np.any(s == 0):
        raise ValueError(
            "sigma_t = 0 at an end of the time range, where scores and conversions divide by 0; "
            "stop at t_end > 0 (e.g. 1e-3)"
        )
