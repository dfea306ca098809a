"""Samplers as values: ``jd.sample(key, path, field, shape, sampler=jd.samplers.ddim(), steps=50)``.

Each factory returns a :class:`Sampler` with a pure ``init(path, field, x, ts)`` and
``step(key, path, field, state, t, s)``; ``jaxdiff.sample`` drives them (grid, start, keys, checks,
one ``lax.scan``, evaluation count, denoising step), and the two functions run in your own loop too.

================================  ================================================================
factory                           what it integrates
================================  ================================================================
``ode(solver)``                   probability-flow ODE with any diffrax solver (Euler, Heun, Tsit5,
                                  ...; ``rtol``/``atol`` for adaptive steps)
``sde(solver, eta=)``             the reverse-SDE family, ``eta`` a number or a function of ``t``
``ancestral(var_weight=)``        DDPM's ancestral sampler (Ho et al. 2020)
``ddim(eta)``                     DDIM (Song et al. 2021); k-diffusion's ``euler_ancestral``
``pc(predictor, snr=, ...)``      predictor-corrector with Langevin correctors (Song et al. 2021)
``annealed_langevin(...)``        NCSN's annealed Langevin dynamics (Song & Ermon 2019)
``edm_heun(churn=, ...)``         EDM's Heun sampler with churn (Karras et al. 2022)
``dpm_solver_pp(order, eta=)``    DPM-Solver++ 2M / 3M (Lu et al. 2022b), and 2M-SDE / 3M-SDE
``dpm_solver_2s(eta=)``           DPM-Solver++(2S) ancestral (k-diffusion's ``dpmpp_2s_ancestral``)
``dpm_solver_sde(eta=, r=)``      DPM-Solver++ SDE (k-diffusion's ``dpmpp_sde``; diffusers'
                                  ``DPMSolverSDEScheduler``)
``unipc(order, variant=)``        UniPC, bh1 / bh2, orders 1-3 (Zhao et al. 2023)
``meanflow()``                    MeanFlow's jumps ``x_s = x_t - (t - s) u(x_t, t, s)`` (Geng et al.
                                  2025); 1 step by default, to ``t = 0``
``consistency()``                 multistep consistency sampling (Song et al. 2023); 1 step by
                                  default, to ``t = 0``
``interpolant_sde(diffusion)``    stochastic interpolants' SDE ``dx = [b - eps_t s] dt + sqrt(2
                                  eps_t) dW`` (Albergo, Boffi & Vanden-Eijnden 2023), on a
                                  ``StochasticInterpolant`` or a ``GaussianPath``
================================  ================================================================

``name=``: a keyword-only argument (``dpm_solver_pp(2, eta=1.0)``).
"""

from jaxdiff.samplers.base import Sampler, between
from jaxdiff.samplers.continuous import ode, sde
from jaxdiff.samplers.discrete import ancestral, ddim
from jaxdiff.samplers.dpm import dpm_solver_pp
from jaxdiff.samplers.edm import edm_heun
from jaxdiff.samplers.fewstep import consistency, meanflow
from jaxdiff.samplers.interpolant import interpolant_sde
from jaxdiff.samplers.langevin import (
    ancestral_predictor,
    annealed_langevin,
    euler_maruyama_predictor,
    pc,
    reverse_diffusion_predictor,
)
from jaxdiff.samplers.singlestep import dpm_solver_2s, dpm_solver_sde
from jaxdiff.samplers.unipc import unipc

__all__ = [
    "Sampler",
    "between",
    "ode",
    "sde",
    "ancestral",
    "ddim",
    "pc",
    "annealed_langevin",
    "edm_heun",
    "dpm_solver_pp",
    "dpm_solver_2s",
    "dpm_solver_sde",
    "unipc",
    "meanflow",
    "consistency",
    "interpolant_sde",
    "euler_maruyama_predictor",
    "reverse_diffusion_predictor",
    "ancestral_predictor",
]
