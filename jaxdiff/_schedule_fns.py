r"""The functions of the built-in schedules, as small pytrees whose hyperparameters are leaves.

A VP-type ``alpha_fn`` (``GaussianPath(alpha_fn)``, ``sigma = sqrt(1 - alpha^2)``) may also offer
``one_minus_square(t) = 1 - alpha_t^2`` computed without cancellation: near ``t = 0``, where
``alpha_t`` rounds to 1 (float32 below ``t ~ 1e-6`` on VP), ``(1 - alpha)(1 + alpha)`` loses every
digit, and ``GaussianPath`` uses this method instead.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
from jax.typing import ArrayLike


class LinearBetaAlpha(eqx.Module):
    """``alpha_t = exp(-t beta_min / 2 - t^2 (beta_max - beta_min) / 4)``: ``beta(t)`` linear."""

    beta_min: ArrayLike
    beta_max: ArrayLike

    def log(self, t: ArrayLike):
        """``log alpha_t = -int_0^t beta / 2``, exact near ``t = 0`` (no ``log(exp(.))``)."""
        return -0.5 * t * self.beta_min - 0.25 * t**2 * (self.beta_max - self.beta_min)

    def __call__(self, t: ArrayLike):
        return jnp.exp(self.log(t))

    def one_minus_square(self, t: ArrayLike):
        """``1 - alpha_t^2 = -expm1(2 log alpha_t)`` while ``alpha_t^2 > 1/e``, then ``1 - alpha_t^2``.

        Two branches for the derivative: JAX differentiates ``expm1(u)`` as ``(expm1(u) + 1) du``,
        which cancels where ``alpha_t`` is small (sub-VP's ``sigma'`` near ``t = 1``)."""
        two_log = 2.0 * self.log(t)
        return jnp.where(two_log > -1.0, -jnp.expm1(two_log), 1.0 - jnp.exp(two_log))


class OneMinusSquare(eqx.Module):
    """``1 - alpha_t^2``: sub-VP's std (Song et al. 2021, eq. 34)."""

    alpha: LinearBetaAlpha

    def __call__(self, t: ArrayLike):
        return self.alpha.one_minus_square(t)


class Affine(eqx.Module):
    """``start + slope * t``."""

    start: ArrayLike
    slope: ArrayLike

    def __call__(self, t: ArrayLike):
        return self.start + self.slope * t


class Geometric(eqx.Module):
    """``sigma_min (sigma_max / sigma_min)^t``."""

    sigma_min: ArrayLike
    sigma_max: ArrayLike

    def __call__(self, t: ArrayLike):
        return self.sigma_min * jnp.exp(t * jnp.log(self.sigma_max / self.sigma_min))


class CosineAlpha(eqx.Module):
    r"""``alpha_t = cos(phi (t + s)) / cos(phi s)``, ``phi = pi / (2 (1 + s))`` (Nichol & Dhariwal 2021).

    For ``t >= 1/2`` evaluated as ``sin(phi (1 - t)) / cos(phi s)`` (the same, since
    ``phi (1 + s) = pi/2``): ``0`` exactly at ``t = 1`` and accurate to an ulp near it, where ``cos`` of
    a rounded ``pi/2`` is not. Each branch's derivative is accurate on its half.
    """

    s: ArrayLike

    def _phi(self):
        return (0.5 * math.pi) / (1.0 + self.s)

    def __call__(self, t: ArrayLike):
        phi = self._phi()
        near_one = jnp.sin(phi * (1.0 - t))
        near_zero = jnp.cos(phi * (t + self.s))
        return jnp.where(t < 0.5, near_zero, near_one) / jnp.cos(phi * self.s)

    def one_minus_square(self, t: ArrayLike):
        """``1 - alpha_t^2 = sin(phi (t + 2 s)) sin(phi t) / cos(phi s)^2`` (``cos^2 A - cos^2 B =
        sin(B + A) sin(B - A)``): no cancellation near ``t = 0``, exactly 1 at ``t = 1``."""
        phi = self._phi()
        return (
            jnp.sin(phi * (t + 2.0 * self.s)) * jnp.sin(phi * t) / jnp.square(jnp.cos(phi * self.s))
        )
