r"""XManager launcher: one training run, or a sweep over config overrides (one work unit per point).

Runs in its own small environment (XManager pins protobuf < 7, the project needs protobuf 7):

  python3.11 -m venv .xmvenv && .xmvenv/bin/pip install -r launch/requirements-xm.txt

Importing this file loads neither JAX, lcm_jax nor XManager (XManager and the standard-library-only
lcm_jax.fileio are imported when used): it only builds command lines. Every work unit runs

  python -m lcm_jax.main --config=CONFIG --workdir=ROOT/NAME/WID [--config.KEY=VALUE ...]

Executors (``--executor``):

* ``local``: XManager's local executor runs the command as a local process (``xm.Binary``, no
  Docker) with ``--python`` (default ``.venv/bin/python``) in the repository root, with the
  launcher's environment plus ``--env``. All work units run at once; the launcher waits for them
  and exits with a non-zero status if one failed.
* ``kubernetes``: XManager's Kubernetes executor (one pod per work unit, ``kubectl``'s current
  context) running ``--image`` (launch/docker/train-gpu.Dockerfile); ``--gpus``/``--gpu_type``
  request GPUs. XManager's open-source Kubernetes executor runs one pod per job: it cannot run a
  multi-host TPU slice (or a multi-node GPU job); for those use ``jobset``.
* ``jobset``: no XManager; writes one JobSet manifest per work unit with launch/gke
  (``python -m launch.gke``, arguments from ``--gke_args``) into ``ROOT/NAME/manifests/`` (or
  ``--manifest_dir``) and prints the ``kubectl apply -f`` commands.

Sweeps: ``--sweep='optimizer.lr=1e-3,3e-4;seed=0,1'`` is the cartesian product of the axes (``;``
separates axes, ``,`` values; ``\,`` and ``\;`` are literal; the ``config.`` prefix is optional):
4 work units, ids 1..4 in ``itertools.product`` order (the last axis varies fastest). Overrides
shared by every work unit follow ``--``. Each work unit's workdir is ``ROOT/NAME/WID``;
``ROOT/NAME/work_units.json`` (local roots) records every work unit's overrides and command.
Launching the same ``--name`` again resumes every work unit from its checkpoints.

  python launch/xm_launch.py --config=configs/mse_1b6.py:tiny --root=workdir/xm --name=lr \
      --sweep='optimizer.lr=3e-3,1e-3' -- --config.train.num_steps=200
  python launch/xm_launch.py ... --dry_run     # print the work units, launch nothing

``--config`` is relative to the repository root (local work units run there) or to ``/app`` in
the images. Without ``--name`` the experiment is named after its XManager experiment id.

Bad arguments (sweep syntax, names, overrides) exit with status 2 and one ``error:`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import posixpath
import re
import shlex
import sys
import time
from typing import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXECUTORS = ("local", "kubernetes", "jobset")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(ValueError):
  """A bad launcher argument (sweep, name, override); the CLI prints it and exits with 2."""


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  """One point of a sweep: its id (1-based, as XManager's), overrides, workdir and arguments."""
  wid: int
  overrides: dict[str, str]      # the sweep point, e.g. {"config.optimizer.lr": "1e-3"}
  workdir: str
  args: list[str]                # arguments after `python -m lcm_jax.main`


# ------------------------------------------------------------------------------------------------
# Pure functions (no XManager, no JAX)

def _split_unescaped(text: str, sep: str) -> list[str]:
  """Splits at ``sep`` not preceded by a backslash; ``\\<sep>`` stays escaped for a later split."""
  parts, cur, i = [], [], 0
  while i < len(text):
    ch = text[i]
    if ch == "\\" and i + 1 < len(text):
      cur.append(text[i:i + 2])
      i += 2
      continue
    if ch == sep:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
    i += 1
  parts.append("".join(cur))
  return parts


def _unescape(text: str) -> str:
  return re.sub(r"\\([,;\\])", r"\1", text)


def normalize_key(key: str) -> str:
  """``optimizer.lr``, ``config.optimizer.lr`` or ``--config.optimizer.lr`` -> ``config.optimizer.lr``."""
  k = key.strip()
  if k.startswith("--"):
    k = k[2:]
  if not k.startswith("config."):
    k = "config." + k
  if not _KEY_RE.match(k) or k == "config.":
    raise LaunchError(f"bad config key {key!r} (expected e.g. optimizer.lr or config.optimizer.lr)")
  return k


def parse_sweep(spec: str) -> list[tuple[str, list[str]]]:
  """Parses ``'KEY=V1,V2;KEY2=V3'`` into ``[(config.KEY, [V1, V2]), (config.KEY2, [V3])]``.

  Raises:
    LaunchError: an axis without ``=``, an empty key or value, or a key given twice.
  """
  axes: list[tuple[str, list[str]]] = []
  if not spec.strip():
    return axes
  for axis in _split_unescaped(spec, ";"):
    if not axis.strip():
      raise LaunchError(f"--sweep: empty axis in {spec!r} (axes are separated by ';')")
    key, eq, values = axis.partition("=")
    if not eq:
      raise LaunchError(f"--sweep: axis {axis.strip()!r} has no '=' (expected KEY=V1,V2,...)")
    key = normalize_key(key)
    vals = [_unescape(v.strip()) for v in _split_unescaped(values, ",")]
    if any(not v for v in vals):
      raise LaunchError(f"--sweep: empty value in axis {axis.strip()!r}")
    if key in dict(axes):
      raise LaunchError(f"--sweep: key {key} appears twice")
    axes.append((key, vals))
  return axes


def expand_sweep(axes: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, str]]:
  """The cartesian product of the axes, in ``itertools.product`` order; ``[{}]`` for no axes."""
  keys = [k for k, _ in axes]
  return [dict(zip(keys, point)) for point in itertools.product(*(v for _, v in axes))]


def parse_fixed_overrides(args: Sequence[str]) -> dict[str, str]:
  """``['--config.train.num_steps=2', ...]`` (the arguments after ``--``) -> {key: value}."""
  out: dict[str, str] = {}
  for a in args:
    key, eq, value = a.partition("=")
    if not a.startswith("--config.") or not eq:
      raise LaunchError(f"training override {a!r} after '--' must look like --config.KEY=VALUE")
    key = normalize_key(key)
    if key in out:
      raise LaunchError(f"training override {key} given twice")
    out[key] = value
  return out


def check_name(name: str) -> str:
  if not _NAME_RE.match(name):
    raise LaunchError(f"--name {name!r}: use letters, digits, '_', '.', '-' (no '/'), "
                      "starting with a letter or digit")
  return name


def default_name(config: str, now: float | None = None) -> str:
  """``configs/mse_1b6.py:tiny`` -> ``mse_1b6_tiny-20250101-120000`` (local time)."""
  path, _, variant = config.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
  return f"{stem}_{variant}-{stamp}" if variant else f"{stem}-{stamp}"


def work_unit_workdir(root: str, name: str, wid: int) -> str:
  """``ROOT/NAME/WID``; ``ROOT`` may be a local path or a URL such as ``gs://bucket/runs``."""
  if "://" in root:
    return posixpath.join(root.rstrip("/"), name, str(wid))
  return os.path.join(root, name, str(wid))


def train_args(config: str, workdir: str, fixed: dict[str, str],
               point: dict[str, str]) -> list[str]:
  """Arguments of ``python -m lcm_jax.main`` for one work unit (shared overrides, then the point).

  Raises:
    LaunchError: a key both in the shared overrides and in the sweep.
  """
  both = sorted(set(fixed) & set(point))
  if both:
    raise LaunchError(f"{', '.join(both)} is both swept and fixed after '--'")
  args = [f"--config={config}", f"--workdir={workdir}"]
  args += [f"--{k}={v}" for k, v in fixed.items()]
  args += [f"--{k}={v}" for k, v in point.items()]
  return args


def plan(config: str, root: str, name: str, sweep: str = "",
         fixed_args: Sequence[str] = ()) -> list[WorkUnit]:
  """All work units of an experiment: sweep points x shared overrides, one workdir each."""
  check_name(name)
  fixed = parse_fixed_overrides(fixed_args)
  units = []
  for wid, point in enumerate(expand_sweep(parse_sweep(sweep)), start=1):
    workdir = work_unit_workdir(root, name, wid)
    units.append(WorkUnit(wid, point, workdir, train_args(config, workdir, fixed, point)))
  return units


def shell_command(python: str, args: Sequence[str]) -> str:
  """The work unit's command line, quoted for a POSIX shell (``shlex.split`` gives it back)."""
  return shlex.join([python, "-m", "lcm_jax.main", *args])


def parse_env(items: Sequence[str]) -> dict[str, str]:
  out = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or not _ENV_RE.match(key):
      raise LaunchError(f"--env {item!r}: expected NAME=VALUE")
    out[key] = value
  return out


def k8s_name(name: str, wid: int) -> str:
  """A DNS-1035 label for work unit ``wid`` (Kubernetes object names): ``lr-sweep-3``."""
  base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "lcm"
  if not base[0].isalpha():
    base = "x" + base
  return f"{base[:50].rstrip('-')}-{wid}"


def record(units: Sequence[WorkUnit], root: str, name: str, executor: str, python: str,
           experiment_id: int | None = None) -> str | None:
  """Writes ``ROOT/NAME/work_units.json`` (local roots only) and returns its path."""
  if "://" in root:
    return None
  path = os.path.join(root, name, "work_units.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = {"name": name, "executor": executor, "experiment_id": experiment_id,
          "work_units": [{"wid": u.wid, "overrides": u.overrides, "workdir": u.workdir,
                          "command": shell_command(python, u.args)} for u in units]}
  from lcm_jax import fileio  # pylint: disable=g-import-not-at-top  (stdlib only, no numpy/JAX)
  return fileio.write_file_atomic(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"),
                                  suffix=".json")


# ------------------------------------------------------------------------------------------------
# CLI

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="xm_launch.py", allow_abbrev=False,
      description="Launch lcm_jax training runs / sweeps with XManager (see the module docstring).",
      epilog="Training overrides shared by all work units go after '--', e.g. "
             "-- --config.train.num_steps=200. XManager's own flags (--xm_*) are passed to it.")
  p.add_argument("--config", required=True, help="e.g. configs/mse_1b6.py:tiny (repository path)")
  p.add_argument("--root", default="workdir/xm",
                 help="experiment root: work unit WID of NAME trains in ROOT/NAME/WID "
                      "(a shared path or gs:// URL for Kubernetes)")
  p.add_argument("--name", default="",
                 help="experiment name (default: CONFIG_VARIANT-YYYYmmdd-HHMMSS)")
  p.add_argument("--sweep", default="", help="e.g. 'optimizer.lr=1e-3,3e-4;seed=0,1' (product)")
  p.add_argument("--executor", choices=EXECUTORS, default="local")
  p.add_argument("--dry_run", action="store_true",
                 help="print the work units and their commands; launch nothing")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment variable for every work unit (repeatable)")
  g = p.add_argument_group("local")
  g.add_argument("--python", default=os.path.join(REPO_ROOT, ".venv", "bin", "python"),
                 help="interpreter of the training environment")
  g = p.add_argument_group("kubernetes")
  g.add_argument("--image", default="", help="training image (launch/docker/train-gpu.Dockerfile)")
  g.add_argument("--gpus", type=int, default=0, help="GPUs per work unit (nvidia.com/gpu)")
  g.add_argument("--gpu_type", default="h100",
                 help="XManager GPU type (a100, h100, l4, ...): GKE node selector")
  g.add_argument("--cpu", type=float, default=0, help="CPUs per work unit (0: unset)")
  g.add_argument("--memory_gib", type=float, default=0, help="memory per work unit (0: unset)")
  g = p.add_argument_group("jobset")
  g.add_argument("--gke_args", default="",
                 help="arguments for `python -m launch.gke` (shell-quoted string), e.g. "
                      "\"tpu --image=IMAGE --tpu_type=v5p --topology=4x4x4\"")
  g.add_argument("--manifest_dir", default="", help="default: ROOT/NAME/manifests")
  return p


def parse_args(argv: Sequence[str]):
  """Returns (namespace, training overrides after '--', XManager flags)."""
  argv = list(argv)
  train_flags: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, train_flags = argv[:i], argv[i + 1:]
  parser = _parser()
  ns, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--xm_")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (training overrides go after '--')")
  return ns, train_flags, rest, parser


def _print_plan(units: Sequence[WorkUnit], python: str) -> None:
  for u in units:
    point = " ".join(f"{k}={v}" for k, v in u.overrides.items()) or "(no sweep)"
    print(f"work unit {u.wid}: {point}\n  {shell_command(python, u.args)}")


def gke_argv(gke_args: str, unit: WorkUnit, config: str, name: str, env: dict[str, str],
             output: str) -> list[str]:
  """``python -m launch.gke`` arguments rendering work unit ``unit``'s JobSet into ``output``.

  ``gke_args`` starts with the kind (``tpu`` or ``gpu``) followed by its flags (image, topology,
  nodes, volumes, ...); the name, config, workdir, overrides, env and output are added here.
  """
  base = shlex.split(gke_args)
  if not base or base[0] not in ("tpu", "gpu"):
    raise LaunchError("--executor=jobset needs --gke_args starting with 'tpu' or 'gpu', e.g. "
                      "\"tpu --image=IMAGE --accelerator=tpu-v5p-slice --topology=4x4x4\" "
                      "(see python -m launch.gke tpu --help)")
  owned = ("--name", "--config", "--workdir", "--override", "--output", "-o")
  clash = [a for a in base[1:] if a.split("=", 1)[0] in owned]
  if clash:
    raise LaunchError(f"--gke_args: {' '.join(clash)} is set by the launcher per work unit")
  args = unit.args[2:]  # the overrides (unit.args starts with --config and --workdir)
  return [*base, f"--name={k8s_name(name, unit.wid)}", f"--config={config}",
          f"--workdir={unit.workdir}", *[f"--override={a[2:]}" for a in args],
          *[f"--env={k}={v}" for k, v in env.items()], f"--output={output}"]


def _launch_jobset(ns, units, config, name, env) -> int:
  """Renders one JobSet per work unit with launch/gke (no XManager) and prints kubectl commands."""
  manifest_dir = ns.manifest_dir or os.path.join(ns.root, name, "manifests")
  if "://" in manifest_dir:
    raise LaunchError(f"--manifest_dir {manifest_dir}: must be a local directory "
                      "(set --manifest_dir when --root is a URL)")
  cmds = [(gke_argv(ns.gke_args, u, config, name, env,
                    os.path.join(manifest_dir, f"{k8s_name(name, u.wid)}.yaml")), u)
          for u in units]
  if ns.dry_run:
    for argv, _ in cmds:
      print(shlex.join([sys.executable, "-m", "launch.gke", *argv]))
    return 0
  from launch.gke import __main__ as gke_cli  # pylint: disable=g-import-not-at-top
  os.makedirs(manifest_dir, exist_ok=True)
  for argv, _ in cmds:
    try:
      status = gke_cli.main(argv)
    except SystemExit as e:  # argparse errors in --gke_args
      status = e.code
    if status:
      print(f"error: launch.gke {shlex.join(argv)} failed (status {status})", file=sys.stderr)
      return 2
  path = record(units, ns.root, name, ns.executor, "python")
  for argv, u in cmds:
    print(f"work unit {u.wid}: {' '.join(f'{k}={v}' for k, v in u.overrides.items())}")
    print(f"  kubectl apply -f {argv[-1].split('=', 1)[1]}")
  if path:
    print(f"recorded in {path}")
  return 0


def _launch_xm(ns, units, name_given: str, config: str, env: dict[str, str],
               xm_flags: list[str]) -> int:
  """Creates the XManager experiment and one work unit per sweep point (imports xmanager)."""
  try:
    from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
    from xmanager import xm  # pylint: disable=g-import-not-at-top
    from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"error: XManager is not installed in {sys.executable} ({e}); create its environment "
          "with: python3.11 -m venv .xmvenv && .xmvenv/bin/pip install -r "
          "launch/requirements-xm.txt", file=sys.stderr)
    return 2
  absl_flags.FLAGS([sys.argv[0], *xm_flags])  # XManager reads its own absl flags (--xm_*)

  if ns.executor == "local":
    executable_spec = xm.Binary(path=ns.python)
    executor_spec = xm_local.Local.Spec()
    executor = xm_local.Local(experimental_stream_output=True)
    prefix_args = ["-m", "lcm_jax.main"]
  else:
    executable_spec = xm.Container(image_path=ns.image)
    executor_spec = xm_local.Kubernetes.Spec()
    try:
      executor = k8s_executor(xm, xm_local, ns)
    except LaunchError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    prefix_args = ["python", "-m", "lcm_jax.main"]

  try:
    with xm_local.create_experiment(experiment_title=name_given or config) as experiment:
      name = name_given or str(experiment.experiment_id)
      if not name_given:  # the workdirs are named after the experiment id
        units = plan(config, ns.root, name, ns.sweep, ns.train_flags)
      path = record(units, ns.root, name, ns.executor,
                    ns.python if ns.executor == "local" else "python", experiment.experiment_id)
      print(f"experiment {experiment.experiment_id} ({name}): {len(units)} work unit(s)"
            + (f", recorded in {path}" if path else ""))
      [executable] = experiment.package([xm.Packageable(
          executable_spec=executable_spec, executor_spec=executor_spec, args=prefix_args,
          env_vars=env)])
      for u in units:
        experiment.add(xm.Job(executable, executor, args=list(u.args), name="train"))
      # Leaving the context waits for the local work units and raises if one failed.
  except RuntimeError as e:  # a local work unit exited with a non-zero status
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ != "DefaultCredentialsError":
      raise
    print("error: XManager's Kubernetes packaging needs Google Cloud credentials (gcloud auth "
          "application-default login) and kubectl credentials (gcloud container clusters "
          "get-credentials CLUSTER)", file=sys.stderr)
    return 2
  return 0


# GPU types whose XManager node selector (cloud.google.com/gke-accelerator: nvidia-tesla-TYPE) is
# a real GKE label; for the others (h100, l4_24th, ...) no selector is set and the pods go to
# nodes offering the nvidia.com/gpu request.
GKE_TESLA_GPUS = ("p4", "t4", "p100", "v100", "a100")


def k8s_executor(xm, xm_local, ns):
  """XManager's Kubernetes executor from --gpus/--gpu_type/--cpu/--memory_gib (needs xmanager).

  Raises:
    LaunchError: a GPU type XManager does not know.
  """
  req = {}
  if ns.gpus:
    req[ns.gpu_type] = ns.gpus
  if ns.cpu:
    req["cpu"] = ns.cpu
  if ns.memory_gib:
    req["ram"] = ns.memory_gib * xm.GiB
  try:
    requirements = xm.JobRequirements(**req)
  except (KeyError, ValueError) as e:
    raise LaunchError(f"--gpu_type {ns.gpu_type}: {e} (XManager names: t4, v100, a100, "
                      "a100_80gib, l4_24th, h100, h200, b200, ...)") from None
  if ns.gpus and ns.gpu_type.lower() not in GKE_TESLA_GPUS:
    return xm_local.Kubernetes(requirements=requirements, cloud_provider="KUBERNETES")
  return xm_local.Kubernetes(requirements=requirements)


def main(argv: Sequence[str] | None = None) -> int:
  ns, train_flags, xm_flags, parser = parse_args(sys.argv[1:] if argv is None else argv)
  ns.train_flags = train_flags
  if ns.executor == "local" and "://" not in ns.root:
    ns.root = os.path.abspath(ns.root)  # the work units run in the repository root
  try:
    name = check_name(ns.name) if ns.name else ""
    env = parse_env(ns.env)
    # Without --name, XManager executors use the experiment id (known once it is created);
    # dry runs and JobSets use CONFIG_VARIANT-TIMESTAMP.
    plan_name = name or (default_name(ns.config) if ns.dry_run or ns.executor == "jobset"
                         else "EXPERIMENT_ID")
    units = plan(ns.config, ns.root, plan_name, ns.sweep, train_flags)
    if ns.executor == "kubernetes" and not ns.image:
      raise LaunchError("--executor=kubernetes needs --image (see launch/docker/)")
    if ns.executor != "local" and not ("://" in ns.root or os.path.isabs(ns.root)):
      raise LaunchError(f"--root {ns.root}: pods need a shared path (gs://BUCKET/... or an "
                        "absolute path on a volume mounted in every pod)")
    if ns.executor == "jobset":
      return _launch_jobset(ns, units, ns.config, plan_name, env)
    if ns.dry_run:
      _print_plan(units, ns.python if ns.executor == "local" else "python")
      return 0
  except LaunchError as e:
    parser.error(str(e))  # prints usage and "error: ...", exits 2
  if ns.executor == "local":
    if not os.path.exists(ns.python):
      parser.error(f"--python {ns.python} does not exist (run scripts/setup.sh first)")
    os.chdir(REPO_ROOT)  # local work units run in the repository root (configs/, data/)
  return _launch_xm(ns, units, name, ns.config, env, xm_flags)


if __name__ == "__main__":
  sys.exit(main())
