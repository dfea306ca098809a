r"""Consistency models: a map from any point of a trajectory to its end at the data, in one step.

Song, Dhariwal, Chen & Sutskever (2023), "Consistency Models"; the training details of Song &
Dhariwal (2024), "Improved techniques for training consistency models" (iCT). A consistency
function ``f(x_t, t)`` sends every point of a probability-flow trajectory to the trajectory's
point at ``t_min`` (the data end; ``t = 0`` is data, ``t = 1`` the prior, as everywhere in jaxdiff;
the papers' ``sigma`` in ``[eps, T]`` is our ``t`` in ``[t_min, 1]``). It is parameterised so
that the boundary condition ``f(x, t_min) = x`` holds exactly, whatever the network ``F`` is:

    ``f(x, t) = c_skip(t) x + c_out(t) F(x, t)``,  ``c_skip(t_min) = 1``, ``c_out(t_min) = 0``.

``f`` predicts the data, so a consistency model is a :class:`~jaxdiff.Field` of target ``"x0"``:
``Field(consistency_function(model.apply), "x0", params)``.

Training on adjacent times ``t_n < t_{n+1}`` of a grid of ``num_scales`` points minimises
``lambda_n d(f_theta(x_{t_{n+1}}, t_{n+1}), sg f_theta(x_{t_n}, t_n))`` where

* **consistency training** (CT): ``x_{t_n}`` and ``x_{t_{n+1}}`` share the data point and the noise
  (``path.interpolate(x0, e, t)``), no teacher;
* **consistency distillation** (CD): ``x_{t_n}`` is one ODE step (Euler or Heun) of a teacher
  field (an exact oracle or a trained flow) from ``x_{t_{n+1}}``.

As in iCT the target network is the stop-gradient of the online one (no EMA teacher: the loss's
``target_params``, its fourth argument, is ``None``; ``make_train_step(..., ema_targets=True)``
passes the run's EMA, or with ``target_decay=mu`` a target network of its own, the original
paper's ``theta^- <- mu theta^- + (1 - mu) theta``), ``d`` is
the pseudo-Huber metric ``sqrt(|a - b|^2 + c^2) - c`` with ``c = 0.00054 sqrt(dim)`` and
``lambda_n = 1 / (t_{n+1} - t_n)``; the grid is uniform in ``t`` by default
(:func:`consistency_grid`, where EDM's grid in ``sigma`` measured worse), and ``n`` uniform over
its intervals, or with ``lognormal=(P_mean, P_std)`` drawn from iCT's discretised log-normal.
iCT doubles ``num_scales`` during training
(:func:`ict_num_scales`), the original consistency training grows it more gently and raises the
target network's decay with it (:func:`ct_num_scales`, :func:`ct_target_decay`); tabulated by
:func:`curriculum`, both run inside one compiled training step (the loss's ``num_scales`` and
``make_train_step``'s ``target_decay``), or a loop trains one stage at a time
(:func:`curriculum_stages`).

Sampling is ``jd.sample(key, path, f, shape, sampler=jd.samplers.consistency(), steps=k)``: one
evaluation of ``f`` from ``t = 1`` (``k = 1``), or Algorithm 1's multistep sampling, which
re-noises ``f``'s output to each next time of the grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import (
    check_count,
    check_order,
    check_positive,
    check_same_shape,
    check_time,
    coef_time,
    concrete,
    cut,
    error_if,
    expand_like,
    normal_like,
    safe_sqrt,
    vector_length,
    wide_dtype,
)
from jaxdiff.conversions import convert
from jaxdiff.field import Field, as_field
from jaxdiff.losses import _split_batch, velocity_error
from jaxdiff.paths import GaussianPath, linear_path

Array = jax.Array
Kind = Literal["euler", "edm"]

__all__ = [
    "consistency_scalings",
    "consistency_function",
    "consistency_grid",
    "ict_num_scales",
    "ct_num_scales",
    "ct_target_decay",
    "curriculum_stages",
    "curriculum",
    "Curriculum",
    "consistency_training_loss",
    "consistency_distillation_loss",
]


def consistency_scalings(
    t: ArrayLike, *, kind: Kind = "edm", t_min: ArrayLike = 0.0, sigma_data: float = 0.5
) -> tuple[Array, Array]:
    """``(c_skip(t), c_out(t))``, exactly ``(1, 0)`` at ``t = t_min``.

    * ``"edm"`` (default): Song et al. (2023)'s ``c_skip = s_d^2 / ((t - t_min)^2 + s_d^2)``,
      ``c_out = s_d (t - t_min) / sqrt(s_d^2 + t^2)`` with ``t`` in the role of EDM's ``sigma``.
    * ``"euler"``: ``(1, -(t - t_min))``, so ``f = x - (t - t_min) F``: ``F`` is the average
      velocity from ``t`` to ``t_min`` (on the linear path the exact one is bounded), and one step
      of ``f`` is an Euler step of length ``t - t_min`` with that velocity.

    Consistency training on the checkerboard (3,000 steps, 32 scales) gave one-step energy
    distances of 0.0017 with ``"edm"`` and 0.006 with ``"euler"``.
    """
    t_min = check_positive(t_min, "t_min", strict=False)
    t_min, _ = check_order(t_min, 1.0, "t_min", "1")  # t_min >= 1 left no time to sample
    if kind == "edm":
        sigma_data = check_positive(sigma_data, "sigma_data")
    known = concrete(t_min)  # below t_min, c_out < 0 (f is not the consistency function there)
    t = check_time(coef_time(t), "t", lo=0.0 if known is None else float(known))
    if known is None:  # a traced t_min: t >= t_min is checked when the call runs
        t = error_if(t, t < t_min, "t must lie in [t_min, 1] (below t_min, c_out < 0)")
    return _scalings(t, kind, t_min, sigma_data)


def _scalings(t, kind, t_min, sigma_data) -> tuple[Array, Array]:
    """:func:`consistency_scalings` without the checks (the network's call in a loss or a
    sampler, whose arguments and times are checked there); times in float32 or wider."""
    t = coef_time(t)
    gap = t - t_min
    if kind == "euler":
        return jnp.ones_like(t), -gap
    if kind == "edm":
        sd2 = sigma_data**2
        return sd2 / (gap**2 + sd2), sigma_data * gap / jnp.sqrt(sd2 + t**2)
    raise ValueError(f"kind must be 'euler' or 'edm'; got {kind!r}")


def consistency_function(
    fn: Callable[..., Array], *, kind: Kind = "edm", t_min: float = 0.0, sigma_data: float = 0.5
) -> Callable[..., Array]:
    """``f(params, x, t, *args) = c_skip(t) x + c_out(t) fn(params, x, t, *args)`` (see
    :func:`consistency_scalings`); ``t`` of shape ``(batch,)``. ``f(params, x, t_min) = x`` exactly.
    ``fn`` takes ``params`` first, as every network reaches the losses; a parameter-free oracle
    is ``consistency_function(lambda p, x, t: g(x, t))`` in a field with params that are not
    ``None`` (``Field(f, "x0", ())``: ``None`` means that ``fn`` takes no params).

    >>> import jax.numpy as jnp
    >>> f = consistency_function(lambda p, x, t: p * jnp.ones_like(x), t_min=1e-3)
    >>> f(5.0, jnp.full((2, 2), 0.3), jnp.full(2, 1e-3)).tolist()
    [[0.3, 0.3], [0.3, 0.3]]
    """
    if isinstance(fn, Field):  # it went through, and failed deep in the network on its params
        raise TypeError(
            "consistency_function wraps a network's apply(params, x, t): pass field.apply (the "
            "result is a field of target 'x0': Field(consistency_function(net.apply), 'x0', "
            "params)); got a Field"
        )
    consistency_scalings(t_min, kind=kind, t_min=t_min, sigma_data=sigma_data)  # checks them

    def f(params: Any, x: Array, t: Array, *args: Any) -> Array:
        c_skip, c_out = _scalings(t, kind, t_min, sigma_data)
        out = fn(params, x, t, *args)
        check_same_shape(out, x, "the consistency network's output")  # (batch, 1) broadcast
        return expand_like(c_skip, x) * x + expand_like(c_out, x) * out

    return f


def consistency_grid(
    num_scales: int, t_min: float = 0.0, t_max: float = 1.0, rho: float = 1.0
) -> Array:
    """``num_scales`` increasing times ``t_i = (t_min^(1/rho) + i/(N-1) (t_max^(1/rho) -
    t_min^(1/rho)))^rho``: uniform in ``t`` for ``rho = 1`` (the default), denser near the data
    for ``rho > 1`` (Karras et al. 2022's spacing, here in ``t``). Increasing, as the training
    losses take it; a sampler's ``ts`` decreases: ``consistency_grid(...)[::-1]``.

    On the linear path the uniform grid trained best: EDM's grid in ``sigma_t / alpha_t``
    (``karras_grid``) puts intervals of 1e-5 next to the data, whose ``1 / dt`` weights made
    consistency training unstable (one-step energy distance 0.04 against 0.002 on the checkerboard).
    """
    num_scales = check_count(num_scales, "num_scales", minimum=2)  # 2.5 had become 2
    t_min, t_max, rho = (_static(v, name) for v, name in ((t_min, "t_min"), (t_max, "t_max"),
                                                         (rho, "rho")))  # fmt: skip
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min = {t_min}, t_max = {t_max}")
    if not (np.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be finite and > 0; got rho = {rho}")
    # computed on a power-of-two length and cut: one compile per length, not per size (CT's 150
    # grids took ~70 s to build one by one), the same numbers (elementwise, op by op)
    with jax.ensure_compile_time_eval():
        i = jnp.arange(vector_length(num_scales))
        grid = _grid_at(i, jnp.asarray(num_scales), t_min, t_max, rho)
    return cut(grid, num_scales)


def _grid_at(i: Array, num_scales: ArrayLike, t_min: float, t_max: float, rho: float) -> Array:
    """:func:`consistency_grid`'s point ``i`` of ``num_scales`` (both may be traced)."""
    dtype = jnp.result_type(float)  # float32, or float64 with x64 on
    u = i.astype(dtype) / (jnp.asarray(num_scales) - 1).astype(dtype)
    lo, hi = t_min ** (1.0 / rho), t_max ** (1.0 / rho)
    grid = lo + u * (hi - lo)
    grid = grid if rho == 1.0 else grid**rho
    # the ends exactly (rho = 7 rounded below t_min)
    return jnp.where(i == 0, t_min, jnp.where(i == num_scales - 1, t_max, grid)).astype(dtype)


def _static(value: Any, name: str) -> float:
    """A grid's number, known when the grid is built (the grid is a constant of the loss)."""
    known = concrete(value)
    if known is None or np.ndim(known) != 0 or known.dtype.kind not in "iuf":
        raise ValueError(
            f"{name} must be a Python or NumPy number (the grid is built once); got {value!r}"
        )
    return float(known)


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's curriculum: ``min(s0 2^floor(k / K'), s1) + 1`` with
    ``K' = floor(K / (log2(s1 / s0) + 1))`` (Song & Dhariwal 2024, eq. 6)."""
    step = check_count(step, "step", minimum=0)
    total_steps = check_count(total_steps, "total_steps")
    s0, s1 = check_count(s0, "s0"), check_count(s1, "s1")
    if s1 < s0:
        raise ValueError(f"need s0 <= s1; got s0 = {s0}, s1 = {s1}")
    stage = max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))
    return min(s0 * 2 ** (step // stage), s1) + 1


def ct_num_scales(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """Consistency training's curriculum (Song et al. 2023, Appendix C): ``N(k) =
    ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1`` grid points at step ``k`` of ``K``
    (at least 2), growing from ``max(s0, 2)`` to ``s1 + 1``; CIFAR-10: ``s0 = 2``, ``s1 = 150``.
    The ceiling holds ``N = s0`` for step 0 alone (a stage of one step). Pair it with
    :func:`ct_target_decay`; :func:`curriculum` makes both functions of a traced step."""
    step = check_count(step, "step", minimum=0)
    total_steps = check_count(total_steps, "total_steps")
    s0, s1 = check_count(s0, "s0"), check_count(s1, "s1")
    if s1 < s0:
        raise ValueError(f"need s0 <= s1; got s0 = {s0}, s1 = {s1}")
    if step > total_steps:
        raise ValueError(f"step must be <= total_steps = {total_steps}; got {step}")
    grown = math.sqrt(step / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2)
    return max(math.ceil(grown - 1), 1) + 1


def ct_target_decay(num_scales: int, mu0: float = 0.9, s0: int = 2) -> float:
    """The target network's decay that goes with :func:`ct_num_scales`: ``mu = exp(s0 log(mu0) /
    (N - 1))`` for a grid of ``N`` points, rising towards 1 as the grid refines (Song et al. 2023,
    Appendix C; CIFAR-10: ``mu0 = 0.9``, ``s0 = 2``). As in the authors' code
    (``openai/consistency_models``, ``target_ema_mode="adaptive"``), which divides by the number
    of intervals ``N - 1`` where the paper's text writes ``N``: the decay at the first stage is
    ``mu0^2 = 0.81``, not ``mu0`` (equal to theirs to 1 ulp: ``math.exp`` against NumPy's).
    Pass it as ``make_train_step(..., target_decay=mu)``."""
    num_scales = check_count(num_scales, "num_scales", minimum=2)
    s0 = check_count(s0, "s0")
    if isinstance(mu0, bool) or not 0.0 < mu0 < 1.0:
        raise ValueError(f"mu0 must lie in (0, 1); got {mu0!r}")
    return math.exp(-(-math.log(mu0) * s0) / (num_scales - 1))  # their order (math.exp: 1 ulp)


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """A schedule of the training step, tabulated by :func:`curriculum`: ``c(step)`` is the value
    of the stage that holds ``step`` (stage ``i`` holds the steps ``[ends[i - 1], ends[i])``; the
    last stage's value holds on past its end). Callable on a traced step, so one compiled training
    step follows the whole schedule; ``c.stages`` is :func:`curriculum_stages`' list. A constant
    of the program that calls it (hashable; not a pytree)."""

    values: tuple
    ends: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            values, ends = tuple(self.values), tuple(self.ends)
        except TypeError:  # not sequences
            values, ends = (), ()
        numbers = []
        for v in values:
            known = concrete(v)
            if isinstance(v, bool) or known is None or known.ndim or known.dtype.kind not in "iuf":
                raise TypeError(f"a curriculum's values must be real numbers; got {v!r}")
            numbers.append(int(known) if known.dtype.kind in "iu" else float(known))
        ok = len(values) == len(ends) >= 1
        try:
            ok = ok and not any(isinstance(e, bool | np.bool_) for e in ends)
            ok = ok and all(int(e) == e for e in ends) and 0 < ends[0] and ends[-1] < 2**31
            ok = ok and all(a < b for a, b in zip(ends, ends[1:], strict=False))
        except (TypeError, ValueError, OverflowError):  # a string, None, an infinite end
            ok = False
        if not ok:
            raise ValueError(
                "a curriculum needs one value per stage and increasing positive integer end "
                f"steps below 2^31; got {len(values)} values and ends {ends[:8]}"
            )
        object.__setattr__(self, "values", tuple(numbers))  # frozen: hashable, Python numbers
        object.__setattr__(self, "ends", tuple(int(e) for e in ends))

    def __repr__(self) -> str:
        lo, hi = min(self.values), max(self.values)
        return f"Curriculum({len(self.ends)} stages to step {self.ends[-1]}, values {lo}..{hi})"

    def __call__(self, step: ArrayLike) -> Array:
        step = jnp.asarray(step)
        if not jnp.issubdtype(step.dtype, jnp.integer) or step.dtype == jnp.bool_:
            raise TypeError(f"a curriculum takes an integer step; got dtype {step.dtype}")
        dtype = jnp.int32 if all(isinstance(v, int) for v in self.values) else jnp.float32
        # the stages that ended at or before step (a sum of compares: a binary search's loop
        # cost more inside a scanned training step on CPU), in int32 or wider
        ends = jnp.asarray(self.ends, jnp.promote_types(step.dtype, jnp.int32))
        stage = jnp.sum(step[..., None] >= ends, axis=-1)
        return jnp.asarray(self.values, dtype)[jnp.minimum(stage, len(self.ends) - 1)]

    @property
    def stages(self) -> list[tuple[Any, int]]:
        return list(zip(self.values, self.ends, strict=True))


def curriculum(schedule: Callable[[int], Any], total_steps: int) -> Curriculum:
    """``schedule(k)`` for every step ``k < total_steps`` (Python numbers), tabulated in its
    stages (:func:`curriculum_stages`) as a :class:`Curriculum` that takes a traced step: the
    consistency losses' ``num_scales`` and ``make_train_step``'s ``target_decay`` accept one, and
    a single compiled step then follows the whole curriculum, drawing what training it in stages
    draws (the grids are :func:`consistency_grid`'s own; the parameters equal the staged run's
    to rounding: two programs that XLA fuses differently, bit for bit in the runs measured)::

        K = 800_000
        n = jd.curriculum(lambda k: jd.ct_num_scales(k, K), K)
        mu = jd.curriculum(lambda k: jd.ct_target_decay(jd.ct_num_scales(k, K)), K)
        step = make_train_step(jd.consistency_training_loss(net, path, num_scales=n), opt,
                               ema_targets=True, target_decay=mu)

    Integer values run as ``int32``, others as ``float32``: the table holds the schedule's own
    values (no re-evaluation of its ``sqrt`` or ``exp`` in float32)."""
    stages = curriculum_stages(schedule, total_steps)
    return Curriculum(tuple(v for v, _ in stages), tuple(end for _, end in stages))


def curriculum_stages(schedule: Callable[[int], Any], total_steps: int) -> list[tuple[Any, int]]:
    """The stages of a curriculum: ``[(value, end_step), ...]``, ``schedule(k)`` constant over
    each stage's steps ``[previous end, end_step)``, the last ending at ``total_steps``. One
    compiled step can follow them (:func:`curriculum`); or a loop trains one stage at a time,
    each with its own loss, carrying the state on (``train`` runs up to a step; one compile per
    stage)::

        from jaxdiff.train import init_train_state, make_train_chunk, make_train_step, train

        K, state = 10_000, init_train_state(params, opt, key, target_ema=True)
        for n, end in jd.curriculum_stages(lambda k: jd.ct_num_scales(k, K), K):
            step = make_train_step(jd.consistency_training_loss(net, path, num_scales=n), opt,
                                   ema_targets=True, target_decay=jd.ct_target_decay(n))
            state, _ = train(state, lambda c: make_train_chunk(step, sample, c), end)
    """
    total_steps = check_count(total_steps, "total_steps")
    stages: list[tuple[Any, int]] = []
    for k in range(total_steps):
        value = schedule(k)
        if stages and stages[-1][0] == value:
            stages[-1] = (value, k + 1)
        else:
            stages.append((value, k + 1))
    return stages


def _pseudo_huber(diff: Array, c: float | None) -> Array:
    sq = jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=1)
    c = 0.00054 * math.sqrt(math.prod(diff.shape[1:])) if c is None else c
    r = sq + c**2  # c = 0 is the L2 distance: its sqrt at an exact match had a NaN gradient
    return safe_sqrt(r) - c


def _boundary_checked(value: Array, target: Array, x_lo: Array, first: Array) -> Array:
    """``value``, tied to a run-time check that ``f(x, ts[0]) = x`` on the pairs drawn at the
    grid's first interval (free: the target is evaluated there anyway). A network without the
    boundary condition collapses to a constant; jaxdiff's MLP, whose last layer starts at zero,
    gave a loss and a gradient of exactly 0, silently."""
    wide = wide_dtype(x_lo.dtype)
    x_lo, target = x_lo.astype(wide), target.astype(wide)
    err = jnp.abs(target - x_lo) > 1e-2 * (1.0 + jnp.abs(x_lo))
    bad = jnp.any(expand_like(first, err) & err)
    return error_if(
        value,
        bad,
        "the consistency loss needs f(x, ts[0]) = x (the boundary condition), which this network "
        "breaks: wrap it with jd.consistency_function, with the loss's t_min (a network without "
        "it collapses to a constant)",
    )


def _consistency_loss(
    net, path, teacher, solver, *, num_scales, t_min, t_max, rho, ts, huber_c, weighting, lognormal
):
    net = as_field(net, "net")
    if net.target != "x0":
        raise ValueError(
            f"a consistency model predicts the data: a field of target 'x0' (wrap the network "
            f"with consistency_function); got target {net.target!r}"
        )
    if teacher is not None:
        teacher = as_field(teacher, "teacher")
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun'; got {solver!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    if huber_c is not None:
        huber_c = check_positive(huber_c, "huber_c", strict=False)
    path = linear_path() if path is None else path
    scheduled = callable(num_scales)  # a function of the training step: the loss takes step=
    sizes = table = cum = None
    if rho != 1.0 and ts is not None:
        raise ValueError(f"rho {rho} spaces the default grid; ts= gives the grid itself")
    with jax.ensure_compile_time_eval():  # the grids are constants, even for a loss built in jit
        if scheduled:
            if ts is not None:
                raise ValueError("give num_scales as a curriculum or a grid ts, not both")
            ends = np.asarray(consistency_grid(2, t_min, t_max, rho))  # its numbers checked
            sizes = _curriculum_sizes(num_scales)
            # every grid, padded with t_max and gathered, so each is consistency_grid's own; a
            # function of the user's own: every grid holds t_min and t_max, where teachers fail
            grids = [np.asarray(consistency_grid(n, t_min, t_max, rho)) for n in sizes or ()]
            if sizes is not None:
                table = jnp.asarray(_pad_rows(grids, max(sizes)))
            known = np.concatenate(grids) if grids else ends
        else:
            if ts is None:
                ts = consistency_grid(num_scales, t_min, t_max, rho)
            ts = jnp.asarray(ts)
            known = concrete(ts)
            if (
                ts.ndim != 1
                or ts.shape[0] < 2
                or (known is not None and not np.all(np.diff(known) > 0))
            ):
                raise ValueError(
                    "ts must be a 1-D strictly increasing grid of at least 2 times; got "
                    f"{np.asarray(ts)}"
                )
            if known is not None and (known[0] < 0 or known[-1] > 1):  # jit trained at 1.5
                raise ValueError(
                    "ts must lie in [0, 1] (t = 0 is data, t = 1 the prior); got "
                    f"{known[(known < 0) | (known > 1)]} in {known}"
                )
            grids = [] if known is None else [known]
    if lognormal is not None:
        lognormal = _check_lognormal(lognormal, scheduled and sizes is None)
        if not grids:
            raise ValueError("lognormal needs a grid known when the loss is built; got a traced ts")
        cum = _lognormal_table(path, grids, max(len(g) for g in grids), lognormal)
    if weighting == "inverse_sigma_gap" and known is not None:
        _check_noise_levels(path, grids or [known])  # grid by grid: they interleave
    if teacher is not None and known is not None:
        if solver == "heun":  # its second stage evaluates the grid's first time too
            times = known
        elif scheduled:  # Euler: no grid's first time
            times = known[known > t_min]
        else:
            times = known[1:]
        _check_teacher_times(path, teacher, times, solver, scheduled)

    def velocity(x, t, *extra):  # a conditional teacher sees the batch's labels
        return convert(path, x, t, teacher(x, t, *extra), src=teacher.target, dst="velocity")

    def pairs(key: Array, n: int, wide: Any, step: Any) -> tuple[Array, Array, Array]:
        """``n`` adjacent times ``t_lo < t_hi`` of the grid and their intervals ``idx``."""
        row = 0
        if not scheduled:
            size = ts.shape[0]
            grid = ts
            if known is None:  # a traced grid: checked when the program runs (jit trained at 1.5)
                bad = (ts[0] < 0) | (ts[-1] > 1) | jnp.any(~(jnp.diff(ts) > 0))
                grid = error_if(ts, bad, _GRID_MESSAGE)
            at = lambda i: grid.astype(wide)[i]  # noqa: E731 - float32 or wider: bfloat16 merged them
        elif sizes is not None:  # a Curriculum: its row of the tables
            size = jnp.asarray(num_scales(step))
            row = jnp.sum(size >= jnp.asarray(sizes[1:]))  # sizes is sorted
            at = lambda i: table[row, i].astype(wide)  # noqa: E731
        else:  # a function of the user's own: its value is checked when it runs
            size = jnp.asarray(num_scales(step))
            if size.ndim or not jnp.issubdtype(size.dtype, jnp.integer):
                raise TypeError(
                    f"num_scales(step) must be an integer scalar (grid points); got dtype "
                    f"{size.dtype} and shape {size.shape}"
                )
            size = error_if(size, size < 2, "num_scales(step) must be >= 2 (grid points)")
            at = lambda i: _grid_at(i, size, t_min, t_max, rho).astype(wide)  # noqa: E731
        if lognormal is None:  # the same draws for a fixed grid and a curriculum's
            idx = jax.random.randint(key, (n,), 0, size - 1)
        else:  # the same draws for a grid and its padded row
            idx = _draw_intervals(key, n, cum[row])
        return idx, at(idx), at(idx + 1)

    def one(params: Any, key: Array, batch: Any, target_params: Any, step: Any) -> Array:
        x0, labels = _split_batch(batch, "a consistency loss")
        n = x0.shape[0]
        n_key, e_key = jax.random.split(key)
        idx, t_lo, t_hi = pairs(n_key, n, wide_dtype(x0.dtype), step)
        eps = normal_like(e_key, x0)
        x_hi = path.interpolate(x0, eps, t_hi)
        extra = () if labels is None else (labels,)
        if teacher is None:
            x_lo = path.interpolate(x0, eps, t_lo)
        else:  # one ODE step of the teacher from t_hi down to t_lo
            dt = expand_like(t_lo - t_hi, x0)
            d_hi = velocity(x_hi, t_hi, *extra)
            x_lo = x_hi + dt * d_hi
            if solver == "heun":
                x_lo = x_hi + dt * 0.5 * (d_hi + velocity(x_lo.astype(x0.dtype), t_lo, *extra))
            x_lo = jax.lax.stop_gradient(x_lo.astype(x0.dtype))
        pred = net.apply(params, x_hi, t_hi, *extra)
        tp = params if target_params is None else target_params  # theta^-: sg(theta) or the EMA
        target = jax.lax.stop_gradient(net.apply(tp, x_lo, t_lo, *extra))
        wide = wide_dtype(x0.dtype)  # a bfloat16 network's outputs: the distance in float32
        dist = _pseudo_huber(pred.astype(wide) - target.astype(wide), huber_c)
        if weighting == "inverse_gap":
            dist = dist / (t_hi - t_lo)
        elif weighting == "inverse_sigma_gap":  # iCT's 1 / (sigma_{n+1} - sigma_n), VE levels
            gap = _noise_level(path, t_hi) - _noise_level(path, t_lo)
            if known is None:  # a traced grid: its levels checked when it runs
                gap = error_if(gap, ~(gap > 0) | ~jnp.isfinite(gap), _LEVELS_MESSAGE)
            dist = dist / gap
        return _boundary_checked(jnp.mean(dist), target, x_lo, idx == 0)

    if scheduled:  # make_train_step passes step=state.step to a loss that takes one

        def loss(params: Any, key: Array, batch: Any, target_params: Any = None, *, step: Any):
            return one(params, key, batch, target_params, step)

        return loss

    def loss(params: Any, key: Array, batch: Any, target_params: Any = None) -> Array:
        return one(params, key, batch, target_params, None)

    return loss


WEIGHTINGS = ("inverse_gap", "unit", "inverse_sigma_gap")
_GRID_MESSAGE = (
    "ts must be a strictly increasing grid in [0, 1] (t = 0 is data, t = 1 the prior); this "
    "traced ts is not"
)
_LEVELS_MESSAGE = (
    "weighting 'inverse_sigma_gap' needs finite increasing noise levels sigma_t / alpha_t on the "
    "grid (alpha_t = 0 at t = 1 on the linear and cosine paths: take t_max < 1)"
)


def _noise_level(path: GaussianPath, t: Array) -> Array:
    """``sigma_t / alpha_t``: the VE noise level of ``x_t / alpha_t = x_0 + (sigma_t / alpha_t)
    eps`` (EDM's and iCT's ``sigma``)."""
    return path.sigma(t) / path.alpha(t)


def _check_noise_levels(path: GaussianPath, grids: list[np.ndarray]) -> None:
    """Each grid's noise levels, for ``inverse_sigma_gap``: finite (``alpha_t > 0``) and
    increasing (its weights finite and positive)."""
    for grid, level in zip(grids, _on_grids(lambda t: _noise_level(path, t), grids), strict=True):
        if not (np.all(np.isfinite(level)) and np.all(np.diff(level) > 0)):
            bad = np.asarray(grid)[~np.isfinite(level)]
            at = f"; got sigma_t / alpha_t = inf at t = {bad.max():.6g}" if bad.size else ""
            raise ValueError(_LEVELS_MESSAGE + at)


def _check_lognormal(lognormal: Any, unknown_sizes: bool) -> tuple[float, float]:
    try:
        ok = not isinstance(lognormal, str | bytes) and len(lognormal) == 2
        ok = ok and not any(isinstance(v, bool | np.bool_) for v in lognormal)
        p_mean, p_std = (float(v) for v in lognormal)
        ok = ok and math.isfinite(p_mean) and math.isfinite(p_std) and p_std > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"lognormal must be (P_mean, P_std), finite with P_std > 0 (iCT: (-1.1, 2.0)); "
            f"got {lognormal!r}"
        )
    if unknown_sizes:
        raise ValueError(
            "lognormal draws over a grid of known sizes: give num_scales as a number or as "
            "jd.curriculum(...), not a function of the step"
        )
    return p_mean, p_std


def _on_grids(fn: Callable[[Array], Array], grids: list[np.ndarray]) -> list[np.ndarray]:
    """``fn`` (elementwise) of each grid, evaluated once on the grids padded into one array
    (one compile, not one per grid size: CT's curriculum has 150), each row cut to its grid."""
    padded = _pad_rows(grids, vector_length(max(len(g) for g in grids)))
    with jax.ensure_compile_time_eval():
        values = np.asarray(fn(jnp.asarray(padded, jnp.float32)))
    return [row[: len(g)] for row, g in zip(values, grids, strict=True)]


def _pad_rows(grids: list[np.ndarray], width: int) -> np.ndarray:
    """The grids as the rows of one array, each padded to ``width`` with its last time."""
    return np.stack([np.pad(np.asarray(g), (0, width - len(g)), mode="edge") for g in grids])


def _lognormal_cdf(level: np.ndarray, p_mean: float, p_std: float) -> np.ndarray:
    """The cumulative probabilities of a grid's intervals under iCT's discretised log-normal
    (Song & Dhariwal 2024, sec. 3.5): ``p(i)`` proportional to ``Phi(z_{i+1}) - Phi(z_i)``, ``z =
    (level - P_mean) / P_std``, ``level = log(sigma_t / alpha_t)`` at the grid's times. In
    float64 once, when the loss is built, each difference in the tail where it keeps its digits
    (``Phi`` below the mean, ``1 - Phi`` above: a float32 ``Phi`` rounded to 1 above ~5 P_std).
    All the mass beyond one end of the grid (its probabilities underflow) goes to the interval
    at that end."""
    level = np.asarray(level, np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf cannot occur: levels increase
        z = (level - p_mean) / p_std
    lower = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in z])  # Phi(z)
    upper = np.array([0.5 * math.erfc(v / math.sqrt(2.0)) for v in z])  # 1 - Phi(z)
    a, b = z[:-1], z[1:]
    p = np.where(b <= 0, lower[1:] - lower[:-1], np.where(a >= 0, upper[:-1] - upper[1:],
                                                          1.0 - lower[:-1] - upper[1:]))  # fmt: skip
    p = np.maximum(p, 0.0)
    if not p.sum() > 0:  # every level more than ~38 P_std from P_mean
        p = np.zeros_like(p)
        p[0 if a[0] >= 0 else -1] = 1.0
    cum = np.cumsum(p / p.sum())
    cum[np.flatnonzero(p)[-1] :] = 1.0  # u < 1 never draws past the last interval with mass
    return cum


def _lognormal_table(path, grids: list[np.ndarray], slots: int, lognormal) -> Array:
    """:func:`_lognormal_cdf` of each grid, a row each, padded with 1 (no mass) to ``slots - 1``
    intervals: one row's draws equal its own grid's whatever the padding."""
    table = np.ones((len(grids), slots - 1))
    levels = _on_grids(lambda t: -0.5 * path.log_snr(t), grids)
    for row, level in enumerate(levels):
        table[row, : len(level) - 1] = _lognormal_cdf(level, *lognormal)
    return jnp.asarray(table, jnp.float32)


def _draw_intervals(key: Array, n: int, cum: Array) -> Array:
    """``n`` intervals by the inverse CDF ``cum`` (non-decreasing, 1 from the last with mass)."""
    u = jax.random.uniform(key, (n,), jnp.float32)
    return jnp.sum(u[:, None] >= cum[None, :-1], axis=-1)  # searchsorted, side right, all compares


def _curriculum_sizes(num_scales: Callable) -> list[int] | None:
    """A :class:`Curriculum`'s grid sizes, checked when the loss is built (``None`` for another
    function of the step, checked at run time)."""
    if not isinstance(num_scales, Curriculum):
        return None
    if not all(isinstance(n, int) for n in num_scales.values):
        raise ValueError(f"a curriculum of num_scales needs integer values; got {num_scales}")
    return sorted({check_count(n, "num_scales", minimum=2) for n in num_scales.values})


def _check_teacher_times(path, teacher, times, solver, scheduled=False) -> None:
    """Refuse a grid on which the teacher's ODE step divides by zero (an ``eps`` or ``score``
    teacher where ``alpha_t = 0``, an ``x0`` one where ``sigma_t = 0``): found at construction,
    not when a batch first draws such a time (1 in 15 examples on the defaults)."""
    err = velocity_error(path, teacher.target, times)
    if err is not None:
        grid = "every grid of the curriculum" if scheduled else "ts"
        where = f"every time of {grid} (Heun's second stage)" if solver == "heun" else (
            f"all but the first time of {grid}"
        )  # fmt: skip
        raise ValueError(
            f"consistency distillation evaluates the teacher at {where}, and its "
            f"{teacher.target!r} prediction gives no velocity there: {err}. Narrow the grid, "
            "e.g. t_max=1 - 1e-3 where alpha_1 = 0, t_min=1e-3 where sigma_0 = 0"
            + ("" if scheduled else " (or ts=)")
        )


def consistency_training_loss(
    net: Field,
    path: GaussianPath | None = None,
    *,
    num_scales: int | Callable[[Array], ArrayLike] = 16,
    t_min: float = 0.0,
    t_max: float = 1.0,
    rho: float = 1.0,
    ts: ArrayLike | None = None,
    huber_c: float | None = None,
    weighting: Literal["inverse_gap", "unit", "inverse_sigma_gap"] = "inverse_gap",
    lognormal: tuple[float, float] | None = None,
) -> Callable[..., Array]:
    """Consistency training ``(params, key, batch, target_params=None) -> scalar``: no teacher
    (see the module text; ``target_params``, default the online ``params``, is the target
    network).

    ``net``: a field of target ``"x0"`` whose ``apply`` is a :func:`consistency_function` with the
    same ``t_min``: a network without the boundary condition ``f(x, ts[0]) = x`` collapses to a
    constant (``jaxdiff.nets.MLP``, whose last layer starts at zero, gave a loss and a gradient of
    exactly 0), so the loss checks it at run time on the pairs of the first interval, where it
    evaluates ``f(x, ts[0])`` anyway. ``ts``: an increasing grid (default :func:`consistency_grid` with
    ``num_scales`` points on ``[t_min, t_max]`` and its ``rho``); ``n`` is uniform over its
    intervals.
    ``huber_c``: the pseudo-Huber ``c`` (default ``0.00054 sqrt(dim)``). ``lognormal=(P_mean,
    P_std)`` draws the interval ``n`` as iCT does (Song & Dhariwal 2024, sec. 3.5: ``(-1.1,
    2.0)`` on CIFAR-10), with ``p(n)`` proportional to ``erf((log s_{n+1} - P_mean) / (sqrt 2
    P_std)) - erf((log s_n - P_mean) / (sqrt 2 P_std))``, ``s_n = sigma / alpha`` at ``t_n``
    (the VE noise level of EDM's conventions, data scaled to std 0.5). ``weighting``: the
    distance over the interval's width, ``1 / (t_{n+1} - t_n)`` (``"inverse_gap"``, CT's in
    ``t``), 1 (``"unit"``), or iCT's ``1 / (s_{n+1} - s_n)`` in the same noise level
    (``"inverse_sigma_gap"``, Song & Dhariwal 2024, sec. 3.3; equal to theirs on a VE path; it
    needs ``alpha_t > 0`` on the grid: ``t_max < 1`` on the linear and cosine paths; refused
    when the loss is built, or for a traced ``ts`` when a drawn pair reaches it). The
    log-normal's probabilities are tabulated when the loss is built (float64),
    so it needs a grid known then: a number, ``ts``, or a :class:`Curriculum` (not another
    function of the step).

    ``num_scales`` may follow a curriculum of the training step: a :class:`Curriculum`
    (:func:`curriculum` of :func:`ct_num_scales` or :func:`ict_num_scales`; its sizes checked
    here) or any function ``step -> int`` that traces (checked >= 2 when it runs). The loss is
    then ``(params, key, batch, target_params=None, *, step)``, ``make_train_step`` passes it
    ``state.step``, and one compiled step trains the whole curriculum (the grid
    ``consistency_grid(N(step), t_min, t_max, rho)``; ``ts`` cannot be given with it).

    Few scales train fastest on a short budget: on the checkerboard after 3,000 steps the one-step
    energy distance was 0.0012 with 16 scales, 0.0017 with 32 and 0.66 (no convergence) with 64;
    iCT's curriculum (:func:`ict_num_scales`) grows ``N`` with the training.
    """
    return _consistency_loss(
        net, path, None, "euler", num_scales=num_scales, t_min=t_min, t_max=t_max, rho=rho, ts=ts,
        huber_c=huber_c, weighting=weighting, lognormal=lognormal,
    )  # fmt: skip


def consistency_distillation_loss(
    net: Field,
    teacher: Field,
    path: GaussianPath | None = None,
    *,
    num_scales: int | Callable[[Array], ArrayLike] = 16,
    solver: Literal["euler", "heun"] = "heun",
    t_min: float = 0.0,
    t_max: float = 1.0,
    rho: float = 1.0,
    ts: ArrayLike | None = None,
    huber_c: float | None = None,
    weighting: Literal["inverse_gap", "unit", "inverse_sigma_gap"] = "inverse_gap",
    lognormal: tuple[float, float] | None = None,
) -> Callable[..., Array]:
    """Consistency distillation from ``teacher`` (a field of any target on ``path``, e.g. an exact
    oracle or a trained flow-matching network): ``x_{t_n}`` is one ``solver`` step of its
    probability-flow ODE from ``x_{t_{n+1}}`` (Heun: 2 teacher evaluations); with labels in the
    batch the teacher is called as ``teacher(x, t, labels)``. Else as
    :func:`consistency_training_loss`."""
    if teacher is None:
        raise ValueError("consistency distillation needs a teacher field")
    return _consistency_loss(
        net, path, teacher, solver, num_scales=num_scales, t_min=t_min, t_max=t_max, rho=rho,
        ts=ts, huber_c=huber_c, weighting=weighting, lognormal=lognormal,
    )  # fmt: skip
