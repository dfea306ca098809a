"""Edges found by the audit of stop 47 (couplings, interpolants, inverse problems, the few-step
losses, DDPM, the ELBO): each silently trained nothing, gave an inf or a NaN, or failed with an
unnamed error; each test fails without its fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.couplings import exact_ot
from jaxdiff.interpolants import brownian_bridge, interpolant_loss, linear_interpolant
from jaxdiff.losses import _Uniform, static_split, uniform_time
from jaxdiff.sources import draw_pairs

X = jax.random.normal(jax.random.key(0), (6, 2))


def test_interpolant_loss_refuses_what_cannot_train():
    """A latent target on a deterministic interpolant (the loss was E|z|^2, gradient 0), and a
    velocity target where the bridge's gamma' is infinite (an inf loss): at build time where the
    sampler's range is known, at run time under jit otherwise."""
    for target in ("score", "eps"):
        with pytest.raises(ValueError, match=f"target '{target}' regresses the latent z"):
            interpolant_loss(jd.Field(lambda p, x, t: p * x, target), linear_interpolant())
    net = jd.Field(lambda p, x, t: p * x, "velocity")
    with pytest.raises(ValueError, match=r"range \[0.0, 1.0\] ends at t = \[0.0, 1.0\]"):
        interpolant_loss(net, brownian_bridge(1.0), time_sampler=uniform_time(0.0, 1.0))
    zeros = interpolant_loss(net, brownian_bridge(1.0), time_sampler=lambda k, s: jnp.zeros(s))
    with pytest.raises(Exception, match="gamma_t' is not finite"):
        jax.block_until_ready(jax.jit(zeros)(1.0, jax.random.key(0), X))
    halves = interpolant_loss(net, brownian_bridge(1.0), time_sampler=lambda k, s: jnp.full(s, 0.5))
    assert np.isfinite(float(jax.jit(halves)(1.0, jax.random.key(0), X)))
    # the linear interpolant's velocity is finite at the ends: uniform_time(0, 1) is fine there
    loss = interpolant_loss(net, linear_interpolant(), time_sampler=uniform_time(0.0, 1.0))
    assert np.isfinite(float(loss(1.0, jax.random.key(0), X)))


def test_couplings_name_bad_batches_and_pass_one_hot_labels():
    with pytest.raises(ValueError, match=r"non-empty batches; got x0 \(0, 2\)"):
        exact_ot()(jax.random.key(1), X[:0], X[:0])  # a bare ZeroDivisionError before
    one_hot = jax.nn.one_hot(jnp.arange(6) % 3, 3)
    x0, x1, labels = exact_ot()(jax.random.key(1), X, X + 1.0, one_hot)  # labels follow x0
    np.testing.assert_array_equal(labels, one_hot)
    np.testing.assert_allclose(x1, X + 1.0, atol=1e-6)  # a shift: the identity is optimal
    with pytest.raises(ValueError, match=r"compares class indices, shape \(6,\); got labels"):
        exact_ot(class_conditional=True)(jax.random.key(1), X, X, one_hot)


def test_a_non_finite_source_draw_is_named():
    """One NaN from a source made every pair of exact_ot NaN, with no message."""

    def source(key, shape):
        return jnp.zeros(shape).at[0, 0].set(jnp.nan)

    pairs = jax.jit(lambda k, x: draw_pairs(k, x, source, exact_ot()))
    with pytest.raises(Exception, match="the source's draw x1 contains non-finite values"):
        jax.block_until_ready(pairs(jax.random.key(0), X))
    fine = jax.jit(lambda k, x: draw_pairs(k, x, lambda k, s: jnp.ones(s), exact_ot()))
    assert np.all(np.isfinite(fine(jax.random.key(0), X)[1]))


@pytest.mark.parametrize("method", ["pigdm", "tmpd"])
def test_noiseless_posterior_guidance_is_finite_at_t_0(method):
    """sigma_y = 0 at t = 0 divided 0 by 0 (NaN) where the likelihood's move is 0 (B_t = 0)."""
    path = jd.vp_path()
    cov = jnp.array([[1.0, 0.6], [0.6, 0.5]])
    prior = jd.GaussianMixture(jnp.ones(1), jnp.array([[1.0, -0.5]]), cov[None])
    meas = jd.Measurement(jd.matrix_operator(jnp.array([[1.0, 1.0]])), jnp.array([2.0]), 0.0)
    x = jax.random.normal(jax.random.key(0), (4, 2))
    for target in ("x0", "v"):
        field = getattr(jd, method)(prior.field(path, target), path, meas)
        out = jax.jit(lambda x, t, field=field: field(x, t))(x, jnp.zeros((4,)))
        plain = prior.field(path, target)(x, jnp.zeros((4,)))
        np.testing.assert_allclose(out, plain, atol=1e-5)  # no move at t = 0


def test_ancestral_gradient_through_the_schedule_at_s_0():
    """The last step's variance 0^(1 - w) had an infinite slope: d/d beta_max was NaN for
    var_weight > 0. Now finite, and equal to a central difference within 1%."""
    field = jd.Field(lambda x, t: 0.5 * x, "eps")

    def out(beta_max, w):
        sampler = jd.samplers.ancestral(var_weight=w)
        path = jd.vp_path(0.1, beta_max)
        return jd.sample(jax.random.key(0), path, field, (4, 2), sampler=sampler, steps=5).x.sum()

    for w in (0.5, 1.0):
        grad = float(jax.grad(out)(20.0, w))
        fd = (float(out(20.5, w)) - float(out(19.5, w))) / 1.0
        assert np.isfinite(grad) and abs(grad - fd) < 0.01 * abs(fd), (w, grad, fd)


def test_shortcut_flow_matching_times_never_draw_0():
    """U[0, 1) draws t = 0 exactly once in 2^23, an inf velocity target on the cosine path: key
    79888 does so among the 48 flow-matching times of a batch of 64 (found by a search). The
    shortcut loss's default draws (0, 1] now: finite there."""
    from jaxdiff.shortcut import shortcut_loss

    key = jax.random.key(79888)
    old = uniform_time(0.0, 1.0)(jax.random.split(key, 4)[0], (48,))  # the loss's t_key
    assert float(old.min()) == 0.0
    net = jd.Field(lambda p, z, t, r: p * z, "velocity")
    x0 = jax.random.normal(jax.random.key(1), (64, 2))
    assert np.isfinite(float(shortcut_loss(net, jd.cosine_path())(1.0, key, x0)))
    t = _Uniform(0.0, 1.0, from_top=True)(key, (4096,))
    assert float(t.min()) > 0 and float(t.max()) <= 1.0 and abs(float(t.mean()) - 0.5) < 0.02


def test_small_batches_get_both_parts_of_the_static_split():
    assert [static_split(0.75, n) for n in (2, 3, 4, 256)] == [1, 2, 3, 192]
    assert [static_split(0.25, n) for n in (2, 3, 4, 256)] == [1, 1, 1, 64]
    assert static_split(0.0, 2) == 0 and static_split(1.0, 2) == 2
    assert static_split(0.0, 1) == 0 and static_split(1.0, 1) == 1
    for fraction in (0.25, 0.75):  # a batch of 1 holds one part only: refused (stop 55)
        with pytest.raises(ValueError, match="a batch of 1 cannot hold"):
            static_split(fraction, 1)
    # MeanFlow at batch 2 trained flow matching only (round(1.5) = 2): now one r < t example
    net = jd.Field(lambda p, z, t, r: p * z * (1.0 + t - r)[:, None], "velocity")
    x0 = jax.random.normal(jax.random.key(1), (2, 3))

    def value(fraction):
        loss = jd.meanflow_loss(net, flow_matching_fraction=fraction)
        return float(loss(jnp.float32(0.7), jax.random.key(2), x0))

    assert abs(value(0.75) - value(1.0)) > 1e-3


def test_meanflow_loss_is_float32_for_a_bfloat16_network():
    net = jd.Field(lambda p, z, t, r: (p * z).astype(jnp.bfloat16), "velocity")
    x0 = jax.random.normal(jax.random.key(1), (8, 64)).astype(jnp.bfloat16)
    for fraction in (1.0, 0.75):
        loss = jd.meanflow_loss(net, flow_matching_fraction=fraction)
        assert loss(jnp.float32(0.5), jax.random.key(2), x0).dtype == jnp.float32


def test_nelbo_refuses_eps_at_zero_terminal_snr_at_trace_time():
    """Under jit the refusal was an opaque run-time callback error; the path is known."""
    field = jd.Field(lambda x, t: 0.0 * x, "eps")
    x0 = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="alpha_1 = 0 .* train the 'x0', 'v' or 'velocity'"):
        jax.jit(lambda k, x: jd.nelbo(k, jd.linear_path(), field, x, steps=10).total)(
            jax.random.key(0), x0
        )


def test_a_uniform_sampler_whose_t_min_gives_an_inf_loss_is_refused():
    """U[t_min, 1) draws t_min itself once in 2^23: where the loss is not finite there (a velocity
    on VP or cosine at t = 0, a score at sigma = 0) it is refused when the loss is built, and
    flow_matching_loss's default starts at 1e-3 on such paths (U[0, 1] on the linear path)."""
    from jaxdiff.shortcut import shortcut_loss

    def net(target):
        return jd.Field(lambda p, x, t: p * x, target)

    zero = uniform_time(0.0, 1.0)
    for target, path in (("velocity", jd.vp_path()), ("score", jd.linear_path())):
        with pytest.raises(ValueError, match=r"uniform_time\(0.0, 1.0\) draws t = 0.0 itself"):
            jd.diffusion_loss(net(target), path, time_sampler=zero)
    jd.diffusion_loss(net("eps"), jd.vp_path(), time_sampler=zero)  # finite at t = 0
    two = jd.Field(lambda p, z, t, r: p * z, "velocity")
    with pytest.raises(ValueError, match="not finite at t = \\[0.0\\]"):
        shortcut_loss(two, jd.cosine_path(), time_sampler=zero)
    key, x0 = jax.random.key(0), jax.random.normal(jax.random.key(1), (64, 2))
    for path, t_min in ((jd.vp_path(), 1e-3), (jd.cosine_path(), 1e-3), (jd.linear_path(), 0.0)):
        default = jd.flow_matching_loss(net("velocity"), path)(1.5, key, x0)
        given = jd.flow_matching_loss(net("velocity"), path, time_sampler=uniform_time(t_min, 1.0))
        assert float(default) == float(given(1.5, key, x0))


def test_classifier_free_guidance_broadcasts_one_time_and_keeps_its_scale_wide():
    """A t of shape (1,) was doubled to (2,), which no longer broadcast over the 2n rows; with
    bfloat16 data the scale 1.3 was rounded to 1.296875."""
    from jaxdiff._checks import expand_like

    f = jd.Field(lambda x, t, y: x * y[:, None] * expand_like(jnp.asarray(t), x), "eps")
    g = jd.classifier_free_guidance(f, jnp.array([2.0, 1.0]), 0.0, scale=3.0)
    x = jnp.ones((2, 2))
    np.testing.assert_array_equal(g(x, jnp.full(1, 0.5)), g(x, jnp.full(2, 0.5)))
    np.testing.assert_allclose(g(x, jnp.full(1, 0.5)), [[3.0, 3.0], [1.5, 1.5]])
    wide = jd.Field(lambda x, t, y: jnp.ones(x.shape, jnp.float32) * y[:, None], "eps")
    g = jd.classifier_free_guidance(wide, jnp.array([1.0]), 0.0, scale=1.3)
    out = g(jnp.ones((1, 2), jnp.bfloat16), 0.5)
    assert out.dtype == jnp.float32 and abs(float(out[0, 0]) - 1.3) < 1e-6


def test_clipping_an_infinite_data_estimate_is_an_error_under_jit():
    """At alpha_t = 0 an eps field's x0 is inf; clip_x0 made it a finite, wrong +-1 under jit."""
    fe = jd.Field(lambda x, t: 0.5 * x, "eps")
    x = jnp.array([[2.0, -3.0]])
    for wrap in (jd.clip_x0, jd.dynamic_thresholding):
        with pytest.raises(Exception, match="the data estimate x0_hat to clip"):
            jax.block_until_ready(jax.jit(lambda t, w=wrap: w(fe, jd.linear_path())(x, t))(1.0))
        assert np.all(np.isfinite(jax.jit(lambda t, w=wrap: w(fe, jd.linear_path())(x, t))(0.5)))


def test_ancestral_predictor_gradient_at_s_0():
    from jaxdiff.samplers.langevin import ancestral_predictor

    x = jnp.ones((4, 2))

    def out(beta_max, s):
        path = jd.vp_path(0.1, beta_max)
        return ancestral_predictor(jax.random.key(0), path, x, 0.2, s, x, x).sum()

    assert np.isfinite(float(jax.grad(out)(20.0, 0.0)))  # NaN: sqrt's slope at var = 0


def test_log_likelihood_names_a_singular_or_per_sample_start():
    from jaxdiff.likelihood import log_likelihood

    f = jd.Field(lambda x, t: 0.1 * x, "eps")
    x = jnp.ones((2, 2))
    with pytest.raises(ValueError, match="not finite at t_start .* start at t_start > 0"):
        log_likelihood(jd.vp_path(), f, x, t_start=0.0)  # ran to max_steps, then blamed them
    with pytest.raises(ValueError, match=r"t_start must be a scalar .* got shape \(2,\)"):
        log_likelihood(jd.vp_path(), f, x, t_start=jnp.full((2,), 1e-3))


def test_a_raw_key_comes_back_raw_from_a_checkpoint(tmp_path):
    import optax

    from jaxdiff.checkpoint import Checkpointer
    from jaxdiff.train import init_train_state

    state = init_train_state({"w": jnp.ones(3)}, optax.sgd(0.1), jax.random.PRNGKey(0))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state)
        back, _ = ckpt.restore(state)
    assert back.key.dtype == jnp.uint32 and jax.tree.structure(back) == jax.tree.structure(state)
    np.testing.assert_array_equal(back.key, state.key)


def test_reverse_family_at_an_infinite_g_with_eta_0():
    """g is infinite at t = 1 on the linear path: 0 * inf was NaN for an eta of 0 given as a
    function of t or traced (a Python 0 was caught)."""
    path, f = jd.linear_path(), jd.Field(lambda x, t: -x, "velocity")
    x = jnp.ones((2, 2))
    assert float(jd.reverse_diffusion(path, 1.0, eta=0.0)) == 0.0
    for drift in (
        jd.reverse_drift(path, f, x, 1.0, eta=lambda t: 0.0 * t),
        jax.jit(lambda e: jd.reverse_drift(path, f, x, 1.0, eta=e))(0.0),
    ):
        np.testing.assert_array_equal(drift, -x)


def test_log_snr_grids_stay_decreasing_when_a_cap_is_past_the_other_end():
    """From t = 1 (alpha = 0) the grid starts at EDM's cap lambda = -8.76; to t_end = 0.99
    (lambda = -9.19) it ran backwards: [1, 0.9877, 0.9889, 0.99]."""
    from jaxdiff.schedules import karras_grid, log_snr_grid

    for grid in (
        log_snr_grid(jd.linear_path(), 3, 1.0, 0.99),
        karras_grid(jd.linear_path(), 3, 1.0, 0.99),
    ):
        assert float(grid[0]) == 1.0 and float(grid[-1]) == pytest.approx(0.99)
        assert np.all(np.diff(np.asarray(grid)) < 0), grid


def test_conditional_fields_name_a_known_t_where_sigma_is_0():
    x = jnp.ones((2, 2))
    for path in (jd.linear_path(), jd.vp_path()):
        with pytest.raises(
            ValueError, match=r"conditional velocity divides by sigma_t, .* t = \[0.0\]"
        ):
            path.conditional_velocity(x, x, 0.0)
        with pytest.raises(ValueError, match="conditional score divides by sigma_t"):
            path.conditional_score(x, x, jnp.array([0.5, 0.0]))
        assert np.all(np.isfinite(path.conditional_velocity(x, 0.5 * x, 0.5)))


def test_the_oracle_predicts_every_target_in_x_dtype():
    mix = jd.GaussianMixture.isotropic(jnp.array([[1.0, 0.0]]), std=0.5)
    x = jnp.ones((3, 2), jnp.bfloat16)
    for target in ("score", "x0", "eps", "v", "velocity"):
        assert mix.predict(jd.vp_path(), x, 0.5, target).dtype == jnp.bfloat16, target


def test_sampler_gradients_from_alpha_0_are_finite(x64):
    """From t = 1 on the cosine path (alpha = 0): the discarded branches' 0 * inf made these
    gradients in the schedule's parameter NaN (EDM's Heun in every parameter, the linear path's
    default start); now they equal central differences."""
    from jaxdiff import samplers as S

    data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    x1 = jax.random.normal(jax.random.key(1), (3, 2), jnp.float64)
    for sampler in (S.edm_heun(), S.dpm_solver_pp(2), S.dpm_solver_pp(3, eta=1.0),
                    S.dpm_solver_2s(), S.dpm_solver_sde()):  # fmt: skip

        def out(offset, sampler=sampler):
            path = jd.cosine_path(offset)
            field = data.field(path, "x0")
            return jd.sample(jax.random.key(0), path, field, x_init=x1, sampler=sampler,
                             steps=4).x.sum()  # fmt: skip

        forward = jax.jit(out)  # one compile for both differences (eagerly: one per offset)
        grad, h = float(jax.jit(jax.grad(out))(0.008)), 1e-7
        fd = (float(forward(0.008 + h)) - float(forward(0.008 - h))) / (2 * h)
        assert abs(grad - fd) < 1e-4 * max(1.0, abs(fd)), (sampler.name, grad, fd)


def test_hooks_need_a_key_and_a_solver_without_fsal():
    import diffrax

    f = jd.Field(lambda x, t: -x, "velocity")
    x = jnp.ones((2, 2))

    def hook(key, state, t):
        return state

    with pytest.raises(ValueError, match="or with a hook .* needs a PRNG key"):
        jd.sample(None, jd.vp_path(), f, x_init=x, sampler=jd.samplers.ode(diffrax.Heun()),
                  steps=3, hook=hook)  # fmt: skip
    with pytest.raises(ValueError, match="first stage, which a hook that moves x makes stale"):
        jd.sample(jax.random.key(0), jd.vp_path(), f, x_init=x,
                  sampler=jd.samplers.ode(diffrax.Tsit5()), steps=3, hook=hook)  # fmt: skip


def test_the_digits_name_a_bad_split_size_or_channel_count():
    from jaxdiff.data import digits_images, load_digits

    with pytest.raises(ValueError, match="test_size must be an integer >= 0; got -3"):
        load_digits(test_size=-3)  # silently swapped the train and test sizes
    with pytest.raises(ValueError, match="at most the 1,797 digits"):
        load_digits(test_size=5000)
    with pytest.raises(ValueError, match="channels must be a positive integer; got 0"):
        digits_images(channels=0)
