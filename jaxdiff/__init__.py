"""jaxdiff: flow matching and diffusion models as pure JAX functions.

Time runs from data (``t = 0``) to the prior (``t = 1``). A :class:`GaussianPath`
``x_t = alpha_t x0 + sigma_t eps`` gives its forward SDE, the conversions between network targets
(``score``, ``eps``, ``x0``, ``v``, ``velocity``) and the reverse dynamics; ``sample`` integrates
them with diffrax solvers.
"""

from jaxdiff.conversions import TARGETS, Target, convert, from_x0_eps, to_x0_eps
from jaxdiff.guidance import classifier_free_guidance, classifier_guidance
from jaxdiff.integrate import Solution, integrate
from jaxdiff.metrics import energy_distance, mmd
from jaxdiff.oracles import GaussianMixture
from jaxdiff.paths import (
    GaussianPath,
    cosine_path,
    linear_path,
    subvp_path,
    ve_path,
    vp_path,
)
from jaxdiff.sample import sample
from jaxdiff.schedules import (
    alpha_bars,
    cosine_betas,
    karras_grid,
    linear_betas,
    log_snr_grid,
    quadratic_grid,
    uniform_grid,
)
from jaxdiff.sde import (
    brownian_motion,
    langevin,
    probability_flow_drift,
    reverse_diffusion,
    reverse_drift,
)

__version__ = "0.1.0"

__all__ = [
    "GaussianMixture",
    "GaussianPath",
    "Solution",
    "TARGETS",
    "Target",
    "alpha_bars",
    "brownian_motion",
    "classifier_free_guidance",
    "classifier_guidance",
    "convert",
    "cosine_betas",
    "cosine_path",
    "energy_distance",
    "from_x0_eps",
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
]
