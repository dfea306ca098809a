"""Couplings: exact OT against brute force over all permutations, class-conditional pairs, the
Sinkhorn plan against POT's, row sampling of the plan, torchcfm's exact plan, sharding, and the
losses that consume them."""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff import couplings as C

PERMS6 = np.array(list(itertools.permutations(range(6))))  # all 720 assignments of 6 points


def _brute_force(cost: np.ndarray, perms: np.ndarray = PERMS6) -> tuple[np.ndarray, float]:
    totals = cost[np.arange(cost.shape[0])[None, :], perms].sum(1)
    best = int(np.argmin(totals))
    return perms[best], float(totals[best])


def _recover_perm(x1: np.ndarray, paired: np.ndarray) -> np.ndarray:
    """Index j with paired[i] == x1[j] (points are distinct)."""
    d = np.abs(paired[:, None] - x1[None]).reshape(len(x1), len(x1), -1).sum(-1)
    assert np.all(d.min(1) == 0)
    return d.argmin(1)


@pytest.mark.parametrize("seed", range(5))
def test_exact_ot_is_the_brute_force_optimum(seed):
    k0, k1 = jax.random.split(jax.random.key(seed))
    event = (2,) if seed % 2 else (2, 3)  # flattened event axes for images
    x0 = jax.random.normal(k0, (6, *event))
    x1 = jax.random.normal(k1, (6, *event)) + 0.5
    cost = np.asarray(C.squared_cost(x0, x1), np.float64)
    perm, best = _brute_force(cost)
    for coupling in (C.exact_ot(), jax.jit(C.exact_ot())):
        y0, y1 = coupling(jax.random.key(9), x0, x1)
        assert np.array_equal(np.asarray(y0), np.asarray(x0))  # rows (and labels) stay
        ours = _recover_perm(np.asarray(x1), np.asarray(y1))
        # Random continuous points: the optimum is unique, so the permutation itself must match.
        assert ours.tolist() == perm.tolist()
        np.testing.assert_allclose(cost[np.arange(6), ours].sum(), best, rtol=1e-6)


def test_class_conditional_ot_pairs_only_within_a_class():
    # 8 points in 2 classes of 4: the optimum is the per-class optimum (4! each by brute force).
    k0, k1 = jax.random.split(jax.random.key(3))
    x0 = jax.random.normal(k0, (8, 2))
    x1 = jax.random.normal(k1, (8, 2))
    labels = jnp.array([0, 1, 1, 0, 1, 0, 0, 1])
    cost = np.asarray(C.squared_cost(x0, x1), np.float64)
    expected = 0.0
    for c in (0, 1):
        idx = np.flatnonzero(np.asarray(labels) == c)
        perms4 = np.array(list(itertools.permutations(range(4))))
        expected += _brute_force(cost[np.ix_(idx, idx)], perms4)[1]
    for coupling in (
        C.exact_ot(class_conditional=True),
        C.sinkhorn_ot(0.5, class_conditional=True),
    ):
        y0, y1, y = jax.jit(coupling)(jax.random.key(0), x0, x1, labels)
        j = _recover_perm(np.asarray(x1), np.asarray(y1))
        assert np.array_equal(np.asarray(labels)[j], np.asarray(y))  # every pair within a class
        if isinstance(coupling, C.ExactOT):
            np.testing.assert_allclose(cost[np.arange(8), j].sum(), expected, rtol=1e-6)
    # Without the flag labels just follow x0; the unconstrained optimum is no worse.
    _, y1, _ = C.exact_ot()(jax.random.key(0), x0, x1, labels)
    j = _recover_perm(np.asarray(x1), np.asarray(y1))
    assert cost[np.arange(8), j].sum() <= expected + 1e-9
    with pytest.raises(ValueError, match="needs labels"):
        C.exact_ot(class_conditional=True)(jax.random.key(0), x0, x1)


def test_sinkhorn_plan_matches_pot(x64):
    ot = pytest.importorskip("ot")
    k0, k1 = jax.random.split(jax.random.key(1))
    x0, x1 = jax.random.normal(k0, (7, 2)), jax.random.normal(k1, (7, 2)) + 1.0
    cost = C.squared_cost(x0, x1)
    for reg in (1.0, 0.5):  # both converge to 1e-14 within 3000 iterations at these reg
        ours = np.exp(np.asarray(C.sinkhorn_plan(cost, reg, num_iters=3000)))
        a = np.full(7, 1 / 7)
        theirs = ot.sinkhorn(
            a, a, np.asarray(cost), reg, method="sinkhorn_log", numItermax=100_000, stopThr=1e-14
        )
        np.testing.assert_allclose(ours, theirs, atol=1e-10)


def test_sinkhorn_plan_limits(x64):
    # Marginals are 1/n; reg -> 0 recovers the exact OT cost, reg -> inf the independent one.
    k0, k1 = jax.random.split(jax.random.key(2))
    x0, x1 = jax.random.normal(k0, (6, 2)), jax.random.normal(k1, (6, 2)) + 1.0
    cost = np.asarray(C.squared_cost(x0, x1))
    exact = _brute_force(cost)[1] / 6
    # Columns are exact after the last g update; rows converge linearly, slowly for small reg
    # (5000 iterations at reg = 0.01 leave 3.5e-5).
    for reg, expected, tol, row_tol in ((0.01, exact, 1e-3, 1e-4), (1e4, cost.mean(), 1e-3, 1e-9)):
        plan = np.exp(np.asarray(C.sinkhorn_plan(jnp.asarray(cost), reg, num_iters=5000)))
        np.testing.assert_allclose(plan.sum(0), 1 / 6, atol=1e-9)
        np.testing.assert_allclose(plan.sum(1), 1 / 6, atol=row_tol)
        np.testing.assert_allclose((plan * cost).sum(), expected, rtol=tol)


def test_a_tolerance_run_has_the_implicit_derivative_in_both_modes(x64):
    """A tolerance run is a while loop, which has no reverse-mode derivative; its plan is
    differentiated implicitly at the fixed point (custom_root, conjugate gradients), in forward
    and reverse mode, against cost and reg. Checked against central differences of the same
    converged function (float64; measured within 6.3e-6 of entries up to 0.13) and a float32 run
    at the default tol against the float64 derivative (measured 1.7e-4)."""
    x0 = jax.random.normal(jax.random.key(0), (16, 2))
    x1 = jax.random.normal(jax.random.key(1), (16, 2)) + 1.0
    w = jnp.sin(x1[:, 0])[None, :]  # a second, plan-weighted term, not only the cost

    def value(x0, reg, tol=1e-12):
        cost = C.squared_cost(x0, x1.astype(x0.dtype))
        p = jnp.exp(C.sinkhorn_plan(cost, reg, 5000, tol=tol))
        return jnp.sum(p * cost) + jnp.sum(p * w.astype(x0.dtype) * x0[:, 1:2])

    grad = jax.jit(jax.grad(value, argnums=(0, 1)))(x0, 0.1)
    h = 1e-5
    same = jax.jit(value)  # the ten evaluations below: one compile, not ten eager solves
    for i, k in ((0, 0), (3, 1), (10, 0), (15, 1)):
        e = jnp.zeros_like(x0).at[i, k].set(h)
        fd = (same(x0 + e, 0.1) - same(x0 - e, 0.1)) / (2 * h)
        assert abs(float(grad[0][i, k] - fd)) < 2e-5, (i, k, float(grad[0][i, k]), float(fd))
    fd_reg = (same(x0, 0.1 + h) - same(x0, 0.1 - h)) / (2 * h)
    assert abs(float(grad[1] - fd_reg)) < 2e-5, (float(grad[1]), float(fd_reg))
    v = jax.random.normal(jax.random.key(3), x0.shape)
    _, forward = jax.jit(lambda x, v: jax.jvp(lambda x: value(x, 0.1), (x,), (v,)))(x0, v)
    np.testing.assert_allclose(forward, jnp.sum(grad[0] * v), rtol=1e-9)
    with jax.enable_x64(False):
        g32 = jax.jit(jax.grad(lambda x: value(x, 0.1, tol=1e-3)))(x0.astype(jnp.float32))
    assert g32.dtype == jnp.float32
    np.testing.assert_allclose(g32, grad[0], atol=1e-3)


def test_forbidden_pairs_keep_the_derivatives_finite_and_right(x64):
    """+inf entries (forbidden pairs) of the cost: the derivative in reg was NaN (plain and
    tolerance runs; (g - C) / eps at C = inf has an infinite slope in eps, times a weight of 0),
    and the tolerance run's forward mode was finite but wrong (0.61 off entries of 0.14: the
    tangent solve met a NaN right-hand side and its conjugate gradients returned 0). Checked
    against central differences (float64; measured within 1e-10)."""
    x0 = jax.random.normal(jax.random.key(0), (6, 2))
    x1 = jax.random.normal(jax.random.key(1), (6, 2)) + 0.5
    cost = C.squared_cost(x0, x1).at[0, 1].set(jnp.inf).at[2, 0].set(jnp.inf)
    allowed = jnp.isfinite(cost)
    v = jnp.where(allowed, jax.random.normal(jax.random.key(5), cost.shape), 0.0)
    w = jnp.cos(0.37 * jnp.arange(36.0).reshape(6, 6))
    h = 1e-6
    for tol, iters in ((None, 300), (1e-12, 3000)):

        def plan(c, reg, tol=tol, iters=iters):
            return jnp.exp(C.sinkhorn_plan(c, reg, iters, tol=tol))

        loss = jax.jit(lambda c, reg, plan=plan: jnp.sum(plan(c, reg) * w))
        grad_reg = jax.grad(loss, argnums=1)(cost, 0.5)
        fd_reg = (loss(cost, 0.5 + h) - loss(cost, 0.5 - h)) / (2 * h)
        assert abs(float(grad_reg - fd_reg)) < 1e-7, (tol, float(grad_reg), float(fd_reg))
        _, tangent = jax.jvp(lambda c, plan=plan: plan(c, 0.5), (cost,), (v,))
        fd = (plan(cost + h * v, 0.5) - plan(cost - h * v, 0.5)) / (2 * h)
        np.testing.assert_allclose(tangent, fd, atol=1e-7)
        assert float(jnp.max(jnp.abs(plan(cost, 0.5) * ~allowed))) == 0.0


def test_a_bfloat16_cost_is_transported_in_float32():
    """A bfloat16 cost kept the plan in bfloat16, whose marginals never came within 1e-2 (0.17 at
    2,000 iterations; the review's D9). The plan is computed in float32 now, to the float32 plan
    of the same cost. (sinkhorn_ot's cost of bfloat16 data is float32 already.)"""
    x0 = jax.random.normal(jax.random.key(0), (64, 2)).astype(jnp.bfloat16)
    x1 = jax.random.normal(jax.random.key(1), (64, 2)).astype(jnp.bfloat16)
    cost = C.squared_cost(x0, x1).astype(jnp.bfloat16)  # (squared_cost itself widens)
    plan = C.sinkhorn_plan(cost, 0.05, 2000, tol=1e-3)
    assert plan.dtype == jnp.float32 and float(C.marginal_error(plan)) <= 1.01e-3
    np.testing.assert_array_equal(
        plan, C.sinkhorn_plan(cost.astype(jnp.float32), 0.05, 2000, tol=1e-3)
    )
    y0, y1 = jax.jit(C.sinkhorn_ot(0.05))(jax.random.key(2), x0, x1)
    assert y1.dtype == jnp.bfloat16


def test_sinkhorn_iterates_to_its_tolerance_and_refuses_an_unconverged_plan():
    """The usability audit's U8: at reg = 0.01 on the checkerboard against N(0, I) the default 200
    iterations left row sums from 0.89 to 1.40 of their share, silently. Now the coupling iterates
    (reg annealed from the mean cost) until the marginals are within tol = 1e-3, to the plan of a
    long plain run, and refuses an unconverged plan by name. Measured (n = 64): 200 plain
    iterations leave 0.21; the tolerance run stops after 1,580 (3,260 plain ones are needed)."""
    x0 = jd.data.checkerboard(jax.random.key(0), 64)
    x1 = jax.random.normal(jax.random.key(1), (64, 2))
    cost = C.squared_cost(x0, x1)
    plan = jax.jit(lambda c: C.sinkhorn_plan(c, 0.01, 2000, tol=1e-3))(cost)
    assert float(C.marginal_error(plan)) <= 1e-3
    exact = C.sinkhorn_plan(cost, 0.01, 20_000)  # plain iterations, converged
    assert float(C.marginal_error(exact)) < 1e-4
    # rows sum to 1/64: measured entries within 4.2e-5 (0.3% of a row), costs within 2.9e-4
    np.testing.assert_allclose(jnp.exp(plan), jnp.exp(exact), atol=1e-4)
    np.testing.assert_allclose(jnp.sum(jnp.exp(plan) * cost), jnp.sum(jnp.exp(exact) * cost),
                               rtol=1e-3)  # fmt: skip
    assert float(C.marginal_error(C.sinkhorn_plan(cost, 0.01, 200))) > 0.1  # the old default
    with pytest.raises(Exception, match="sinkhorn_ot.reg=0.01, in squared-distance units. did not "
                       "converge in 200 iterations"):  # fmt: skip
        jax.jit(C.sinkhorn_ot(0.01, num_iters=200))(jax.random.key(2), x0, x1)
    y0, y1 = jax.jit(C.sinkhorn_ot(0.01))(jax.random.key(2), x0, x1)  # default: up to 2,000
    j = jax.random.categorical(jax.random.key(2), plan, axis=1)
    np.testing.assert_array_equal(y1, x1[j])
    y0, y1 = C.sinkhorn_ot(0.01, num_iters=200, tol=None)(jax.random.key(2), x0, x1)  # as it is
    j = jax.random.categorical(jax.random.key(2), C.sinkhorn_plan(cost, 0.01, 200), axis=1)
    np.testing.assert_array_equal(y1, x1[j])
    with pytest.raises(ValueError, match="tol must be a positive number or None; got 0.0"):
        C.sinkhorn_ot(0.1, tol=0.0)


def test_marginal_error_is_the_largest_relative_error_of_the_marginals():
    plan = jnp.array([[0.3, 0.1], [0.2, 0.4]])  # rows 0.4, 0.6; columns 0.5, 0.5 of 1/2 each
    np.testing.assert_allclose(C.marginal_error(jnp.log(plan)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(C.marginal_error(jnp.log(plan.T)), 0.2, rtol=1e-6)
    assert float(C.marginal_error(jnp.log(jnp.full((3, 5), 1 / 15)))) < 1e-6


def test_sinkhorn_coupling_draws_x1_from_the_rows_of_the_plan():
    # x0_i meets x1_j with probability n P_ij; 20,000 draws per row: SE of a frequency <= 0.0036.
    k0, k1 = jax.random.split(jax.random.key(4))
    x0, x1 = jax.random.normal(k0, (4, 2)), jax.random.normal(k1, (4, 2))
    coupling = C.sinkhorn_ot(1.0, num_iters=100)
    plan = 4 * np.exp(np.asarray(C.sinkhorn_plan(C.squared_cost(x0, x1), 1.0, 100)))
    np.testing.assert_allclose(plan.sum(1), 1.0, atol=1e-5)  # converged: rows are distributions
    keys = jax.random.split(jax.random.key(5), 20_000)
    y0, y1 = jax.jit(jax.vmap(coupling, in_axes=(0, None, None)))(keys, x0, x1)
    assert np.array_equal(np.asarray(y0[0]), np.asarray(x0))
    dist = np.abs(np.asarray(y1)[:, :, None] - np.asarray(x1)[None, None]).sum(-1)  # (draw, i, j)
    j = dist.argmin(-1)
    freq = np.stack([(j == k).mean(0) for k in range(4)], axis=1)  # freq[i, k]
    assert np.abs(freq - plan).max() < 5 * 0.0036, (freq, plan)


def test_exact_ot_agrees_with_torchcfm():
    torch = pytest.importorskip("torch")
    otp = pytest.importorskip("torchcfm.optimal_transport")
    k0, k1 = jax.random.split(jax.random.key(6))
    x0 = jax.random.normal(k0, (64, 2))
    x1 = jd.data.moons(k1, 64)
    pi = otp.OTPlanSampler(method="exact").get_map(
        torch.from_numpy(np.array(x0)),
        torch.from_numpy(np.array(x1)),  # writable copies
    )
    theirs = pi.argmax(1)
    assert np.allclose(pi.max(1), 1 / 64)  # a permutation plan
    _, y1 = C.exact_ot()(jax.random.key(0), x0, x1)
    ours = _recover_perm(np.asarray(x1), np.asarray(y1))
    cost = np.asarray(C.squared_cost(x0, x1), np.float64)
    np.testing.assert_allclose(
        cost[np.arange(64), ours].sum(), cost[np.arange(64), theirs].sum(), rtol=1e-6
    )
    assert (ours == theirs).mean() == 1.0


def test_coupling_errors():
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="equal shape"):
        C.exact_ot()(jax.random.key(0), x, jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="labels must have shape"):
        C.independent()(jax.random.key(0), x, x, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="reg must be a positive"):
        C.sinkhorn_ot(0.0)
    with pytest.raises(ValueError, match="square cost"):
        C.assignment(jnp.zeros((3, 4)))
    # A NaN batch, or distances whose squares overflow float32, raise when they run (NaN pairs
    # before, with no message: the review of stop 53), never a silent wrong pairing
    for x1 in (x.at[0, 0].set(jnp.nan), x.at[0, 0].set(1e20)):
        with pytest.raises(Exception, match="exact_ot: a squared distance between the points"):
            jax.block_until_ready(jax.jit(C.exact_ot())(jax.random.key(0), x, x1))
    ints = jnp.arange(8, dtype=jnp.int32).reshape(4, 2)  # integer points keep their dtype
    assert C.exact_ot()(jax.random.key(0), ints, ints[::-1])[1].dtype == jnp.int32


def test_losses_train_on_the_coupled_pairs():
    # A zero velocity network: the flow-matching loss is mean |x1 - x0|^2 / d of the pairs it saw,
    # i.e. the OT cost per point with the exact coupling, more with the independent one.
    zero = jd.Field(lambda p, x, t: jnp.zeros_like(x), "velocity")
    x0 = jd.data.moons(jax.random.key(0), 128)
    x1 = jax.random.normal(jax.random.key(1), (128, 2))
    cost = np.asarray(C.squared_cost(x0, x1), np.float64)
    best = C.exact_ot()(jax.random.key(0), x0, x1)[1]
    ot_cost = float(np.sum((np.asarray(best) - np.asarray(x0)) ** 2)) / 256
    batch = {"x0": x0, "x1": x1}
    ot = jd.flow_matching_loss(zero, coupling=C.exact_ot())
    ind = jd.flow_matching_loss(zero)
    np.testing.assert_allclose(jax.jit(ot)(None, jax.random.key(2), batch), ot_cost, rtol=1e-4)
    np.testing.assert_allclose(ind(None, jax.random.key(2), batch), cost.trace() / 256, rtol=1e-5)
    assert ot_cost < 0.5 * cost.trace() / 256


SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxdiff as jd
from jaxdiff.train import data_mesh

mesh = data_mesh()
x0 = jax.random.normal(jax.random.key(0), (64, 2))
x1 = jax.random.normal(jax.random.key(1), (64, 2))
sh = NamedSharding(mesh, P("data"))
run = jax.jit(jd.per_device(jd.exact_ot(), mesh))
y0, y1 = run(jax.random.key(2), jax.device_put(x0, sh), jax.device_put(x1, sh))
local = [jd.exact_ot()(jax.random.key(0), x0[i:i + 16], x1[i:i + 16])[1] for i in range(0, 64, 16)]
# one global plan on the sharded batch: XLA gathers it for the host call, same pairs as unsharded
g0, g1 = jax.jit(jd.exact_ot())(jax.random.key(2), jax.device_put(x0, sh), jax.device_put(x1, sh))
# entropic OT per shard (it failed under shard_map: scan carries and the tolerance check were not
# marked as varying over the devices); each shard draws with fold_in(key, device index)
sk = jd.sinkhorn_ot(0.5)
s0, s1 = jax.jit(jd.per_device(sk, mesh))(jax.random.key(2), jax.device_put(x0, sh),
                                          jax.device_put(x1, sh))
k2 = jax.random.key(2)
s_local = [sk(jax.random.fold_in(k2, i // 16), x0[i:i + 16], x1[i:i + 16])[1] for i in range(0, 64, 16)]
try:
    jax.block_until_ready(jax.jit(jd.per_device(jd.sinkhorn_ot(1e-4, num_iters=20), mesh))(k2, x0, x1))
    refused = False
except Exception as err:
    refused = "did not converge in 20 iterations" in str(err)
print(json.dumps({
    "sinkhorn_diff": float(jnp.max(jnp.abs(s1 - jnp.concatenate(s_local)))),
    "sinkhorn_refused": refused,
    "global_diff": float(jnp.max(jnp.abs(g1 - jd.exact_ot()(jax.random.key(2), x0, x1)[1]))),
    "devices": jax.device_count(),
    "sharded": len(y1.sharding.device_set),
    "max_diff": float(jnp.max(jnp.abs(y1 - jnp.concatenate(local)))),
    "rows_kept": bool(jnp.all(y0 == x0)),
}))
"""


def test_per_device_plans_on_four_fake_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {
        "sinkhorn_diff": 0.0,
        "sinkhorn_refused": True,
        "global_diff": 0.0,
        "devices": 4,
        "sharded": 4,
        "max_diff": 0.0,
        "rows_kept": True,
    }


def test_class_conditional_coupling_inside_the_loss():
    # (x0, labels) batch, a zero conditional network: the loss is the within-class OT cost.
    zero = jd.Field(lambda p, x, t, y: jnp.zeros_like(x), "velocity")
    x0 = jax.random.normal(jax.random.key(0), (8, 2))
    x1 = jax.random.normal(jax.random.key(1), (8, 2)) + 1.0
    labels = jnp.array([0, 1, 1, 0, 1, 0, 0, 1])
    _, y1, _ = C.exact_ot(class_conditional=True)(jax.random.key(0), x0, x1, labels)
    expected = float(jnp.sum((y1 - x0) ** 2)) / 16
    loss = jd.flow_matching_loss(zero, coupling=C.exact_ot(class_conditional=True))
    value = jax.jit(loss)(None, jax.random.key(3), {"x0": x0, "x1": x1, "labels": labels})
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="needs labels"):
        loss(None, jax.random.key(3), {"x0": x0, "x1": x1})


@pytest.mark.parametrize("steps", [1, 10, 100])
def test_straightness_of_a_curved_flow(steps, x64):
    # v(x, t) = a t: the Euler velocities along any trajectory are a t_k, t_k = 1 - k / steps, so
    # S = d |a|^2 Var_k(t_k) = |a|^2 (steps^2 - 1) / (12 steps^2) and the chord is a mean_k t_k.
    a = jnp.array([2.0, -1.0])
    field = jd.Field(lambda x, t: t[:, None] * a[None], "velocity")
    st = jd.straightness(field, jnp.zeros((16, 2)), steps=steps)
    var_t = (steps**2 - 1) / (12 * steps**2)
    mean_t = (1 + 1 / steps) / 2
    np.testing.assert_allclose(st.value, 5.0 * var_t, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(st.relative, var_t / mean_t**2, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(st.x0, -jnp.broadcast_to(a * mean_t, (16, 2)), rtol=1e-12)
    # the same flow given as an x0-prediction on the linear path, converted through the path
    path = jd.linear_path()
    as_x0 = jd.Field(
        lambda x, t: jd.convert(path, x, t, t[:, None] * a[None], src="velocity", dst="x0"), "x0"
    )
    st2 = jd.straightness(as_x0, jnp.zeros((16, 2)), path=path, steps=steps)
    np.testing.assert_allclose(st2.value, st.value, rtol=1e-8, atol=1e-12)
    # as an eps-prediction, which says nothing about x0 at alpha_1 = 0 (it was refused): the
    # trajectories start inside, at t0 = 1 - 1e-3 (jd.sample's default start), S = t0^2 |a|^2 var_t
    as_eps = jd.Field(
        lambda x, t: jd.convert(path, x, t, t[:, None] * a[None], src="velocity", dst="eps"), "eps"
    )
    st3 = jd.straightness(as_eps, jnp.zeros((16, 2)), path=path, steps=steps)
    t0 = 1.0 - 1e-3
    np.testing.assert_allclose(st3.value, 5.0 * t0**2 * var_t, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(st3.relative, st.relative, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="alpha_t = 0 at t_start = 1.0"):
        jd.straightness(as_eps, jnp.zeros((16, 2)), path=path, steps=steps, t_start=1.0)


def test_exact_ot_is_the_sorted_pairing_far_from_the_origin():
    # 1-D OT is the sorted pairing. Data at 1000 +- 0.1: |a|^2 + |b|^2 - 2ab in float32 lost the
    # distances to cancellation (max error 0.28 against the sorted pairing); the cost is now
    # computed on centred data. bfloat16 and integer batches are costed in float32.
    rng = np.random.default_rng(0)
    a = (rng.normal(size=64) * 0.1 + 1000.0).astype(np.float32)
    b = (rng.normal(size=64) * 0.1 + 1000.0).astype(np.float32)
    _, y1 = C.exact_ot()(jax.random.key(0), jnp.asarray(a)[:, None], jnp.asarray(b)[:, None])
    want = np.sort(b)[np.argsort(np.argsort(a))]
    np.testing.assert_array_equal(np.asarray(y1)[:, 0], want)
    a16 = jnp.asarray(rng.normal(size=64), jnp.bfloat16)[:, None]
    b16 = jnp.asarray(rng.normal(size=64), jnp.bfloat16)[:, None]
    _, y16 = C.exact_ot()(jax.random.key(0), a16, b16)
    af, bf, yf = (np.asarray(v.astype(jnp.float32))[:, 0] for v in (a16, b16, y16))
    best = np.sort(bf)[np.argsort(np.argsort(af, kind="stable"), kind="stable")]
    np.testing.assert_allclose(np.sum((yf - af) ** 2), np.sum((best - af) ** 2), rtol=1e-6)
    cost = C.squared_cost(jnp.array([[0], [10]]), jnp.array([[9], [1]]))
    assert cost.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(cost), [[81.0, 1.0], [1.0, 81.0]])


def test_sinkhorn_plan_checks_reg_and_integer_costs():
    cost = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    for reg in (0.0, -1.0, float("nan")):  # -1 gave the cost-maximising plan, 0 and NaN NaNs
        with pytest.raises(ValueError, match="reg must be"):
            C.sinkhorn_plan(cost, reg)
    # An integer cost with reg = 0.5 ran with reg cast to the integer 0.
    plan = np.exp(np.asarray(C.sinkhorn_plan(jnp.array([[0, 1], [1, 0]]), 0.5)))
    np.testing.assert_allclose(plan, np.exp(np.asarray(C.sinkhorn_plan(cost, 0.5))), rtol=1e-6)
    np.testing.assert_allclose(plan.sum(0), [0.5, 0.5], rtol=1e-5)
    # relative reg on a batch whose points all coincide (mean cost 0): any plan, no error/NaN.
    # Two points raised "did not converge" (reg = the smallest normal float, whose reg log 2
    # flushed to 0, left the plan at 1 per entry): reg is floored at tiny / eps now
    for n in (2, 3):
        x = jnp.ones((n, 2))
        _, y1 = C.sinkhorn_ot(0.1, relative=True)(jax.random.key(0), x, x)
        np.testing.assert_array_equal(np.asarray(y1), np.ones((n, 2)))
    # sinkhorn_plan checks its iterations as sinkhorn_ot does (num_iters = 0 returned -C / reg,
    # mass 2.27 here, as a plan; tol = -1 ran silently to the cap)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="num_iters must be a positive integer"):
            C.sinkhorn_plan(cost, 0.5, bad)
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="tol must be a positive number or None"):
            C.sinkhorn_plan(cost, 0.5, tol=bad)


def test_exact_ot_under_nested_vmap_and_scalar_batches():
    x0 = jax.random.normal(jax.random.key(0), (2, 3, 5, 2))
    x1 = jax.random.normal(jax.random.key(1), (2, 3, 5, 2))
    key = jax.random.key(2)
    got = jax.vmap(jax.vmap(lambda a, b: C.exact_ot()(key, a, b)[1]))(x0, x1)  # crashed in SciPy
    for i in range(2):
        for j in range(3):
            want = C.exact_ot()(key, x0[i, j], x1[i, j])[1]
            np.testing.assert_array_equal(np.asarray(got[i, j]), np.asarray(want))
    with pytest.raises(ValueError, match="leading batch axis"):  # was a raw IndexError
        C.exact_ot()(key, jnp.array(1.0), jnp.array(2.0))


def test_sinkhorn_plan_names_costs_and_regs_it_cannot_solve():
    """A couplings review (stop 58): a NaN cost, a row whose every pair is forbidden (+inf) and a
    reg below float32's smallest normal (flushed to 0 on CPU) gave an all-NaN plan without a word,
    and sinkhorn_ot then paired every x0 with x1[0]; a 1-D cost failed with "not enough values to
    unpack". Each is named, eagerly and under jit; valid costs are untouched."""
    from jaxdiff import couplings as C

    cost = C.squared_cost(jax.random.normal(jax.random.key(0), (8, 2)),
                          jax.random.normal(jax.random.key(1), (8, 2)))  # fmt: skip
    with pytest.raises(ValueError, match=r"needs a cost matrix \(n, m\); got shape \(8,\)"):
        C.sinkhorn_plan(cost[0], 0.1)
    with pytest.raises(ValueError, match="got 1 NaN or -inf entries, 0 rows"):
        C.sinkhorn_plan(cost.at[0, 0].set(jnp.nan), 0.1)
    with pytest.raises(
        ValueError, match="0 NaN or -inf entries, 1 rows and 0 columns without a finite"
    ):
        C.sinkhorn_plan(cost.at[2].set(jnp.inf), 0.1)
    with pytest.raises(ValueError, match="got 1 NaN or -inf entries"):  # -inf too (a review)
        C.sinkhorn_plan(cost.at[1, 3].set(-jnp.inf), 0.1)
    with pytest.raises(ValueError, match=r"reg must be at least the smallest normal float32"):
        C.sinkhorn_plan(cost, 1e-40)
    with pytest.raises(Exception, match="reg must be at least the smallest normal float32"):
        jax.block_until_ready(jax.jit(lambda r: C.sinkhorn_plan(cost, r))(1e-40))  # traced reg
    with pytest.raises(Exception, match="the cost must hold no NaN or -inf"):
        jax.block_until_ready(
            jax.jit(lambda c: C.sinkhorn_plan(c, 0.1))(cost.at[0, 0].set(jnp.nan))
        )
    # forbidden pairs off the diagonal blocks (class-conditional OT) are still a valid cost
    blocks = jnp.where(jnp.arange(8)[:, None] // 4 == jnp.arange(8)[None, :] // 4, cost, jnp.inf)
    plan = C.sinkhorn_plan(blocks, 0.5, 2000, tol=1e-5)
    assert float(C.marginal_error(plan)) <= 1e-5
