"""Sharded sampling: the batch split over 4 fake CPU devices gives the samples of one device.

The fake devices need ``XLA_FLAGS`` before JAX starts, so the check runs in a subprocess. It uses
the default error mode (``EQX_ON_ERROR`` unset): runtime checks must not replicate the batch.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxdiff._checks import check_finite

SCRIPT = r"""
import json
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jaxdiff as jd

assert jax.device_count() == 4, jax.devices()
data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-1.0, 1.5]]), std=0.5)
path = jd.vp_path()
field = data.field(path, "eps")
x = jax.random.normal(jax.random.key(0), (256, 2))
mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))

@jax.jit
def sample(x, key):  # the reverse SDE: drift (all of the ODE) and noise
    return (jd.sample(key, path, field, x_init=x, sampler=jd.samplers.sde(), steps=20).x,)

key = jax.random.key(1)
one = sample(x, key)
four = sample(x_sharded, key)

from jaxdiff._checks import error_if
shard = NamedSharding(mesh, P("data"))

@jax.jit
def labels_checked(labels):  # an integer-only check (the labels' range in nets/embeddings)
    out = error_if(labels, (labels < 0) | (labels > 10), "labels out of range")
    return jax.lax.with_sharding_constraint(out * 2, shard)

labels = jax.device_put(jnp.arange(256, dtype=jnp.int32) % 4, shard)
checked = labels_checked(labels)
print(json.dumps({
    "labels_equal": bool(jnp.all(checked == 2 * labels)),
    "labels_devices": len(checked.sharding.device_set),
    "devices_in": [len(a.sharding.device_set) for a in one],
    "devices_out": [len(a.sharding.device_set) for a in four],
    "replicated": [a.sharding.is_fully_replicated for a in four],
    "spec": [str(a.sharding.spec) for a in four],
    "max_diff": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(one, four)],
    "scale": [float(jnp.max(jnp.abs(a))) for a in one],
}))
"""


def _on_devices(script: str, devices: int) -> tuple[subprocess.CompletedProcess, dict]:
    """``script`` run in a fresh process with ``devices`` fake CPU devices (the flag must be set
    before JAX starts) and the default error mode; its last line of output as JSON."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("EQX_ON_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_sampling_matches_one_device():
    proc, out = _on_devices(SCRIPT, 4)
    assert out["devices_in"] == [1]
    # Each device holds a quarter of the batch: the samples stay sharded, not replicated.
    assert out["devices_out"] == [4]
    assert out["replicated"] == [False]
    assert all("data" in spec for spec in out["spec"])
    # Same numbers up to float32 rounding (measured 5e-7); the noise is the same because jax's
    # threefry keys are partitionable. Samples are O(3).
    assert out["scale"][0] > 1.0
    assert out["max_diff"][0] < 1e-4, out
    # an integer-only error_if went through equinox's cond, which replicated the labels on
    # device 0 ("Involuntary full rematerialization" on every --conditional multi-device run)
    assert out["labels_equal"] and out["labels_devices"] == 4, out
    assert "rematerialization" not in proc.stderr, proc.stderr[-2000:]


def test_check_finite_under_jit_keeps_working():
    """The runtime check threads a scalar flag (keeping x's sharding) and still raises."""
    fn = jax.jit(lambda x: 2.0 * check_finite(x, "x"))
    assert jnp.array_equal(fn(jnp.ones(3)), 2.0 * jnp.ones(3))
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(fn(jnp.array([1.0, jnp.nan, 1.0])))


def test_cli_refuses_a_batch_the_devices_do_not_split_before_the_run_folder(tmp_path):
    """On 3 devices, --batch 16 made the run folder, its lock and ckpt/ and logged "training ...
    on 3 device(s)" before the chunk refused the batch in words that named no flag."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=3"
    env["JAX_PLATFORMS"] = "cpu"
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--model", "mlp", "--width", "16", "--depth", "1",
            "--steps", "2", "--batch", "16", "--eval-n", "0", "--no-progress"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdiff", *argv], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--batch 16 must be a multiple of the 3 devices" in proc.stderr, proc.stderr
    assert not run.exists()


def test_a_mesh_without_a_data_axis_is_named():
    """make_train_chunk and make_feed_chunk raised a bare KeyError('data')."""
    import optax

    from jaxdiff.train import make_feed_chunk, make_train_chunk, make_train_step

    step = make_train_step(lambda p, k, b: jnp.sum((p["w"] - b) ** 2), optax.sgd(0.1))
    mesh = jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="the mesh needs an axis named 'data'.*got axes"):
        make_train_chunk(step, lambda k: jnp.zeros((8, 2)), 2, mesh=mesh)
    with pytest.raises(ValueError, match="the mesh needs an axis named 'data'"):
        make_feed_chunk(step, iter([]), 2, mesh=mesh)


def test_a_resume_on_devices_that_do_not_split_the_batch_names_the_device_counts(monkeypatch):
    """A resume cannot change --batch, yet its refusal said "--batch 8 must be a multiple of the
    3 devices": it names the checkpoint's batch and the device counts that split it now."""
    from jaxdiff import run_train

    monkeypatch.setattr(jax, "device_count", lambda: 3)
    with pytest.raises(ValueError, match=r"the run's batch 8 \(from its checkpoint\) does not "
                       r"split over the 3 devices; .* divides it: 1, 2, 4, 8$"):  # fmt: skip
        run_train._check_devices({"batch": 8}, resume=True)
    with pytest.raises(ValueError, match="--batch 8 must be a multiple of the 3 devices"):
        run_train._check_devices({"batch": 8})
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    assert run_train._check_devices({"batch": 8}, resume=True) == {"batch": 8}


SHARD_MAP = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, PartitionSpec as P
import jaxdiff as jd
from jaxdiff.nets import MLP, init_params
from jaxdiff.train import init_train_state, make_train_step

mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
model = MLP(width=16, depth=1)
params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1))
loss = jd.flow_matching_loss(jd.Field(model.apply, "velocity"), jd.linear_path())
opt = optax.adam(1e-2)
state = init_train_state(params, opt, jax.random.key(1))
batch = jax.random.normal(jax.random.key(2), (8, 2))
shard_loss = lambda q, k, b: jax.lax.pmean(loss(q, k, b), "d")
step = make_train_step(shard_loss, opt)
ref_step = make_train_step(lambda q, k, b: sum(loss(q, k, x) for x in jnp.split(b, 2)) / 2, opt)
path = jd.vp_path()
def draw(k, q):  # each device its own key and samples
    k = jax.random.fold_in(k, jax.lax.axis_index("d"))
    return jd.sample(k, path, jd.Field(model.apply, "eps", q), (2, 2), sampler=jd.samplers.ddim(1.0), steps=4).x
def sm(f, i, o):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=i, out_specs=o, check_vma=True))
out = {}
new, value = sm(step, (P(), P("d")), (P(), P()))(state, batch)
want, want_value = jax.jit(ref_step)(state, batch)
out["step"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want.params)))
out["loss"] = abs(float(value) - float(want_value))
x = sm(draw, (P(), P()), P("d"))(jax.random.key(3), params)
out["sample_finite"] = bool(jnp.isfinite(x).all()) and x.shape == (4, 2)
def draw_unipc(k, q):  # its history buffer did not vary as x does: the scan's carry types differed
    k = jax.random.fold_in(k, jax.lax.axis_index("d"))
    return jd.sample(k, path, jd.Field(model.apply, "eps", q), (2, 2), sampler=jd.samplers.unipc(3), steps=4).x
x = sm(draw_unipc, (P(), P()), P("d"))(jax.random.key(3), params)
out["sample_finite"] &= bool(jnp.isfinite(x).all()) and x.shape == (4, 2)
try:  # a NaN batch still names itself
    jax.block_until_ready(sm(shard_loss, (P(), P(), P("d")), P())(params, jax.random.key(4), batch.at[0, 0].set(jnp.nan)))
    out["nan"] = "no error"
except Exception as err:
    out["nan"] = str(err)
print(json.dumps(out))
"""


def test_losses_training_steps_and_samplers_run_inside_shard_map():
    """Inside jax.shard_map(check_vma=True) every loss, training step and sample failed at trace
    time: equinox's cond met a per-device check flag against its error branch's plain one ("cond
    branches must have equal output types", a review of JAX transformations). The flag is made
    the same on every device (pmax over the axes it varies over): the step equals one device's
    mean of the shards' losses, and a NaN batch still raises its named error."""
    _, out = _on_devices(SHARD_MAP, 2)
    assert out["step"] < 1e-5 and out["loss"] < 1e-5, out
    assert out["sample_finite"], out
    assert "non-finite" in out["nan"], out["nan"][-2000:]
