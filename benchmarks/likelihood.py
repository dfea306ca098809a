"""PF-ODE log-likelihood: time and error against the closed-form log-density of a mixture.

``jd.log_likelihood`` (adaptive Tsit5) on the 2-D mixture of ``tests/test_likelihood.py`` under the
VP and linear paths, exact divergence against Hutchinson (Gaussian probes, 1 and 4 per sample).
Error: mean absolute error in nats against ``GaussianMixture.marginal_log_prob`` at ``t = 1e-3``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxdiff as jd
from benchmarks.common import time_jitted

TITLE = "Likelihood: PF-ODE log p(x) vs closed form, exact vs Hutchinson divergence"

MIX = jd.GaussianMixture.isotropic(jnp.array([[1.5, 0.0], [-1.0, 1.0]]), std=0.5)
T0 = 1e-3


def run(quick: bool = False) -> dict:
    n = 256 if quick else 2048
    x = MIX.sample(jax.random.key(0), n)
    rows = []
    for pname, path, target in (
        ("vp", jd.vp_path(), "eps"),
        ("linear", jd.linear_path(), "velocity"),
    ):
        exact = MIX.marginal_log_prob(path, x, T0)
        field = MIX.field(path, target)
        for div, probes in (("exact", None), ("hutchinson x1", 1), ("hutchinson x4", 4)):
            for rtol in (1e-5,) if quick else (1e-3, 1e-5):
                fn = jax.jit(lambda x, k, p=probes, r=rtol, pa=path, fi=field: jd.log_likelihood(
                    pa, fi, x, key=k, num_probes=p, t_start=T0, rtol=r, atol=r))  # fmt: skip
                timing = time_jitted(fn, x, jax.random.key(1), repeats=3 if quick else 10)
                out = fn(x, jax.random.key(1))
                err = out.logp - exact
                rows.append({
                    "path": pname, "divergence": div, "rtol": rtol,
                    "mae_nats": float(jnp.mean(jnp.abs(err))), "bias_nats": float(jnp.mean(err)),
                    "nfe": int(out.nfe), "median_s": timing["median_s"],
                    "compile_s": timing["compile_s"], "batch": n,
                })  # fmt: skip
    notes = (
        "float32. The prior N(0, sigma_1^2 I) is exact for the linear path (alpha_1 = 0) and off by "
        "O(alpha_1) for VP. Hutchinson's error is its variance (1 probe per sample, drawn once per "
        "solve); its bias is within the standard error (tests/test_likelihood.py)."
    )
    return {"rows": rows, "notes": notes, "plots": []}
