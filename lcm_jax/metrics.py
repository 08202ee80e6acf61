"""Metric writers: console, TensorBoard event files and a JSONL log, written by process 0 only.

The interface follows clu's ``MetricWriter`` (``write_scalars``, ``write_hparams``, ``flush``,
``close``). clu 0.0.12's own ``clu.metric_writers`` package imports TensorFlow at import time,
which the JAX core does not depend on, so the TensorBoard files are written with tensorboardX.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

# Dense peak FLOP/s per device (bf16 where the device has it). Override with config.train.peak_flops.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    # CPU: no meaningful peak; MFU is reported against the configured value only.
}


def peak_flops_per_device(override: float = 0.0) -> float:
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind
  for name, value in PEAK_FLOPS.items():
    if kind.startswith(name):
      return value
  return 0.0


def _scalar(v: Any) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Writes to the console, ``WORKDIR/tb`` (TensorBoard) and ``WORKDIR/metrics.jsonl``.

  On processes other than 0 every method is a no-op: one process owns the logs.
  """

  def __init__(self, workdir: str | None, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled and workdir:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *, console: bool = False) -> None:
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in scalars.items()}
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, global_step=step)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
    if console:
      logging.info("[%d] %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(values.items())))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")
    if self._tb is not None:
      self._tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items())), 0)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


class Progress:
  """A progress line with step rate and ETA, printed by process 0."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self.start_step = start_step
    self.t0 = time.time()

  def line(self, step: int, loss: float) -> str:
    done = step - self.start_step
    elapsed = time.time() - self.t0
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
    return (f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%) loss {loss:.4f} "
            f"| {rate:.2f} steps/s | ETA {eta_s}")
