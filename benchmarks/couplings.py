"""Couplings: OT plans (exact, auction, Sinkhorn by hand and by ott-jax), flow matching with each
coupling on 2-D toys (straightness, energy distance at 1/2/4/8 Euler steps, loss variance), and
training throughput against torchcfm.

Plans (one batch of ``n`` Gaussian source points and ``n`` checkerboard points, ``n`` = 256, 1024):
``exact`` is ``jaxdiff.exact_ot`` (SciPy's ``linear_sum_assignment`` through ``jax.pure_callback``);
``auction`` a forward auction with epsilon scaling written in JAX (Bertsekas 1988; Jacobi bids,
``lax.while_loop``), optimal to ``n * eps_min`` (``eps_min`` = 1e-3 of the mean cost; run at
``n = 256`` only: it takes seconds where SciPy takes milliseconds); ``sinkhorn_hand`` the log-domain Sinkhorn of
``jaxdiff.couplings.sinkhorn_plan`` (fixed iterations in a ``lax.scan``); ``sinkhorn_ott`` ott-jax's
``Sinkhorn`` at the same absolute ``epsilon`` (threshold 1e-3 on the marginal error, its default).
``cost`` is the mean squared distance of the pairs (for a plan ``P`` summing to 1, ``<P, C>``);
``vs_exact`` its ratio to the exact optimum; ``marg_err`` the L1 error of the row and column sums
together (each solver ends on one exact side).

Training: an MLP (``jaxdiff.nets.MLP``, width 128, depth 3) trained with AdamW on
``flow_matching_loss(..., source=, coupling=)``, and for the Schrödinger bridge (Tong et al.'s
SB-CFM: ``schrodinger_bridge_0.5``) on ``interpolant_loss`` with the Brownian bridge ``x_t = (1 - t)
x0 + t x1 + 0.5 sqrt(t (1 - t)) z`` and entropic-OT pairs of ``reg = 2 sigma^2 = 0.5`` (absolute;
its loss includes the latent's ``gamma' z``, so its ``loss_mean``/``loss_std`` are not comparable
with the others'); then from 4,000 fresh source points, Euler samples with 1, 2, 4, 8 steps (the
bridge: its ODE ``dx = b dt`` by ``jd.samplers.interpolant_sde()``) (energy distance ``ed_k`` to 4,000 held-out points, and MMD with the
CLI's kernel at 8 steps), Liu et al.'s straightness ``S`` (``jaxdiff.straightness``, 100 Euler
steps; ``s_rel = S / E|x1 - x0|^2``), and the loss at the final EMA parameters over 64 fresh
batches (``loss_mean``, ``loss_std``: the spread of the objective that OT couplings reduce).
``floor`` is the energy distance between two true sets of 4,000.

Throughput: the benchmark MLP (``benchmarks.common``) at batch 256 trained by jaxdiff (one jitted
``lax.scan`` of K steps) and by torchcfm (eager PyTorch, ``ConditionalFlowMatcher`` and
``ExactOptimalTransportConditionalFlowMatcher``, whose plans are POT's ``emd``). Timings on shared
or loaded cores are meaningless: rerun on a quiet machine.

Assignment orientation: SciPy's ``linear_sum_assignment`` on the squared costs of ``n`` data points
(eight Gaussians, checkerboard, moons, the 8x8 digits in 64-D) against ``n`` points of ``N(0, I)``,
with the data as rows and with the source points as rows (``exact_ot`` solves the latter), and
POT's ``emd`` where POT is installed; milliseconds, median over problems.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd
from benchmarks.common import interleaved, mlp_apply, mlp_init, time_jitted
from benchmarks.peers import best_threads, jax_cores, pinned, torch_train_mlp
from jaxdiff import couplings as C

TITLE = "Couplings: OT plans, straightness and few-step quality, throughput vs torchcfm"


# --- an auction algorithm in JAX (measured against SciPy's exact assignment) --------------------


def auction_assignment(
    cost: jax.Array, eps_min: float = 1e-3, scale: float = 5.0, phases: int = 8
) -> jax.Array:
    """Forward auction (Jacobi bidding) with epsilon scaling: ``perm[i]`` for a square cost.

    Persons ``i`` bid for objects ``j`` to maximise ``-cost``; phase ``k`` bids with
    ``eps = max(max|C| / (4 scale^k), eps_min)``, keeping the prices and restarting the
    assignment. The result is within ``n eps_min`` of the optimum once ``eps`` reaches ``eps_min``
    (``phases >= log(max|C| / (4 eps_min)) / log(scale) + 1``).
    """
    n = cost.shape[0]
    benefit = -cost
    eps0 = jnp.max(jnp.abs(cost)) / 4.0
    idx = jnp.arange(n)

    def bid_round(state):
        prices, p2o, o2p, eps = state
        vals = benefit - prices[None, :]
        top, arg = jax.lax.top_k(vals, 2)
        j1 = arg[:, 0]
        active = p2o < 0
        bid = jnp.where(active, prices[j1] + top[:, 0] - top[:, 1] + eps, -jnp.inf)
        best = jax.ops.segment_max(bid, j1, num_segments=n)
        win = active & (bid == best[j1])
        winner = jax.ops.segment_min(jnp.where(win, idx, n), j1, num_segments=n)
        got = winner < n
        prev = jnp.where(got, o2p, -1)
        p2o = p2o.at[jnp.where(prev >= 0, prev, n)].set(-1, mode="drop")
        p2o = p2o.at[jnp.where(got, winner, n)].set(idx, mode="drop")
        o2p = jnp.where(got, winner, o2p)
        prices = jnp.where(got, best, prices)
        return prices, p2o, o2p, eps

    def phase(k, carry):
        prices, _ = carry
        eps = jnp.maximum(eps0 / scale**k, eps_min)
        init = (prices, -jnp.ones(n, jnp.int32), -jnp.ones(n, jnp.int32), eps)
        prices, p2o, _, _ = jax.lax.while_loop(lambda s: jnp.any(s[1] < 0), bid_round, init)
        return prices, p2o

    _, p2o = jax.lax.fori_loop(
        0, phases, phase, (jnp.zeros(n, cost.dtype), jnp.zeros(n, jnp.int32))
    )
    return p2o


def _marg_err(plan: jax.Array) -> float:
    n, m = plan.shape
    rows, cols = jnp.abs(plan.sum(1) - 1 / n).sum(), jnp.abs(plan.sum(0) - 1 / m).sum()
    return float(rows + cols)


def _plans_at(n: int, repeats: int) -> list[dict]:
    try:
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn
    except ImportError:  # pip install ott-jax for its row
        pointcloud = None

    rows = []
    x1 = jax.random.normal(jax.random.key(0), (n, 2))
    x0 = jd.data.checkerboard(jax.random.key(1), n)
    cost = C.squared_cost(x0, x1)
    exact_fn = jax.jit(C.assignment)
    perm = exact_fn(cost)
    exact = float(jnp.mean(cost[jnp.arange(n), perm]))
    eps = 0.01 * float(jnp.mean(cost))  # entropic reg: 1% of the mean cost, absolute

    def add(method, seconds, value, iters=None, marg_err=None):
        rows.append(
            {
                "n": n,
                "method": method,
                "ms": 1e3 * seconds,
                "cost": value,
                "vs_exact": value / exact,
                "iters": iters,
                "marg_err": marg_err,
            }
        )

    add("independent", 0.0, float(jnp.mean(jnp.diag(cost))))
    add("exact", time_jitted(exact_fn, cost, repeats=repeats)["median_s"], exact)
    if n <= 256:  # ~15 s per assignment at n = 256 on 2 CPU cores: larger n takes minutes
        eps_min = 1e-3 * float(jnp.mean(cost))
        phases = int(np.ceil(np.log(float(jnp.max(cost)) / 4 / eps_min) / np.log(5.0))) + 1
        auction = jax.jit(lambda c: auction_assignment(c, eps_min, 5.0, phases))
        p = auction(cost)
        seconds = time_jitted(auction, cost, repeats=1)["median_s"]
        add("auction", seconds, float(jnp.mean(cost[jnp.arange(n), p])))

    iters = 200
    if pointcloud is not None:

        def solve_ott(x0, x1):
            geom = pointcloud.PointCloud(x0, x1, epsilon=eps)
            out = sinkhorn.Sinkhorn()(linear_problem.LinearProblem(geom))
            return out.matrix, out.n_iters

        ott_fn = jax.jit(solve_ott)
        plan, iters = ott_fn(x0, x1)
        iters = int(iters)
        seconds = time_jitted(ott_fn, x0, x1, repeats=repeats)["median_s"]
        add("sinkhorn_ott", seconds, float(jnp.sum(plan * cost)), iters, _marg_err(plan))
    for k in sorted({iters, 200}):
        hand = jax.jit(lambda c, k=k: jnp.exp(C.sinkhorn_plan(c, eps, k)))
        plan = hand(cost)
        seconds = time_jitted(hand, cost, repeats=repeats)["median_s"]
        add(f"sinkhorn_hand_{k}", seconds, float(jnp.sum(plan * cost)), k, _marg_err(plan))
    return rows


def _plan_rows(quick: bool) -> list[dict]:
    repeats = 3 if quick else 10
    return [row for n in (256, 1024) for row in _plans_at(n, repeats)]


# --- flow matching with each coupling ---------------------------------------------------------

CASES = {
    "N(0,I)->8gaussians": (None, jd.data.eight_gaussians),
    "8gaussians->moons": (jd.data.eight_gaussians, jd.data.moons),
    "N(0,I)->checkerboard": (None, jd.data.checkerboard),
}


SB_SIGMA = 0.5


def _couplings():
    """``name -> (coupling, bridge or None)``."""
    return {
        "independent": (None, None),
        "exact_ot": (jd.exact_ot(), None),
        "sinkhorn_0.05": (jd.sinkhorn_ot(0.05, relative=True), None),
        f"schrodinger_bridge_{SB_SIGMA}": (
            jd.sinkhorn_ot(2 * SB_SIGMA**2),
            jd.brownian_bridge(SB_SIGMA),
        ),
    }


def _train_one(source_fn, data_fn, coupling, steps, batch, seed=0, bridge=None):
    from jaxdiff.experiment import MMD_BANDWIDTHS
    from jaxdiff.nets import MLP, init_params
    from jaxdiff.train import adamw_cosine, init_train_state, make_train_chunk, make_train_step

    model = MLP(width=128, depth=3)
    params = init_params(model, jax.random.key(seed), jnp.zeros((1, 2)), jnp.zeros(1))
    source = None if source_fn is None else jd.dataset_source(source_fn)
    draw = jd.standard_normal() if source is None else source
    path = jd.linear_path()
    net = jd.Field(model.apply, "velocity")
    if bridge is None:
        loss = jd.flow_matching_loss(net, path, source=source, coupling=coupling)
    else:
        loss = jd.interpolant_loss(net, bridge, source=source, coupling=coupling)
    opt = adamw_cosine(3e-3, steps)
    chunk = make_train_chunk(
        make_train_step(loss, opt, ema_decay=0.995), lambda k: data_fn(k, batch), steps
    )
    start = time.perf_counter()
    state, losses = chunk(init_train_state(params, opt, jax.random.key(seed + 1)))
    jax.block_until_ready(losses)
    train_s = time.perf_counter() - start
    field = jd.Field(model.apply, "velocity", state.ema)
    n = 4000
    x1 = draw(jax.random.key(100), (n, 2))
    ref = data_fn(jax.random.key(101), n)
    row = {}
    for k in (1, 2, 4, 8):
        if bridge is None:
            x = jd.sample(None, path, field, x_init=x1, steps=k).x
        else:
            ode = jd.samplers.interpolant_sde()
            x = jd.sample(None, bridge, field, x_init=x1, steps=k, sampler=ode).x
        row[f"ed_{k}"] = float(jd.energy_distance(x, ref))
    row["mmd_8"] = float(jd.mmd(x, ref, MMD_BANDWIDTHS))
    st = jd.straightness(field, x1, steps=100)
    row["straightness"], row["s_rel"] = float(st.value), float(st.relative)
    keys = jax.random.split(jax.random.key(200), 64)
    values = jax.jit(
        jax.vmap(lambda k: loss(state.ema, k, data_fn(jax.random.fold_in(k, 1), batch)))
    )(keys)
    row["loss_mean"], row["loss_std"] = float(values.mean()), float(values.std())
    row["floor"] = float(jd.energy_distance(data_fn(jax.random.key(102), n), ref))
    row["train_s"] = train_s
    return row


def _training_rows(quick: bool) -> list[dict]:
    steps = 2000 if quick else 10_000
    cases = list(CASES)  # quick: the README's table (all three cases at 2,000 steps)
    rows = []
    for case in cases:
        source_fn, data_fn = CASES[case]
        for name, (coupling, bridge) in _couplings().items():
            row = _train_one(source_fn, data_fn, coupling, steps, 256, bridge=bridge)
            rows.append({"case": case, "coupling": name, "steps": steps, **row})
            print(
                f"  {case} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True
            )
    return rows


# --- throughput against torchcfm ----------------------------------------------------------------


def _jax_chunk(coupling, batch, steps, width):
    from jaxdiff.train import adamw_cosine, init_train_state, make_train_chunk, make_train_step

    params = mlp_init(jax.random.key(0), dim=2, width=width, depth=2)
    loss = jd.flow_matching_loss(jd.Field(mlp_apply, "velocity"), coupling=coupling)
    opt = adamw_cosine(1e-3, 10**6, warmup_steps=1)
    chunk = make_train_chunk(
        make_train_step(loss, opt), lambda key: jd.data.eight_gaussians(key, batch), steps
    )
    state = [init_train_state(params, opt, jax.random.key(0))]

    def run():
        state[0], losses = chunk(state[0])
        return losses

    return run


def _torchcfm_loop(exact: bool, batch, steps, width):
    import torch
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )

    net = torch_train_mlp(width)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    fm = ExactOptimalTransportConditionalFlowMatcher() if exact else ConditionalFlowMatcher()
    angles = 2 * np.pi * torch.arange(8) / 8
    means = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], 1).float()

    def run():
        for _ in range(steps):
            x1 = means[torch.randint(0, 8, (batch,))] + 0.25 * torch.randn(batch, 2)
            x0 = torch.randn(batch, 2)
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            pred = net(torch.cat([xt, t[:, None]], dim=1))
            loss = ((pred - ut) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
        return loss.detach()

    threads, _ = best_threads(run, jax_cores(), runs=1, no_grad=False)  # 1 or all cores
    return pinned(run, threads)  # each loop keeps its own choice while they alternate


def _throughput_rows(quick: bool) -> list[dict]:
    steps, repeats, width, batch = (20, 2, 256, 256) if quick else (200, 5, 256, 256)
    thunks = {
        "jaxdiff_independent": _jax_chunk(None, batch, steps, width),
        "jaxdiff_exact_ot": _jax_chunk(jd.exact_ot(), batch, steps, width),
        "jaxdiff_sinkhorn": _jax_chunk(jd.sinkhorn_ot(0.05, relative=True), batch, steps, width),
    }
    try:
        thunks["torchcfm_independent"] = _torchcfm_loop(False, batch, steps, width)
        thunks["torchcfm_exact_ot"] = _torchcfm_loop(True, batch, steps, width)
    except ImportError:
        pass
    res = interleaved(thunks, repeats=repeats)
    return [
        {"method": k, "batch": batch, "steps_s": steps / v["median_s"], "compile_s": v["compile_s"]}
        for k, v in res.items()
    ]


def _orientation_rows(quick: bool) -> list[dict]:
    """SciPy's assignment with the data as rows against the source points as rows (see the
    module text); POT's ``emd`` where installed."""
    from scipy.optimize import linear_sum_assignment

    from jaxdiff.data import load_digits

    try:
        import ot
    except ImportError:
        ot = None
    digits = np.asarray(load_digits("train")[0]).reshape(-1, 64)
    sets = {
        "eight_gaussians": lambda k, n: np.asarray(jd.data.eight_gaussians(k, n)),
        "checkerboard": lambda k, n: np.asarray(jd.data.checkerboard(k, n)),
        "moons": lambda k, n: np.asarray(jd.data.moons(k, n)),
        "digits64": lambda k, n: digits[np.asarray(jax.random.randint(k, (n,), 0, len(digits)))],
    }
    sizes = ((256, 3),) if quick else ((256, 15), (1024, 3))
    rng = np.random.default_rng(0)

    def median_ms(fn, costs):
        times = []
        for c in costs:
            start = time.perf_counter()
            fn(c)
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))

    rows = []
    for n, problems in sizes:
        for name, draw in sets.items():
            costs = []
            for i in range(problems):
                data = draw(jax.random.key(i), n).astype(np.float64)
                source = rng.normal(size=data.shape)
                costs.append(((data[:, None] - source[None]) ** 2).sum(-1))
            row = {
                "data": name,
                "n": n,
                "scipy_data_rows_ms": median_ms(linear_sum_assignment, costs),
                "scipy_source_rows_ms": median_ms(lambda c: linear_sum_assignment(c.T), costs),
            }
            if ot is not None:
                w = np.full(n, 1.0 / n)
                row["pot_emd_ms"] = median_ms(lambda c, w=w: ot.emd(w, w, c), costs)
            rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def run(quick: bool) -> dict:
    plans = _plan_rows(quick)
    throughput = _throughput_rows(quick)
    orientation = _orientation_rows(quick)
    rows = _training_rows(quick)
    notes = (
        __doc__.split("\n\n", 1)[1].strip()
        + "\n\nPlans:\n\n"
        + _table(plans)
        + "\n\nThroughput (steps/s; rerun on a quiet machine):\n\n"
        + _table(throughput)
        + "\n\nAssignment orientation (ms):\n\n"
        + _table(orientation)
        + "\n\nTraining (the rows below):"
    )
    return {
        "rows": rows,
        "notes": notes,
        "plans": plans,
        "throughput": throughput,
        "orientation": orientation,
    }


def throughput_file(out: str, quick: bool = False) -> dict:
    """The throughput against torchcfm and the assignment's orientation alone, as a result file
    (``environment``, ``quick``, ``sections``) at ``out``: ``python -m benchmarks.couplings OUT``
    (``cpu-couplings-throughput.json``), without the plans and the training rows."""
    import importlib.metadata as md
    import json

    from benchmarks.common import environment

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    start = time.perf_counter()
    section = {
        "title": "Couplings throughput: jaxdiff vs torchcfm, and SciPy's assignment by orientation",
        "notes": (
            "benchmarks.couplings.throughput_file: _throughput_rows (the benchmark MLP, width 256, "
            "at batch 256 on the eight Gaussians, 200 steps per timed call, median of 5 "
            f"interleaved calls; torchcfm {version('torchcfm')}, POT {version('pot')}, torch "
            f"{version('torch')}, eager, each PyTorch loop at its faster thread count) and "
            "_orientation_rows (module text). Rerun on a quiet machine."
        ),
        "rows": _throughput_rows(quick),
        "orientation": _orientation_rows(quick),
    }
    section["seconds"] = time.perf_counter() - start
    results = {
        "environment": environment(),
        "quick": quick,
        "sections": {"couplings_throughput": section},
        "total_s": section["seconds"],
    }
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    import sys

    throughput_file(sys.argv[1] if len(sys.argv) > 1 else "couplings-throughput.json")
