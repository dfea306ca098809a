r"""Shortcut models: one network for every step size, trained by self-consistency.

Frans, Hafner, Levine & Abbeel (2024), "One Step Diffusion via Shortcut Models". A shortcut
``u(z_t, t, r)`` jumps from ``t`` to ``r = t - d`` in one evaluation,

    ``z_{t-d} = z_t - d u(z_t, t, t - d)``,

which is MeanFlow's average velocity over ``[r, t]`` (:mod:`jaxdiff.meanflow`): the two methods
train the same object, on the same two-time networks (``jaxdiff.nets.TwoTimeMLP``,
``TwoTimeUNet``), sampled by the same ``jd.samplers.meanflow()`` with ``steps = 1, 2, 4, ...``.
MeanFlow enforces the identity ``u = v - (t - r) du/dt`` with a JVP; shortcut models enforce
that one step of ``2h`` is two steps of ``h``, with two more forward passes and no derivative:

    flow matching (``d = 0``): ``|u(z_t, t, t) - (alpha_t' x + sigma_t' e)|^2``,
    self-consistency: ``u_1 = u(z_t, t, t - h)``, ``z' = z_t - h u_1``, ``u_2 = u(z', t - h, t - 2h)``,
    ``|u(z_t, t, t - 2h) - sg((u_1 + u_2) / 2)|^2``,

with ``2h`` in ``{1, 1/2, ..., 2/M}`` (a level drawn uniformly per example) and ``t`` on that level's
grid ``{2h, 4h, ..., 1}``, so every jump of a ``k``-step sampler with ``k`` a power of two up to
``M / 2`` is trained. At the finest level the half steps ``h = 1/M`` are Euler steps of the
instantaneous velocity ``u(z, t, t)``, which the flow-matching part trains (the paper trains that
level with flow matching at ``d = 1/M``; here at ``d = 0``, so ``u(x, t, t)`` is the velocity and
every multi-step sampler takes the network too).

**Time convention.** The paper's ``x_t = (1 - t) x_0 + t x_1`` has the noise ``x_0`` at ``t = 0``:
its ``t`` is our ``1 - t``, and its shortcut ``s(x_t, t, d)`` (``x_{t+d} = x_t + d s``) is our
``-u(z, 1 - t, 1 - t - d)``: the same jump, with the sign of a velocity in the other time.

**The paper's recipe** (its code's defaults), each a switch here, off by default:

* **EMA targets**: the two half jumps come from the EMA network (``bootstrap_ema``).
  ``shortcut_loss``'s loss takes ``target_params`` (default: the online parameters under a
  stop-gradient); ``make_train_step(..., ema_targets=True)`` passes the run's EMA.
* **Clipping** (``target_clip = 4`` in the paper, whose data lie in ``[-1, 1]``): the midpoint
  ``z'`` and the target are clipped to ``[-c, c]`` elementwise.
* **Guidance inside the targets** (``bootstrap_cfg``): the flow-matching part drops labels to
  ``null_label`` with probability ``label_dropout`` (the paper's 0.1), so the network learns the
  unconditional velocity too, and the finest level's halves, Euler steps of the instantaneous
  velocity, take the guided ``u_null + w (u_c - u_null)`` (``target_guidance = w``). Every coarser
  jump is bootstrapped from the finer ones, so the conditional shortcuts learn the guided flow and
  sample it in one step without guidance at sampling time (the jumps with ``r < t`` are trained
  for the real labels only, as in the paper).

Measured on the 8x8 digits at 1,500 to 24,000 steps (``python scripts/fewstep_recipes.py``; the
README's table): EMA targets lag the online network and train slower (the gap closes with
training, to a tie at 24,000 steps), clipping barely acts, and guided targets trade Fréchet
distance for class accuracy, as guidance does (at 1,500 steps ``w = 1.5`` also improves the
one-jump distance a little).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import (
    check_known_order,
    check_known_time,
    check_positive,
    expand_like,
    wide_dtype,
)
from jaxdiff.field import Field, as_field
from jaxdiff.losses import (
    TimeSampler,
    _Uniform,
    check_label_dropout,
    check_target_guidance,
    check_uniform_low_end,
    draw_times,
    drop_labels,
    importance_weights,
    mean_sq_error,
    noise_pairs,
    static_split,
    velocity_error,
)
from jaxdiff.meanflow import guided_pair, shape_checked, velocity_target
from jaxdiff.paths import GaussianPath, linear_path
from jaxdiff.sources import as_source, check_source_path, is_gaussian

Array = jax.Array

__all__ = ["shortcut_target", "shortcut_loss"]


def shortcut_target(
    u_fn: Callable[[Array, Array, Array], Array],
    z: Array,
    t: Array,
    d: Array,
    *,
    finest: float = 0.0,
    target_fn: Callable[[Array, Array, Array], Array] | None = None,
    clip: float | None = None,
) -> tuple[Array, Array]:
    """``(u(z, t, t - d), sg((u_1 + u_2) / 2))``: one jump of ``d`` against two of ``h = d / 2``.

    ``u_1 = u'(z, t, t - h)``, ``u_2 = u'(z - h u_1, t - h, t - d)`` with ``u' = target_fn``
    (default ``u_fn``; the EMA network, or a guided one, in the paper's recipe); ``t`` and ``d``
    have shape ``(batch,)``. Half steps ``h <= finest`` are Euler steps of the instantaneous
    velocity ``u'(., s, s)`` (the level that flow matching trains). ``clip = c`` clips the
    midpoint and the target to ``[-c, c]`` (Frans et al.'s code: ``c = 4`` for data in ``[-1,
    1]``). With the exact average velocity the two are equal (``z_{t-d}`` reached in one jump or
    in two). Times known at trace time are checked: ``0 < d <= t <= 1``.
    """
    check_known_time(t)
    check_known_order(0.0, d, "0", "d")
    check_known_order(d, t, "d", "t", strict=False)
    d = jnp.asarray(d, t.dtype)
    h = d / 2
    gap = jnp.where(h <= finest, jnp.zeros_like(h), h)  # the halves' own jump
    u_fn = shape_checked(u_fn)
    half = u_fn if target_fn is None else shape_checked(target_fn)
    if clip is not None:
        clip = float(check_positive(clip, "clip"))
    bound = (lambda a: a) if clip is None else (lambda a: jnp.clip(a, -clip, clip))  # noqa: E731
    u = u_fn(z, t, t - d)
    u1 = half(z, t, t - gap)
    z_mid = bound((z - expand_like(h, z) * u1).astype(z.dtype))
    u2 = half(z_mid, t - h, t - h - gap)
    return u, jax.lax.stop_gradient(bound((u1 + u2) / 2))


def _check_teacher_end(path: GaussianPath, velocity: Field | None, time_sampler: Any) -> None:
    """Refuse a teacher that gives no velocity at the end a ``uniform_time`` sampler draws
    itself once in 2^23 (``t = 1`` for the default, where an ``eps`` or ``score`` teacher divides
    by ``alpha_1 = 0``; ``t_min = 0``, where an ``x0`` one divides by ``sigma_0 = 0``): under
    ``jit`` the loss was inf there, about once in 33,000 steps at batch 256."""
    if velocity is None or not isinstance(time_sampler, _Uniform):
        return
    end = time_sampler.t_max if time_sampler.from_top else time_sampler.t_min
    err = velocity_error(path, velocity.target, end)
    if err is not None:
        raise ValueError(
            f"time_sampler draws t = {end} itself (once in 2^23 draws), where the teacher's "
            f"{velocity.target!r} prediction gives no velocity ({err}); narrow the sampler, "
            "e.g. jd.uniform_time(1e-3, 1 - 1e-3)"
        )


def shortcut_loss(
    net: Field,
    path: GaussianPath | None = None,
    *,
    max_steps: int = 128,
    bootstrap_fraction: float = 0.25,
    time_sampler: TimeSampler | None = None,
    velocity: Field | None = None,
    source: Any = None,
    coupling: Any = None,
    target_clip: float | None = None,
    label_dropout: float = 0.0,
    null_label: int | None = None,
    target_guidance: float | None = None,
) -> Callable[..., Array]:
    """The shortcut-model loss ``(params, key, batch, target_params=None) -> scalar`` (Frans et
    al. 2024, Section 3).

    ``net`` is a :class:`~jaxdiff.Field` of target ``"velocity"`` whose ``apply(params, z, t, r
    [, labels])`` jumps from ``t`` to ``r`` (``z_r = z_t - (t - r) u``), as for
    :func:`~jaxdiff.meanflow_loss`. The first ``1 - bootstrap_fraction`` of the batch is flow
    matching at ``r = t`` (times from ``time_sampler``, default uniform on ``(0, 1]``; an
    :func:`~jaxdiff.importance_time` sampler's reweighted by its ``correction``); the rest
    is self-consistency (:func:`shortcut_target`) at a level ``d`` drawn uniformly from ``1, 1/2,
    ..., 2 / max_steps`` per example, ``t`` uniform on the level's grid ``{d, 2d, ..., 1}``. Both
    parts are needed: self-consistency alone is minimised by ``u = 0`` (any constant), flow
    matching alone never trains a jump with ``r < t``. Per example the squared error
    is averaged over the data dimensions, as in :func:`~jaxdiff.flow_matching_loss`; the loss is
    the batch mean. The paper's defaults: ``max_steps = 128``, a quarter of the batch for
    self-consistency.

    Sample with ``jd.sample(key, path, field, shape, sampler=jd.samplers.meanflow(), steps=k)``
    (``k`` a power of two up to ``max_steps / 2`` is a trained jump; the default one step is the
    level ``d = 1``). Batches are ``x0``, ``(x0, labels)`` or ``{'x0', 'x1', 'labels'}``;
    ``source`` and ``coupling`` as in :func:`~jaxdiff.flow_matching_loss` (the self-consistency
    part only needs points ``z_t`` of the path, and the flow-matching part's minimiser is the
    marginal velocity under any coupling). ``velocity``, a field of any target (an exact oracle
    or a trained flow), replaces the conditional velocity of the flow-matching part with its own
    ``velocity(z_t, t[, labels])``, as in :func:`~jaxdiff.meanflow_loss`: distillation, with the
    minimum 0 at that flow's velocity.

    The paper's recipe (module docstring): ``target_params`` (the loss's fourth argument; the EMA
    parameters with ``make_train_step(..., ema_targets=True)``) computes the two half jumps, the
    online ``params`` when ``None``; ``target_clip`` clips the midpoint and the target;
    ``label_dropout`` drops the flow-matching part's labels to ``null_label`` (a ``velocity``
    teacher then sees the null label too); ``target_guidance = w`` guides the finest level's
    halves, ``u_null + w (u_c - u_null)`` (it needs ``label_dropout > 0``, which trains
    ``u_null``, and labels in the batch; the null-label call runs on the whole self-consistency
    share, one more forward pass of it per half, though only the finest level's examples use it).
    """
    net = as_field(net, "net")
    if net.target != "velocity":
        raise ValueError(
            "a shortcut model predicts the jump u(z, t, r) with z_r = z_t - (t - r) u, whose "
            f"target at r = t is 'velocity'; got a field of target {net.target!r}"
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
        raise TypeError(f"max_steps must be an int (a power of two); got {max_steps!r}")
    if max_steps < 2 or max_steps & (max_steps - 1):
        raise ValueError(f"max_steps must be a power of two >= 2; got {max_steps}")
    if not 0.0 <= bootstrap_fraction <= 1.0:
        raise ValueError(f"bootstrap_fraction must lie in [0, 1]; got {bootstrap_fraction}")
    if target_clip is not None:
        target_clip = float(check_positive(target_clip, "target_clip"))
    check_label_dropout(label_dropout, null_label)
    if check_target_guidance(target_guidance, label_dropout):
        if bootstrap_fraction == 0:
            raise ValueError(
                f"target_guidance {target_guidance} guides the self-consistency targets; "
                "bootstrap_fraction 0 has none"
            )
    path = linear_path() if path is None else path
    source = as_source(source)
    if not is_gaussian(source):
        check_source_path(path)
    if velocity is not None:
        velocity = as_field(velocity, "velocity")
    # (0, 1]: U[0, 1) drew t = 0 once in 2^23, where the velocity is infinite on the cosine path
    time_sampler = _Uniform(0.0, 1.0, from_top=True) if time_sampler is None else time_sampler
    check_uniform_low_end(time_sampler, path, "velocity", "velocity")
    _check_teacher_end(path, velocity, time_sampler)
    levels = int(math.log2(max_steps))  # jumps d = 2^-k, k = 0 .. levels - 1

    def loss(params: Any, key: Array, batch: Any, target_params: Any = None) -> Array:
        t_key, j_key, e_key, k_key = jax.random.split(key, 4)
        tp = params if target_params is None else target_params
        x0, eps, labels = noise_pairs(e_key, batch, path, source, coupling)
        n = x0.shape[0]
        tdt = wide_dtype(x0.dtype)
        extra = () if labels is None else (labels,)
        nb = static_split(bootstrap_fraction, n, "bootstrap_fraction")
        m = n - nb  # static split: flow matching first, then self-consistency
        errs = []
        if m > 0:
            t = draw_times(time_sampler, t_key, m, tdt)
            z = path.interpolate(x0[:m], eps[:m], t)
            drop_key = jax.random.fold_in(key, 0x1AB)  # fold_in(key, 1) is split(key, 4)[1]
            head = [drop_labels(drop_key, a[:m], label_dropout, null_label) for a in extra]
            v = velocity_target(path, z, t, x0[:m], eps[:m], velocity, head)
            u = shape_checked(partial(net.apply, params))(z, t, t, *head)
            errs.append(mean_sq_error(u, v, tdt) * importance_weights(time_sampler, t))
        if nb > 0:
            # a level per example at random: a fixed round robin left the finest levels untrained
            # when the batch's share had fewer examples than levels (and the chain of targets
            # cut off from the flow-matching anchor)
            k = jax.random.randint(k_key, (nb,), 0, levels)
            d = jnp.exp2(-k.astype(tdt))
            j = jax.random.randint(j_key, (nb,), 1, 2**k + 1)  # t = j d, 1 <= j <= 1/d
            t = j.astype(tdt) * d
            z = path.interpolate(x0[m:], eps[m:], t)
            tail = [a[m:] for a in extra]
            u_fn = lambda z_, t_, r_: net.apply(params, z_, t_, r_, *tail)  # noqa: E731
            if target_guidance is None:
                half = lambda z_, t_, r_: net.apply(tp, z_, t_, r_, *tail)  # noqa: E731
            elif not tail:
                raise ValueError("target_guidance needs labels in the batch; got none")
            else:
                half = partial(_guided_half, net, tp, tail[0], null_label, target_guidance)
            u, target = shortcut_target(
                u_fn, z, t, d, finest=1.0 / max_steps, target_fn=half, clip=target_clip
            )
            errs.append(mean_sq_error(u, target, tdt))
        return jnp.mean(jnp.concatenate(errs))

    return loss


def _guided_half(net: Field, params: Any, labels: Array, null: int, w: float, z, t, r) -> Array:
    """A half jump of the targets: the conditional ``u_c``, guided to ``u_null + w (u_c - u_null)``
    where it is the instantaneous velocity (``r = t``: the finest level's Euler halves). One call
    on the doubled batch."""
    c, u = guided_pair(net, params, z, t, labels, null, r)
    return jnp.where(expand_like(t == r, c), u + w * (c - u), c)
