"""``integrate`` with pytree states (ODEs): fixed grids, saved trajectories, adaptive solves, grads."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd


def _drift(state, t):
    x, c = state
    return (-x, jnp.sum(x, axis=-1))  # c' = sum x  =>  c(1) = sum x0 (1 - e^-1)


def test_pytree_state_fixed_grid_and_save(x64):
    x0 = jnp.array([[1.0, 2.0], [0.5, -1.0]])
    state = (x0, jnp.zeros(2))
    sol = jd.integrate(
        _drift,
        state,
        t_start=0.0,
        t_end=1.0,
        steps=200,
        solver=diffrax.Heun(),
        save_ts=jnp.array([0.0, 0.5, 1.0]),
    )
    x, c = sol.x
    np.testing.assert_allclose(x, x0 * np.exp(-1.0), rtol=1e-4)
    np.testing.assert_allclose(c, x0.sum(-1) * (1 - np.exp(-1.0)), rtol=1e-4)
    xs, cs = sol.xs
    assert xs.shape == (3, 2, 2) and cs.shape == (3, 2)
    np.testing.assert_allclose(xs[1], x0 * np.exp(-0.5), rtol=1e-4)
    assert int(sol.nfe) == 400


def test_pytree_state_adaptive(x64):
    """Adaptive solve of a pytree state (reverse-mode gradients are tested in test_likelihood)."""
    x0 = jnp.array([[1.0, 2.0]])
    sol = jd.integrate(
        _drift,
        (x0, jnp.zeros(1)),
        t_start=0.0,
        t_end=1.0,
        solver=diffrax.Tsit5(),
        rtol=1e-9,
        atol=1e-9,
    )
    np.testing.assert_allclose(sol.x[1], [3.0 * (1 - np.exp(-1.0))], rtol=1e-7)
    np.testing.assert_allclose(sol.x[0], x0 * np.exp(-1.0), rtol=1e-7)


def test_pytree_state_rejected_for_sde():
    with pytest.raises(ValueError, match="single array"):
        jd.integrate(
            _drift,
            (jnp.ones(2), jnp.zeros(())),
            t_start=0.0,
            t_end=1.0,
            steps=2,
            diffusion=lambda x, t: 1.0,
            key=jax.random.key(0),
        )


@pytest.mark.parametrize(
    "solver, adaptive",
    [
        (diffrax.Heun(), False),
        (diffrax.Tsit5(), False),
        (diffrax.Tsit5(), True),
        (diffrax.ShARK(), False),
    ],
)
def test_nfe_counts_every_stage(solver, adaptive):
    """``Solution.nfe`` equals the drift calls made at run time (RK stages run in a loop)."""
    calls = [0]

    def drift(x, t):
        jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
        return -x

    kw = {"rtol": 1e-4, "atol": 1e-4} if adaptive else {"steps": 10}
    if isinstance(solver, diffrax.ShARK):
        kw.update(diffusion=lambda x, t: 0.1, key=jax.random.key(0))
    sol = jd.integrate(drift, jnp.ones(3), t_start=0.0, t_end=1.0, solver=solver, **kw)
    jax.block_until_ready(sol.x)
    assert int(sol.nfe) == calls[0]
    assert calls[0] > int(sol.num_steps)  # several stages per step
