"""Test configuration: strict rank promotion, type checks of public signatures, float64 on demand.

* ``jax_numpy_rank_promotion = "raise"``: implicit broadcasting between arrays of different rank is
  an error, so every broadcast in the library is deliberate.
* jaxtyping's import hook with beartype checks every annotated argument of ``jaxdiff`` at call time.
* The ``x64`` fixture runs a test in float64, for identities checked at tight tolerances.
"""

import jax
import pytest
from jaxtyping import install_import_hook

jax.config.update("jax_numpy_rank_promotion", "raise")

with install_import_hook("jaxdiff", "beartype.beartype"):
    import jaxdiff  # noqa: F401


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
