"""The stop-42 review of the run pipeline (``/work/audit/review42_pipeline.md``, P1-P11). Each
test failed on the code before its fix."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import experiment as E
from jaxdiff.checkpoint import Checkpointer
from jaxdiff.cli import main
from jaxdiff.image_sources import ImageFolder, save_image_folder
from jaxdiff.train import init_train_state
from tests.cli_helpers import cli_error

TINY = "--width 8 --depth 1 --batch 16 --chunk 10 --eval-n 0 --no-progress --steps 10".split()


def test_sample_refuses_to_overwrite_a_training_run(tmp_path, capsys):
    # P1: sample --out RUN replaced the run's metrics.json (its loss history and config) and
    # samples.png, and a later --resume carried on with an empty history, silently
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    before = json.loads((run / "metrics.json").read_text())
    err = cli_error(["sample", "--ckpt", str(run), "--n", "16", "--steps", "2", "--out", str(run)],
                    capsys)  # fmt: skip
    assert "holds a training run" in err
    assert json.loads((run / "metrics.json").read_text()) == before
    # the default folder (RUN/samples) and a second sample into it are fine
    for _ in range(2):
        assert main(["sample", "--ckpt", str(run), "--n", "16", "--steps", "2",
                     "--metrics-n", "0"]) == 0  # fmt: skip
    assert (run / "samples" / "samples.npz").is_file()
    # P6: an empty --out or --ckpt is the working directory: refused
    assert "must name a folder" in cli_error(["train", *TINY, "--out", ""], capsys)
    assert "must name a run folder" in cli_error(["sample", "--ckpt", ""], capsys)


def test_unused_or_degenerate_run_options_are_refused_before_training():
    # P3: --eval-n 1 trained the whole run and then failed at the evaluation
    with pytest.raises(ValueError, match="eval_n must be 0 .* or at least 2"):
        E.resolve({"eval_n": 1})
    # P4: values the run ignores were stored in the checkpoint as if used
    for config, name in (
        ({"label_dropout": 0.5}, "label_dropout 0.5 is the classifier-free dropout"),
        ({"sigma_data": 2.0}, "sigma_data 2.0 is the data's scale"),
        ({"channels": [8, 16]}, "channels"),
        ({"data": "digits", "model": "unet", "width": 64}, "width 64 is the MLP's width"),
        ({"loss": "meanflow", "data": "digits", "conditional": True, "label_dropout": 0.3},
         "label_dropout"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            E.resolve(config)
    # the defaults, and the values where they are used, pass
    E.resolve({"data": "digits", "conditional": True, "label_dropout": 0.3})
    E.resolve({"data": "digits", "precond": "edm", "sigma_data": 0.6})
    E.resolve({"data": "digits", "channels": (8, 16)})


def test_an_image_folder_is_checked_whole_when_opened(tmp_path):
    # P5: a mis-sized or unreadable file was found when a batch first drew it
    images = np.zeros((5, 8, 8, 3), np.uint8)
    for name, bad in (("sized", np.zeros((16, 16, 3), np.uint8)), ("corrupt", None)):
        root = save_image_folder(tmp_path / name, images)
        if bad is None:
            (root / "zzz.png").write_bytes(b"not an image")
        else:
            save_image_folder(tmp_path / "one", bad[None])
            next((tmp_path / "one").glob("*.png")).rename(root / "zzz.png")
        match = "is 16x16, not 8x8" if bad is not None else "is not a readable image"
        with pytest.raises(ValueError, match=match):
            ImageFolder(root)


def test_checkpoint_restore_names_the_mismatched_leaf_and_keeps_the_key_sharding(tmp_path):
    # P7: Orbax's error named no leaf, with hundreds of lines of traces; P8: the key came back
    # on one device whatever like.key's sharding
    opt = optax.adam(1e-3)
    state = init_train_state({"w": jnp.ones((8, 4))}, opt, jax.random.key(0))
    Checkpointer(tmp_path).save(state, {})
    ckpt = Checkpointer(tmp_path)
    wrong = init_train_state({"w": jnp.ones((4, 4))}, opt, jax.random.key(0))
    with pytest.raises(ValueError, match=r"\['ema'\]\['w'\] was saved with shape \(8, 4\)"):
        ckpt.restore(wrong)
    rbg = init_train_state({"w": jnp.ones((8, 4))}, opt, jax.random.key(0, impl="rbg"))
    with pytest.raises(ValueError, match="PRNG key data has shape"):
        ckpt.restore(rbg)
    restored, _ = ckpt.restore(state)
    assert restored.key.sharding == state.key.sharding
    np.testing.assert_array_equal(jax.random.key_data(restored.key),
                                  jax.random.key_data(state.key))  # fmt: skip


def test_the_resume_message_names_no_flip(tmp_path, capsys):
    # P10: the message named a --flip flag that does not exist, and "None" for a toy run
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    err = cli_error(["train", "--out", str(run), "--resume", "--no-flip"], capsys)
    assert "--no-flip (the run has no images)" in err or "flip applies to image data" in err


def test_the_image_plot_shows_any_channel_count(tmp_path):
    # P2: 2-channel images trained, then the plot raised matplotlib's TypeError (exit status 1)
    from jaxdiff.run_images import save_plot

    for ch in (1, 2, 3, 4, 5):
        x = np.zeros((4, 8, 8, ch), np.float32)
        save_plot(x, x, tmp_path / f"c{ch}.png", "t")
        assert (tmp_path / f"c{ch}.png").stat().st_size > 0
