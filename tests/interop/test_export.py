"""lcm_interop.export: Orbax checkpoint -> reference PyTorch checkpoint + cards, and back.

The exported key set and shapes are compared with a list built HERE from the key patterns of
the reference checkpoint format (not from ``naming.reference_shapes``), and a few tensors with the Flax
parameters transposed by hand. The round trip must be bitwise in float32, both when restoring the
imported checkpoint directly and through ``train.load_pretrained`` (``config.train.init_from``).

The checkpoints are real: two training steps of each family (tests/helpers.py ``run_steps``) saved
with the training Checkpointer and the config in ``meta``, as ``train_and_evaluate`` saves them.
The One-Tower, which the reference lacks, exports to a card of lcm_jax's own and round-trips the
same way.
"""

import dataclasses
import os
import pathlib
import shutil
import sys
import urllib.parse

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the optional 'data' extra
yaml = pytest.importorskip("yaml")

# pylint: disable=g-import-not-at-top
from configs import mse_1b6, one_tower_1b6, two_tower_1b6  # noqa: E402
from lcm_jax import checkpoint as ckpt_lib  # noqa: E402
from lcm_interop import export  # noqa: E402
from lcm_jax import train  # noqa: E402
from lcm_jax.models.config import ModelConfig  # noqa: E402
from tests import helpers  # noqa: E402

RECIPES = {"base_lcm": mse_1b6, "two_tower_diffusion_lcm": two_tower_1b6,
           "one_tower_diffusion_lcm": one_tower_1b6}
STEPS = 2


# ---------------------------------------------------------------------------------------------
# The spec's key list, written out independently

def spec_shapes(cfg: ModelConfig) -> dict:
  """Every reference key of ``cfg``'s family and its torch shape, from the spec's patterns."""
  d, s, h = cfg.model_dim, cfg.sonar_embed_dim, cfg.model_dim  # heads * head_dim == d
  inner = int(cfg.ffn_inner_dim * 2 / 3)
  f = -(-inner // 256) * 256  # SwiGLU: 2/3 then up to a multiple of 256 (8192 -> 5632)

  def lin(prefix, out_dim, in_dim):
    return {f"{prefix}.weight": (out_dim, in_dim), f"{prefix}.bias": (out_dim,)}

  def attn(prefix):
    out = {}
    for p in ("q_proj", "k_proj", "v_proj"):
      out.update(lin(f"{prefix}.{p}", h, d))
    out.update(lin(f"{prefix}.output_proj", d, h))
    return out

  def ffn(prefix):
    return {**lin(f"{prefix}.gate_proj", f, d), **lin(f"{prefix}.inner_proj", f, d),
            **lin(f"{prefix}.output_proj", d, f)}

  def layer(prefix):
    return {f"{prefix}.self_attn_layer_norm.weight": (d,), **attn(f"{prefix}.self_attn"),
            f"{prefix}.ffn_layer_norm.weight": (d,), **ffn(f"{prefix}.ffn")}

  out = {}
  if cfg.family == "base_lcm":
    out.update(lin("frontend.pre_linear", d, s))
    out["frontend.sonar_normalizer.center"] = (s,)
    out["frontend.sonar_normalizer.scale"] = (s,)
    for n in range(cfg.num_layers):
      out.update(layer(f"lcm.layers.{n}"))
    out["lcm.layer_norm.weight"] = (d,)
    out.update(lin("postnet.fc", s, d))
    return out
  if cfg.family == "one_tower_diffusion_lcm":  # lcm_jax's own keys (no reference counterpart)
    out["sonar_normalizer.center"] = (s,)
    out["sonar_normalizer.scale"] = (s,)
    out.update(lin("frontend.embed_time.fc1", d, cfg.timestep_embed_dim))
    out.update(lin("frontend.embed_time.fc2", d, d))
    out.update(lin("frontend.pre_linear", d, s + d))  # input [x ; t_emb]
    out["frontend.pos_encoder.weight"] = (cfg.max_seq_len, d)  # a table: rows are positions
    for n in range(cfg.num_layers):
      out.update(layer(f"lcm.layers.{n}"))
    out["lcm.layer_norm.weight"] = (d,)
    out.update(lin("postnet.fc", s, d))
    return out
  out["sonar_normalizer.center"] = (s,)
  out["sonar_normalizer.scale"] = (s,)
  out.update(lin("encoder_frontend.pre_linear", d, s))
  for n in range(cfg.num_layers):
    out.update(layer(f"context_encoder.layers.{n}"))
  out["context_encoder.layer_norm.weight"] = (d,)
  out.update(lin("denoiser.embed_time.fc1", d, 256))
  out.update(lin("denoiser.embed_time.fc2", d, d))
  out.update(lin("denoiser.initial_proj.fc", d, s))
  out.update(lin("denoiser.final_proj.fc", s, d))
  for n in range(cfg.denoiser_num_layers):
    p = f"denoiser.layers.{n}"
    for norm in ("self_attn_layer_norm", "cross_attention_layer_norm", "ffn_layer_norm"):
      out[f"{p}.{norm}.weight"] = (d,)
    out.update(attn(f"{p}.self_attn"))
    out.update(attn(f"{p}.cross_attention"))
    out.update(ffn(f"{p}.ffn"))
    out.update(lin(f"{p}.modulator.fc", 9 * d, d))
  out["denoiser.layer_norm.weight"] = (d,)
  return out


# ---------------------------------------------------------------------------------------------
# Fixtures: one real checkpoint per family, one float32 export of each

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """``{family: (config, workdir, host state)}`` after STEPS training steps, checkpointed."""
  base = tmp_path_factory.mktemp("export")
  out = {}
  for family, recipe in RECIPES.items():
    c = helpers.small_train_config(recipe)
    c.model.num_layers = 2
    state, losses = helpers.run_steps(c, jax.devices(), num_steps=STEPS)
    assert np.all(np.isfinite(losses))
    wd = str(base / family)
    saver = ckpt_lib.Checkpointer(wd, async_save=False)
    saver.save(STEPS, state, None, {"config": c.to_json(), "mesh": {"data": 8},
                                    "normalizer": ""}, force=True)
    saver.close()
    out[family] = (c, wd, state)
  return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """``{family: export dir}``: float32 exports through the in-process CLI entry point."""
  base = tmp_path_factory.mktemp("exported")
  out = {}
  for family, (_, wd, _) in trained.items():
    d = str(base / family)
    assert export.main([f"--workdir={wd}", f"--out={d}"]) == 0
    out[family] = d
  return out


def _load_pt(path):
  return torch.load(path, map_location="cpu", weights_only=True)


def _cfg(c) -> ModelConfig:
  return ModelConfig.from_config(c.model)


# ---------------------------------------------------------------------------------------------
# Export

def _check_export_dir(d, c, state, dtype=torch.float32):
  cfg = _cfg(c)
  assert sorted(os.listdir(d)) == ["model.pt", "model_card.yaml", "normalizer.pt",
                                   "normalizer_card.yaml"]
  ckpt = _load_pt(os.path.join(d, "model.pt"))
  assert set(ckpt) == {"model", "model_key"} and ckpt["model_key"] == "model"
  sd = ckpt["model"]
  expected = spec_shapes(cfg)
  assert set(sd) == set(expected)
  for key, shape in expected.items():
    assert tuple(sd[key].shape) == shape, key
    assert sd[key].dtype == dtype, key

  # A few tensors against the Flax parameters transposed by hand (scanned stacks: axis 0).
  p, b = state["params"], state["buffers"]

  def f32(t):
    return t.to(torch.float32).numpy()

  def cast(a):  # the value as the export dtype rounds it
    return f32(torch.from_numpy(np.array(a, np.float32)).to(dtype))

  if cfg.family == "base_lcm":
    pairs = [("frontend.pre_linear.weight", p["frontend"]["pre_linear"]["kernel"].T),
             ("lcm.layers.1.ffn.gate_proj.weight",
              p["lcm"]["layers"]["ffn"]["gate_proj"]["kernel"][1].T),
             ("lcm.layers.0.self_attn.k_proj.bias",
              p["lcm"]["layers"]["self_attn"]["k_proj"]["bias"][0]),
             ("postnet.fc.weight", p["postnet"]["fc"]["kernel"].T),
             ("frontend.sonar_normalizer.scale", b["frontend"]["sonar_normalizer"]["scale"])]
    norm_key = "frontend.sonar_normalizer"
  elif cfg.family == "one_tower_diffusion_lcm":
    fr = p["frontend"]
    pairs = [("frontend.pre_linear.weight", fr["pre_linear"]["kernel"].T),
             ("frontend.embed_time.fc1.weight", fr["embed_time"]["fc1"]["kernel"].T),
             ("frontend.pos_encoder.weight", fr["pos_encoder"]["weight"]),  # NOT transposed
             ("lcm.layers.1.self_attn.q_proj.weight",
              p["lcm"]["layers"]["self_attn"]["q_proj"]["kernel"][1].T),
             ("postnet.fc.bias", p["postnet"]["fc"]["bias"]),
             ("sonar_normalizer.scale", b["sonar_normalizer"]["scale"])]
    norm_key = "sonar_normalizer"
  else:
    den = p["denoiser"]
    pairs = [("denoiser.embed_time.fc1.weight", den["embed_time"]["fc1"]["kernel"].T),
             ("denoiser.layers.1.modulator.fc.weight",
              den["layers"]["modulator"]["fc"]["kernel"][1].T),
             ("denoiser.layers.0.cross_attention.v_proj.weight",
              den["layers"]["cross_attention"]["v_proj"]["kernel"][0].T),
             ("context_encoder.layers.1.ffn_layer_norm.weight",
              p["context_encoder"]["layers"]["ffn_layer_norm"]["weight"][1]),
             ("sonar_normalizer.center", b["sonar_normalizer"]["center"])]
    norm_key = "sonar_normalizer"
  for key, value in pairs:
    np.testing.assert_array_equal(f32(sd[key]), cast(value), err_msg=key)

  card = yaml.safe_load(open(os.path.join(d, "model_card.yaml")))
  assert card["name"] == os.path.basename(d)
  assert card["model_family"] == cfg.family
  assert card["checkpoint"] == pathlib.Path(os.path.abspath(d), "model.pt").as_uri()
  mc = card["model_config"]
  assert (mc["model_dim"], mc["sonar_embed_dim"], mc["max_seq_len"]) == (
      cfg.model_dim, cfg.sonar_embed_dim, cfg.max_seq_len)
  stack = mc["context_encoder"] if cfg.family == "two_tower_diffusion_lcm" else mc["lcm"]
  assert (stack["num_layers"], stack["num_attn_heads"], stack["ffn_inner_dim"]) == (
      cfg.num_layers, cfg.num_heads, cfg.ffn_inner_dim)
  one_tower = cfg.family == "one_tower_diffusion_lcm"
  assert stack["use_swiglu"] and stack["pos_embedding_style"] == ("none" if one_tower else "rope")
  assert stack["layer_normalization_style"] == "rms" and stack["mha_output_proj_bias"]
  if cfg.family == "two_tower_diffusion_lcm":
    assert mc["denoiser"]["num_layers"] == cfg.denoiser_num_layers
    assert mc["denoiser"]["timestep_embed_dim"] == cfg.model_dim
    assert mc["noise_scheduler"]["num_diffusion_train_steps"] == 100
    assert mc["trained_with_cf_guidance"] is True
  if one_tower:  # the reference has no such family: no arch, not loadable there, said so
    assert "model_arch" not in card
    assert mc["frontend"]["pos_embedding_style"] == "learned"
    assert mc["frontend"]["timestep_features"] == cfg.timestep_embed_dim
    assert mc["noise_scheduler"]["num_diffusion_train_steps"] == 100
    assert card["lcm_jax"]["reference_compatible"] is False
    assert any("reference has no One-Tower" in n for n in card["lcm_jax"]["notes"])
  else:
    assert card["model_arch"].startswith("toy_") and card["lcm_jax"]["reference_compatible"]
  assert card["lcm_jax"]["step"] == STEPS
  norm_card = yaml.safe_load(open(os.path.join(d, "normalizer_card.yaml")))
  assert norm_card["name"] == mc["sonar_normalizer_name"]
  assert norm_card["model_family"] == "sonar_normalizer"
  assert norm_card["model_config"] == {"dim": cfg.sonar_embed_dim}
  norm = _load_pt(_uri_path(norm_card["checkpoint"]))["model"]
  assert set(norm) == {"center", "scale"}
  for k in ("center", "scale"):
    torch.testing.assert_close(norm[k], sd[f"{norm_key}.{k}"], rtol=0, atol=0)


def _uri_path(uri):
  """The local path of an absolute ``file://`` URI (asserted to be one)."""
  parsed = urllib.parse.urlparse(uri)
  assert parsed.scheme == "file" and not parsed.netloc, uri
  path = urllib.parse.unquote(parsed.path)
  assert os.path.isabs(path), uri
  return path


def _yaml_documents(d):
  """Every YAML document of every card file of ``d`` (as an asset store reads a directory)."""
  docs = {}
  for fname in sorted(os.listdir(d)):
    if fname.endswith((".yaml", ".yml")):
      with open(os.path.join(d, fname), encoding="utf-8") as f:
        for doc in yaml.safe_load_all(f):
          assert isinstance(doc, dict) and doc.get("name"), (fname, doc)
          assert doc["name"] not in docs, f"two cards named {doc['name']}"
          docs[doc["name"]] = doc
  return docs


def test_export_dir_is_a_reference_asset_directory(exported, tmp_path):
  """What the reference needs to load DIR/model_card.yaml by path or by name: absolute
  ``file://`` checkpoint URIs that resolve to the written files (a card given by path has no
  base directory), and the normalizer card the model card names, in the same directory."""
  for family, d in exported.items():
    docs = _yaml_documents(d)
    model = docs[os.path.basename(d)]
    assert model["model_family"] == family
    norm_name = model["model_config"]["sonar_normalizer_name"]
    assert set(docs) == {os.path.basename(d), norm_name}
    norm = docs[norm_name]
    assert norm["model_family"] == "sonar_normalizer" and norm["model_arch"] == "base"
    assert os.path.samefile(_uri_path(model["checkpoint"]), os.path.join(d, "model.pt"))
    assert os.path.samefile(_uri_path(norm["checkpoint"]), os.path.join(d, "normalizer.pt"))
  # A path with spaces and non-ASCII characters is percent-encoded and decodes back.
  odd = str(tmp_path / "my model é")
  v = _flax_variables_of(exported["base_lcm"])
  export.export_weights(v["params"], v["buffers"], v["cfg"], odd)
  card = yaml.safe_load(open(os.path.join(odd, "model_card.yaml")))
  assert " " not in card["checkpoint"] and "é" not in card["checkpoint"]
  assert os.path.samefile(_uri_path(card["checkpoint"]), os.path.join(odd, "model.pt"))


def _flax_variables_of(d):
  """The Flax variables and config of an export directory (through the import path)."""
  _, cfg, state, _ = export.load_card(os.path.join(d, "model_card.yaml"))
  v = export.flax_variables_from_torch(state, cfg)
  return dict(v, cfg=cfg)


def test_fairseq2_asset_store_resolves_the_export(exported, tmp_path):
  """The installed fairseq2's own asset API (0.8.x; the reference pins 0.3.0rc1, whose card and
  URI rules are the same for these fields): the directory loads as an asset source, both cards
  are found by name, and their checkpoint URIs resolve to the files; the model card parsed ON
  ITS OWN (no base path: what loading a card by path does) still resolves its checkpoint, which
  an old relative ``checkpoint: model.pt`` card cannot."""
  assets = pytest.importorskip("fairseq2.assets")
  from fairseq2.file_system import NativeLocalFileSystem  # pylint: disable=g-import-not-at-top
  from fairseq2.utils.yaml import RuamelYamlLoader  # pylint: disable=g-import-not-at-top
  fs = NativeLocalFileSystem()
  loader = assets.StandardFileAssetMetadataLoader(
      fs, assets.YamlAssetMetadataFileLoader(RuamelYamlLoader(fs)))
  d = exported["two_tower_diffusion_lcm"]
  store = assets.StandardAssetStore([loader.load(pathlib.Path(d))])
  name = os.path.basename(d)
  card = store.retrieve_card(name)
  assert card.field("model_family").as_(str) == "two_tower_diffusion_lcm"
  assert os.path.samefile(str(card.field("checkpoint").as_uri().to_path()),
                          os.path.join(d, "model.pt"))
  norm_name = card.field("model_config").value["sonar_normalizer_name"]
  norm = store.retrieve_card(norm_name)
  assert os.path.samefile(str(norm.field("checkpoint").as_uri().to_path()),
                          os.path.join(d, "normalizer.pt"))
  # By path: the card's own YAML, no __base_path__.
  data = yaml.safe_load(open(os.path.join(d, "model_card.yaml")))
  alone = assets.AssetCard(data["name"], data)
  assert os.path.samefile(str(alone.field("checkpoint").as_uri().to_path()),
                          os.path.join(d, "model.pt"))
  old = assets.AssetCard(data["name"], dict(data, checkpoint="model.pt"))
  with pytest.raises(assets.AssetCardError, match="relative"):
    old.field("checkpoint").as_uri()
  # --relative_checkpoint: resolvable through the store (relative to the card's directory).
  rel = str(tmp_path / "rel")
  v = _flax_variables_of(d)
  export.export_weights(v["params"], v["buffers"], v["cfg"], rel, relative_checkpoint=True)
  store = assets.StandardAssetStore([loader.load(pathlib.Path(rel))])
  assert os.path.samefile(str(store.retrieve_card("rel").field("checkpoint").as_uri().to_path()),
                          os.path.join(rel, "model.pt"))


def test_import_reads_old_new_and_moved_layouts(exported, tmp_path):
  """Import back: a new card (absolute URI), an old one (relative ``checkpoint: model.pt``), and
  a new export directory that was copied/moved (its URI names the old place: the file beside the
  card is used)."""
  d = exported["base_lcm"]
  want = _flax_variables_of(d)
  old = str(tmp_path / "old")
  shutil.copytree(d, old)
  for fname, ckpt in (("model_card.yaml", "model.pt"), ("normalizer_card.yaml", "normalizer.pt")):
    card = yaml.safe_load(open(os.path.join(old, fname)))
    card["checkpoint"] = ckpt
    with open(os.path.join(old, fname), "w") as f:
      yaml.safe_dump(card, f, sort_keys=False)
  moved = str(tmp_path / "moved")
  shutil.copytree(d, moved)  # the cards still name d's files ...
  shutil.move(d, str(tmp_path / "gone"))  # ... which no longer exist
  try:
    for src in (old, moved):
      got = _flax_variables_of(src)
      helpers.assert_trees_bitwise_equal({"params": got["params"], "buffers": got["buffers"]},
                                         {"params": want["params"], "buffers": want["buffers"]})
      wd = str(tmp_path / f"wd_{os.path.basename(src)}")
      export.import_checkpoint(os.path.join(src, "model_card.yaml"), wd)
  finally:
    shutil.move(str(tmp_path / "gone"), d)


def test_export_cli_subprocess_base_lcm(trained, tmp_path):
  """``python -m lcm_interop.export`` on the real Base-LCM checkpoint (latest step)."""
  c, wd, state = trained["base_lcm"]
  out = str(tmp_path / "exported_model")
  r = helpers.run_cli([sys.executable, "-m", "lcm_interop.export", f"--workdir={wd}",
                       f"--out={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"exported base_lcm step {STEPS}" in r.stdout
  _check_export_dir(out, c, state)
  assert sorted(os.listdir(tmp_path)) == ["exported_model"]  # no temporary directory left


def test_export_two_tower_keys_shapes_values(trained, exported):
  c, _, state = trained["two_tower_diffusion_lcm"]
  _check_export_dir(exported["two_tower_diffusion_lcm"], c, state)


def test_export_one_tower_keys_shapes_values_and_note(trained, tmp_path):
  """The One-Tower card: lcm_jax's keys, no model_arch, a warning that the reference cannot load
  it (the CLI prints the note); the card reads back to the same config."""
  c, wd, state = trained["one_tower_diffusion_lcm"]
  out = str(tmp_path / "one_tower")
  r = helpers.run_cli([sys.executable, "-m", "lcm_interop.export", f"--workdir={wd}",
                       f"--out={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "warning: not loadable by the reference: the reference has no One-Tower" in r.stderr
  _check_export_dir(out, c, state)
  card = yaml.safe_load(open(os.path.join(out, "model_card.yaml")))
  assert export.model_config_from_card(card, "c") == _cfg(c)
  # Without lcm_jax's section, the card's own model_config gives the architecture back.
  ref_only = export.model_config_from_card({k: v for k, v in card.items() if k != "lcm_jax"}, "c")
  for field in ("model_dim", "num_layers", "num_heads", "ffn_inner_dim", "max_seq_len",
                "sonar_embed_dim", "timestep_embed_dim", "num_diffusion_train_steps",
                "beta_schedule", "cfg_dropout"):
    assert getattr(ref_only, field) == getattr(_cfg(c), field), field


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_export_casts_and_imports_back(trained, tmp_path, dtype):
  c, wd, state = trained["two_tower_diffusion_lcm"]
  out = str(tmp_path / "lp")
  assert export.main([f"--workdir={wd}", f"--out={out}", f"--dtype={dtype}",
                      f"--step={STEPS}"]) == 0
  _check_export_dir(out, c, state, getattr(torch, dtype))
  card = yaml.safe_load(open(os.path.join(out, "model_card.yaml")))
  assert card["lcm_jax"]["dtype"] == dtype
  # Import: the float32 values of the rounded tensors, exactly.
  wd2 = str(tmp_path / "back")
  export.import_checkpoint(os.path.join(out, "model_card.yaml"), wd2)
  back = _restore(wd2, c)
  rounded = jax.tree.map(
      lambda a: torch.from_numpy(np.array(a, np.float32)).to(getattr(torch, dtype)).float()
      .numpy(), {"params": state["params"], "buffers": state["buffers"]})
  helpers.assert_trees_bitwise_equal(back, rounded)


def test_overflow_and_non_finite_values_are_errors(trained, tmp_path):
  c, _, state = trained["base_lcm"]
  cfg = _cfg(c)
  params = jax.tree.map(np.array, state["params"])
  params["postnet"]["fc"]["bias"][3] = 7e4  # > float16 max 65504, fine in bfloat16
  out = str(tmp_path / "o")
  with pytest.raises(export.ExportError, match=r"'postnet\.fc\.bias'.*overflow float16"):
    export.export_weights(params, state["buffers"], cfg, out, dtype="float16")
  assert not os.path.exists(out) and os.listdir(tmp_path) == []
  export.export_weights(params, state["buffers"], cfg, out, dtype="bfloat16")
  assert _load_pt(os.path.join(out, "model.pt"))["model"]["postnet.fc.bias"][3] == 70144.0
  params["postnet"]["fc"]["bias"][3] = np.nan
  with pytest.raises(export.ExportError, match=r"'postnet\.fc\.bias'.*non-finite"):
    export.export_weights(params, state["buffers"], cfg, str(tmp_path / "o2"))
  assert not os.path.exists(tmp_path / "o2")


# ---------------------------------------------------------------------------------------------
# Import and the round trip

def _restore(workdir, c):
  """params/buffers of ``workdir``'s latest checkpoint, restored with the training code."""
  s = train.setup(c)
  src = ckpt_lib.Checkpointer(workdir, create=False, async_save=False)
  try:
    out = src.restore_weights(None, {"params": s.abstract_state["params"],
                                     "buffers": s.abstract_state["buffers"]})
  finally:
    src.close()
  return jax.device_get(out)


@pytest.mark.parametrize("family", list(RECIPES))
def test_round_trip_is_bitwise_and_init_from_starts_from_it(trained, exported, tmp_path, family):
  c, _, state = trained[family]
  card = os.path.join(exported[family], "model_card.yaml")
  wd = str(tmp_path / "imported")
  if family == "base_lcm":  # the import CLI once, in a subprocess
    r = helpers.run_cli([sys.executable, "-m", "lcm_interop.export", f"--from_torch={card}",
                         f"--workdir={wd}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--config.train.init_from=" in r.stdout
  else:
    export.import_checkpoint(card, wd)
  original = {"params": state["params"], "buffers": state["buffers"]}
  helpers.assert_trees_bitwise_equal(_restore(wd, c), original)
  # A training run starting from it (config.train.init_from) gets exactly these weights.
  s = train.setup(c)
  started = jax.device_get(train.load_pretrained(s, {}, wd))
  helpers.assert_trees_bitwise_equal(started, original)
  # The imported checkpoint carries its config: it exports again to the same tensors.
  again = str(tmp_path / "again")
  assert export.main([f"--workdir={wd}", f"--out={again}"]) == 0
  a = _load_pt(os.path.join(exported[family], "model.pt"))["model"]
  b = _load_pt(os.path.join(again, "model.pt"))["model"]
  assert list(a) == list(b)
  for k in a:
    assert torch.equal(a[k], b[k]), k


def test_reference_arch_cards_and_unsupported_fields(tmp_path):
  cfg = export.model_config_from_card(
      {"model_family": "two_tower_diffusion_lcm", "model_arch": "two_tower_diffusion_lcm_7B"}, "c")
  assert (cfg.model_dim, cfg.num_heads, cfg.num_layers, cfg.denoiser_num_layers) == (4096, 32, 5,
                                                                                     14)
  assert cfg.swiglu_inner_dim == 11008 and cfg.num_diffusion_train_steps == 100
  assert cfg.cfg_dropout == 0.15 and cfg.timestep_embed_dim == 256
  cfg = export.model_config_from_card({"model_family": "base_lcm", "model_arch": "base_lcm_1_6B"},
                                      "c")
  assert (cfg.model_dim, cfg.num_layers, cfg.swiglu_inner_dim, cfg.max_seq_len) == (2048, 32, 5632,
                                                                                    4096)
  # Every field an export writes round-trips through the card.
  cfg = ModelConfig(family="two_tower_diffusion_lcm", model_dim=48, num_heads=6, num_layers=3,
                    denoiser_num_layers=4, ffn_inner_dim=200, sonar_embed_dim=24, dropout=0.05,
                    beta_schedule="sigmoid", sigmoid_alpha=3.5, cfg_dropout=0.0,
                    scan_layers=False, timestep_embed_dim=16, ffn_multiple_of=32)
  card = {"model_family": cfg.family, "model_arch": "toy_two_tower_diffusion_lcm",
          "model_config": export.reference_model_config(cfg, "n"),
          "lcm_jax": {"model_config": dataclasses.asdict(cfg)}}
  assert export.model_config_from_card(card, "c") == cfg
  assert len(export.compatibility_notes(cfg)) == 3  # multiple 32, 16 features, sigmoid
  # Without lcm_jax's section the reference's fixed values come back.
  ref_only = export.model_config_from_card({k: v for k, v in card.items() if k != "lcm_jax"}, "c")
  assert ref_only.timestep_embed_dim == 256 and ref_only.ffn_multiple_of == 256
  assert ref_only.model_dim == 48 and ref_only.cfg_dropout == 0.0
  bad = {"model_family": "base_lcm", "model_arch": "toy_base_lcm",
         "model_config": {"lcm": {"use_swiglu": False}}}
  with pytest.raises(export.ExportError,
                     match=r"card\.yaml: field 'model_config\.lcm\.use_swiglu'"):
    export.model_config_from_card(bad, "card.yaml")
  with pytest.raises(export.ExportError, match=r"field 'model_arch'.*two_tower_diffusion_lcm arch"):
    export.model_config_from_card({"model_family": "base_lcm",
                                   "model_arch": "two_tower_diffusion_lcm_1_6B"}, "card.yaml")


# ---------------------------------------------------------------------------------------------
# Bad input: one `error:` line naming the file/key, exit 2, nothing written

def _fails(capsys, argv, *expected):
  code = export.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2, err
  assert len(err) == 1 and err[0].startswith("error: "), err
  for e in expected:
    assert e in err[0], f"{e!r} not in {err[0]!r}"
  return err[0]


def _copy_export(src, dst, card_edit=None, state_edit=None):
  shutil.copytree(src, dst)
  card_path = os.path.join(dst, "model_card.yaml")
  if card_edit:
    card = yaml.safe_load(open(card_path))
    card_edit(card)
    with open(card_path, "w") as f:
      yaml.safe_dump(card, f)
  if state_edit:
    ckpt = _load_pt(os.path.join(dst, "model.pt"))
    state_edit(ckpt["model"])
    torch.save(ckpt, os.path.join(dst, "model.pt"))
  return card_path


def test_bad_export_input(trained, exported, tmp_path, capsys):
  _, wd, _ = trained["base_lcm"]
  out = str(tmp_path / "out")
  empty = tmp_path / "empty_wd"
  empty.mkdir()
  _fails(capsys, [f"--workdir={empty}", f"--out={out}"], "--workdir", str(empty),
         "has no checkpoints")
  _fails(capsys, [f"--workdir={wd}", f"--out={out}", "--step=7"], "--step",
         "no checkpoint for step 7", f"available: [{STEPS}]")
  _fails(capsys, [f"--workdir={wd}", f"--out={out}", "--dtype=float64"], "--dtype", "float64")
  _fails(capsys, [f"--workdir={wd}"], "--out is required")
  # A config of the other family: nothing of it is in the checkpoint.
  _fails(capsys, [f"--workdir={wd}", f"--out={out}",
                  f"--config={os.path.join(helpers.ROOT, 'configs', 'two_tower_1b6.py')}:tiny"],
         f"{wd}", "cannot restore params/buffers", "the checkpoint has no")
  _fails(capsys, [f"--workdir={wd}", f"--out={exported['base_lcm']}"], "--out",
         exported["base_lcm"], "not empty", "--overwrite")
  assert not os.path.exists(out)
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_bad_import_input(exported, tmp_path, capsys):
  src = exported["two_tower_diffusion_lcm"]
  wd = str(tmp_path / "wd")
  cases = {
      "family": (lambda c: c.update(model_family="sonar_normalizer"), None,
                 ["model_card.yaml", "'model_family'", "'sonar_normalizer'"]),
      "other_family": (lambda c: (c.update(model_family="base_lcm", model_arch="toy_base_lcm"),
                                  c.pop("lcm_jax"), c["model_config"].update(
                                      model_type="base_lcm",
                                      lcm=c["model_config"]["context_encoder"])), None,
                       ["model.pt", "missing key(s) 'frontend.pre_linear.weight'"]),
      "missing": (None, lambda sd: sd.pop("denoiser.layers.1.modulator.fc.bias"),
                  ["model.pt", "missing key(s) 'denoiser.layers.1.modulator.fc.bias'"]),
      "extra": (None, lambda sd: sd.update({"denoiser.extra.weight": torch.zeros(2)}),
                ["model.pt", "unexpected key(s) 'denoiser.extra.weight'"]),
      "shape": (None, lambda sd: sd.update({"denoiser.layer_norm.weight": torch.zeros(3)}),
                ["model.pt", "'denoiser.layer_norm.weight'", "shape (3,)"]),
  }
  for name, (card_edit, state_edit, expected) in cases.items():
    card = _copy_export(src, str(tmp_path / name), card_edit, state_edit)
    _fails(capsys, [f"--from_torch={card}", f"--workdir={wd}"], *expected)
    assert not os.path.exists(wd), name
  _fails(capsys, [f"--from_torch={tmp_path / 'nope.yaml'}", f"--workdir={wd}"],
         "nope.yaml", "does not exist")
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "x").write_text("x")
  _fails(capsys, [f"--from_torch={os.path.join(src, 'model_card.yaml')}", f"--workdir={busy}"],
         "--workdir", "not empty")
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_bad_cli_input_subprocess(tmp_path):
  """The real process: exit status 2 and one error line (argparse errors too)."""
  r = helpers.run_cli([sys.executable, "-m", "lcm_interop.export", f"--workdir={tmp_path}",
                       f"--out={tmp_path / 'o'}", "--dtype=int8"])
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "--dtype" in lines[0], lines
