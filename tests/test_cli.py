"""The command line: acceptance runs on 2-D data (train, then sample) and every error path."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.cli import main
from tests.cli_helpers import cli_error as _error

N = 4000  # samples compared with held-out data

# Energy distance between two independent true sets of N points is a U-statistic with mean 0;
# its spread (RMS over independent pairs) is the noise floor. A trained model must land within
# FACTOR times that floor; an untrained one (pure prior) is hundreds of times above it.
FACTOR = 12.0


def _noise_floor(name: str) -> float:
    sampler = jd.data.TOY_DATASETS[name]
    eds = [
        float(jd.energy_distance(sampler(k1, N), sampler(k2, N)))
        for k1, k2 in jax.random.split(jax.random.key(123), (6, 2))
    ]
    return float(np.sqrt(np.mean(np.square(eds))))


RUNS = {
    "fm": ["--path", "fm"],
    "vp-dsm": ["--path", "vp", "--loss", "dsm", "--target", "eps", "--weighting", "sigma2"],
}


# Two of the four (run, data) pairs: each run and each data set once. The library's losses, paths
# and data sets have their own tests; this one is the command line end to end (measured: 13-22 s
# each alone, 20-44 s in the suite, per pair).
@pytest.mark.parametrize(("run", "data"), [("fm", "checkerboard"), ("vp-dsm", "8gaussians")])
def test_trained_model_matches_the_data(tmp_path, data, run, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", data, *RUNS[run], "--steps", "1500", "--batch", "256"]
    assert main([*args, "--eval-n", "0", "--no-progress", "--out", str(out)]) == 0
    assert main(["sample", "--ckpt", str(out), "--n", str(N), "--steps", "20"]) == 0
    metrics = json.loads((out / "samples" / "metrics.json").read_text())
    samples = np.load(out / "samples" / "samples.npz")["samples"]
    assert samples.shape == (N, 2) and np.isfinite(samples).all()
    assert (out / "samples" / "samples.png").stat().st_size > 10_000
    floor = _noise_floor(data)
    print(f"{data} {run}: energy distance {metrics['energy_distance']:.2e}, floor {floor:.2e}")
    assert metrics["energy_distance"] < FACTOR * floor
    assert metrics["mmd_kernel"].startswith("sum over h")
    assert metrics["n"] == metrics["metrics_n"] == metrics["n_samples"] == N
    if data == "checkerboard" and run == "fm":  # the O(n^2) metrics see --metrics-n samples
        sub = ["sample", "--ckpt", str(out), "--n", str(N), "--out", str(tmp_path / "s")]
        assert main([*sub, "--metrics-n", "1000"]) == 0
        metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
        assert metrics["n"] == metrics["metrics_n"] == 1000 and metrics["n_samples"] == N
        assert metrics["energy_distance"] < 4 * FACTOR * floor  # 4x fewer points: 4x the floor
        assert main([*sub[:-1], str(tmp_path / "s0"), "--metrics-n", "0"]) == 0
        metrics = json.loads((tmp_path / "s0" / "metrics.json").read_text())
        assert metrics["metrics_n"] == 0 and "energy_distance" not in metrics
        assert (tmp_path / "s0" / "samples.png").stat().st_size > 10_000
        assert "--metrics-n must be an integer >= 0" in _error([*sub, "--metrics-n", "-1"], capsys)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["fly"], "invalid choice: 'fly'"),
        ([], "required: command"),
        (["train", "--out", "x", "--steps", "0"], "expected a positive integer"),
        (["train", "--out", "x", "--steps", "ten"], "expected a positive integer"),
        (["train", "--out", "x", "--data", "mnist"], "invalid choice: 'mnist'"),
        (["train", "--out", "x", "--lr", "-1"], "--lr must be a positive number"),
        (["train", "--out", "x", "--eval-n", "1"], "error: --eval-n must be 0 (no evaluation)"),
        (["train", "--out", "x", "--lr", "nan"], "lr must be a positive number"),
        (["train", "--out", "x", "--ema", "1.5"], "ema must lie in [0, 1)"),
        (["train", "--out", "x", "--model", "unet"], "needs image data"),
        (["train", "--out", "x", "--conditional"], "needs labelled data"),
        (["train", "--out", "x", "--target", "eps"], "singular at t = 1"),
        (["train", "--data", "checkerboard"], "required: --out"),
        (["sample", "--ckpt", "/nonexistent/run"], "does not exist"),
        (["sample", "--ckpt", "/tmp", "--solver", "rk99"], "invalid choice: 'rk99'"),
        (["sample", "--ckpt", "/tmp", "--n", "-5"], "expected a positive integer"),
        (["train", "--out", "x", "--seed", str(2**64)], "expected an integer in [0, 2**32)"),
    ],
)
def test_cli_errors_are_one_line(argv, expected, capsys):
    assert expected in _error(argv, capsys)
    assert not Path("x").exists()  # a refused run leaves no folder behind


def test_cli_checkpoint_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoint" in _error(["sample", "--ckpt", str(empty)], capsys)
    resume = ["train", "--out", str(tmp_path / "new"), "--resume", "--no-progress"]
    assert "no checkpoint to resume" in _error(resume, capsys)
    run = tmp_path / "run"
    small = ["--width", "8", "--depth", "1", "--batch", "16", "--steps", "20", "--chunk", "10"]
    train = ["train", *small, "--eval-n", "0", "--no-progress", "--out", str(run)]
    assert main(train) == 0
    capsys.readouterr()
    assert "already holds checkpoints" in _error(train, capsys)
    assert "needs a class-conditional model" in _error(
        ["sample", "--ckpt", str(run), "--class", "3"], capsys
    )
    assert "eta must be >= 0" in _error(["sample", "--ckpt", str(run), "--eta", "-1"], capsys)
    for flag in (["--guidance", "2"], ["--guidance-interval", "0", "0.8"]):  # once ignored
        assert "--guidance and --guidance-interval need a class-conditional model" in _error(
            ["sample", "--ckpt", str(run), *flag], capsys
        )


def test_demo_trains_samples_and_reports(tmp_path, capsys):
    """The README's main job, shortened: it must write the plot, metrics and checkpoints."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "200", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "energy distance to held-out data" in printed and "two true sets" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"] if "final" in metrics else metrics
    assert np.isfinite(final["energy_distance"]) and np.isfinite(final["mmd"])
    assert (out / "samples.png").stat().st_size > 10_000
    assert any((out / "ckpt").iterdir())
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".jaxdiff.lock"}
    # run again: the finished demo is reported as it stands, nothing retrained or rewritten
    assert main(["demo", "--out", str(out), "--steps", "200", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "holds this demo, finished" in printed and f"{final['energy_distance']:.5f}" in printed
    assert {p: p.read_bytes() for p in files} == files
    # stopped during its final evaluation: the next run finishes it, without training again
    del metrics["final"]
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert main(["demo", "--out", str(out), "--steps", "200", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to train" in printed and "energy distance to held-out data" in printed
    again = json.loads((out / "metrics.json").read_text())
    assert again["final"]["energy_distance"] == final["energy_distance"]  # same keys, same bits
    assert again["loss_history"] == metrics["loss_history"]
    # a demo of another length is another run: refused, nothing touched
    assert main(["demo", "--out", str(out), "--steps", "300", "--no-progress"]) == 2
    assert "holds another run (steps 200" in capsys.readouterr().err
