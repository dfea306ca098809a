"""Gaussian-mixture oracle: closed forms, Tweedie, the continuity and Fokker-Planck equations."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from tests.test_paths import PATHS


def mixture(dtype=jnp.float64):
    """Three components in 2-D with a full covariance, unequal weights."""
    means = jnp.array([[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]], dtype)
    covs = jnp.array(
        [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.2]], [[0.25, -0.05], [-0.05, 0.15]]], dtype
    )
    return jd.GaussianMixture(jnp.array([0.5, 0.3, 0.2], dtype), means, covs)


POINTS = np.array([[0.3, -0.2], [1.5, 1.0], [-2.0, 0.5], [0.0, 2.5]])
TIMES = np.array([0.1, 0.35, 0.6, 0.85])


def test_single_gaussian_marginal_is_the_closed_form(x64):
    mean, cov = jnp.array([1.0, -0.5]), jnp.array([[0.5, 0.2], [0.2, 0.4]])
    g = jd.GaussianMixture(jnp.ones(1), mean[None], cov[None])
    path = jd.vp_path()
    for t in [0.2, 0.7]:
        a, var = path.alpha(t), path.sigma_sq(t)
        cov_t = a**2 * cov + var * jnp.eye(2)
        logpdf = jax.scipy.stats.multivariate_normal.logpdf
        ref = jax.vmap(logpdf, in_axes=(0, None, None))(POINTS, a * mean, cov_t)
        np.testing.assert_allclose(g.marginal_log_prob(path, POINTS, t), ref, rtol=1e-12)
        m = g.marginal(path, t)
        np.testing.assert_allclose(m.log_prob(POINTS), ref, rtol=1e-12)


@pytest.mark.parametrize("name", ["vp", "ve", "linear", "cosine"])
def test_score_is_grad_log_density_and_denoiser_is_tweedie(name, x64):
    data, path = mixture(), PATHS[name]()
    score = data.score(path, POINTS, TIMES)  # per-sample t
    grad = jax.vmap(jax.grad(lambda x, t: data.marginal_log_prob(path, x, t)))(POINTS, TIMES)
    np.testing.assert_allclose(score, grad, rtol=1e-10, atol=1e-12)
    a, var = path.alpha(TIMES)[:, None], path.sigma_sq(TIMES)[:, None]
    np.testing.assert_allclose(
        data.denoiser(path, POINTS, TIMES), (POINTS + var * score) / a, rtol=1e-9, atol=1e-10
    )


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "linear", "cosine"])
def test_continuity_and_fokker_planck_equations_hold(name, x64):
    """d/dt log p = -div u - u . grad log p (PF-ODE); and the forward SDE's Fokker-Planck equation."""
    data, path = mixture(), PATHS[name]()

    def log_p(x, t):
        return data.marginal_log_prob(path, x, t)

    def velocity(x, t):
        return data.predict(path, x, t, "velocity")

    @jax.jit
    @jax.vmap
    def residuals(x, t):
        dlogp_dt = jax.jvp(lambda t: log_p(x, t), (t,), (jnp.ones_like(t),))[1]
        u = velocity(x, t)
        div_u = jnp.trace(jax.jacfwd(velocity)(x, t))
        s = jax.grad(log_p)(x, t)
        continuity = -div_u - u @ s
        # Fokker-Planck: dp/dt = -div(f x p) + g^2/2 lap p, divided by p
        f, g2 = path.drift_coef(t), path.diffusion_sq(t)
        lap_logp = jnp.trace(jax.hessian(log_p)(x, t))
        fokker_planck = -2 * f - f * (x @ s) + 0.5 * g2 * (lap_logp + s @ s)
        return dlogp_dt, continuity, fokker_planck

    lhs, continuity, fokker_planck = residuals(jnp.asarray(POINTS), jnp.asarray(TIMES))
    np.testing.assert_allclose(continuity, lhs, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(fokker_planck, lhs, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("target", jd.TARGETS)
def test_predict_agrees_with_conversions(target, x64):
    data, path = mixture(), jd.vp_path()
    x0_hat = data.predict(path, POINTS, TIMES, "x0")
    converted = jd.convert(path, POINTS, TIMES, x0_hat, src="x0", dst=target)
    np.testing.assert_allclose(
        data.predict(path, POINTS, TIMES, target), converted, rtol=1e-9, atol=1e-10
    )
    field = data.field(path, target)
    assert isinstance(field, jd.Field) and field.target == target
    np.testing.assert_allclose(field(POINTS, 0.4), data.predict(path, POINTS, 0.4, target))


def test_oracle_is_finite_where_alpha_is_zero(x64):
    """At t = 1 on the linear path the score is -x and the denoiser is the data mean."""
    data, path = mixture(), jd.linear_path()
    np.testing.assert_allclose(data.score(path, POINTS, 1.0), -POINTS, rtol=1e-12, atol=1e-14)
    mean = jnp.sum(data.weights[:, None] * data.means, axis=0)
    np.testing.assert_allclose(data.denoiser(path, POINTS, 1.0), jnp.broadcast_to(mean, (4, 2)))


def test_sampling_matches_weights_means_and_covariances():
    data = mixture(jnp.float32)
    x, labels = data.sample_labeled(jax.random.key(0), 40000)
    freq = jnp.bincount(labels, length=3) / 40000
    np.testing.assert_allclose(freq, data.weights, atol=0.0125)  # 5 standard errors (0.0025)
    for k in range(3):
        xk = x[labels == k]
        np.testing.assert_allclose(xk.mean(0), data.means[k], atol=0.03)  # ~5 SE at n_k >= 8000
        np.testing.assert_allclose(jnp.cov(xk.T), data.covs[k], atol=0.03)


def test_integer_means_sample_with_real_noise():
    """Integer means drew the noise as integers (N(0, 4 I): std 1.37, 9 distinct values in
    100,000; the stop-53 review): the mixture holds floats whatever it is given."""
    mix = jd.GaussianMixture(
        jnp.ones(1, int), jnp.zeros((1, 2), int), 4 * jnp.eye(2, dtype=int)[None]
    )
    assert mix.means.dtype == mix.covs.dtype == mix.weights.dtype == jnp.float32
    x = mix.sample(jax.random.key(0), 20_000)
    np.testing.assert_allclose(x.std(0), [2.0, 2.0], rtol=0.03)  # SE 0.5%
    assert len(np.unique(np.asarray(x[:, 0]))) > 19_000


def test_batch_shapes_and_scalar_t():
    data, path = mixture(jnp.float32), jd.vp_path()
    x = jnp.zeros((3, 5, 2))
    assert data.score(path, x, 0.5).shape == (3, 5, 2)
    assert data.score(path, x, jnp.full((3,), 0.5)).shape == (3, 5, 2)
    assert data.marginal_log_prob(path, x, jnp.full((3, 5), 0.5)).shape == (3, 5)


@pytest.mark.parametrize(
    "args, match",
    [
        ((jnp.array([0.5, 0.6]), jnp.zeros((2, 2)), jnp.stack([jnp.eye(2)] * 2)), "sum to 1"),
        ((jnp.array([1.0]), jnp.zeros((1, 2)), -jnp.eye(2)[None]), "positive definite"),
        ((jnp.array([1.0]), jnp.zeros((1, 2)), jnp.eye(3)[None]), r"covs must be \(K, d, d\)"),
        ((jnp.array([0.5, 0.5]), jnp.zeros((1, 2)), jnp.eye(2)[None]), "expected weights"),
    ],
)
def test_invalid_mixtures_raise(args, match):
    with pytest.raises(ValueError, match=match):
        jd.GaussianMixture(*args)
    with pytest.raises(ValueError, match=r"std must be > 0; got std = \[1.0, -0.5\]"):
        jd.GaussianMixture.isotropic(jnp.zeros((2, 2)), jnp.array([1.0, -0.5]))  # was |std|


def test_non_finite_and_misshaped_inputs_raise():
    data, path = mixture(jnp.float32), jd.vp_path()
    with pytest.raises(ValueError, match="non-finite"):
        data.score(path, jnp.array([[jnp.nan, 0.0]]), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(..., 2\)"):
        data.score(path, jnp.zeros((4, 3)), 0.5)


def test_two_oracle_losses_in_one_program_do_not_hang():
    """Regression: two batched ``jnp.linalg.inv`` in one jitted program hung on CPU (jaxlib 0.10).

    The oracles now use one ``eigh`` of the K covariances and elementwise algebra; run in a
    subprocess so that a hang fails the test instead of stalling the suite.
    """
    import subprocess
    import sys

    program = (
        "import jax, jaxdiff as jd\n"
        "data = jd.data.eight_gaussians_mixture()\n"
        "fm, vp = jd.linear_path(), jd.vp_path()\n"
        "x0 = data.sample(jax.random.key(1), 20_000)\n"
        "f = jd.flow_matching_loss(jd.Field(lambda p, x, t: data.predict(fm, x, t, 'velocity'), 'velocity'), fm)\n"
        "g = jd.score_matching_loss(jd.Field(lambda p, x, t: data.predict(vp, x, t, 'eps'), 'eps'), vp)\n"
        "k = jax.random.key(2)\n"
        "print(*jax.jit(lambda b: (f(None, k, b), g(None, k, b)))(x0))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True
    )
    fm_loss, dsm_loss = map(float, out.stdout.split())
    # the floors of notebook 3: E|u - v_exact|^2 and E|eps - eps_exact|^2 on the 8 gaussians
    assert 1.9 < fm_loss < 2.1 and 0.2 < dsm_loss < 0.35, (fm_loss, dsm_loss)


def test_oracle_checks_time_weights_and_means():
    # A time outside [0, 1] (or NaN) gave a silently wrong field (score at t = 2 on the linear
    # path: [0.0175, -0.1973]); NaN weights and NaN/inf means passed the checks and gave NaN.
    mix = mixture(jnp.float32)
    path, x = jd.linear_path(), jnp.zeros((3, 2))
    for t in (2.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="t must lie in"):
            mix.score(path, x, t)
    with pytest.raises(ValueError, match="t must lie in"):
        mix.field(path, "velocity")(x, jnp.array([0.1, -0.1, 0.5]))
    with pytest.raises(Exception, match="t must lie in"):  # traced: checked when it runs
        jax.jit(lambda t: mix.denoiser(path, x, t))(jnp.array(1.5))
    for t in (-0.5, 1.5, jnp.nan):  # marginal too: under jit, -0.5 gave alpha 1.5, sigma -0.5
        with pytest.raises(Exception, match="t must lie in"):
            jax.block_until_ready(jax.jit(lambda t: mix.marginal(path, t).covs)(t))
    # a valid traced t still differentiates
    g = jax.jit(jax.grad(lambda t: mix.marginal_log_prob(path, jnp.ones(2), t)))(0.5)
    eps = 1e-3
    fd = (mix.marginal_log_prob(path, jnp.ones(2), 0.5 + eps)
          - mix.marginal_log_prob(path, jnp.ones(2), 0.5 - eps)) / (2 * eps)  # fmt: skip
    np.testing.assert_allclose(float(g), float(fd), rtol=1e-2)
    with pytest.raises(ValueError, match="weights must be > 0"):
        jd.GaussianMixture(jnp.array([jnp.nan]), jnp.zeros((1, 2)), jnp.eye(2)[None])
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(ValueError, match="means must be finite"):
            jd.GaussianMixture(jnp.ones(1), jnp.full((1, 2), bad), jnp.eye(2)[None])
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2\)"):  # a raw TypeError
        mix.log_prob(jnp.zeros((3, 3)))
    # a NaN point gave a NaN density silently; n = -1 an error of JAX's own (stop 53)
    for fn in (mix.log_prob, mix.responsibilities, mix.log_responsibilities):
        with pytest.raises(ValueError, match="x contains non-finite"):
            fn(jnp.array([[0.0, jnp.nan]]))
    with pytest.raises(Exception, match="x contains non-finite"):
        jax.block_until_ready(jax.jit(lambda x: mix.log_prob(x))(jnp.array([[0.0, jnp.nan]])))
    with pytest.raises(ValueError, match="n must be an integer >= 0 .a number of samples."):
        mix.sample(jax.random.key(0), -1)  # (2.5: the suite's type checker refuses it first)
    with pytest.raises(ValueError, match="y contains non-finite"):
        mix.posterior(jnp.array([[1.0, 0.0]]), jnp.array([jnp.nan]), 0.5)
    with pytest.raises(ValueError, match="A contains non-finite"):
        mix.posterior(jnp.array([[jnp.nan, 0.0]]), jnp.array([1.0]), 0.5)


def test_log_responsibilities_stay_finite_far_from_a_component():
    """log(responsibilities) is -inf (and its gradient NaN) where a component's share rounds to 0:
    an exact classifier for classifier_guidance built that way gave NaN fields far from a
    component (a usability audit). log_responsibilities is log_softmax: equal where both are
    finite, and finite, with finite gradients, at x = 40 from two unit components 4 apart."""
    mix = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=1.0)
    near = jnp.array([[0.3, 0.1], [-1.0, 2.0]])
    np.testing.assert_allclose(
        mix.log_responsibilities(near), jnp.log(mix.responsibilities(near)), rtol=1e-5, atol=1e-6
    )
    far = jnp.array([[40.0, 0.0]])
    assert float(jnp.log(mix.responsibilities(far))[0, 1]) == -float("inf")
    got = mix.log_responsibilities(far)[0]
    np.testing.assert_allclose(got[1], -160.0, rtol=1e-4)  # log N(far; -2) - log N(far; 2) = -4*40
    grad = jax.grad(lambda x: mix.log_responsibilities(x)[0, 1])(far)
    np.testing.assert_allclose(grad, [[-4.0, 0.0]], rtol=1e-4)


def test_gradients_in_the_covariances_are_exact_at_isotropic_components(x64):
    """``eigh``'s derivative is NaN at repeated eigenvalues: the oracle's fields had NaN gradients
    in an isotropic component's covariance, and the posterior's in ``sigma_y``. Both now equal
    central differences along a full direction (not one diagonal in the eigenbasis), and so do
    second derivatives through the covariances (forward over forward, reverse over forward)."""
    path = jd.vp_path()
    means = jnp.array([[1.0, 0.0, 0.5], [-1.0, 0.5, 0.0]])
    full = jnp.array([[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.4]])
    covs = jnp.stack([0.5 * jnp.eye(3), full])
    direction = jnp.array(np.random.default_rng(0).normal(size=(2, 3, 3)))
    direction = direction + jnp.swapaxes(direction, -1, -2)
    x, t = jnp.array([[0.3, -0.2, 0.1], [1.0, 0.4, -0.7]]), jnp.array([0.3, 0.7])
    A, y = jnp.eye(3)[:2], jnp.array([0.5, -0.3])

    def outputs(c, sigma_y):
        prior = jd.GaussianMixture(jnp.array([0.6, 0.4]), means, c)
        post = prior.posterior(A, y, sigma_y)
        return jnp.stack(
            [
                prior.marginal_log_prob(path, x, t).sum(),
                prior.score(path, x, t).sum(),
                (prior.denoiser(path, x, t) ** 2).sum(),
                prior.predict(path, x, t, "velocity").sum(),
                post.score(path, x, t).sum() + post.marginal_log_prob(path, x, t).sum(),
            ]
        )

    h = 1e-6
    jac = jax.jacrev(outputs)(covs, 0.5)
    central = (outputs(covs + h * direction, 0.5) - outputs(covs - h * direction, 0.5)) / (2 * h)
    np.testing.assert_allclose(jnp.einsum("oKij,Kij->o", jac, direction), central, rtol=1e-7)
    tangent = jax.jvp(lambda c: outputs(c, 0.5), (covs,), (direction,))[1]
    np.testing.assert_allclose(tangent, central, rtol=1e-7)
    d_sigma_y = jax.jacrev(outputs, argnums=1)(covs, 0.5)[-1]
    central = (outputs(covs, 0.5 + h)[-1] - outputs(covs, 0.5 - h)[-1]) / (2 * h)
    np.testing.assert_allclose(d_sigma_y, central, rtol=1e-7)
    # eigh reads sym(C): so do the gradients (they were not symmetric: a gradient step broke the
    # mixture), and a non-symmetric direction agrees with central differences
    skew = jnp.array(np.random.default_rng(1).normal(size=(2, 3, 3)))

    def score_at(c):  # eqx.tree_at: the constructor refuses non-symmetric covariances
        mix = jd.GaussianMixture(jnp.array([0.6, 0.4]), means, covs)
        return eqx.tree_at(lambda g: g.covs, mix, c).score(path, x, t).sum()

    grad = jax.grad(score_at)(covs)
    np.testing.assert_allclose(grad, jnp.swapaxes(grad, -1, -2), rtol=1e-12, atol=1e-14)
    through_posterior = jax.grad(lambda c: outputs(c, 0.5)[-1])(covs)  # Bayes reads sym(C) too
    np.testing.assert_allclose(
        through_posterior, jnp.swapaxes(through_posterior, -1, -2), rtol=1e-12, atol=1e-14
    )
    central = (score_at(covs + h * skew) - score_at(covs - h * skew)) / (2 * h)
    np.testing.assert_allclose(jnp.sum(grad * skew), central, rtol=1e-7)

    # second order: the gradient in C of the score's divergence (reverse over forward) and a
    # Hessian in C forward over forward, against central differences
    prior = jd.GaussianMixture(jnp.array([0.6, 0.4]), means, covs)

    def divergence(c):
        mix = eqx.tree_at(lambda g: g.covs, prior, c)
        return jnp.trace(jax.jacfwd(lambda z: mix.score(path, z, 0.4))(x[0]))

    central = (divergence(covs + h * direction) - divergence(covs - h * direction)) / (2 * h)
    np.testing.assert_allclose(jnp.sum(jax.grad(divergence)(covs) * direction), central, rtol=1e-7)

    def library_divergence(c):  # log_likelihood's (it was NaN under jax.linearize)
        mix = eqx.tree_at(lambda g: g.covs, prior, c)
        return jd.likelihood.divergence(lambda z: mix.score(path, z, 0.4), x)[1].sum()

    d_lib = jnp.sum(jax.grad(library_divergence)(covs) * direction)
    central = (library_divergence(covs + h * direction)
               - library_divergence(covs - h * direction)) / (2 * h)  # fmt: skip
    np.testing.assert_allclose(d_lib, central, rtol=1e-7)

    def log_p(c):
        return eqx.tree_at(lambda g: g.covs, prior, c).marginal_log_prob(path, x[0], 0.4)

    h2 = 1e-4
    second = (log_p(covs + h2 * direction) - 2 * log_p(covs) + log_p(covs - h2 * direction)) / h2**2
    along = jax.jvp(lambda c: jax.jvp(log_p, (c,), (direction,))[1], (covs,), (direction,))[1]
    np.testing.assert_allclose(along, second, rtol=1e-5)
    hessian = jax.hessian(lambda x: prior.marginal_log_prob(path, x, 0.4))(x[0])
    jacobian = jax.jacfwd(lambda x: prior.score(path, x, 0.4))(x[0])  # second order in x
    np.testing.assert_allclose(hessian, jacobian, rtol=1e-12, atol=1e-14)


def test_a_mixture_built_under_jit_checks_its_values_when_it_runs():
    """The checks of weights, means and covariances ran on known values only: under ``jit``
    weights ``[1.5, -0.5]`` gave a NaN density and covariances ``-I`` a finite, wrong score."""
    means, covs = jnp.zeros((2, 2)), jnp.stack([jnp.eye(2)] * 2)
    half, path, x = jnp.array([0.5, 0.5]), jd.vp_path(), jnp.ones(2)

    def density(w, m, c):
        return jd.GaussianMixture(w, m, c).marginal_log_prob(path, x, 0.5)

    run = jax.jit(density)
    for args, match in [
        ((jnp.array([1.5, -0.5]), means, covs), "weights must be > 0 and sum to 1"),
        ((jnp.array([0.6, 0.6]), means, covs), "weights must be > 0 and sum to 1"),
        ((half, means.at[0, 0].set(jnp.nan), covs), "means must be finite"),
        ((half, means, -covs), "covs must be symmetric and positive definite"),
        ((half, means, covs.at[0, 0, 1].set(0.5)), "covs must be symmetric and positive definite"),
    ]:
        with pytest.raises(Exception, match=match):
            run(*args).block_until_ready()
    np.testing.assert_allclose(run(half, means, covs), density(half, means, covs), rtol=1e-6)
    many = jnp.zeros((10, 2)).at[9, 1].set(jnp.nan)  # the message names the row, not 8 finite ones
    with pytest.raises(ValueError, match=r"means must be finite; got .* \(components\) \[9\]"):
        jd.GaussianMixture(jnp.full(10, 0.1), many, jnp.stack([jnp.eye(2)] * 10))
    # mixtures made from checked ones are not checked again (nor rebuilt through __init__)
    mix = jd.GaussianMixture(half, means, covs)
    jaxpr = str(jax.make_jaxpr(lambda t: mix.marginal(path, t).covs)(0.3))
    assert "cholesky" not in jaxpr  # a traced t is checked (stop 53), the mixture is not


@pytest.mark.parametrize("name", ["vp", "cosine"])
def test_oracle_velocity_is_finite_at_t0_where_sigma_prime_is_not(x64, name):
    # VP's and the cosine path's sigma_t' is infinite at t = 0; the hub's sigma' * E[eps | x] was
    # inf * 0: a ValueError eagerly and NaN under jit, where the PF-ODE drift f x - g^2/2 score is
    # finite (Song et al. 2021, eq. 13)
    path, mix = PATHS[name](), mixture()
    exact = path.drift_coef(0.0) * POINTS - 0.5 * path.diffusion_sq(0.0) * mix.score(
        path, POINTS, 0.0
    )
    assert np.all(np.isfinite(exact))
    np.testing.assert_allclose(mix.predict(path, POINTS, 0.0, "velocity"), exact, rtol=1e-12)
    field = mix.field(path, "velocity")
    jitted = jax.jit(lambda t: field(POINTS, t))(jnp.zeros(4))
    np.testing.assert_allclose(jitted, exact, rtol=1e-12)
    # and the hub's value inside the interval agrees with it
    hub = from_hub_velocity(mix, path, POINTS, jnp.full(4, 0.3))
    inside = mix.predict(path, POINTS, jnp.full(4, 0.3), "velocity")
    np.testing.assert_allclose(inside, hub, rtol=1e-10)


def from_hub_velocity(mix, path, x, t):
    eps = -path.sigma(t)[:, None] * mix.score(path, x, t)
    return jd.from_x0_eps(path, x, t, mix.denoiser(path, x, t), eps, "velocity")
