"""One process of ``tests/test_multihost.py``: ``python multihost_worker.py NPROC PID PORT DIR``.

With ``NPROC = 2`` two such processes (2 fake CPU devices each) join through
``jax.distributed.initialize`` and gloo; with ``NPROC = 1`` one process holds all 4 devices. Each
runs the README's multi-host recipes and prints one JSON line of what they gave.
"""

import json
import os
import sys

import jax


def main() -> None:
    nproc, pid, port, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if nproc > 1:
        try:  # CPU collectives across processes (a JAX without the option has its own default)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, ValueError):
            pass
        jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)

    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    import jaxdiff as jd
    from jaxdiff import loader as LD
    from jaxdiff.checkpoint import Checkpointer
    from jaxdiff.nets import MLP, init_params
    from jaxdiff.train import (
        data_mesh,
        init_train_state,
        make_feed_chunk,
        make_train_chunk,
        make_train_step,
        replicate,
        train,
    )

    assert jax.device_count() == 4 and jax.process_count() == nproc, jax.devices()
    mesh = data_mesh()
    model = MLP(width=16, depth=2)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1))
    net = jd.Field(model.apply, "velocity", params)
    opt = jd.train.adamw_cosine(5e-3, total_steps=8)
    step = make_train_step(jd.flow_matching_loss(net, jd.linear_path()), opt, ema_decay=0.9)

    def gathered(tree):  # every leaf as one host array (a replicated leaf is the same on each host)
        tree = multihost_utils.process_allgather(tree, tiled=True) if nproc > 1 else tree
        return [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(tree)]

    # In-jit data: the state replicated over both hosts' devices (a typed key failed device_put).
    state = replicate(init_train_state(net.params, opt, jax.random.key(1)), mesh)
    chunk = lambda k: make_train_chunk(
        step, lambda key: jd.data.checkerboard(key, 16), k, mesh=mesh
    )
    ckpt = Checkpointer(os.path.join(folder, "ckpt"))
    state, history = train(
        state, chunk, 8, chunk_size=4, progress=False, every=4, on_every=ckpt.save
    )
    ckpt.wait()
    restored, _ = Checkpointer(os.path.join(folder, "ckpt")).restore(
        state
    )  # raw key data, then wrap

    # Host data: each host reads its share of the global batch (the loader's default share).
    images = ((np.arange(24 * 2).reshape(24, 1, 2, 1) * 37) % 256).astype(np.uint8)
    loader = LD.ImageLoader(LD.ArraySource(images), 8, seed=0, flip=False)
    fed = replicate(init_train_state(net.params, opt, jax.random.key(2)), mesh)
    flat = lambda batch: LD.to_float(batch).reshape(batch.shape[0], 2)
    with LD.prefetch(loader.iterate(0), mesh) as batches:
        first = next(batches)  # the first global batch, then the chunk's four from the start again
    with LD.prefetch(loader.iterate(0), mesh) as batches:
        fed, fed_losses = make_feed_chunk(step, batches, 4, mesh=mesh, preprocess=flat)(fed)

    # Eager calls on a global array (one share per host): the input checks read its value on
    # the host, and a multi-host array's is not there ("non-addressable devices").
    xs = np.asarray(jax.random.normal(jax.random.key(4), (8, 2)))
    share = xs.reshape(nproc, -1, 2)[jax.process_index()]
    x_global = jax.make_array_from_process_local_data(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")), share, xs.shape
    )
    path = jd.linear_path()
    sampled = jd.sample(None, path, net, x_init=x_global, steps=4)
    log_p = jd.log_likelihood(path, net, x_global, rtol=1e-4, atol=1e-4).logp

    cli = None
    if nproc > 1:  # the command line runs on one host: it says so (it had hung ~30 s, then failed)
        import contextlib
        import io

        from jaxdiff.cli import main as cli_main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli_main(["train", "--steps", "2", "--out", os.path.join(folder, "cli")])
        cli = [code, err.getvalue()]

    print(
        json.dumps(
            {
                "params": gathered(state.params),
                "loss": history[-1],
                "restored_equal": bool(
                    jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), restored, state))
                ),
                "restored_step": int(restored.step),
                "key_sharding": str(restored.key.sharding.spec),
                "batch_shape": list(first.shape),
                "batch": gathered(first),
                "fed": gathered(fed.params),
                "fed_losses": np.asarray(fed_losses).tolist(),
                "sampled": gathered(sampled.x),
                "log_p": gathered(log_p),
                "cli": cli,
            }
        )
    )


if __name__ == "__main__":  # a script (pytest's doctest collection imports it: nothing runs)
    main()
