"""The command line with the few-step losses: meanflow, shortcut and consistency runs end to end (train, then
sample with their own sampler at 1 and 2 steps), the conditional meanflow sampler against a direct
``jd.sample``, and a one-line error for every bad combination."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff import experiment as E
from jaxdiff import losses as L
from jaxdiff.cli import main
from jaxdiff.runs import make_sampler
from tests.cli_helpers import cli_error as _error
from tests.net_helpers import perturb


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--loss", "meanflow", "--path", "vp"], "fm or cosine, not 'vp'"),
        (["--loss", "consistency", "--path", "ve"], "fm or cosine, not 've'"),
        (["--loss", "meanflow", "--target", "x0"], "target velocity, not 'x0'"),
        (["--loss", "consistency", "--target", "eps"], "target x0, not 'eps'"),
        (
            ["--loss", "meanflow", "--model", "unet", "--data", "digits", "--dropout", "0.1"],
            "--dropout are for",
        ),
        (["--loss", "meanflow", "--coupling", "ot"], "--coupling are for --loss fm"),
        (["--loss", "consistency", "--source", "moons"], "--coupling are for --loss fm"),
        (["--loss", "consistency", "--time", "logit-normal"], "draws its times uniform"),
        (["--loss", "meanflow", "--time", "importance"], "uniform or logit-normal"),
        (["--loss", "meanflow", "--weighting", "sigma2"], "its own weighting"),
        (["--loss", "shortcut", "--target", "x0"], "average velocity: target velocity, not 'x0'"),
        (["--loss", "shortcut", "--path", "vp"], "fm or cosine, not 'vp'"),
        (
            ["--ema-targets"],
            "ema_targets True is the EMA targets of --loss shortcut or consistency",
        ),
        (
            ["--loss", "consistency", "--target-ema", "0.95"],
            "target_ema 0.95 is the decay of the target network of --ema-targets; got no",
        ),
        (
            ["--loss", "consistency", "--ema-targets", "--target-ema", "1"],
            "--target-ema must be a number in [0, 1) or 'ct'; got 1.0",
        ),
        (
            ["--loss", "shortcut", "--ema-targets", "--target-ema", "ct"],
            "target_ema 'ct' (CT's mu(N)) follows the grid of --loss consistency; got --loss "
            "shortcut",
        ),
        (
            ["--loss", "consistency", "--ema-targets", "--target-ema", "adaptive"],
            "argument --target-ema: expected a number or 'ct'; got 'adaptive'",
        ),
        (["--loss", "consistency", "--target-ema", "ct"], "target_ema ct is the decay of the"),
        (["--curriculum", "ct"], "curriculum ct is the grid's growth in --loss consistency"),
        (["--loss", "meanflow", "--num-scales", "8"], "num_scales 8 is the grid of --loss"),
        (["--loss", "meanflow", "--num-scales", "1"], "num_scales 1 is the grid of --loss"),
        (["--lognormal", "-1.1", "2"], "lognormal [-1.1, 2.0] is the intervals' law in --loss"),
        (["--t-max", "0.9"], "t_max 0.9 is the grid's end in --loss consistency"),
        (["--ct-weighting", "unit"], "ct_weighting unit is the intervals' weight in --loss"),
        (["--loss", "consistency", "--t-max", "0"], "--t-max must be a number in (0, 1]; got 0.0"),
        (["--rho", "7"], "rho 7.0 is the grid's spacing in --loss consistency"),
        (["--loss", "consistency", "--rho", "0"], "rho must be a finite number > 0; got 0.0"),
        (["--loss", "consistency", "--rho", "nan"], "rho must be a finite number > 0; got nan"),
        (["--loss", "consistency", "--rho", "inf"], "rho must be a finite number > 0; got inf"),
        (
            ["--loss", "consistency", "--ct-weighting", "inverse_sigma_gap"],
            "infinite at t = 1 where alpha = 0: give --t-max below 1",
        ),
        (["--loss", "consistency", "--lognormal", "0", "-1"], "finite with P_std > 0"),
        (
            ["--loss", "consistency", "--curriculum", "ict", "--num-scales", "2"],
            "--num-scales must be an integer >= 3",
        ),
        (
            ["--loss", "shortcut", "--target-guidance", "2"],
            "got loss shortcut without --conditional",
        ),
        (
            [
                "--loss",
                "consistency",
                "--data",
                "digits",
                "--conditional",
                "--target-guidance",
                "2",
            ],
            "needs --loss meanflow or shortcut with --conditional; got loss consistency",
        ),
        (
            [
                "--loss",
                "shortcut",
                "--data",
                "digits",
                "--conditional",
                "--target-guidance",
                "2",
                "--label-dropout",
                "0",
            ],
            "target_guidance 2.0 needs label_dropout > 0",
        ),
        (
            ["--loss", "shortcut", "--data", "digits", "--conditional", "--label-dropout", "0.2"],
            "label_dropout 0.2 is the classifier-free dropout",
        ),
        (
            ["--loss", "fm", "--data", "digits", "--conditional", "--target-guidance", "2"],
            "needs --loss meanflow or shortcut with --conditional; got loss fm",
        ),
        (
            [
                "--loss",
                "meanflow",
                "--data",
                "digits",
                "--conditional",
                "--target-guidance-mix",
                "0.5",
            ],  # fmt: skip
            "target_guidance_mix 0.5 shapes MeanFlow's guided targets: it needs --loss meanflow "
            "with --target-guidance; got loss meanflow without --target-guidance",
        ),
        (
            [
                "--loss",
                "shortcut",
                "--data",
                "digits",
                "--conditional",
                "--target-guidance",
                "2",
                "--target-guidance-interval",
                "0",
                "0.8",
            ],  # fmt: skip
            "target_guidance_interval [0.0, 0.8] shapes MeanFlow's guided targets: it needs "
            "--loss meanflow with --target-guidance; got loss shortcut",
        ),
        (
            [
                "--loss",
                "meanflow",
                "--data",
                "digits",
                "--conditional",
                "--target-guidance",
                "2",
                "--target-guidance-mix",
                "1",
            ],  # fmt: skip
            "--target-guidance-mix must lie in [0, 1); got 1.0",
        ),
        (
            [
                "--loss",
                "meanflow",
                "--data",
                "digits",
                "--conditional",
                "--target-guidance",
                "2",
                "--target-guidance-interval",
                "0.8",
                "0.2",
            ],  # fmt: skip
            "target_guidance_interval: interval must satisfy 0 <= t_lo < t_hi",
        ),
    ],
)
def test_bad_combinations_are_one_line_errors(args, expected, capsys):
    assert expected in _error(["train", "--out", "x", *args], capsys)


# 8 gaussians from N(0, I): the energy distance of the prior itself is 0.206 (4,000 points).
PRIOR_ED = 0.206


@pytest.mark.parametrize(
    ("loss", "steps", "k", "bound"),
    # measured (600 / 200 training steps at batch 128): meanflow ED 0.007 at 1 step (0.057 after
    # 300 steps); shortcut 0.008 after 300 steps (with --ema-targets, run here, 0.0084 and 0.0064 at
    # 2 steps; 0.0078 and 0.0055 without); consistency 0.043 at 2 steps (CT converges slower:
    # 0.009 after 600 steps)
    [
        ("meanflow", 600, 1, 0.1 * PRIOR_ED),
        ("shortcut", 300, 1, 0.1 * PRIOR_ED),
        ("consistency", 200, 2, 0.5 * PRIOR_ED),
    ],
)
def test_fewstep_run_from_the_command_line(loss, steps, k, bound, tmp_path, capsys, monkeypatch):
    import jaxdiff.train

    out, asked = tmp_path / loss, []
    make_step = jaxdiff.train.make_train_step

    def recording(*args, **kwargs):  # the run's make_train_step gets the config's ema_targets
        asked.append((kwargs.get("ema_targets"), kwargs.get("target_decay")))
        return make_step(*args, **kwargs)

    monkeypatch.setattr(jaxdiff.train, "make_train_step", recording)
    train = ["train", "--loss", loss, "--data", "8gaussians", "--lr", "3e-3"]
    small = ["--steps", str(steps), "--batch", "128", "--eval-n", "0", "--no-progress"]
    # shortcut: the targets from the EMA network; consistency: from a target network of its own
    # at mu = 0, the online network's values, so the run equals one without targets bit for bit
    # (measured: ED 0.0434 both ways), while the target is saved and sampling restores it
    ema = {"shortcut": ["--ema-targets"], "consistency": ["--ema-targets", "--target-ema", "0"]}
    assert main([*train, *small, *ema.get(loss, []), "--out", str(out)]) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    mu = 0.0 if loss == "consistency" else None
    assert config["ema_targets"] is (loss in ema) and config["target_ema"] == mu
    assert asked == [(loss in ema, mu)]
    for k in (None, 2) if loss != "consistency" else (2,):  # None: the default, one step
        folder = out / f"s{k}"
        argv = ["sample", "--ckpt", str(out), "--n", "4000", "--out", str(folder)]
        assert main(argv + ([] if k is None else ["--steps", str(k)])) == 0
        metrics = json.loads((folder / "metrics.json").read_text())
        print(loss, k, metrics["energy_distance"])
        assert metrics["solver"] == loss and metrics["steps"] == (k or 1)
        assert metrics["energy_distance"] < bound
    capsys.readouterr()
    err = _error(["sample", "--ckpt", str(out), "--solver", "heun", "--eta", "1"], capsys)
    assert f"a {loss} run samples with its own sampler" in err and "--solver, --eta" in err
    err = _error(["sample", "--ckpt", str(out), "--guidance-interval", "0", "0.8"], capsys)
    assert "drop --guidance-interval" in err


@pytest.mark.parametrize("model", ["mlp", "unet"])
def test_conditional_meanflow_sampler_passes_the_labels(model):
    """The CLI's sampler of a conditional meanflow run is one jump x1 - u(x1, 1, 0, labels) from
    the driver's start, per batch of keys fold_in(key, i): equal to jd.sample with the labels bound
    into the field, and different for another class. ``--model unet`` is the two-time U-Net."""
    small = {"width": 32} if model == "mlp" else {"channels": [8, 16]}
    c = E.resolve({"loss": "meanflow", "data": "digits", "conditional": True, "model": model,
                   **small})  # fmt: skip
    setup = E.build(c)
    two_times = "TwoTimeMLP" if model == "mlp" else "TwoTimeUNet"
    assert type(setup.model).__name__ == two_times
    # --dtype reaches the two-time networks (the MLP's was dropped: it computed in float32)
    assert E.build({**c, "dtype": "bfloat16"}).model.dtype == jnp.bfloat16
    state, _ = E.init_state(c, setup)
    params = perturb(state.params, 0.05, seed=1)  # the last layer starts at 0: perturb it all
    draw = make_sampler(c, setup, steps=1, batch=8)
    key = jax.random.key(2)
    x3, _ = draw(params, key, 8, np.full(8, 3))
    x5, _ = draw(params, key, 8, np.full(8, 5))
    labels = jnp.full(8, 3, jnp.int32)
    field = jd.Field(lambda p, x, t, r=None: setup.model.apply(p, x, t, r, labels), "velocity")
    direct = jd.sample(jax.random.fold_in(key, 0), setup.path, field.bind(params), (8, 8, 8, 1),
                       sampler=jd.samplers.meanflow())  # fmt: skip
    assert x3.shape == (8, 8, 8, 1)
    np.testing.assert_allclose(x3, direct.x, rtol=1e-5, atol=1e-5)
    assert float(np.abs(x3 - x5).max()) > 1e-3


def test_meanflow_trains_the_two_time_unet_on_the_digits(tmp_path, capsys):
    """``--loss meanflow --model unet``: a TwoTimeUNet (widths 16, 32) after 300 steps at batch 64
    generates digits of the requested class in one jump. Untrained, one jump returns the noise
    (the output layer starts at zero: FD 247). Measured: FD 23.6, accuracy 0.92 (500 samples; floor FD 6.6); the full
    run (widths 32, 64, 64, 1,500 x 128) reaches FD 8.4, accuracy 0.98."""
    out = tmp_path / "mf"
    train = ["train", "--loss", "meanflow", "--data", "digits", "--conditional", "--model", "unet"]
    small = ["--channels", "16", "32", "--steps", "300", "--batch", "64", "--lr", "3e-3"]
    assert main([*train, *small, "--eval-n", "500", "--no-progress", "--out", str(out)]) == 0
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["frechet_distance"] < 60 and final["class_accuracy"] > 0.75, final
    capsys.readouterr()


@pytest.mark.parametrize("loss", ["shortcut", "meanflow"])
def test_target_guidance_reaches_the_loss(loss):
    """--target-guidance builds the loss with guided targets and the label dropout: at the same
    parameters and key, w = 10 and w = 1 (the conditional targets) give different losses (the
    shortcut's by 1.2e-3 of the loss, only its finest level is guided; w = 2: 1e-5, the labels of
    a perturbed fresh network move it little; MeanFlow's 8-fold), and a resumed run refuses to
    change it or --ema-targets, naming both."""
    from jaxdiff import rundir as R

    c = E.resolve({"loss": loss, "data": "digits", "conditional": True, "width": 32,
                   "target_guidance": 1.0})  # fmt: skip
    setup = E.build(c)
    state, _ = E.init_state(c, setup)
    params = perturb(state.params, 0.05, seed=1)
    batch = setup.sample_batch(jax.random.key(0))

    def value(w):
        fn = E.build({**c, "target_guidance": w}).loss
        return float(jax.jit(fn)(params, jax.random.key(3), batch))

    assert abs(value(10.0) - value(1.0)) > 1e-4 * value(1.0)
    with pytest.raises(ValueError) as err:
        R.resume_config(c, {"target_guidance": 2.0, "ema_targets": True})
    assert "--target-guidance 2.0 (the run has 1.0)" in str(err.value)
    assert "--ema-targets (the run was trained without it)" in str(err.value)
    if loss == "meanflow":  # its guided targets' two options reach the loss, as the library's
        from jaxdiff.meanflow import meanflow_loss

        options = {"target_guidance": 2.0, "target_guidance_mix": 0.5,
                   "target_guidance_interval": [0.0, 0.6]}  # fmt: skip
        stored = E.resolve(json.loads(json.dumps({**c, **options})))  # as a run stores it
        fn = jax.jit(E.build(stored).loss)(params, jax.random.key(3), batch)
        direct = meanflow_loss(jd.Field(E.network_fn(c, setup.model), "velocity"), setup.path,
                               time_sampler=L.uniform_time(0.0, 1.0),
                               label_dropout=0.1, null_label=10, target_guidance=2.0,
                               guidance_mix=0.5, guidance_interval=(0.0, 0.6))  # fmt: skip
        np.testing.assert_allclose(fn, jax.jit(direct)(params, jax.random.key(3), batch), rtol=1e-6)
        assert abs(float(fn) - value(2.0)) > 1e-4 * value(2.0)  # and they change it
        for bad in ("08", [False, True], [0.0, 0.5, 1.0]):
            with pytest.raises(ValueError, match="target_guidance_interval must be two numbers"):
                E.resolve({**c, **options, "target_guidance_interval": bad})
        with pytest.raises(ValueError) as err:
            R.resume_config({**c, **options}, {"target_guidance_interval": [0.0, 0.8]})
        assert "--target-guidance-interval [0.0, 0.8] (the run has [0.0, 0.6])" in str(err.value)


def test_a_consistency_curriculum_from_the_command_line_is_the_api_s():
    """``--curriculum ct --num-scales 9 --lognormal -1.1 2``: the loss follows
    ``jd.ct_num_scales(k, steps, 2, 8)`` in one program (its value at each step the fixed grid's
    of that size), its intervals drawn from iCT's log-normal."""
    c = E.resolve({"loss": "consistency", "data": "8gaussians", "steps": 100, "curriculum": "ct",
                   "num_scales": 9, "lognormal": [-1.1, 2.0]})  # fmt: skip
    n = E.consistency_scales(c)
    assert n == jd.curriculum(lambda k: jd.ct_num_scales(k, 100, 2, 8), 100)
    assert n.stages[-1] == (9, 100)
    ict = E.consistency_scales({**c, "curriculum": "ict"})
    assert [v for v, _ in ict.stages] == [3, 5, 9]
    assert E.consistency_scales({**c, "curriculum": "none"}) == 9
    # --target-ema ct: CT's mu(N) of the same grid, a curriculum of its own (or one number)
    assert E.target_decay(c) is None and E.target_decay({**c, "target_ema": 0.99}) == 0.99
    mu = E.target_decay({**c, "target_ema": "ct"})
    assert mu == jd.curriculum(lambda k: jd.ct_target_decay(jd.ct_num_scales(k, 100, 2, 8)), 100)
    assert mu.stages[0][1] == 1 and mu.stages[-1][1] == 100
    assert mu.stages[0][0] == pytest.approx(0.81) and mu.stages[-1][0] == pytest.approx(0.9**0.25)
    fixed = {**c, "target_ema": "ct", "curriculum": "none"}
    assert E.target_decay(fixed) == jd.ct_target_decay(9)
    setup = E.build(c)
    params = E.init_state(c, setup)[0].params
    batch = setup.sample_batch(jax.random.key(1))
    net = jd.Field(E.network_fn(c, setup.model), "x0")
    for k in (0, 50, 99):
        fixed = jd.consistency_training_loss(net, setup.path, num_scales=n(jnp.int32(k)).item(),
                                             lognormal=(-1.1, 2.0))  # fmt: skip
        np.testing.assert_allclose(setup.loss(params, jax.random.key(2), batch, step=jnp.int32(k)),
                                   fixed(params, jax.random.key(2), batch), rtol=1e-6)  # fmt: skip


def test_ict_weighting_and_t_max_from_the_command_line_are_the_api_s():
    """``--t-max 0.99 --ct-weighting inverse_sigma_gap``: the loss is the API's with that grid end
    and weighting (not the default's), and its sampler starts at 0.99, not at 1."""
    c = E.resolve({"loss": "consistency", "data": "8gaussians", "steps": 10, "num_scales": 9,
                   "t_max": 0.99, "ct_weighting": "inverse_sigma_gap"})  # fmt: skip
    setup = E.build(c)
    params = jax.tree.map(lambda p: p + 0.05, E.init_state(c, setup)[0].params)
    batch = setup.sample_batch(jax.random.key(1))
    net = jd.Field(E.network_fn(c, setup.model), "x0")
    api = jd.consistency_training_loss(
        net, setup.path, num_scales=9, t_max=0.99, weighting="inverse_sigma_gap"
    )
    value = setup.loss(params, jax.random.key(2), batch)
    np.testing.assert_allclose(value, api(params, jax.random.key(2), batch), rtol=1e-6)
    default = jd.consistency_training_loss(net, setup.path, num_scales=9)
    assert abs(float(value) - float(default(params, jax.random.key(2), batch))) > 1e-3 * value
    draw = make_sampler(c, setup, steps=1, batch=8)
    x, _ = draw(params, jax.random.key(3), 8)
    field = net.bind(params)
    direct = jd.sample(jax.random.fold_in(jax.random.key(3), 0), setup.path, field, (8, 2),
                       sampler=jd.samplers.consistency(), steps=1, t_start=0.99).x  # fmt: skip
    np.testing.assert_allclose(x, direct, rtol=1e-5, atol=1e-6)


def test_the_grid_s_rho_from_the_command_line_is_the_api_s():
    """``--rho 7``: the loss is the API's on ``consistency_grid(N, rho=7)`` (not the uniform
    default's), with a fixed grid and with iCT's curriculum."""
    for extra, num_scales in (({}, 9), ({"curriculum": "ict", "steps": 20}, None)):
        c = E.resolve({"loss": "consistency", "data": "8gaussians", "steps": 10, "num_scales": 9,
                       "rho": 7, **extra})  # fmt: skip
        setup = E.build(c)
        params = jax.tree.map(lambda p: p + 0.05, E.init_state(c, setup)[0].params)
        batch = setup.sample_batch(jax.random.key(1))
        net = jd.Field(E.network_fn(c, setup.model), "x0")
        n = E.consistency_scales(c) if num_scales is None else num_scales
        step = {} if num_scales is not None else {"step": jnp.asarray(12)}
        value = setup.loss(params, jax.random.key(2), batch, **step)
        api = jd.consistency_training_loss(net, setup.path, num_scales=n, rho=7.0)
        np.testing.assert_allclose(value, api(params, jax.random.key(2), batch, **step), rtol=1e-6)
        uniform = jd.consistency_training_loss(net, setup.path, num_scales=n)
        other = uniform(params, jax.random.key(2), batch, **step)
        assert abs(float(value) - float(other)) > 1e-3 * float(value)


def test_resuming_a_curriculum_with_more_steps_says_where_its_grid_stands(tmp_path, capsys):
    """More ``--steps`` re-spans the curriculum as it does the learning rate (a run of the new
    total): the resume message says the grid's size now and before."""
    out = str(tmp_path / "ict")
    argv = [
        "train",
        "--loss",
        "consistency",
        "--data",
        "8gaussians",
        "--curriculum",
        "ict",
        "--num-scales",
        "9",
        "--ema-targets",
        "--target-ema",
        "ct",
        "--batch",
        "64",
        "--eval-n",
        "0",
        "--no-progress",
        "--out",
        out,
    ]
    assert main([*argv, "--steps", "20"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main([*argv, "--steps", "40", "--resume"]) == 0
    # iCT from 3 to 9 points: 9 at the end of 20 steps; at step 20 of 40, 5
    out = capsys.readouterr().out
    assert "the grid has 5 points at step 20 (it had 9)" in out
    # --target-ema ct follows it: mu(5) = 0.9^(2/4), mu(9) = 0.9^(2/8)
    assert f"the target network's decay mu(N) is {0.9**0.5:.6g} (it had {0.9**0.25:.6g})" in out
