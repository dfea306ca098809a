"""Solver overhead: ``jaxdiff.sample`` against a hand-written ``lax.scan`` of the same update.

Both integrate the VP probability-flow ODE (Euler) or reverse SDE (Euler--Maruyama) from ``t = 1``
to ``1e-3`` with the same MLP (width 256) predicting ``eps``. The scan is what a researcher writes
by hand: the closed-form VP coefficients, ``x += dt * drift`` (plus ``g sqrt(|dt|) z``). The goal is
``ratio = jaxdiff / scan <= 1.10``. Peak memory is XLA's temp allocation of the compiled program
(``memory_analysis``): it must not grow with the number of steps unless a trajectory is saved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxdiff as jd
from benchmarks.common import interleaved, mlp_apply, mlp_init

TITLE = "Solver overhead: jaxdiff fixed-step sampling vs a hand-written lax.scan"

BETA_MIN, BETA_MAX, T_END = 0.1, 20.0, 1e-3


def _vp_coefs(t):
    """Hand-written VP coefficients: beta(t), sigma(t)."""
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    log_alpha = -0.5 * t * BETA_MIN - 0.25 * t**2 * (BETA_MAX - BETA_MIN)
    return beta, jnp.sqrt(-jnp.expm1(2.0 * log_alpha))


def scan_sampler(params, x, key, steps: int, sde: bool, g_apart: bool = False):
    """Euler (ODE) or Euler--Maruyama (SDE) by hand, the MLP predicting eps.

    The noise is ``sqrt(beta |dt|) z``; with ``g_apart`` it is ``g(t) (sqrt(|dt|) z)`` with
    ``g = sqrt(beta)``, the form of any ``dx = f dt + g dw`` solver (the same numbers, but on CPU at
    batch 1 XLA puts ``g`` in a kernel of its own, which costs about 3 us per step).
    """
    ts = jnp.linspace(1.0, T_END, steps + 1)

    def body(x, inputs):
        t, t_next, k = inputs
        dt = t_next - t
        beta, sigma = _vp_coefs(t)
        eps = mlp_apply(params, x, t)
        weight = 1.0 if sde else 0.5  # reverse SDE: f - g^2 s; PF-ODE: f - g^2 s / 2
        drift = -0.5 * beta * x + weight * beta * eps / sigma
        x = x + dt * drift
        if sde and g_apart:
            x = x + jnp.sqrt(beta) * (jnp.sqrt(-dt) * jax.random.normal(k, x.shape, x.dtype))
        elif sde:
            x = x + jnp.sqrt(beta * -dt) * jax.random.normal(k, x.shape, x.dtype)
        return x, None

    keys = jax.random.split(key, steps)
    return jax.lax.scan(body, x, (ts[:-1], ts[1:], keys))[0]


def jaxdiff_sampler(params, x, key, steps: int, sde: bool, save: bool = False):
    field = lambda x, t: mlp_apply(params, x, t)  # noqa: E731
    ts = jnp.linspace(1.0, T_END, steps + 1) if save else None
    sol = jd.sample(
        key,
        jd.vp_path(BETA_MIN, BETA_MAX),
        field,
        target="eps",
        eta=1.0 if sde else 0.0,
        x_init=x,
        steps=steps,
        t_end=T_END,
        save_ts=ts,
    )
    return sol.x if not save else sol.xs


def temp_bytes(fn, *args) -> int:
    """Bytes XLA allocates for the compiled ``fn(*args)`` beyond its inputs: temporaries + outputs."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return -1
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def run(quick: bool) -> dict:
    params = mlp_init(jax.random.key(0), dim=2, width=256)
    batches = [64, 4096] if quick else [1, 64, 4096]
    step_counts = [100] if quick else [100, 1000]
    repeats = 5 if quick else 15
    rows = []
    for sde in (False, True):
        for batch in batches:
            for steps in step_counts:
                x = jax.random.normal(jax.random.key(1), (batch, 2))
                key = jax.random.key(2)
                scan_fn = jax.jit(lambda p, x, k, s=steps, e=sde: scan_sampler(p, x, k, s, e))
                jd_fn = jax.jit(lambda p, x, k, s=steps, e=sde: jaxdiff_sampler(p, x, k, s, e))
                thunks = {
                    "scan": lambda f=scan_fn, x=x, k=key: f(params, x, k),
                    "jaxdiff": lambda f=jd_fn, x=x, k=key: f(params, x, k),
                }
                if sde and batch == 1:
                    apart = jax.jit(lambda p, x, k, s=steps: scan_sampler(p, x, k, s, True, True))
                    thunks["scan_g_apart"] = lambda f=apart, x=x, k=key: f(params, x, k)
                res = interleaved(
                    thunks,
                    repeats=repeats if batch < 4096 or steps < 1000 else max(3, repeats // 3),
                )
                rows.append(
                    {
                        "method": "Euler-Maruyama SDE" if sde else "Euler ODE",
                        "batch": batch,
                        "steps": steps,
                        "scan_ms": 1e3 * res["scan"]["median_s"],
                        "jaxdiff_ms": 1e3 * res["jaxdiff"]["median_s"],
                        "ratio": res["jaxdiff"]["median_s"] / res["scan"]["median_s"],
                        "ratio_to_scan_g_apart": (
                            res["jaxdiff"]["median_s"] / res["scan_g_apart"]["median_s"]
                            if "scan_g_apart" in res
                            else None
                        ),
                        "scan_compile_s": res["scan"]["compile_s"],
                        "jaxdiff_compile_s": res["jaxdiff"]["compile_s"],
                    }
                )
    # Peak memory against the number of steps (batch 4096), with and without a trajectory.
    x = jax.random.normal(jax.random.key(1), (4096, 2))
    key = jax.random.key(2)
    params_mem = params
    mem = {}
    for steps in (100, 1000):
        mem[steps] = (
            temp_bytes(lambda p, x, k, s=steps: scan_sampler(p, x, k, s, True), params_mem, x, key),
            temp_bytes(
                lambda p, x, k, s=steps: jaxdiff_sampler(p, x, k, s, True), params_mem, x, key
            ),
            temp_bytes(
                lambda p, x, k, s=steps: jaxdiff_sampler(p, x, k, s, True, True), params_mem, x, key
            ),
        )
    notes = (
        "ratio_to_scan_g_apart (SDE, batch 1): against a hand scan that computes g(t) and "
        "sqrt(|dt|) z apart, as a solver of dx = f dt + g dw does, rather than sqrt(beta |dt|) z. "
        "Peak memory beyond the inputs (XLA memory_analysis: temporaries + outputs; batch 4096, SDE): "
        + "; ".join(
            f"{s} steps: scan {m[0] / 2**20:.2f} MiB, jaxdiff {m[1] / 2**20:.2f} MiB, "
            f"jaxdiff saving every step {m[2] / 2**20:.2f} MiB"
            for s, m in mem.items()
        )
    )
    return {"rows": rows, "notes": notes, "memory": {str(k): v for k, v in mem.items()}}
