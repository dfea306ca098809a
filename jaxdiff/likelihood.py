r"""Exact log-likelihoods by the probability-flow ODE and the instantaneous change of variables.

Along the PF-ODE ``dx/dt = v(x, t)`` (``jaxdiff.probability_flow_drift``) the density obeys
``d log p_t(x_t) / dt = -div v(x_t, t)`` (Chen et al. 2018; Song et al. 2021, App. D), so

    ``log p_{t0}(x) = log p_1(x_1) + int_{t0}^{1} div v(x_t, t) dt``,

solved forwards from the data as one ODE in the pytree state ``(x, int div)`` with an adaptive
diffrax solver (``jaxdiff.integrate``). The divergence is exact (``D`` Jacobian-vector products
for ``D`` numbers per sample: low dimension) or Hutchinson's unbiased estimate
``E_z[z^T (dv/dx) z]`` with ``num_probes`` Gaussian or Rademacher probes per sample, drawn once per
solve (Grathwohl et al. 2019). The result is differentiable in ``x`` and in anything ``field``
closes over (reverse mode through diffrax's ``RecursiveCheckpointAdjoint``), jit-able and batched.

A half-precision ``x`` is integrated in float32 (``logp`` is float32).

``t0 = t_start`` (default ``1e-3``) rather than 0, where ``sigma_0 = 0`` makes the ODE singular:
the result is the density of ``x_{t0}``, i.e. of the data blurred by ``sigma_{t0}``. The default is
the training minimum of :func:`jaxdiff.uniform_time` and the samplers' ``t_end``: below the times a
network was trained on its field is an extrapolation whose divergence is unbounded, and a few
outliers then dominate the mean (the digits MLP of ``scripts/digits_likelihood.py``,
``results/digits_likelihood.json``: median 2.88 bits/dim from either time, mean 655 from
``1e-3`` and 943 from ``1e-5`` through 2 of 297 digits; with the ELBO weighting 19 digits are
that far from ``1e-3`` and 34 from ``1e-5``). For a network trained from ``t_min``, pass
``t_start = t_min``.

**Discrete data.** For integers in ``{0, ..., K-1}`` scaled to ``[lo, hi]``, :func:`dequantize`
adds uniform noise and returns the log-volume of a bin, ``D log((hi - lo) / K)``; then
``log P(x) >= E_u[log p(y)] + D log((hi - lo) / K)`` (Theis et al. 2016). In bits per dimension,
``bpd = -log p(y) / (D log 2) + log2(K / (hi - lo))``: the offset is ``+7`` for 8-bit data on
``[-1, 1]`` and ``+8`` on ``[0, 1]`` (score_sde's ``offset = 7 - inverse_scaler(-1)``).
:func:`variational_dequantize` draws ``u`` from a learned conditional density ``q(u | x)``
instead (Ho et al. 2019, Flow++ Sec. 3.1); its ``log_weight`` is ``log_volume - log q(u | x)``, so
the same bound reads ``log P(x) >= E_q[log p(y) + log_weight]``, tight when ``q`` is the model's
own density within the bin.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import (
    check_count,
    check_finite,
    check_order,
    check_time,
    coef_time,
    concrete,
    data_dtype,
    value_check,
    wide_dtype,
)
from jaxdiff._engine import (
    SLOPE_MESSAGE,
    VELOCITY_HINT,
    grid_check,
    prior_time,
    require_gaussian_path,
    slope_singular,
    slope_singular_at_one,
)
from jaxdiff._programs import run_jit
from jaxdiff.field import Field, as_field
from jaxdiff.integrate import integrate
from jaxdiff.paths import GaussianPath
from jaxdiff.sde import probability_flow_drift

Array = jax.Array

__all__ = [
    "Likelihood",
    "log_likelihood",
    "divergence",
    "dequantize",
    "variational_dequantize",
    "affine_flow",
]


class Likelihood(NamedTuple):
    """``logp``: ``log p_{t_start}(x)`` per sample (nats); ``z``: the state at ``t_end``;
    ``delta``: ``int div v dt``; ``nfe``: evaluations of the drift (each one forward pass of the
    field plus ``D`` or ``num_probes`` JVPs); ``num_steps``: solver steps."""

    logp: Array
    z: Array
    delta: Array
    nfe: Array
    num_steps: Array


def divergence(
    fn: Callable[[Array], Array], x: Array, probes: Array | None = None
) -> tuple[Array, Array]:
    """``(fn(x), div fn(x))`` per sample for ``x`` of shape ``(batch, *event)``.

    Exact with ``probes=None`` (one JVP per coordinate of the event), else Hutchinson's
    ``mean_k z_k^T J z_k`` over ``probes`` of shape ``(K, *x.shape)``. Samples must not interact in
    ``fn`` (no batch statistics).

    >>> import jax.numpy as jnp
    >>> v, div = divergence(lambda x: 3.0 * x, jnp.ones((2, 4)))
    >>> div.tolist()
    [12.0, 12.0]
    """
    axes = tuple(range(1, x.ndim))
    exact = probes is None
    if not exact and (jnp.ndim(probes) != x.ndim + 1 or jnp.shape(probes)[1:] != x.shape):
        raise ValueError(f"probes must have shape (K, *x.shape) = (K, {str(x.shape)[1:]}; got "
                         f"{jnp.shape(probes)}")  # fmt: skip
    value = fn(x)  # under jit the JVPs' primal merges with it
    if value.shape != x.shape:  # a raw error inside the JVP, or a broadcast
        raise ValueError(f"fn(x) must have x's shape {x.shape}; got {value.shape}")
    if exact:
        d = math.prod(x.shape[1:])
        probes = jnp.broadcast_to(
            jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:]), (d,) + x.shape
        )

    def quadratic(z):  # z^T J z per sample by a forward JVP, not jax.linearize, whose
        # transposable form made gradients of the oracle's divergence in its covariances NaN
        return jnp.sum(z * jax.jvp(fn, (x,), (z,))[1], axis=axes)

    quads = jax.vmap(quadratic)(probes)
    return value, jnp.sum(quads, axis=0) if exact else jnp.mean(quads, axis=0)


def log_likelihood(
    path: GaussianPath,
    field: Field,
    x: ArrayLike,
    *,
    key: Array | None = None,
    num_probes: int | None = None,
    probe: Callable = jax.random.normal,
    t_start: ArrayLike = 1e-3,
    t_end: ArrayLike | None = None,
    solver: diffrax.AbstractSolver | None = None,
    steps: int | None = None,
    rtol: ArrayLike | None = None,
    atol: ArrayLike | None = None,
    max_steps: int = 4096,
    adjoint: diffrax.AbstractAdjoint | None = None,
    prior_logp: Callable[[Array], Array] | None = None,
) -> Likelihood:
    """``log p_{t_start}(x)`` of each sample of ``x`` (``(batch, *event)``) by the PF-ODE.

    ``field`` is a :class:`~jaxdiff.Field`. ``num_probes=None``: exact divergence; else Hutchinson
    with ``num_probes`` draws of ``probe(key, shape, dtype)`` per sample (``jax.random.normal`` or
    ``jax.random.rademacher``), fixed along the solve. ``solver`` defaults to ``Tsit5`` with a PID
    controller at ``rtol``/``atol`` (default ``1e-5`` each). ``steps=N`` without ``rtol``/``atol``
    solves on ``N`` uniform steps instead, with any diffrax solver (``Euler``, ``Heun``, ...:
    a fixed cost, a static ``nfe``, and derivatives through the scan rather than an adjoint);
    with ``rtol``/``atol`` too, ``N`` only sizes the first trial step, as in :func:`integrate`.
    ``prior_logp`` (default ``path.prior_logp`` at ``t_end``, the
    density of ``N(0, sigma_{t_end}^2 I)``) scores the end state. Divide ``-logp`` by
    ``D log 2`` for bits/dim.

    ``t_end`` defaults to 1, or to ``1 - 1e-3`` where the drift is singular at ``t = 1``: an
    ``eps`` or ``score`` field (also inside a wrapper) or an inverse field (``jd.dps``,
    ``pigdm``, ``tmpd``) on a path with ``alpha_1 = 0`` (linear, cosine); any field where the
    log-SNR falls by more than 1 over the last ``1e-3`` (``cosine_betas()``) or the path's slope
    is not finite at ``t = 1`` (a zero-terminal-SNR schedule). The default prior is
    for a ``t_end`` at or near the prior end, where ``p_t`` is close to ``N(0, sigma_t^2 I)``; for
    an earlier ``t_end`` pass ``prior_logp``.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[1.0, 0.0], [-1.0, 0.0]]), std=0.5)
    >>> path = jd.linear_path()
    >>> x = data.sample(jax.random.key(0), 4)
    >>> out = log_likelihood(path, data.field(path, "velocity"), x)
    >>> exact = data.marginal_log_prob(path, x, 1e-3)
    >>> bool(jnp.max(jnp.abs(out.logp - exact)) < 1e-2)
    True
    """
    field = as_field(field)
    require_gaussian_path(path, "log_likelihood", VELOCITY_HINT + " and prior_logp= of the source")
    x = check_finite(jnp.asarray(x), "x")
    x = x.astype(wide_dtype(data_dtype(x)))  # densities in float32 or wider, whatever x's dtype
    if x.ndim < 2:
        raise ValueError(f"x must be (batch, *event); got shape {x.shape}")
    if t_end is None:  # the PF-ODE's drift needs the path's slope: singular at zero terminal SNR
        t_end = prior_time(path, field, slope_singular_at_one)
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if jnp.ndim(value) != 0:  # failed inside the solver, naming its grid's shape
            raise ValueError(
                f"{name} must be a scalar (one integration for the batch; jax.vmap "
                f"log_likelihood for per-sample times); got shape {jnp.shape(value)}"
            )
    adaptive = steps is None or rtol is not None or atol is not None
    if adaptive:  # each tolerance not given is 1e-5 (integrate's own defaults differ)
        rtol, atol = (1e-5 if v is None else v for v in (rtol, atol))
    if adaptive and solver is not None and not isinstance(solver, diffrax.AbstractAdaptiveSolver):
        # integrate's message said "(or drop rtol/atol)", then asked for a steps= it has not
        raise ValueError(
            f"log_likelihood's solve is adaptive (rtol, atol); {type(solver).__name__} has no "
            "error estimate: use diffrax.Tsit5(), Dopri5() or Heun(), or pass steps=N (and no "
            "rtol/atol) for a fixed grid of N steps"
        )
    end_now = concrete(t_end)  # before any jnp op: under jit, jnp.asarray(1.0) is already traced
    start_now = concrete(t_start)
    t_start, t_end = check_time(t_start, "t_start"), check_time(t_end, "t_end")
    t_start, t_end = check_order(t_start, t_end, "t_start", "t_end")  # checked under jit too
    if isinstance(path, GaussianPath) and field.target in ("eps", "score"):
        known_end = t_end if end_now is None else end_now  # grid_check evaluates at trace time
        t_end = grid_check(  # at trace time where t_end and the path are known, else at run time
            t_end,
            lambda _: path.alpha(coef_time(known_end)) == 0,
            f"alpha_t = 0 at t_end on this path (t = 1 on the linear and cosine paths), where an "
            f"{field.target!r} prediction says nothing about x0 (x0 = (x - sigma eps) / alpha) and "
            "the probability-flow drift is infinite: integrate to t_end < 1 (e.g. 1 - 1e-3, where "
            "the prior N(0, sigma_t^2 I) is nearly exact) or use an 'x0', 'v' or 'velocity' field",
        )
    if isinstance(path, GaussianPath):
        known_end = t_end if end_now is None else end_now
        t_end = grid_check(
            t_end,
            lambda _: slope_singular(path, known_end),
            SLOPE_MESSAGE.format(
                where="t_end", what="", fix="integrate to t_end < 1 (the default does)"
            ),
        )
    if isinstance(path, GaussianPath):  # VP's sigma_t' is infinite at t = 0: the solve ran to
        known_start = t_start if start_now is None else start_now  # max_steps, then said so
        t_start = grid_check(
            t_start,
            lambda _: slope_singular(path, known_start),
            "the path's slope (d alpha / dt or d sigma / dt) is not finite at t_start (t = 0 on "
            "the VP and cosine paths), where the probability-flow drift is undefined: start at "
            "t_start > 0 (the default 1e-3, the training minimum)",
        )
    probes = None
    if num_probes is not None:
        if key is None:
            raise ValueError("Hutchinson's estimator (num_probes set) needs a PRNG key")
        num_probes = check_count(num_probes, "num_probes")  # 1.5 was read as 1 probe
        probes = probe(key, (num_probes,) + x.shape, x.dtype)

    def solve(field_arrays, x, probes):
        # the solve after the checks, in one program: called eagerly, diffrax's jit is keyed on
        # the drift, a fresh closure each call, so every call compiled anew (5-7 s on CPU)
        field_ = eqx.combine(field_arrays, field_static)

        def drift(state, t):
            y, _ = state

            def velocity(y):
                return probability_flow_drift(path, field_, y, t)

            return divergence(velocity, y, probes)

        sol = integrate(
            drift,
            (x, jnp.zeros(x.shape[:1], x.dtype)),
            t_start=t_start,
            t_end=t_end,
            steps=steps,
            solver=diffrax.Tsit5() if solver is None else solver,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            adjoint=adjoint,
        )
        z, delta = sol.x
        if prior_logp is None:
            prior = path.prior_logp(z, event_ndim=x.ndim - 1, t=t_end)
        else:
            prior = prior_logp(z)
        return Likelihood(prior + delta, z, delta, sol.nfe, sol.num_steps)

    field_arrays, field_static = eqx.partition(field, eqx.is_array)
    return run_jit(solve, field_arrays, x, probes)  # an eager repeat reuses the program


def dequantize(
    key: Array, x: ArrayLike, num_bins: int = 256, lo: float = -1.0, hi: float = 1.0
) -> tuple[Array, Array]:
    """Uniform dequantization: integers ``x`` in ``{0..K-1}`` to ``y = lo + (x + u)(hi - lo) / K``.

    Returns ``(y, log_volume)`` with ``log_volume = D log((hi - lo) / K)`` per sample (``x`` is
    ``(batch, *event)``): ``log P(x) >= E_u[log p(y)] + log_volume``.

    >>> import jax, jax.numpy as jnp
    >>> y, lv = dequantize(jax.random.key(0), jnp.array([[0, 255]]))
    >>> bool((y[0, 0] < -0.99) & (y[0, 1] > 0.99)), round(float(lv[0] / (2 * jnp.log(2.0))), 6)
    (True, -7.0)
    """
    x, width = _bins(x, num_bins, lo, hi)
    dtype = jnp.result_type(float)
    u = jax.random.uniform(key, x.shape, dtype)
    y = lo + (x.astype(dtype) + u) * width
    d = math.prod(x.shape[1:])
    return y, jnp.full(x.shape[:1], d * math.log(width), dtype)


def _bins(x: ArrayLike, num_bins: int, lo: float, hi: float) -> tuple[Array, float]:
    """Check the bins and ``x`` of shape ``(batch, *event)``; return ``(x, bin width)``."""
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be (batch, *event); got shape {x.shape}")
    num_bins = check_count(num_bins, "num_bins")
    check_order(lo, hi, "lo", "hi")
    if not (math.isfinite(lo) and math.isfinite(hi)):  # lo = -inf gave y = NaN
        raise ValueError(f"lo and hi must be finite; got lo = {lo}, hi = {hi}")
    msg = (
        f"x must hold bin indices, integers in [0, {num_bins - 1}] (pixels as integers, not "
        "scaled to [lo, hi])"
    )

    def bad(xp, w):
        if xp.issubdtype(w.dtype, xp.integer):  # uint8 under jit: `max < 256` wrapped to `< 0`
            w = w.astype(xp.promote_types(w.dtype, xp.int32))
        return ~(xp.all(w == xp.round(w)) & (w.min() >= 0) & (w.max() <= num_bins - 1))

    x = value_check(x, bad, msg, lambda v: f"values in [{v.min()}, {v.max()}]")
    return x, (hi - lo) / num_bins


DequantizationFlow = Callable[..., tuple[Array, Array]]


def affine_flow(apply: Callable[..., tuple[Array, Array]]) -> DequantizationFlow:
    """The conditional affine flow ``z = shift(c) + exp(log_scale(c)) * eps``.

    ``apply(params, c) -> (shift, log_scale)``, each of ``c``'s shape (``c``: the bins' centres);
    returns ``flow(params, eps, c) -> (z, log_det)`` with ``log_det = sum log_scale`` per sample,
    for :func:`variational_dequantize` (a diagonal ``q(u | x)``; zero shift and log-scale is
    uniform dequantization).
    """

    def flow(params, eps: Array, c: Array) -> tuple[Array, Array]:
        shift, log_scale = apply(params, c)
        axes = tuple(range(1, eps.ndim))
        return shift + jnp.exp(log_scale) * eps, jnp.sum(log_scale, axis=axes)

    return flow


def variational_dequantize(
    key: Array,
    flow: DequantizationFlow,
    params: Any,
    x: ArrayLike,
    num_bins: int = 256,
    lo: float = -1.0,
    hi: float = 1.0,
) -> tuple[Array, Array]:
    r"""Variational dequantization (Ho et al. 2019, Flow++ Sec. 3.1): ``u ~ q(u | x)`` on ``(0, 1)^D``.

    ``eps`` standard logistic, ``(z, log_det) = flow(params, eps, c)`` with
    ``c = lo + (x + 1/2) width`` the bins' centres and ``log_det = log |det dz/deps|`` per sample
    (any conditional bijection: :func:`affine_flow`, couplings), ``u = sigmoid(z)``,
    ``y = lo + (x + u) width``. Returns ``(y, log_weight)`` with
    ``log_weight = D log(width) - log q(u | x)``, where
    ``log q(u | x) = sum log sigmoid'(eps) - log_det - sum log sigmoid'(z)`` (the logistic density
    is ``sigmoid'``); then ``log P(x) >= E_q[log p(y) + log_weight]`` for any density ``p``. The
    logistic base makes the identity flow exactly :func:`dequantize` (``u = sigmoid(eps)`` is
    uniform, ``log q = 0``), so a flow initialised at the identity starts from uniform
    dequantization. Reparameterised: differentiable in ``params`` through ``y`` and
    ``log_weight``, so ``q`` trains by maximising the bound with ``log p`` from
    :func:`log_likelihood` or ``-``:func:`~jaxdiff.nelbo`.

    >>> import jax, jax.numpy as jnp
    >>> flow = affine_flow(lambda p, c: (jnp.zeros_like(c), jnp.full_like(c, p)))
    >>> y, lw = variational_dequantize(jax.random.key(0), flow, 0.0, jnp.array([[0, 255]]))
    >>> bool((y[0, 0] < -0.99) & (y[0, 1] > 0.99)), round(float(lw[0] / (2 * jnp.log(2.0))), 5)
    (True, -7.0)
    """
    x, width = _bins(x, num_bins, lo, hi)
    dtype = jnp.result_type(float)
    eps = jax.random.logistic(key, x.shape, dtype)
    c = lo + (x.astype(dtype) + 0.5) * width
    z, log_det = flow(params, eps, c)
    if jnp.shape(z) != x.shape or jnp.shape(log_det) != x.shape[:1]:
        raise ValueError(
            f"flow must return z of x's shape {x.shape} and log_det of shape {x.shape[:1]}; "
            f"got {jnp.shape(z)} and {jnp.shape(log_det)}"
        )
    axes = tuple(range(1, x.ndim))
    d = math.prod(x.shape[1:])

    def log_dsigmoid(v):  # log sigmoid'(v) = log sigmoid(v) + log sigmoid(-v), summed per sample
        return -jnp.sum(jax.nn.softplus(-v) + jax.nn.softplus(v), axis=axes)

    log_q = log_dsigmoid(eps) - log_det - log_dsigmoid(z)
    y = lo + (x.astype(dtype) + jax.nn.sigmoid(z)) * width
    return y, d * math.log(width) - log_q
