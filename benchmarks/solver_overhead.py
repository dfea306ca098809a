"""Solver overhead: every fixed-grid sampler of ``jaxdiff.sample`` against a hand-written ``lax.scan``
of the same update, and the memory of gradients through a sampler.

All integrate the VP path (beta 0.1 to 20) from ``t = 1`` to ``1e-3`` with the same MLP (width
256) predicting ``eps``. A hand scan is what a researcher writes: the closed-form VP coefficients
(``alpha``, ``sigma``, ``lambda``) tabulated on the grid before the scan, the update written out
(``x += dt * drift`` for Euler, ``x = a_s x0 + s_s eps`` for DDIM, ...), one key per step split
before the scan. The goal is ``ratio = jaxdiff / scan <= 1.10``. Each hand scan computes the same
update from the same noise as its sampler: ``rel_diff`` is ``max |scan - jaxdiff| / max |jaxdiff|``
of one call (float32 rounding, ~1e-6; the untrained MLP's outputs are large). Peak memory is XLA's temp
allocation of the compiled program (``memory_analysis``): it must not grow with the number of steps
unless a trajectory is saved. The gradient rows differentiate ``mean(x)`` of a 50- and a 500-step
Euler solve in the MLP's parameters: ``jaxdiff.sample`` checkpoints each step (one state stored
per step), against the same scan storing every activation (``checkpoint=False``). The last row
differentiates a 10-step Euler solve through small_unet against the loop unrolled in Python (the
convolution gradients' slow path inside loops, guarded).
"""

from __future__ import annotations

import time

import diffrax
import jax
import jax.flatten_util
import jax.numpy as jnp

import jaxdiff as jd
from benchmarks.common import interleaved, mlp_apply, mlp_init

TITLE = "Solver overhead: every jaxdiff sampler vs a hand-written lax.scan of its update"

BETA_MIN, BETA_MAX, T_END = 0.1, 20.0, 1e-3
PATH = jd.vp_path(BETA_MIN, BETA_MAX)


def _vp(t):
    """Hand-written VP coefficients: beta(t), alpha(t), sigma(t)."""
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    log_alpha = -0.5 * t * BETA_MIN - 0.25 * t**2 * (BETA_MAX - BETA_MIN)
    return beta, jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))


def _eps(params, x, t):
    return mlp_apply(params, x, jnp.broadcast_to(t, x.shape[:1]))


def _unipc_2_weights(lam, alpha, sigma, n):
    """UniPC-2 bh2 (Zhao et al. 2023) on the grid, vectorised over the steps ``i``: the weights of
    the corrected sample in ``(x, x_prev, x0, m1, m2)`` (``x0`` the new evaluation, ``m1``, ``m2``
    the earlier ones) and of the prediction in ``(x_c, x0, m1)``. Step ``i`` corrects the step
    from ``i - 1`` (none at ``i = 0``; second order when that step's prediction was), then
    predicts at second order except at the first and the last step."""
    i = jnp.arange(n)
    im1, im2 = jnp.maximum(i - 1, 0), jnp.maximum(i - 2, 0)
    a_t, s_t, a_s, s_s = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
    hc = jnp.where(i > 0, lam[i] - lam[im1], 1.0)  # the last step
    e1 = jnp.expm1(-hc)  # B(h) = e^{-h} - 1 (bh2)
    b1 = e1 / -hc - 1.0  # phi_2-type weights of the order conditions, / B(h)
    b2 = 2.0 * (b1 / -hc - 0.5)
    r0 = jnp.where(i >= 2, (lam[im2] - lam[im1]) / hc, 2.0)
    rho1 = (b2 / e1 - r0 * b1 / e1) / (1.0 - r0)  # R rho = b, R = [[1, 1], [r0, 1]]
    rho0 = b1 / e1 - rho1
    cx, cm = s_t / sigma[im1], -a_t * e1
    order2 = (i >= 2) & (i - 1 < n - 1)  # step i - 1 predicted at second order
    rho_x0 = jnp.where(order2, rho1, 0.5)  # order 1 corrector: rho = 1/2 on (x0 - m1)
    rho_m2 = jnp.where(order2, rho0 / r0, 0.0)
    zero = jnp.zeros_like(cx)
    wc = jnp.stack([zero, cx, cm * rho_x0, cm * (1.0 - rho_x0 - rho_m2), cm * rho_m2], -1)
    wc = jnp.where((i == 0)[:, None], jnp.eye(5)[0], wc)
    h = lam[i + 1] - lam[i]
    e = jnp.expm1(-h)
    r = (lam[im1] - lam[i]) / h
    use2 = (i > 0) & (i < n - 1)
    half = jnp.where(use2, 0.5 * a_s * e / r, 0.0)  # second order: - a_s e (m1 - x0) / (2 r)
    wp = jnp.stack([s_s / s_t, -a_s * e + half, -half], -1)
    return wc, wp


def _hand(kind: str, params, x, key, steps: int):
    """The hand-written scan of sampler ``kind``."""
    ts = jnp.linspace(1.0, T_END, steps + 1)
    beta, alpha, sigma = _vp(ts)
    lam = jnp.log(alpha) - jnp.log(sigma)
    keys = jax.random.split(key, steps)
    idx = jnp.arange(steps)
    n = steps
    if kind == "unipc_2":
        unipc_w = _unipc_2_weights(lam, alpha, sigma, n)

    def body(carry, i):
        x = carry[0]
        t, s = ts[i], ts[i + 1]
        a_t, s_t, a_s, s_s = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        eps = _eps(params, x, t)
        x0 = (x - s_t * eps) / a_t
        if kind in ("euler", "euler_maruyama"):
            w = (
                1.0 if kind == "euler_maruyama" else 0.5
            )  # reverse SDE: f - g^2 s; PF-ODE: f - g^2 s/2
            drift = -0.5 * beta[i] * x + w * beta[i] * eps / s_t
            x = x + (s - t) * drift
            if kind == "euler_maruyama":
                x = x + jnp.sqrt(beta[i] * (t - s)) * jax.random.normal(keys[i], x.shape, x.dtype)
            return (x,), None
        if kind == "ddim":
            return (a_s * x0 + s_s * eps,), None
        if kind == "ancestral":
            r = -jnp.expm1(2.0 * (lam[i] - lam[i + 1]))  # 1 - SNR_t / SNR_s
            mean = a_t / a_s * s_s**2 / s_t**2 * x + a_s * r * x0
            z = jax.random.normal(keys[i], x.shape, x.dtype)
            return (mean + jnp.sqrt(s_s**2 * r) * z,), None
        if kind in ("dpm_2m", "dpm_2m_sde"):  # DPM-Solver++ 2M (-SDE, eta = 1): first step
            m1, h1 = carry[1], carry[2]  # first order, lower order at the last
            h = lam[i + 1] - lam[i]
            sde = kind == "dpm_2m_sde"
            phi1 = -jnp.expm1(-2.0 * h if sde else -h)  # the weights at h_eta = (1 + eta) h
            ratio = s_s / s_t * (jnp.exp(-h) if sde else 1.0)
            x1 = ratio * x + a_s * phi1 * x0
            second = x1 + 0.5 * a_s * phi1 * (x0 - m1) * (h / h1)
            x = jnp.where((i > 0) & (i < n - 1), second, x1)
            if sde:
                z = jax.random.normal(keys[i], x.shape, x.dtype)
                x = x + s_s * jnp.sqrt(-jnp.expm1(-2.0 * h)) * z
            return (x, x0, h), None
        if kind == "unipc_2":  # UniPC-2 bh2: the weights of the states tabulated before the scan
            x_prev, m1, m2 = carry[1], carry[2], carry[3]
            wc, wp = unipc_w[0][i], unipc_w[1][i]
            x_c = wc[0] * x + wc[1] * x_prev + wc[2] * x0 + wc[3] * m1 + wc[4] * m2
            return (wp[0] * x_c + wp[1] * x0 + wp[2] * m1, x_c, x0, m1), None
        if kind == "pc":  # one Langevin corrector step (SNR rule, 0.16), the reverse-diffusion
            k_c, k_p = jax.random.split(keys[i])  # predictor
            (k_c,) = jax.random.split(k_c, 1)
            norm = lambda v: jnp.mean(jnp.sqrt(jnp.sum(v * v, axis=1)))  # noqa: E731
            score = -eps / s_t
            z = jax.random.normal(k_c, x.shape, x.dtype)
            size = 2.0 * (a_t / a_s) ** 2 * (0.16 * norm(z) / norm(score)) ** 2
            x = x + size * score + jnp.sqrt(2.0 * size) * z
            eps = _eps(params, x, t)
            g2 = s_t**2 * -jnp.expm1(2.0 * (lam[i] - lam[i + 1]))
            x = (2.0 - a_t / a_s) * x - g2 * eps / s_t
            return (x + jnp.sqrt(g2) * jax.random.normal(k_p, x.shape, x.dtype),), None
        if kind == "langevin":  # annealed Langevin: LANGEVIN_STEPS steps at level s
            a = 2e-5 * s_s**2 / sigma[-1] ** 2

            def inner(x, k):
                score = -_eps(params, x, s) / s_s
                return x + 0.5 * a * score + jnp.sqrt(a) * jax.random.normal(k, x.shape), None

            return (jax.lax.scan(inner, x, jax.random.split(keys[i], LANGEVIN_STEPS))[0],), None
        if kind == "heun":  # diffrax's Heun on the PF-ODE in t

            def drift(z, j, e):
                return -0.5 * beta[j] * z + 0.5 * beta[j] * e / sigma[j]

            k1 = (s - t) * drift(x, i, eps)
            x_e = x + k1
            k2 = (s - t) * drift(x_e, i + 1, _eps(params, x_e, s))
            return (x + 0.5 * k1 + 0.5 * k2,), None
        if kind == "edm":  # Heun in (x / alpha, sigma / alpha)
            x_e = a_s * x0 + s_s * eps
            eps2 = _eps(params, x_e, s)
            d_sig = s_s / a_s - s_t / a_t
            return (a_s / a_t * x + a_s * d_sig * 0.5 * (eps + eps2),), None
        raise ValueError(kind)

    carry = {
        "dpm_2m": (x, jnp.zeros_like(x), jnp.ones(())),
        "dpm_2m_sde": (x, jnp.zeros_like(x), jnp.ones(())),
        "unipc_2": (x, x, jnp.zeros_like(x), jnp.zeros_like(x)),
    }.get(kind, (x,))
    return jax.lax.scan(body, carry, idx)[0][0]


SAMPLERS = {  # name -> (hand-scan kind, jaxdiff sampler, grid: uniform from 1 to T_END)
    "Euler ODE": ("euler", jd.samplers.ode()),
    "Euler-Maruyama SDE": ("euler_maruyama", jd.samplers.sde()),
    "DDIM": ("ddim", jd.samplers.ddim()),
    "DDPM ancestral": ("ancestral", jd.samplers.ancestral()),
    "DPM-Solver++ 2M": ("dpm_2m", jd.samplers.dpm_solver_pp(2)),
    "DPM-Solver++ 2M-SDE": ("dpm_2m_sde", jd.samplers.dpm_solver_pp(2, eta=1.0)),
    "UniPC-2 bh2": ("unipc_2", jd.samplers.unipc(2)),
    "Heun ODE (diffrax.Heun)": ("heun", jd.samplers.ode(diffrax.Heun())),
    "EDM Heun": ("edm", jd.samplers.edm_heun()),
    "PC (reverse diffusion + Langevin)": ("pc", jd.samplers.pc()),
    "annealed Langevin": ("langevin", jd.samplers.annealed_langevin(steps_per_level=5)),
}
LANGEVIN_STEPS = 5  # annealed Langevin's steps per level (each a network evaluation)


def _jaxdiff(sampler, params, x, key, steps: int, save: bool = False):
    field = jd.Field(mlp_apply, "eps", params)
    ts = jnp.linspace(1.0, T_END, steps + 1)
    sol = jd.sample(key, PATH, field, x_init=x, sampler=sampler, ts=ts, denoise=False,
                    save_ts=ts if save else None)  # fmt: skip
    return sol.xs if save else sol.x


def temp_bytes(fn, *args) -> int:
    """Bytes XLA allocates for the compiled ``fn(*args)`` beyond its inputs: temporaries + outputs."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return -1
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def _gradient_rows(params, repeats: int, quick: bool) -> list[dict]:
    """Memory and time of grad(mean(sample)) in the MLP's parameters, checkpointed or not."""
    rows = []
    x = jax.random.normal(jax.random.key(1), (256, 2))
    for steps in (50,) if quick else (50, 500):

        def loss(p, checkpoint, steps=steps):
            sol = jd.sample(None, PATH, jd.Field(mlp_apply, "eps", p), x_init=x, steps=steps,
                            t_end=T_END, checkpoint=checkpoint)  # fmt: skip
            return jnp.mean(sol.x)

        fns = {c: jax.jit(jax.grad(lambda p, c=c: loss(p, c))) for c in (True, False)}
        mem = {c: temp_bytes(jax.grad(lambda p, c=c: loss(p, c)), params) for c in (True, False)}
        res = interleaved({str(c): (lambda f=f: f(params)) for c, f in fns.items()}, repeats)
        for c in (True, False):
            rows.append({
                "method": f"grad through Euler, {'checkpointed (default)' if c else 'stored'}",
                "batch": 256, "steps": steps, "scan_ms": None,
                "jaxdiff_ms": 1e3 * res[str(c)]["median_s"], "ratio": None,
                "scan_compile_s": None, "jaxdiff_compile_s": res[str(c)]["compile_s"],
                "grad_memory_mib": mem[c] / 2**20, "rel_diff": None,
            })  # fmt: skip
    return rows


def _unet_gradient_row(repeats: int) -> dict:
    """grad(mean(sample)) in a U-Net's parameters (small_unet, 32x32x3, batch 8, 10 Euler steps on
    the linear path): ``jaxdiff.sample`` (a checkpointed ``lax.scan``) against the same Euler loop
    unrolled in Python, its ``scan_ms``. XLA:CPU's kernel-gradient convolution once ran ~7x slower
    inside a loop body than unrolled; ``jaxdiff.nets.conv2d`` fixed it and this row guards it
    (``ratio`` ~1.1: the checkpoint's recomputed forward pass)."""
    from jaxdiff.nets import small_unet

    net, steps, shape = small_unet(), 10, (8, 32, 32, 3)
    params = net.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]))
    path, x = jd.linear_path(), jax.random.normal(jax.random.key(1), shape)
    ts = jnp.linspace(1.0, 1e-3, steps + 1)  # the same grid for both

    def jaxdiff_loss(p):
        sol = jd.sample(None, path, jd.Field(net.apply, "velocity", p), x_init=x, ts=ts)
        return jnp.mean(sol.x)

    def unrolled_loss(p):
        z = x
        for i in range(steps):
            z = z + (ts[i + 1] - ts[i]) * net.apply(p, z, jnp.full(shape[:1], ts[i]))
        return jnp.mean(z)

    fns = {k: jax.jit(jax.grad(f)) for k, f in (("jaxdiff", jaxdiff_loss), ("scan", unrolled_loss))}
    first = {k: _first(fns[k], params) for k in ("scan", "jaxdiff")}  # compile + one run
    a, b = (jax.flatten_util.ravel_pytree(first[k][0])[0] for k in ("scan", "jaxdiff"))
    rel_diff = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    res = interleaved({k: (lambda f=f: f(params)) for k, f in fns.items()}, repeats)
    return {
        "method": "grad through Euler, small_unet 32x32x3 (scan_ms: the loop unrolled)",
        "batch": shape[0], "steps": steps,
        "scan_ms": 1e3 * res["scan"]["median_s"], "jaxdiff_ms": 1e3 * res["jaxdiff"]["median_s"],
        "ratio": res["jaxdiff"]["median_s"] / res["scan"]["median_s"],
        "scan_compile_s": first["scan"][1], "jaxdiff_compile_s": first["jaxdiff"][1],
        "grad_memory_mib": None, "rel_diff": rel_diff,
    }  # fmt: skip


def _first(fn, *args):
    """``(fn(*args), seconds)`` of a jitted function's first call: trace, compile and one run."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def _repeats(base: int, batch: int, steps: int) -> int:
    """More rounds for the short calls (0.4 ms at batch 1 and 100 steps: the median of 15 moved
    by +-10% between runs), fewer for the long ones."""
    if batch >= 4096:
        return base if steps < 1000 else max(3, base // 3)
    return 7 * base if steps < 1000 else 2 * base


def run(quick: bool) -> dict:
    params = mlp_init(jax.random.key(0), dim=2, width=256)
    batches = [1, 64] if quick else [1, 16, 64, 4096]
    step_counts = [100] if quick else [100, 1000]
    repeats = 5 if quick else 15
    rows = []
    for name, (kind, sampler) in SAMPLERS.items():
        for batch in batches:
            for steps in step_counts:
                if quick and batch > 1 and name not in ("Euler ODE", "DDIM"):
                    continue
                x = jax.random.normal(jax.random.key(1), (batch, 2))
                key = jax.random.key(2)
                hand_key = jax.random.split(key, 4)[1]  # the step keys jd.sample splits from key
                hand = jax.jit(lambda p, x, k, s=steps, kd=kind: _hand(kd, p, x, k, s))
                ours = jax.jit(lambda p, x, k, s=steps, sm=sampler: _jaxdiff(sm, p, x, k, s))
                (a, hand_c), (b, ours_c) = (
                    _first(hand, params, x, hand_key),
                    _first(ours, params, x, key),
                )  # the first calls compile: interleaved's own first call is a warm one
                rel_diff = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                res = interleaved(
                    {
                        "scan": lambda f=hand, x=x, k=hand_key: f(params, x, k),
                        "jaxdiff": lambda f=ours, x=x, k=key: f(params, x, k),
                    },
                    repeats=_repeats(repeats, batch, steps),
                )
                rows.append({
                    "method": name, "batch": batch, "steps": steps,
                    "scan_ms": 1e3 * res["scan"]["median_s"],
                    "jaxdiff_ms": 1e3 * res["jaxdiff"]["median_s"],
                    "ratio": res["jaxdiff"]["median_s"] / res["scan"]["median_s"],
                    "scan_compile_s": hand_c,
                    "jaxdiff_compile_s": ours_c,
                    "grad_memory_mib": None, "rel_diff": rel_diff,
                })  # fmt: skip
    rows += _gradient_rows(params, repeats, quick)
    rows.append(_unet_gradient_row(3 if quick else 7))
    # Peak memory against the number of steps (batch 4096), with and without a trajectory.
    x = jax.random.normal(jax.random.key(1), (4096, 2))
    key = jax.random.key(2)
    sde = jd.samplers.sde()
    mem = {}
    for steps in (100, 1000):
        mem[steps] = (
            temp_bytes(
                lambda p, x, k, s=steps: _hand("euler_maruyama", p, x, k, s), params, x, key
            ),
            temp_bytes(lambda p, x, k, s=steps: _jaxdiff(sde, p, x, k, s), params, x, key),
            temp_bytes(lambda p, x, k, s=steps: _jaxdiff(sde, p, x, k, s, True), params, x, key),
        )
    worst = max(r["ratio"] for r in rows if r["ratio"] is not None and "grad" not in r["method"])
    notes = (
        f"Largest ratio {worst:.3f}. Peak memory beyond the inputs (XLA memory_analysis: "
        "temporaries + outputs; batch 4096, Euler-Maruyama): "
        + "; ".join(
            f"{s} steps: scan {m[0] / 2**20:.2f} MiB, jaxdiff {m[1] / 2**20:.2f} MiB, "
            f"jaxdiff saving every step {m[2] / 2**20:.2f} MiB"
            for s, m in mem.items()
        )
    )
    return {"rows": rows, "notes": notes, "memory": {str(k): v for k, v in mem.items()}}
