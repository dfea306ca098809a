"""Eager ``jd.sample``: what a call outside ``jax.jit`` costs, as in a notebook.

For each sampler, 20 steps of an MLP (width 64, depth 3) predicting ``eps`` on the VP path,
batch 8 in 2-D: a new step count (21 after 20: the grid's set-up and the program's compile), a
repeat with new parameters, a new key and a new sampler object (the compiled program reused,
``jaxdiff._programs``), the same repeat with the reuse turned off (each call compiled, as before
12-07), and the call inside ``jax.jit``. Medians of ``repeats`` calls, in seconds.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jaxdiff as jd
from jaxdiff.nets import MLP, init_params

TITLE = "Eager jd.sample: a new step count, a repeat (program reused or compiled), and jitted"

SAMPLERS = ("ddim", "unipc", "edm_heun", "dpm_solver_sde")


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def run(quick: bool = False) -> dict:
    repeats = 3 if quick else 5
    model = MLP(width=64, depth=3)
    params = init_params(model, jax.random.key(1), jnp.ones((8, 2)), 0.3)
    path = jd.vp_path()
    module = sys.modules["jaxdiff.sample"]
    cached = module.run_jit

    def call(name, steps, i):
        p = jax.tree.map(lambda a: a * (1.0 + i / 100), params)  # new parameters each call
        field = jd.Field(model.apply, "eps", p)
        sampler = getattr(jd.samplers, name)()
        return jd.sample(jax.random.key(i), path, field, (8, 2), sampler=sampler, steps=steps).x

    rows = []
    for name in SAMPLERS:
        _timed(lambda n=name: call(n, 20, 0))  # warm: the grid's and the program's first compile
        new_steps = _timed(lambda n=name: call(n, 21, 0))
        reused = statistics.median(
            _timed(lambda n=name, i=i: call(n, 20, i)) for i in range(repeats)
        )
        module.run_jit = lambda fn, *args: jax.jit(fn)(*args)  # each call compiles
        try:
            compiled = statistics.median(
                _timed(lambda n=name, i=i: call(n, 20, i)) for i in range(repeats)
            )
        finally:
            module.run_jit = cached
        bare = jd.Field(model.apply, "eps")
        sampler = getattr(jd.samplers, name)()
        draw = jax.jit(
            lambda k, p, s=sampler, f=bare: (
                jd.sample(k, path, f.bind(p), (8, 2), sampler=s, steps=20).x
            )
        )
        _timed(lambda d=draw: d(jax.random.key(0), params))
        jitted = statistics.median(
            _timed(lambda d=draw, i=i: d(jax.random.key(i), params)) for i in range(repeats)
        )
        rows.append({
            "sampler": name, "new_steps_s": new_steps, "repeat_reused_s": reused,
            "repeat_compiled_s": compiled, "speedup": compiled / reused, "jitted_s": jitted,
        })  # fmt: skip
    notes = (
        "A repeat reuses the compiled program of an earlier call that lowered to the same text "
        "(new params, key or sampler object); what remains is tracing and lowering. Closed-over "
        "arrays are constants of the text (a new program when they change); host callbacks (the "
        "mixture oracles' run-time checks) are never reused. A loop belongs inside jax.jit."
    )
    return {"rows": rows, "notes": notes, "plots": []}
