r"""Sources: what a path reaches at ``t = 1``, as a sampler ``(key, shape) -> x1``.

Flow matching needs no Gaussian at ``t = 1`` (Lipman et al. 2023; Tong et al. 2024; Albergo &
Vanden-Eijnden 2023): with ``x1`` drawn from any source, ``x_t = alpha_t x0 + sigma_t x1`` on a
path with ``alpha_1 = 0`` and ``sigma_1 = 1`` carries the data at ``t = 0`` to the source at
``t = 1``, and its marginal velocity ``E[alpha_t' x0 + sigma_t' x1 | x_t]`` carries it back. The
hub of :mod:`jaxdiff.conversions` stays exact with ``eps`` read as ``x1``: the targets ``velocity``,
``x0``, ``eps`` (then ``E[x1 | x_t]``, "x1-prediction") and ``v`` are posterior means of affine
functions of ``(x0, x1)``. The ``score`` is not: ``-E[eps | x_t] / sigma_t`` is Tweedie's formula
only for ``eps ~ N(0, I)`` independent of ``x0``, so a non-Gaussian source (or a coupling, see
:mod:`jaxdiff.couplings`) rules out the score target, denoising score matching and the reverse SDE
(``eta > 0``); sample with the probability-flow ODE (``eta = 0``) from the source:
``jd.sample(key, path, field, shape, source=source)`` draws the start and refuses what needs a
Gaussian one.

``Source(fn, gaussian)`` marks whether ``fn`` draws ``N(0, I)``; a bare function passed as a source
counts as non-Gaussian (the safe reading).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdiff._checks import check_finite, concrete, data_dtype, normal_like
from jaxdiff.couplings import is_independent
from jaxdiff.paths import GaussianPath

Array = jax.Array

__all__ = [
    "Source",
    "standard_normal",
    "dataset_source",
    "is_gaussian",
    "check_source_path",
    "check_gaussian_targets",
    "unpack_batch",
    "draw_pairs",
]


class Source(eqx.Module):
    """A sampler ``(key, shape) -> x1`` of the distribution at ``t = 1``.

    ``gaussian`` is ``True`` only when ``fn`` draws independent ``N(0, 1)`` entries (then scores and
    the reverse SDE stay meaningful).

    >>> import jax
    >>> src = dataset_source(lambda key, n: jax.random.uniform(key, (n, 2)))
    >>> src(jax.random.key(0), (5, 2)).shape, src.gaussian
    ((5, 2), False)
    """

    fn: Callable[[Array, tuple[int, ...]], Array] = eqx.field(static=True)
    gaussian: bool = eqx.field(static=True, default=False)

    def __call__(self, key: Array, shape: tuple[int, ...]) -> Array:
        return self.fn(key, tuple(shape))


def _normal(key: Array, shape: tuple[int, ...]) -> Array:
    return jax.random.normal(key, shape)


def standard_normal() -> Source:
    """``N(0, I)``: the default source of every loss and sampler."""
    return Source(_normal, gaussian=True)


class _Dataset(eqx.Module):
    sample: Callable[[Array, int], Array] = eqx.field(static=True)

    def __call__(self, key: Array, shape: tuple[int, ...]) -> Array:
        x = jnp.asarray(self.sample(key, shape[0]))
        if x.shape != shape:
            flat = x.ndim == 2 or len(shape) == 2  # (n, d) for (n, *event) or back: a reshape
            if x.shape[:1] != shape[:1] or not flat or math.prod(x.shape) != math.prod(shape):
                raise ValueError(
                    f"the source drew shape {x.shape} for {shape[0]} points; the data have shape "
                    f"{shape}"
                )
            x = x.reshape(shape)
        return x


def dataset_source(sample: Callable[[Array, int], Array]) -> Source:
    """A source from a data sampler ``(key, n) -> (n, *event)``, e.g. ``jd.data.moons``."""
    if not callable(sample):
        raise TypeError(
            f"sample must be a function (key, n) -> points; got {type(sample).__name__}"
        )
    return Source(_Dataset(sample), gaussian=False)


def as_source(source: Any) -> Source | None:
    """``None`` (the standard normal) or a :class:`Source`; a bare function is non-Gaussian."""
    if source is None or isinstance(source, Source):
        return source
    if callable(source):
        return Source(source, gaussian=False)
    raise TypeError(f"source must be a function (key, shape) -> x1; got {type(source).__name__}")


def is_gaussian(source: Any) -> bool:
    """Whether ``source`` draws ``N(0, I)`` (``None`` is the default standard normal)."""
    return source is None or (isinstance(source, Source) and source.gaussian)


def check_source_path(path: GaussianPath) -> None:
    """Raise unless ``path`` ends at the source: ``alpha_1 = 0`` and ``sigma_1 = 1``.

    Then ``x_1 = x1`` exactly, so sampling can start from ``source(key, shape)``. The linear and
    cosine paths qualify; VP (``alpha_1 = e^{-5.025}``) and VE (``alpha_1 = 1``) do not.
    """
    one = jnp.ones((1,))
    a, s = concrete(path.alpha(one)), concrete(path.sigma(one))
    if a is None or s is None:
        return
    if abs(float(a[0])) > 1e-6 or abs(float(s[0]) - 1.0) > 1e-6:
        raise ValueError(
            f"a non-Gaussian source needs a path that ends at it (alpha_1 = 0, sigma_1 = 1, e.g. "
            f"linear_path() or cosine_path()); this path has alpha_1 = {float(a[0]):.4g}, "
            f"sigma_1 = {float(s[0]):.4g}"
        )


# --- batches and pairs: what every loss draws ---------------------------------------------------


def unpack_batch(batch: Any) -> tuple[Array, Array | None, Array | None]:
    """``(x0, x1 or None, labels or None)`` of a batch: ``x0``, ``(x0, labels)`` or a dict with
    key ``"x0"`` and optionally ``"x1"`` (source points) and ``"labels"``. Integer points (pixels)
    come back as floats (the default float): noise is drawn in their dtype."""
    if isinstance(batch, dict):
        unknown = set(batch) - {"x0", "x1", "labels"}
        if "x0" not in batch or unknown:
            raise ValueError(
                f"a dict batch has keys 'x0' and optionally 'x1', 'labels'; got {sorted(batch)}"
            )
        get = lambda k: None if batch.get(k) is None else jnp.asarray(batch[k])  # noqa: E731
        x0, labels, x1 = _points(batch["x0"]), get("labels"), get("x1")
        _check_labels(x0, labels)
        return x0, None if x1 is None else _points(x1, "the batch's x1"), labels
    if isinstance(batch, tuple | list):
        if len(batch) != 2:
            raise ValueError("a batch is x0, a pair (x0, labels) or a dict {'x0', 'x1', 'labels'}")
        labels = None if batch[1] is None else jnp.asarray(batch[1])  # None: a raw TypeError
        x0 = _points(batch[0])
        _check_labels(x0, labels)
        return x0, None, labels
    return _points(batch), None, None


def _points(x: Any, name: str = "the batch's x0") -> Array:
    """``x`` as an array of its own float dtype, or the default float for integers (an int32
    ``x0`` made ``jax.random.normal`` fail with a dtype error), checked to be a non-empty batch
    ``(batch, *event)`` of finite points: eagerly, or when a jitted loss runs (a NaN in the data
    gave every loss a silent NaN and NaN gradients)."""
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch, shape (batch, *event); got {x.shape}")
    return check_finite(x.astype(data_dtype(x)), name)


def _check_labels(x0: Array, labels: Array | None) -> None:
    """Shapes are static: labels for another number of points are refused at trace time (``x1``'s
    shape is checked where the pairs are drawn)."""
    if labels is not None and (not labels.ndim or labels.shape[0] != x0.shape[0]):
        raise ValueError(
            f"the batch's labels have shape {labels.shape} for {x0.shape[0]} points (x0 "
            f"{x0.shape}); expected ({x0.shape[0]}, ...)"
        )


def check_gaussian_targets(
    targets: tuple[str, ...], source: Any, coupling: Any, where: str
) -> None:
    """Refuse the score target unless ``x1`` is ``N(0, I)`` and independent of ``x0``."""
    if "score" not in targets:
        return
    if not is_gaussian(source):
        why = "a non-Gaussian source (or source points from the batch)"
    elif not is_independent(coupling):
        why = f"the coupling {type(coupling).__name__} (x1 then depends on x0)"
    else:
        return
    raise ValueError(
        f"{where}: the 'score' target needs x1 ~ N(0, I) independent of x0 (Tweedie's formula), "
        f"not {why}; predict and regress 'velocity', 'x0', 'v' or 'eps' (then E[x1 | x_t]), and "
        "sample with the ODE (eta = 0)"
    )


def draw_pairs(
    key: Array, batch: Any, source: Any = None, coupling: Any = None
) -> tuple[Array, Array, Array | None]:
    """``(x0, x1, labels)`` of a batch: ``x1`` from the batch or ``source(key, x0.shape)`` (default
    ``N(0, I)``), then reordered by ``coupling``. The building block of the losses."""
    x0, x1, labels = unpack_batch(batch)
    src_key, c_key = jax.random.split(key)
    if x1 is None:
        src = as_source(source)
        x1 = (
            normal_like(src_key, x0)
            if src is None
            else check_finite(  # one NaN drawn made every pair of exact_ot NaN, silently
                jnp.asarray(src(src_key, x0.shape)).astype(x0.dtype), "the source's draw x1"
            )
        )
    if x1.shape != x0.shape:
        raise ValueError(f"source points have shape {x1.shape}; the data have shape {x0.shape}")
    if coupling is not None:
        out = coupling(c_key, x0, x1) if labels is None else coupling(c_key, x0, x1, labels)
        x0, x1 = out[0], out[1]
        labels = out[2] if labels is not None else None
    return x0, x1, labels
