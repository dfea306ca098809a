"""Flax networks for jaxdiff: time and label embeddings, an MLP field, DDPM's U-Net and its configs,
the two-time networks of MeanFlow (``TwoTimeMLP``, ``TwoTimeUNet``), and diffusers' weights
(``from_diffusers``, ``to_diffusers``).

Models are used through the pure ``model.apply(params, x, t, labels)``: ``t`` continuous in
``[0, 1]`` (a scalar or one per sample), the output shaped like ``x``. What the output means is the
target the model is trained on; ``jaxdiff.convert`` turns it into any other.
"""

from jaxdiff.nets.conv import Conv, conv2d
from jaxdiff.nets.embeddings import (
    LabelEmbedding,
    TimeEmbedding,
    batch_times,
    fourier_embedding,
    init_params,
    sinusoidal_embedding,
)
from jaxdiff.nets.mlp import MLP
from jaxdiff.nets.port import diffusers_config, from_diffusers, to_diffusers
from jaxdiff.nets.two_time import TwoTimeMLP, TwoTimeUNet
from jaxdiff.nets.unet import GroupNorm, ResBlock, SelfAttention, UNet, ddpm_cifar10, small_unet

__all__ = [
    "MLP",
    "TwoTimeMLP",
    "TwoTimeUNet",
    "UNet",
    "ddpm_cifar10",
    "small_unet",
    "Conv",
    "conv2d",
    "ResBlock",
    "GroupNorm",
    "SelfAttention",
    "TimeEmbedding",
    "LabelEmbedding",
    "batch_times",
    "fourier_embedding",
    "init_params",
    "sinusoidal_embedding",
    "diffusers_config",
    "from_diffusers",
    "to_diffusers",
]
