r"""Reflow (rectified flow): straighter flows by retraining on a flow's own pairs.

Liu, Gong & Liu (2023), "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow". A trained flow's ODE couples each noise ``x1`` with the sample ``x0`` it reaches;
retraining flow matching on these fixed pairs (``x_t = alpha_t x0 + sigma_t x1``, regression on
``alpha_t' x0 + sigma_t' x1``) gives a flow with the same marginals whose trajectories cross less,
hence are straighter and need fewer Euler steps. Time runs from data (``t = 0``) to noise
(``t = 1``): the paper's ``X_t = t X_1 + (1 - t) X_0`` with ``X_0`` noise is ours with
``t -> 1 - t``.

The retraining is flow matching with the source points given in the batch, so it needs no loss of
its own: :func:`reflow_pairs` returns the dict batch ``{"x0": samples, "x1": noise}`` that
``jd.flow_matching_loss`` (any path ending at the source) takes as it is::

    pairs = reflow_pairs(key, path, teacher, (n, 2))
    loss = jd.flow_matching_loss(jd.Field(model.apply, "velocity"), path)
    batch = jax.tree.map(lambda a: a[idx], pairs)   # a minibatch of the fixed pairs

Its measure, Liu et al.'s straightness, is :func:`jaxdiff.straightness`.
"""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp

from jaxdiff._checks import check_shape_tuple
from jaxdiff._engine import VELOCITY_HINT, require_gaussian_path
from jaxdiff.field import Field, as_field
from jaxdiff.paths import GaussianPath
from jaxdiff.sample import sample
from jaxdiff.samplers import ode

Array = jax.Array

__all__ = ["reflow_pairs"]


def reflow_pairs(
    key: Array | None,
    path: GaussianPath,
    field: Field,
    shape: tuple[int, ...] | None = None,
    *,
    x1: Array | None = None,
    steps: int = 100,
    solver: diffrax.AbstractSolver | None = None,
    t_end: float = 1e-3,
) -> dict[str, Array]:
    """``{"x0": x0, "x1": x1}``: prior draws ``x1`` of ``shape`` (or the source points ``x1``
    given, for a flow from any source: ``x1=source(key, shape)``, ``key`` then unused) and
    where ``field``'s probability-flow ODE takes them (``steps`` steps of ``solver``, default
    Euler, from ``jd.sample``'s default start -- ``t = 1``, or ``1 - 1e-3`` for a field that
    divides by ``alpha_t = 0`` there -- to ``t_end``, then the denoising step ``x0_hat(x,
    t_end)``, which for a velocity field on the linear path is an Euler step to ``t = 0``: the
    pair's ``x0`` is the ODE's end at 0, not at ``t_end``, 1e-3 away) -- a batch for
    ``jd.flow_matching_loss``, which then regresses on ``alpha_t' x0 + sigma_t' x1`` along
    ``x_t = alpha_t x0 + sigma_t x1``.

    Cost: ``steps`` (x the solver's stages) network evaluations per pair. For many pairs call it
    on chunks of keys (``jax.lax.map``) to bound memory.
    """
    field = as_field(field)
    require_gaussian_path(path, "reflow_pairs", VELOCITY_HINT + " as x1=")
    if (x1 is None) == (shape is None):
        raise ValueError(
            "reflow_pairs takes exactly one of shape (prior draws) and x1= (source points)"
        )
    x1 = path.prior_sample(key, tuple(check_shape_tuple(shape))) if x1 is None else jnp.asarray(x1)
    sol = sample(
        None, path, field, x_init=x1, steps=steps, sampler=ode(solver), t_end=t_end, denoise=True
    )
    return {"x0": sol.x, "x1": x1}
