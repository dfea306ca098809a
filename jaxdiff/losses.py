r"""Training losses: regress a network on a path's target at random times.

Every loss draws ``t`` from a time sampler, ``eps ~ N(0, I)``, forms ``x_t = alpha_t x0 + sigma_t
eps`` on the path and returns the weighted mean squared error

    ``E_t E_{x0, eps} [ w(t) |convert(net(x_t, t), target -> regress) - y(x0, eps)|^2 ]``,

where ``y = from_x0_eps(..., regress)`` is the regression target (conditional velocity
``u_t(x | x0)`` for flow matching, ``eps`` for DDPM, ``x0``, ``v``, or the conditional score for
denoising score matching) and ``net`` is a :class:`~jaxdiff.Field` -- the network bound to the
target it predicts, e.g. ``jd.Field(model.apply, "eps")``. The squared error is averaged over the
data dimensions. Each constructor returns a pure ``loss(params, key, batch)`` that calls
``net.apply(params, x_t, t[, labels])`` with ``t`` of shape ``(batch,)``; ``batch`` is ``x0`` or
``(x0, labels)``. Swapping VP for flow matching is one argument (``path``); after training,
``net.bind(params)`` is the field the samplers take.

Sources and couplings: ``source`` (default ``N(0, I)``) draws ``x1`` for ``x_t = alpha_t x0 + sigma_t
x1`` from any distribution (:mod:`jaxdiff.sources`); a batch may also carry its own source points
as a dict ``{"x0": ..., "x1": ..., "labels": ...}`` (``x1`` and ``labels`` optional). ``coupling``
reorders the pairs before ``t`` is drawn (:mod:`jaxdiff.couplings`: mini-batch exact or entropic
OT, class-conditional). With a non-Gaussian source or a coupling other than the independent one,
``eps`` means ``x1`` and the ``score`` target is refused (Tweedie's ``-E[eps | x_t] / sigma_t``
needs Gaussian ``eps`` independent of ``x0``).

Times: ``uniform_time`` (default), ``logit_normal_time`` (Esser et al. 2024) and
``importance_time``, which draws ``t`` with density ``∝ w(t)`` and reweights by ``1 / density``
so the objective is unchanged and its variance lower (Song et al. 2021, "Maximum likelihood
training of score-based diffusion models"). Any ``(key, shape) -> t`` function works, e.g. a
discrete-time sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import (
    as_time,
    check_count,
    check_finite,
    check_positive,
    check_time,
    check_time_interval,
    coef_time,
    concrete,
    wide_dtype,
)
from jaxdiff.conversions import Target, _check_target, _convert, convert, from_x0_eps
from jaxdiff.field import Field, as_field
from jaxdiff.paths import GaussianPath, linear_path
from jaxdiff.schedules import shifted
from jaxdiff.sources import (
    as_source,
    check_gaussian_targets,
    check_source_path,
    draw_pairs,
    is_gaussian,
    normal_like,
    unpack_batch,
)
from jaxdiff.weightings import weight_in

Array = jax.Array
Weighting = Callable[[GaussianPath, Array], Array]
TimeSampler = Callable[[Array, tuple[int, ...]], Array]

__all__ = [
    "unit_weight",
    "sigma_sq_weight",
    "likelihood_weight",
    "uniform_time",
    "logit_normal_time",
    "shifted_time",
    "importance_time",
    "importance_weights",
    "ImportanceTime",
    "per_example_loss",
    "diffusion_loss",
    "flow_matching_loss",
    "score_matching_loss",
    "eps_loss",
    "x0_loss",
    "v_loss",
]

# --- weightings w(t), applied to the squared error in the regression target's units ---------


def unit_weight(path: GaussianPath, t: Array) -> Array:
    """``w(t) = 1``."""
    return jnp.ones_like(t)


def sigma_sq_weight(path: GaussianPath, t: Array) -> Array:
    """``w(t) = sigma_t^2``: score matching with it is the eps loss (Song et al. 2021, "sigma^2")."""
    return path.sigma_sq(t)


def likelihood_weight(path: GaussianPath, t: Array) -> Array:
    """``w(t) = g(t)^2``: the score loss then bounds the negative log-likelihood (Song et al. 2021b)."""
    return path.diffusion_sq(t)


# --- time samplers: (key, shape) -> t ------------------------------------------------------


class _Uniform(eqx.Module):
    t_min: float
    t_max: float
    from_top: bool = False  # draws in (t_min, t_max]: t_min itself never (jaxdiff.shortcut_loss)
    in_range = True  # draws inside [t_min, t_max] by construction: draw_times need not check

    def __call__(self, key: Array, shape: tuple[int, ...]) -> Array:
        if self.from_top:  # t_max - (t_max - t_min) U[0, 1): U = 0 is t_max
            return self.t_max - (self.t_max - self.t_min) * jax.random.uniform(key, shape)
        return jax.random.uniform(key, shape, minval=self.t_min, maxval=self.t_max)

    def pdf(self, t: Array) -> Array:
        inside = (t >= self.t_min) & (t <= self.t_max)
        return jnp.where(inside, 1.0 / (self.t_max - self.t_min), 0.0)


class _LogitNormal(eqx.Module):
    mean: float
    std: float
    t_min: float
    t_max: float
    in_range = True

    def __call__(self, key: Array, shape: tuple[int, ...]) -> Array:
        u = jax.nn.sigmoid(self.mean + self.std * jax.random.normal(key, shape))
        return self.t_min + (self.t_max - self.t_min) * u

    def pdf(self, t: Array) -> Array:
        """The density of ``t``: 0 outside ``(t_min, t_max)`` and at its ends, where it tends to 0
        (it was NaN there: ``log`` of 0 or of a negative)."""
        width = self.t_max - self.t_min
        u = (t - self.t_min) / width
        inside = (u > 0) & (u < 1)
        u = jnp.where(inside, u, 0.5)  # no log(0) or log(< 0), and no NaN in the gradient
        z = (jnp.log(u) - jnp.log1p(-u) - self.mean) / self.std
        dens = jnp.exp(-0.5 * z * z) / (self.std * jnp.sqrt(2 * jnp.pi) * u * (1 - u) * width)
        return jnp.where(inside, dens, 0.0)


def draw_times(time_sampler: TimeSampler, key: Array, n: int, dtype: Any = None) -> Array:
    """``n`` times from ``time_sampler(key, (n,))``, in ``dtype`` (default: float32 or wider).

    A sampler of the user's own is checked to draw inside ``[0, 1]`` eagerly and under ``jit``
    (one ``error_if`` a step): diffusers' integer timesteps (``[0, 1000)``) trained silently
    under ``jit``, to a loss that looked better than a right one. ``uniform_time``,
    ``logit_normal_time`` and ``edm_time`` draw inside their checked interval by construction
    (private classes marked ``in_range``) and are not checked.
    """
    t = time_sampler(key, (n,))
    if jnp.shape(t) != (n,):  # a scalar or (n, 1) reached the network as t of that shape
        raise ValueError(
            f"time_sampler(key, ({n},)) must return one time per example, shape ({n},); got "
            f"shape {jnp.shape(t)}"
        )
    t = coef_time(t) if dtype is None else as_time(t, dtype)
    if getattr(type(time_sampler), "in_range", False) is True:
        return t
    return check_time(t, "t drawn by the time_sampler")


def uniform_time(t_min: float = 1e-3, t_max: float = 1.0) -> TimeSampler:
    """``t ~ U[t_min, t_max]``; ``t_min > 0`` keeps conversions that divide by ``sigma_t`` finite.

    >>> import jax
    >>> uniform_time(0.2, 0.4)(jax.random.key(0), (1000,)).min() >= 0.2
    Array(True, dtype=bool)
    """
    check_time_interval(t_min, t_max)
    return _Uniform(float(t_min), float(t_max))


def logit_normal_time(
    mean: float = 0.0, std: float = 1.0, t_min: float = 1e-3, t_max: float = 1.0
) -> TimeSampler:
    """``t = t_min + (t_max - t_min) sigmoid(mean + std z)`` (Esser et al. 2024, SD3): mid times."""
    check_positive(std, "std")
    check_time_interval(t_min, t_max)
    check_finite(mean, "mean")
    return _LogitNormal(float(mean), float(std), float(t_min), float(t_max))


class _Shifted(eqx.Module):
    base: Any
    shift: float

    def __call__(self, key: Array, shape: tuple[int, ...]) -> Array:
        return shifted(self.base(key, shape), self.shift)

    def pdf(self, t: Array) -> Array:
        """``p(u) dt/du`` at the base time ``u = t / (s - (s - 1) t)`` (``dt/du = s / (s - (s -
        1) t)^2``); the base sampler needs a ``pdf``."""
        den = self.shift - (self.shift - 1.0) * t
        return self.base.pdf(t / den) * self.shift / jnp.square(den)


def shifted_time(time_sampler: TimeSampler, shift: float) -> TimeSampler:
    """The draws of ``time_sampler`` moved by SD3's shift ``t' = s t / (1 + (s - 1) t)``
    (:func:`~jaxdiff.shift_time`; Esser et al. 2024 train at ``s = 3`` for 1024^2 images, with
    ``logit_normal_time``). Its ``pdf`` (for :func:`~jaxdiff.log_snr_weighting`) is the base
    sampler's, changed by the map. A sampler of the user's own may draw outside ``[0, 1]``: its
    shifted draws are checked there (:func:`draw_times`).

    >>> import jax
    >>> t = shifted_time(uniform_time(), 3.0)(jax.random.key(0), (4000,))
    >>> bool(abs(float(t.mean()) - 0.676) < 0.01)  # E[t'] = s / (s - 1) (1 - log(s) / (s - 1))
    True
    """
    return _Shifted(time_sampler, float(check_positive(shift, "shift")))


class ImportanceTime(eqx.Module):
    """``t`` with density ``q(t) ∝ w(t)`` on ``[t_min, t_max]``, tabulated on a grid (inverse CDF).

    The draws invert the piecewise-linear CDF, so their density is constant on each cell of the
    grid; ``correction(t) = 1 / ((t_max - t_min) q(t))`` uses that same density, which makes the
    importance-sampled loss an unbiased estimate of the uniform-time loss; every loss with a
    ``time_sampler`` applies it (:func:`importance_weights`).
    """

    grid: Array
    cdf: Array
    density: Array  # per cell: (cdf[k + 1] - cdf[k]) / (grid[k + 1] - grid[k])
    t_min: float
    t_max: float  # no in_range: a public class, which a grid outside [0, 1] can build

    def __call__(self, key: Array, shape: tuple[int, ...]) -> Array:
        # u on the midpoints of the uniform draw's lattice, inside (0, 1): u = 0 gave t = t_min
        # exactly (probability 2^-23 in float32), an end where the density may be infinite (the
        # score's 1 / sigma^2 at t_min = 0: an inf loss a few times in 10^7 draws)
        u = jax.random.uniform(key, shape, self.cdf.dtype) + 0.5 * jnp.finfo(self.cdf.dtype).eps
        return jnp.interp(u, self.cdf, self.grid)

    def correction(self, t: Array) -> Array:
        """The importance weight ``1 / ((t_max - t_min) q(t))`` that keeps the loss unbiased."""
        cell = jnp.clip(jnp.searchsorted(self.grid, t, side="right") - 1, 0, self.density.size - 1)
        return 1.0 / ((self.t_max - self.t_min) * self.density[cell])


def importance_weights(time_sampler: TimeSampler, t: Array) -> Array | float:
    """Per example, the weight that keeps a loss whose times ``t`` ``time_sampler`` drew an
    unbiased estimate of the loss at uniform times: ``correction(t)`` for an
    :func:`importance_time` sampler, 1 for every other (their law is the loss's definition)."""
    if not isinstance(time_sampler, ImportanceTime):
        return 1.0
    # in t's dtype: its table is in the default float, and under x64 a float32 loss (float32
    # data, as the losses keep) came out float64
    return time_sampler.correction(t).astype(jnp.result_type(t))


def importance_time(
    path: GaussianPath,
    weighting: Weighting,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    *,
    regress: Target = "score",
    num_points: int = 4096,
) -> ImportanceTime:
    """Sample ``t`` with density ``∝ w(t) c(t)``, the weight in ``eps`` units of a loss on ``regress``.

    ``c(t)`` is the squared scale from ``eps`` errors to ``regress`` errors at fixed ``x_t``
    (``1 / sigma_t^2`` for the score, ``1`` for eps), so with the likelihood weighting ``g^2`` and the score this is
    Song et al. (2021b)'s ``g^2 / sigma^2``. The density is piecewise linear on a grid uniform in
    ``t`` with ``num_points`` points. An end where it is infinite (``1 / sigma^2`` at ``t = 0``)
    is set to 0 if the density is integrable there; one where it is not (the velocity on the
    linear path at ``t = 1``: ``1 / alpha^2``, whose mass would grow with the grid) raises.
    """
    check_time_interval(t_min, t_max)
    # the grid and its half, for the integrability check (-5 was NumPy's error; 0 and 1 "no mass")
    num_points = check_count(num_points, "num_points", minimum=4)

    def density(n: int) -> tuple[Array, Array]:
        grid = jnp.linspace(t_min, t_max, n)
        x, one = jnp.zeros((n, 1)), jnp.ones((n, 1))
        gain = _convert(path, x, grid, one, "eps", regress) - _convert(
            path, x, grid, 0 * one, "eps", regress
        )
        # d(regress)/d(eps) at fixed x_t: 1/sigma for the score, sigma/alpha for x0; inf at an
        # end where that divides by 0 (t_min = 0), masked
        dens = weight_in(weighting, path, grid, regress, inside=False) * gain[:, 0] ** 2
        return grid, jnp.where(jnp.isfinite(dens), dens, 0.0)

    grid, dens = density(num_points)
    cells = 0.5 * (dens[1:] + dens[:-1]) * jnp.diff(grid)
    total, total_coarse = (
        concrete(jnp.sum(cells)),
        concrete(jnp.trapezoid(*density(num_points // 2)[::-1])),
    )
    if total is not None:
        if not (np.isfinite(total) and total > 0):
            raise ValueError(
                f"importance_time: the density w(t) c(t) of a {regress!r} loss on this path has "
                f"no positive finite mass on [{t_min}, {t_max}]; got {float(total)}"
            )
        if abs(total_coarse / total - 1.0) > 0.25:  # a power-law end: the mass grows with the grid
            raise ValueError(
                f"importance_time: the density w(t) c(t) of a {regress!r} loss on this path is not "
                f"integrable on [{t_min}, {t_max}] (its mass grows as the grid is refined: "
                f"{float(total_coarse):.4g} -> {float(total):.4g}); move the infinite end inward "
                "(t_min > 0 or t_max < 1) or sample times uniformly (the CLI's --time uniform)"
            )
    cum = jnp.concatenate([jnp.zeros(1), jnp.cumsum(cells)])
    cdf = cum / cum[-1]
    cell_density = jnp.diff(cdf) / jnp.diff(grid)
    floor = jnp.min(jnp.where(cell_density > 0, cell_density, jnp.inf))
    cell_density = jnp.maximum(cell_density, floor)  # a zero-mass cell is never drawn; no 1/0
    return ImportanceTime(grid, cdf, cell_density, float(t_min), float(t_max))


# --- the losses ------------------------------------------------------------------------------


def _split_batch(batch: Any, where: str | None = None) -> tuple[Array, Array | None]:
    """``(x0, labels)`` of a batch; with ``where`` (a loss that draws its own Gaussian noise),
    source points ``x1`` in the batch are refused rather than dropped."""
    x0, x1, labels = unpack_batch(batch)
    if where is not None and x1 is not None:
        raise ValueError(
            f"{where} draws its own N(0, I) noise and does not use source points: the batch's "
            "'x1' would be dropped (train on x0 alone, or with a flow-matching loss, which takes "
            "'x1', source= and coupling=)"
        )
    return x0, labels


def noise_pairs(
    key: Array, batch: Any, path: GaussianPath, source: Any, coupling: Any
) -> tuple[Array, Array, Array | None]:
    """``(x0, x1, labels)`` for the losses: ``N(0, I)`` noise drawn with ``key`` where there is no
    ``source``, ``coupling`` or ``x1`` in the batch (the same draw as ever, bit for bit), else
    :func:`~jaxdiff.sources.draw_pairs`; source points in the batch need a path ending at them."""
    given_x1 = isinstance(batch, dict) and batch.get("x1") is not None
    if given_x1:  # source points from the batch: a non-Gaussian source
        check_source_path(path)
    if source is None and coupling is None and not given_x1:
        x0, labels = _split_batch(batch)
        return x0, normal_like(key, x0), labels  # bfloat16 data: drawn in float32, then rounded
    return draw_pairs(key, batch, source, coupling)


def static_split(fraction: float, n: int, name: str = "fraction") -> int:
    """``round(fraction n)`` examples of a batch of ``n`` for the first part of a static split,
    kept in ``[1, n - 1]`` when ``0 < fraction < 1``: both parts get an example (MeanFlow at 0.75
    had no ``r < t`` example in a batch of 2, the shortcut loss at 0.25 no self-consistency;
    ``round`` rounds 1.5 and 0.5 to even). A batch of 1 cannot hold both: refused (it trained
    one part alone, MeanFlow as plain flow matching, also under a per-example ``vmap``)."""
    if 0.0 < fraction < 1.0 and n == 1:
        raise ValueError(
            f"{name} {fraction} splits each batch into two parts, which a batch of 1 cannot hold "
            f"(one part alone is another objective); pass batches of 2 or more (a per-example "
            f"vmap sees batches of 1), or {name} 0 or 1"
        )
    m = round(fraction * n)
    if 0.0 < fraction < 1.0 and n >= 2:
        m = min(max(m, 1), n - 1)
    return m


def uniform_low_end_error(
    time_sampler: Any,
    path: GaussianPath,
    target: Target,
    regress: Target,
    weighting: Weighting | None = None,
) -> str | None:
    """Why the loss is not finite at ``t_min`` of a ``uniform_time`` sampler, or ``None``.

    ``U[t_min, t_max)`` draws ``t_min`` itself once in 2^23 draws (float32), and the loss there
    is evaluated now, in NumPy, on unit data: a conversion that divides by ``sigma_t = 0``, or a
    velocity with ``sigma_t' = inf`` at ``t = 0`` (VP, cosine), gave an inf loss once in a few
    thousand steps at batch 4096. Other samplers (their ends are reached with probability ~0) and
    paths with traced parameters are not checked."""
    if not isinstance(time_sampler, _Uniform) or time_sampler.from_top:
        return None
    t0 = time_sampler.t_min
    try:
        with jax.ensure_compile_time_eval():
            one = jnp.ones((1, 1), jnp.float32)
            value = per_example_loss(
                0.5 * one, path, one, one, jnp.full((1,), t0, jnp.float32), target=target,
                regress=regress, weighting=unit_weight if weighting is None else weighting,
            )  # fmt: skip
            value = concrete(value)
    except ValueError as err:  # a conversion's own refusal at a known t
        return str(err)
    except Exception:  # traced path parameters, a weighting of the user's that needs a trace
        return None
    if value is None or np.all(np.isfinite(value)):
        return None
    return f"the loss at t = {t0} is {float(np.ravel(value)[0])}"


def velocity_error(path: GaussianPath, target: Target, times: Any) -> str | None:
    """Why a ``target`` prediction gives no velocity at ``times`` (known now): its conversion
    divides by ``alpha_t = 0`` (``eps``, ``score``) or ``sigma_t = 0`` (``x0``); ``None`` if it
    does not. Teachers are probed with it where the loss is built."""
    try:
        with jax.ensure_compile_time_eval():
            t = jnp.asarray(times, jnp.float32).reshape(-1)
            probe = jnp.zeros((t.shape[0], 1), jnp.float32)
            convert(path, probe, t, probe, src=target, dst="velocity")
    except ValueError as err:
        return str(err)
    return None


def check_uniform_low_end(
    time_sampler: Any,
    path: GaussianPath,
    target: Target,
    regress: Target,
    weighting: Weighting | None = None,
) -> None:
    """Refuse a ``uniform_time(t_min, ...)`` whose ``t_min`` gives a non-finite loss
    (:func:`uniform_low_end_error`), naming why and the remedy."""
    why = uniform_low_end_error(time_sampler, path, target, regress, weighting)
    if why is not None:
        raise ValueError(
            f"time_sampler uniform_time({time_sampler.t_min}, {time_sampler.t_max}) draws t = "
            f"{time_sampler.t_min} itself (once in 2^23 draws), where the {regress!r} loss of a "
            f"{target!r} network is not finite ({why}); take t_min = 1e-3 (uniform_time's default)"
        )


def mean_sq_error(pred: Array, target: Array, dtype: Any) -> Array:
    """Per example, ``mean |pred - target|^2`` over the data dimensions, taken in ``dtype`` (float32
    or wider for the few-step losses: bfloat16 data and networks gave a bfloat16 loss)."""
    diff = (pred.astype(dtype) - target.astype(dtype)).reshape(pred.shape[0], -1)
    return jnp.mean(jnp.square(diff), axis=1)


def per_example_loss(
    pred: Array,
    path: GaussianPath,
    x0: Array,
    eps: Array,
    t: Array,
    *,
    target: Target,
    regress: Target,
    weighting: Weighting = unit_weight,
) -> Array:
    """``w(t) mean |convert(pred, target -> regress) - y(x0, eps)|^2`` per example, shape ``(batch,)``.

    ``pred`` is the network's output at ``x_t = alpha_t x0 + sigma_t eps`` and ``t`` (``(batch,)``).
    """
    x_t = path.interpolate(x0, eps, t)
    value = convert(path, x_t, t, pred, src=target, dst=regress)
    y = from_x0_eps(path, x_t, t, x0, eps, regress)
    err = jnp.mean(jnp.square(value - y).reshape(x0.shape[0], -1), axis=1)
    return weight_in(weighting, path, t, regress) * err


def check_label_dropout(label_dropout: float, null_label: int | None) -> None:
    """``label_dropout`` in ``[0, 1]``, with a ``null_label`` to drop to when it is > 0."""
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must lie in [0, 1]; got {label_dropout}")
    if label_dropout > 0 and null_label is None:
        raise ValueError(f"label_dropout {label_dropout} > 0 needs the null_label of the model")


def check_target_guidance(target_guidance: float | None, label_dropout: float) -> bool:
    """Whether a few-step loss guides its targets: ``target_guidance`` finite, with the label
    dropout that trains the unconditional velocity it needs."""
    if target_guidance is None:
        return False
    if not math.isfinite(float(target_guidance)):
        raise ValueError(f"target_guidance must be finite; got {target_guidance}")
    if label_dropout <= 0:
        raise ValueError(
            f"target_guidance {target_guidance} needs the unconditional velocity: "
            "label_dropout > 0 with a null_label (the papers drop 10% of the labels)"
        )
    return True


def drop_labels(key: Array, labels: Array, label_dropout: float, null_label: Any) -> Array:
    """Each label replaced by ``null_label`` with probability ``label_dropout`` (classifier-free
    guidance's training, Ho & Salimans 2022); the labels unchanged at 0."""
    if label_dropout <= 0:
        return labels
    drop = jax.random.bernoulli(key, label_dropout, labels.shape)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def diffusion_loss(
    net: Field,
    path: GaussianPath,
    *,
    regress: Target | None = None,
    weighting: Weighting = unit_weight,
    time_sampler: TimeSampler | None = None,
    label_dropout: float = 0.0,
    null_label: int | None = None,
    source: Any = None,
    coupling: Any = None,
    rngs: str | tuple[str, ...] = (),
) -> Callable[[Any, Array, Any], Array]:
    """The loss ``(params, key, batch) -> scalar`` of the network ``net`` on ``path``.

    ``batch`` is ``x0`` (``(batch, *event)``), ``(x0, labels)``, or a dict ``{"x0": ..., "x1":
    ..., "labels": ...}`` (``x1``, the batch's own source points, and ``labels`` optional).
    ``net`` is a :class:`~jaxdiff.Field`: ``net.target`` is what the network predicts and
    ``net.apply(params, x_t, t[, labels])`` is differentiated in ``params``. ``regress``
    (default: the target) is the space where the squared error is taken, ``weighting`` its ``w(t)``, ``time_sampler``
    draws ``t`` (default ``uniform_time()``). With labels in the batch, ``label_dropout`` replaces
    each by ``null_label`` with that probability, which trains the unconditional model of
    classifier-free guidance. ``source`` draws ``x1`` (default ``N(0, I)``; a non-Gaussian one
    needs a path with ``alpha_1 = 0``, ``sigma_1 = 1``) and ``coupling`` pairs it with ``x0``.
    ``rngs`` names random streams of a Flax network (``"dropout"``): the network is then called
    with ``rngs={name: key}``, one fresh key per stream and step folded off the loss's ``key``
    (Flax linen's ``apply`` convention; any ``fn`` taking that keyword works).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> loss = diffusion_loss(jd.Field(lambda p, x, t: p * x, "eps"), jd.vp_path())
    >>> float(loss(0.0, jax.random.key(0), jnp.zeros((4096, 2))))  # E|eps|^2 per dimension
    1.0...
    """
    net = as_field(net, "net")
    target = net.target
    regress = target if regress is None else regress
    _check_target(regress, "regress")
    time_sampler = uniform_time() if time_sampler is None else time_sampler
    check_uniform_low_end(time_sampler, path, target, regress, weighting)
    check_label_dropout(label_dropout, null_label)
    source = as_source(source)
    check_gaussian_targets((target, regress), source, coupling, "diffusion_loss")
    if not is_gaussian(source):
        check_source_path(path)
    rngs = (rngs,) if isinstance(rngs, str) else tuple(rngs)

    def loss(params: Any, key: Array, batch: Any) -> Array:
        extra = {}
        if rngs:  # keys for the network's own randomness, without changing the draws below
            extra["rngs"] = {
                name: jax.random.fold_in(jax.random.fold_in(key, 0x5EED), i)
                for i, name in enumerate(rngs)
            }
        t_key, eps_key, drop_key = jax.random.split(key, 3)
        if isinstance(batch, dict) and batch.get("x1") is not None:  # a non-Gaussian source
            check_gaussian_targets((target, regress), batch["x1"], coupling, "diffusion_loss")
        x0, eps, labels = noise_pairs(eps_key, batch, path, source, coupling)
        n = x0.shape[0]
        # times in x0's dtype widened to float32 (float32 data under x64: a float32 loss, as
        # meanflow_loss, shortcut_loss and the consistency losses give)
        t = draw_times(time_sampler, t_key, n, wide_dtype(x0.dtype))
        x_t = path.interpolate(x0, eps, t)
        if labels is None:
            pred = net.apply(params, x_t, t, **extra)
        else:
            labels = drop_labels(drop_key, labels, label_dropout, null_label)
            pred = net.apply(params, x_t, t, labels, **extra)
        losses = per_example_loss(
            pred, path, x0, eps, t, target=target, regress=regress, weighting=weighting
        )
        return jnp.mean(losses * importance_weights(time_sampler, t))

    return loss


def flow_matching_loss(
    net: Field,
    path: GaussianPath | None = None,
    *,
    time_sampler: TimeSampler | None = None,
    **kwargs: Any,
) -> Callable[[Any, Array, Any], Array]:
    """Conditional flow matching: regress on ``u_t(x | x0) = alpha_t' x0 + sigma_t' eps`` (Lipman et
    al. 2023). Default path: ``linear_path()``; ``t`` runs data -> noise, so ``u`` is minus the
    velocity of the ``t = 0``-is-noise convention. ``net`` may predict any target. Default times:
    ``U[0, 1]``, or ``U[1e-3, 1]`` for an ``"x0"`` or ``"score"`` net (an x0 net's velocity
    divides by ``sigma_t``) and wherever the loss is not finite at ``t = 0`` (the VP and cosine
    paths, whose ``sigma_t'`` is infinite there): ``U[0, 1]`` draws ``t = 0`` with probability
    2^-23, an inf loss once in a few thousand steps at batch 4096. Other keywords go to
    :func:`diffusion_loss`: ``source=`` (any
    source distribution in place of the Gaussian, :mod:`jaxdiff.sources`), ``coupling=``
    (``jd.exact_ot()``, ``jd.sinkhorn_ot(...)``), ``weighting``, ``label_dropout`` with
    ``null_label``, ``rngs``."""
    path = linear_path() if path is None else path
    if time_sampler is None:  # U[0, 1] where the loss is finite at t = 0 (the linear path)
        target, weighting = as_field(net, "net").target, kwargs.get("weighting")
        time_sampler = uniform_time(0.0, 1.0)
        if target in ("x0", "score") or uniform_low_end_error(
            time_sampler, path, target, "velocity", weighting
        ):
            time_sampler = uniform_time(1e-3, 1.0)
    return diffusion_loss(net, path, regress="velocity", time_sampler=time_sampler, **kwargs)


def score_matching_loss(
    net: Field,
    path: GaussianPath,
    *,
    weighting: Weighting = sigma_sq_weight,
    **kwargs: Any,
) -> Callable[[Any, Array, Any], Array]:
    """Denoising score matching ``w(t) |s(x_t, t) + eps / sigma_t|^2`` (Vincent 2011; Song et al.
    2021): ``sigma_sq_weight`` (default) or ``likelihood_weight`` (``g^2``, best with
    ``importance_time``)."""
    return diffusion_loss(net, path, regress="score", weighting=weighting, **kwargs)


def eps_loss(net: Field, path: GaussianPath, **kwargs: Any) -> Callable[[Any, Array, Any], Array]:
    """DDPM's simple loss ``|eps_hat - eps|^2``, continuous uniform ``t`` (Ho et al. 2020)."""
    return diffusion_loss(net, path, regress="eps", **kwargs)


def x0_loss(net: Field, path: GaussianPath, **kwargs: Any) -> Callable[[Any, Array, Any], Array]:
    """The denoising (x0) loss ``|x0_hat - x0|^2``."""
    return diffusion_loss(net, path, regress="x0", **kwargs)


def v_loss(net: Field, path: GaussianPath, **kwargs: Any) -> Callable[[Any, Array, Any], Array]:
    """The v loss ``|v_hat - (alpha_t eps - sigma_t x0)|^2`` (Salimans & Ho 2022)."""
    return diffusion_loss(net, path, regress="v", **kwargs)
