r"""lcm_jax entry point: train (default) or describe a config.

  python -m lcm_jax.main                                     # tiny Base-LCM on a synthetic corpus
  python -m lcm_jax.main --config=configs/mse_1b6.py --mode=describe
  python -m lcm_jax.main --config=configs/mse_1b6.py:tiny --workdir=workdir/tiny \
      --config.optimizer.lr=1e-3 --config.train.num_steps=200

`--workdir` holds checkpoints (restored automatically on start), TensorBoard files (tb/) and
metrics.jsonl. Any config field can be overridden with --config.FIELD=VALUE.

Multi-process (one process per host, or several on one host): every process runs the same command
with the same --workdir (a shared path). On Cloud TPU, GKE TPU slices, SLURM and Open MPI nothing
else is needed; elsewhere (GPU clusters, localhost) set, per process,

  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0|1 python -m lcm_jax.main ...

(optionally JAX_LOCAL_DEVICE_IDS=0,1,2,3). See lcm_jax/distributed.py and launch/ (GKE, XManager).
Only process 0 logs progress and writes metrics; all processes save and restore checkpoints.
"""

from __future__ import annotations

import hashlib
import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "mse_1b6.py") + ":tiny"
SYNTHETIC_DOCS = 20_000  # ~440k concepts: the tiny model sees each document ~3 times in 600 steps

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file, optionally with ':variant' (e.g. configs/mse_1b6.py:tiny).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, TensorBoard files and metrics.jsonl go here (default: "
    "workdir/<config name>[_<variant>]).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "describe"],
                          "train: train (resuming from the workdir's latest checkpoint); "
                          "describe: print parameter count and FLOPs without allocating the model.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process start-up (lcm_jax/distributed.py). auto: from JAX_COORDINATOR_ADDRESS/"
    "JAX_NUM_PROCESSES/JAX_PROCESS_ID if set, else JAX's detection on Cloud TPU, GKE TPU, SLURM "
    "and Open MPI, else a single process; on: always call jax.distributed.initialize; off: never.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for the coordinator and every process at start-up "
    "before failing with an error (exit 2).")


def default_workdir(config_arg: str) -> str:
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdir", f"{name}_{variant}" if variant else name)


def _layers(cfg) -> str:
  if cfg.family == "two_tower_diffusion_lcm":
    return (f"{cfg.num_layers} contextualizer + {cfg.denoiser_num_layers} denoiser "
            f"(T={cfg.num_diffusion_train_steps}, {cfg.beta_schedule})")
  return str(cfg.num_layers)


def describe(config) -> str:
  """Parameter count and FLOPs per concept, from shapes only (``jax.eval_shape``)."""
  from lcm_jax.models import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from lcm_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_config(config.model)
  n = flops_lib.param_count(cfg)
  f = flops_lib.train_flops_per_concept(cfg, config.data.seq_len)
  lines = [
      f"model family          {cfg.family}",
      f"model_dim / layers    {cfg.model_dim} / {_layers(cfg)} ({cfg.num_heads} heads, "
      f"head_dim {cfg.head_dim})",
      f"SwiGLU inner dim      {cfg.swiglu_inner_dim} (ffn_inner_dim {cfg.ffn_inner_dim})",
      f"parameters            {n:,} ({n / 1e9:.4f} B; trainable, excluding the "
      f"2 x {cfg.sonar_embed_dim} normalizer buffers)",
      f"train FLOPs/concept   {f:.4e} (seq_len {config.data.seq_len}; fwd+bwd)",
      f"train FLOPs/step      {f * config.data.global_batch_size * config.data.seq_len:.4e} "
      f"(global batch {config.data.global_batch_size} x {config.data.seq_len} concepts)",
  ]
  return "\n".join(lines)


def _maybe_generate_data(config) -> None:
  """The embedded default trains on a synthetic corpus; generate it on first use."""
  if not config.data.get("generate_synthetic_if_missing", False):
    return
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  from lcm_jax.data import parse_dataset_spec  # pylint: disable=g-import-not-at-top
  train = config.data.train
  for ds in parse_dataset_spec(train) if isinstance(train, str) else train:
    synthetic.ensure_corpus(ds["path"], dim=config.model.sonar_embed_dim, seed=config.seed,
                            num_docs=SYNTHETIC_DOCS)


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of Orbax and friends (they log every save step by step)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        f"{os.sep}{lib}{os.sep}" in record.pathname for lib in _QUIET)


_QUIET = ("orbax", "grain", "jax", "etils", "tensorstore")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _MODE.value == "describe":
    print(describe(config))
    return 0

  from lcm_jax import distributed  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize().split("=", 1)[1])
  try:
    distributed.initialize(_DISTRIBUTED.value, _DISTRIBUTED_TIMEOUT.value)
    # Processes started with different configs would fail later in obscure ways.
    fingerprint = hashlib.sha1(f"{config.to_json()}\n{os.path.abspath(workdir)}".encode())
    distributed.agree("config+workdir fingerprint", fingerprint.hexdigest()[:16],
                      _DISTRIBUTED_TIMEOUT.value)
  except distributed.DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # progress and info lines come from process 0 only
  from lcm_jax import train  # pylint: disable=g-import-not-at-top  (keeps describe light)
  from lcm_jax.errors import USER_ERRORS  # pylint: disable=g-import-not-at-top
  logging.info("workdir: %s", os.path.abspath(workdir))
  logging.info("%s", distributed.describe_devices())
  try:
    _maybe_generate_data(config)
    metrics = train.train_and_evaluate(config, workdir)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if metrics:
    print("final eval: " + ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))
  return 0


def run() -> None:
  def _main(argv):
    sys.exit(main(argv))
  app.run(_main)


if __name__ == "__main__":
  run()
