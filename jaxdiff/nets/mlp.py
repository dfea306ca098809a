"""An MLP field for vector data of any dimension (2-D toys, flattened images)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import wide_dtype
from jaxdiff.nets.embeddings import conditioning

Array = jax.Array

__all__ = ["MLP"]


class MLP(nn.Module):
    """Residual SiLU MLP ``(x, t, labels) -> output shaped like x``.

    ``x`` is ``(batch, *event)``, flattened to ``(batch, d)`` inside; ``t`` a scalar or ``(batch,)``
    in ``[0, 1]``. The input layer sees ``[x, c]`` with ``c`` the time (and label) embedding; each
    of the ``depth`` blocks is ``h += Dense(silu(h + Dense(c)))``: one ``width x width`` matmul per
    block, so the MLP stays cheap on a CPU. ``num_classes`` adds a label embedding with a learned
    null label ``num_classes`` for classifier-free guidance. What the output means (``eps``,
    ``x0``, ``v``, ``velocity``, ``score``) is the target the loss trains it on.

    ``dtype=jnp.bfloat16`` computes in bfloat16 with float32 parameters (mixed precision); the
    output is cast back to ``x``'s dtype, so the loss stays in float32.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff.nets import init_params
    >>> model = MLP(width=32, depth=2)
    >>> params = init_params(model, jax.random.key(0), jnp.zeros((4, 2)), 0.5)
    >>> model.apply(params, jnp.ones((4, 2)), jnp.full(4, 0.3)).shape
    (4, 2)
    """

    width: int = 128
    depth: int = 3
    num_classes: int | None = None
    time_embedding: str = "fourier"
    emb_dim: int = 64
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, t: ArrayLike, labels: Array | None = None) -> Array:
        batch, shape = x.shape[0], x.shape
        dtype = self.dtype or x.dtype
        cond = conditioning(
            t,
            labels,
            batch,
            wide_dtype(x.dtype),  # times never take x's dtype
            self.emb_dim,
            self.time_embedding,
            self.num_classes,
            compute_dtype=dtype,
        )
        dense = partial(nn.Dense, self.width, dtype=dtype)
        h = dense()(jnp.concatenate([x.reshape(batch, -1).astype(dtype), cond], axis=-1))
        for _ in range(self.depth):
            h = h + dense()(nn.silu(h + dense()(cond)))
        out = nn.Dense(math.prod(shape[1:]), dtype=dtype, kernel_init=nn.initializers.zeros)(
            nn.silu(h)
        )
        return out.reshape(shape).astype(x.dtype)
