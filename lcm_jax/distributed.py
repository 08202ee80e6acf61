"""Multi-process start-up: ``jax.distributed`` from the environment, or nothing for one process.

How a run finds its peers (``--distributed=auto``, the default of ``lcm_jax.main``):

* **explicit**: if any of ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES`` or
  ``JAX_PROCESS_ID`` is set, all three must be, and ``JAX_LOCAL_DEVICE_IDS`` (``0,1,...``) may be.
  This is how GPU clusters (our GKE JobSets: the coordinator is the first pod's DNS name, the id its
  completion index) and the local multi-process test start;
* **detected**: on Cloud TPU VMs and GKE TPU slices, under SLURM and under Open MPI, JAX's own
  cluster detection supplies everything (no variables needed);
* **single process** otherwise: nothing is initialised.

``--distributed=on`` always calls ``jax.distributed.initialize`` (also JAX's Kubernetes and mpi4py
detection, which ``auto`` leaves out because they would fire in any pod or wherever mpi4py is
installed); ``off`` never does.

Every start-up is bounded by ``timeout_s``: a coordinator that cannot be reached, or peers that do
not all arrive, end the run with one error that names the address and the variables, not a hang.
After start-up the process count JAX reports is checked against ``JAX_NUM_PROCESSES``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
from typing import Mapping, Sequence

from absl import logging

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
_EXPLICIT = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
MODES = ("auto", "on", "off")
_JAX_GRACE_S = 30  # JAX's own deadline is later than ours, so ours fires first
EXIT_CODE = 2


class DistributedError(RuntimeError):
  """Multi-process start-up failed or the environment is inconsistent (a user error)."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """What :func:`initialize` will do. ``kind``: single | explicit | detected."""
  kind: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def _int(env: Mapping[str, str], name: str, minimum: int) -> int:
  raw = env[name].strip()
  try:
    value = int(raw)
  except ValueError:
    raise DistributedError(f"{name}={raw!r} is not an integer") from None
  if value < minimum:
    raise DistributedError(f"{name}={value} must be >= {minimum}")
  return value


def _detected_cluster() -> str | None:
  """Name of the cluster JAX would detect (TPU VM / GKE TPU / SLURM / Open MPI), else None."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  (no public API for this)
  wanted = ("GkeTpuCluster", "GceTpuCluster", "SlurmCluster", "OmpiCluster")
  for cluster in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if cluster.__name__ in wanted:
      try:
        if cluster.is_env_present():
          return cluster.__name__
      except Exception:  # pylint: disable=broad-except  (a metadata query that fails = absent)
        continue
  return None


def resolve(mode: str = "auto", env: Mapping[str, str] | None = None) -> Spec:
  """Reads the environment into a :class:`Spec`; DistributedError if it is inconsistent."""
  env = os.environ if env is None else env
  if mode not in MODES:
    raise DistributedError(f"--distributed={mode!r}: expected one of {', '.join(MODES)}")
  if mode == "off":
    return Spec("single")
  present = [n for n in _EXPLICIT if env.get(n, "").strip()]
  if present:
    missing = [n for n in _EXPLICIT if n not in present]
    if missing:
      raise DistributedError(f"{', '.join(present)} set but {', '.join(missing)} not: a "
                             f"multi-process run needs all of {', '.join(_EXPLICIT)}")
    coordinator = env[ENV_COORDINATOR].strip()
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise DistributedError(f"{ENV_COORDINATOR}={coordinator!r}: expected host:port")
    num = _int(env, ENV_NUM_PROCESSES, 1)
    pid = _int(env, ENV_PROCESS_ID, 0)
    if pid >= num:
      raise DistributedError(f"{ENV_PROCESS_ID}={pid} is out of range for "
                             f"{ENV_NUM_PROCESSES}={num} (ids are 0..{num - 1})")
    local = None
    if env.get(ENV_LOCAL_DEVICE_IDS, "").strip():
      raw = env[ENV_LOCAL_DEVICE_IDS]
      try:
        local = tuple(int(x) for x in raw.split(","))
      except ValueError:
        raise DistributedError(f"{ENV_LOCAL_DEVICE_IDS}={raw!r}: expected comma-separated "
                               "integers, e.g. 0,1,2,3") from None
    return Spec("explicit", coordinator, num, pid, local)
  if mode == "on" or _detected_cluster():
    return Spec("detected")
  return Spec("single")


def initialize(mode: str = "auto", timeout_s: int = 300,
               env: Mapping[str, str] | None = None) -> Spec:
  """Starts ``jax.distributed`` as :func:`resolve` says (a no-op for a single process).

  Must run before anything touches a JAX backend. Raises DistributedError when the environment
  is inconsistent or start-up fails. A start-up that does not complete within ``timeout_s`` (an
  unreachable coordinator, a missing peer) prints one ``error: ...`` line naming the address and
  the variables and exits the process with status 2: JAX itself would abort there.
  """
  if timeout_s <= 0:
    raise DistributedError(f"--distributed_timeout={timeout_s}: must be > 0 seconds")
  spec = resolve(mode, env)
  if spec.kind == "single":
    return spec
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if spec.kind == "explicit":
    kwargs = dict(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                  process_id=spec.process_id, local_device_ids=spec.local_device_ids)
  where = (f"coordinator {spec.coordinator} as process {spec.process_id} of {spec.num_processes} "
           f"({', '.join(_EXPLICIT)})" if spec.kind == "explicit" else "JAX's cluster detection")
  logging.info("jax.distributed: starting with %s (timeout %d s)", where, timeout_s)
  # JAX aborts the whole process (a C++ CHECK) when start-up misses its deadline, which no Python
  # handler can catch. A watchdog with a slightly shorter deadline reports it clearly instead.
  done = threading.Event()
  watchdog = threading.Thread(target=_watchdog, args=(done, timeout_s, spec, where), daemon=True)
  watchdog.start()
  try:
    jax.distributed.initialize(initialization_timeout=int(timeout_s) + _JAX_GRACE_S, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError, ValueError, ...)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(f"jax.distributed start-up failed with {where}: {first[:300]}") from None
  finally:
    done.set()
  if spec.kind == "explicit":
    agree(ENV_NUM_PROCESSES, str(spec.num_processes), timeout_s, publish_only=True)
    if jax.process_count() != spec.num_processes:
      raise DistributedError(f"{ENV_NUM_PROCESSES}={spec.num_processes} but the coordinator "
                             f"formed a job of {jax.process_count()} processes: every process "
                             "must be given the same count")
    agree(ENV_NUM_PROCESSES, str(spec.num_processes), timeout_s)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return spec


def agree(name: str, value: str, timeout_s: int = 300, *, publish_only: bool = False) -> None:
  """Checks that every process holds the same ``value`` for ``name`` (e.g. the config).

  Each process publishes its value in the coordination service's key-value store, then compares
  those of all processes with its own: a mismatch is a DistributedError on every process that
  sees it, naming the processes and values, instead of a collective that hangs or crashes later.
  A no-op for a single process. ``publish_only``: publish and return (the caller fails first).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  key = f"lcm_jax/agree/{name}"
  me = jax.process_index()
  if not _has_key(client, f"{key}/{me}"):  # publish_only may have published it already
    client.key_value_set(f"{key}/{me}", value)
  if publish_only:
    return
  for other in range(jax.process_count()):
    if other == me:
      continue
    try:
      theirs = client.blocking_key_value_get(f"{key}/{other}", int(timeout_s * 1000))
    except Exception:  # pylint: disable=broad-except
      raise DistributedError(f"process {other} did not report its {name} within "
                             f"{timeout_s}s (did it fail at start-up? see its log)") from None
    if theirs != value:
      short = lambda v: v if len(v) <= 80 else v[:77] + "..."  # pylint: disable=unnecessary-lambda-assignment
      raise DistributedError(f"process {other} has {name}={short(theirs)}, process {me} has "
                             f"{name}={short(value)}: every process must be started with the same "
                             f"{name}")


def _has_key(client, key: str) -> bool:
  try:
    client.key_value_try_get(key)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
      return True
  except OSError:
    return False


def timeout_message(spec: Spec, where: str, timeout_s: int) -> str:
  """The one-line error for a start-up that did not complete within ``timeout_s``."""
  if spec.kind != "explicit":
    cause = "the cluster's processes did not all start"
  elif spec.process_id != 0 and not _reachable(spec.coordinator):
    cause = (f"the coordinator {spec.coordinator} cannot be reached (is process 0 running, and "
             "is the host:port right and open?)")
  else:
    cause = (f"not all {spec.num_processes} processes registered with the coordinator: every "
             f"process needs the same {ENV_COORDINATOR} and {ENV_NUM_PROCESSES} and a distinct "
             f"{ENV_PROCESS_ID} in 0..{spec.num_processes - 1}")
  return (f"jax.distributed start-up with {where} did not complete within "
          f"--distributed_timeout={timeout_s}s: {cause}")


def _watchdog(done: threading.Event, timeout_s: int, spec: Spec, where: str) -> None:
  if done.wait(timeout_s):
    return
  print(f"error: {timeout_message(spec, where, timeout_s)}", file=sys.stderr, flush=True)
  os._exit(EXIT_CODE)  # pylint: disable=protected-access  (the main thread is stuck in C++)


def describe_devices(devices: Sequence[object] | None = None) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices() if devices is None else devices
  return (f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, "
          f"{len(devices)} global {devices[0].platform} devices")
