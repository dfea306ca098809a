r"""``Field``: a network (or an exact oracle) bound to the target it predicts.

A field is what samplers, likelihoods, ELBOs, guidance and losses consume. It is three things:
``fn``, the pure function; ``target``, what ``fn``'s output means (``"score"``, ``"eps"``,
``"x0"``, ``"v"`` or ``"velocity"``, see :mod:`jaxdiff.conversions`); and ``params``, the pytree
``fn`` is called with (``None`` for a plain function of ``(x, t)``)::

    field(x, t, *args) = fn(x, t, *args)            if params is None
                       = fn(params, x, t, *args)    otherwise

The contract for ``t``: samplers and losses call a field with ``x`` of shape ``(batch, *event)``
and ``t`` of shape ``(batch,)``, one time per sample (``t = 0`` is data, ``t = 1`` the prior).

Any network library becomes a field in one line:

* Flax linen: ``Field(model.apply, "eps", params)``;
* Flax NNX: ``graphdef, state = nnx.split(model)``;
  ``Field(lambda s, x, t: nnx.merge(graphdef, s)(x, t), "eps", state)``;
* Equinox: ``params, static = eqx.partition(model, eqx.is_array)``;
  ``Field(lambda p, x, t: eqx.combine(p, static)(x, t), "eps", params)``;
* a plain function of a parameter pytree: ``Field(apply, "velocity", params)``;
* a function of ``(x, t)`` alone (an oracle, a closed form): ``Field(fn, "score")``.

A loss trains ``params``: ``loss(params, key, batch)`` calls ``field.apply(params, x, t)``, that is
``fn(params, x, t)`` whatever ``field.params`` holds; a sampler uses the field as it is. ``Field`` is an ``equinox.Module``: ``params`` are its pytree leaves,
``fn`` and ``target`` are static, so a field can be passed through ``jax.jit``, ``vmap`` and
``grad`` like any pytree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from jaxdiff.conversions import Target, _check_target

Array = jax.Array

__all__ = ["Field", "as_field"]


class Field(eqx.Module):
    """A function bound to the target it predicts, and optionally to its parameters.

    >>> import jax.numpy as jnp
    >>> f = Field(lambda p, x, t: p * x, "eps", 2.0)
    >>> f(jnp.ones((3, 2)), jnp.full(3, 0.5))[0].tolist(), f.target
    ([2.0, 2.0], 'eps')
    >>> f.bind(3.0)(jnp.ones((1, 2)), jnp.zeros(1)).tolist()
    [[3.0, 3.0]]
    """

    fn: Callable[..., Array] = eqx.field(static=True)
    target: Target = eqx.field(static=True)
    params: Any = None

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Field's fn must be callable; got {type(self.fn).__name__}")
        _check_target(self.target)

    def __call__(self, x: Array, t: Array, *args: Any, **kwargs: Any) -> Array:
        if self.params is None:
            return self.fn(x, t, *args, **kwargs)
        return self.fn(self.params, x, t, *args, **kwargs)

    def apply(self, params: Any, x: Array, t: Array, *args: Any, **kwargs: Any) -> Array:
        """``fn(params, x, t, *args)`` with the given ``params`` (what a loss differentiates)."""
        return self.fn(params, x, t, *args, **kwargs)

    def bind(self, params: Any) -> Field:
        """The same function and target with ``params`` (e.g. the EMA weights after training)."""
        return Field(self.fn, self.target, params)


def as_field(field: Any, name: str = "field") -> Field:
    """``field`` if it is a :class:`Field`; a clear error for a bare function (no silent target)."""
    if isinstance(field, Field):
        return field
    if callable(field):
        raise TypeError(
            f"{name} is a bare function, so what it predicts is unknown; bind its target once: "
            f"jd.Field(fn, 'eps') for fn(x, t), or jd.Field(model.apply, 'velocity', params) for "
            f"a network (targets: 'score', 'eps', 'x0', 'v', 'velocity')"
        )
    raise TypeError(f"{name} must be a jaxdiff.Field; got {type(field).__name__}")
