"""Test configuration: strict rank promotion, type checks of public signatures, float64 on demand.

* ``jax_numpy_rank_promotion = "raise"``: implicit broadcasting between arrays of different rank is
  an error, so every broadcast in the library is deliberate.
* jaxtyping's import hook with beartype checks every annotated argument of ``jaxdiff`` at call time.
* The ``x64`` fixture runs a test in float64, for identities checked at tight tolerances.
* Off CPU, float32 matrix products and convolutions run at full float32 precision
  (``jax_default_matmul_precision = "highest"``): XLA's default on GPUs is TF32 (a 10-bit
  mantissa), which the tests' float32 tolerances (1e-5 to 1e-6) do not allow for. Users keep
  XLA's default; ``JAXDIFF_TEST_TF32=1`` keeps it in the tests too.
* On CPU the tests compile with XLA's LLVM-IR fusion emitters rather than its default MLIR ones
  (``--xla_cpu_use_fusion_emitters=false``, set here before JAX starts and inherited by the
  notebooks' kernels and the CLI's subprocesses): the same HLO passes, fusions and YNN fusions,
  another code generator for the fused kernels. The suite is mostly compiles, which this flag cuts
  ~40%, while the kernels run slower (an MLP's Euler sampling at batch 4,096: 618 -> 1,289 ms;
  a small U-Net's gradient: 879 -> 1,048 ms): the samplers' conformance file 336 -> 264 s CPU,
  the training files 179 -> 168 s, the whole suite 54.6 -> 38.9 CPU minutes; every test passes
  either way, bit-identity checks included. Users keep XLA's default;
  ``JAXDIFF_TEST_XLA_DEFAULT=1`` keeps it in the tests too, and ``tests/test_xla_cpu.py`` compiles
  its programs with the default emitters whatever is set.
* With it, LLVM's optimisation level 1 rather than XLA's default 3
  (``--xla_backend_optimization_level=1``): the same HLO, cheaper code generation. Measured on
  the sampler and U-Net training files (98 tests, 2 workers), back to back: 389 -> 343 s CPU,
  and an hour later 467 -> 402 s (the machine's own speed varied by 17%); every test passing
  (one group-norm tolerance moved, a summation order). Level 0 was faster still (316 s CPU) but changed float32 results by up to
  3.5e-6 between programs the tests hold equal to 1e-6 (a hand-written Euler loop against
  diffrax's): not taken. ``JAXDIFF_TEST_XLA_DEFAULT=1`` drops this flag too; so does an
  installed CUDA plugin (the level also steers GPU code generation, which the tests there should
  see as users do); ``tests/test_xla_cpu.py`` pins XLA's level 3 in its default setting. A flag
  of the same name already in ``XLA_FLAGS`` wins over either of these.
"""

import importlib.util
import os

_TEST_FLAGS = ["--xla_cpu_use_fusion_emitters=false"]
if not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
    _TEST_FLAGS.append("--xla_backend_optimization_level=1")  # CPU only: not on a GPU machine
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("JAXDIFF_TEST_XLA_DEFAULT") != "1":
    _given = {f.split("=")[0] for f in _flags.split()}  # the user's own flags win
    _extra = [f for f in _TEST_FLAGS if f.split("=")[0] not in _given]
    os.environ["XLA_FLAGS"] = " ".join([_flags, *_extra]).strip()  # before JAX reads XLA_FLAGS

import jax  # noqa: E402
import pytest  # noqa: E402
from jaxtyping import install_import_hook  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

with install_import_hook("jaxdiff", "beartype.beartype"):
    import jaxdiff  # noqa: F401


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True, scope="session")
def _float32_products_off_cpu():
    if jax.default_backend() != "cpu" and os.environ.get("JAXDIFF_TEST_TF32") != "1":
        jax.config.update("jax_default_matmul_precision", "highest")
    yield
