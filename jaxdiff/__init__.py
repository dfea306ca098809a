"""jaxdiff: flow matching and diffusion models as pure JAX functions.

Time runs from data (``t = 0``) to the prior (``t = 1``). A :class:`GaussianPath`
``x_t = alpha_t x0 + sigma_t eps`` gives its forward SDE, the conversions between network targets
(``score``, ``eps``, ``x0``, ``v``, ``velocity``) and the reverse dynamics; ``sample`` integrates
them with diffrax solvers. ``losses`` trains networks on a path; the Flax networks
(``jaxdiff.nets``), the training loop (``jaxdiff.train``), checkpoints (``jaxdiff.checkpoint``) and
the digits classifier (``jaxdiff.digits``) load on first use, so the core never imports Flax.
"""

import importlib as _importlib

from jaxdiff import couplings, data, losses, samplers, sources
from jaxdiff.consistency import (
    Curriculum,
    consistency_distillation_loss,
    consistency_function,
    consistency_grid,
    consistency_scalings,
    consistency_training_loss,
    ct_num_scales,
    ct_target_decay,
    curriculum,
    curriculum_stages,
    ict_num_scales,
)
from jaxdiff.conversions import TARGETS, Target, convert, from_x0_eps, hub_matrix, to_x0_eps
from jaxdiff.couplings import exact_ot, independent, per_device, sinkhorn_ot
from jaxdiff.ddim import ddim_invert, ddim_step
from jaxdiff.ddpm import (
    discrete_path,
    forward_chain,
    leading_timesteps,
    linspace_timesteps,
    posterior,
    rescale_zero_terminal_snr,
    reverse_mean_var,
    trailing_timesteps,
)
from jaxdiff.elbo import (
    NELBO,
    bits_per_dim,
    denoising_weight,
    discretized_gaussian_log_prob,
    nelbo,
)
from jaxdiff.field import (
    Field,
    as_field,
    batch_time,
    denoise,
    evaluate,
    predict,
    predict_as,
    reschedule,
)
from jaxdiff.guidance import (
    autoguidance,
    classifier_free_guidance,
    classifier_guidance,
    clip_x0,
    dynamic_thresholding,
)
from jaxdiff.integrate import Solution, integrate
from jaxdiff.interpolants import (
    StochasticInterpolant,
    brownian_bridge,
    interpolant_loss,
    linear_interpolant,
)
from jaxdiff.inverse import dps, dps_sampler, pigdm, project, repaint, tmpd
from jaxdiff.likelihood import (
    Likelihood,
    affine_flow,
    dequantize,
    divergence,
    log_likelihood,
    variational_dequantize,
)
from jaxdiff.losses import (
    diffusion_loss,
    eps_loss,
    flow_matching_loss,
    importance_time,
    importance_weights,
    likelihood_weight,
    logit_normal_time,
    score_matching_loss,
    shifted_time,
    sigma_sq_weight,
    uniform_time,
    unit_weight,
    v_loss,
    x0_loss,
)
from jaxdiff.meanflow import meanflow_loss, meanflow_target
from jaxdiff.measurements import (
    LinearOperator,
    Measurement,
    blur_operator,
    linear_operator,
    mask_operator,
    matrix_operator,
    measure,
    subsample_operator,
)
from jaxdiff.metrics import (
    energy_distance,
    frechet_distance,
    frechet_distance_from_stats,
    memorization_ratio,
    mmd,
    nearest_neighbour_distance,
)
from jaxdiff.oracles import GaussianMixture
from jaxdiff.paths import (
    GaussianPath,
    cosine_path,
    linear_path,
    subvp_path,
    ve_path,
    vp_path,
)
from jaxdiff.precond import EDMScalings, edm_noise, edm_precond, edm_scalings
from jaxdiff.progressive import progressive_distillation_loss, progressive_target
from jaxdiff.reflow import reflow_pairs
from jaxdiff.sample import inpaint, sample
from jaxdiff.samplers import Sampler
from jaxdiff.schedules import (
    alpha_bars,
    cosine_betas,
    default_grid,
    karras_grid,
    linear_betas,
    log_snr_grid,
    quadratic_grid,
    shift_time,
    uniform_grid,
)
from jaxdiff.sde import (
    brownian_motion,
    langevin,
    probability_flow_drift,
    reverse_diffusion,
    reverse_drift,
)
from jaxdiff.shortcut import shortcut_loss, shortcut_target
from jaxdiff.sources import Source, dataset_source, standard_normal
from jaxdiff.straightness import Straightness, straightness
from jaxdiff.weightings import (
    Weight,
    edm_time,
    edm_weight,
    elbo_weight,
    log_snr_weight,
    log_snr_weighting,
    min_snr_weight,
    sigmoid_weight,
    v_weight,
    weight_as,
)

__version__ = "0.1.0"

_LAZY = ("nets", "train", "checkpoint", "digits", "experiment", "runs", "loader")


def __getattr__(name):
    if name in _LAZY:
        return _importlib.import_module(f"jaxdiff.{name}")
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")


__all__ = [
    "consistency_distillation_loss",
    "consistency_function",
    "consistency_grid",
    "consistency_scalings",
    "consistency_training_loss",
    "ct_num_scales",
    "ct_target_decay",
    "curriculum",
    "Curriculum",
    "curriculum_stages",
    "ict_num_scales",
    "meanflow_loss",
    "meanflow_target",
    "progressive_distillation_loss",
    "progressive_target",
    "reflow_pairs",
    "shortcut_loss",
    "shortcut_target",
    "ddim_invert",
    "ddim_step",
    "discrete_path",
    "forward_chain",
    "leading_timesteps",
    "linspace_timesteps",
    "posterior",
    "rescale_zero_terminal_snr",
    "reverse_mean_var",
    "trailing_timesteps",
    "NELBO",
    "bits_per_dim",
    "denoising_weight",
    "discretized_gaussian_log_prob",
    "nelbo",
    "Likelihood",
    "dequantize",
    "divergence",
    "log_likelihood",
    "variational_dequantize",
    "affine_flow",
    "GaussianMixture",
    "GaussianPath",
    "Field",
    "as_field",
    "batch_time",
    "predict",
    "predict_as",
    "reschedule",
    "denoise",
    "evaluate",
    "Sampler",
    "samplers",
    "inpaint",
    "clip_x0",
    "dynamic_thresholding",
    "default_grid",
    "Solution",
    "TARGETS",
    "Target",
    "alpha_bars",
    "brownian_motion",
    "classifier_free_guidance",
    "autoguidance",
    "classifier_guidance",
    "convert",
    "data",
    "diffusion_loss",
    "eps_loss",
    "flow_matching_loss",
    "frechet_distance",
    "frechet_distance_from_stats",
    "importance_time",
    "importance_weights",
    "likelihood_weight",
    "logit_normal_time",
    "shifted_time",
    "shift_time",
    "losses",
    "memorization_ratio",
    "nearest_neighbour_distance",
    "score_matching_loss",
    "sigma_sq_weight",
    "uniform_time",
    "unit_weight",
    "v_loss",
    "x0_loss",
    "cosine_betas",
    "cosine_path",
    "energy_distance",
    "from_x0_eps",
    "hub_matrix",
    "integrate",
    "karras_grid",
    "langevin",
    "linear_betas",
    "linear_path",
    "log_snr_grid",
    "mmd",
    "probability_flow_drift",
    "quadratic_grid",
    "reverse_diffusion",
    "reverse_drift",
    "sample",
    "subvp_path",
    "to_x0_eps",
    "uniform_grid",
    "ve_path",
    "vp_path",
    "couplings",
    "sources",
    "independent",
    "exact_ot",
    "sinkhorn_ot",
    "per_device",
    "Source",
    "standard_normal",
    "dataset_source",
    "StochasticInterpolant",
    "brownian_bridge",
    "linear_interpolant",
    "interpolant_loss",
    "Straightness",
    "straightness",
    "LinearOperator",
    "Measurement",
    "measure",
    "matrix_operator",
    "mask_operator",
    "subsample_operator",
    "blur_operator",
    "linear_operator",
    "dps",
    "pigdm",
    "tmpd",
    "dps_sampler",
    "project",
    "repaint",
    "EDMScalings",
    "edm_noise",
    "edm_precond",
    "edm_scalings",
    "Weight",
    "weight_as",
    "edm_weight",
    "edm_time",
    "elbo_weight",
    "log_snr_weight",
    "log_snr_weighting",
    "min_snr_weight",
    "sigmoid_weight",
    "v_weight",
]
