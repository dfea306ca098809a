r"""Exact conversions between network targets, through one hub: the pair ``(x0, eps)``.

At ``(x_t, t)`` on a path ``x_t = alpha_t x0 + sigma_t eps`` the five usual targets are

=============  =========================================  ==========================================
target         value                                      back to ``(x0, eps)``
=============  =========================================  ==========================================
``"eps"``      ``eps`` (Ho et al. 2020)                   ``x0 = (x - sigma eps) / alpha``
``"x0"``       ``x0`` (the denoiser, Karras et al. 2022)  ``eps = (x - alpha x0) / sigma``
``"score"``    ``-eps / sigma`` (Tweedie; Song 2021)       ``eps = -sigma score``
``"v"``        ``alpha eps - sigma x0`` (Salimans & Ho)   ``x0 = (alpha x - sigma v)/(alpha^2+sigma^2)``
``"velocity"`` ``alpha' x0 + sigma' eps`` (the PF-ODE)    solve ``[[alpha, sigma], [alpha', sigma']]``
=============  =========================================  ==========================================

For a network, ``x0`` and ``eps`` are the posterior means ``E[x0 | x_t]`` and ``E[eps | x_t]``;
because every map is affine in ``(x0, eps)`` given ``x_t``, the conversions are exact for posterior
means too. ``velocity`` is the probability-flow ODE's drift ``dx/dt`` with ``t`` running from data
to noise; in the ``t = 0``-is-noise convention of Meta's ``flow_matching`` it is ``-velocity``.

Each conversion divides by ``alpha`` (from ``eps`` or ``score``), ``sigma`` (from ``x0``), or
``alpha sigma' - sigma alpha'`` (from ``velocity``), and ``score`` divides by ``sigma``: avoid the
endpoint where that is 0 (``t = 0`` for ``sigma``; ``t = 1`` for ``alpha`` on the linear and cosine
paths) -- sample to ``t_min > 0``. A ``t`` known at trace time that hits such a zero raises a
``ValueError`` naming the coefficient; a traced one gives inf or NaN there.

Precision (the policy of ``jaxdiff.paths``): the coefficients are computed in
``max(float32, dtype of t)`` -- ``t``'s dtype never comes from ``x`` -- the arithmetic runs in
``max(float32, dtype of x)``, and every result has ``x``'s dtype (the default float for an integer
``x``). A bfloat16 state stays bfloat16, with one rounding at the end.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import check_same_shape, coef_time, concrete, expand_like, widen
from jaxdiff.paths import GaussianPath

Array = jax.Array
Target = Literal["score", "eps", "x0", "v", "velocity"]
TARGETS: tuple[str, ...] = get_args(Target)

__all__ = ["Target", "TARGETS", "to_x0_eps", "from_x0_eps", "convert", "hub_matrix"]


def _check_target(target: str, name: str = "target") -> None:
    if target not in TARGETS:
        raise ValueError(f"{name} must be one of {TARGETS}; got {target!r}")


def _check_divisors(path: GaussianPath, t: ArrayLike, src: str, dst: str) -> None:
    """Raise if a ``t`` known at trace time makes ``src -> dst`` divide by 0 (``dst = "hub"``: the
    pair ``(x0, eps)``)."""
    if src == dst or concrete(t) is None:
        return
    with jax.ensure_compile_time_eval():
        tc = coef_time(t)
        a, s = path.alpha(tc), path.sigma(tc)
        divisors = {}
        if {src, dst} != {"eps", "score"} and src in ("eps", "score"):
            divisors["alpha_t"] = a
        if src == "x0" or dst == "score":
            divisors["sigma_t"] = s
        to = "(x0, eps)" if dst == "hub" else repr(dst)
        if "velocity" in (src, dst):
            da, ds = path.d_alpha(tc), path.d_sigma(tc)
            finite = jnp.isfinite(da) & jnp.isfinite(ds)
            if not bool(jnp.all(finite)):  # VP's sigma' at t = 0
                raise ValueError(
                    f"converting {src!r} to {to} needs alpha_t' and sigma_t', which are not "
                    f"finite at t = {_first(t, ~finite)} on this path; take t inside the "
                    "open interval"
                )
            if src == "velocity":
                divisors["alpha_t sigma_t' - sigma_t alpha_t'"] = a * ds - s * da
        for name, d in divisors.items():
            if bool(jnp.any(d == 0)):
                raise ValueError(
                    f"converting {src!r} to {to} divides by {name}, which is 0 at t = "
                    f"{_first(t, d == 0)} on this path; take t inside the open interval"
                )


def _first(t: ArrayLike, where: Any = None) -> str:
    """The first values of a known ``t`` for an error (a batch of 4096 times was printed whole),
    of those ``where`` holds (the offending ones: the first four of a grid had been shown)."""
    value = concrete(t)
    if value.ndim == 0:
        return str(value.tolist())
    flat = value.ravel()
    if where is not None:
        flat = flat[np.broadcast_to(np.asarray(where), value.shape).ravel()]
    return str(flat[:4].tolist())[:-1] + (", ...]" if flat.size > 4 else "]")


def _coefs(path: GaussianPath, x: Array, t, derivatives: bool):
    """Coefficients in ``max(float32, dtype of t)``, cast to ``x``'s (wide) dtype to multiply it."""
    t = coef_time(t)

    def expand(coef):
        return expand_like(coef, x).astype(x.dtype)

    a, s = expand(path.alpha(t)), expand(path.sigma(t))
    if not derivatives:
        return a, s, None, None
    return a, s, expand(path.d_alpha(t)), expand(path.d_sigma(t))


def hub_matrix(path: GaussianPath, t: ArrayLike, target: Target) -> tuple[Array, ...]:
    """``(h00, h01, h10, h11)`` at ``t``: ``x0 = h00 x + h01 value``, ``eps = h10 x + h11 value``.

    The map of :func:`to_x0_eps` as four coefficients of ``t`` alone (the map is affine in ``x``
    and the prediction): a sampler tabulates them over its grid once, before its loop. Unlike
    :func:`convert`, a ``t`` where a divisor is 0 is not refused: the coefficients are ``inf``
    there (the samplers that start at ``alpha_t = 0`` take their step's limit themselves).
    """
    _check_target(target)
    t = coef_time(t)
    a, s = path.alpha(t), path.sigma(t)
    zero, one = jnp.zeros_like(a), jnp.ones_like(a)
    if target == "eps":
        return 1 / a, -s / a, zero, one
    if target == "x0":
        return zero, one, 1 / s, -a / s
    if target == "score":
        return 1 / a, s * s / a, zero, -s
    if target == "v":
        norm = a**2 + s**2
        return a / norm, -s / norm, s / norm, a / norm
    da, ds = path.d_alpha(t), path.d_sigma(t)
    det = a * ds - s * da
    return ds / det, -s / det, -da / det, a / det


def _alpha_times_slope(path: GaussianPath, t: Array, target: str) -> tuple[Array, Array]:
    """``(alpha_t * B_t, alpha_t)`` where ``B_t = d target / d score`` at fixed ``x``: each target
    is affine in the score, ``score: 1``, ``eps: -sigma``, ``x0: sigma^2 / alpha``, ``v:
    -sigma (alpha^2 + sigma^2) / alpha``, ``velocity: -g^2 / 2 = alpha' sigma^2 / alpha -
    (sigma^2)' / 2``. ``alpha B`` stays finite where ``alpha = 0`` (and ``(sigma^2)'`` where VP's
    ``sigma'`` is infinite, at ``t = 0``)."""
    a, var = path.alpha(t), path.sigma_sq(t)
    if target == "score":
        return a, a
    if target == "eps":
        return -a * path.sigma(t), a
    if target == "x0":
        return var, a
    if target == "v":
        return -path.sigma(t) * (a * a + var), a
    d_var = jax.jvp(path.sigma_sq, (t,), (jnp.ones_like(t),))[1]
    return path.d_alpha(t) * var - 0.5 * a * d_var, a


def _score_slope(path: GaussianPath, t: ArrayLike, target: str) -> Array:
    """``B_t = d target / d score`` at fixed ``x`` (``1``, ``-sigma``, ``sigma^2 / alpha``, ...; see
    :func:`_alpha_times_slope`): a change ``delta`` of the score moves the prediction by
    ``B_t delta``, exactly (each target is affine in the score). Raises where a ``t`` known at trace
    time has ``alpha_t = 0`` and ``B_t`` is infinite (``x0``, ``v``, ``velocity``)."""
    _check_divisors(path, t, "score", target)
    tc = coef_time(t)
    if target == "score":
        return jnp.ones_like(tc)
    if target == "eps":
        return -path.sigma(tc)
    a_slope, a = _alpha_times_slope(path, tc, target)
    return a_slope / a


def _add_to_score(
    path: GaussianPath, x: Array, t: ArrayLike, pred: Array, target: str, grad: Array, scale
) -> Array:
    """The ``target`` prediction ``pred`` after adding ``scale * grad`` to the score it implies:
    ``pred + B_t scale grad`` (:func:`_score_slope`), in at least float32, returned in ``x``'s
    dtype."""
    out, _, pred_w, grad = widen(x, pred, grad)
    slope = expand_like(_score_slope(path, t, target), pred_w).astype(pred_w.dtype)
    scale = expand_like(jnp.asarray(scale), pred_w).astype(pred_w.dtype)
    return (pred_w + scale * slope * grad).astype(out)


def to_x0_eps(
    path: GaussianPath, x: ArrayLike, t: ArrayLike, value: ArrayLike, target: Target
) -> tuple[Array, Array]:
    """Map a prediction of ``target`` at ``(x, t)`` to the hub ``(x0, eps)``."""
    _check_target(target)
    check_same_shape(value, x, f"the {target!r} prediction")
    _check_divisors(path, t, target, "hub")
    out, x, value = widen(x, value)
    x0, eps = _to_hub(path, x, t, value, target)
    return x0.astype(out), eps.astype(out)


def _to_hub(path: GaussianPath, x: Array, t, value: Array, target: str) -> tuple[Array, Array]:
    a, s, da, ds = _coefs(path, x, t, target == "velocity")
    if target == "eps":
        return (x - s * value) / a, value
    if target == "x0":
        return value, (x - a * value) / s
    if target == "score":
        eps = -s * value
        return (x - s * eps) / a, eps
    if target == "v":
        norm = a**2 + s**2
        return (a * x - s * value) / norm, (s * x + a * value) / norm
    det = a * ds - s * da  # velocity: [[a, s], [da, ds]] @ (x0, eps) = (x, u)
    return (ds * x - s * value) / det, (a * value - da * x) / det


def from_x0_eps(
    path: GaussianPath, x: ArrayLike, t: ArrayLike, x0: ArrayLike, eps: ArrayLike, target: Target
) -> Array:
    """The value of ``target`` for the hub pair ``(x0, eps)`` at ``(x, t)``.

    With the true ``x0`` and ``eps`` of a training pair this is the regression target of a loss.
    """
    _check_target(target)
    x = jnp.asarray(x)
    # x0 and eps may broadcast to x's shape (one x0 for all samples), not beyond it: the eps
    # target returned eps's own shape
    x0, eps = (_broadcast_to_x(v, x, name) for v, name in ((x0, "x0"), (eps, "eps")))
    _check_divisors(path, t, "(x0, eps)", target)  # a known t = 0 gave -inf scores silently
    out, x, x0, eps = widen(x, x0, eps)
    return _from_hub(path, x, t, x0, eps, target).astype(out)


def _broadcast_to_x(value: ArrayLike, x: Array, name: str) -> Array:
    """``value`` broadcast to ``x.shape``, or a ValueError naming both shapes."""
    value = jnp.asarray(value)
    try:
        fits = jnp.broadcast_shapes(value.shape, x.shape) == x.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} has shape {value.shape}; it must broadcast to x's shape {x.shape}"
        )
    return jnp.broadcast_to(value, x.shape)


def _from_hub(path: GaussianPath, x: Array, t, x0: Array, eps: Array, target: str) -> Array:
    a, s, da, ds = _coefs(path, x, t, target == "velocity")  # also checks t's shape
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "score":
        return -eps / s
    if target == "v":
        return a * eps - s * x0
    return da * x0 + ds * eps


def convert(
    path: GaussianPath, x: ArrayLike, t: ArrayLike, value: ArrayLike, *, src: Target, dst: Target
) -> Array:
    """Convert a prediction from target ``src`` to target ``dst`` at ``(x, t)`` on ``path``.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff import vp_path
    >>> x, eps = jnp.ones((3, 2)), 0.5 * jnp.ones((3, 2))
    >>> score = convert(vp_path(), x, 0.5, eps, src="eps", dst="score")
    >>> bool(jnp.allclose(score, -eps / vp_path().sigma(0.5)))
    True
    """
    _check_target(src, "src")
    _check_target(dst, "dst")
    check_same_shape(value, x, f"the {src!r} prediction")
    _check_divisors(path, t, src, dst)
    return _convert(path, x, t, value, src, dst)


def _convert(
    path: GaussianPath, x: ArrayLike, t: ArrayLike, value: ArrayLike, src: str, dst: str
) -> Array:
    """:func:`convert` without its checks: inf or NaN where a divisor is 0 (for callers that
    mask those points themselves)."""
    out, x, value = widen(x, value)
    if src == dst:
        return value.astype(out)
    if {src, dst} == {"eps", "score"}:  # only sigma: stays finite where alpha = 0
        s = expand_like(path.sigma(coef_time(t)), x).astype(x.dtype)
        return (-value / s if dst == "score" else -s * value).astype(out)
    x0, eps = _to_hub(path, x, t, value, src)
    return _from_hub(path, x, t, x0, eps, dst).astype(out)
