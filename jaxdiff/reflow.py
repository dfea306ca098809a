r"""Reflow (rectified flow): straighter flows by retraining on a flow's own pairs.

Liu, Gong & Liu (2023), "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow". A trained flow's ODE couples each noise ``x1`` with the sample ``x0`` it reaches;
retraining flow matching on these fixed pairs (``x_t = alpha_t x0 + sigma_t x1``, regression on
``alpha_t' x0 + sigma_t' x1``) gives a flow with the same marginals whose trajectories cross less,
hence are straighter and need fewer Euler steps. Time runs from data (``t = 0``) to noise
(``t = 1``): the paper's ``X_t = t X_1 + (1 - t) X_0`` with ``X_0`` noise is ours with
``t -> 1 - t``.

Its measure, Liu et al.'s straightness, is :func:`jaxdiff.straightness`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp

from jaxdiff.field import Field, as_field
from jaxdiff.losses import TimeSampler, per_example_loss, uniform_time
from jaxdiff.paths import GaussianPath, linear_path
from jaxdiff.sample import sample
from jaxdiff.samplers import ode

Array = jax.Array

__all__ = ["reflow_pairs", "reflow_loss"]


def reflow_pairs(
    key: Array,
    path: GaussianPath,
    field: Field,
    shape: tuple[int, ...],
    *,
    steps: int = 100,
    solver: diffrax.AbstractSolver | None = None,
    t_end: float = 1e-3,
) -> tuple[Array, Array]:
    """``(x0, x1)``: prior draws ``x1`` of ``shape`` and where ``field``'s probability-flow ODE takes
    them (``steps`` steps of ``solver``, default Euler, from ``t = 1`` to ``t_end``).

    Cost: ``steps`` (x the solver's stages) network evaluations per pair. For many pairs call it
    on chunks of keys (``jax.lax.map``) to bound memory.
    """
    field = as_field(field)
    x1 = path.prior_sample(key, tuple(shape))
    sol = sample(None, path, field, x_init=x1, steps=steps, sampler=ode(solver), t_end=t_end)
    return sol.x, x1


def reflow_loss(
    net: Field, path: GaussianPath | None = None, *, time_sampler: TimeSampler | None = None
) -> Callable[[Any, Array, Any], Array]:
    """Flow matching on fixed pairs: ``loss(params, key, (x0, x1))`` with ``x_t = alpha_t x0 +
    sigma_t x1`` and the regression target ``alpha_t' x0 + sigma_t' x1`` (in velocity units, whatever
    ``net.target``); ``t`` from ``time_sampler`` (default uniform on ``[0, 1]``)."""
    net = as_field(net, "net")
    path = linear_path() if path is None else path
    time_sampler = uniform_time(0.0, 1.0) if time_sampler is None else time_sampler

    def loss(params: Any, key: Array, batch: Any) -> Array:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ValueError("a reflow batch is a pair (x0, x1) of coupled data and noise")
        x0, x1 = jnp.asarray(batch[0]), jnp.asarray(batch[1])
        t = time_sampler(key, (x0.shape[0],)).astype(x0.dtype)
        pred = net.apply(params, path.interpolate(x0, x1, t), t)
        return jnp.mean(
            per_example_loss(pred, path, x0, x1, t, target=net.target, regress="velocity")
        )

    return loss
