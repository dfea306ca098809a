"""Predictor-corrector, annealed Langevin, EDM and DPM-Solver++: the mixture recovered (energy
distance against true samples, bound from the null distribution of test_sample), convergence
orders on a Gaussian, and classifier-free / classifier guidance with these samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from tests.test_sample import DATA, ED_BOUND, MEANS, WEIGHTS, N

S = jd.samplers

# ED_BOUND = 5e-3: the null ED of two independent sets of N = 10,000 true points has sd 5.2e-4
# and max 2.0e-3 over 30 seeds (see test_sample.py); a 0.05 weight error gives ED >= 0.02.


@pytest.fixture(scope="module")
def true_samples():
    return DATA.sample(jax.random.key(123), N)


def _check(x, true_samples):
    assert float(jd.energy_distance(x, true_samples)) < ED_BOUND


def test_predictor_corrector_and_annealed_langevin_recover_the_mixture(true_samples):
    ve = jd.ve_path(0.01, 20.0)
    vp = jd.vp_path()

    @jax.jit
    def run(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        pc_ve = jd.sample(k1, ve, DATA.field(ve, "score"), (N, 2), sampler=S.pc(snr=0.16))
        pc_vp = jd.sample(k2, vp, DATA.field(vp, "eps"), (N, 2),
                          sampler=S.pc(S.ancestral_predictor, snr=0.1))  # fmt: skip
        # Euler-Maruyama predictor: its drift was f x - 3/2 g^2 score (ED 0.058 on VP, 0.060 VE)
        pc_em = jd.sample(k3, vp, DATA.field(vp, "eps"), (N, 2), steps=200,
                          sampler=S.pc(S.euler_maruyama_predictor, corrector_steps=0))  # fmt: skip
        ald = jd.sample(k4, ve, DATA.field(ve, "x0"), (N, 2), steps=20,
                        sampler=S.annealed_langevin(steps_per_level=100, step_size=5e-5))  # fmt: skip
        return pc_ve, pc_vp, pc_em, ald

    sols = run(jax.random.key(0))
    assert [int(s.nfe) for s in sols] == [201, 201, 201, 2001]
    eds = [float(jd.energy_distance(s.x, true_samples)) for s in sols]
    assert max(eds) < ED_BOUND, eds


CASES = [  # (path, target): few-step samplers on VE and the linear flow path (on VP with the eps
    # field, these four samplers at these steps are in test_samplers' conformance suite)
    ("ve", "x0"),
    ("linear", "velocity"),
]


@pytest.mark.parametrize("name, target", CASES)
def test_few_step_samplers_recover_the_mixture(name, target, true_samples):
    path = {"ve": jd.ve_path(0.01, 50.0), "linear": jd.linear_path()}[name]
    field = DATA.field(path, target)

    @jax.jit
    def run(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        return (
            jd.sample(k1, path, field, (N, 2), sampler=S.edm_heun(), steps=17),
            jd.sample(k2, path, field, (N, 2), sampler=S.edm_heun(churn=10.0), steps=24),
            jd.sample(k3, path, field, (N, 2), sampler=S.dpm_solver_pp(2), steps=19),
            jd.sample(k4, path, field, (N, 2), sampler=S.dpm_solver_pp(3), steps=19),
        )

    sols = run(jax.random.key(1))
    assert [int(s.nfe) for s in sols] == [35, 49, 20, 20]  # the same eagerly: a static count
    for sol in sols:
        _check(sol.x, true_samples)


def test_convergence_orders_on_a_gaussian(x64):
    """RMS error against the exact PF-ODE flow; fitted slopes in log2 per halving."""
    mu, var = jnp.array([[1.0, -0.5]]), jnp.array([[0.25, 0.04]])
    data = jd.GaussianMixture(jnp.ones(1), mu, jnp.diag(var[0])[None])
    path = jd.vp_path()
    field = data.field(path, "eps")
    x1 = jax.random.normal(jax.random.key(0), (256, 2), jnp.float64)
    # The PF-ODE of Gaussian data with a diagonal covariance moves each coordinate affinely, by
    # the ratio of the marginal's standard deviations: the exact reference (a Tsit5 solve at
    # rtol = atol = 1e-12 agreed to 2e-12, and cost a 5 s compile).
    std = lambda t: jnp.sqrt(path.alpha(t) ** 2 * var + path.sigma(t) ** 2)  # noqa: E731
    ref = path.alpha(1e-3) * mu + std(1e-3) / std(1.0) * (x1 - path.alpha(1.0) * mu)

    # UniPC: the corrector raises the order by one (Zhao et al. 2023): UniPC-1 is second order,
    # UniPC-2 third (measured slopes 1.94 and 2.87 between 20 and 40 steps); DPM-Solver++(2S)
    # without noise is second order (1.93); Heun second order. Order 1 (DDIM): test_discrete.py
    cases = ((S.dpm_solver_pp(2, lower_order_final=False), 2.0),
             (S.dpm_solver_pp(3, lower_order_final=False), 3.0),
             (S.edm_heun(), 2.0),
             (S.unipc(1, lower_order_final=False), 2.0),
             (S.unipc(2, lower_order_final=False), 3.0),
             (S.dpm_solver_2s(eta=0.0), 2.0))  # fmt: skip

    @jax.jit  # the twelve solves in one program: one compile instead of twelve eager ones
    def errors(x1, ref):
        def err(sampler, steps):
            x = jd.sample(None, path, field, x_init=x1, sampler=sampler, steps=steps,
                          denoise=False).x  # fmt: skip
            return jnp.sqrt(jnp.mean((x - ref) ** 2))

        return jnp.array([[err(sampler, s) for s in (20, 40)] for sampler, _ in cases])

    for (sampler, expect), e in zip(cases, np.asarray(errors(x1, ref)), strict=True):
        assert np.log2(e[0] / e[1]) > expect - 0.3, (sampler.name, e)


def test_guidance_with_few_step_samplers(true_samples):
    """The mixture as a class-conditional model: label k is component k. Classifier guidance with
    the exact log p(k | x_t) at scale 1 is the conditional score (Bayes); CFG at scale 1 samples
    the class; CFG is the same in every target."""
    path = jd.vp_path()
    comps = [jd.GaussianMixture.isotropic(MEANS[k : k + 1], 0.4) for k in range(3)]

    def conditional(x, t, labels):  # eps of component `label`; label 3 (null) is the mixture
        preds = jnp.stack([c.predict(path, x, t, "eps") for c in comps + [DATA]])
        return jnp.take_along_axis(preds, labels[None, :, None], axis=0)[0]

    labels = jnp.zeros((N,), jnp.int32)
    guided = jd.classifier_free_guidance(jd.Field(conditional, "eps"), labels, 3, scale=1.0)
    sol = jd.sample(jax.random.key(0), path, guided, (N, 2), sampler=S.dpm_solver_pp(), steps=19)
    assert float(jnp.mean(jnp.linalg.norm(sol.x - MEANS[0][None], axis=-1) < 2.0)) > 0.999

    def log_p_label0(x, t):  # exact log p(label 0 | x_t)
        logs = jnp.stack(
            [jnp.log(WEIGHTS[k]) + comps[k].marginal_log_prob(path, x, t) for k in range(3)]
        )
        return logs[0] - jax.nn.logsumexp(logs, axis=0)

    x = jax.random.normal(jax.random.key(1), (64, 2)) * 2.0
    cg = jd.classifier_guidance(DATA.field(path, "eps"), path, log_p_label0, 1.0)
    np.testing.assert_allclose(cg(x, 0.4), comps[0].predict(path, x, 0.4, "eps"), atol=2e-4)


def test_annealed_langevin_refuses_a_step_size_that_diverges():
    """NCSN's step a_s = step_size sigma_s^2 / sigma_L^2 grows with sigma_s^2, which VE's p_s
    does too; on the linear path p_s stays of unit variance, and the default 2e-5 with
    sigma_L = 1e-3 gave a_1 = 20 > 4: the chain blew up to inf, raised only from inside the
    field. A step_size just under the bound 4 (alpha_s^2 + sigma_s^2) sigma_L^2 / sigma_s^2
    samples; at or above it the error names the bound, also for a grid traced under jit."""
    path = jd.linear_path()
    field = DATA.field(path, "velocity")
    with pytest.raises(ValueError, match=r"step_size < 4e-06 \(sigma_L = 0.001\)"):
        jd.sample(jax.random.key(0), path, field, (8, 2), sampler=S.annealed_langevin(), steps=30)
    ts = jnp.linspace(1.0, 1e-3, 31)
    ok = jd.sample(jax.random.key(0), path, field, (256, 2), ts=ts,
                   sampler=S.annealed_langevin(steps_per_level=20, step_size=3.9e-6))  # fmt: skip
    assert bool(jnp.all(jnp.isfinite(ok.x))) and float(jnp.abs(ok.x[:, 0]).mean()) > 1.5
    run = jax.jit(lambda ts: jd.sample(jax.random.key(0), path, field, (8, 2), ts=ts,
                                       sampler=S.annealed_langevin(step_size=4.1e-6)).x)  # fmt: skip
    with pytest.raises(Exception, match="step_size is too large for this grid"):
        jax.block_until_ready(run(ts))
    # NCSN's own ladder and default keep working (VE, sigma_L = 0.01)
    ve = jd.ve_path(0.01, 50.0)
    x = jd.sample(jax.random.key(1), ve, DATA.field(ve, "score"), (8, 2), steps=10,
                  sampler=S.annealed_langevin(steps_per_level=5)).x  # fmt: skip
    assert bool(jnp.all(jnp.isfinite(x)))


def test_edm_churn_is_divided_by_the_number_of_steps():
    """EDM's gamma = min(S_churn / N, sqrt(2) - 1) with N the steps including the last one to
    sigma = 0 (NVlabs' EDM, k-diffusion): 18 on EDM's 18-level grid, not 17."""
    path = jd.ve_path(0.002, 80.0)
    x = jnp.zeros((4, 2))
    ts = jnp.concatenate([jd.karras_grid(path, 17), jnp.zeros(1)])  # 18 levels + the final 0
    for churn, expected in ((9.0, 0.5 * 1.0), (1.8, 0.1), (40.0, np.sqrt(2.0) - 1.0)):
        state = S.edm_heun(churn=churn).init(path, DATA.field(path, "x0"), x, ts)
        assert float(state.gamma) == pytest.approx(min(expected, np.sqrt(2) - 1), rel=1e-6)
