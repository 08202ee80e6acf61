"""Pieces shared by the benchmark scripts (train_step.py, generate.py).

* :func:`load_config`: ``FILE[:VARIANT]`` plus ``FIELD=VALUE`` overrides, on a one-device mesh;
* :func:`time_call` / :func:`interleaved_rounds`: wall-clock timing with ``block_until_ready``,
  the model and the matmul reference alternating round by round so machine noise hits both;
* :class:`MatmulReference`: the plain matmul whose FLOP/s every benchmark is a ratio to;
* :func:`peak_flops` / :func:`environment` / :func:`write_json`: the chip's dense peak for MFU,
  the device and versions, and the ``--json`` files the scripts write (benchmarks/device_check.sh
  reads them).

Imported with the repository root on ``sys.path`` (the scripts put it there), as
``from benchmarks import common``. JAX is imported inside the functions so that ``--help`` stays
fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_config(spec: str, overrides: Sequence[str] = ()) -> Any:
  """The config of ``FILE[:VARIANT]`` with ``FIELD=VALUE`` overrides, on one device.

  An override's value is parsed with ``eval`` and converted to the field's current type (string
  fields take the text as is); ``FIELD`` is a dotted path (``model.scan_layers``). A field the
  config does not have is an error (exit with one line naming it), never silently added. The mesh
  is set to 1 x 1 x 1: the benchmarks run on the first device only.
  """
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise SystemExit(f"error: --config: {path} does not exist")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  for item in overrides:
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise SystemExit(f"error: --set {item}: {spec} has no config field {key!r}")
      node = node[p]
    if leaf not in node:
      raise SystemExit(f"error: --set {item}: {spec} has no config field {key!r}")
    if isinstance(node[leaf], str):
      node[leaf] = value
    else:
      node[leaf] = type(node[leaf])(eval(value))  # pylint: disable=eval-used
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  return config


def dtype_name(model_cfg: Any) -> str:
  """The model's compute dtype as text (``float32``, ``bfloat16``)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.dtype(model_cfg.compute_dtype()).name


def describe_model(model_cfg: Any) -> str:
  """``<family> d=.. layers=<the family's layers line> heads=.. ffn=..``."""
  from lcm_jax import families  # pylint: disable=g-import-not-at-top  (benchmark start-up)
  layers = families.of(model_cfg).describe_layers(model_cfg)
  return (f"{model_cfg.family} d={model_cfg.model_dim} layers={layers} "
          f"heads={model_cfg.num_heads} ffn={model_cfg.swiglu_inner_dim}")


def device_line(model_cfg: Any) -> str:
  """``<device kind> (<backend>), compute dtype <dtype>`` of the first device."""
  import jax  # pylint: disable=g-import-not-at-top
  return (f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"compute dtype {dtype_name(model_cfg)}")


def time_call(fn: Callable[[], Any], iters: int, warmup: bool = True) -> float:
  """Seconds per call of ``fn`` over ``iters`` back-to-back calls, blocking on the last result.

  With ``warmup`` one extra call runs (and is waited for) before the timed window.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if warmup:
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  out = None
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


class MatmulReference:
  """``(rows x d) @ (d x d)`` and ``(rows x d) @ (d x ffn)`` in the model's compute dtype.

  ``d`` = ``model_dim`` and ``ffn`` = ``swiglu_inner_dim`` of ``model_cfg``: the two matmul
  shapes a transformer layer of that size runs on ``rows`` positions. One jitted call computes
  both products (and a cheap sum of each, so nothing is dead code); :attr:`flops` counts only
  the products, ``2 * rows * d * (d + ffn)``. Compiled (and run once) on construction.
  """

  def __init__(self, model_cfg: Any, rows: int, rng: Optional[Any] = None):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0) if rng is None else rng
    dm, ffn = model_cfg.model_dim, model_cfg.swiglu_inner_dim
    dtype = model_cfg.compute_dtype()
    self.rows, self.dim, self.ffn = rows, dm, ffn
    self.x = jnp.asarray(rng.standard_normal((rows, dm), dtype=np.float32)).astype(dtype)
    self.w1 = jnp.asarray(rng.standard_normal((dm, dm), dtype=np.float32)).astype(dtype)
    self.w2 = jnp.asarray(rng.standard_normal((dm, ffn), dtype=np.float32)).astype(dtype)
    self.flops = 2 * rows * dm * (dm + ffn)
    self._fn = jax.jit(lambda x, w1, w2: (x @ w1).sum() + (x @ w2).sum())
    jax.block_until_ready(self())

  def __call__(self) -> Any:
    return self._fn(self.x, self.w1, self.w2)

  def shape_text(self) -> str:
    """``(R x d) @ (d x d) + (R x d) @ (d x ffn)`` with the numbers filled in."""
    r, d, f = self.rows, self.dim, self.ffn
    return f"({r} x {d}) @ ({d} x {d}) + ({r} x {d}) @ ({d} x {f})"


def interleaved_rounds(rounds: int, model_fn: Callable[[], Any], model_iters: int,
                       matmul: MatmulReference, matmul_iters: int,
                       model_warmup: bool = True) -> tuple[list[float], list[float]]:
  """``rounds`` x (time ``matmul_iters`` matmuls, then ``model_iters`` model calls).

  Returns ``(model_seconds, matmul_seconds)``, per call, one entry per round. The matmul keeps
  its per-round warm-up call; ``model_warmup=False`` skips the model's (for long calls that were
  already compiled and run once).
  """
  model_times, mm_times = [], []
  for _ in range(rounds):
    mm_times.append(time_call(matmul, matmul_iters))
    model_times.append(time_call(model_fn, model_iters, warmup=model_warmup))
  return model_times, mm_times


def ratio_range(model_flops: float, model_times: Sequence[float], matmul_flops: float,
                matmul_times: Sequence[float]) -> tuple[float, float]:
  """(min, max) over rounds of (model FLOP/s) / (matmul FLOP/s) within the same round."""
  ratios = sorted((model_flops / a) / (matmul_flops / b)
                  for a, b in zip(model_times, matmul_times))
  return ratios[0], ratios[-1]


def peak_flops(override_tflops: float = 0.0, config_peak_flops: float = 0.0) -> tuple[float, str]:
  """``(peak FLOP/s, where it came from)`` of the first device, for MFU; ``(0.0, why)`` if unknown.

  In order: ``override_tflops`` (a ``--peak_tflops`` flag), ``config_peak_flops`` (the config's
  ``train.peak_flops``), then the dense (bf16 where the chip has it) peak of
  ``lcm_jax.metrics.PEAK_FLOPS`` whose name the device kind starts with.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from lcm_jax import metrics  # pylint: disable=g-import-not-at-top
  if override_tflops > 0:
    return override_tflops * 1e12, "--peak_tflops"
  if config_peak_flops > 0:
    return float(config_peak_flops), "config train.peak_flops"
  kind = jax.devices()[0].device_kind
  for name, value in metrics.PEAK_FLOPS.items():
    if kind.startswith(name):
      return float(value), f"lcm_jax.metrics.PEAK_FLOPS[{name!r}], dense bf16"
  return 0.0, f"no peak known for device kind {kind!r} (pass --peak_tflops)"


def environment() -> dict[str, Any]:
  """The devices, backend, first device kind and the JAX / jaxlib / Python versions."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"devices": str(jax.devices()), "device_count": jax.device_count(),
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
          "python_version": sys.version.split()[0]}


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON to ``path`` (through a temporary file, then renamed)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)
