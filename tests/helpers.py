"""Helpers shared by several test files: small training configs and packed batches, bitwise tree
comparison, and running the CLIs in a subprocess.

Import as ``from tests import helpers`` (tests/conftest.py puts the repository root on sys.path).
"""

import os
import subprocess
import sys

import jax
import numpy as np

from lcm_jax import sharding
from lcm_jax import train
from lcm_jax.normalizer import Normalizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Training on a small model

def small_train_config(recipe, mesh=(8, 1, 1), dropout=0.1, accum=1, batch=8):
  """``recipe.get_config("tiny")`` shrunk to d 32, 4 heads, SONAR dim 16, rows of 16 concepts.

  ``recipe`` is a config module (configs/mse_1b6.py, configs/two_tower_1b6.py); ``mesh`` is
  (data, fsdp, tensor), ``batch`` the global batch size, ``accum`` the gradient accumulation steps.
  """
  c = recipe.get_config("tiny")
  c.model.dropout = dropout
  c.model.sonar_embed_dim = 16
  c.model.model_dim = 32
  c.model.num_heads = 4
  c.data.seq_len = 16
  c.data.global_batch_size = batch
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  c.optimizer.grad_accum_steps = accum
  c.optimizer.warmup_steps = 1
  return c


def corpus_train_config(recipe, corpus, steps):
  """``recipe.get_config("tiny")`` on an existing dataset ``corpus`` for ``steps`` steps, with the
  cosine decay, eval, checkpoint and log all at the last step."""
  c = recipe.get_config("tiny")
  c.data.train = corpus
  c.data.synthetic_corpus = ""
  c.train.num_steps = steps
  c.optimizer.decay_steps = steps
  c.train.eval_every = steps
  c.train.checkpoint_every = steps
  c.train.log_every = steps
  return c


def packed_batch(c, seed=0, random_walk=False):
  """A packed batch for config ``c``: rows hold 1-3 documents of random length, some padding.

  Embeddings are standard normal, or with ``random_walk`` a random walk along each row (scaled by
  0.3: smooth documents, so that the context helps).
  """
  rng = np.random.default_rng(seed)
  b, l, d = c.data.global_batch_size, c.data.seq_len, c.model.sonar_embed_dim
  seg = np.zeros((b, l), np.int32)
  pos = np.zeros((b, l), np.int32)
  for i in range(b):
    t, s = 0, 1
    while t < l - 2 and s <= 3:
      n = int(rng.integers(2, l - t + 1))
      seg[i, t:t + n], pos[i, t:t + n] = s, np.arange(n)
      t, s = t + n, s + 1
  emb = rng.standard_normal((b, l, d))
  if random_walk:
    emb = np.cumsum(emb, axis=1).astype(np.float32) * 0.3
  return {"embeddings": emb.astype(np.float32), "segment_ids": seg, "positions": pos,
          "target_mask": ((seg > 0) & (pos > 0)).astype(np.float32)}


def random_normalizer(d, seed=1):
  """A normalizer with random centers and scales in [0.5, 2)."""
  rng = np.random.default_rng(seed)
  return Normalizer(center=rng.normal(size=d).astype(np.float32),
                    scale=rng.uniform(0.5, 2.0, size=d).astype(np.float32))


def run_steps(c, devices, num_steps=2, make_batch=packed_batch):
  """Runs ``num_steps`` train steps of config ``c`` on ``devices`` from a fresh init.

  Step i uses ``make_batch(c, seed=i)``. Returns the final state (on the host) and the losses.
  """
  s = train.setup(c, devices=devices)
  state = train.init_state(s, random_normalizer(c.model.sonar_embed_dim))
  step = train.make_train_step(s)
  losses = []
  for i in range(num_steps):
    state, m = step(state, sharding.global_batch_from_local(make_batch(c, seed=i), s.mesh))
    losses.append(float(m["loss"]))
  return jax.device_get(state), losses


def assert_trees_bitwise_equal(ours, theirs):
  """Same leaf paths, dtypes and shapes, and bit-for-bit equal (float32) values."""
  flat_a = jax.tree_util.tree_flatten_with_path(ours)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
  assert len(flat_a) == len(flat_b)
  for path, value in flat_a:
    other = flat_b[path]
    assert other.dtype == value.dtype and other.shape == value.shape
    np.testing.assert_array_equal(np.asarray(value).view(np.uint32),
                                  np.asarray(other).view(np.uint32))


# ---------------------------------------------------------------------------------------------
# The CLIs in a subprocess

def cli_env():
  """The environment of a CLI subprocess: 8 fake CPU devices, no model hub, the repo importable."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600")
  env["JAX_PLATFORMS"] = "cpu"
  env["HF_HUB_OFFLINE"] = "1"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_cli(cmd, timeout=600):
  """Runs ``cmd`` in the repository root with :func:`cli_env`; captures text stdout/stderr."""
  return subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                        timeout=timeout)


def make_corpus(out, num_docs, dim, seed):
  """Writes a synthetic branching corpus with ``python -m data_prep.synthetic``; returns ``out``."""
  r = run_cli([sys.executable, "-m", "data_prep.synthetic", f"--out={out}",
               f"--num_docs={num_docs}", f"--dim={dim}", f"--seed={seed}"])
  assert r.returncode == 0, r.stderr
  return out


def checkpoint_steps(workdir):
  """The steps of the checkpoints in ``workdir/checkpoints`` (sorted; [] if none)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def main_cmd(workdir, data_dir, *overrides, config="configs/mse_1b6.py:tiny"):
  """``python -m lcm_jax.main`` training ``config`` on ``data_dir`` (no synthetic generation)."""
  return [sys.executable, "-m", "lcm_jax.main", f"--config={os.path.join(ROOT, config)}",
          f"--workdir={workdir}",
          f"--config.data.train={data_dir}", *overrides]



def perturbed_variables(variables, seed, scale=0.05):
  """Unboxed variables with every param jittered by ``scale * N(0, 1)`` (zero-initialised AdaLN
  modulators included, so every input path matters) and a non-trivial normalizer."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = nn.meta.unbox(variables["params"])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  dim = jax.tree.leaves(variables["buffers"])[0].shape[-1]
  rng = np.random.default_rng(seed)
  center = jnp.asarray(rng.normal(size=dim) * 0.3, jnp.float32)
  scale_ = jnp.asarray(rng.uniform(0.5, 2.0, size=dim), jnp.float32)
  buffers = jax.tree_util.tree_map_with_path(
      lambda p, x: center if p[-1].key == "center" else scale_, variables["buffers"])
  return {"params": jax.tree.unflatten(treedef, leaves), "buffers": buffers}
