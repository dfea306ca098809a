"""jaxdiff's programs stay clear of an XLA:CPU miscompilation in jaxlib 0.10.2.

jaxlib 0.10.2 hands dot products and reductions to YNNPACK by default ("YNN fusions"). When such a
fusion holds a dot one of whose operands is a scalar broadcast (``x @ jnp.ones((d, d))``,
``x @ jnp.full_like(x, c)``) and reduces its result, it returns garbage (1e23 to 1e36, or NaN;
measured on 0.10.2; 0.10.1 forms the same fusion and computes it right). The README says how to
turn the fusions off. These tests compile jaxdiff's main programs (training steps of the MLP and
the U-Net, samplers, likelihoods, guidance, DDPM) with the default fusions and with the faster
``reduce`` setting the README suggests for U-Nets, and assert that none holds that pattern. The
whole test suite's compiled modules were scanned the same way once: 12,798 with the default
fusions (693 of them with YNN fusions) and 14,051 with ``reduce`` (451), none with the pattern.
"""

import functools
import re

import diffrax
import jax
import jax.numpy as jnp
import pytest

import jaxdiff as jd
from jaxdiff import losses as L
from jaxdiff.nets import MLP, UNet, init_params

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's YNN fusions")

# XLA's defaults (conftest turns the emitters off and the optimisation level down to 1)
DEFAULT_EMITTERS = {"xla_cpu_use_fusion_emitters": True, "xla_backend_optimization_level": 3}
SETTINGS = {
    "default": DEFAULT_EMITTERS,
    "reduce": {
        **DEFAULT_EMITTERS,
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
    },
}


def scalar_broadcast_dots(hlo: str) -> list[str]:
    """The dots inside YNN fusions of a compiled HLO module that read a scalar broadcast."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            bodies[name] = []
        elif line.strip() == "}":
            name = None
        elif name is not None:
            bodies[name].append(line)
    fused = set()  # the computations that YNN fusions call
    for line in hlo.splitlines():
        if "__ynn_fusion" in line:
            fused.update(re.findall(r"calls=%?([\w.\-]+)", line))
    found = []
    for body in (bodies.get(f, []) for f in fused):
        splats = set()  # the names of scalar broadcasts in this body
        for line in body:
            splat = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ broadcast\(", line)
            if splat and "dimensions={}" in line:
                splats.add(splat.group(1))
        for line in body:
            dot = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \S+ dot\((.*?)\)", line)
            if dot and splats & set(re.findall(r"%([\w.\-]+)", dot.group(1))):
                found.append(line.strip())
    return found


def _hlo(fn, *args, setting="default"):
    return jax.jit(fn, compiler_options=SETTINGS[setting]).lower(*args).compile().as_text()


BAD = """\
%fused_computation (param_0.3: f32[8,64,64], param_1.4: f32[]) -> f32[8,64] {
  %param_0.3 = f32[8,64,64]{2,1,0} parameter(0)
  %param_1.4 = f32[] parameter(1)
  %broadcast_in_dim.0 = f32[8,64,64]{2,1,0} broadcast(%param_1.4), dimensions={}
  %dot_general.0 = f32[8,64,64]{2,1,0} dot(%param_0.3, %broadcast_in_dim.0), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  %mul.0 = f32[8,64,64]{2,1,0} multiply(%dot_general.0, %param_0.3)
  %constant.0 = f32[] constant(0)
  ROOT %reduce_sum.0 = f32[8,64]{1,0} reduce(%mul.0, %constant.0), dimensions={2}, to_apply=%region_0.1
}

ENTRY %main.2 (E.1: f32[8,64,64], c.1: f32[]) -> f32[8,64] {
  %E.1 = f32[8,64,64]{2,1,0} parameter(0)
  %c.1 = f32[] parameter(1)
  ROOT %ynn_fusion = f32[8,64]{1,0} fusion(%E.1, %c.1), kind=kCustom, calls=%fused_computation, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
}
"""  # jaxlib 0.10.2's compiled jnp.sum((E @ jnp.full_like(E, c)) * E, axis=-1), abridged


def test_the_scan_finds_the_miscompiled_pattern():
    assert len(scalar_broadcast_dots(BAD)) == 1
    # the same fusion reading a vector broadcast (computed right), or not a YNN fusion: nothing
    vector = BAD.replace("f32[] parameter(1)", "f32[64] parameter(1)").replace("dimensions={}", "dimensions={2}")  # fmt: skip
    assert scalar_broadcast_dots(vector) == []
    assert scalar_broadcast_dots(BAD.replace("__ynn_fusion", "__loop_fusion")) == []

    def bad(e, c):
        return jnp.sum((e @ jnp.full_like(e, c)) * e, axis=-1)

    e = jax.random.normal(jax.random.key(0), (8, 64, 64))
    hlo = _hlo(bad, e, 0.7)
    if "__ynn_fusion" not in hlo:
        pytest.skip("this jaxlib forms no YNN fusion here")
    assert scalar_broadcast_dots(hlo), "the scan misses the pattern in a real compiled module"


def _mlp_programs():
    model = MLP(width=32, depth=2)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1))
    path, velocity = jd.linear_path(), jd.Field(model.apply, "velocity", params)
    eps = jd.Field(model.apply, "eps", params)
    x = jax.random.normal(jax.random.key(1), (64, 2))
    key = jax.random.key(2)
    fm = L.flow_matching_loss(velocity)
    S = jd.samplers

    def log_prob(x, t):  # a classifier's log p(y | x_t): the gradient of a sum of outputs
        return jnp.sum(jnp.tanh(model.apply(params, x, t)), axis=-1)

    guided = jd.classifier_guidance(eps, jd.vp_path(), log_prob, 2.0)
    ddpm = jd.discrete_path(jd.linear_betas(100))

    def draw(path, field, **kw):
        return lambda key: jd.sample(key, path, field, (64, 2), steps=4, **kw).x

    def logp(**kw):
        return lambda x: jd.log_likelihood(path, velocity, x, rtol=1e-3, **kw).logp

    return {
        "flow matching grad": (jax.grad(fm), params, key, x),
        "eps loss grad": (jax.grad(L.eps_loss(eps, jd.vp_path())), params, key, x),
        "heun": (draw(path, velocity, sampler=S.ode(diffrax.Heun())), key),
        "reverse sde": (draw(jd.vp_path(), eps, sampler=S.sde()), key),
        "classifier guidance": (draw(jd.vp_path(), guided), key),
        "ddpm ancestral": (draw(ddpm, eps, sampler=S.ancestral()), key),
        "exact likelihood": (logp(), x),
        "hutchinson likelihood": (logp(key=key, num_probes=2), x),
    }


@functools.cache
def _unet_program():
    model = UNet(channels=(8, 16), heads=2, num_classes=10)
    images = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
    labels = jnp.arange(16) % 10
    params = init_params(model, jax.random.key(1), images[:1], jnp.zeros(1), labels[:1])
    field = jd.Field(lambda p, x, t: model.apply(p, x, t, labels), "eps")
    loss = L.eps_loss(field, jd.vp_path())
    return jax.grad(loss), params, jax.random.key(2), images


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_jaxdiff_programs_hold_no_scalar_broadcast_dot_in_a_ynn_fusion(setting):
    if setting != "default" and jax.__version_info__ < (0, 8):
        pytest.skip("jaxlib < 0.8 has no YNN fusion option")  # measured: 0.7.2 rejects it
    programs = {**_mlp_programs(), "unet grad": _unet_program()}
    if setting == "reduce":  # the setting the README suggests for U-Nets: the training steps
        programs = {n: programs[n] for n in ("unet grad", "flow matching grad", "eps loss grad")}
    hlos = {n: _hlo(f, *a, setting=setting) for n, (f, *a) in programs.items()}
    hits = {n: scalar_broadcast_dots(h) for n, h in hlos.items()}
    assert not any(hits.values()), {n: h[:2] for n, h in hits.items() if h}
    # and the scan had something to look at: with jaxlib 0.10.2 every program holds YNN fusions
    # (10 to 23 each, 172 in the U-Net's gradient; 2 and 126 with "reduce")
    with_ynn = [n for n, h in hlos.items() if "__ynn_fusion" in h]
    if jax.__version_info__ >= (0, 10, 1):
        assert "unet grad" in with_ynn and len(with_ynn) >= len(programs) // 2, with_ynn
