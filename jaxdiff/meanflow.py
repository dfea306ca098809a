r"""Mean flows: a network for the average velocity over an interval, for one-step generation.

Geng, Deng, Bai, Kolter & He (2025), "Mean Flows for One-step Generative Modeling". On a path
``z_t = alpha_t x + sigma_t e`` with probability-flow velocity ``v(z, t) = dz/dt``, the average
velocity over ``[r, t]`` along a trajectory is

    ``u(z_t, t, r) = (z_t - z_r) / (t - r) = 1/(t - r) int_r^t v(z_tau, tau) dtau``,

so ``z_r = z_t - (t - r) u(z_t, t, r)`` in one evaluation, and ``u(z, t, t) = v(z, t)``.
Differentiating ``(t - r) u = int_r^t v`` in ``t`` gives the **MeanFlow identity**

    ``u(z_t, t, r) = v(z_t, t) - (t - r) d/dt u(z_t, t, r)``,
    ``d/dt u = v . grad_z u + d_t u`` (the total derivative along the trajectory),

which the loss enforces with the total derivative from one ``jax.jvp`` of the network with
tangent ``(v, 1, 0)`` on ``(z, t, r)``, a stop-gradient on the right-hand side, and the
conditional velocity ``v = alpha_t' x + sigma_t' e`` in place of the marginal one (as flow matching
does; the minimiser is the same).

**Time convention.** The paper's ``z_t = (1 - t) x + t e`` has ``t = 0`` at the data and
``t = 1`` at the noise, as jaxdiff does, and ``v = e - x = dz/dt``: its ``u(z, r, t)`` is our
``u(z, t, r)`` with no change of sign or of time (only the argument order follows jaxdiff's
``field(x, t, *args)``). Its pseudo-code's ``x = z_1 - u(z_1, 0, 1)`` is one step of the sampler
``jd.samplers.meanflow()`` (``jd.sample(key, path, field, shape, sampler=jd.samplers.meanflow(),
steps=k)`` for ``k`` jumps). Any :class:`~jaxdiff.GaussianPath` works; the paper uses
``linear_path()``.

A MeanFlow network is a :class:`~jaxdiff.Field` of target ``"velocity"`` whose function takes the
second time as its extra argument, ``fn(params, x, t, r)`` (e.g.
``jaxdiff.nets.TwoTimeMLP``, or ``jaxdiff.nets.TwoTimeUNet`` for images): with ``r = t`` it is an
ordinary velocity field, so the multi-step samplers take it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff._checks import (
    check_known_order,
    check_known_time,
    check_positive,
    check_same_shape,
    expand_like,
    wide_dtype,
)
from jaxdiff.conversions import convert, from_x0_eps
from jaxdiff.field import Field, as_field
from jaxdiff.guidance import check_interval
from jaxdiff.losses import (
    TimeSampler,
    check_label_dropout,
    check_target_guidance,
    draw_times,
    drop_labels,
    importance_weights,
    noise_pairs,
    static_split,
    uniform_time,
)
from jaxdiff.paths import GaussianPath, linear_path
from jaxdiff.sources import as_source, check_source_path, is_gaussian

Array = jax.Array

__all__ = ["meanflow_target", "meanflow_loss"]


def meanflow_target(
    u_fn: Callable[[Array, Array, Array], Array], z: Array, t: Array, r: Array, v: Array
) -> tuple[Array, Array]:
    """``(u, stop_gradient(v - (t - r) d/dt u))`` at ``(z, t, r)``, ``d/dt u`` by one ``jax.jvp``.

    ``u_fn(z, t, r)`` is the average-velocity network, ``t`` and ``r`` have shape ``(batch,)``,
    ``v`` is the velocity ``dz/dt`` (the tangent of ``z``). The total derivative
    ``d/dt u = v . grad_z u + d_t u`` is the JVP with tangent ``(v, 1, 0)``. Times known at
    trace time are checked: ``0 <= r <= t <= 1``.
    """
    check_known_time(t)
    check_known_time(r, "r")
    check_known_order(r, t, "r", "t", strict=False)
    u, dudt = jax.jvp(shape_checked(u_fn), (z, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))
    target = v - expand_like(t - r, v) * dudt
    return u, jax.lax.stop_gradient(target)


def shape_checked(u_fn: Callable[..., Array]) -> Callable[..., Array]:
    """``u_fn(z, ...)``, refused at trace time unless shaped like ``z``: a ``(batch, 1)`` or
    ``(1, d)`` average velocity was broadcast against the target into a loss, silently."""

    def fn(z: Array, *args: Any) -> Array:
        u = u_fn(z, *args)
        check_same_shape(u, z, "the average-velocity ('velocity') prediction u(z, t, r)")
        return u

    return fn


def velocity_target(
    path: GaussianPath,
    z: Array,
    t: Array,
    x0: Array,
    eps: Array,
    velocity: Field | None,
    extra: Sequence[Any] = (),
) -> Array:
    """The velocity a two-time loss regresses at ``r = t``: the conditional ``alpha_t' x0 +
    sigma_t' eps``, or a teacher's ``velocity(z, t, *extra)`` converted to it (a conditional
    teacher sees the batch's labels in ``extra``, as the student does), under a stop-gradient."""
    if velocity is None:
        return from_x0_eps(path, z, t, x0, eps, "velocity")
    v = convert(path, z, t, velocity(z, t, *extra), src=velocity.target, dst="velocity")
    return jax.lax.stop_gradient(v)


def meanflow_loss(
    net: Field,
    path: GaussianPath | None = None,
    *,
    time_sampler: TimeSampler | None = None,
    flow_matching_fraction: float = 0.75,
    weighting_power: float = 0.5,
    weighting_eps: float = 1e-3,
    velocity: Field | None = None,
    source: Any = None,
    coupling: Any = None,
    label_dropout: float = 0.0,
    null_label: int | None = None,
    target_guidance: float | None = None,
    guidance_mix: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
) -> Callable[[Any, Array, Any], Array]:
    """The MeanFlow loss ``(params, key, batch) -> scalar`` (Geng et al. 2025, Algorithm 1).

    ``net`` is a :class:`~jaxdiff.Field` of target ``"velocity"`` whose ``apply(params, z, t, r
    [, labels])`` is the average velocity over ``[r, t]`` (``r`` defaulting to ``t``, the
    instantaneous velocity, for ``jaxdiff.samplers.meanflow`` and the multi-step samplers). Per
    example, with ``t >= r``,

        ``err = |u(z_t, t, r) - sg(v - (t - r) d/dt u)|^2`` (summed over the data dimensions),
        ``loss = sg(1 / (err + weighting_eps)^weighting_power) err`` (adaptive weighting; ``p = 0``
        is the squared error, ``p = 1`` close to a robust ``|err|^0``).

    Times: ``t`` and ``r`` are two draws of ``time_sampler`` (default uniform on ``[0, 1]``),
    ordered so ``t >= r``; the first ``flow_matching_fraction`` of the batch has ``r = t`` (there
    the loss is flow matching; the paper's best ratio of ``r != t`` is 25%). An
    :func:`~jaxdiff.importance_time` sampler's two draws are reweighted by their ``correction``
    (the loss at uniform pairs, unbiased).

    Defaults: the paper uses logit-normal(-0.4, 1) times and ``p = 1`` on ImageNet (``p = 0.75``
    on CIFAR-10). On the 2-D checkerboard (3,000-4,000 steps at batch 256, ``TwoTimeMLP``) the
    one-step energy distance was 0.29 with the paper's ImageNet setting, 0.09 with logit-normal
    times and ``p = 0.5``, and with uniform times 0.008 (``p = 1``), 0.0025 (``p = 0.5``, the
    default here) and 0.0023 (``p = 0``): uniform times reach the one-step corner
    ``(t, r) = (1, 0)`` far more often. (With the high-frequency time features of
    ``jaxdiff.nets.MLP``, ``p = 0`` diverged; see ``TwoTimeMLP``.) ``v`` is the conditional velocity ``alpha_t' x + sigma_t' e``, or ``velocity(z_t, t)`` of
    a given field (a teacher: an exact oracle or a trained flow; any target), which makes the
    minimum 0 at the exact average velocity. Batches are ``x0``, ``(x0, labels)`` or a dict
    ``{'x0', 'x1', 'labels'}`` of source points; with labels the teacher is called as
    ``velocity(z_t, t, labels)``, like the student.

    ``source`` draws ``x1`` in place of ``e ~ N(0, I)`` (any source distribution,
    :mod:`jaxdiff.sources`; it needs a path with ``alpha_1 = 0``, ``sigma_1 = 1``) and
    ``coupling`` pairs it with ``x0`` (``jd.exact_ot()``), as in :func:`~jaxdiff.flow_matching_loss`.
    The target is linear in the conditional velocity, whose mean given ``z_t`` is the marginal
    velocity under any coupling, so the minimum is still the average velocity of that flow.

    Cost: the ``r = t`` part of the batch is split off statically and evaluated without the JVP
    (its target is ``v``), so the JVP (about two forward passes) runs on ``1 -
    flow_matching_fraction`` of the batch only; the backward pass goes through ``u`` only.

    **Guidance in training** (the paper's Section 4.2 and Appendix B.1): ``label_dropout`` replaces
    labels by ``null_label`` (the paper's 10%), and ``target_guidance = w`` trains the average
    velocity of the guided field ``w v(z|c) + (1 - w) v(z)``: for the examples that keep their label,
    ``v`` (target and JVP tangent) becomes

        ``v~ = w v + k u(z_t, t, t | c) + (1 - w - k) u(z_t, t, t | null)``

    with ``k = guidance_mix`` in ``[0, 1)`` (default 0; the paper's effective scale is ``w / (1 -
    k)``), the network's instantaneous velocities under a stop-gradient (one more forward pass of
    the batch, two with ``k != 0``); a dropped label keeps ``v``, and so does an example whose
    ``t`` lies outside ``guidance_interval = (t_lo, t_hi)`` when one is given (guidance on part of
    the path only, as Kynkäänniemi et al. 2024 do at sampling). One unguided jump with the label
    samples the guided model. Labels are dropped before a ``velocity`` teacher is called, so a
    conditional teacher sees the null label too (one trained with label dropout knows it).
    """
    net = as_field(net, "net")
    if net.target != "velocity":
        raise ValueError(
            f"a MeanFlow network predicts the average velocity, which at r = t is the 'velocity' "
            f"target; got a field of target {net.target!r}"
        )
    if velocity is not None:
        velocity = as_field(velocity, "velocity")
    path = linear_path() if path is None else path
    source = as_source(source)
    if not is_gaussian(source):
        check_source_path(path)
    time_sampler = uniform_time(0.0, 1.0) if time_sampler is None else time_sampler
    if not 0.0 <= flow_matching_fraction <= 1.0:
        raise ValueError(f"flow_matching_fraction must lie in [0, 1]; got {flow_matching_fraction}")
    weighting_power = check_positive(weighting_power, "weighting_power", strict=False)
    if not 0 < weighting_eps < float("inf"):  # inf made every weight, and the loss, 0
        raise ValueError(f"weighting_eps must be finite and > 0; got {weighting_eps}")
    check_label_dropout(label_dropout, null_label)
    guide = check_target_guidance(target_guidance, label_dropout)
    if not 0.0 <= guidance_mix < 1.0 or (guidance_mix and not guide):
        raise ValueError(
            f"guidance_mix {guidance_mix} mixes the conditional velocity into target_guidance's "
            "target: it needs a value in [0, 1) and target_guidance"
        )
    if guidance_interval is not None:
        if not guide:
            raise ValueError(f"guidance_interval {guidance_interval} needs target_guidance")
        guidance_interval = check_interval(guidance_interval)

    def loss(params: Any, key: Array, batch: Any) -> Array:
        t_key, r_key, e_key = jax.random.split(key, 3)
        x0, eps, labels = noise_pairs(e_key, batch, path, source, coupling)
        n = x0.shape[0]
        tdt = wide_dtype(x0.dtype)  # times in float32 or wider, whatever x0's dtype
        t1 = draw_times(time_sampler, t_key, n, tdt)
        t2 = draw_times(time_sampler, r_key, n, tdt)
        t, r = jnp.maximum(t1, t2), jnp.minimum(t1, t2)
        z = path.interpolate(x0, eps, t)
        if labels is not None:
            labels = drop_labels(jax.random.fold_in(key, 0x1AB), labels, label_dropout, null_label)
        extra = () if labels is None else (labels,)
        v = velocity_target(path, z, t, x0, eps, velocity, extra)
        if guide:
            if labels is None:
                raise ValueError("target_guidance needs labels in the batch; got none")
            w, k = target_guidance, guidance_mix
            if k:
                u_c, u_null = guided_pair(net, params, z, t, labels, null_label)
                g = w * v + k * u_c + (1.0 - w - k) * u_null
            else:  # the null half alone: one forward pass of the batch, not two
                nulls = jnp.full_like(labels, null_label)
                u_null = jax.lax.stop_gradient(shape_checked(partial(net.apply, params))(
                    z, t, t, nulls))  # fmt: skip
                g = w * v + (1.0 - w) * u_null
            keep = labels != jnp.asarray(null_label, labels.dtype)
            if guidance_interval is not None:
                keep = keep & (t >= guidance_interval[0]) & (t <= guidance_interval[1])
            v = jnp.where(expand_like(keep, v), g.astype(v.dtype), v)
        # The first m examples have r = t, where the target is v itself: they skip the JVP (a
        # static split, so the JVP costs only the r < t part of the batch).
        m = static_split(flow_matching_fraction, n, "flow_matching_fraction")
        errs = []
        if m > 0:
            head = [a[:m] for a in extra]
            u = shape_checked(partial(net.apply, params))(z[:m], t[:m], t[:m], *head)
            diff = u.astype(tdt) - v[:m].astype(tdt)  # in float32 or wider (a bfloat16 net)
            errs.append(jnp.sum(jnp.square(diff).reshape(m, -1), axis=1))
        if m < n:
            tail = [a[m:] for a in extra]
            u_fn = lambda z_, t_, r_: net.apply(params, z_, t_, r_, *tail)  # noqa: E731
            u, target = meanflow_target(u_fn, z[m:], t[m:], r[m:], v[m:])
            diff = u.astype(tdt) - target.astype(tdt)
            errs.append(jnp.sum(jnp.square(diff).reshape(n - m, -1), axis=1))
        err = jnp.concatenate(errs)
        weight = jax.lax.stop_gradient(1.0 / (err + weighting_eps) ** weighting_power)
        # importance_time: both draws reweighted to the uniform pair's law
        uniform = importance_weights(time_sampler, t1) * importance_weights(time_sampler, t2)
        return jnp.mean(uniform * weight * err)

    return loss


def guided_pair(net: Field, params: Any, z: Array, t: Array, labels: Array, null: Any, r=None):
    """``(u(z, t, r | labels), u(z, t, r | null))`` from one call on the doubled batch, under a
    stop-gradient (``r = t``, the instantaneous velocity, by default): the two halves of a guided
    target."""
    n = z.shape[0]
    r = t if r is None else r
    twice = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731
    nulls = jnp.full_like(labels, null)
    both = net.apply(params, twice(z), twice(t), twice(r), jnp.concatenate([labels, nulls], 0))
    check_same_shape(both, twice(z), "the average-velocity ('velocity') prediction u(z, t, r)")
    both = jax.lax.stop_gradient(both)
    return both[:n], both[n:]
