"""lcm_interop: the PyTorch side without JAX, one reference-format entry per family, the JAX-free
config mirror, and the One-Tower's plain-PyTorch model against the JAX one through a real export
(``export_weights`` -> ``load_from_card``).

One-Tower parity as tests/interop/test_torch_models.py does it for the other two families: a fresh init
with every parameter jittered and a non-trivial normalizer, float32 on both sides, max relative
error (max |diff| / max |JAX|) <= 1e-5; generation fed the JAX sampler's own noise draws, so the
concepts agree to that tolerance and the stopping rules stop the same rows at the same concepts.
"""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the optional 'data' extra
pytest.importorskip("yaml")

# pylint: disable=g-import-not-at-top
from lcm_interop import export, naming, reference, torch_generate, torch_models  # noqa: E402
from lcm_jax import diffusion, families, schedules  # noqa: E402
from lcm_jax import generate as gen_lib  # noqa: E402
from lcm_jax.models.config import ModelConfig  # noqa: E402
from lcm_jax.models.one_tower import OneTowerLCM, one_tower_mask  # noqa: E402
from tests import helpers  # noqa: E402
from tests.interop.test_export import spec_shapes  # noqa: E402
from tests.interop.test_torch_models import DIM, _packed, _stopping_case, _t, jax_noise  # noqa: E402

FAMILY = "one_tower_diffusion_lcm"
TOL = 1e-5
MEASURED: dict = {}


def _cfg(family: str = FAMILY, **kw) -> ModelConfig:
  base = dict(family=family, model_dim=32, num_layers=2, denoiser_num_layers=2, num_heads=4,
              ffn_inner_dim=96, sonar_embed_dim=DIM, dropout=0.0, dtype="float32",
              max_seq_len=40)  # max_seq_len != model_dim: a transposed table would not fit
  if family == FAMILY:
    base["timestep_embed_dim"] = 16
  base.update(kw)
  return ModelConfig(**base)


def _init(cfg: ModelConfig, seed: int):
  model = families.get(cfg.family).build(cfg)
  v = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4, DIM)), jnp.ones((1, 4), jnp.int32),
                 jnp.arange(4)[None])
  return model, helpers.perturbed_variables(v, seed + 1)


@pytest.fixture(scope="module")
def one_tower(tmp_path_factory):
  """``(jax model, variables, torch model, export dir)`` of a tiny perturbed One-Tower."""
  cfg = _cfg()
  model, v = _init(cfg, 2)
  out = str(tmp_path_factory.mktemp("interop") / "one_tower")
  summary = export.export_weights(v["params"], v["buffers"], cfg, out)
  assert summary["notes"] and "reference has no One-Tower" in summary["notes"][0]
  return model, v, torch_models.load_from_card(os.path.join(out, "model_card.yaml")), out


def _rel(ours, theirs, name):
  a = np.asarray(theirs, np.float64)
  b = np.asarray(ours, np.float64)
  err = float(np.abs(a - b).max() / np.abs(a).max())
  MEASURED[name] = max(err, MEASURED.get(name, 0.0))
  MEASURED[name + " (max abs)"] = max(float(np.abs(a - b).max()),
                                      MEASURED.get(name + " (max abs)", 0.0))
  assert err <= TOL, f"{name}: max relative error {err:.3g}"
  return err


# ---------------------------------------------------------------------------------------------
# The torch side imports no JAX

def test_torch_side_loads_and_generates_without_jax(one_tower, tmp_path):
  """A fresh interpreter imports lcm_interop.torch_models / torch_generate (and the shared settings)
  without JAX, loads an exported card of every family and generates; the concepts are those of the
  same torch generation in this (JAX-importing) process, bit for bit."""
  cards = {FAMILY: one_tower[3]}
  for family in ("base_lcm", "two_tower_diffusion_lcm"):
    cfg = _cfg(family)
    _, v = _init(cfg, 5)
    cards[family] = str(tmp_path / family)
    export.export_weights(v["params"], v["buffers"], cfg, cards[family])
  prompts = [np.random.default_rng(i).normal(size=(n, DIM)).astype(np.float32)
             for i, n in enumerate((3, 1, 2))]
  np.savez(tmp_path / "prompts.npz", *prompts)
  code = """
import json, sys
import numpy as np
import lcm_interop.torch_models as tm, lcm_interop.torch_generate as tg
from lcm_jax.generation_config import GenerationConfig
from lcm_jax.schedules import SamplerConfig
jaxish = lambda: sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))
assert not jaxish(), jaxish()
data = np.load(sys.argv[1])
prompts = [data[k] for k in data.files]
out = {}
for family, card in json.loads(sys.argv[2]).items():
  model = tm.load_from_card(card)
  res = tg.generate(model, prompts, GenerationConfig(max_len=3), sampler=SamplerConfig(num_steps=3),
                    seed=4)
  assert type(model).__name__ == {"base_lcm": "BaseLCM", "two_tower_diffusion_lcm": "TwoTowerLCM",
                                  "one_tower_diffusion_lcm": "OneTowerLCM"}[family]
  out[family] = res.embeddings
np.savez(sys.argv[3], **out)
assert not jaxish(), jaxish()
print("ok", sorted(out))
"""
  result = tmp_path / "out.npz"
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "prompts.npz"), json.dumps(cards),
                      str(result)], cwd=helpers.ROOT, env=helpers.cli_env(), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == f"ok {sorted(cards)}"
  got = np.load(result)
  for family, card in cards.items():
    want = torch_generate.generate(torch_models.load_from_card(card), prompts,
                                   gen_lib.GenerationConfig(max_len=3),
                                   sampler=schedules.SamplerConfig(num_steps=3), seed=4)
    np.testing.assert_array_equal(got[family], want.embeddings, err_msg=family)
    assert np.all(np.isfinite(want.embeddings)) and np.abs(want.embeddings).max() > 0


# ---------------------------------------------------------------------------------------------
# The config mirror and the registry

@pytest.mark.parametrize("family", list(families.REGISTRY))
@pytest.mark.parametrize("scan", [True, False])
def test_reference_entry_matches_the_jax_family(family, scan):
  """Every registered family has one entry; its key list is what the Flax model's variables map
  to; its torch module holds exactly these keys; ``samples`` agrees with the JAX family."""
  assert set(reference.REFERENCE_FAMILIES) == set(families.REGISTRY)
  entry = reference.get(family)
  assert entry.samples == families.get(family).samples
  assert entry.reference_has_it == (entry.export_arch is not None) == (family != FAMILY)
  cfg = _cfg(family, scan_layers=scan)
  abstract = nn.unbox(families.abstract_variables(cfg))
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract)
  flax_keys = {k: v.shape for k, v in naming.flax_to_reference(
      zeros["params"], zeros.get("buffers", {})).items()}
  assert flax_keys == entry.key_shapes(cfg) == reference.reference_shapes(cfg) == spec_shapes(cfg)
  with torch.device("meta"):
    module = torch_models.build(ModelConfig.from_config(cfg))
  assert type(module) is entry.torch_class()
  assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == entry.key_shapes(cfg)
  assert entry.decoder_class().__module__ == "lcm_interop.torch_generate"
  with pytest.raises(ValueError, match="its torch module is"):
    other = next(f for f in families.REGISTRY if f != family)
    entry.torch_class()(ModelConfig.from_config(_cfg(other)))


def test_one_tower_naming_round_trip_and_table_not_transposed(one_tower):
  model, v, _, _ = one_tower
  cfg = model.config
  state = naming.to_reference(v["params"], v["buffers"], cfg)
  np.testing.assert_array_equal(state["frontend.pos_encoder.weight"],
                                v["params"]["frontend"]["pos_encoder"]["weight"])
  for scan in (True, False):
    params, buffers = naming.from_reference(state, cfg.replace(scan_layers=scan))
    again = naming.to_reference(params, buffers, cfg)
    assert set(again) == set(state)
    for k in state:
      np.testing.assert_array_equal(again[k], state[k], err_msg=k)
  params, buffers = naming.from_reference(state, cfg)
  helpers.assert_trees_bitwise_equal({"params": params, "buffers": buffers},
                                     jax.device_get({"params": v["params"],
                                                     "buffers": v["buffers"]}))


# ---------------------------------------------------------------------------------------------
# One-Tower: torch vs JAX

def test_one_tower_state_dict_loads_strictly(one_tower):
  _, v, tm, out = one_tower
  sd = tm.state_dict()
  assert {k: tuple(t.shape) for k, t in sd.items()} == spec_shapes(tm.config)
  assert not tm.training and all(t.dtype == torch.float32 for t in sd.values())
  saved = torch.load(os.path.join(out, "model.pt"), weights_only=True)["model"]
  assert list(saved) == list(reference.one_tower_shapes(tm.config))
  for k, t in saved.items():
    assert torch.equal(sd[k], t), k
  np.testing.assert_array_equal(sd["frontend.pos_encoder.weight"].numpy(),
                                np.asarray(v["params"]["frontend"]["pos_encoder"]["weight"]))


def test_one_tower_forward_matches_jax(one_tower):
  model, v, tm, _ = one_tower
  emb, seg, pos = _packed()
  rng = np.random.default_rng(1)
  noisy = rng.normal(size=emb.shape).astype(np.float32)
  t = rng.integers(0, 100, size=seg.shape).astype(np.int32)
  t[0, :2] = (0, 99)
  drop = rng.random(seg.shape) < 0.3
  want, want_norm = model.apply(v, emb, seg, pos, noisy=noisy, timesteps=t, drop_cond=drop)
  with torch.no_grad():
    np.testing.assert_array_equal(
        torch_models.one_tower_mask(_t(seg, torch.long), _t(pos, torch.long), _t(drop)).numpy(),
        np.asarray(one_tower_mask(jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(drop))))
    got, got_norm = tm(_t(emb), _t(seg, torch.long), _t(pos, torch.long), noisy=_t(noisy),
                       timesteps=_t(t, torch.long), drop_cond=_t(drop))
    _rel(got.numpy(), want, "one_tower forward")
    _rel(got_norm.numpy(), want_norm, "one_tower normalizer")
    # the inputs matter: another timestep changes the prediction on both sides
    t2 = t.copy()
    t2[1, 3] = (t2[1, 3] + 37) % 100
    other, _ = tm(_t(emb), _t(seg, torch.long), _t(pos, torch.long), noisy=_t(noisy),
                  timesteps=_t(t2, torch.long), drop_cond=_t(drop))
  assert np.abs(other.numpy()[1, 3] - got.numpy()[1, 3]).max() > 1e-3


def test_one_tower_cache_and_step_match_jax(one_tower):
  """encode_context's K/V and step() over that cache (conditional mask, the fully masked
  unconditional one, a clean query) against the JAX methods."""
  model, v, tm, _ = one_tower
  rng = np.random.default_rng(4)
  emb = rng.normal(size=(3, 7, DIM)).astype(np.float32)
  seg = np.ones((3, 7), np.int32)
  seg[2, 5:] = 0
  pos = np.broadcast_to(np.arange(7, dtype=np.int32), (3, 7)).copy()
  (k, vv), _ = model.apply(v, emb, seg, pos, method=OneTowerLCM.encode_context)
  x = rng.normal(size=(3, 2, DIM)).astype(np.float32)
  ts = np.array([[99, 0], [50, 50], [3, 98]], np.int32)
  qpos = np.array([[4, 4], [6, 6], [2, 2]], np.int32)
  cond = np.arange(7)[None, :] < qpos[:, :1]
  mask = np.stack([cond, np.zeros_like(cond)], axis=1)[:, None]  # query 1: unconditional
  want, (wk, wv) = model.apply(v, x, ts, qpos, k, vv, mask, method=OneTowerLCM.step)
  with torch.no_grad():
    (tk, tv), _ = tm.encode_context(_t(emb), _t(seg, torch.long), _t(pos, torch.long))
    got, (gk, gv) = tm.step(_t(x), _t(ts, torch.long), _t(qpos, torch.long), tk, tv, _t(mask))
  valid = np.broadcast_to(seg.astype(bool)[None, :, :, None, None], k.shape)
  _rel(tk.numpy()[valid], np.asarray(k)[valid], "one_tower cached K")
  _rel(tv.numpy()[valid], np.asarray(vv)[valid], "one_tower cached V")
  _rel(got.numpy(), want, "one_tower step")
  _rel(gk.numpy(), wk, "one_tower step K")
  _rel(gv.numpy(), wv, "one_tower step V")


@pytest.mark.parametrize("variant", ["guided", "unguided_eta"])
def test_one_tower_generation_matches_jax(one_tower, variant):
  """Same noise -> same concepts, lengths and stop reasons (EOT, repetition, max_len)."""
  model, v, tm, _ = one_tower
  sampler = (diffusion.SamplerConfig(num_steps=5) if variant == "guided" else
             diffusion.SamplerConfig(num_steps=5, guidance_scale=1.0, eta=0.4))
  rng = jax.random.PRNGKey(7)
  prompts = [np.random.default_rng(i).normal(size=(n, DIM)).astype(np.float32)
             for i, n in enumerate((3, 1, 5, 2))]
  free = gen_lib.generate(model, v, prompts, gen_lib.GenerationConfig(max_len=6),
                          sampler=sampler, rng=rng).embeddings
  gen, eot, lengths, reasons = _stopping_case(free, prompts, 0.0)
  want = gen_lib.generate(model, v, prompts, gen, sampler=sampler, rng=rng, eot_vector=eot)
  got = torch_generate.generate(tm, prompts, gen, sampler=sampler, eot_vector=eot,
                                noise=jax_noise(rng, FAMILY, sampler))
  for res in (want, got):
    np.testing.assert_array_equal(res.lengths, lengths)
    assert list(res.reason_names()) == reasons
  _rel(got.embeddings, want.embeddings, f"one_tower generation ({variant})")
  for b, n in enumerate(lengths):
    assert not got.embeddings[b, n:].any()
  other = torch_generate.generate(tm, prompts, gen, sampler=sampler, eot_vector=eot, seed=1)
  assert np.abs(other.embeddings[:, 0] - got.embeddings[:, 0]).max() > 1e-3


def test_one_tower_low_precision_and_validation(one_tower, tmp_path):
  model, v, _, _ = one_tower
  out = str(tmp_path / "bf16")
  export.export_weights(v["params"], v["buffers"], model.config, out, dtype="bfloat16")
  tm = torch_models.load_from_card(out, dtype=None)
  assert tm.frontend.pos_encoder.weight.dtype == torch.bfloat16
  assert tm.sonar_normalizer.center.dtype == torch.float32
  emb, seg, pos = _packed()
  with torch.no_grad():
    got, _ = tm(_t(emb), _t(seg, torch.long), _t(pos, torch.long))
  want, _ = model.apply(v, emb, seg, pos)
  err = np.abs(got.numpy() - np.asarray(want)).max() / np.abs(want).max()
  assert got.dtype == torch.float32 and 0 < err < 0.1
  with pytest.raises(ValueError, match="guidance_rescale"):
    torch_generate.Generator(tm, sampler=diffusion.SamplerConfig(guidance_rescale=2.0))


def test_print_measured_errors():
  """Reports the max errors measured above (visible with ``pytest -s``)."""
  for name, err in sorted(MEASURED.items()):
    print(f"max {'abs' if 'abs' in name else 'relative'} error {name}: {err:.3g}")
  assert all(math.isfinite(e) for e in MEASURED.values())
