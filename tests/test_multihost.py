"""Multi-host: two processes joined by ``jax.distributed`` (gloo on CPU, 2 fake devices each) run
the README's recipes and match one process holding all 4 devices.

Replicating a state onto the devices of several processes failed on its typed PRNG key (JAX's
``device_put`` takes plain arrays only there), and so did restoring a checkpoint; an
``ImageLoader`` built without a process share read the whole batch on each host (a doubled batch
of duplicates). The worker is ``tests/multihost_worker.py``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = str(Path(__file__).with_name("multihost_worker.py"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(nproc: int, folder: Path) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    devices = 4 // nproc
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    )
    port = str(_free_port())
    folder.mkdir()
    logs = [(open(folder / f"out{i}", "w+"), open(folder / f"err{i}", "w+")) for i in range(nproc)]
    procs = [  # to files, not pipes: a host blocked on a full pipe would stall the other one
        subprocess.Popen(
            [sys.executable, WORKER, str(nproc), str(i), port, str(folder)],
            env=env,
            stdout=out,
            stderr=err,
            text=True,
        )  # fmt: skip
        for i, (out, err) in enumerate(logs)
    ]
    outs = []
    try:
        for p, (out, err) in zip(procs, logs, strict=True):
            p.wait(timeout=300)
            out.seek(0), err.seek(0)
            assert p.returncode == 0, err.read()[-3000:]
            outs.append(json.loads(out.read().strip().splitlines()[-1]))
    finally:
        for p, (out, err) in zip(procs, logs, strict=True):
            p.kill()
            out.close(), err.close()
    return outs


def test_two_hosts_train_checkpoint_and_load_as_one(tmp_path):
    one = _run(1, tmp_path / "one")[0]
    hosts = _run(2, tmp_path / "two")
    for h in hosts:
        # the in-jit data path: the same losses and parameters as one process, to float rounding
        # (XLA's all-reduce over two processes sums in another order; measured 7.8e-7)
        np.testing.assert_allclose(h["loss"], one["loss"], rtol=1e-5)
        for a, b in zip(h["params"], one["params"], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert h["restored_equal"] and h["restored_step"] == 8, h
        assert h["key_sharding"] == "P()"  # replicated on all 4 devices
        # each host reads its share: the global batch is the one-process batch, not two copies
        assert h["batch_shape"] == one["batch_shape"] == [8, 1, 2, 1]
        assert h["batch"] == one["batch"]
        np.testing.assert_allclose(h["fed_losses"], one["fed_losses"], rtol=1e-5)
        for a, b in zip(h["fed"], one["fed"], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        # an eager sample and likelihood of a global array: its input checks ran on the host
        # and failed ("non-addressable devices"); the same numbers as one process now
        np.testing.assert_allclose(h["sampled"], one["sampled"], atol=1e-5)
        np.testing.assert_allclose(h["log_p"], one["log_p"], rtol=1e-5)
        code, message = h["cli"]
        assert code == 2 and "the command line runs on one host" in message, message
    assert not os.path.exists(tmp_path / "two" / "cli")  # refused before any folder was made
    assert hosts[0]["params"] == hosts[1]["params"]  # replicated: the same on both hosts
