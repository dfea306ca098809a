r"""Reverse-time dynamics of a path's SDE, Langevin dynamics and Brownian motion.

The forward SDE of a :class:`~jaxdiff.GaussianPath` is ``dx = f(t) x dt + g(t) dw`` (its methods
``drift``, ``diffusion``, ``transition``, ``prior_sample``, ``prior_logp``). Run backwards from
``t = 1`` to ``t = 0``, the family

    ``dx = [f(t) x - (1 + eta^2)/2 g(t)^2 score(x, t)] dt + eta g(t) dw_bar``

has the path's marginals for every ``eta >= 0`` (Song et al. 2021; Karras et al. 2022, eq. 6):
``eta = 1`` is Anderson's (1982) reverse SDE, ``eta = 0`` the probability-flow ODE, ``eta > 1``
adds more Langevin-like noise. The drift is computed from any target through the ``(x0, eps)`` hub
as ``velocity - eta^2/2 g^2 score``, which is finite at ``alpha = 0`` for ``eta = 0``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import (
    as_time,
    check_count,
    check_finite,
    check_positive,
    coef_time,
    concrete,
    expand_like,
    normal,
    normal_like,
    renamed,
    value_check,
    widen,
)
from jaxdiff.conversions import from_x0_eps
from jaxdiff.field import Field, as_field, evaluate, predict
from jaxdiff.paths import GaussianPath

Array = jax.Array
Eta = ArrayLike | Callable[[Array], Array]

__all__ = [
    "reverse_drift",
    "reverse_diffusion",
    "probability_flow_drift",
    "langevin",
    "brownian_motion",
]


def reverse_drift(
    path: GaussianPath, field: Field, x: Array, t: ArrayLike, *, eta: Eta = 1.0
) -> Array:
    """Drift ``f x - (1 + eta^2)/2 g^2 score`` of the reverse family at ``(x, t)``.

    ``eta = 1``: Anderson's reverse SDE; ``eta = 0``: the probability-flow ODE (Song et al. 2021).
    ``eta`` may be a function of ``t`` (any ``eta(t) >= 0`` keeps the marginals). Computed as
    ``velocity - eta^2/2 g^2 score`` from the field's prediction through the ``(x0, eps)`` hub.

    >>> import jax.numpy as jnp, jaxdiff as jd
    >>> path = jd.vp_path()
    >>> field = jd.Field(lambda x, t: jnp.zeros_like(x), "eps")  # eps = 0: score 0
    >>> reverse_drift(path, field, jnp.ones((1, 2)), 0.5).tolist()  # f(0.5) x = -beta(0.5)/2
    [[-5.025, -5.025]]
    """
    eta = check_eta(eta)  # a traced eta: at run time
    return _reverse_drift(path, field, x, _finite_noise(path, t, eta), eta)


def _reverse_drift(path: GaussianPath, field: Field, x: Array, t: ArrayLike, eta: Eta) -> Array:
    """:func:`reverse_drift` with ``eta`` unchecked (the samplers check it once, not per step)."""
    field = as_field(field)
    x = jnp.asarray(x)
    if field.target == "velocity" and _is_zero(eta):
        return evaluate(field, x, t)
    x0, eps = predict(path, field, x, t)
    velocity = from_x0_eps(path, x, t, x0, eps, "velocity")
    if _is_zero(eta):
        return velocity
    score = from_x0_eps(path, x, t, x0, eps, "score")
    t = as_time(t)
    e = eta_at(eta, t)
    out, velocity, score = widen(velocity, score)  # g^2 overflows float16 on VE paths (2.5e6)
    g2 = expand_like(_eta_times(e, path.diffusion_sq, t, square=True), x).astype(velocity.dtype)
    return (velocity - 0.5 * g2 * score).astype(out)


def probability_flow_drift(path: GaussianPath, field: Field, x: Array, t: ArrayLike) -> Array:
    """Drift ``f x - g^2 score / 2`` of the probability-flow ODE (``reverse_drift`` with ``eta = 0``)."""
    return reverse_drift(path, field, x, t, eta=0.0)


def reverse_diffusion(path: GaussianPath, t: ArrayLike, eta: Eta = 1.0) -> Array:
    """Noise scale ``eta(t) g(t)`` of the reverse family. A negative traced ``eta`` gave a
    negative scale under ``jit``: it is checked when the call runs."""
    eta = check_eta(eta)
    return _reverse_diffusion(path, _finite_noise(path, t, eta), eta)


def _finite_noise(path: GaussianPath, t: ArrayLike, eta: Eta) -> Array:
    """``t``, refused where ``eta != 0`` meets an infinite ``g(t)`` (``alpha_t = 0``: ``t = 1`` on
    the linear and cosine paths), eagerly by name, under ``jit`` at run time: the drift and the
    noise scale were inf and NaN there. (The samplers' grids start below such a ``t``.)"""
    msg = (
        "eta > 0 where g(t) is infinite (alpha_t = 0: t = 1 on the linear and cosine paths): the "
        "reverse SDE has no finite drift or noise there; take t < 1 (jd.sample starts at 1 - 1e-3)"
    )

    def bad(xp, t):
        return jnp.any((eta_at(eta, t) != 0) & ~jnp.isfinite(path.diffusion(t)))

    return value_check(as_time(t), bad, msg, lambda v: f"t = {np.ravel(v).tolist()[:4]}")


def _reverse_diffusion(path: GaussianPath, t: ArrayLike, eta: Eta) -> Array:
    """:func:`reverse_diffusion` with ``eta`` unchecked (the samplers check it once)."""
    t = as_time(t)
    return _eta_times(eta_at(eta, t), path.diffusion, t)


def _eta_times(e: Array, coef: Callable, t: Array, square: bool = False) -> Array:
    """``e * coef(t)`` (``e^2`` with ``square``), exactly 0 where ``e = 0`` meets an infinite
    ``coef``: ``g`` is infinite where ``alpha_t = 0`` (``t = 1`` on the linear and cosine paths),
    and ``0 * inf`` was NaN for an ``eta`` of 0 given as a function of ``t`` or traced (a Python 0
    was caught before). The inner ``where`` keeps the derivatives finite there; elsewhere the
    product and its derivatives are untouched (``d / d eta`` at 0 is still ``g(t)``)."""
    zero = (e == 0) & ~jnp.isfinite(coef(t))
    value = coef(jnp.where(zero, jnp.asarray(0.5, t.dtype), t))
    return jnp.where(zero, jnp.zeros_like(value), (jnp.square(e) if square else e) * value)


def eta_at(eta: Eta, t: ArrayLike) -> Array:
    """``eta(t)`` for a function of time, else ``eta``."""
    return jnp.asarray(eta(t) if callable(eta) else eta)


def check_eta(eta: Eta, name: str = "eta", hi: float | None = None) -> Eta:
    """Raise for a negative or non-finite ``eta`` (above ``hi`` when given); return ``eta``.

    Known at trace time, it is checked now (a function of ``t`` on a grid of 33 times, under an
    outer ``jit`` too where it depends on ``t`` alone); a traced
    ``eta`` comes back tied to a run-time check, so use the result (a dropped result drops the
    check: a traced ``eta = 2`` ran DDIM with its noise term silently clipped)."""
    bounds = "[0, inf)" if hi is None else f"[0, {hi}]"

    def outside(xp, e):
        return ~(xp.isfinite(e) & (e >= 0) & (True if hi is None else e <= hi))

    def bad(xp, e):
        return xp.any(outside(xp, e))

    probe = np.linspace(0.0, 1.0, 33)
    if callable(eta):
        # a function of t alone is known at trace time under an outer jit too (its ops on the
        # probe grid were staged, and its check became a run-time one)
        with jax.ensure_compile_time_eval():
            value = concrete(eta_at(eta, probe))
        if value is None:  # a traced function: each value is checked when it runs
            msg = f"{name} must lie in {bounds}"
            return lambda t: value_check(eta_at(eta, t), bad, msg)
    else:
        value = concrete(eta)
        if value is None:
            return value_check(jnp.asarray(eta), bad, f"{name} must lie in {bounds}")
    v = np.asarray(value)
    if bad(np, v):
        if callable(eta) and v.shape == probe.shape:  # the probe times where it is out of range
            wrong = np.flatnonzero(outside(np, v))[:4]
            pairs = ", ".join(f"{v[i]:.4g} at t = {probe[i]:.4g}" for i in wrong)
            raise ValueError(f"{name} must lie in {bounds}; got {name}(t) = {pairs}")
        raise ValueError(f"{name} must lie in {bounds}; got {name} = {np.ravel(v)[:4].tolist()}")
    return eta


def _is_zero(value) -> bool:
    if callable(value):
        return False
    v = concrete(value)
    return v is not None and v.shape == () and float(v) == 0.0


def langevin(
    key: Array,
    score_fn: Callable[[Array], Array],
    x: ArrayLike,
    *,
    step_size: ArrayLike,
    steps: int | None = None,
    n_steps: int | None = None,
) -> Array:
    """Unadjusted Langevin dynamics ``x <- x + step * score(x) + sqrt(2 step) z`` for ``steps``;
    ``step_size`` a scalar or one per sample (shaped like a per-sample ``t``).

    Samples approximately from ``p`` when ``score_fn = grad log p`` (Roberts & Tweedie 1996; the
    sampler of Song & Ermon 2019 at a fixed noise level). Bias is ``O(step_size)``.

    >>> import jax, jax.numpy as jnp
    >>> x = langevin(jax.random.key(0), lambda x: -x, jnp.zeros((4096, 1)), step_size=0.05,
    ...              steps=400)
    >>> round(float(x.var()), 1)  # N(0, 1), up to the O(step) bias and sampling noise
    1.0
    """
    step_size = check_positive(step_size, "step_size")
    steps = renamed(steps, n_steps, "steps", "n_steps", "langevin")
    if steps is None:
        raise TypeError("langevin needs steps= (the number of Langevin steps)")
    steps = check_count(steps, "steps", minimum=0)  # 2.7 ran 2 steps
    x = check_finite(jnp.asarray(x), "x")
    # The chain runs in max(float32, dtype of x) and returns x's dtype (the precision policy):
    # a bfloat16 state rounded every step away (N(2, 0.25), step 1e-4, 3000 steps: mean 1.10
    # for 1.40); score_fn still sees x in its own dtype, as sample's fields do.
    out, x = widen(x)
    # one step per sample as times are (a (batch,) step lined up with the features before)
    step_size = expand_like(jnp.asarray(step_size), x, "step_size").astype(x.dtype)
    scale = jnp.sqrt(2.0 * step_size)

    def step(x, k):
        score = jnp.asarray(score_fn(x.astype(out))).astype(x.dtype)
        move = step_size * score + scale * normal_like(k, x)
        return (x + move).astype(x.dtype), None  # a float32 step size keeps the carry's dtype

    return jax.lax.scan(step, x, jax.random.split(key, steps))[0].astype(out)


def brownian_motion(key: Array, ts: ArrayLike, shape: tuple[int, ...] = ()) -> Array:
    """Brownian motion ``W`` at the times ``ts`` (``W_0 = 0``): shape ``(len(ts), *shape)``.

    Increments ``W_t - W_s ~ N(0, (t - s) I)`` are independent; ``ts`` must be non-decreasing and
    ``>= 0``, so ``Cov(W_s, W_t) = min(s, t) I``. ``W`` comes in ``max(float32, dtype of ts)``.
    """
    ts = coef_time(ts)  # the increments in float32 or wider: a bfloat16 ts rounded them
    if ts.ndim != 1:
        raise ValueError(f"ts must be one-dimensional; got shape {ts.shape}")
    ts = value_check(
        ts,
        lambda xp, w: ~(xp.all(xp.isfinite(w) & (w >= 0)) & xp.all(xp.diff(w) >= 0)),
        "ts must be finite, non-decreasing and >= 0",
    )
    dts = jnp.diff(ts, prepend=jnp.zeros((1,), ts.dtype))
    z = normal(key, (ts.shape[0], *shape), ts.dtype)
    return jnp.cumsum(expand_like(jnp.sqrt(dts), z) * z, axis=0)
