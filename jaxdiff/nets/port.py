"""Weights between jaxdiff's :class:`~jaxdiff.nets.UNet` and diffusers' ``UNet2DModel``.

The two networks are the same layers in the same order when configured alike (the configs'
docstrings, :func:`~jaxdiff.nets.ddpm_cifar10` and :func:`~jaxdiff.nets.small_unet`, give the
diffusers arguments); these functions rename and transpose the weights, with no PyTorch import:
a state dict is any mapping from diffusers' parameter names to arrays (``{k: v.numpy() for k, v in
net.state_dict().items()}``, or ``safetensors.numpy.load_file`` of a checkpoint's
``diffusion_pytorch_model.safetensors``).

Layouts: convolution kernels are ``(out, in, kh, kw)`` there and ``(kh, kw, in, out)`` here, dense
kernels ``(out, in)`` there and ``(in, ...)`` here. Attention takes diffusers' names
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``) or the older ones (``query``, ``key``, ``value``,
``proj_attn``) that Hub checkpoints such as ``google/ddpm-cifar10-32`` still carry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["diffusers_config", "from_diffusers", "to_diffusers"]

_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "out": "to_out.0"}
_OLD_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


# diffusers 0.42's UNet2DModel defaults, for the keys an older config.json leaves out
_DEFAULTS = {
    "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
    "freq_shift": 0, "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D",
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "in_channels": 3, "out_channels": 3,
}  # fmt: skip


def _attend(model, shape: tuple[int, ...]) -> list[bool]:
    """Whether each level attends: its image size (stride-2 "SAME" halvings) is listed."""
    sizes = [shape[0]]
    for _ in range(len(model.channels) - 1):
        sizes.append(math.ceil(sizes[-1] / 2))
    return [s in tuple(model.attention_resolutions) for s in sizes]


def _attention_widths(model, shape: tuple[int, ...]) -> list[int]:
    """The channels of every attention block: the attending levels', then the middle's."""
    widths = [c for c, a in zip(model.channels, _attend(model, shape), strict=True) if a]
    return widths + ([model.channels[-1]] if model.attention else [])


def diffusers_config(model: Any, shape: tuple[int, int, int] = (32, 32, 3)) -> dict:
    """The ``diffusers.UNet2DModel`` arguments of the network ``model`` (a
    :class:`~jaxdiff.nets.UNet`) on images of ``shape`` ``(height, width, channels)``:
    ``UNet2DModel(**diffusers_config(model, shape))`` has the same layers and computes the same
    function (step ``n`` for ``t = n / 1000``), so :func:`from_diffusers` and :func:`to_diffusers`
    move weights between them. Raises ``ValueError`` for what diffusers cannot express (several
    heads of different widths, another time embedding or time scale)."""
    if model.time_embedding != "sinusoidal" or model.time_scale not in (None, 1000, 1000.0):
        raise ValueError(
            "diffusers' positional time embedding takes the step n = 1000 t: the UNet needs "
            f"time_embedding='sinusoidal' and the default time_scale; got {model.time_embedding!r}"
            f", time_scale={model.time_scale}"
        )
    if model.time_features not in (None, model.channels[0]):
        raise ValueError(
            f"diffusers embeds time with block_out_channels[0] = {model.channels[0]} features; "
            f"got time_features={model.time_features}"
        )
    attend = _attend(model, shape)
    widths = _attention_widths(model, shape)
    head_dim = None  # diffusers: one head as wide as the block
    if model.heads != 1 and widths:
        head_dim = widths[0] // model.heads
        if any(w % model.heads or w // model.heads != head_dim for w in widths):
            raise ValueError(
                f"diffusers gives every attention block heads of one width (attention_head_dim); "
                f"{model.heads} heads at widths {widths} are not"
            )
    levels = len(model.channels)
    return {
        "sample_size": shape[0] if shape[0] == shape[1] else tuple(shape[:2]),
        "in_channels": shape[2], "out_channels": shape[2],
        "center_input_sample": False, "time_embedding_type": "positional",
        "time_embedding_dim": model.emb_dim, "freq_shift": model.freq_shift,
        "flip_sin_to_cos": False, "mid_block_type": "UNetMidBlock2D",
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        "up_block_types": tuple(
            "AttnUpBlock2D" if attend[levels - 1 - k] else "UpBlock2D" for k in range(levels)
        ),
        "block_out_channels": tuple(model.channels), "layers_per_block": model.num_res_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": 0, "downsample_type": "conv",
        "upsample_type": "conv", "dropout": model.dropout, "act_fn": "silu",
        "attention_head_dim": head_dim, "norm_num_groups": model.norm_groups,
        "attn_norm_num_groups": model.norm_groups if model.scale_shift else None,
        "norm_eps": 1e-6,
        "resnet_time_scale_shift": "scale_shift" if model.scale_shift else "default",
        "add_attention": model.attention, "class_embed_type": None,
        "num_class_embeds": None if model.num_classes is None else model.num_classes + 1,
    }  # fmt: skip


def _heads(config: Mapping[str, Any], width: int) -> int:
    dim = config.get("attention_head_dim", _DEFAULTS["attention_head_dim"])
    return 1 if dim is None else width // int(dim)


def _config_mismatches(config: Mapping[str, Any], model: Any, shape: tuple[int, ...]) -> list[str]:
    """Where a diffusers config computes another function than ``model``'s (the state dict
    cannot tell: flip_sin_to_cos, downsample_padding, norm_eps, ... leave every shape alone)."""
    want = diffusers_config(model, shape)
    bad = []
    for key, ours in want.items():
        if key in ("sample_size", "dropout", "attention_head_dim", "attn_norm_num_groups"):
            continue  # not the function at inference / compared by what it means, below
        theirs = config.get(key, _DEFAULTS.get(key))
        if key == "time_embedding_dim" and theirs is None:
            theirs = 4 * config.get("block_out_channels", model.channels)[0]
            ours = 4 * model.channels[0] if ours is None else ours
        same = theirs == ours
        if isinstance(ours, tuple):
            same = tuple(theirs or ()) == ours
        elif isinstance(ours, float) and theirs is not None:
            same = math.isclose(float(theirs), ours, rel_tol=1e-9, abs_tol=0.0)
        if not same:
            bad.append(f"{key} = {theirs!r} (jaxdiff's UNet: {ours!r})")
    attn_groups = config.get("attn_norm_num_groups")
    if attn_groups is not None and attn_groups != model.norm_groups:
        bad.append(f"attn_norm_num_groups = {attn_groups} (jaxdiff's UNet: {model.norm_groups})")
    widths = _attention_widths(model, shape)
    heads = sorted({_heads(config, w) for w in widths})
    if widths and heads != [model.heads]:
        dim = config.get("attention_head_dim", _DEFAULTS["attention_head_dim"])
        bad.append(
            f"attention_head_dim = {dim!r}: {heads} heads at widths {widths} (jaxdiff's UNet: "
            f"{model.heads} heads)"
        )
    return bad


def _layout(model, shape: tuple[int, ...]) -> dict[tuple[str, ...], str]:
    """Each jaxdiff module path -> its diffusers module name, in the networks' common order."""
    levels, n = len(model.channels), model.num_res_blocks
    attend = _attend(model, shape)
    resnets, attentions = [], []
    for i in range(levels):
        for j in range(n):
            resnets.append(f"down_blocks.{i}.resnets.{j}")
            if attend[i]:
                attentions.append(f"down_blocks.{i}.attentions.{j}")
    resnets += ["mid_block.resnets.0", "mid_block.resnets.1"]
    if model.attention:
        attentions.append("mid_block.attentions.0")
    for k in range(levels):  # up block k is level levels - 1 - k
        for j in range(n + 1):
            resnets.append(f"up_blocks.{k}.resnets.{j}")
            if attend[levels - 1 - k]:
                attentions.append(f"up_blocks.{k}.attentions.{j}")
    convs = ["conv_in", *(f"down_blocks.{i}.downsamplers.0.conv" for i in range(levels - 1))]
    convs += [*(f"up_blocks.{k}.upsamplers.0.conv" for k in range(levels - 1)), "conv_out"]
    names = {("TimeEmbedding_0", "Dense_0"): "time_embedding.linear_1",
             ("TimeEmbedding_0", "Dense_1"): "time_embedding.linear_2",
             ("GroupNorm_0",): "conv_norm_out",
             ("LabelEmbedding_0", "Embed_0"): "class_embedding"}  # fmt: skip
    names.update({(f"Conv_{i}",): c for i, c in enumerate(convs)})
    for i, r in enumerate(resnets):
        for ours, theirs in (("GroupNorm_0", "norm1"), ("Conv_0", "conv1"),
                             ("Dense_0", "time_emb_proj"), ("GroupNorm_1", "norm2"),
                             ("Conv_1", "conv2"), ("Conv_2", "conv_shortcut")):  # fmt: skip
            names[(f"ResBlock_{i}", ours)] = f"{r}.{theirs}"
    for i, a in enumerate(attentions):
        names[(f"SelfAttention_{i}", "GroupNorm_0")] = f"{a}.group_norm"
        for ours, theirs in _ATTENTION.items():
            names[(f"SelfAttention_{i}", "MultiHeadDotProductAttention_0", ours)] = f"{a}.{theirs}"
    return names


def _leaves(model, shape: tuple[int, ...]):
    """``(path, diffusers key, jaxdiff shape)`` for every parameter of ``model`` on ``shape``."""
    from flax.traverse_util import flatten_dict

    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    labels = None if model.num_classes is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)), labels=labels)
    names = _layout(model, shape)
    kinds = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
    for path, leaf in flatten_dict(params["params"]).items():
        module = names.get(path[:-1])
        if module is None:
            raise ValueError(f"jaxdiff parameter {'/'.join(path)} has no diffusers counterpart")
        yield path, f"{module}.{kinds[path[-1]]}", leaf.shape


def _to_ours(value: np.ndarray, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if value.ndim == 4:  # (out, in, kh, kw) -> (kh, kw, in, out)
        value = np.transpose(value, (2, 3, 1, 0))
    elif value.ndim == 2 and not key.endswith("class_embedding.weight"):  # (out, in) -> (in, out)
        value = value.T
    if value.shape != shape if value.ndim == len(shape) else value.size != math.prod(shape):
        raise ValueError(f"diffusers {key} has shape {value.shape}; jaxdiff expects {shape}")
    return value.reshape(shape)


def from_diffusers(
    state_dict: Mapping[str, Any],
    model: Any,
    shape: tuple[int, int, int] = (32, 32, 3),
    *,
    config: Mapping[str, Any] | None = None,
) -> dict:
    """jaxdiff params (``{"params": ...}``, float32) of ``model`` (a :class:`~jaxdiff.nets.UNet`)
    from a diffusers ``UNet2DModel``'s ``state_dict`` (names -> arrays), for images of ``shape``
    ``(height, width, channels)``. Raises ``ValueError`` naming a missing, unused or misshapen key.

    ``model.apply(params, x, n / 1000, ...)`` then equals diffusers' ``net(x, n).sample`` for
    NHWC ``x`` (diffusers takes NCHW), when the configs agree: :func:`diffusers_config` gives
    ``model``'s. The weights cannot tell every difference (diffusers' defaults
    ``flip_sin_to_cos=True``, ``downsample_padding=1`` and ``norm_eps=1e-5`` keep every shape and
    change the outputs by O(1)): pass the checkpoint's ``config`` (``net.config``, or its
    ``config.json`` as a dict) and each difference is a ``ValueError``
    (:func:`~jaxdiff.nets.ddpm_cifar10` is ``google/ddpm-cifar10-32``'s config). On the chain
    ``jaxdiff.discrete_path(betas)``, diffusers' step ``n`` is ``t = (n + 1) / 1000``: a sampler's
    field is ``Field(lambda p, x, t: model.apply(p, x, t - 1e-3), "eps")``.

        >>> # from safetensors.numpy import load_file
        >>> # params = from_diffusers(load_file("diffusion_pytorch_model.safetensors"),
        >>> #                         ddpm_cifar10(dropout=0.0))
    """
    from flax.traverse_util import unflatten_dict

    if config is not None:
        bad = _config_mismatches(config, model, tuple(shape))
        if bad:
            raise ValueError(
                "the diffusers config computes another function than the jaxdiff UNet: "
                + "; ".join(bad) + " (diffusers_config(model, shape) gives the UNet's)"
            )  # fmt: skip
    given = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    for new, old in _OLD_ATTENTION.items():  # old Hub names -> diffusers' current ones
        given = {k.replace(f".{old}.", f".{new}."): v for k, v in given.items()}
    flat, used = {}, set()
    for path, key, leaf_shape in _leaves(model, tuple(shape)):
        if key not in given:
            raise ValueError(f"the state dict has no {key} (for jaxdiff {'/'.join(path)})")
        flat[path] = jnp.asarray(_to_ours(given[key], key, leaf_shape))
        used.add(key)
    unused = sorted(set(given) - used)
    if unused:
        raise ValueError(f"state dict keys with no jaxdiff parameter (another config?): {unused}")
    return {"params": unflatten_dict(flat)}


def to_diffusers(params: dict, model: Any, shape: tuple[int, int, int] = (32, 32, 3)) -> dict:
    """diffusers ``UNet2DModel`` state dict (names -> float32 numpy arrays) of jaxdiff ``params``
    of ``model``: ``net.load_state_dict({k: torch.from_numpy(v) for k, v in ...items()})``."""
    from flax.traverse_util import flatten_dict

    if not isinstance(params, Mapping) or "params" not in params:
        raise ValueError("params must be the {'params': ...} dict of model.init")
    flat = flatten_dict(params["params"])
    leaves = list(_leaves(model, tuple(shape)))
    # params of another config or image shape would map silently onto wrong names (the attention
    # layers depend on the image size), or drop layers
    for path, _, leaf_shape in leaves:
        if path not in flat:
            raise ValueError(
                f"params have no {'/'.join(path)}: another config, or images of another shape "
                f"than {tuple(shape)}?"
            )
        if tuple(np.shape(flat[path])) != tuple(leaf_shape):
            raise ValueError(
                f"params {'/'.join(path)} has shape {np.shape(flat[path])}; the model on "
                f"images {tuple(shape)} has {tuple(leaf_shape)}"
            )
    unused = sorted("/".join(p) for p in set(flat) - {path for path, _, _ in leaves})
    if unused:
        raise ValueError(
            f"params with no diffusers counterpart (another config, or images of another shape "
            f"than {tuple(shape)}?): {unused[:4]}"
        )
    out = {}
    for path, key, _ in leaves:
        value = np.array(flat[path], np.float32)  # a writable copy (torch.from_numpy warns else)
        if path[-1] == "kernel" and value.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
            value = np.transpose(value, (3, 2, 0, 1))
        elif path[-1] == "kernel" and path[-2] in ("query", "key", "value"):  # (in, heads, d)
            value = value.reshape(value.shape[0], -1).T
        elif path[-1] == "kernel":  # (in, out) or the output's (heads, d, out)
            value = value.reshape(-1, value.shape[-1]).T
        elif path[-1] == "bias":  # the heads' (heads, d)
            value = value.reshape(-1)
        out[key] = np.ascontiguousarray(value)
    return out
