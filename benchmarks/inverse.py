"""Inverse problems: posterior samplers against the exact posterior of a Gaussian-mixture prior.

Each problem is a prior (a Gaussian mixture, whose exact field on the VP path the oracle gives)
and a linear measurement ``y = A x0 + sigma_y n``; ``GaussianMixture.posterior`` is the exact
posterior (a mixture). Every method draws ``n`` samples at a stated NFE (network evaluations;
PiGDM, TMPD and DPS add vjps: TMPD ``m`` of them per evaluation, DPS and PiGDM one) and is scored
against ``n`` exact posterior samples:

- ``ed``: the energy distance (``ed_floor``: between two exact sets of ``n``, the sampling noise);
- ``w_err``: ``sum_k |mean_x p(k | x) - w_k|``, the error of the posterior's component weights
  read off by the exact posterior responsibilities (floor: that of exact samples, ``~0.01``);
- ``mean_err``: ``||mean(x) - E[x0 | y]||`` (exact), ``cmean_err``: the largest distance between
  a component's responsibility-weighted mean in the method's samples and in exact samples, over
  components of posterior weight > 0.05;
- ``us_per_sample``: wall time of one jitted batch of ``n`` divided by ``n`` (compile excluded,
  reported as ``compile_s``). Timings on shared or loaded cores are meaningless.

Methods (``jaxdiff.inverse``): ``oracle`` samples the exact posterior's own field (the floor of
the discretisation); ``dps`` the DPS field (``jd.dps``, scale 1); ``dps_chung`` Chung et al.'s
DPS sampler (``jd.dps_sampler``, ``zeta = 1``); ``pigdm`` (``data_var`` = the prior's average
variance ``tr Cov / d``); ``tmpd``; for noiseless masks ``project`` (replacement, ``jd.project``
as a hook) and ``repaint`` (``jd.repaint(ddim, project, 5)``: at NFE ``k`` it takes ``k / 5``
steps). All field methods and the hooks use DDIM with ``eta = 1`` (DDPM's ancestral step) on the
VP path from ``t = 1`` to ``0``.

Problems: ``2d`` the 3-component 2-D mixture of ``tests/test_inverse_operators.py`` with
``A = [1, 0.5]``, ``y = 0.5``, ``sigma_y = 0.3`` (the likelihood overturns the prior's weights,
0.2 -> 0.85 for the third component); ``gauss`` a single correlated 2-D Gaussian with
``A = [1, 1]``, ``y = 2``, ``sigma_y = 0.3`` (TMPD exact in theory) and ``gauss_iso`` an isotropic
one (PiGDM exact too); ``2d_mask`` the mixture with ``x[0] = 1.2`` observed without noise;
``16d`` 4 components in 16-D, 2 random measurements, ``sigma_y = 0.2``, ``y`` between two
components; ``64d`` 8 components in 64-D, 8 random measurements, ``sigma_y = 0.2``;
``16d_mask`` half the coordinates of the 16-D mixture observed without noise. The exact
posterior of a noiseless problem is computed with ``sigma_y = 1e-3``.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import benchmarks.common  # noqa: F401  (EQX_ON_ERROR=nan before jaxdiff imports equinox)
import jaxdiff as jd

TITLE = "Inverse problems: posterior samplers vs the exact posterior (quality vs NFE, time)"
PATH = jd.vp_path()
REPEATS = 5  # RePaint's resampling per step
SY_NOISELESS = 1e-3  # the exact posterior of a noiseless measurement is taken at this sigma_y


class Problem(NamedTuple):
    name: str
    prior: jd.GaussianMixture
    op: jd.LinearOperator
    y: jax.Array
    sigma_y: float


def mixture_2d() -> jd.GaussianMixture:
    means = jnp.array([[-2.0, 1.0], [1.5, 2.0], [1.0, -2.0]])
    angles, scales = (0.3, 1.2, -0.5), ((0.5, 0.1), (0.4, 0.15), (0.3, 0.2))
    covs = []
    for angle, (u, v) in zip(angles, scales, strict=True):
        c, s = np.cos(angle), np.sin(angle)
        rot = np.array([[c, -s], [s, c]])
        covs.append(rot @ np.diag([u, v]) @ rot.T)
    return jd.GaussianMixture(jnp.array([0.5, 0.3, 0.2]), means, jnp.asarray(np.stack(covs)))


def random_mixture(key, d: int, k: int) -> jd.GaussianMixture:
    ks = jax.random.split(key, 3)
    means = jax.random.normal(ks[0], (k, d))
    q = jnp.linalg.qr(jax.random.normal(ks[1], (k, d, d)))[0]
    lam = jax.random.uniform(ks[2], (k, d), minval=0.05, maxval=0.5)
    covs = jnp.einsum("kij,kj,klj->kil", q, lam, q)
    return jd.GaussianMixture(
        jnp.full((k,), 1.0 / k), means, 0.5 * (covs + covs.transpose(0, 2, 1))
    )


def problems(names) -> list[Problem]:
    out = []
    for name in names:
        if name == "2d":
            p = Problem(name, mixture_2d(), jd.matrix_operator(jnp.array([[1.0, 0.5]])), None, 0.3)
            out.append(p._replace(y=jnp.array([0.5])))
        elif name in ("gauss", "gauss_iso"):
            cov = jnp.array([[1.0, 0.6], [0.6, 0.5]]) if name == "gauss" else 0.7 * jnp.eye(2)
            prior = jd.GaussianMixture(jnp.ones(1), jnp.array([[1.0, -0.5]]), cov[None])
            op = jd.matrix_operator(jnp.array([[1.0, 1.0]]))
            out.append(Problem(name, prior, op, jnp.array([2.0]), 0.3))
        elif name == "2d_mask":
            op = jd.mask_operator(np.array([True, False]))
            out.append(Problem(name, mixture_2d(), op, jnp.array([1.2]), 0.0))
        elif name in ("16d", "64d"):
            d, k, m = (16, 4, 2) if name == "16d" else (64, 8, 8)
            ks = jax.random.split(jax.random.key(0 if d == 16 else 64), 2)
            prior = random_mixture(ks[0], d, k)
            op = jd.matrix_operator(jax.random.normal(ks[1], (m, d)) / 4.0)
            y = op.forward((prior.means[0] + prior.means[1]) / 2)  # between two components
            out.append(Problem(name, prior, op, y, 0.2))
        elif name == "16d_mask":
            prior = random_mixture(jax.random.key(0), 16, 4)
            mask = np.arange(16) < 8
            op = jd.mask_operator(mask)
            y = op.forward((prior.means[0] + prior.means[1]) / 2)
            out.append(Problem(name, prior, op, y, 0.0))
        else:
            raise ValueError(f"unknown problem {name!r}")
    return out


def methods_for(problem: Problem) -> list[str]:
    if problem.sigma_y == 0.0:
        return ["oracle", "project", "repaint", "dps_chung", "pigdm", "tmpd"]
    return ["oracle", "dps", "dps_chung", "pigdm", "tmpd"]


def exact_posterior(problem: Problem) -> jd.GaussianMixture:
    sy = problem.sigma_y or SY_NOISELESS
    return problem.prior.posterior(problem.op, problem.y, sy)


def make_draw(problem: Problem, method: str, nfe: int, n: int):
    """A jitted ``key -> (samples, nfe)`` for one method at (about) ``nfe`` evaluations."""
    prior, d = problem.prior, problem.prior.dim
    meas = jd.Measurement(problem.op, problem.y, problem.sigma_y)
    field = prior.field(PATH, "eps")
    ddim = jd.samplers.ddim(1.0)
    sampler, hook, steps = ddim, None, nfe
    if method == "oracle":
        field = exact_posterior(problem).field(PATH, "eps")
    elif method == "dps":
        field = jd.dps(field, PATH, meas)
    elif method == "pigdm":
        data_var = float(jnp.trace(prior.covs.mean(0) + jnp.cov(prior.means.T, bias=True)) / d)
        field = jd.pigdm(field, PATH, meas, data_var=data_var)
    elif method == "tmpd":
        field = jd.tmpd(field, PATH, meas)
    elif method == "dps_chung":
        sampler = jd.dps_sampler(meas, 1.0)
    elif method == "project":
        hook = jd.project(PATH, meas)
    elif method == "repaint":
        sampler, steps = jd.repaint(ddim, jd.project(PATH, meas), REPEATS), max(nfe // REPEATS, 1)
    else:
        raise ValueError(method)

    @jax.jit
    def draw(key):
        sol = jd.sample(key, PATH, field, (n, d), sampler=sampler, steps=steps, hook=hook)
        return sol.x, sol.nfe

    return draw


def scores(x, post: jd.GaussianMixture, ref) -> dict:
    r_x, r_ref = post.responsibilities(x), post.responsibilities(ref)
    w_err = float(jnp.sum(jnp.abs(r_x.mean(0) - post.weights)))
    exact_mean = jnp.sum(post.weights[:, None] * post.means, 0)
    mean_err = float(jnp.linalg.norm(x.mean(0) - exact_mean))

    def comp_means(r, z):
        return (r.T @ z) / jnp.maximum(r.sum(0)[:, None], 1e-12)

    big = post.weights > 0.05
    gaps = jnp.linalg.norm(comp_means(r_x, x) - comp_means(r_ref, ref), axis=1)
    cmean_err = float(jnp.max(jnp.where(big, gaps, 0.0)))
    return {"w_err": w_err, "mean_err": mean_err, "cmean_err": cmean_err}


def measure(names, nfes, n: int, repeats: int = 3) -> list[dict]:
    rows = []
    ed = jax.jit(jd.energy_distance)
    for problem in problems(names):
        post = exact_posterior(problem)
        ref, ref2 = (post.sample(jax.random.key(k), n) for k in (100, 101))
        floor = float(ed(ref2, ref))
        for method in methods_for(problem):
            for nfe in nfes:
                draw = make_draw(problem, method, nfe, n)
                key = jax.random.key(7)
                t0 = time.perf_counter()
                x, used = jax.block_until_ready(draw(key))
                compile_s = time.perf_counter() - t0
                times = []
                for r in range(repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(draw(jax.random.key(8 + r)))
                    times.append(time.perf_counter() - t0)
                row = {
                    "problem": problem.name,
                    "method": method,
                    "nfe": int(used),
                    "ed": float(ed(x, ref)),
                    "ed_floor": floor,
                    **scores(x, post, ref),
                    "us_per_sample": 1e6 * float(np.median(times)) / n,
                    "compile_s": compile_s,
                }
                rows.append(row)
                if os.environ.get("JAXDIFF_BENCH_VERBOSE"):
                    print(row, flush=True)
    return rows


ALL = ["gauss", "gauss_iso", "2d", "2d_mask", "16d", "64d", "16d_mask"]


def run(quick: bool) -> dict:
    if quick:
        rows = measure(["gauss", "2d", "2d_mask"], [10, 50], n=1000, repeats=2)
    else:
        # n = 2000 keeps the ED's noise near 0.001; TMPD in 64-D (8 vjps and a batched (8, 8)
        # eigh per sample and evaluation) is the slowest row
        rows = measure(ALL, [10, 20, 50, 100, 200], n=2000, repeats=2)
    notes = __doc__.split("\n\n", 1)[1]
    return {"rows": rows, "notes": notes}
