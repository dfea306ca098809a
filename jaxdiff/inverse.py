r"""Posterior sampling for linear inverse problems ``y = A x0 + sigma_y n`` with a diffusion prior.

The conditional score is the prior's plus the likelihood's,
``grad log p_t(x | y) = grad log p_t(x) + grad_x log p(y | x_t = x)``, and every method here
approximates ``p(x0 | x_t)`` by a Gaussian ``N(m, C)`` with ``m = x0_hat(x_t)`` (Tweedie), so that
``p(y | x_t) ~ N(y; A m, A C A^T + sigma_y^2 I)`` and, holding ``C`` fixed,

    ``grad_x log p(y | x_t) ~ J^T A^T (A C A^T + sigma_y^2 I)^{-1} (y - A m)``,  ``J = dm/dx_t``

(``J^T v`` is one ``jax.vjp`` of the denoiser). They differ in ``C``:

==================  ===================================  ===========================================
method              ``C``                                exact when
==================  ===================================  ===========================================
:func:`dps`         ``0`` (Chung et al. 2023)            never (overconfident while ``t > 0``)
:func:`pigdm`       ``r_t^2 I``, ``r_t^2 = v sigma^2 /   the prior is ``N(mu, v I)`` (Song et al. 2023)
                    (alpha^2 v + sigma^2)``
:func:`tmpd`        ``(sigma_t^2 / alpha_t) J``, the     the prior is any Gaussian (Boys et al. 2024)
                    true ``Cov[x0 | x_t]`` of a Gaussian
==================  ===================================  ===========================================

Each is a **field transform** (like ``jd.classifier_guidance``): it returns a
:class:`~jaxdiff.Field` predicting the same target, so it works with every sampler, path and
target, under ``jit`` and batched over measurements (``y`` of shape ``(batch, m)``). Time runs from
data (``t = 0``) to noise (``t = 1``); sampling starts where ``alpha_t > 0``: on the linear and
cosine paths (``alpha_1 = 0``, where ``x0_hat`` is undefined) ``jd.sample``'s default grid starts at
``t = 1 - 1e-3``, and a grid from ``t = 1`` is refused. A field's further arguments reach it:
under ``jd.samplers.meanflow()`` a two-time field is called as ``field(x, t, r)``, and its average
velocity is read as a velocity, so ``x0_hat`` is the jump's end ``x - t u(x, t, r)`` (at ``r = 0``
the flow map's endpoint, not the posterior mean ``E[x0 | x_t]`` of the other samplers).

Chung et al.'s own DPS moves ``x`` by ``-zeta grad_x ||y - A x0_hat(x)||`` once per step, whatever the
step's size: a rule of the discretisation, not of the dynamics, so it cannot be a field (the
field does not know the step) and is the sampler :func:`dps_sampler`. For noiseless measurements
:func:`project` is the per-step hook of replacement (score_sde's inpainting, generalised to any
``A`` by projecting on its row space) and :func:`repaint` wraps a sampler with RePaint's
resampling (Lugmayr et al. 2022). Every method differentiates ``x0_hat``: an eps-network's
``x0_hat = (x - sigma_t eps_hat) / alpha_t`` multiplies its Jacobian's error by ``1 / alpha_t``
(~150 at ``t = 1`` on VP), on which PiGDM and the DPS field diverged (notebook 08); prefer priors
that predict ``v`` or ``x0``. Exact posteriors to check against: ``GaussianMixture.posterior``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import (
    check_count,
    check_positive,
    coef_time,
    concrete,
    error_if,
    expand_like,
    wide_dtype,
)
from jaxdiff._engine import grid_check
from jaxdiff.conversions import _add_to_score, to_x0_eps
from jaxdiff.ddim import ddim_step
from jaxdiff.field import Field, as_field, batch_time
from jaxdiff.measurements import LinearOperator, Measurement
from jaxdiff.paths import GaussianPath
from jaxdiff.samplers.base import Sampler, normal
from jaxdiff.schedules import uniform_grid
from jaxdiff.sde import Eta, _is_zero, check_eta, eta_at

Array = jax.Array
Hook = Callable[[Array, Any, Array], Any]

__all__ = ["dps", "pigdm", "tmpd", "dps_sampler", "project", "repaint"]


def _x0_vjp(path: GaussianPath, field: Field, x: Array, t: Array, *args: Any):
    """``(x0_hat, J^T-pullback, raw prediction)`` from one forward pass (``args``: the field's
    further arguments, e.g. the ``meanflow()`` sampler's second time)."""

    def fn(z):
        pred = field(z, t, *args)
        return to_x0_eps(path, z, t, pred, field.target)[0], pred

    return jax.vjp(fn, x, has_aux=True)


class _Posterior(eqx.Module):
    """``(params, x, t, *args) -> the field's target with the likelihood score added``; ``args``
    (the ``meanflow()`` sampler's second time) reach the field."""

    kind: str = eqx.field(static=True)
    rank_unchecked: bool = eqx.field(static=True, default=False)  # pigdm: A or sigma_y traced
    needs_alpha = True  # jd.sample's default grid starts inside alpha_t = 0 (linear, cosine)
    adds_score = True  # the likelihood's score: Tweedie's formula for N(0, I) noise (source=)

    def __call__(self, params: Any, x: ArrayLike, t: ArrayLike, *args: Any) -> Array:
        path, field, meas, scale, data_var = params
        x = jnp.asarray(x)
        t = batch_time(t, x)
        known = concrete(t)
        if known is not None:  # before a conversion raises naming another cause
            with jax.ensure_compile_time_eval():
                if bool(jnp.any(path.alpha(coef_time(known)) == 0)):
                    raise ValueError(self.message(field.target))
        x0, pull, pred = _x0_vjp(path, field, x, t, *args)
        op, resid = meas.operator, meas.residual(x0)
        sy2 = jnp.square(meas.sigma_y).astype(resid.dtype)
        a, s2 = path.alpha(t).astype(resid.dtype), path.sigma_sq(t).astype(resid.dtype)
        if self.kind == "dps":
            grad = pull(op.transpose(resid / sy2))[0]
        elif self.kind == "pigdm":
            r2 = data_var * s2 / (a**2 * data_var + s2)
            solved = op.gram_solve(resid, r2, sy2)
            if self.rank_unchecked:  # a traced A or sigma_y: refused when it runs instead
                solved = _error_if_deficient(solved, meas, "jd.pigdm")
            grad = pull(op.transpose(solved))[0]
        else:  # tmpd: rows of A J are J^T A^T e_i, one vjp per measured entry
            eye = jnp.eye(op.out_dim, dtype=resid.dtype)
            cot = op.transpose(jnp.broadcast_to(eye[:, None], (op.out_dim, *resid.shape)))
            rows = jax.vmap(lambda c: pull(c)[0])(cot.astype(x0.dtype))  # (m, batch, *event)
            wide = wide_dtype(resid.dtype)  # the (m, m) eigh in float32 or wider (none in bf16)
            ajat = jnp.moveaxis(op.forward(rows), 0, 1).astype(wide)  # (batch, m, m): A J A^T
            ratio = (path.sigma_sq(t) / path.alpha(t)).astype(wide)
            cov = expand_like(ratio, ajat) * ajat  # A C A^T, C = (sigma^2 / alpha) J
            lam, vecs = jnp.linalg.eigh(0.5 * (cov + jnp.swapaxes(cov, -1, -2)))
            # a network's J need not be positive semi-definite: |eigenvalues|, exact for a true
            # covariance (negative ones made the digits of notebook 08 diverge; clipped at 0 too)
            lam = jnp.abs(lam) + sy2.astype(wide)
            lam = jnp.maximum(lam, 1e-6 * jnp.max(lam, axis=-1, keepdims=True))
            res_w = resid.astype(wide)
            coef = jnp.einsum("bij,bj->bi", vecs, jnp.einsum("bji,bj->bi", vecs, res_w) / lam)
            grad = jnp.einsum("ib...,bi->b...", rows, coef.astype(rows.dtype))
        if self.kind != "dps":  # at sigma_t = 0 with sigma_y = 0 both divide 0 by 0; B_t = 0 there
            grad = jnp.where(expand_like(s2 > 0, grad), grad, jnp.zeros_like(grad))
        # the score gains scale * grad, so the prediction moves by B_t scale * grad (B_t = d target /
        # d score: every target is affine in the score), as in jd.classifier_guidance
        moved = _add_to_score(path, x, t, pred, field.target, grad, scale)
        # a traced t (inside every sampler) at alpha_t = 0 would give NaN: name the cause instead
        return error_if(moved, path.alpha(coef_time(t)) == 0, self.message(field.target))

    def check_grid(self, params: Any, grid: Array) -> Array:
        """The sampling grid, refused where it starts at ``alpha_t = 0`` (``jd.sample`` calls it:
        a ``ValueError`` at trace time where the grid is known, instead of the field's run-time
        error on the first step)."""
        path, field = params[0], params[1]
        return grid_check(
            grid, lambda g: path.alpha(coef_time(g[0])) == 0, self.message(field.target)
        )

    def message(self, target: str) -> str:
        if target in ("score", "eps"):
            why = f"x0_hat of a {target!r} field divides by it"
        else:  # x0_hat is defined there, and for the exact field the move has a finite limit
            why = (
                "the move B_t * grad divides by it; its limit there (finite for an exact "
                f"{target!r} field) is not implemented"
            )
        return (
            f"jd.{self.kind} needs alpha_t > 0 ({why}; alpha_t = 0 at t = 1 on the linear and "
            "cosine paths): sample from a t_start < 1"
        )


def _guided(kind: str, field, path, measurement, scale, data_var=1.0) -> Field:
    field = as_field(field)
    if not isinstance(measurement, Measurement):
        raise TypeError(
            f"measurement must be a jaxdiff.Measurement(operator, y, sigma_y); got "
            f"{type(measurement).__name__}"
        )
    scale = check_positive(scale, "scale", strict=False)
    data_var = check_positive(data_var, "data_var")
    if kind == "dps":  # divides by sigma_y^2; a traced sigma_y is checked when it runs
        checked = check_positive(measurement.sigma_y, "sigma_y (DPS divides by sigma_y^2)")
        measurement = eqx.tree_at(lambda m: m.sigma_y, measurement, jnp.asarray(checked))
    unchecked = kind == "pigdm" and not _check_row_rank(measurement, "jd.pigdm")
    params = (path, field, measurement, jnp.asarray(scale), jnp.asarray(data_var))
    return Field(_Posterior(kind, unchecked), field.target, params)


def _rank_message(who: str, shape: tuple[int, ...], lam_min: Any) -> str:
    return (
        f"{who} with a noiseless measurement (sigma_y = 0) needs A of full row rank (it solves "
        f"with (A A^T)^-1); this A ({shape[0]} x {shape[1]}) has A A^T eigenvalues down to "
        f"{lam_min}: drop the dependent rows, or give sigma_y > 0 (or use jd.tmpd, which clips "
        "them)"
    )


def _deficient(lam: Any, xp: Any = jnp) -> Any:
    """``A A^T``'s eigenvalues ``lam`` reach 0 (relative to the largest)."""
    return lam.min() <= 1e-6 * xp.maximum(lam.max(), 1e-30)


def _check_row_rank(measurement: Measurement, who: str) -> bool:
    """A noiseless measurement solves with ``(A A^T)^{-1}``: refuse a concrete ``A`` of deficient
    row rank (it gave NaN samples silently, or a run-time error that named no cause). ``False``
    where ``sigma_y`` or ``A`` is traced (:func:`_error_if_deficient` checks it when it runs)."""
    sy = concrete(measurement.sigma_y)
    if sy is not None and float(sy) != 0.0:
        return True
    op = measurement.operator
    if type(op).gram_solve is not LinearOperator.gram_solve:  # masks, pooling: full rank by design
        return True
    mat = concrete(op.matrix())
    if sy is None or mat is None:
        return False
    lam = np.linalg.eigvalsh(np.asarray(mat, np.float64) @ np.asarray(mat, np.float64).T)
    if _deficient(lam, np):
        raise ValueError(_rank_message(who, mat.shape, f"{lam.min():.3g}"))
    return True


def _error_if_deficient(x: Array, measurement: Measurement, who: str) -> Array:
    """``x``, or a run-time error where ``sigma_y = 0`` and ``A`` has deficient row rank (a traced
    ``A`` or ``sigma_y``: the solve's ``1 / 0`` gave NaN samples, named only as non-finite)."""
    mat = measurement.operator.matrix()
    lam = jnp.linalg.eigvalsh(mat @ mat.T)
    bad = (jnp.asarray(measurement.sigma_y) == 0) & _deficient(lam)
    return error_if(x, bad, _rank_message(who, mat.shape, "~0"))


def dps(
    field: Field, path: GaussianPath, measurement: Measurement, scale: ArrayLike = 1.0
) -> Field:
    """Diffusion posterior sampling as a field: the score plus
    ``scale * grad_x log N(y; A x0_hat(x), sigma_y^2 I) = scale * J^T A^T (y - A x0_hat) / sigma_y^2``
    (Chung et al. 2023, eq. 11; ``C = 0`` in the module's table). One vjp per evaluation.

    It treats ``x0_hat`` as exact, so while ``t > 0`` the likelihood is too sharp: DPS is biased
    even for a Gaussian prior (``tests/test_inverse.py`` measures by how much). Needs
    ``sigma_y > 0``; for Chung et al.'s step-size rule see :func:`dps_sampler`.
    """
    return _guided("dps", field, path, measurement, scale)


def pigdm(
    field: Field,
    path: GaussianPath,
    measurement: Measurement,
    scale: ArrayLike = 1.0,
    *,
    data_var: ArrayLike = 1.0,
) -> Field:
    """Pseudo-inverse guidance (Song et al. 2023, PiGDM): the score plus
    ``scale * J^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)`` with
    ``r_t^2 = v sigma_t^2 / (alpha_t^2 v + sigma_t^2)``, the posterior variance of ``x0 ~ N(., v I)``
    (``v = data_var``). Exact for an isotropic Gaussian prior of variance ``v``; ``sigma_y = 0``
    is allowed (``A`` of full row rank). One vjp and one solve in measurement space per evaluation.
    """
    return _guided("pigdm", field, path, measurement, scale, data_var)


def tmpd(
    field: Field, path: GaussianPath, measurement: Measurement, scale: ArrayLike = 1.0
) -> Field:
    """Tweedie moment projection (Boys et al. 2024, TMPD): ``C`` is Tweedie's covariance
    ``Cov[x0 | x_t] = (sigma_t^2 / alpha_t) J``, so the score gains
    ``scale * J^T A^T ((sigma_t^2/alpha_t) A J A^T + sigma_y^2 I)^{-1} (y - A x0_hat)``.

    Exact for any Gaussian prior (``C`` is then the true, constant posterior covariance). Costs one
    forward pass and ``m`` vjps (vmapped) per evaluation, and an ``(m, m)`` solve per sample: meant
    for measurements of up to a few hundred entries. ``sigma_y = 0`` is allowed.
    """
    return _guided("tmpd", field, path, measurement, scale)


class _State(NamedTuple):
    x: Array


def dps_sampler(measurement: Measurement, zeta: ArrayLike = 1.0, *, eta: Eta = 1.0) -> Sampler:
    """Chung et al.'s DPS (2023, Alg. 1): a DDIM step with noise ``eta`` (``1``: DDPM's ancestral
    step, as in the paper) from ``(x0_hat, eps_hat)`` at ``x_t``, then
    ``x_s -= zeta grad_{x_t} ||y - A x0_hat(x_t)||`` (per sample; the paper's step ``zeta_i
    grad ||y - A x0_hat||^2`` with ``zeta_i = zeta' / ||y - A x0_hat||`` is this one with ``zeta =
    2 zeta'``). One evaluation and one vjp per step.

    The correction is per step, not per unit time: the same ``zeta`` guides harder with more
    steps, which is why this is a sampler and not a field. Works for noiseless measurements.
    """
    eta = check_eta(eta, hi=1.0)
    zeta = check_positive(zeta, "zeta", strict=False)
    stochastic = not _is_zero(eta)

    def init(path, field, x, ts):
        # the step never reads sigma_y, so a traced one's check (where the Measurement was
        # built) would vanish under jit: tied to the start once
        bad = ~(measurement.sigma_y >= 0)
        return _State(error_if(x, bad, "sigma_y must be >= 0 and not NaN (dps_sampler)"))

    def step(key, path, field, state, t, s):
        x = state.x
        x0, pull, pred = _x0_vjp(path, field, x, batch_time(t, x))
        eps = to_x0_eps(path, x, t, pred, field.target)[1]
        resid = measurement.residual(x0)
        sq = jnp.sum(resid**2, axis=-1, keepdims=True)
        # r / |r|, and 0 at r = 0 with a zero derivative (sqrt's infinite slope there made every
        # gradient through the sampler NaN; the double where keeps it out of both passes)
        unit = jnp.where(sq > 0, resid / jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
        pull_up = pull(measurement.operator.transpose(unit).astype(x0.dtype))[0]  # -grad ||r||
        if stochastic:
            e = jnp.where(path.sigma(s) > 0, eta_at(eta, t), 0.0)
            x_s = ddim_step(path, x0, eps, t, s, eta=e, noise=normal(key, x))
        else:
            x_s = ddim_step(path, x0, eps, t, s)
        return _State(x_s + jnp.asarray(zeta, x.dtype) * pull_up.astype(x.dtype))

    return Sampler(
        name=f"dps_sampler(zeta={zeta}, eta={eta})",
        init=init,
        step=step,
        evals_per_step=1,
        stochastic=stochastic,
        grid=lambda path, steps, t_start, t_end: uniform_grid(steps, t_start, t_end),
        steps=1000,
        t_end=0.0,
        reaches_zero=True,
    )


def project(path: GaussianPath, measurement: Measurement) -> Hook:
    """A hook (``jd.sample(..., hook=)``) that imposes a noiseless measurement at every step:
    ``x <- x + A^+ (alpha_t y + sigma_t A z - A x)``, ``z ~ N(0, I)`` fresh, so ``A x`` is a
    forward sample of the measured part (exactly ``y`` at ``t = 0``) and the rest of ``x`` is kept.

    For a mask this is replacement (``jd.inpaint``; Song et al. 2021, App. I); for any ``A`` of
    full row rank it projects on ``A``'s row space (score_sde's colorisation uses an orthogonal
    ``A``). Like replacement it is biased: the unmeasured part does not see the measurement's
    future (see ``jd.inpaint``); :func:`repaint` reduces the bias.
    """
    msg = "project imposes noiseless measurements (sigma_y = 0); for sigma_y > 0 use jd.pigdm, jd.tmpd or jd.dps"
    sy = concrete(measurement.sigma_y)
    if sy is not None and float(sy) != 0.0:
        raise ValueError(f"{msg}; got sigma_y = {float(sy)}")
    unchecked = not _check_row_rank(measurement, "project")
    op = measurement.operator
    noisy = None if sy is not None else measurement.sigma_y != 0

    def hook(key, state, t):
        x = measurement.check_batch(state.x)
        a, s = path.alpha(t), path.sigma(t)
        y = measurement.y_for(x.shape[0]).astype(x.dtype)
        target = a.astype(x.dtype) * y + s.astype(x.dtype) * op.forward(normal(key, x))
        x = x + op.pinv(target - op.forward(x)).astype(x.dtype)
        if unchecked:  # a traced A or sigma_y
            x = _error_if_deficient(x, measurement, "project")
        return state._replace(x=x if noisy is None else error_if(x, noisy, msg))

    hook.gaussian_noise = True  # jd.sample(source=) refuses it for a non-Gaussian source
    return hook


def repaint(sampler: Sampler, hook: Hook, repeats: int = 10) -> Sampler:
    """RePaint's resampling (Lugmayr et al. 2022, jump length 1): each step ``t -> s`` is taken
    ``repeats`` times, applying ``hook`` (e.g. :func:`project`) after each, and between tries
    ``x_s`` is noised back to ``t`` by the forward kernel ``p(x_t | x_s)``. The known and unknown
    parts thereby mix, which removes most of replacement's bias at ``repeats`` times the cost.
    Each retry also repeats the sampler's own discretisation error: on a coordinate the
    measurement does not touch (posterior std 0.894), ``ddim(1.0)`` at 50 steps gave std 0.830
    and with ``repeats = 5`` 0.787 (0.872 and 0.845 at 200 steps): give RePaint more steps.

    ``sampler`` must be one-step (its state only ``x``: ``ddim``, ``ancestral``, ``ode``, ``sde``);
    pass the hook here, not to ``jd.sample``.
    """
    repeats = check_count(repeats, "repeats")

    def init(path, field, x, ts):
        state = sampler.init(path, field, x, ts)
        if jax.tree_util.tree_leaves(state._replace(x=None)):
            raise ValueError(
                f"repaint needs a one-step sampler (state holding only x); {sampler.name} keeps "
                "history between steps"
            )
        return state

    def step(key, path, field, state, t, s):
        keys = jax.random.split(key, (repeats, 3))

        def once(k, state):
            return hook(k[1], sampler.step(k[0], path, field, state, t, s), s)

        def body(i, state):
            new = once(keys[i], state)
            mean, std = path.transition(new.x, s, t)
            noise = expand_like(std, new.x).astype(new.x.dtype) * normal(keys[i, 2], new.x)
            return new._replace(x=mean + noise)

        return once(keys[-1], jax.lax.fori_loop(0, repeats - 1, body, state))

    return Sampler(
        name=f"repaint({sampler.name}, repeats={repeats})",
        init=init,
        step=step,
        evals_per_step=sampler.evals_per_step * repeats,
        evals_first_step=sampler.evals_first_step,
        stochastic=True,
        grid=sampler.grid,
        steps=sampler.steps,
        t_end=sampler.t_end,
        denoise=sampler.denoise,
        reaches_zero=sampler.reaches_zero,
        check=sampler.check,
        singular_start=sampler.singular_start,
    )
