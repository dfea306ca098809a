"""Peers on the same network: samples per second at equal NFE, jaxdiff against PyTorch samplers.

The benchmark MLP (``benchmarks.common``, width 256) is copied weight for weight into PyTorch.
Every row integrates the same dynamics from the same initial noise with the same number of network
evaluations (NFE); the table gives each side's samples per second and the ratio
``speedup = peer time / jaxdiff time`` (> 1: jaxdiff is faster), measured interleaved.

* ODE rows: the MLP is a flow-matching velocity on the linear path, integrated from ``t = 1``
  to ``1e-3``: jaxdiff ``sample(..., sampler=ode(solver))`` with diffrax's Euler, Midpoint, Heun and
  an RK4 (torchdiffeq's "rk4" is the 3/8 rule, so ours is too) against a plain PyTorch loop,
  ``torchdiffeq.odeint`` on the same grid and Meta's ``flow_matching`` ``ODESolver``, whose
  ``t = 0`` is noise: its time is ``s = 1 - t`` and its velocity ``-u``. These are the same
  computation, checked: ``max_abs_diff`` is the largest difference of the final samples.
* SDE rows: the MLP predicts ``x0`` on the VP path (beta 0.1 to 20). (With random weights an
  ``eps`` network does not cancel ``x`` at ``t ~ 1``, so the reverse dynamics expand samples by
  ``exp(int beta / 2) ~ 150``; an ``x0`` network keeps them O(1) and the checks meaningful. The
  conversion to ``eps`` is one line on both sides.) Euler--Maruyama of the reverse SDE in jaxdiff
  against a plain PyTorch loop and ``torchsde.sdeint`` (with a ``BrownianInterval`` given ``dt``;
  its default is 10-45x slower). The noise differs, so the check is the energy distance between
  the two sample sets, standardised (``energy_dist``), to be read against that between two jaxdiff
  runs with different keys (in the notes).
* diffusers' ``DDPMScheduler`` (ancestral, ``eta = 1``) and ``DDIMScheduler`` (``eta = 0``) loops
  on the same network (``prediction_type="sample"``), 1000 training steps of linear betas
  1e-4..0.02 (the VP path above), no clipping, diffusers' default "leading" timesteps, against
  jaxdiff's ``ancestral_sample`` / ``ddim_sample`` on the same discrete chain
  (``discrete_path``, ``leading_timesteps``). DDIM is deterministic: ``max_abs_diff`` checks it;
  DDPM draws different noise: ``energy_dist`` checks it.

Fairness (design note): ``torch.no_grad()``; torch's thread count per peer and batch is the faster
of 1 and all cores, each peer pinned to its own while they alternate (at batch 1 one thread is
often faster: an outside check found our batch-1 speedups at 7-19x, not 13-30x, for that reason); the PyTorch loops run eager, with the network through
``torch.compile``, and (full mode) compiled whole, ``torch.compile(fullgraph=True)`` over the
unrolled loop (at batch 1 compiling the network alone is slower than eager: the loop's Python and
dispatch are the cost); compile times excluded from run time and reported (``jaxdiff_compile_s``:
XLA lowering + compilation; ``peer_compile_s``), ``block_until_ready``, all samplers of one row
group timed round-robin, in bursts of 5 calls at batch <= 64 (strict alternation slowed jaxdiff's
0.4 ms call to 0.97 ms next to PyTorch's loop), with medians, minima and quartiles.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd
from benchmarks.common import interleaved, mlp_apply, mlp_init

TITLE = "Peers on the same network: samples/s at equal NFE (PyTorch, torchdiffeq, torchsde, diffusers, flow_matching)"

T_END = 1e-3
BETA_MIN, BETA_MAX = 0.1, 20.0
TRAIN_STEPS = 1000  # diffusers' discrete chain: beta_i = 1e-4 .. 0.02 = beta(t) / 1000
PEERS = ("torch", "torchdiffeq", "torchsde", "diffusers", "flow_matching")


class RK38(diffrax.AbstractERK):
    """Kutta's 3/8-rule RK4: the tableau of torchdiffeq's ``"rk4"`` (4 evaluations per step)."""

    tableau = diffrax.ButcherTableau(
        c=np.array([1 / 3, 2 / 3, 1.0]),
        b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
        b_error=np.zeros(4),
        a_lower=(np.array([1 / 3]), np.array([-1 / 3, 1.0]), np.array([1.0, -1.0, 1.0])),
    )
    interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 4


# solver name -> (diffrax solver, evaluations per step, torchdiffeq method)
ODE_SOLVERS = {
    "Euler": (diffrax.Euler(), 1, "euler"),
    "Midpoint": (diffrax.Midpoint(), 2, "midpoint"),
    "Heun": (diffrax.Heun(), 2, "heun2"),
    "RK4 (3/8 rule)": (RK38(), 4, "rk4"),
}


def jax_cores() -> int:
    """CPU cores JAX's thread pool uses (and PyTorch is given)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _installed() -> dict[str, str | None]:
    out = {}
    for name in PEERS:
        try:
            __import__(name)
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - any import failure means "cannot compare"
            out[name] = None
    return out


# --- jaxdiff side -------------------------------------------------------------------------


def _field(params, target):
    return jd.Field(mlp_apply, target, params)


def jaxdiff_ode(params, x, solver, steps):
    """Flow-matching velocity on the linear path, t = 1 -> 1e-3."""
    return jd.sample(
        None,
        jd.linear_path(),
        _field(params, "velocity"),
        x_init=x,
        sampler=jd.samplers.ode(solver),
        steps=steps,
        t_end=T_END,
    ).x


def jaxdiff_vp(params, x, key, steps, eta):
    """x0 network on the VP path: reverse SDE (eta = 1, Euler--Maruyama) or PF-ODE (eta = 0)."""
    sampler = jd.samplers.sde(eta=eta) if eta else jd.samplers.ode()
    return jd.sample(
        key,
        jd.vp_path(BETA_MIN, BETA_MAX),
        _field(params, "x0"),
        x_init=x,
        sampler=sampler,
        steps=steps,
        t_end=T_END,
    ).x


def jaxdiff_discrete(params, x, key, steps, eta):
    """jaxdiff's DDPM (eta = 1: ``samplers.ancestral()``, posterior variance) / DDIM (eta = 0:
    ``samplers.ddim()``) on diffusers' chain: 1000 linear betas 1e-4..0.02 and its default
    "leading" timesteps; discrete step ``k`` is time ``(k + 1) / 1000`` and the last step ends at
    ``t = 0``."""
    path = jd.discrete_path(
        jd.linear_betas(TRAIN_STEPS, BETA_MIN / TRAIN_STEPS, BETA_MAX / TRAIN_STEPS)
    )
    ts = jd.leading_timesteps(TRAIN_STEPS, steps)
    sampler = jd.samplers.ancestral() if eta else jd.samplers.ddim()
    return jd.sample(key if eta else None, path, _field(params, "x0"), x_init=x, sampler=sampler,
                     ts=ts).x  # fmt: skip


def compile_aot(fn, *args):
    """Lower and compile ``jax.jit(fn)`` for ``args``; returns (compiled, seconds)."""

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


# --- PyTorch side -------------------------------------------------------------------------


def torch_mlp(params):
    """The benchmark MLP in PyTorch, with jaxdiff's weights: ``nn.Linear`` layers and SiLU."""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            n = len(params)
            self.layers = torch.nn.ModuleList()
            for i in range(n):
                w = np.asarray(params[f"l{i}"]["w"])
                lin = torch.nn.Linear(*w.shape)
                lin.weight.data = torch.from_numpy(w.T.copy())
                lin.bias.data = torch.from_numpy(np.asarray(params[f"l{i}"]["b"]).copy())
                self.layers.append(lin)
            self.calls = 0

        def forward(self, x, t):
            self.calls += 1
            return self.core(x, torch.as_tensor(t, dtype=x.dtype))

        def core(self, x, t):
            t = t.reshape(-1, 1).expand(x.shape[0], 1)
            h = torch.cat([x, t], dim=-1)
            for i, layer in enumerate(self.layers):
                h = layer(h)
                if i < len(self.layers) - 1:
                    h = torch.nn.functional.silu(h)
            return h

    return MLP().eval()


def torch_train_mlp(width: int):
    """The benchmark MLP as PyTorch's training loops build it (``3 -> width -> width -> 2``, SiLU,
    PyTorch's own initialisation after ``torch.manual_seed(0)``): the training and couplings
    benchmarks' PyTorch side."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, 2),
    )


def torch_compiled(net):
    """``net`` with its body through ``torch.compile`` (Inductor; calls still counted on ``net``).
    The time is a tensor, so one graph serves every step."""
    import torch

    core = torch.compile(net.core, dynamic=False)

    def call(x, t):
        net.calls += 1
        return core(x, torch.as_tensor(t, dtype=x.dtype))

    return call


def best_threads(
    thunk, cores: int, *, runs: int = 5, no_grad: bool = True, recompile: bool = False
) -> tuple[int, dict]:
    """Set torch's thread count to the faster for ``thunk`` (1 or all cores: at small batches one
    thread often wins; the median of ``runs`` calls after a warm one, under ``torch.no_grad()``
    unless a training thunk needs ``no_grad=False``); returns it with the seconds of each.

    ``recompile`` for a ``torch.compile``d thunk: Inductor's CPU kernels keep the thread count
    they were compiled at (serial loops at 1; Dynamo has no guard on it), so each count is probed
    with graphs compiled at it, and the graphs are dropped at the end: the next call compiles at
    the chosen count (``interleaved``'s untimed first call; a compiled thunk probed before this
    one recompiles there too, at its own pinned count)."""
    import contextlib

    import torch

    times = {}
    for n in sorted({1, cores}):
        torch.set_num_threads(n)
        if recompile:
            torch._dynamo.reset()
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            thunk()
            calls = []
            for _ in range(runs):
                start = time.perf_counter()
                thunk()
                calls.append(time.perf_counter() - start)
        times[n] = float(np.median(calls))
    best = min(times, key=times.get)
    torch.set_num_threads(best)
    if recompile:
        torch._dynamo.reset()
    return best, times


def pinned(thunk, threads: int):
    """``thunk`` run with torch's thread count set to ``threads`` (each variant keeps its own)."""
    import torch

    def run():
        torch.set_num_threads(threads)
        return thunk()

    return run


def _vp_coefs(t: float) -> tuple[float, float, float]:
    """beta(t), alpha(t) and sigma(t) of the VP path, by hand as a PyTorch user writes them."""
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    log_alpha = -0.5 * t * BETA_MIN - 0.25 * t * t * (BETA_MAX - BETA_MIN)
    return beta, math.exp(log_alpha), math.sqrt(-math.expm1(2.0 * log_alpha))


def torch_euler(net, x, ts):
    """Plain loop: ``x += dt * u(x, t)`` over the grid ``ts`` (the velocity ODE)."""
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        x = x + (t_next - t) * net(x, t)
    return x


def _vp_reverse_drift(net, x, t: float):
    """``f x - g^2 score`` of the VP path from the x0 network: ``eps = (x - alpha x0) / sigma``."""
    beta, alpha, sigma = _vp_coefs(t)
    eps = (x - alpha * net(x, t)) / sigma
    return -0.5 * beta * x + (beta / sigma) * eps


def torch_em(net, x, ts):
    """Plain loop: Euler--Maruyama of the VP reverse SDE."""
    import torch

    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        dt = t_next - t
        beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
        x = x + dt * _vp_reverse_drift(net, x, t) + math.sqrt(-beta * dt) * torch.randn_like(x)
    return x


def torch_whole_loop(net, kind: str, x, ts):
    """The Euler (velocity ODE) or Euler--Maruyama (VP reverse SDE) loop of ``torch_euler`` /
    ``torch_em`` compiled whole by ``torch.compile(fullgraph=True)``: the grid is Python floats,
    so Dynamo unrolls the loop into one graph (the noise drawn inside it). Returns the thunk and
    the compile seconds (the first call). The network runs once per step, counted on ``net``."""
    import torch

    times = [torch.tensor(t, dtype=x.dtype) for t in ts[:-1]]
    steps = [(t_next - t, *_vp_coefs(t)) for t, t_next in zip(ts[:-1], ts[1:], strict=True)]

    def euler(y):
        for (dt, *_), t in zip(steps, times, strict=True):
            y = y + dt * net.core(y, t)
        return y

    def em(y):
        for (dt, beta, alpha, sigma), t in zip(steps, times, strict=True):
            eps = (y - alpha * net.core(y, t)) / sigma
            drift = -0.5 * beta * y + (beta / sigma) * eps
            y = y + dt * drift + math.sqrt(-beta * dt) * torch.randn_like(y)
        return y

    compiled = torch.compile(euler if kind == "euler" else em, fullgraph=True, dynamic=False)

    def run():
        net.calls += len(steps)  # one network call per step, inside the graph
        return compiled(x)

    start = time.perf_counter()
    with torch.no_grad():
        run()
    return run, time.perf_counter() - start


def torchdiffeq_ode(net, x, ts, method):
    import torch
    import torchdiffeq

    grid = torch.as_tensor(ts, dtype=x.dtype)
    return torchdiffeq.odeint(lambda t, y: net(y, t), x, grid, method=method)[-1]


def torchdiffeq_fixed(net, x, ts, method):
    """``odeint`` with the fixed-step solvers' own ``step_size`` option and the two ends only: no
    output grid to store and interpolate at every step (10-17% faster at batch 1)."""
    import torch
    import torchdiffeq

    ends = torch.as_tensor([ts[0], ts[-1]], dtype=x.dtype)
    h = abs(ts[-1] - ts[0]) / (len(ts) - 1)
    return torchdiffeq.odeint(
        lambda t, y: net(y, t), x, ends, method=method, options={"step_size": h}
    )[-1]


def flow_matching_fixed(net, x, ts, method):
    """Meta's ODESolver with its ``step_size`` (its docstring's use), the two ends only."""
    import torch
    from flow_matching.solver import ODESolver

    solver = ODESolver(velocity_model=lambda x, t: -net(x, 1.0 - t))
    ends = torch.as_tensor([1.0 - ts[0], 1.0 - ts[-1]], dtype=x.dtype)
    h = abs(ts[-1] - ts[0]) / (len(ts) - 1)
    return solver.sample(x_init=x, step_size=h, method=method, time_grid=ends)


def flow_matching_ode(net, x, ts, method):
    """Meta's ODESolver in its own convention: s = 1 - t from noise (0) to data, velocity -u."""
    import torch
    from flow_matching.solver import ODESolver

    solver = ODESolver(velocity_model=lambda x, t: -net(x, 1.0 - t))
    grid = torch.as_tensor(1.0 - np.asarray(ts, np.float64), dtype=x.dtype)
    return solver.sample(x_init=x, step_size=None, method=method, time_grid=grid)


def torchsde_em(net, x, ts):
    """``torchsde.sdeint`` (Ito, diagonal, Euler) in time s = 1 - t, which it needs increasing."""
    import torch
    import torchsde

    class ReverseVP(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, s, y):
            return -_vp_reverse_drift(net, y, 1.0 - float(s))

        def g(self, s, y):
            return torch.full_like(
                y, math.sqrt(BETA_MIN + (1.0 - float(s)) * (BETA_MAX - BETA_MIN))
            )

    grid = torch.tensor([0.0, 1.0 - float(ts[-1])], dtype=x.dtype)
    s1 = float(grid[-1])
    dt = s1 / (len(ts) - 1) * (1 + 1e-5)  # so rounding cannot add a tiny extra step
    bm = torchsde.BrownianInterval(t0=0.0, t1=s1, size=tuple(x.shape), dt=dt, dtype=x.dtype)
    return torchsde.sdeint(ReverseVP(), x, grid, method="euler", dt=dt, bm=bm)[-1]


def diffusers_loop(net, x, steps, ddim):
    """diffusers' scheduler loop: DDPM ancestral (eta = 1) or DDIM (eta = 0), no clipping."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs = dict(
        num_train_timesteps=TRAIN_STEPS,
        beta_start=BETA_MIN / TRAIN_STEPS,
        beta_end=BETA_MAX / TRAIN_STEPS,
        beta_schedule="linear",
        clip_sample=False,
        prediction_type="sample",  # the x0 network
    )
    sched = DDIMScheduler(**kwargs) if ddim else DDPMScheduler(**kwargs)
    sched.set_timesteps(steps)
    for k in sched.timesteps:
        x0 = net(x, (int(k) + 1) / TRAIN_STEPS)  # discrete step k is continuous t = (k + 1)/1000
        x = sched.step(x0, k, x).prev_sample
    return x


# --- the benchmark ------------------------------------------------------------------------


def _groups(params, net, cnet, x_j, x_t, key, nfe, ok, whole):
    """Row groups: (method, NFE, jaxdiff thunk, compile s, {peer: thunk}, stochastic). With
    ``whole``, the PyTorch loops also run compiled whole (their compile seconds go to
    ``whole[peer name]``)."""
    groups = []
    loop_compiled = "PyTorch loop, torch.compile whole loop"
    for name, (solver, per_step, method) in ODE_SOLVERS.items():
        steps = nfe // per_step
        ts = [float(t) for t in np.asarray(jnp.linspace(1.0, T_END, steps + 1))]
        peers = {}
        if name == "Euler" and ok["torch"]:
            peers["PyTorch loop"] = lambda ts=ts: torch_euler(net, x_t, ts)
            if cnet is not None:
                peers["PyTorch loop, torch.compile"] = lambda ts=ts: torch_euler(cnet, x_t, ts)
            if whole is not None:
                peers[loop_compiled], whole[("Euler ODE", loop_compiled)] = torch_whole_loop(
                    net, "euler", x_t, ts
                )
        if ok["torchdiffeq"]:
            peers[f"torchdiffeq odeint {method}"] = lambda ts=ts, m=method: torchdiffeq_ode(
                net, x_t, ts, m
            )
            peers[f"torchdiffeq odeint {method}, step_size"] = lambda ts=ts, m=method: (
                torchdiffeq_fixed(net, x_t, ts, m)
            )
        if name in ("Euler", "Midpoint") and ok["flow_matching"]:
            m = name.lower()
            peers[f"flow_matching ODESolver {m}"] = lambda ts=ts, m=m: flow_matching_ode(
                net, x_t, ts, m
            )
            peers[f"flow_matching ODESolver {m}, step_size"] = lambda ts=ts, m=m: (
                flow_matching_fixed(net, x_t, ts, m)
            )
        fn, c_s = compile_aot(lambda p, x, s=solver, n=steps: jaxdiff_ode(p, x, s, n), params, x_j)
        groups.append(
            (f"{name} ODE", steps * per_step, lambda fn=fn: fn(params, x_j), c_s, peers, False)
        )

    ts = [float(t) for t in np.asarray(jnp.linspace(1.0, T_END, nfe + 1))]
    peers = {}
    if ok["torch"]:
        peers["PyTorch loop"] = lambda: torch_em(net, x_t, ts)
        if cnet is not None:
            peers["PyTorch loop, torch.compile"] = lambda: torch_em(cnet, x_t, ts)
        if whole is not None:
            peers[loop_compiled], whole[("Euler-Maruyama reverse SDE", loop_compiled)] = (
                torch_whole_loop(net, "em", x_t, ts)
            )
    if ok["torchsde"]:
        peers["torchsde sdeint euler"] = lambda: torchsde_em(net, x_t, ts)
    fn, c_s = compile_aot(lambda p, x, k: jaxdiff_vp(p, x, k, nfe, 1.0), params, x_j, key)
    groups.append(
        ("Euler-Maruyama reverse SDE", nfe, lambda fn=fn: fn(params, x_j, key), c_s, peers, True)
    )

    if ok["diffusers"]:
        for ddim in (False, True):
            eta = 0.0 if ddim else 1.0
            fn, c_s = compile_aot(
                lambda p, x, k, e=eta: jaxdiff_discrete(p, x, k, nfe, e), params, x_j, key
            )
            label = "DDIM, eta=0" if ddim else "DDPM ancestral"
            peer = f"diffusers {'DDIMScheduler' if ddim else 'DDPMScheduler'}"
            groups.append(
                (
                    label,
                    nfe,
                    lambda fn=fn: fn(params, x_j, key),
                    c_s,
                    {peer: lambda d=ddim: diffusers_loop(net, x_t, nfe, d)},
                    not ddim,
                )
            )
    return groups


def _keep(outs: dict, name: str, fn):
    """``fn`` that also stores its last output in ``outs[name]`` (for the checks)."""

    def thunk():
        outs[name] = fn()
        return outs[name]

    return thunk


def _counted(net, counts: dict, peer: str, fn):
    """``fn`` under ``torch.no_grad()``, recording its number of network calls in ``counts``."""
    import torch

    def thunk():
        with torch.no_grad():
            before = net.calls
            out = fn()
            counts[peer] = net.calls - before
        return out

    return thunk


def _rows_for_batch(params, net, batch, nfe, repeats, ok, compile_ok, whole_loops):
    import torch

    x_np = np.asarray(jax.random.normal(jax.random.key(1), (batch, 2)))
    x_j, x_t = jnp.asarray(x_np), torch.from_numpy(x_np.copy())
    key = jax.random.key(2)
    grid = [float(t) for t in np.linspace(1.0, T_END, nfe + 1)]
    threads, thread_s = best_threads(lambda: torch_euler(net, x_t, grid), jax_cores())
    print(  # the default while compiling; each peer then chooses its own
        f"    torch threads for batch {batch}: {threads} (Euler loop s: {thread_s})", flush=True
    )
    cnet = torch_compiled(net) if compile_ok else None
    if cnet is not None:  # compile outside the timing (Inductor: seconds per shape)
        with torch.no_grad():
            torch_euler(cnet, x_t, grid[:3])
    rows = []
    whole = {} if (compile_ok and whole_loops) else None
    for method, nfe_j, run_j, c_s, peers, stochastic in _groups(
        params, net, cnet, x_j, x_t, key, nfe, ok, whole
    ):
        if not peers:
            continue
        outs, counts, chosen = {}, {}, {}
        thunks = {"jaxdiff": _keep(outs, "jaxdiff", run_j)}
        for peer, fn in peers.items():  # each peer at its own faster thread count
            chosen[peer] = best_threads(fn, jax_cores(), recompile="torch.compile" in peer)
            fn = pinned(fn, chosen[peer][0])
            thunks[peer] = _keep(outs, peer, _counted(net, counts, peer, fn))
        # bursts of 5 calls per thunk at small batches: strict alternation slowed jaxdiff's
        # sub-millisecond call by 25-45% (it took 0.97 ms here against 0.40 alone)
        res = interleaved(thunks, repeats=repeats, burst=5 if batch <= 64 else 1)
        x_jd = np.asarray(outs["jaxdiff"])
        for peer in peers:
            x_peer = outs[peer].numpy()
            peer_s, jd_s = res[peer]["median_s"], res["jaxdiff"]["median_s"]
            deterministic = not stochastic
            rows.append(
                {
                    "method": method,
                    "peer": peer,
                    "batch": batch,
                    "nfe": nfe_j,
                    "peer_nfe": counts[peer],
                    "peer_ms": 1e3 * peer_s,
                    "jaxdiff_ms": 1e3 * jd_s,
                    "peer_samples_per_s": batch / peer_s,
                    "jaxdiff_samples_per_s": batch / jd_s,
                    "speedup": peer_s / jd_s,
                    "peer_min_ms": 1e3 * res[peer]["min_s"],
                    "jaxdiff_min_ms": 1e3 * res["jaxdiff"]["min_s"],
                    "peer_iqr_ms": 1e3 * (res[peer]["q3_s"] - res[peer]["q1_s"]),
                    "jaxdiff_iqr_ms": 1e3 * (res["jaxdiff"]["q3_s"] - res["jaxdiff"]["q1_s"]),
                    "runs": res["jaxdiff"]["runs"],
                    "torch_threads": chosen[peer][0],
                    "torch_thread_ms": {n: round(1e3 * v, 3) for n, v in chosen[peer][1].items()},
                    "jaxdiff_compile_s": c_s,
                    "peer_compile_s": (whole or {}).get((method, peer)),
                    "max_abs_diff": float(np.max(np.abs(x_peer - x_jd))) if deterministic else None,
                    "energy_dist": (
                        _energy(x_peer, x_jd) if stochastic is True and batch >= 256 else None
                    ),
                }
            )
            print(
                f"    {method} / {peer}, batch {batch}: speedup {rows[-1]['speedup']:.2f}",
                flush=True,
            )
    return rows


def _energy(x, ref) -> float:
    """Energy distance of ``x`` to ``ref``, both standardised by ``ref``'s mean and std."""
    ref = np.asarray(ref, np.float64)
    mean, std = ref.mean(0), ref.std(0)
    z = lambda a: jnp.asarray((np.asarray(a, np.float64) - mean) / std, jnp.float32)  # noqa: E731
    return float(jd.energy_distance(z(x), z(ref)))


def _baseline_energy(params, batch, nfe) -> float:
    """Energy distance between two jaxdiff reverse-SDE runs with different keys (same x_init)."""
    x = jax.random.normal(jax.random.key(1), (batch, 2))
    fn = jax.jit(lambda k: jaxdiff_vp(params, x, k, nfe, 1.0))
    return _energy(fn(jax.random.key(3)), fn(jax.random.key(2)))


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(f"{r['method']} | {r['peer']}" for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(labels) + 1.2), dpi=80)
    height = 0.8 / len(batches)
    for j, b in enumerate(batches):
        by = {f"{r['method']} | {r['peer']}": r["speedup"] for r in rows if r["batch"] == b}
        ys = [i + j * height for i in range(len(labels))]
        ax.barh(ys, [by.get(lab, np.nan) for lab in labels], height=height, label=f"batch {b}")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("peer time / jaxdiff time (> 1: jaxdiff faster)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _torch_compile_works() -> bool:
    """Whether Inductor can build a kernel here (it needs a C++ compiler on CPU)."""
    import torch

    try:
        f = torch.compile(lambda x: torch.sin(x) + 1.0)
        return bool(torch.allclose(f(torch.zeros(2)), torch.ones(2)))
    except Exception:  # noqa: BLE001 - any failure means: compare eager only
        return False


def run(quick: bool) -> dict:
    ok = _installed()
    missing = [name for name, version in ok.items() if version is None]
    if ok["torch"] is None:
        return {
            "rows": [],
            "notes": "PyTorch is not installed (pip install -e '.[bench]'): no peer compared.",
        }
    import torch

    torch.manual_seed(0)
    compile_ok = _torch_compile_works()
    params = mlp_init(jax.random.key(0), dim=2, width=256)
    net = torch_mlp(params)
    batches = [64, 1024] if quick else [1, 64, 4096]
    nfe = 50 if quick else 100
    rows = []
    for batch in batches:
        repeats = (5 if quick else 10) if batch <= 64 else (2 if quick else 7)
        rows += _rows_for_batch(params, net, batch, nfe, repeats, ok, compile_ok, not quick)
    base = _baseline_energy(params, batches[-1], nfe)
    out = os.environ.get("JAXDIFF_BENCH_OUT")
    plots = []
    if out and rows:
        path = os.path.join(out, f"peers{'-quick' if quick else ''}.png")
        _plot(rows, path)
        plots.append(path)
    versions = ", ".join(f"{k} {v}" for k, v in ok.items() if v)
    notes = (
        f"Peers: {versions}; JAX's cores {jax_cores()}; torch threads chosen per peer and batch "
        "as the faster of 1 and all cores (torch_threads; medians of 5 in torch_thread_ms), "
        "torch.no_grad(); the PyTorch loops also run with the network through torch.compile and"
        + (
            ""
            if quick
            else ", in full mode, compiled whole (torch.compile(fullgraph=True) over "
            "the unrolled loop, noise drawn in the graph; its compile time is peer_compile_s)"
        )
        + (
            " (Inductor, compiled before timing"
            if compile_ok
            else " (unavailable here: no C++ compiler"
        )
        + "). speedup = peer time / jaxdiff time (medians of interleaved runs, in bursts of 5 "
        "calls at batch <= 64; minima and interquartile ranges beside them; > 1: jaxdiff is "
        "faster); jaxdiff_compile_s (XLA lowering + compilation) is excluded from jaxdiff_ms. "
        "jaxdiff runs with EQX_ON_ERROR=nan, its runtime checks compiled out (users' default "
        "raises; the checks cost 10-20% of a batch-1 call here). ODE rows: the MLP as a linear-path velocity, the "
        "same initial noise and grid; max_abs_diff = max |x_peer - x_jaxdiff| over the final "
        "samples (float32: the same computation up to rounding). flow_matching runs in its own "
        "t = 0-is-noise convention (s = 1 - t, velocity -u). torchdiffeq's rk4 is the 3/8 rule, so "
        "jaxdiff runs a diffrax ERK with that tableau (benchmarks.peers.RK38). SDE rows: x0 network "
        "on the VP path; energy_dist = energy distance of the peer's samples to jaxdiff's "
        f"(different noise; standardised), against {base:.1e} between two jaxdiff runs with "
        f"different keys at batch {batches[-1]}. torchsde calls the drift once more than the "
        "steps, to check shapes. diffusers rows: jaxdiff's own DDPM (ancestral) / DDIM on the "
        "same 1000-step chain and leading timesteps. "
        + "peer_nfe counts the network calls. "
        + (
            f"Not installed, not compared: {', '.join(missing)}."
            if missing
            else "All peers installed."
        )
    )
    return {"rows": rows, "notes": notes, "plots": plots, "baseline_energy_dist": base}
