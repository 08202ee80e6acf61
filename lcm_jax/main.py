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

Exit status: 0 done; 2 bad input (one `error:` line naming the flag, file or field); 3 training
diverged (a non-finite loss or gradient; every checkpoint left is finite); 143 preempted (SIGTERM,
checkpointed). Anything else is a bug and prints its traceback.
"""

from __future__ import annotations

import hashlib
import logging as logging_std
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from lcm_jax import distributed
from lcm_jax import errors
from lcm_jax import evaluate
from lcm_jax import families
from lcm_jax import fileio
from lcm_jax import synthetic
from lcm_jax import train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "mse_1b6.py") + ":tiny"
SYNTHETIC_DOCS = 20_000  # ~440k concepts: the tiny model sees each document ~3 times in 600 steps

_F: dict[str, flags.FlagHolder] = {}  # the flags, defined by define_flags()


def define_flags() -> None:
  """Defines the entry point's flags (the config flag parses its ``--config.*`` overrides here)."""
  _F["config"] = config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG,
      "Config file, optionally with ':variant' (e.g. configs/mse_1b6.py:tiny).", lock_config=True)
  _F["workdir"] = flags.DEFINE_string(
      "workdir", None, "Checkpoints, TensorBoard files and metrics.jsonl go here (default: "
      "workdir/<config name>[_<variant>]).")
  _F["mode"] = flags.DEFINE_enum(
      "mode", "train", ["train", "describe"],
      "train: train (resuming from the workdir's latest checkpoint); describe: print parameter "
      "count and FLOPs without allocating the model.")
  _F["distributed"] = flags.DEFINE_enum(
      "distributed", "auto", ["auto", "on", "off"],
      "Multi-process start-up (lcm_jax/distributed.py). auto: from JAX_COORDINATOR_ADDRESS/"
      "JAX_NUM_PROCESSES/JAX_PROCESS_ID if set, else JAX's detection on Cloud TPU, GKE TPU, SLURM "
      "and Open MPI, else a single process; on: always call jax.distributed.initialize; off: never.")
  _F["distributed_timeout"] = flags.DEFINE_integer(
      "distributed_timeout", 300, "Seconds to wait for the coordinator and every process at "
      "start-up before failing with an error (exit 2).")


def default_workdir(config_arg: str) -> str:
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdir", f"{name}_{variant}" if variant else name)


def describe(config) -> str:
  """Parameter count and FLOPs per concept, from shapes only (``jax.eval_shape``)."""
  cfg = families.model_config(config.model)
  family = families.of(cfg)
  n = families.param_count(cfg)
  f = family.train_flops_per_concept(cfg, config.data.seq_len)
  lines = [
      f"model family          {cfg.family} ({family.title})",
      f"model_dim / layers    {cfg.model_dim} / {family.describe_layers(cfg)} ({cfg.num_heads} "
      f"heads, head_dim {cfg.head_dim})",
      f"SwiGLU inner dim      {cfg.swiglu_inner_dim} (ffn_inner_dim {cfg.ffn_inner_dim})",
      f"parameters            {n:,} ({n / 1e9:.4f} B; trainable, excluding the "
      f"2 x {cfg.sonar_embed_dim} normalizer buffers)",
      f"train FLOPs/concept   {f:.4e} (seq_len {config.data.seq_len}; fwd+bwd)",
      f"train FLOPs/step      {f * config.data.global_batch_size * config.data.seq_len:.4e} "
      f"(global batch {config.data.global_batch_size} x {config.data.seq_len} concepts)",
  ]
  return "\n".join(lines)


def _maybe_generate_data(config) -> None:
  """The embedded default trains on a synthetic corpus: generate it on first use, and only at the
  recipe's own path (``config.data.synthetic_corpus``), never into a path the user named."""
  corpus = config.data.get("synthetic_corpus", "")
  if not corpus or config.data.train != corpus:
    return
  synthetic.ensure_corpus(corpus, dim=config.model.sonar_embed_dim, seed=config.seed,
                          num_docs=SYNTHETIC_DOCS)


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of Orbax and friends (they log every save step by step)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        f"{os.sep}{lib}{os.sep}" in record.pathname for lib in _QUIET)


_QUIET = ("orbax", "grain", "jax", "etils", "tensorstore")


def _config_arg() -> str:
  return flags.FLAGS["config"].serialize().split("=", 1)[1]


def _load_config():
  """The parsed config, or :class:`errors.ConfigError` if its file could not be loaded."""
  path = _config_arg().partition(":")[0]
  if not os.path.isfile(path):
    raise errors.ConfigError(f"--config: no such config file: {path}")
  try:
    config = _F["config"].value
    config.to_json()  # a config that failed to load raises on first access
  except OSError as e:
    raise errors.ConfigError(f"--config: cannot load {path}: {str(e).splitlines()[-1].strip()}") \
        from None
  return config


def main(argv) -> int:
  if len(argv) > 1:
    return errors.report(f"unexpected arguments {argv[1:]} (flags are --name=value)")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    config = _load_config()
    if _F["mode"].value == "describe":
      print(describe(config))
      return 0
    workdir = _F["workdir"].value or default_workdir(_config_arg())
    fileio.check_output_dir(workdir, "--workdir")
  except errors.USER_ERRORS as e:
    return errors.report(e)

  try:
    distributed.initialize(_F["distributed"].value, _F["distributed_timeout"].value)
    # Processes started with different configs would fail later in obscure ways.
    fingerprint = hashlib.sha1(f"{config.to_json()}\n{os.path.abspath(workdir)}".encode())
    distributed.agree("config+workdir fingerprint", fingerprint.hexdigest()[:16],
                      _F["distributed_timeout"].value)
  except distributed.DistributedError as e:
    return errors.report(e)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # progress and info lines come from process 0 only
  logging.info("workdir: %s", os.path.abspath(workdir))
  logging.info("%s", distributed.describe_devices())
  try:
    train.check_config(config)
    _maybe_generate_data(config)
    metrics = train.train_and_evaluate(config, workdir, evaluate.periodic)
  except errors.USER_ERRORS as e:
    return errors.report(e)
  except train.TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_status
  if metrics:
    print("final eval: " + ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))
  return 0


def _is_unknown_override(e: BaseException) -> bool:
  """Whether ``e`` is ml_collections failing to find an overridden field's type (not a bug)."""
  if not isinstance(e, (AttributeError, KeyError)):
    return False
  frames = traceback.extract_tb(e.__traceback__)
  return any(f.filename.endswith(os.path.join("config_flags", "config_path.py")) for f in frames)


def _unknown_override(e: Exception) -> str:
  """The message for a ``--config.a.b=...`` override of a field the config does not have."""
  inner = e.args[0] if e.args and isinstance(e.args[0], Exception) else e
  text = inner.args[0] if inner.args else str(inner)
  first, _, hint = str(text).partition("\n")
  key = first.strip("'\"\\ ")
  overrides = [a.split("=", 1)[0].lstrip("-") for a in sys.argv[1:] if a.startswith("--config.")]
  named = [o for o in overrides if key in o.split(".")] or overrides
  return (f"--{named[0] if named else 'config'}: the config has no field {key!r}"
          + (f" ({hint.strip()})" if hint.strip() else "")
          + " (the recipe in configs/ and configs/base.py list the fields)")


def parse_flags(argv: list[str]) -> list[str]:
  """Like :func:`errors.parse_absl_flags` (help exits 0, a bad flag is one line), plus the config
  flag's failures: an override of an unknown field and a ``ConfigError`` from the config file are
  one line (exit 2); any other exception raised by the config file is a bug in it and prints its
  traceback (exit 1)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    if not _is_unknown_override(e):
      raise
    sys.exit(errors.report(_unknown_override(e)))
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:  # the config file's get_config raised
      last = [line for line in text.splitlines() if line.strip()][-1]
      kind, _, message = last.partition(": ")
      if kind.rsplit(".", 1)[-1] == errors.ConfigError.__name__:
        sys.exit(errors.report(message))
      print(text, file=sys.stderr)
      sys.exit(1)
    sys.exit(errors.report(text.splitlines()[0]))
  except SystemExit:  # absl's --help prints the usage and exits 1
    if errors.asks_for_help(argv):
      sys.exit(0)
    raise


def _check_config_file(argv: list[str]) -> None:
  """A missing ``--config`` file: config_flags would fail on the first override with a trace."""
  values = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  for i, a in enumerate(argv[1:-1], start=1):
    if a == "--config":
      values.append(argv[i + 1])
  if values and not os.path.isfile(values[-1].partition(":")[0]):
    raise errors.ConfigError(f"--config: no such config file: {values[-1].partition(':')[0]}")


def run() -> None:
  try:
    _check_config_file(sys.argv)
  except errors.ConfigError as e:
    sys.exit(errors.report(e))
  try:
    define_flags()
  except (AttributeError, KeyError) as e:  # config_flags looks up override types at definition
    if not _is_unknown_override(e):
      raise
    sys.exit(errors.report(_unknown_override(e)))

  def _main(argv):
    sys.exit(main(argv))
  app.run(_main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
