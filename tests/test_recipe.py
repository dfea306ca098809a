"""The image recipe on the U-Net: class conditioning and classifier-free guidance through the same
Field as the MLP, dropout keys passed by the losses, and the CLI's new options (precond, weighting,
time, dropout, dtype) end to end and in their one-line errors."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.cli import main
from jaxdiff.nets import UNet, init_params
from tests.cli_helpers import cli_error as _error
from tests.net_helpers import perturb


def _unet():
    model = UNet(channels=(8,), heads=1, num_classes=10)  # one resolution: compiles fast
    x = jnp.zeros((4, 8, 8, 1))
    params = init_params(model, jax.random.key(0), x, jnp.zeros(4), jnp.zeros(4, jnp.int32))

    # the output conv starts at zero: perturb every weight so that the labels show in the output
    return model, perturb(params, 0.05, seed=1)


class _DropoutNet(nn.Module):  # the smallest Flax network with dropout: what the U-Net does
    rate: float

    @nn.compact
    def __call__(self, x, t, labels=None):
        h = nn.Dense(16)(jnp.concatenate([x, t[:, None]], axis=-1))
        h = nn.Dropout(self.rate, deterministic=not self.has_rng("dropout"))(nn.silu(h))
        return nn.Dense(x.shape[-1])(h)


def test_losses_pass_a_dropout_key_and_nothing_else_changes():
    path = jd.vp_path()
    x = jax.random.normal(jax.random.key(2), (64, 3))
    batch = (x, jnp.arange(64) % 10)
    kw = dict(label_dropout=0.2, null_label=10)
    k1, k2 = jax.random.key(3), jax.random.key(4)
    model = _DropoutNet(0.5)
    params = model.init(jax.random.key(0), x, jnp.zeros(64))
    net = jd.Field(model.apply, "eps")
    loss = jax.jit(jd.eps_loss(net, path, rngs="dropout", **kw))
    off = jax.jit(jd.eps_loss(net, path, **kw))  # no rng: deterministic, as in sampling
    assert float(loss(params, k1, batch)) == float(loss(params, k1, batch))  # a function of key
    assert float(loss(params, k1, batch)) != float(off(params, k1, batch))  # dropout is on
    assert float(loss(params, k1, batch)) != float(loss(params, k2, batch))
    # the loss folds the dropout key off its key: t, eps and label draws stay those of the plain
    # loss, so with rate 0 the two losses agree bit for bit
    model0 = _DropoutNet(0.0)
    net0 = jd.Field(model0.apply, "eps")
    a = jd.eps_loss(net0, path, rngs=("dropout",), **kw)(params, k1, batch)
    assert float(a) == float(jd.eps_loss(net0, path, **kw)(params, k1, batch))
    grads = jax.jit(jax.grad(loss))(params, k2, batch)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_classifier_free_guidance_on_the_unet():
    # the conditional U-Net behind EDM's wrapper, guided: the labels pass through both transforms
    model, params = _unet()
    path = jd.linear_path()
    field = jd.edm_precond(jd.Field(model.apply, "x0", params), path, sigma_data=0.5)
    labels, null = jnp.array([0, 3, 7, 9]), jnp.full(4, 10)
    x = jax.random.normal(jax.random.key(5), (4, 8, 8, 1))
    t = jnp.full(4, 0.4)

    @jax.jit
    def parts(field):
        guided = jd.classifier_free_guidance(field, labels, 10, 2.0)
        return field(x, t, labels), field(x, t, null), guided(x, t)

    c, u, g = parts(field)
    assert not np.allclose(c, u, atol=1e-4)  # the label matters
    np.testing.assert_allclose(g, u + 2.0 * (c - u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--precond", "edm", "--target", "eps"], "precond edm predicts x0"),
        (["--precond", "karras"], "invalid choice: 'karras'"),
        (["--model", "mlp", "--dropout", "0.1"], "needs model unet"),
        (["--dropout", "1.5"], "dropout must lie in [0, 1)"),
        (["--sigma-data", "-1", "--precond", "edm"], "--sigma-data must be a positive number"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
        (["--weighting", "snr"], "invalid choice: 'snr'"),
        (["--time", "lognormal"], "invalid choice: 'lognormal'"),
    ],
)
def test_recipe_options_fail_in_one_line(extra, expected, capsys):
    argv = ["train", "--data", "digits", "--out", "x", *extra]
    assert expected in _error(argv, capsys)
    assert not Path("x").exists()


def test_cli_trains_and_samples_the_edm_unet(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        "digits",
        "--conditional",
        "--model",
        "unet",
        "--channels",
        "8",  # one resolution: compiles fast
    ]
    args += ["--precond", "edm", "--weighting", "edm", "--time", "edm", "--dropout", "0.1"]
    args += ["--dtype", "bf16", "--steps", "2", "--chunk", "2", "--batch", "16", "--eval-n", "0"]
    assert main([*args, "--no-progress", "--out", str(out)]) == 0
    meta = json.loads(next((out / "ckpt").glob("*/meta/metadata")).read_text())
    config = meta.get("config", meta)
    assert (config["precond"], config["dtype"], config["dropout"]) == ("edm", "bfloat16", 0.1)
    assert config["target"] == "x0" and config["loss"] == "x0"
    sample = ["sample", "--ckpt", str(out), "--n", "20", "--steps", "2", "--guidance", "2"]
    assert main(sample) == 0
    x = np.load(out / "samples" / "samples.npz")["samples"]
    assert x.shape == (20, 8, 8, 1) and np.isfinite(x).all()
