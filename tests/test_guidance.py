"""Classifier-free guidance at scale > 1: the same guided dynamics in every target, Ho & Salimans'
``w`` convention, and the guidance interval (exact identities on the mixture oracle; no sampling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

MEANS = jnp.array([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])
DATA = jd.GaussianMixture.isotropic(MEANS, 0.4)
COMPS = [jd.GaussianMixture.isotropic(MEANS[k : k + 1], 0.4) for k in range(3)]
PATH = jd.vp_path()
NULL = 3


def conditional(target):
    """The mixture as a class-conditional model: label k is component k, label 3 the mixture."""

    def field(x, t, labels):
        preds = jnp.stack([c.predict(PATH, x, t, target) for c in [*COMPS, DATA]])
        return jnp.take_along_axis(preds, labels[None, :, None], axis=0)[0]

    return jd.Field(field, target)


X = jax.random.normal(jax.random.key(0), (64, 2)) * 2.5
T = jax.random.uniform(jax.random.key(1), (64,), minval=0.05, maxval=0.95)
LABELS = jax.random.randint(jax.random.key(2), (64,), 0, 3)


@pytest.mark.parametrize("target", ["eps", "x0", "v", "velocity"])
def test_guidance_at_scale_three_is_the_same_in_every_target(target):
    scale = 3.0

    @jax.jit  # one program: eagerly, each op is compiled on its own
    def scores(X, T):
        guided = jd.classifier_free_guidance(conditional(target), LABELS, NULL, scale)(X, T)
        as_score = jd.convert(PATH, X, T, guided, src=target, dst="score")
        c = COMPS[0].score(PATH, X, T) * (LABELS == 0)[:, None]
        for k in (1, 2):
            c = c + COMPS[k].score(PATH, X, T) * (LABELS == k)[:, None]
        return as_score, c, DATA.score(PATH, X, T)

    as_score, c, u = scores(X, T)
    w = scale - 1.0  # Ho & Salimans' weight: (1 + w) c - w u
    np.testing.assert_allclose(as_score, (1 + w) * c - w * u, rtol=2e-4, atol=2e-4)
    assert float(jnp.max(jnp.abs(as_score - c))) > 0.5  # guidance really moved the field


def test_guidance_interval_guides_only_inside():
    field = conditional("eps")
    plain = jd.classifier_free_guidance(field, LABELS, NULL, 1.0)(X, T)
    full = jd.classifier_free_guidance(field, LABELS, NULL, 4.0)(X, T)
    windowed = jd.classifier_free_guidance(field, LABELS, NULL, 4.0, interval=(0.3, 0.7))(X, T)
    inside = ((T >= 0.3) & (T <= 0.7))[:, None]
    assert 10 < int(inside.sum()) < 54  # both cases present
    np.testing.assert_allclose(windowed, jnp.where(inside, full, plain), rtol=1e-6)
    with pytest.raises(ValueError, match=r"labels have shape \(64,\); expected \(8, ...\)"):
        jd.classifier_free_guidance(field, LABELS, NULL, 2.0)(X[:8], T[:8])
    windowed_jit = jax.jit(
        lambda x, t: jd.classifier_free_guidance(field, LABELS, NULL, 4.0, interval=(0.3, 0.7))(
            x, t
        )
    )
    np.testing.assert_allclose(windowed_jit(X, T), windowed, rtol=1e-6)


def test_guidance_interval_calls_only_the_conditional_half_outside():
    """Outside the interval one network call on the n rows, not 2n (runtime rows counted by a
    callback); a bfloat16 network's output comes back in one dtype either way; vmap and grad go
    through."""
    rows = []

    def net(x, t, labels):
        jax.debug.callback(lambda r: rows.append(int(r)), jnp.asarray(x.shape[0]))
        return conditional("eps")(x, t, labels).astype(jnp.bfloat16)

    field = jax.jit(
        lambda x, t: jd.classifier_free_guidance(
            jd.Field(net, "eps"), LABELS[:8], NULL, 4.0, interval=(0.3, 0.7)
        )(x, t)
    )
    for t, expected in ((0.9, [8]), (0.5, [16]), (0.1, [8])):
        rows.clear()
        out = field(X[:8], jnp.full(8, t))
        jax.effects_barrier()
        assert rows == expected and out.dtype == jnp.float32
        c = conditional("eps")(X[:8], jnp.full(8, t), LABELS[:8]).astype(jnp.bfloat16)
        u = conditional("eps")(X[:8], jnp.full(8, t), jnp.full(8, NULL)).astype(jnp.bfloat16)
        want = u + jnp.float32(4.0) * (c - u) if expected == [16] else c  # as _cfg: scale in f32
        # outside: the network's own output; inside: bfloat16 c and u may differ by an ulp (~0.008
        # at 2.5) between the doubled batch and these calls, times the scale 4
        tol = dict(rtol=1e-6) if expected == [8] else dict(atol=0.05)
        np.testing.assert_allclose(out, want.astype(jnp.float32), **tol)
    ts = jnp.array([[0.9] * 8, [0.5] * 8])  # vmapped: one batch outside, one inside
    both = jax.vmap(field, in_axes=(None, 0))(X[:8], ts)
    np.testing.assert_allclose(both[0], field(X[:8], ts[0]), rtol=1e-6)
    np.testing.assert_allclose(both[1], field(X[:8], ts[1]), rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(field(x, jnp.full(8, 0.9))))(X[:8])
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 0


@pytest.mark.parametrize(
    ("interval", "message"),
    [
        ((0.7, 0.3), r"0 <= t_lo < t_hi \(finite\); got \(0.7, 0.3\)"),
        ((-0.1, 0.5), r"got \(-0.1, 0.5\)"),
        ((0.0, float("nan")), r"got \(0.0, nan\)"),
    ],
)
def test_guidance_interval_is_checked_eagerly_and_under_jit(interval, message):
    field = conditional("eps")
    with pytest.raises(ValueError, match=message):
        jd.classifier_free_guidance(field, LABELS, NULL, 2.0, interval=interval)
    guided = jax.jit(
        lambda x, t: jd.classifier_free_guidance(field, LABELS, NULL, 2.0, interval=interval)(x, t)
    )
    with pytest.raises(ValueError, match=message):
        guided(X, T)


def test_clipping_and_thresholding_of_the_data_estimate():
    field = DATA.field(PATH, "eps")
    x, t = X * 3.0, jnp.full(64, 0.9)  # far out: the data estimate leaves [-1, 1]
    x0 = jd.predict(PATH, field, x, t)[0]
    assert float(jnp.max(jnp.abs(x0))) > 1.5
    clipped = jd.clip_x0(field, PATH, 1.0)
    assert clipped.target == "x0"
    np.testing.assert_allclose(clipped(x, t), jnp.clip(x0, -1.0, 1.0), rtol=1e-6)
    dyn = jd.dynamic_thresholding(field, PATH, percentile=0.5)(x, t)
    s = jnp.maximum(jnp.quantile(jnp.abs(x0), 0.5, axis=1), 1.0)[:, None]  # per sample
    np.testing.assert_allclose(dyn, jnp.clip(x0, -s, s) / s, rtol=1e-5)
    with pytest.raises(ValueError, match="value must be > 0"):
        jd.clip_x0(field, PATH, -1.0)  # clip_x0=-1 used to return -1 everywhere
    with pytest.raises(ValueError, match="corrector_steps must be an integer >= 0"):
        jd.samplers.pc(corrector_steps=-1)  # used to fail inside MLIR


def _log_p_label0(path):
    """The exact ``log p(label 0 | x_t)`` of the mixture (equal weights)."""

    def log_p(x, t):
        logs = jnp.stack([c.marginal_log_prob(path, x, t) for c in COMPS])
        return logs[0] - jax.nn.logsumexp(logs, axis=0)

    return log_p


@pytest.mark.parametrize("path_fn", [jd.linear_path, jd.cosine_path, jd.vp_path])
@pytest.mark.parametrize("target", ["score", "eps", "x0", "v", "velocity"])
def test_classifier_guidance_at_scale_one_is_the_class_in_every_target(path_fn, target):
    """Bayes: the score of ``p(x_t | y)`` is ``score p(x_t) + grad log p(y | x_t)``, so classifier
    guidance with the exact ``log p(label 0 | x_t)`` at scale 1 predicts component 0's target.
    Also where ``alpha_t = 0`` (``t = 1`` on the linear and cosine paths, where samplers of x0,
    v and velocity fields start; it raised or gave NaN there): the gradient is 0 and the target's
    slope in the score infinite, and the move is their limit. Per-sample times mixing both."""
    path = path_fn()
    log_p = _log_p_label0(path)
    guided = jd.classifier_guidance(DATA.field(path, target), path, log_p, 1.0)
    at_zero = float(path.alpha(1.0)) == 0 and target not in ("score", "eps")
    ts = T.at[:16].set(1.0) if at_zero or float(path.alpha(1.0)) > 0 else T
    want = COMPS[0].predict(path, X, ts, target)
    run = jax.jit(lambda x, t: guided(x, t))
    np.testing.assert_allclose(run(X, ts), want, rtol=1e-4, atol=2e-4)
    if at_zero:  # the move at t = 1 is not 0: the class's prediction is 3 from the mixture's
        unguided = DATA.predict(path, X, ts, target)
        assert float(jnp.min(jnp.abs(want[:16, 0] - unguided[:16, 0]))) > 1.0
        at_one = run(X, 1.0)  # a scalar time at alpha = 0
        np.testing.assert_allclose(at_one, COMPS[0].predict(path, X, 1.0, target), atol=2e-4)
    if at_zero and target == "velocity":  # from t = 1 to the class (unguided: a third of it)
        # jitted: an eager sample compiles its set-up op by op
        sol = jax.jit(lambda k: jd.sample(k, path, guided, (512, 2), steps=40))(jax.random.key(3))
        near = jnp.linalg.norm(sol.x - MEANS[0][None], axis=-1) < 2.0
        assert float(jnp.mean(near)) > 0.99


@pytest.mark.parametrize("target", ["score", "eps"])
def test_classifier_guidance_of_score_and_eps_at_alpha_zero_uses_the_gradient(target):
    """Their slope in the score (1, -sigma) is finite where alpha_t = 0: the move is
    scale * B_t * grad there too (the alpha -> 0 limit of x0, v and velocity gave 0 for a
    t-independent classifier, and NaN for one with an infinite d grad / dt at t = 1)."""
    path = jd.linear_path()
    w = jnp.array([1.0, -2.0])
    field = jd.Field(lambda x, t: jnp.zeros_like(x), target)
    t = jnp.array([1.0, 0.5, 1.0])
    slope = jnp.ones(3) if target == "score" else -path.sigma(t)
    for log_p, g in [
        (lambda x, t: x @ w, jnp.ones(3)),
        (lambda x, t: jnp.sqrt(1.0 - t) * (x @ w), jnp.sqrt(1.0 - t)),
    ]:
        guided = jd.classifier_guidance(field, path, log_p, 2.0)
        got = jax.jit(lambda x, t, guided=guided: guided(x, t))(jnp.ones((3, 2)), t)
        want = 2.0 * (slope * g)[:, None] * w[None, :]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_classifier_guidance_refuses_a_path_flat_at_alpha_zero():
    path = jd.GaussianPath(lambda t: (1 - t) ** 2, lambda t: t)  # alpha_1 = alpha_1' = 0
    log_p = _log_p_label0(path)
    guided = jd.classifier_guidance(DATA.field(path, "x0"), path, log_p, 1.0)
    run = jax.jit(lambda x, t: guided(x, t))  # one compile for both calls
    with pytest.raises(Exception, match="alpha_t' = 0"):
        jax.block_until_ready(run(X[:3], jnp.ones(3)))
    assert bool(jnp.all(jnp.isfinite(run(X[:3], jnp.full(3, 0.9)))))


def test_classifier_guidance_returns_x_dtype():
    """As before b82fc6a (and as jd.convert, jd.dps): a float32 prediction for a bfloat16 x comes
    back in bfloat16 (it came back in the prediction's float32)."""
    field = jd.Field(lambda x, t: jnp.zeros(x.shape, jnp.float32), "x0")
    x = jnp.ones((2, 3), jnp.bfloat16)
    for target_field in (field, jd.Field(field.fn, "eps")):
        guided = jd.classifier_guidance(target_field, PATH, lambda x, t: jnp.sum(x, -1), 1.0)
        # only the dtype is asserted: traced, not run (eagerly, each op compiled on its own)
        assert jax.eval_shape(guided, x, jnp.full(2, 0.5)).dtype == jnp.bfloat16


def test_classifier_free_guidance_takes_one_label_for_the_batch():
    """A scalar label ("sample class 7") was refused ("labels have shape (); expected (4, ...)")
    while a scalar null label was taken; it now labels every sample, as the broadcast labels do,
    with and without an interval, and under jit."""
    f = jd.Field(lambda x, t, y: x * (1.0 + y[:, None]) + t[:, None], "eps")
    x, t = jnp.arange(8.0).reshape(4, 2), jnp.array([0.1, 0.5, 0.7, 0.9])
    for interval in (None, (0.4, 0.8)):
        one = jd.classifier_free_guidance(f, 7, -1, 2.5, interval=interval)
        each = jd.classifier_free_guidance(f, jnp.full(4, 7), -1, 2.5, interval=interval)
        np.testing.assert_array_equal(one(x, t), each(x, t))
        np.testing.assert_array_equal(jax.jit(lambda x, t, g=one: g(x, t))(x, t), each(x, t))
    guided = jd.classifier_free_guidance(f, 7, -1, 2.5)(x, t)  # u + 2.5 (c - u), c - u = 8 x
    np.testing.assert_allclose(guided, x * 0.0 + t[:, None] + 2.5 * 8 * x, rtol=1e-6)


def test_guidance_of_a_two_time_field_in_the_meanflow_sampler():
    """The meanflow() sampler calls field(x, t, r): the guided field passes r on before the
    labels (the usability audit's U4: '_cfg() takes 3 positional arguments but 4 were given').
    One step from t = 1 to 0 is x - u(x, 1, 0): with u = y (x + t - r), the guided average
    velocity is u_null + 3 (u_c - u_null) = (0 + 3 (2 - 0)) (x + 1)."""

    def fn(x, t, *a):  # (x, t, labels) or (x, t, r, labels), as the docstring's recipe
        r, y = (t, a[0]) if len(a) == 1 else a
        return y[:, None] * (x + (t - r)[:, None])

    two_time = jd.Field(fn, "velocity")
    guided = jd.classifier_free_guidance(two_time, jnp.array([2.0, 2.0]), 0.0, 3.0)
    x = jnp.array([[1.0, -2.0], [0.5, 0.0]])
    sol = jd.sample(None, jd.linear_path(), guided, x_init=x, sampler=jd.samplers.meanflow(),
                    steps=1, t_end=0.0)  # fmt: skip
    np.testing.assert_allclose(sol.x, x - 6.0 * (x + 1.0), rtol=1e-6)
    inside = jd.classifier_free_guidance(two_time, jnp.array([2.0, 2.0]), 0.0, 3.0,
                                         interval=(0.5, 0.9))  # fmt: skip
    np.testing.assert_allclose(  # outside the interval only the conditional half: 2 (x + 1)
        inside(x, jnp.ones(2), jnp.zeros(2)), 2.0 * (x + 1.0), rtol=1e-6
    )


def test_classifier_guidance_takes_the_field_first_and_the_old_order_with_a_warning():
    """classifier_guidance(path, field, ...) had the other order from clip_x0(field, path) and
    jd.dps(field, path, ...) (the usability audit's U7). The field comes first now; the old order
    gives the same field, with a DeprecationWarning."""
    import jaxtyping

    field = DATA.field(PATH, "eps")
    log_p = lambda x, t: jnp.sum(jnp.sin(x), -1)  # noqa: E731
    x, t = jnp.arange(6.0).reshape(3, 2) / 3, jnp.array([0.2, 0.5, 0.8])
    new = jd.classifier_guidance(field, PATH, log_p, 1.5)(x, t)
    jaxtyping.config.update("jaxtyping_disable", True)  # the tests' type hook refuses it first
    try:
        with pytest.warns(DeprecationWarning, match=r"call classifier_guidance\(field, path"):
            old = jd.classifier_guidance(PATH, field, log_p, 1.5)
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
    np.testing.assert_array_equal(old(x, t), new)
    assert float(jnp.abs(new - field(x, t)).max()) > 0.1  # the guidance moved it


def test_classifier_guidance_with_the_mixtures_own_classifier_at_alpha_zero():
    # The stop-42 review's G1: the classifier GaussianMixture.log_responsibilities recommends
    # went through eigh, whose derivative is NaN at repeated eigenvalues: d/dt of the density was
    # NaN at every t, and the guidance NaN at alpha_t = 0 (t = 1 on the linear path), silently.
    means = jnp.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    mix = jd.GaussianMixture.isotropic(means, 0.5)
    first = jd.GaussianMixture.isotropic(means[:1], 0.5)
    path = jd.linear_path()
    logp = jax.vmap(lambda x, t: mix.marginal(path, t).log_responsibilities(x)[0])
    x = jax.random.normal(jax.random.key(0), (4, 2))
    t = jnp.array([1.0, 0.5, 1.0, 0.2])
    guided = jd.classifier_guidance(mix.field(path, "velocity"), path, logp, 1.0)
    for fn in (guided, jax.jit(lambda x, t: guided(x, t))):
        np.testing.assert_allclose(fn(x, t), first.predict(path, x, t, "velocity"), atol=1e-5)
    # a log_prob_fn whose d/dt is not finite is named at alpha_t = 0, not a NaN downstream
    bad = jd.classifier_guidance(
        mix.field(path, "velocity"), path, lambda x, t: jnp.sqrt(t - 1.0) * x[:, 0], 1.0
    )
    with pytest.raises(Exception, match="d/dt of grad_x log_prob_fn"):
        jax.block_until_ready(bad(x, jnp.ones(4)))


def test_autoguidance_is_the_affine_combination_in_every_target():
    """autoguidance(f, w, s) = w + s (f - w) (Karras et al. 2024): s = 1 gives f and 0 gives w,
    exactly; any s is the same combination in every target (weak given in another target is
    converted by path); outside the interval it is f; it samples."""
    weak_data = jd.GaussianMixture.isotropic(MEANS, 0.7)  # a "worse" model: wider components
    x = jax.random.normal(jax.random.key(0), (16, 2)) * 2.0
    t = jnp.linspace(0.05, 0.95, 16)
    f, w = DATA.field(PATH, "eps"), weak_data.field(PATH, "eps")
    np.testing.assert_array_equal(jd.autoguidance(f, w, 1.0)(x, t), f(x, t))
    np.testing.assert_array_equal(jd.autoguidance(f, w, 0.0)(x, t), w(x, t))
    want = w(x, t) + 2.5 * (f(x, t) - w(x, t))
    np.testing.assert_allclose(jd.autoguidance(f, w, 2.5)(x, t), want, rtol=1e-5, atol=1e-5)
    for target in ("x0", "velocity"):  # the same field in another target, weak as eps
        g = jd.autoguidance(DATA.field(PATH, target), w, 2.5, path=PATH)
        assert g.target == target
        np.testing.assert_allclose(
            jd.convert(PATH, x, t, g(x, t), src=target, dst="eps"), want, rtol=1e-4, atol=1e-4
        )
    with pytest.raises(ValueError, match="pass path= to convert"):
        jd.autoguidance(DATA.field(PATH, "x0"), w, 2.0)
    inside = jd.autoguidance(f, w, 2.5, interval=(0.3, 0.6))(x, t)
    mask = ((t >= 0.3) & (t <= 0.6))[:, None]
    np.testing.assert_allclose(inside, jnp.where(mask, want, f(x, t)), rtol=1e-5, atol=1e-5)
    late = jnp.full(16, 0.9)  # no time inside: field alone (the cond's other branch)
    np.testing.assert_array_equal(
        jd.autoguidance(f, w, 2.5, interval=(0.3, 0.6))(x, late), f(x, late)
    )
    x1 = jd.sample(jax.random.key(1), PATH, jd.autoguidance(f, w, 1.5), (256, 2), steps=20).x
    assert bool(jnp.all(jnp.isfinite(x1)))
