"""The command line with a data source and a coupling: a translation run end to end, and a
one-line error for every bad combination."""

import json

import jax
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.cli import main
from tests.cli_helpers import cli_error as _error


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--source", "moons", "--path", "vp"], "needs a path that ends at it"),
        (["--source", "moons", "--path", "ve"], "needs a path that ends at it"),
        (["--source", "moons", "--path", "cosine", "--loss", "dsm"], "needs Gaussian noise"),
        (["--coupling", "ot", "--path", "vp", "--loss", "dsm"], "coupling 'ot'"),
        (["--coupling", "sinkhorn", "--path", "vp", "--target", "score"], "needs Gaussian noise"),
        (["--coupling", "ot-class"], "needs labels: add --conditional"),
        (["--source", "moons", "--data", "digits"], "needs source 'gaussian'"),
        (["--source", "mnist"], "invalid choice: 'mnist'"),
        (["--coupling", "hungarian"], "invalid choice: 'hungarian'"),
        (["--coupling", "sinkhorn", "--ot-reg", "0"], "--ot-reg must be a positive number"),
        (["--coupling", "sinkhorn", "--ot-reg", "0.001"], "below 0.005 of the mean cost"),
        (["--coupling", "ot", "--ot-reg", "0.1"], "coupling 'ot' does not use it"),
        (["--ot-reg", "0.1"], "coupling 'independent' does not use it"),
    ],
)
def test_bad_combinations_are_one_line_errors(args, expected, capsys):
    assert expected in _error(["train", "--out", "x", *args], capsys)


def test_translation_run_from_the_command_line(tmp_path, capsys):
    # moons -> 8 gaussians with mini-batch OT, 600 steps: the 4-step ODE from fresh moons lands on
    # the 8 gaussians. Measured ED 0.004 against 0.197 for the source points themselves.
    out = tmp_path / "m2g"
    train = ["train", "--source", "moons", "--data", "8gaussians", "--coupling", "ot"]
    small = ["--steps", "600", "--batch", "128", "--eval-n", "0", "--no-progress"]
    assert main([*train, *small, "--out", str(out)]) == 0
    assert (
        main(["sample", "--ckpt", str(out), "--n", "4000", "--steps", "4", "--solver", "euler"])
        == 0
    )
    metrics = json.loads((out / "samples" / "metrics.json").read_text())
    x1 = jd.data.moons(jax.random.key(0), 4000)
    far = float(jd.energy_distance(x1, jd.data.eight_gaussians(jax.random.key(1), 4000)))
    print(f"ED {metrics['energy_distance']:.4f}; source to data {far:.4f}")
    assert metrics["energy_distance"] < 0.05 * far
    samples = np.load(out / "samples" / "samples.npz")["samples"]
    assert samples.shape == (4000, 2) and np.isfinite(samples).all()
    capsys.readouterr()
    assert "samples with the ODE" in _error(["sample", "--ckpt", str(out), "--eta", "1"], capsys)
