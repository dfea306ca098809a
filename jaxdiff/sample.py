"""``sample``: the one driver of every sampler.

``sample(key, path, field, shape, sampler=..., steps= or ts=)`` owns what every sampler shares:
the time grid (the sampler's default, or yours), the start draw at the first time, the keys, the
checks of the grid and of the field, the one ``lax.scan`` (``jaxdiff._engine``), the saved states,
the count of network evaluations (static: the same eagerly and under ``jit``), the optional
denoising step and the final non-finite check. Samplers (``jaxdiff.samplers``) are values with a
pure ``init``/``step``; ``hook`` adds a per-step transformation of the state (inpainting:
:func:`inpaint`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff import _engine
from jaxdiff._checks import (
    check_count,
    check_finite,
    check_shape_tuple,
    data_dtype,
    expand_like,
    wide_dtype,
)
from jaxdiff._programs import run_jit
from jaxdiff.field import Field, as_field, batch_time, in_wide_precision
from jaxdiff.field import denoise as denoise_step
from jaxdiff.integrate import Solution
from jaxdiff.interpolants import StochasticInterpolant
from jaxdiff.paths import GaussianPath
from jaxdiff.samplers import Sampler, ode
from jaxdiff.samplers.base import normal
from jaxdiff.sources import Source, check_source_path, is_gaussian

Array = jax.Array
Hook = Callable[[Array, Any, Array], Any]

__all__ = ["Solution", "sample", "inpaint"]


def sample(
    key: Array | None,
    path: GaussianPath | StochasticInterpolant,
    field: Field,
    shape: tuple[int, ...] | None = None,
    *,
    sampler: Sampler | None = None,
    steps: int | None = None,
    ts: ArrayLike | None = None,
    t_start: ArrayLike | None = None,
    t_end: ArrayLike | None = None,
    x_init: ArrayLike | None = None,
    source: Source | Callable[[Array, tuple[int, ...]], Array] | None = None,
    denoise: bool | None = None,
    save_ts: ArrayLike | None = None,
    hook: Hook | None = None,
    checkpoint: bool = True,
) -> Solution:
    """Draw from the data distribution of ``path`` by running ``sampler`` from the prior.

    * ``field``: a :class:`~jaxdiff.Field` (the network bound to the target it predicts).
    * ``sampler``: a value from ``jaxdiff.samplers`` (default ``ode()``: Euler on the
      probability-flow ODE).
    * the grid: ``ts`` (decreasing in ``[0, 1]``), or ``steps`` steps of the sampler's default
      grid from ``t_start`` to ``t_end`` (the sampler's default, ``1e-3`` or ``0``); giving
      ``ts`` with any of the others is an error. ``t_start`` defaults to 1, or to ``1 - 1e-3``
      just inside it where a step from ``t = 1`` is singular or stiff: for any field where the
      log-SNR falls by more than 1 over the last ``1e-3`` with ``alpha_1 > 0``
      (``discrete_path(cosine_betas())``); where ``alpha_1 = 0`` (linear and cosine paths)
      under an ``eps`` or ``score`` field (also inside a wrapper: ``clip_x0``, guidance), an
      inverse field (``jd.dps``, ``pigdm``, ``tmpd``) or the reverse SDE; where the path's
      slope is infinite at 1 (zero terminal SNR) under the probability-flow ODE, the reverse SDE
      or a ``velocity`` field; and for ``interpolant_sde`` with diffusion where the noise scale
      is 0 at 1 (the README's Time convention). A grid given from ``t = 1`` there
      (``t_start=1``, or ``ts``) is refused with the reason, except on a stiff schedule with
      ``alpha_1 > 0``. The rule reads the path at trace time: a path passed traced into
      ``jit`` starts at 1 and is refused when it runs.
    * the start: ``x_init``, or a draw of ``N(0, sigma_{t0}^2 I)`` of ``shape`` at the first time
      ``t0`` (the path's prior there).
    * ``source``: the distribution at ``t = 1`` the field was trained from
      (:mod:`jaxdiff.sources`; the losses' ``source=``): the start is ``sigma_{t0} source(key,
      shape)`` (``source(key, shape)`` on a stochastic interpolant), the default's key, so
      ``standard_normal()`` gives the default start exactly. A non-Gaussian source (one not
      marked ``Source(fn, gaussian=True)``) makes the score meaningless on a ``GaussianPath``
      (Tweedie's formula needs ``N(0, I)`` noise): a stochastic sampler (the reverse SDE,
      ``ddim(eta > 0)``, Langevin, consistency re-noising), a ``score`` field and the guidance
      that adds a score (``classifier_guidance``, ``jd.dps``, ``pigdm``, ``tmpd``) or the hooks
      that noise with it (``inpaint``, ``jd.inverse.project``) are refused, and the path must end
      at the source (``alpha_1 = 0``, ``sigma_1 = 1``). (``jd.inverse.dps_sampler(eta=0)`` runs:
      its pull is a heuristic on ``x0_hat``, which stays meaningful.) (A field trained
      with a coupling has the same limits but no marker: sample it with the ODE.)
    * ``denoise``: end with the denoising step ``x <- x0_hat(x, t_end)`` (one more
      evaluation; default: the sampler's choice).
    * ``save_ts``: times of the grid (or ``0`` with the denoising step) whose states to return.
    * ``hook(key, state, t) -> state``: applied to the sampler's state after the start and after
      every step (``state.x`` is the sample at ``t``): inpainting (:func:`inpaint`), projections.
    * ``checkpoint``: recompute each step in reverse mode instead of storing its activations
      (gradients through a sampler then store one state per step).

    Precision: a half-precision start (bfloat16, float16) is integrated in float32 -- the field
    still sees ``x`` in the start's dtype, so the network runs in half precision -- and the
    result comes back in that dtype; small steps are not rounded away (a bfloat16 state cannot
    hold an update below 1/256 of the sample's size).

    ``key`` may be ``None`` for a deterministic sampler started from ``x_init``.

    Called eagerly, a call traces its program and reuses the compiled program of an earlier call
    that lowered to the same text (another key, another sampler object, new ``field.params``):
    ~0.1-0.3 s for an MLP instead of 0.5-3 s. Arrays a field's function closes over are
    constants of the text, so new values compile anew (never a stale result); programs with host
    callbacks (the mixture oracles' run-time checks) compile every call. A loop of calls belongs
    inside ``jax.jit``, with the parameters as an argument, e.g.
    ``draw = jax.jit(lambda key, p: sample(key, path, field.bind(p), shape, steps=20).x)``.

    ``path`` is a :class:`~jaxdiff.GaussianPath`, or a :class:`~jaxdiff.StochasticInterpolant`
    for the samplers that take one (``jd.samplers.interpolant_sde``; then ``x_init`` or
    ``source`` is required, as the interpolant does not know its source).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.vp_path()
    >>> sol = sample(jax.random.key(0), path, data.field(path, "eps"), (4096, 2),
    ...              sampler=jd.samplers.dpm_solver_pp(2), steps=20)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 21)
    """
    field = as_field(field)
    sampler = ode() if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        raise TypeError(
            f"sampler must be a jaxdiff.samplers value (e.g. jd.samplers.ode()); got {sampler!r}"
        )
    denoise = sampler.denoise if denoise is None else bool(denoise)
    if source is not None:
        _check_source(path, field, sampler, source, x_init, hook)
    if not isinstance(path, GaussianPath):  # before the default start, which reads alpha_t
        _check_interpolant(sampler, x_init if source is None else source, denoise)
    if t_start is None and ts is None:
        t_start = _engine.prior_time(path, field, sampler.singular_start)
    grid = _grid(path, sampler, steps, ts, t_start, t_end)
    if key is None and (x_init is None or sampler.stochastic or hook is not None):
        raise ValueError(
            f"sampling from the prior, with a stochastic sampler ({sampler.name}) or with a hook "
            "(it receives a key per step) needs a PRNG key"
        )
    if hook is not None and sampler.evals_first_step > 0:  # Tsit5, Dopri5: first same as last
        raise ValueError(
            f"hook= with {sampler.name}: its solver reuses the last step's derivative as the next "
            "step's first stage, which a hook that moves x makes stale (2.8e-3 off a restart from "
            "the hooked state); use a solver without FSAL (diffrax.Heun(), Euler()) or ddim()"
        )
    keys = jax.random.split(key, 4) if key is not None else [None] * 4
    if source is not None:
        x_init = _source_start(keys[0], path, source, shape, grid[0])
    x = _start(keys[0], path, field, shape, x_init, grid[0])
    grid = grid.astype(wide_dtype(x.dtype))  # the state's precision (x64: a float64 grid broke
    # diffrax's solvers on float32 data)
    grid = _check_ends(path, field, sampler, grid, denoise)  # the field as given (its own checks)
    user_dtype = x.dtype
    field, x = in_wide_precision(field, x)
    full = jnp.concatenate([grid, jnp.zeros((1,), grid.dtype)]) if denoise else grid
    n = grid.shape[0] - 1

    if sampler.adaptive is not None:
        if hook is not None or denoise:
            raise ValueError("an adaptive sampler (rtol/atol) takes no hook and no denoising step")
        sol = sampler.adaptive(keys[1], path, field, x, grid, save_ts)
        xs = None if sol.xs is None else sol.xs.astype(user_dtype)
        return sol._replace(x=sol.x.astype(user_dtype), xs=xs)

    save_ts = _engine.as_save_ts(save_ts, grid.dtype)
    buf, slots = _engine.start_buffer(full, save_ts, x)

    def run(field_arrays, x, keys, buf):
        # the sampler's work after the checks, in one program: called eagerly, the tables'
        # vmap, the init and the denoising step would dispatch op by op (an XLA compile per
        # primitive and shape: ~100 measured for UniPC's tables, and one per layer op of a
        # network's forward). Under jit it inlines; the grid and the path stay constants, as
        # under a user's jit.
        field_ = eqx.combine(field_arrays, field_static)
        state = sampler.init(path, field_, x, full)
        hook_keys = None
        if hook is not None:
            hook_keys = jax.random.split(keys[2], n + 2)
            state = hook(hook_keys[0], state, grid[0])
        step_keys = jax.random.split(keys[1], n) if sampler.stochastic else None
        tables = None
        if sampler.coefficients is not None:  # what the steps need of the times alone
            tables = jax.vmap(lambda i: sampler.coefficients(path, field_, full, i))(jnp.arange(n))

        def step(k, state, t, s):
            k_step, k_hook, row = k
            extra = {} if row is None else {"coefs": row}
            state = sampler.step(k_step, path, field_, state, t, s, **extra)
            return state if hook is None else hook(k_hook, state, s)

        inputs = (step_keys, None if hook is None else hook_keys[1 : n + 1], tables)
        state, buf = _engine.scan(
            step, state, grid, inputs, get_x=lambda st: st.x, buffer=buf, slots=slots,
            checkpoint=checkpoint,
        )  # fmt: skip
        x = state.x
        if denoise:
            x = denoise_step(path, field_, x, grid[-1]).astype(x.dtype)
            if hook is not None:
                x = hook(hook_keys[n + 1], state._replace(x=x), full[-1]).x
            if buf is not None:
                buf = buf.at[slots[-1]].set(x, mode="drop")
        return x, buf

    field_arrays, field_static = eqx.partition(field, eqx.is_array)
    x, buf = run_jit(run, field_arrays, x, keys, buf)  # an eager repeat reuses the program
    x = check_finite(x, "the sample (check the field, the time grid and the step sizes)")
    nfe = sampler.nfe(n) + int(denoise)
    buf = None if buf is None else buf.astype(user_dtype)
    return Solution(
        x.astype(user_dtype), save_ts, buf, jnp.asarray(nfe), jnp.asarray(n + int(denoise))
    )


def _grid(path, sampler, steps, ts, t_start, t_end) -> Array:
    if ts is not None:
        given = [
            k
            for k, v in (("steps", steps), ("t_start", t_start), ("t_end", t_end))
            if v is not None
        ]
        if given:
            raise ValueError(f"give either ts or {' / '.join(given)}, not both")
        return _engine.check_grid(ts, decreasing=True, unit=True)
    steps = sampler.steps if steps is None else steps
    steps = check_count(steps, "steps")
    t_end = sampler.t_end if t_end is None else t_end
    with jax.ensure_compile_time_eval():  # a grid of constants stays concrete under jit
        grid = sampler.grid(path, int(steps), t_start, t_end)
    return _engine.check_grid(grid, "the grid t_start -> t_end", decreasing=True, unit=True)


def _start(key, path, field, shape, x_init, t0) -> Array:
    check_shape_tuple(shape)
    if x_init is None:
        if shape is None:
            raise ValueError("give the sample shape, or x_init")
        dtype = jnp.result_type(float)
        x_init = path.sigma(t0).astype(dtype) * jax.random.normal(key, tuple(shape), dtype)
    x = jnp.asarray(x_init)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x_init must be a floating array; got dtype {x.dtype}")
    if shape is not None and tuple(shape) != x.shape:
        raise ValueError(f"x_init has shape {x.shape} but shape = {tuple(shape)}; give one of them")
    if x.ndim < 1:
        what = "x_init" if shape is None else "shape"
        raise ValueError(f"the sample needs a batch axis, (batch, *event); got {what} = {x.shape}")
    x = check_finite(x, "x_init")
    try:
        out = jax.eval_shape(field, x, batch_time(jnp.asarray(t0, wide_dtype(x.dtype)), x))
    except ValueError as err:  # e.g. (2,) for one 2-D point: the field's message was about t
        raise ValueError(
            f"{err}\n(the field was called on the start state of shape {x.shape}, read as "
            f"(batch, *event): batch {x.shape[0]}, event shape {x.shape[1:]}; one point of "
            "shape (d,) is (1, d))"
        ) from err
    except TypeError as err:  # apply(params, x, t, r) with r required: "missing ... 'r'"
        if isinstance(err, jax.errors.JAXTypeError) or "required positional" not in str(err):
            raise  # JAX's own (a tracer used as a bool) and other bugs of the field, unchanged
        raise TypeError(
            f"{err}\n(the field was called as field(x, t) to check its output's shape: a "
            "two-time network for meanflow() or a shortcut model must default its second time "
            "to the first, apply(params, x, t, r=None) with u(x, t) = u(x, t, t), the "
            "instantaneous velocity)"
        ) from err
    if out.shape != x.shape:
        raise ValueError(
            f"field(x, t) returned shape {out.shape} but x has shape {x.shape}; the field must "
            f"predict its target ({field.target!r}) with x's shape"
        )
    return x


def _check_source(path, field, sampler, source, x_init, hook) -> None:
    """What a start from ``source`` rules out (the ``source`` argument of :func:`sample`)."""
    if x_init is not None:
        raise ValueError("give x_init or source, not both (source draws the start)")
    if not callable(source):
        raise TypeError(
            f"source must be a jd.Source or a function (key, shape) -> x1; got {source!r}"
        )
    if is_gaussian(source) or not isinstance(path, GaussianPath):
        return  # a stochastic interpolant's SDE has the score of its own Gaussian z
    why = (
        "the field was trained from a non-Gaussian source, where the score is not Tweedie's "
        "-E[x1 | x_t] / sigma_t (that needs x1 ~ N(0, I)), so "
    )
    fix = (
        "; sample with the probability-flow ODE: jd.samplers.ode(), dpm_solver_pp, unipc, "
        "ddim(0.0), edm_heun(), ... (pass x_init = source(key, shape) instead of source= to run it "
        "on purpose)"
    )
    if sampler.stochastic:
        raise ValueError(
            f"{why}{sampler.name}, which draws Gaussian noise along the way, cannot sample it{fix}"
        )
    for inner in _engine.wrapped_fields(field):
        if inner.target == "score":
            raise ValueError(f"{why}a 'score' field cannot be right for it{fix}")
        if getattr(inner.fn, "adds_score", False):
            name = getattr(inner.fn, "kind", None)  # jd.dps, pigdm, tmpd
            name = f"jd.{name}" if name else "classifier_guidance"
            raise ValueError(
                f"{why}{name} (it adds a score term to the field) cannot guide it{fix}"
            )
    if getattr(hook, "gaussian_noise", False):
        raise ValueError(
            f"{why}the hook (jd.inpaint, jd.inverse.project), which noises the known part with "
            f"N(0, I) noise, cannot condition it{fix}"
        )
    check_source_path(path)


def _source_start(key, path, source, shape, t0) -> Array:
    if shape is None:
        raise ValueError("give the sample shape: source= draws a start of that shape")
    x1 = jnp.asarray(source(key, tuple(shape)))
    if x1.shape != tuple(shape):
        raise ValueError(
            f"source(key, {tuple(shape)}) drew shape {x1.shape}; expected {tuple(shape)}"
        )
    x1 = x1.astype(data_dtype(x1))  # integer points (pixels) as floats, as the losses read them
    x1 = check_finite(x1, "the start drawn by source")
    if not isinstance(path, GaussianPath):
        return x1
    return (expand_like(path.sigma(t0), x1) * x1).astype(x1.dtype)


def _check_interpolant(sampler, x_init, denoise) -> None:
    if not sampler.interpolant:
        raise ValueError(
            f"{sampler.name} samples a GaussianPath (it converts through the (x0, eps) hub); a "
            "stochastic interpolant is sampled with jd.samplers.interpolant_sde()"
            + _engine.VELOCITY_HINT
            + " as x_init (interpolant_sde(0.0) is the probability-flow ODE by Euler)"
        )
    if x_init is None:
        raise ValueError(
            "a stochastic interpolant does not know its source: give source= (a jd.Source or "
            "(key, shape) -> x1), or x_init = source(key, shape)"
        )
    if denoise:
        raise ValueError("the denoising step needs a GaussianPath; end the grid at t = 0 instead")


def _check_ends(path, field, sampler, grid, denoise) -> Array:
    """Singular ends, at trace time where the grid is known (else when it runs)."""
    check = _engine.grid_check
    if not isinstance(path, GaussianPath):
        return grid if sampler.check is None else sampler.check(path, field, grid)
    for inner in _engine.wrapped_fields(field):  # the field, and those a wrapper holds
        own = getattr(inner.fn, "check_grid", None)  # a field transform's (jd.dps, pigdm, tmpd)
        if callable(own):
            grid = own(inner.params, grid)
    if any(f.target == "velocity" for f in _engine.wrapped_fields(field)):
        grid = check(
            grid,
            lambda g: _engine.slope_singular(path, g[0]),
            _engine.SLOPE_MESSAGE.format(
                where="the first time of the grid",
                what=" and a 'velocity' prediction's x0 and eps (velocity = alpha' x0 + sigma' eps)",
                fix="start at t < 1 (the default grid does) or use an 'x0' or 'v' field",
            ),
        )
    if _engine.divides_by_alpha(field, transforms=False):
        target = next(
            f.target for f in _engine.wrapped_fields(field) if f.target in _engine.EPS_SCORE
        )
        grid = check(
            grid,
            lambda g: path.alpha(g[0]) == 0,
            f"alpha_t = 0 at the first time of the grid, where {'an' if target == 'eps' else 'a'} "
            f"{target!r} prediction "
            "says nothing about x0 (x0 = (x - sigma eps) / alpha); start at t < 1 (e.g. "
            "t_start=1 - 1e-3) or train the 'x0', 'v' or 'velocity' target",
        )
    if sampler.check is not None:
        grid = sampler.check(path, field, grid)
    if denoise:
        grid = check(
            grid,
            lambda g: path.sigma(g[-1]) == 0,
            "the grid already ends where sigma = 0 (t = 0): drop the denoising step "
            "(denoise=False) or end the grid at t_end > 0",
        )
    elif not sampler.reaches_zero:
        grid = check(
            grid,
            lambda g: path.sigma(g[-1]) == 0,
            f"{sampler.name} does not step to sigma = 0 (t = 0), where scores and conversions "
            "divide by sigma: end at t_end > 0 (e.g. 1e-3), with denoise=True for a last step "
            "to the data",
        )
    return grid


def inpaint(path: GaussianPath, x_known: ArrayLike, mask: ArrayLike) -> Hook:
    """A hook that imputes known coordinates (score_sde's controllable generation; Song et al.
    2021, App. I): after every step to ``t``, the coordinates where ``mask`` is true are replaced
    by a fresh forward sample ``alpha_t x_known + sigma_t z`` of them (``x_known`` exactly at
    ``t = 0``). ``mask`` broadcasts to the sample's shape.

    Replacement is not exact conditioning: the unknown part follows the known part's fresh noise,
    not its posterior path. For a 2-D Gaussian with correlation 0.8 and ``x1 = 1.5`` the imputed
    ``x2`` has mean 0.76 instead of ``E[x2 | x1] = 1.2`` (reverse SDE, 500 steps; the
    known bias of replacement, Lugmayr et al. 2022, Chung et al. 2023).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> path = jd.vp_path()
    >>> data = jd.GaussianMixture(jnp.ones(1), jnp.zeros((1, 2)), jnp.eye(2)[None])
    >>> known = jnp.zeros((4000, 2)).at[:, 0].set(1.5)
    >>> hook = inpaint(path, known, jnp.array([True, False]))
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "eps"), (4000, 2),
    ...                 sampler=jd.samplers.sde(), steps=200, hook=hook)
    >>> round(float(sol.x[:, 0].mean()), 2), round(float(sol.x[:, 1].std()), 1)
    (1.5, 1.0)
    """
    x_known = jnp.asarray(x_known)
    mask = jnp.asarray(mask, bool)

    def hook(key, state, t):
        x = state.x
        a, s = expand_like(path.alpha(t), x), expand_like(path.sigma(t), x)
        forward = a * x_known + s * normal(key, x)
        return state._replace(x=jnp.where(mask, forward.astype(x.dtype), x))

    hook.gaussian_noise = True  # sample(source=) refuses it for a non-Gaussian source
    return hook
