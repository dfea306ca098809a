"""The sampler protocol: a value with a pure ``init`` and ``step`` (optax's and blackjax's pattern).

A :class:`Sampler` holds its hyperparameters closed over, so one value drives every path, every
field and every grid::

    state = sampler.init(path, field, x, ts)              # ts: the whole decreasing grid
    state = sampler.step(key, path, field, state, t, s)   # from time t to the next time s < t
    x = state.x

``jaxdiff.sample`` owns the rest (grid, start draw, keys, checks, the scan, saved states, the
count of evaluations, the final denoising step); the same two functions run in a loop of your own.
A new sampler is a factory of a few dozen lines on the ``(x0, eps)`` hub (``jaxdiff.predict``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff._checks import expand_like, normal_like
from jaxdiff._engine import grid_check
from jaxdiff.field import Field
from jaxdiff.paths import GaussianPath
from jaxdiff.schedules import default_grid

Array = jax.Array
Grid = Callable[[GaussianPath, int, Any, Any], Array]

__all__ = ["Sampler", "between", "normal", "combine", "grid_check"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampler:
    """A sampler as a value: ``init``/``step`` plus what the driver needs to know about them.

    * ``init(path, field, x, ts) -> state``: ``state.x`` is the sample; ``ts`` is the whole grid
      (ending at ``0`` when the driver adds the denoising step).
    * ``step(key, path, field, state, t, s) -> state``: from ``t`` to ``s < t``; ``key`` is
      ``None`` for a deterministic sampler.
    * ``evals_per_step``, ``evals_first_step``: network evaluations per step (and extra ones at
      the first step, e.g. an FSAL solver's first stage): the evaluation count is static, the same
      eagerly and under ``jit``.
    * ``stochastic``: whether ``step`` draws noise (then ``sample`` needs a key).
    * ``grid(path, steps, t_start, t_end)``, ``steps``, ``t_end``, ``denoise``: the defaults.
    * ``reaches_zero``: whether a step may end where ``sigma = 0`` (``t = 0``) exactly; others stop
      at ``t_end > 0`` and may finish with the denoising step.
    * ``check(path, field, ts) -> ts``: the sampler's own checks of a grid (trace time where the
      values are known, else through ``equinox.error_if`` on ``ts``).
    * ``coefficients(path, field, ts, i) -> pytree`` (optional): what step ``i`` (from ``ts[i]``
      to ``ts[i + 1]``) needs of the grid alone (schedule values, the hub map of
      ``field.target``, noise scales; a multistep sampler's weights, which depend on earlier
      times and on the orders used). The driver tabulates it for every step before the scan
      (one ``vmap`` over ``i``) and calls ``step(..., coefs=row)``, as a hand-written sampler
      tabulates its schedule; a step called without ``coefs`` (a loop of one's own) computes them
      from ``t``, ``s`` and its state. A single-step sampler writes ``between(fn)`` for its
      ``fn(path, field, t, s)``. Computed inside the loop, XLA:CPU leaves such scalars in kernels
      of their own: Euler--Maruyama ran 1.14-1.20x a hand-written scan at batch 1-64, tabulated
      0.98-1.05x.
    * ``singular_start(path) -> bool`` (optional): whether a step from ``t = 1`` is singular on
      ``path`` (the reverse SDE's drift ``f = d log alpha / dt`` where ``alpha_1 = 0``;
      ``interpolant_sde``'s score where the noise scale is 0 at ``t = 1``, as on a Brownian
      bridge). ``jd.sample``'s default grid then starts at ``t = 1 - 1e-3``; ``check`` refuses a
      grid given from ``t = 1``.
    * ``interpolant``: whether ``path`` may also be a :class:`~jaxdiff.StochasticInterpolant`
      (``x_t = a_t x0 + b_t x1 + gamma_t z``, of which a ``GaussianPath`` is the case
      ``gamma = 0``); the others need the ``(x0, eps)`` hub of a ``GaussianPath``.
    """

    name: str
    init: Callable[..., Any]
    step: Callable[..., Any]
    evals_per_step: int
    evals_first_step: int = 0
    stochastic: bool = False
    grid: Grid = default_grid
    steps: int = 100
    t_end: float = 1e-3
    denoise: bool = False
    reaches_zero: bool = False
    check: Callable[[GaussianPath, Field, Array], Array] | None = None
    adaptive: Any = None
    singular_start: Callable[[Any], Any] | None = None
    interpolant: bool = False
    coefficients: Callable[[GaussianPath, Field, Array, Array], Any] | None = None  # (ts, i)

    def nfe(self, num_steps: int) -> int:
        """Network evaluations of ``num_steps`` steps (without the denoising step)."""
        return self.evals_first_step * (num_steps > 0) + self.evals_per_step * num_steps

    def __repr__(self) -> str:
        return f"Sampler({self.name})"


def between(fn: Callable[[GaussianPath, Field, Array, Array], Any]) -> Callable:
    """A single-step sampler's ``coefficients(path, field, ts, i)`` from its
    ``fn(path, field, t, s)`` of the step's two times."""
    return lambda path, field, ts, i: fn(path, field, ts[i], ts[i + 1])


def normal(key: Array, x: Array) -> Array:
    """A standard normal draw shaped like ``x``."""
    return normal_like(key, x)


def combine(x: Array, *terms: tuple[Any, Any]) -> Array:
    """``sum(c * v for c, v in terms)`` for coefficients ``c`` of ``t`` (scalars or one per
    sample), computed in ``max(float32, x.dtype)`` and returned in ``x``'s dtype."""
    wide = jnp.promote_types(x.dtype, jnp.float32)
    out = sum(
        expand_like(jnp.asarray(c), x).astype(wide) * jnp.asarray(v).astype(wide) for c, v in terms
    )
    return out.astype(x.dtype)


def alpha_zero_at_start(path: GaussianPath, ts: Array) -> Array:
    return path.alpha(ts[0]) == 0
