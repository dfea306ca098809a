"""diffusers' schedulers against jaxdiff's samplers on the same discrete chain: agreement and speed.

The chain is DDPM's (1000 linear betas 1e-4..0.02, ``jd.discrete_path``); diffusers' default
"linspace" timesteps ``k`` are jaxdiff's times ``(k + 1) / 1000``, and diffusers' last step to
``sigma = 0`` is jaxdiff's denoising step. Each sampler runs with ``steps`` evaluations from the
same start:

* deterministic samplers (DPM-Solver++ 2M/3M with the reference 3M coefficient, UniPC bh2/bh1) on
  the benchmark MLP as an ``x0`` network (``prediction_type="sample"``): ``max_abs_diff`` of the
  final samples;
* DPM-Solver++ 2M-SDE (``algorithm_type="sde-dpmsolver++"``) with diffusers fed jaxdiff's own
  noise (``variance_noise``), so the update is deterministic given it: ``max_abs_diff`` again;
  3M-SDE likewise (see the notes: diffusers' second-difference weight differs from k-diffusion's);
* DPM-Solver++ SDE (``DPMSolverSDEScheduler``: Brownian-tree noise, which cannot be shared) on the
  exact eps of the 3-component mixture written out in PyTorch on both sides: energy distance of
  each to true samples (``ed_jaxdiff``, ``ed_peer``), with the null level in the notes.

Times are interleaved (in bursts of 5 calls at batch <= 64; ``no_grad``; torch's thread count per
row the faster of 1 and JAX's cores, as in ``peers``); diffusers' Python ``step()`` is part of its
cost, which is what a user pays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd
from benchmarks.common import interleaved, mlp_apply, mlp_init
from benchmarks.peers import best_threads, jax_cores, torch_mlp

TITLE = "diffusers schedulers vs jaxdiff samplers on the same chain (agreement, speed)"

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)
PATH = jd.discrete_path(jnp.asarray(BETAS, jnp.float32))
MEANS = np.array([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
STD = 0.4


def _timesteps(steps: int) -> np.ndarray:
    """diffusers' "linspace" spacing: ``round(linspace(0, T - 1, steps + 1))[::-1][:-1]``."""
    return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


def _grid(steps: int) -> jax.Array:
    return jnp.asarray((_timesteps(steps) + 1) / T, jnp.float32)


def _noises(key, steps: int, shape) -> np.ndarray:
    """The normal draws jaxdiff's driver feeds a stochastic sampler's steps (same key splits)."""
    step_keys = jax.random.split(jax.random.split(key, 4)[1], steps)
    return np.stack([np.asarray(jax.random.normal(k, shape)) for k in step_keys])


def _scheduler(name: str):
    from diffusers import (
        DPMSolverMultistepScheduler,
        DPMSolverSDEScheduler,
        UniPCMultistepScheduler,
    )

    common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    if name == "dpm-sde":
        return DPMSolverSDEScheduler(**common, prediction_type="epsilon", noise_sampler_seed=0)
    if name.startswith("dpm"):
        order = 3 if "3m" in name else 2
        algo = "sde-dpmsolver++" if "sde" in name else "dpmsolver++"
        return DPMSolverMultistepScheduler(
            **common, solver_order=order, algorithm_type=algo, prediction_type="sample"
        )
    if name.startswith("unipc"):
        order, variant = (2, "bh2") if name == "unipc-bh2-2" else (3, "bh1")
        # bh1 with a last step to sigma = 0 divides by B(h) = -h = -inf in diffusers (NaN): both
        # sides end at the smallest training time instead ("sigma_min"), without a denoising step
        final = "zero" if variant == "bh2" else "sigma_min"
        return UniPCMultistepScheduler(
            **common, solver_order=order, solver_type=variant, prediction_type="sample",
            final_sigmas_type=final,
        )  # fmt: skip
    raise ValueError(name)


def _diffusers_loop(sched, net, x, steps, noises=None):
    import torch

    if noises is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(timesteps=list(_timesteps(steps)))
    x = x * float(sched.init_noise_sigma)
    for i, k in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, k)
        # the model's time: jaxdiff's t = (k + 1) / T; for a VE-scaled scheduler the input's scale
        # gives alpha_bar = (inp / x)^2 of the (possibly fractional) step
        abar = float((inp[0, 0] / x[0, 0]) ** 2) if sched.init_noise_sigma > 1 else None
        out = net(inp, (float(k) + 1.0) / T if abar is None else abar)
        kw = {} if noises is None else {"variance_noise": torch.from_numpy(noises[i])}
        x = sched.step(out, k, x, **kw).prev_sample
    return x


def _torch_mixture_eps(sched):
    """The exact eps of the mixture on diffusers' chain, by hand in PyTorch, at discrete step k."""
    import torch

    means, logw = torch.as_tensor(MEANS, dtype=torch.float32), torch.log(torch.as_tensor(WEIGHTS))

    def eps(x, abar_t):  # x is the VP state x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        a = torch.tensor(abar_t, dtype=torch.float32).sqrt()
        s2 = 1.0 - a**2
        var = a**2 * STD**2 + s2  # each component: N(a mu, var I)
        d = x[:, None, :] - a * means[None]
        logp = logw[None] - 0.5 * (d**2).sum(-1) / var
        r = torch.softmax(logp, dim=1)[..., None]
        score = -(r * d / var).sum(1)
        return -s2.sqrt() * score

    del sched
    return eps


def _jaxdiff_mixture():
    data = jd.GaussianMixture.isotropic(jnp.asarray(MEANS), STD, jnp.asarray(WEIGHTS))
    return data, data.field(PATH, "eps")


def run(quick: bool = False) -> dict:
    import torch

    params = mlp_init(jax.random.key(0), dim=2, width=256)
    net = torch_mlp(params)
    field = jd.Field(mlp_apply, "x0", params)
    S = jd.samplers
    cases = {  # name -> (jaxdiff sampler, deterministic given the noise)
        "dpm-2m": (S.dpm_solver_pp(2), True),
        "dpm-3m": (S.dpm_solver_pp(3, exact_taylor=False), True),
        "dpm-2m-sde": (S.dpm_solver_pp(2, eta=1.0), True),
        "dpm-3m-sde": (S.dpm_solver_pp(3, eta=1.0, exact_taylor=False), True),
        "unipc-bh2-2": (S.unipc(2), True),
        "unipc-bh1-3": (S.unipc(3, variant="bh1"), True),
    }
    batches = [64] if quick else [1, 64, 4096]
    steps = 10
    rows = []
    key = jax.random.key(3)
    for name, (sampler, _) in cases.items():
        for batch in batches:
            x = jax.random.normal(jax.random.key(1), (batch, 2))
            x_t = torch.from_numpy(np.asarray(x).copy())
            noises = _noises(key, steps, x.shape) if sampler.stochastic else None
            sched = _scheduler(name)
            ts = _grid(steps)
            denoise = sched.config.final_sigmas_type == "zero"
            if not denoise:  # diffusers' "sigma_min": the last step ends at t = 1 / T
                ts = jnp.concatenate([ts, jnp.full((1,), 1.0 / T, ts.dtype)])

            @jax.jit
            def ours(x, sampler=sampler, ts=ts, denoise=denoise):
                return jd.sample(key, PATH, field, x_init=x, sampler=sampler, ts=ts,
                                 denoise=denoise).x  # fmt: skip

            def peer(sched=sched, x_t=x_t, noises=noises):
                with torch.no_grad():
                    return _diffusers_loop(sched, net, x_t, steps, noises)

            threads, _ = best_threads(peer, jax_cores())
            res = interleaved(
                {"jaxdiff": lambda x=x, f=ours: f(x), "peer": peer},
                repeats=3 if quick else 10,
                burst=5 if batch <= 64 else 1,
            )
            diff = float(np.max(np.abs(np.asarray(ours(x)) - peer().numpy())))
            nfe = sampler.nfe(ts.shape[0] - 1) + int(denoise)  # diffusers calls the net as often
            rows.append({
                "sampler": name, "batch": batch, "nfe": nfe,
                "jaxdiff_ms": 1e3 * res["jaxdiff"]["median_s"], "peer_ms": 1e3 * res["peer"]["median_s"],
                "speedup": res["peer"]["median_s"] / res["jaxdiff"]["median_s"],
                "jaxdiff_min_ms": 1e3 * res["jaxdiff"]["min_s"], "peer_min_ms": 1e3 * res["peer"]["min_s"],
                "torch_threads": threads,
                "max_abs_diff": diff, "scale": float(np.max(np.abs(np.asarray(ours(x))))),
                "ed_jaxdiff": None, "ed_peer": None,
            })  # fmt: skip
    # DPMSolverSDEScheduler against dpm_solver_sde in distribution, on the exact mixture
    n = 2000 if quick else 10000
    data, mix_field = _jaxdiff_mixture()
    true = data.sample(jax.random.key(123), n)
    floor = float(jd.energy_distance(data.sample(jax.random.key(7), n), true))
    x = jax.random.normal(jax.random.key(1), (n, 2))
    ours = jax.jit(lambda k: jd.sample(k, PATH, mix_field, x_init=x, sampler=S.dpm_solver_sde(),
                                       steps=steps).x)  # fmt: skip
    sched = _scheduler("dpm-sde")
    eps = _torch_mixture_eps(sched)
    with torch.no_grad():
        peer_x = _diffusers_loop(sched, eps, torch.from_numpy(np.asarray(x).copy()), steps)
    rows.append({
        "sampler": "dpm-sde (2S)", "batch": n, "nfe": 2 * steps,
        "jaxdiff_ms": None, "peer_ms": None, "speedup": None, "max_abs_diff": None, "scale": None,
        "ed_jaxdiff": float(jd.energy_distance(ours(jax.random.key(0)), true)),
        "ed_peer": float(jd.energy_distance(jnp.asarray(peer_x.numpy()), true)),
    })  # fmt: skip
    notes = (
        f"Deterministic rows: max_abs_diff of the final samples (float32; scale is the samples' "
        f"largest magnitude). 3M-SDE: diffusers weighs the second difference by "
        f"((1 - e^(-2h) - 2h) / (4 h^2) - 1/2), k-diffusion's dpmpp_3m_sde by ... + 1/2 (= phi3 at "
        f"h_eta = 2h, jaxdiff's exact_taylor=False): the term is O(1) instead of O(h) in diffusers, "
        f"so the two differ there. DPM-Solver SDE row: energy distances to {n} true samples of the "
        f"mixture; two true sets give {floor:.1e} (sd about {5.2e-4 * 1e4 / n:.1e}). "
        f"diffusers' DPMSolverSDEScheduler has its own sigma grid (interpolated in log-sigma), so "
        f"only the distributions are compared."
    )
    return {"rows": rows, "notes": notes}
