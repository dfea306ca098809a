r"""UniPC (Zhao et al. 2023): a unified predictor-corrector of any order, data prediction.

Each step evaluates the network once, at the predicted sample ``x_t``. That evaluation first
*corrects* ``x_t`` (UniC: the update from the previous time is redone with the new evaluation as
one more interpolation point, free of extra network calls), then *predicts* the next sample
(UniP: DPM-Solver++-like multistep extrapolation). In ``lambda = log(alpha / sigma)``, ``h`` the
step, ``B(h) = -h`` (``"bh1"``) or ``e^{-h} - 1`` (``"bh2"``):

    ``x_s = (sigma_s / sigma_t) x - alpha_s (e^{-h} - 1) m_0 - alpha_s B(h) sum_k rho_k D_k``,

with ``D_k = (m_k - m_0) / r_k`` the scaled differences of earlier evaluations and ``rho`` solving
the order conditions ``R rho = b`` (``R_ik = r_k^(i-1)``, ``b_i = i! (-h) phi_{i+1}(-h) / B(h)``,
Zhao et al.'s ``h -> -h`` for data prediction). Order 2's
predictor uses ``rho = 1/2``, as the reference code. This follows diffusers'
``UniPCMultistepScheduler`` (``predict_x0=True``): the final step's evaluation is not used for a
correction, and the last steps lower their order with ``lower_order_final``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.field import predict
from jaxdiff.samplers.base import Sampler, combine
from jaxdiff.schedules import log_snr_grid

Array = jax.Array

__all__ = ["unipc"]


class State(NamedTuple):
    x: Array  # the predicted sample at the current time (corrected at the next evaluation)
    x_prev: Array  # the corrected sample at the previous time
    x_pred: Array  # x as the last step predicted it, before any hook moved it
    ms: Array  # x0_hat of the last evaluations, newest first: (order, *x.shape)
    lams: Array  # their lambdas: (order,)
    t_prev: Array  # the previous time
    order_prev: Array  # the order of the last prediction
    i: Array
    n: Array


def _coefficients(h, lams, lam0, k, variant):
    """``(rks, R, b, B_h, h_phi_1)`` of order ``k`` for a step ``h`` from ``lam0``; ``lams`` are the
    lambdas of the ``k - 1`` earlier evaluations."""
    hh = -h
    h_phi_1 = jnp.expm1(hh)  # e^{-h} - 1
    b_h = hh if variant == "bh1" else h_phi_1
    rks = jnp.concatenate([(lams[: k - 1] - lam0) / h, jnp.ones((1,), h.dtype)])
    h_phi_k, fact, b, rows = h_phi_1 / hh - 1.0, 1.0, [], []
    for i in range(1, k + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return rks, jnp.stack(rows), jnp.stack(b), b_h, h_phi_1


def _solve(R: Array, b: Array) -> Array:
    """``R^{-1} b`` for ``R`` of size 1-3 by Cramer's rule: elementwise arithmetic that XLA fuses
    (``jnp.linalg.solve`` is a LAPACK call of its own: in the step of a loop of one's own, and
    batched over the steps in ``jaxdiff.sample``'s table)."""
    k = R.shape[0]
    if k == 1:
        return b / R[0, 0]

    def det(m):
        if k == 2:
            return m[0][0] * m[1][1] - m[0][1] * m[1][0]
        return (
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        )

    rows = [[R[i, j] for j in range(k)] for i in range(k)]
    d = det(rows)
    cols = [
        det([[b[i] if j == c else rows[i][j] for j in range(k)] for i in range(k)])
        for c in range(k)
    ]
    return jnp.stack(cols) / d


def _diffs(ms, rks, k):
    """``D_k = (m_k - m_0) / r_k`` for the ``k - 1`` earlier evaluations: ``(k - 1, *x.shape)``."""
    r = rks[: k - 1].reshape((k - 1,) + (1,) * (ms.ndim - 1))
    return (ms[1:k] - ms[0][None]) / r


def _predictor(k, variant, x, ms, lams, h, ratio, a_s):
    rks, R, b, b_h, h_phi_1 = _coefficients(h, lams[1:], lams[0], k, variant)
    out = ratio * x - a_s * h_phi_1 * ms[0]
    if k == 1:
        return out
    rhos = jnp.full((1,), 0.5, h.dtype) if k == 2 else _solve(R[:-1, :-1], b[:-1])
    return out - a_s * b_h * jnp.tensordot(rhos.astype(x.dtype), _diffs(ms, rks, k), axes=1)


def _corrector(k, variant, x_prev, m_t, ms, lams, h, ratio, a_t):
    rks, R, b, b_h, h_phi_1 = _coefficients(h, lams[1:], lams[0], k, variant)
    rhos = jnp.full((1,), 0.5, h.dtype) if k == 1 else _solve(R, b)
    rhos = rhos.astype(x_prev.dtype)
    res = rhos[-1] * (m_t - ms[0])
    if k > 1:
        res = res + jnp.tensordot(rhos[:-1], _diffs(ms, rks, k), axes=1)
    return ratio * x_prev - a_t * h_phi_1 * ms[0] - a_t * b_h * res


def _known(lams):
    """How many of the leading earlier evaluations lie at finite ``lambda`` (usable points)."""
    return jnp.sum(jnp.cumprod(jnp.isfinite(lams).astype(jnp.int32)))


def _order(order, lower_order_final, path, s, lams, i, n):
    """The order of step ``i``'s prediction (to ``s``), ``lams`` the history with its evaluation."""
    o = jnp.minimum(order, i + 1)
    if lower_order_final:
        o = jnp.minimum(o, n - i)
    o = jnp.minimum(o, 1 + _known(lams[1:]))  # earlier points at lambda = -inf: unusable
    return jnp.where(path.sigma(s) == 0, 1, o).astype(jnp.int32)


def _unit(i: int, size: int, dtype) -> Array:
    return jnp.zeros((size,), dtype).at[i].set(1.0)


def _weights(order, variant, path, t, s, lams, t_prev, order_prev, i, n, lower_order_final):
    """What a step from ``t`` to ``s`` needs of the times alone: the weights of the corrected
    sample ``x_c = w_c . (x, x_prev, m_t, ms...)`` and of the prediction
    ``x_s = w_p . (x_c, m_t, ms[:-1]...)``, both linear in the states, with the orders of the
    correction and of the prediction folded in; and the new history ``(lams, order)``.

    The weights are the corrector and predictor above applied to unit vectors (they are linear in
    the states), so the step is two fused sums."""
    dtype = lams.dtype
    t, s, t_prev = (jnp.asarray(v, dtype) for v in (t, s, t_prev))
    lam_t, lam_s = 0.5 * path.log_snr(t), 0.5 * path.log_snr(s)
    # UniC: redo the last update (from t_prev, lams[0]) with the evaluation at x
    usable = (i > 0) & jnp.isfinite(lams[0])
    # a step from lambda = -inf (alpha = 0: t = 1 on the linear path) is corrected by UniC-1's
    # limit h -> inf under "bh2", the trapezoid in u = alpha / sigma (x / sigma moves by
    # int x0_hat du from u = 0): x_c = (sigma_t / sigma_prev) x_prev + alpha_t (m_prev + m_t) / 2.
    # Left uncorrected it was first order, a floor no step count removed (2.3e-4 on the tests'
    # mixture from 128 steps); "bh1"'s B(h) = -h has no limit there, so both variants take it
    from_inf = (i > 0) & ~jnp.isfinite(lams[0])
    h_c = jnp.where(usable, lam_t - lams[0], 1.0)
    size_c = order + 3  # x, x_prev, m_t, ms[0..order-1]
    ms_c = jnp.stack([_unit(3 + j, size_c, dtype) for j in range(order)])
    args_c = (_unit(1, size_c, dtype), _unit(2, size_c, dtype), ms_c, lams, h_c,
              path.sigma(t) / path.sigma(t_prev), path.alpha(t))  # fmt: skip
    k_c = jnp.clip(jnp.minimum(order_prev, 1 + _known(lams[1:])), 1, order)
    w_c = jax.lax.switch(
        k_c - 1, [lambda a, k=k: _corrector(k, variant, *a) for k in range(1, order + 1)], args_c
    )
    half = 0.5 * path.alpha(t)
    trapezoid = path.sigma(t) / path.sigma(t_prev) * _unit(1, size_c, dtype) + half * (
        _unit(2, size_c, dtype) + _unit(3, size_c, dtype)
    )
    w_c = jnp.where(usable, w_c, jnp.where(from_inf, trapezoid, _unit(0, size_c, dtype)))
    # UniP: predict the next sample from the history with the new evaluation first
    lams = jnp.concatenate([lam_t[None].astype(dtype), lams[:-1]])
    o = _order(order, lower_order_final, path, s, lams, i, n)
    size_p = order + 1  # x_c, then the new history
    ms_p = jnp.stack([_unit(1 + j, size_p, dtype) for j in range(order)])
    args_p = (_unit(0, size_p, dtype), ms_p, lams, lam_s - lam_t, path.sigma(s) / path.sigma(t),
              path.alpha(s))  # fmt: skip
    w_p = jax.lax.switch(
        o - 1, [lambda a, k=k: _predictor(k, variant, *a) for k in range(1, order + 1)], args_p
    )
    return w_c, w_p, lams, o


def unipc(order: int = 2, *, variant: str = "bh2", lower_order_final: bool = True) -> Sampler:
    """UniPC of ``order`` 1, 2 or 3 (Zhao et al. 2023), ``variant`` ``"bh1"`` or ``"bh2"``.

    One evaluation per step; the corrector raises the order by one at no extra cost. Default:
    order 2 with ``"bh2"`` (diffusers' defaults), 10 steps uniform in log-SNR, then the denoising
    step (11 evaluations). The weights of each step depend on the grid alone (its times and the
    orders used), so ``jaxdiff.sample`` tabulates them before the scan. ``lower_order_final``
    (diffusers' default) takes the last steps at lower order, which pays below ~15 steps; with
    hundreds it costs order: ``unipc(3)`` on VP measured orders 3.6 and 3.3 at 256 and 512
    steps, 3.7 and 3.8 without it (float64, the exact field). On paths where ``alpha(1) = 0``
    the default grid's first step, from pure noise, is corrected in ``u = alpha / sigma`` (the
    trapezoid: UniC-1's limit), so its error falls at second order there too, down to the
    trapezoid's own error on that fixed first step (~9e-7 on a test mixture, reached by
    ``unipc(3)`` from ~512 steps; a grid from ``t_start = 0.999`` moves it to 2.3e-9).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.vp_path()
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "eps"), (4096, 2),
    ...                 sampler=unipc(), steps=20)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 21)
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2'; got {variant!r}")

    def weights(path, t, s, lams, t_prev, order_prev, i, n):
        return _weights(order, variant, path, t, s, lams, t_prev, order_prev, i, n,
                        lower_order_final)  # fmt: skip

    def init(path, field, x, ts) -> State:
        dtype = jnp.result_type(x.dtype, jnp.float32)
        # like x (inside shard_map a plain zeros buffer did not vary as x does: the scan's carry
        # types differed, "carry input and carry output must have equal types")
        zeros = jnp.zeros_like(jnp.broadcast_to(x, (order,) + x.shape))
        n = jnp.asarray(ts.shape[0] - 1, jnp.int32)
        one = jnp.ones((), jnp.int32)
        lams = jnp.full((order,), -jnp.inf, dtype)  # -inf: no evaluation there (yet)
        return State(x, x, x, zeros, lams, ts[0].astype(dtype), one, jnp.zeros((), jnp.int32), n)

    def coefficients(path, field, ts, i):
        """Step ``i``'s weights from the grid: the history a loop would carry, rebuilt."""
        dtype = jnp.result_type(ts.dtype, jnp.float32)
        n = jnp.asarray(ts.shape[0] - 1, jnp.int32)

        def history(i):  # lambdas of the evaluations before step i, newest first
            idx = i - 1 - jnp.arange(order)
            lam = 0.5 * path.log_snr(ts[jnp.maximum(idx, 0)].astype(dtype))
            return jnp.where(idx >= 0, lam, -jnp.inf)

        # the order of step i - 1's prediction (1 at i = 0, as init)
        prev = _order(order, lower_order_final, path, ts[i], history(i), i - 1, n)
        order_prev = jnp.where(i > 0, prev, 1)
        return weights(path, ts[i], ts[i + 1], history(i), ts[jnp.maximum(i - 1, 0)],
                       order_prev, i, n)  # fmt: skip

    def step(key, path, field, state: State, t, s, coefs=None) -> State:
        x, x_prev, x_pred, ms, lams, t_prev, order_prev, i, n = state
        if coefs is None:
            coefs = weights(path, t, s, lams, t_prev, order_prev, i, n)
        w_c, w_p, lams, o = coefs
        m_t, _ = predict(path, field, x, t)
        x_c = combine(x, (w_c[0], x), (w_c[1], x_prev), (w_c[2], m_t),
                      *((w_c[3 + j], ms[j]) for j in range(order)))  # fmt: skip
        # the corrector rebuilds x from x_prev (x's weight w_c[0] is 0 after the first step), so
        # what a hook did to x was lost (UniPC returned the unhooked answer, 1.55 off): the
        # correction is added to the hooked x instead, exactly 0 where no hook moved it
        moved = (1 - w_c[0]).astype(x.dtype) * (x - x_pred)
        x_c = x_c + moved
        ms = jnp.concatenate([m_t[None], ms[:-1]])
        x_s = combine(x, (w_p[0], x_c), *((w_p[1 + j], ms[j]) for j in range(order)))
        return State(x_s, x_c, x_s, ms, lams.astype(state.lams.dtype),
                     jnp.asarray(t, t_prev.dtype), o, i + 1, n)  # fmt: skip

    return Sampler(
        name=f"unipc(order={order}, variant={variant})",
        init=init,
        step=step,
        evals_per_step=1,
        grid=lambda path, steps, t_start, t_end: log_snr_grid(path, steps, t_start, t_end),
        steps=10,
        denoise=True,
        reaches_zero=True,
        coefficients=coefficients,
    )
