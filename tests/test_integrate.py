"""``integrate`` with pytree states (ODEs): fixed grids, saved trajectories, adaptive solves.

NFE counting of RK stages is tested through ``sample`` in test_sample.py."""

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


def test_saving_every_step_takes_linear_memory():
    """save_ts used to build a grid-by-save-times matrix (14.4 GB for 60,000 steps at batch 1);
    the slots come from a binary search now: the compiled program's temporaries stay small."""
    n = 60_000
    ts = jnp.linspace(0.0, 1.0, n + 1)

    def solve(x):
        return jd.integrate(lambda x, t: -x, x, ts=ts, save_ts=ts).xs

    analysis = jax.jit(solve).lower(jnp.ones((1, 1))).compile().memory_analysis()
    assert analysis.temp_size_in_bytes < 50 * 2**20  # the buffer itself is 240 KB
