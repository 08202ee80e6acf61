"""The training loop: mesh, sharded state, one jitted step, Grain data, Orbax checkpoints, metrics.

Reads top to bottom: build the mesh and the model -> abstract state and its shardings ->
restore the latest checkpoint (state + data iterator) or initialise directly sharded ->
loop { batch -> step -> metrics / eval / checkpoint } -> final checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import data as data_lib
from lcm_jax import errors
from lcm_jax import families
from lcm_jax import metrics as metrics_lib
from lcm_jax import sharding
from lcm_jax.models.config import ModelConfig
from lcm_jax.normalizer import Normalizer

State = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------
def lr_schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from ``warmup_init_lr`` to ``lr``, cosine to ``final_lr`` at ``decay_steps``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=opt.warmup_init_lr, peak_value=opt.lr, warmup_steps=opt.warmup_steps,
      decay_steps=max(opt.decay_steps, opt.warmup_steps + 1), end_value=opt.final_lr)


def make_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with weight decay on every parameter (as the reference) after global-norm clipping."""
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity(),
      optax.adamw(lr_schedule(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay))


# ----------------------------------------------------------------------------------------------
# Config checks: what the loop relies on, checked before anything is built or written
# ----------------------------------------------------------------------------------------------
def _check_number(config, field: str, *, lo: float, lo_open: bool = False, hi: float | None = None,
                  hi_open: bool = False, integer: bool = False) -> None:
  section, name = field.split(".")
  value = config[section][name]
  kind = "an integer" if integer else "a number"
  if isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int):
    raise errors.ConfigError(f"config.{field}: expected {kind}, got {value!r}")
  ok = np.isfinite(value) and (value > lo if lo_open else value >= lo)
  if hi is not None:
    ok = ok and (value < hi if hi_open else value <= hi)
  if not ok:
    bounds = f"{'>' if lo_open else '>='} {lo}" + (
        f" and {'<' if hi_open else '<='} {hi}" if hi is not None else "")
    raise errors.ConfigError(f"config.{field}: must be {bounds}, got {value!r}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`errors.ConfigError` naming the first ``config.train`` / ``config.optimizer``
  field the loop cannot run with (model, data and mesh fields are checked where they are used)."""
  for field in ("train.num_steps", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints", "optimizer.grad_accum_steps"):
    _check_number(config, field, lo=1, integer=True)
  for field in ("train.eval_every", "train.max_nonfinite_skips", "optimizer.warmup_steps",
                "optimizer.decay_steps"):
    _check_number(config, field, lo=0, integer=True)
  for field in ("optimizer.lr", "optimizer.final_lr", "optimizer.warmup_init_lr",
                "optimizer.weight_decay", "optimizer.grad_clip"):
    _check_number(config, field, lo=0)
  for field in ("optimizer.b1", "optimizer.b2"):
    _check_number(config, field, lo=0, hi=1, hi_open=True)
  _check_number(config, "optimizer.eps", lo=0, lo_open=True)
  if "profile_start_step" in config.train:
    _check_number(config, "train.profile_start_step", lo=-1, integer=True)  # -1 = off
    if config.train.profile_start_step >= 0:
      _check_number(config, "train.profile_num_steps", lo=1, integer=True)


# ----------------------------------------------------------------------------------------------
# State: created directly sharded from logical axis annotations
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  """Everything derived from the config that the loop, eval and tools need."""
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  family: families.Family
  model: nn.Module
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  abstract_state: State          # ShapeDtypeStructs with shardings
  state_shardings: State


def _boxed_init(model, model_cfg, tx, seq_len, seed):
  def init(rng):
    variables = model.init({"params": rng, "dropout": rng},
                           *families.init_inputs(model_cfg, seq_len), deterministic=True)
    params = variables["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "buffers": variables.get("buffers", {}), "opt_state": tx.init(params),
            "rng": jax.random.PRNGKey(seed)}
  return init


def setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
  model_cfg = families.model_config(config.model)
  family = families.of(model_cfg)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(config.data.global_batch_size, mesh, config.optimizer.grad_accum_steps)
  model = family.build(model_cfg)
  tx = make_optimizer(config.optimizer)
  init = _boxed_init(model, model_cfg, tx, config.data.seq_len, config.seed)
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  logical = nn.get_partition_spec(boxed)
  shardings = sharding.logical_to_sharding(logical, mesh)
  abstract = ckpt_lib.abstract_with_shardings(nn.unbox(boxed), shardings)
  return Setup(config, model_cfg, family, model, mesh, tx, abstract, shardings)


def init_state(s: Setup, normalizer: Normalizer | None = None) -> State:
  """Initialises params and optimizer state directly sharded (no host copy of the model)."""
  init = _boxed_init(s.model, s.model_cfg, s.tx, s.config.data.seq_len, s.config.seed)
  state = sharding.jit_under_mesh(lambda k: nn.unbox(init(k)), s.mesh,
                                  out_shardings=s.state_shardings)(jax.random.PRNGKey(s.config.seed))
  if normalizer is not None:
    state["buffers"] = set_frozen_buffers(state["buffers"], s.family.frozen_buffers(normalizer),
                                          s.state_shardings["buffers"])
  return state


def set_frozen_buffers(buffers, values: dict[str, np.ndarray], shardings):
  """Puts ``values[name]`` into every buffer leaf called ``name`` (the family's frozen buffers,
  e.g. the normalizer's ``center``/``scale``), placed with ``shardings``."""

  def put(path, leaf, shard):
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    if name not in values:
      return leaf
    v = np.asarray(values[name], np.float32)
    if v.shape != leaf.shape:
      raise errors.UserError(f"frozen buffer '{name}' (normalizer field) has shape {v.shape}, "
                             f"the model expects {leaf.shape} (config.model.sonar_embed_dim)")
    return jax.device_put(v, shard)
  return jax.tree_util.tree_map_with_path(put, buffers, shardings)


def load_pretrained(s: Setup, state: State, init_from: str) -> State:
  """Replaces ``params`` and ``buffers`` (the normalizer too) with those of another run.

  ``init_from`` is a workdir (its latest checkpoint) or ``WORKDIR@STEP``. The optimizer state,
  step counter and data iterator start fresh: this is how fine-tuning starts from pre-training.
  """
  path, _, step = init_from.partition("@")
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise ckpt_lib.CheckpointError(f"config.train.init_from: {path} has no checkpoints/ directory")
  src = ckpt_lib.Checkpointer(path, create=False, async_save=False)
  try:
    weights = src.restore_weights(int(step) if step else None,
                                  {"params": s.abstract_state["params"],
                                   "buffers": s.abstract_state["buffers"]})
  finally:
    src.close()
  logging.info("Initialised params and buffers from %s", init_from)
  return dict(state, params=weights["params"], buffers=weights["buffers"])


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------
def make_train_step(s: Setup):
  """One jitted step: grad of the loss SUM, divided once by the global target count.

  With ``grad_accum_steps = A`` the batch is split into A microbatches scanned with ``lax.scan``;
  loss and gradient sums are accumulated and divided by the total target count, so the result
  equals the single large batch (up to float summation order).
  """
  loss_fn = s.family.loss
  accum = s.config.optimizer.grad_accum_steps
  deterministic = s.model_cfg.dropout == 0.0
  schedule = lr_schedule(s.config.optimizer)

  def sums(params, buffers, batch, rng):
    loss_sum, count, _ = loss_fn(s.model, {"params": params, "buffers": buffers}, batch, rng=rng,
                                 deterministic=deterministic)
    return loss_sum, count

  grad_sums = jax.value_and_grad(sums, has_aux=True)

  def step(state: State, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state["rng"], state["step"])
    params, buffers = state["params"], state["buffers"]
    if accum == 1:
      (loss_sum, count), grads = grad_sums(params, buffers, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        (ls, c), g = grad_sums(params, buffers, mb, jax.random.fold_in(rng, i))
        acc_l, acc_c, acc_g = carry
        return (acc_l + ls, acc_c + c, jax.tree.map(jnp.add, acc_g, g)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (loss_sum, count, grads), _ = jax.lax.scan(
          body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros),
          (jnp.arange(accum), micro))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    # The non-finite guard: a step whose loss or gradient is NaN/inf applies no update (the
    # select fuses into the optimizer's elementwise update); the loop decides to skip or stop.
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    updates, opt_state = s.tx.update(grads, state["opt_state"], params)

    def keep_if_finite(new, old):
      return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = dict(state, step=state["step"] + 1,
                     params=keep_if_finite(optax.apply_updates(params, updates), params),
                     opt_state=keep_if_finite(opt_state, state["opt_state"]))
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "num_targets": count, "finite": finite}
    return new_state, metrics

  return sharding.jit_under_mesh(step, s.mesh,
                                 in_shardings=(s.state_shardings, sharding.batch_shardings(s.mesh)),
                                 out_shardings=(s.state_shardings, sharding.replicated(s.mesh)),
                                 donate_argnums=0)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class _Preemption:
  """Turns SIGTERM into a request to checkpoint and stop at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._prev = None

  def __enter__(self):
    try:
      self._prev = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._prev = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: checkpointing at the next step and stopping.")
    self.requested = True

  def __exit__(self, *exc):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def _fingerprint(batch: dict[str, np.ndarray]) -> str:
  h = hashlib.sha1()
  for k in sorted(batch):
    h.update(np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()[:16]


class Preempted(SystemExit):
  def __init__(self):
    super().__init__(143)


class TrainingDiverged(Exception):
  """A step had a non-finite loss or gradient (or the state a non-finite value) and no more bad
  batches may be skipped. Nothing from that step on was saved; the message names the last
  checkpoint, every value of which is finite. ``lcm_jax.main`` exits with :data:`exit_status`."""
  exit_status = errors.DIVERGED_EXIT


def _finite_leaves(tree):
  """Per-leaf ``all(isfinite)`` of the floating-point leaves (True for the others)."""
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.array(True), tree)


class _NonFiniteGuard:
  """Settles the steps' in-jit finiteness flags at log and checkpoint steps (no per-step host
  sync): skips up to ``config.train.max_nonfinite_skips`` bad batches in total (their updates were
  not applied), then raises :class:`TrainingDiverged`. Before every save it checks the whole
  state, so no checkpoint ever holds a NaN or inf."""

  def __init__(self, s: Setup, ckpt, writer, skipped: int):
    self.max_skips = int(s.config.train.max_nonfinite_skips)
    self.skipped = skipped
    self._ckpt, self._writer = ckpt, writer
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._finite_leaves = sharding.jit_under_mesh(_finite_leaves, s.mesh,
                                                  out_shardings=sharding.replicated(s.mesh))

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, metrics))

  def _diverged(self, what: str) -> TrainingDiverged:
    self._ckpt.wait()
    last = self._ckpt.latest_step()
    where = (f"the last checkpoint, {os.path.join(self._ckpt.directory, str(last))}, holds only "
             "finite values" if last is not None else "no checkpoint was saved")
    return TrainingDiverged(
        f"training diverged: {what}; stopped without saving it ({where}). Lower "
        "config.optimizer.lr or raise config.optimizer.warmup_steps, or let "
        "config.train.max_nonfinite_skips=N skip up to N bad batches")

  def settle(self) -> None:
    if not self._pending:
      return
    pending, self._pending = self._pending, []
    flags = jax.device_get([m["finite"] for _, m in pending])
    for (step, m), ok in zip(pending, flags):
      if ok:
        continue
      loss, grad_norm = (float(x) for x in jax.device_get((m["loss"], m["grad_norm"])))
      what = f"step {step} has loss {loss:.6g} and gradient norm {grad_norm:.6g}"
      if self.skipped >= self.max_skips:
        raise self._diverged(what)
      self.skipped += 1
      logging.warning("%s: its update was skipped (%d of config.train.max_nonfinite_skips=%d)",
                      what, self.skipped, self.max_skips)
      self._writer.write_scalars(step, {"train/nonfinite_skips": self.skipped})

  def check_state(self, step: int, state: State) -> None:
    flags = jax.device_get(self._finite_leaves(state))
    bad = [jax.tree_util.keystr(p) for p, ok in jax.tree_util.tree_flatten_with_path(flags)[0]
           if not ok]
    if bad:
      raise self._diverged(f"the state after step {step} holds non-finite values in "
                           f"{', '.join(bad[:3])}{f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''}")


def _agreed_time() -> int:
  """Process 0's wall clock in whole seconds, the same on every process (a collective: every
  process must call it at the same point)."""
  now = int(time.time())
  if jax.process_count() == 1:
    return now
  # Two int32 halves: without jax_enable_x64 a broadcast int64 would be truncated to int32.
  hi, lo = multihost_utils.broadcast_one_to_all(np.array(divmod(now, 1 << 16), np.int32))
  return int(hi) << 16 | int(lo)


class _ProfileWindow:
  """A ``jax.profiler`` trace of the steps ``first .. first + num_steps - 1`` (0-based step
  indices: step ``i`` starts from ``state["step"] == i``), ``config.train.profile_*``.

  The trace is written in the layout TensorBoard's profile plugin reads, one run directory shared
  by every process and one file per process::

      DIRECTORY/plugins/profile/<UTC time>_step<first>/<host>.xplane.pb       (one process)
      DIRECTORY/plugins/profile/<UTC time>_step<first>/<host>_process<i>.xplane.pb  (several)

  ``jax.profiler.stop_trace`` names its run directory after the time of the export and its file
  after the host, so processes sharing a host (or exporting in different seconds) would
  overwrite each other or scatter over several runs. Each process therefore traces into its own
  staging directory under DIRECTORY and then moves its files into the run directory, named with
  process 0's clock at the window's start (agreed with one collective). Every process calls
  :meth:`begin` and :meth:`end` at the same steps, as they run the same loop.

  Use as a context manager: a trace still running when the loop leaves (an error, preemption) is
  stopped on the way out without waiting for the device.
  """

  def __init__(self, directory: str, first: int, num_steps: int, *, start: int, total: int):
    self.directory = directory
    self.first, self.last = first, first + num_steps - 1
    self.enabled = first >= 0
    if self.enabled and not start <= first < total:
      where = (f"before the resume step {start}" if first < start
               else f"at or after config.train.num_steps={total}")
      logging.warning("config.train.profile_start_step=%d is %s: nothing is traced", first, where)
      self.enabled = False
    self.last = min(self.last, total - 1)  # a window past the end stops with the run
    self._staging: str | None = None
    self._run = ""

  def __enter__(self) -> "_ProfileWindow":
    return self

  def __exit__(self, *exc) -> None:
    if self._staging is None:
      return
    try:
      self._stop()
    except Exception:  # pylint: disable=broad-except  (the loop's own exception goes on)
      logging.exception("Could not stop the profiler trace of steps %d-%d", self.first, self.last)

  def begin(self, step: int) -> None:
    """Starts the trace if ``step`` (the step about to run) is the window's first."""
    if not self.enabled or step != self.first:
      return
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime(_agreed_time()))
    self._run = f"{stamp}_step{self.first}"
    os.makedirs(self.directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".staging-process{jax.process_index()}-",
                               dir=self.directory)
    try:
      jax.profiler.start_trace(staging)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
    self._staging = staging
    logging.info("Profiling steps %d-%d into %s", self.first, self.last, self.directory)

  def end(self, steps_done: int, outputs: Any) -> None:
    """Stops the trace once the window's last step (or the run's) has been dispatched, after
    waiting for ``outputs`` (that step's results) so that the trace holds its device work."""
    if self._staging is None or steps_done <= self.last:
      return
    jax.block_until_ready(outputs)
    self._stop()

  def _stop(self) -> None:
    staging, self._staging = self._staging, None
    try:
      jax.profiler.stop_trace()
      run_dir = os.path.join(self.directory, "plugins", "profile", self._run)
      os.makedirs(run_dir, exist_ok=True)
      moved = self._move(staging, run_dir)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    logging.info("Profile of steps %d-%d written to %s (%s)", self.first, self.last, run_dir,
                 ", ".join(moved) or "no files")

  @staticmethod
  def _move(staging: str, run_dir: str) -> list[str]:
    """Moves the exported files (``<host>.xplane.pb``, ``<host>.trace.json.gz``, ...) from
    ``staging`` into ``run_dir``; with several processes the host becomes ``<host>_process<i>``.
    Returns the new names."""
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(staging)
                   for name in names)
    suffix = ".xplane.pb"
    hosts = [os.path.basename(p)[:-len(suffix)] for p in paths if p.endswith(suffix)]
    moved = []
    for path in paths:
      name = os.path.basename(path)
      if jax.process_count() > 1 and hosts and name.startswith(hosts[0] + "."):
        name = f"{hosts[0]}_process{jax.process_index()}{name[len(hosts[0]):]}"
      os.replace(path, os.path.join(run_dir, name))
      moved.append(name)
    return moved


# The periodic evaluation the trainer runs: built once from the Setup, then called as
# ``evaluate(state, num_batches) -> flat metrics``. lcm_jax.evaluate.periodic is the standard one.
EvaluatorFactory = Callable[[Setup], Callable[[State, int], dict[str, float]]]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       make_evaluator: EvaluatorFactory | None = None) -> dict[str, float]:
  """Trains until ``config.train.num_steps``, resuming from the latest checkpoint in ``workdir``.

  Every ``config.train.eval_every`` steps and at the end, ``make_evaluator(setup)``'s function
  evaluates the state (``lcm_jax.main`` passes :func:`lcm_jax.evaluate.periodic`; None: no
  evaluation). Returns the final eval metrics.
  """
  check_config(config)
  s = setup(config)
  train_iter = data_lib.make_train_iterator(config)  # validates datasets against the model dim
  normalizer_path = data_lib.resolve_normalizer_path(config)
  normalizer = Normalizer.load(normalizer_path)
  if normalizer.center.shape != (s.model_cfg.sonar_embed_dim,):
    raise errors.UserError(f"{normalizer_path}: field 'center': shape {normalizer.center.shape}, the "
                     f"model expects ({s.model_cfg.sonar_embed_dim},) (config.model.sonar_embed_dim)")
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                               async_save=config.train.async_checkpoint)
  writer = metrics_lib.MetricWriter(workdir)
  try:
    latest = ckpt.latest_step()
    skipped = 0
    if latest is not None:
      ckpt.check_model_config(latest, json.loads(config.model.to_json()))
      logging.info("Restoring checkpoint %d from %s", latest, ckpt.directory)
      state, saved_meta = ckpt.restore(latest, s.abstract_state, train_iter)
      skipped = int((saved_meta or {}).get("nonfinite_skips", 0))
    else:
      state = init_state(s, normalizer)
      init_from = config.train.get("init_from", "")
      if init_from:
        state = load_pretrained(s, state, init_from)
      writer.write_hparams(dict(_flatten(config.to_dict())))
    start = int(state["step"])
    meta = {"config": config.to_json(), "mesh": dict(s.mesh.shape), "normalizer": normalizer_path}
    guard = _NonFiniteGuard(s, ckpt, writer, skipped)
    evaluate = make_evaluator(s) if make_evaluator is not None and config.train.eval_every else None
    return _loop(s, state, start, train_iter, ckpt, writer, meta, guard, evaluate,
                 os.path.join(workdir, "profile"))
  finally:
    ckpt.close()
    writer.close()


def _loop(s: Setup, state: State, start: int, train_iter: Iterator, ckpt, writer, meta,
          guard: _NonFiniteGuard, evaluate, profile_dir: str):
  cfg = s.config
  total = cfg.train.num_steps
  profile = _ProfileWindow(profile_dir, cfg.train.get("profile_start_step", -1),
                           cfg.train.get("profile_num_steps", 5), start=start, total=total)
  train_step = make_train_step(s)
  flops_per_concept = s.family.train_flops_per_concept(s.model_cfg, cfg.data.seq_len)
  concepts_per_step = cfg.data.global_batch_size * cfg.data.seq_len
  peak = metrics_lib.peak_flops_per_device(cfg.train.peak_flops) * jax.device_count()
  progress = metrics_lib.Progress(total, start)
  eval_metrics: dict[str, float] = {}
  t_last, steps_since, real_concepts = time.time(), 0, 0.0
  with _Preemption() as preempt, profile:
    step = start
    while step < total:
      profile.begin(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(train_iter)
        if cfg.train.log_batch_fingerprints:
          writer.write_scalars(step,
                               {"batch_fingerprint": int(_fingerprint(batch), 16) % (2**52)})
        real_concepts += float((batch["segment_ids"] > 0).sum()) * jax.process_count()
        state, m = train_step(state, sharding.global_batch_from_local(batch, s.mesh))
      step += 1
      profile.end(step, (state, m))
      steps_since += 1
      guard.add(step, m)
      if step % cfg.train.log_every == 0 or step == total:
        guard.settle()
        m = jax.device_get(m)
        dt = (time.time() - t_last) / steps_since
        scalars = {"train/loss": m["loss"], "train/grad_norm": m["grad_norm"], "train/lr": m["lr"],
                   "perf/step_time_s": dt, "perf/concepts_per_s": real_concepts / steps_since / dt,
                   "perf/model_flops_per_s": flops_per_concept * concepts_per_step / dt}
        if peak > 0:
          scalars["perf/mfu"] = flops_per_concept * concepts_per_step / dt / peak
        writer.write_scalars(step, scalars)
        if jax.process_index() == 0:
          logging.info("%s", progress.line(step, float(m["loss"])))
        t_last, steps_since, real_concepts = time.time(), 0, 0.0
      if evaluate is not None and (step % cfg.train.eval_every == 0 or step == total):
        eval_metrics = evaluate(state, cfg.train.eval_batches)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()}, console=True)
        t_last = time.time()
      stop = preempt.any_process()
      if step % cfg.train.checkpoint_every == 0 or step == total or stop:
        guard.settle()
        guard.check_state(step, state)
        ckpt.save(step, state, train_iter, dict(meta, nonfinite_skips=guard.skipped),
                  force=stop or step == total)
      if stop:
        ckpt.wait()
        writer.flush()
        raise Preempted()
  writer.flush()
  return eval_metrics


def _flatten(d: dict, prefix: str = ""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v
