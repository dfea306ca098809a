"""Stochastic interpolants: conditional fields by autodiff, the Gaussian-to-Gaussian closed form
(marginals, the loss at the exact fields, the ODE and SDE samplers with the exact fields), and
the minibatch-OT coupling of two Gaussians against the closed-form OT map."""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff._schedule_fns import Affine as _Affine
from jaxdiff.interpolants import StochasticInterpolant

M0, S0 = jnp.array([1.0, -0.5]), jnp.array([[0.5, 0.2], [0.2, 0.3]])  # data at t = 0
M1, S1 = jnp.array([-1.0, 2.0]), jnp.array([[1.2, -0.3], [-0.3, 0.8]])  # source at t = 1


def trig_interpolant():
    """a = cos(pi t / 2), b = sin(pi t / 2), gamma = t (1 - t): a second, curved interpolant."""
    return StochasticInterpolant(
        lambda t: jnp.cos(0.5 * jnp.pi * t),
        lambda t: jnp.sin(0.5 * jnp.pi * t),
        lambda t: t * (1 - t),
    )


def _gauss(key, m, s, n):
    return m[None] + jax.random.normal(key, (n, 2), m.dtype) @ jnp.linalg.cholesky(s).T


def _inv2(a):
    """Inverse of a stack of 2x2 matrices by the adjugate (no batched LAPACK: see design note)."""
    det = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
    adj = jnp.stack(
        [
            jnp.stack([a[..., 1, 1], -a[..., 0, 1]], -1),
            jnp.stack([-a[..., 1, 0], a[..., 0, 0]], -1),
        ],
        -2,
    )
    return adj / det[..., None, None]


def gaussian_oracle(si, cross=None):
    """Exact moments and fields of x_t = a x0 + b x1 + g z, x0 ~ N(M0, S0), x1 ~ N(M1, S1),
    Cov(x0, x1) = cross (0: independent). Everything jointly Gaussian, so
    E[Y | x] = E[Y] + Cov(Y, x_t) Cov(x_t)^{-1} (x - E[x_t]). Times: a scalar or (n,)."""
    cross = jnp.zeros((2, 2)) if cross is None else cross
    eye = jnp.eye(2)

    def coefs(t):
        t = jnp.asarray(t)
        lift = lambda m: m.reshape((1,) * t.ndim + m.shape)  # noqa: E731
        cs = [f(t)[..., None, None] for f in (si.a, si.b, si.gamma, si.d_a, si.d_b, si.d_gamma)]
        return cs, lift

    def moments(t):
        (a, b, g, *_), lift = coefs(t)
        mean = a[..., 0] * lift(M0) + b[..., 0] * lift(M1)
        cov = (
            a * a * lift(S0) + b * b * lift(S1) + a * b * lift(cross + cross.T) + g * g * lift(eye)
        )
        return mean, cov

    def velocity(x, t):
        (a, b, g, da, db, dg), lift = coefs(t)
        mean, cov = moments(t)
        cyx = (
            da * a * lift(S0)
            + db * b * lift(S1)
            + da * b * lift(cross)
            + db * a * lift(cross.T)
            + dg * g * lift(eye)
        )
        gain = cyx @ _inv2(cov)
        return (
            da[..., 0] * lift(M0) + db[..., 0] * lift(M1) + jnp.einsum("nij,nj->ni", gain, x - mean)
        )

    def noise(x, t):
        (_, _, g, *_), _ = coefs(t)
        mean, cov = moments(t)
        return g[..., 0] * jnp.einsum("nij,nj->ni", _inv2(cov), x - mean)

    return moments, velocity, noise


@pytest.mark.parametrize("make", [lambda: jd.brownian_bridge(0.7), trig_interpolant])
def test_conditional_fields_are_derivatives_of_the_interpolant(make, x64):
    si = make()
    k = jax.random.split(jax.random.key(0), 3)
    x0, x1, z = (jax.random.normal(kk, (5, 2)) for kk in k)
    t = jnp.array([0.05, 0.3, 0.5, 0.71, 0.95])
    _, dxdt = jax.jvp(lambda t: si.interpolate(x0, x1, z, t), (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(si.conditional_velocity(x0, x1, z, t), dxdt, rtol=1e-12)
    # score = grad_x log N(x; a x0 + b x1, gamma^2 I), by autodiff of the log-density
    x = si.interpolate(x0, x1, z, t)

    def logp(x):
        mean = si.interpolate(x0, x1, jnp.zeros_like(x), t)
        return jnp.sum(-0.5 * jnp.square(x - mean) / si.gamma(t)[:, None] ** 2)

    np.testing.assert_allclose(si.conditional_score(x, x0, x1, t), jax.grad(logp)(x), rtol=1e-10)
    np.testing.assert_allclose(
        si.conditional_score(x, x0, x1, t), -z / si.gamma(t)[:, None], rtol=1e-10
    )


def test_brownian_bridge_marginal_matches_the_closed_form():
    # x_t = (1 - t) x0 + t x1 + s sqrt(t(1 - t)) z ~ N((1-t) M0 + t M1, (1-t)^2 S0 + t^2 S1 + s^2
    # t(1-t) I). 200,000 samples: SE of a mean <= sqrt(1.2 / 2e5) = 0.0025, of a covariance entry
    # <= sqrt(2) 1.2 / sqrt(2e5) = 0.004; tolerance 5 SE.
    si = jd.brownian_bridge(0.8)
    n, t = 200_000, 0.3
    k0, k1, kz = jax.random.split(jax.random.key(1), 3)
    x_t, _ = si.sample(kz, _gauss(k0, M0, S0, n), _gauss(k1, M1, S1, n), t)
    mean, cov = gaussian_oracle(si)[0](t)
    expected_cov = 0.49 * S0 + 0.09 * S1 + 0.64 * 0.21 * jnp.eye(2)
    np.testing.assert_allclose(cov, expected_cov, rtol=1e-6)
    np.testing.assert_allclose(x_t.mean(0), mean, atol=5 * 0.0025)
    np.testing.assert_allclose(jnp.cov(x_t.T), cov, atol=5 * 0.004)


@pytest.mark.parametrize("target", ["velocity", "eps", "score"])
def test_loss_of_the_exact_field_is_the_conditional_variance(target, x64):
    # At fixed t the loss of the posterior mean is tr Cov(Y | x_t) / d, Y the regression target:
    # Cov(Y) - Cov(Y, x_t) Cov(x_t)^{-1} Cov(x_t, Y). 100,000 pairs: relative SE ~ 0.5%.
    si, t0 = jd.brownian_bridge(0.6), 0.4
    moments, velocity, noise = gaussian_oracle(si)
    a, b, g = si.a(t0), si.b(t0), si.gamma(t0)
    da, db, dg = si.d_a(t0), si.d_b(t0), si.d_gamma(t0)
    _, cov = moments(t0)
    eye = jnp.eye(2)
    if target == "velocity":
        fn = velocity
        cyy = da**2 * S0 + db**2 * S1 + dg**2 * eye
        cyx = da * a * S0 + db * b * S1 + dg * g * eye
    else:
        fn = noise if target == "eps" else (lambda x, t: -noise(x, t) / si.gamma(t)[:, None])
        # Y = z (eps), or |gamma s_hat + z|^2 = |z - eta_hat|^2 for the score: the same residual
        cyy, cyx = eye, g * eye
    expected = float(jnp.trace(cyy - cyx @ jnp.linalg.inv(cov) @ cyx.T)) / 2
    net = jd.Field(lambda p, x, t: fn(x, t), target)
    loss = jd.interpolant_loss(
        net,
        si,
        time_sampler=lambda key, shape: jnp.full(shape, t0),
        source=lambda key, shape: _gauss(key, M1, S1, shape[0]),
    )
    value = float(loss(None, jax.random.key(2), _gauss(jax.random.key(3), M0, S0, 100_000)))
    assert abs(value - expected) < 0.03 * expected, (value, expected)
    # and a wrong field (zero) is measurably worse
    zero = jd.Field(lambda p, x, t: jnp.zeros_like(x), target)
    bad = float(
        jd.interpolant_loss(
            zero,
            si,
            time_sampler=lambda key, s: jnp.full(s, t0),
            source=lambda key, s: _gauss(key, M1, S1, s[0]),
        )(None, jax.random.key(2), _gauss(jax.random.key(3), M0, S0, 100_000))
    )
    assert bad > 1.2 * expected


@pytest.mark.parametrize("diffusion", [0.0, 0.5])
def test_sampler_with_the_exact_fields_reaches_the_data_law(diffusion):
    # Start from the exact marginal at t = 1 - 1e-3 and integrate the ODE (diffusion 0) or the
    # backward SDE (diffusion 0.5) to t = 0 with 400 Euler steps of jd.samplers.interpolant_sde,
    # the interpolant in the place of the path: N(M0, S0) up to O(1/400) bias and Monte-Carlo
    # error (20,000 samples: SE of a covariance entry <= 0.005). Measured: errors <= 0.008; with
    # the score's sign flipped the covariance is off by 10.
    si = jd.brownian_bridge(0.5)
    moments, velocity, noise = gaussian_oracle(si)
    mean, cov = moments(1.0 - 1e-3)
    x1 = _gauss(jax.random.key(4), mean, cov, 20_000)
    b, eta = jd.Field(velocity, "velocity"), jd.Field(noise, "eps")
    sampler = jd.samplers.interpolant_sde(diffusion, noise=eta if diffusion else None)
    run = jax.jit(
        lambda key, x: jd.sample(
            key, si, b, x_init=x, sampler=sampler, steps=400, t_start=1.0 - 1e-3
        )  # fmt: skip
    )
    sol = run(jax.random.key(5), x1)
    assert int(sol.nfe) == (800 if diffusion else 400)  # b and E[z | x_t] at every step
    np.testing.assert_allclose(sol.x.mean(0), M0, atol=0.03)
    np.testing.assert_allclose(jnp.cov(sol.x.T), S0, atol=0.03)
    # the forward SDE (t increasing, drift b + eps s) takes the data to the source law
    if diffusion:
        fwd = jnp.linspace(1e-3, 1.0, 401)
        m, c = moments(fwd[0])
        tb = lambda x, t: jnp.full(x.shape[:1], t)  # noqa: E731 - the oracle's per-sample times
        back = jd.integrate(
            lambda x, t: velocity(x, tb(x, t)) - diffusion * noise(x, tb(x, t)) / si.gamma(t),
            _gauss(jax.random.key(7), m, c, 20_000),
            ts=fwd,
            diffusion=lambda x, t: jnp.sqrt(2.0 * diffusion),
            key=jax.random.key(6),
        ).x
        np.testing.assert_allclose(back.mean(0), M1, atol=0.03)
        np.testing.assert_allclose(jnp.cov(back.T), S1, atol=0.05)


def test_a_stochastic_bridge_starts_inside_gamma_zero_by_default():
    """gamma_1 = 0 on a Brownian bridge, where the score is infinite: with diffusion the default
    grid starts at 1 - 1e-3 (it was refused until t_start was set by hand; t_start = 1 given
    still is); the ODE starts at t = 1 as before."""
    si = jd.brownian_bridge(0.5)
    moments, velocity, noise = gaussian_oracle(si)
    b, eta = jd.Field(velocity, "velocity"), jd.Field(noise, "eps")
    x = _gauss(jax.random.key(4), *moments(1.0 - 1e-3), 64)
    stochastic = jd.samplers.interpolant_sde(0.5, noise=eta)
    run = functools.partial(jd.sample, jax.random.key(5), si, b, x_init=x, sampler=stochastic)
    np.testing.assert_array_equal(run(steps=20).x, run(steps=20, t_start=1.0 - 1e-3).x)
    with pytest.raises(ValueError, match="the score is infinite where gamma_t = 0"):
        run(steps=20, t_start=1.0)
    ode = functools.partial(  # (the oracle's b is singular at t = 1 itself: gamma' = inf there)
        jd.sample, None, si, jd.Field(lambda x, t: -x, "velocity"), x_init=x, steps=20,
        sampler=jd.samplers.interpolant_sde(),
    )  # fmt: skip
    np.testing.assert_array_equal(ode().x, ode(t_start=1.0).x)


def test_gaussian_path_is_the_gamma_zero_case(x64):
    """On the linear path (gamma = 0, Gaussian x1) one eps field gives b and s through the hub:
    with diffusion eps_t = eta^2 g_t^2 / 2 the interpolant sampler's Euler-Maruyama step is the
    reverse-SDE family's (jd.samplers.sde(eta=...)) from the same noise, to float64 rounding."""
    path = jd.linear_path()
    data = jd.GaussianMixture.isotropic(jnp.array([[1.0, -1.0]]), std=0.5)
    field = data.field(path, "eps")
    x = jax.random.normal(jax.random.key(0), (64, 2))
    kw = dict(x_init=x, ts=jd.uniform_grid(50, 1.0 - 1e-3, 1e-3))  # (sde's own: log-SNR)
    eta = 0.7  # g^2 is infinite at t = 1 (alpha_1 = 0), outside the grid: clip there

    def diffusion(t):
        return 0.5 * eta**2 * path.diffusion_sq(jnp.minimum(t, 1.0 - 1e-3))

    ours = jd.sample(
        jax.random.key(1),
        path,
        field,
        **kw,
        sampler=jd.samplers.interpolant_sde(diffusion),
    )
    theirs = jd.sample(jax.random.key(1), path, field, **kw, sampler=jd.samplers.sde(eta=eta))
    np.testing.assert_allclose(ours.x, theirs.x, rtol=1e-9, atol=1e-9)


def test_minibatch_ot_couples_gaussians_like_the_ot_map():
    # The OT map between N(M0, S0) and N(M1, S1) is x1 = M1 + A (x0 - M0) with
    # A = S0^{-1/2} (S0^{1/2} S1 S0^{1/2})^{1/2} S0^{-1/2}; Cov(x0, x1) = S0 A. Minibatch OT on
    # 256 points approaches it (measured entrywise error 0.015 over 8 batches; independent
    # pairs give Cov = 0, error 0.73), and keeps both marginals exactly.
    def sqrtm(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(w)) @ v.T

    s0h = sqrtm(np.asarray(S0, np.float64))
    s0h_inv = np.linalg.inv(s0h)
    A = s0h_inv @ sqrtm(s0h @ np.asarray(S1, np.float64) @ s0h) @ s0h_inv
    expected = np.asarray(S0) @ A
    covs = []
    for i in range(8):
        k0, k1 = jax.random.split(jax.random.key(10 + i))
        x0, x1 = _gauss(k0, M0, S0, 256), _gauss(k1, M1, S1, 256)
        y0, y1 = jd.exact_ot()(k0, x0, x1)
        assert np.allclose(np.sort(np.asarray(y1), 0), np.sort(np.asarray(x1), 0))
        covs.append(np.cov(np.asarray(y0).T, np.asarray(y1).T)[:2, 2:])
    np.testing.assert_allclose(np.mean(covs, 0), expected, atol=0.06)


def test_interpolant_errors():
    si = jd.brownian_bridge(1.0)
    v = jd.Field(lambda x, t: x, "velocity")
    with pytest.raises(ValueError, match="predicts 'velocity', 'eps'"):
        jd.interpolant_loss(jd.Field(lambda p, x, t: x, "x0"), si)
    x1, ts = jnp.zeros((2, 2)), jnp.linspace(1, 0, 3)
    with pytest.raises(ValueError, match="needs the score: give noise="):
        jd.sample(jax.random.key(0), si, v, x_init=x1, ts=ts,
                  sampler=jd.samplers.interpolant_sde(1.0))  # fmt: skip
    eta = jd.Field(lambda x, t: x, "eps")
    for run in (lambda f: f(), lambda f: jax.jit(f)()):  # at trace time, and under jit
        with pytest.raises(Exception, match="gamma_t = 0"):
            run(lambda: jd.sample(jax.random.key(0), si, v, x_init=x1, ts=ts,
                                  sampler=jd.samplers.interpolant_sde(1.0, noise=eta)).x)  # fmt: skip
    with pytest.raises(Exception, match="gamma_t = 0"):  # a traced grid: when it runs
        jax.jit(lambda ts: jd.sample(jax.random.key(0), si, v, x_init=x1, ts=ts,
                                     sampler=jd.samplers.interpolant_sde(1.0, noise=eta)).x)(ts)  # fmt: skip
    with pytest.raises(ValueError, match="target 'velocity'"):
        jd.sample(None, si, eta, x_init=x1, ts=ts, sampler=jd.samplers.interpolant_sde())
    with pytest.raises(ValueError, match="interpolant_sde"):  # other samplers need the hub
        jd.sample(None, si, v, x_init=x1, ts=ts, sampler=jd.samplers.ode())
    with pytest.raises(ValueError, match="x_init = source"):
        jd.sample(jax.random.key(0), si, v, (2, 2), sampler=jd.samplers.interpolant_sde())
    with pytest.raises(ValueError, match="drop noise="):
        jd.sample(jax.random.key(0), jd.linear_path(), v, x_init=x1, ts=ts,
                  sampler=jd.samplers.interpolant_sde(1.0, noise=eta))  # fmt: skip
    with pytest.raises(ValueError, match="only with diffusion != 0"):
        jd.samplers.interpolant_sde(0.0, noise=eta)
    with pytest.raises(ValueError, match="diffusion must lie in"):
        jd.samplers.interpolant_sde(-1.0)
    with pytest.raises(ValueError, match="a\\(0\\) = 1"):
        StochasticInterpolant(_Affine(1.0, -0.5), _Affine(0.0, 1.0), _Affine(0.0, 0.0))
    with pytest.raises(ValueError, match="gamma must vanish"):
        StochasticInterpolant(_Affine(1.0, -1.0), _Affine(0.0, 1.0), _Affine(0.1, 0.0))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        jd.brownian_bridge(-1.0)


def test_the_deterministic_interpolant_has_finite_ends_and_no_score():
    """linear_interpolant's gamma = 0 had a NaN slope at t = 0 and 1 (the bridge's sqrt: 0 * inf),
    so its conditional velocity and loss were NaN there; its score was inf."""
    li = jd.linear_interpolant()
    x0, x1, z = jnp.zeros((4, 2)), jnp.ones((4, 2)), jnp.ones((4, 2))
    for t in (jnp.zeros(4), jnp.ones(4)):
        np.testing.assert_array_equal(li.conditional_velocity(x0, x1, z, t), x1 - x0)
    with pytest.raises(ValueError, match="has no conditional score"):
        li.conditional_score(x0, x0, x1, 0.3)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        li.interpolate(x0, x1, z, 1.5)


def test_straightness_refuses_an_eps_field_where_alpha_vanishes():
    eps = jd.Field(lambda x, t: x, "eps")
    with pytest.raises(ValueError, match="alpha_t = 0 at t_start = 1.0"):  # it gave NaN
        jd.straightness(eps, jnp.ones((4, 2)), path=jd.linear_path(), steps=4, t_start=1.0)
    inside = jd.straightness(eps, jnp.ones((4, 2)), path=jd.linear_path(), steps=4)  # 1 - 1e-3
    assert bool(jnp.isfinite(inside.value))


def test_an_interpolant_where_a_gaussian_path_is_needed_is_named():
    """The usability audit (U3): ode(), log_likelihood, straightness and reflow_pairs on a
    stochastic interpolant failed with AttributeError ('d_alpha', 'alpha', 'prior_sample'). They
    now name the interpolant and the way out; a velocity field is measured as it is."""
    bb, x = jd.brownian_bridge(), jnp.ones((4, 2))
    vel = jd.Field(lambda x, t: -x, "velocity")
    with pytest.raises(ValueError, match=r"ode\(Euler\) samples a GaussianPath.*linear_path"):
        jd.sample(None, bb, vel, x_init=x, sampler=jd.samplers.ode(), steps=4)
    jaxtyping.config.update("jaxtyping_disable", True)  # users run without the tests' beartype,
    try:  # which refuses the interpolant by the type hints first: check the library's messages
        with pytest.raises(ValueError, match="log_likelihood needs a GaussianPath.*prior_logp"):
            jd.log_likelihood(bb, vel, x)
        with pytest.raises(ValueError, match="reflow_pairs needs a GaussianPath.*as x1="):
            jd.reflow_pairs(jax.random.key(0), bb, vel, (4, 2))
        with pytest.raises(ValueError, match="straightness of a field predicting 'x0' needs a"):
            jd.straightness(jd.Field(lambda x, t: x, "x0"), x, path=bb)
        np.testing.assert_array_equal(  # the path only converts: a velocity field needs none
            jd.straightness(vel, x, path=bb, steps=4).value, jd.straightness(vel, x, steps=4).value
        )
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


def test_a_dataset_source_reshapes_only_between_flat_and_shaped_points():
    """A sampler drawing (2n, 2) for data (n, 4) was reshaped silently, scrambling points."""
    wrong = jd.dataset_source(lambda key, n: jnp.zeros((2 * n, 2)))
    with pytest.raises(ValueError, match=r"drew shape \(8, 2\) for 4 points"):
        wrong(jax.random.key(0), (4, 4))
    flat = jd.dataset_source(lambda key, n: jnp.arange(n * 4.0).reshape(n, 4))
    assert flat(jax.random.key(0), (3, 2, 2)).shape == (3, 2, 2)
