"""Kubernetes manifests for lcm_jax on GKE: JobSets for TPU slices and multi-node GPU, and an
Indexed Job for the embedding workers. Plain dicts (``to_yaml`` for text); only PyYAML is needed.

The three builders share one pod shape:

* one container running the repository's command in the image's ``/app`` (``python -m ...``);
* ``/dev/shm`` as a memory-backed ``emptyDir`` (Grain's worker processes pass batches through it);
* optional shared storage (``pvcs``: a PersistentVolumeClaim, ``gcs_buckets``: a Cloud Storage
  bucket through the GKE Cloud Storage FUSE CSI driver) mounted at a path of your choice;
* ``restartPolicy: Never``. A failed pod fails its Job (``backoffLimit: 0``) and the JobSet's
  ``failurePolicy.maxRestarts`` recreates every pod; ``lcm_jax.main`` then resumes from the
  workdir's latest checkpoint. On SIGTERM (preemption, ``kubectl delete``) ``lcm_jax.main``
  checkpoints at the next step and exits 143, within ``terminationGracePeriodSeconds``.

TPU (:func:`render_tpu_jobset`): one replicated Job per slice (``replicas`` = number of slices),
``hosts = chips(topology) / chips_per_host`` pods per slice, each with ``google.com/tpu:
chips_per_host`` and the ``cloud.google.com/gke-tpu-accelerator`` / ``gke-tpu-topology`` node
selectors. No ``JAX_*`` variables: GKE gives each TPU pod ``TPU_WORKER_ID`` /
``TPU_WORKER_HOSTNAMES`` (and the ``MEGASCALE_*`` variables for several slices), which JAX's
cluster detection reads. The ``alpha.jobset.sigs.k8s.io/exclusive-topology:
cloud.google.com/gke-nodepool`` annotation keeps each slice's pods on one node pool (one slice).

GPU (:func:`render_gpu_jobset`): one pod per node, ``JAX_NUM_PROCESSES`` = nodes, the coordinator
at the first pod's DNS name ``<name>-worker-0-0.<name>:<port>`` (JobSet's
``<jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>`` with ``enableDNSHostnames``), and
``JAX_PROCESS_ID`` from the pod's ``batch.kubernetes.io/job-completion-index`` annotation.

Embedding (:func:`render_embed_job`): an Indexed Job of ``num_workers`` completions running
``python -m data_prep.embed ... --num_workers=N``; each pod's ``JOB_COMPLETION_INDEX`` (0..N-1) is
its ``--worker_index``. The worker that finds every shard finished writes ``manifest.json``;
``python -m data_prep.embed --out=OUT --merge`` does the same by hand.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import yaml

JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
NODEPOOL_KEY = "cloud.google.com/gke-nodepool"
TPU_ACCELERATOR_KEY = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_KEY = "cloud.google.com/gke-tpu-topology"
GPU_ACCELERATOR_KEY = "cloud.google.com/gke-accelerator"
INSTANCE_TYPE_KEY = "node.kubernetes.io/instance-type"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
COMPLETION_INDEX_FIELD = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GCSFUSE_ANNOTATION = "gke-gcsfuse/volumes"
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"

TPU_JOB_NAME = "slice"   # replicated Job of a TPU JobSet (one Job per slice)
GPU_JOB_NAME = "worker"  # replicated Job of a GPU JobSet (one Job, one pod per node)
CONTAINER_NAME = "main"
SHM_VOLUME = "dshm"

# Topology rank of the GKE TPU accelerator types (v4/v5p/7x: 3-D torus, v5e/v6e: 2-D).
TPU_TOPOLOGY_RANK = {
    "tpu-v4-podslice": 3,
    "tpu-v5p-slice": 3,
    "tpu7x": 3,
    "tpu-v5-lite-podslice": 2,
    "tpu-v5-lite-device": 2,
    "tpu-v6e-slice": 2,
}

DEFAULT_TPU_ACCELERATOR = "tpu-v5p-slice"
DEFAULT_CHIPS_PER_HOST = 4
DEFAULT_GPU_ACCELERATOR = "nvidia-h100-80gb"
DEFAULT_EMBED_ACCELERATOR = "nvidia-l4"
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_COORDINATOR_PORT = 1234
DEFAULT_GRACE_S = 600
DEFAULT_MAX_RESTARTS = 3
DEFAULT_DISTRIBUTED_TIMEOUT = 300
DEFAULT_BACKOFF_PER_INDEX = 3

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_TOPOLOGY = re.compile(r"^[1-9][0-9]*(x[1-9][0-9]*){1,2}$")
_JAX_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                        "JAX_LOCAL_DEVICE_IDS")
# Flags of data_prep.embed the renderer sets itself (the worker index comes from the Job).
_EMBED_OWNED_FLAGS = ("--input", "--out", "--num_workers", "--worker_index", "--merge")


class RenderError(ValueError):
  """A bad renderer input; the message starts with the flag (keyword) it is about."""


# ------------------------------------------------------------------------------------------------
# Validation.
# ------------------------------------------------------------------------------------------------


def _check_name(name: str, longest_hostname: str) -> None:
  """``name`` must be a DNS-1035 label, and so must the longest pod hostname built from it."""
  if not isinstance(name, str) or not _DNS1035.match(name):
    raise RenderError(f"--name={name!r}: must be a DNS-1035 label (lower-case letters, digits and "
                      "'-', starting with a letter, ending with a letter or digit)")
  if len(longest_hostname) > 63:
    raise RenderError(f"--name={name!r}: too long; the pod hostname {longest_hostname!r} has "
                      f"{len(longest_hostname)} characters, at most 63 are allowed (use a name of "
                      f"at most {len(name) - (len(longest_hostname) - 63)} characters)")


def _check_positive(flag: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise RenderError(f"--{flag}={value!r}: must be an integer >= {minimum}")
  return value


def _check_nonempty(flag: str, value: Any) -> str:
  if not isinstance(value, str) or not value.strip():
    raise RenderError(f"--{flag}: must be a non-empty string, got {value!r}")
  if any(c.isspace() for c in value):
    raise RenderError(f"--{flag}={value!r}: must not contain whitespace")
  return value


def _check_quantity(flag: str, value: str | None) -> str | None:
  if value is not None and not _QUANTITY.match(str(value)):
    raise RenderError(f"--{flag}={value!r}: not a Kubernetes quantity (e.g. 64Gi, 500Mi, 8, 500m)")
  return None if value is None else str(value)


def _check_label_value(flag: str, value: str) -> str:
  if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value) or not value:
    raise RenderError(f"--{flag}={value!r}: must be a Kubernetes label value (at most 63 letters, "
                      "digits, '-', '_' or '.', starting and ending with a letter or digit)")
  return value


def parse_topology(topology: str, chips_per_host: int,
                   accelerator: str | None = None) -> tuple[int, int]:
  """``(chips, hosts)`` of one slice; RenderError if the topology and chips per host disagree."""
  if not isinstance(topology, str) or not _TOPOLOGY.match(topology):
    raise RenderError(f"--topology={topology!r}: expected AxB or AxBxC with positive integers "
                      "(e.g. 2x4, 4x4x4)")
  dims = [int(d) for d in topology.split("x")]
  rank = TPU_TOPOLOGY_RANK.get(accelerator or "")
  if rank is not None and len(dims) != rank:
    example = "4x4x4" if rank == 3 else "4x4"
    raise RenderError(f"--topology={topology!r}: {accelerator} slices have a {rank}-D topology "
                      f"(e.g. {example})")
  _check_positive("chips_per_host", chips_per_host)
  chips = 1
  for d in dims:
    chips *= d
  if chips % chips_per_host:
    hint = (f" (a single-host slice with fewer chips needs --chips_per_host={chips})"
            if chips < chips_per_host else "")
    raise RenderError(f"--topology={topology!r} has {chips} chips, not a multiple of "
                      f"--chips_per_host={chips_per_host}{hint}")
  return chips, chips // chips_per_host


def _env_list(env: Mapping[str, str] | Sequence[str] | None, flag: str = "env",
              reserved: Iterable[str] = ()) -> list[dict[str, Any]]:
  """``{"K": "V"}`` or ``["K=V", ...]`` as a container ``env`` list; refuses reserved names."""
  if env is None:
    return []
  if isinstance(env, Mapping):
    items = list(env.items())
  else:
    items = []
    for kv in env:
      key, sep, value = str(kv).partition("=")
      if not sep:
        raise RenderError(f"--{flag}={kv!r}: expected NAME=VALUE")
      items.append((key, value))
  reserved = set(reserved)
  out, seen = [], set()
  for key, value in items:
    if not _ENV_NAME.match(key):
      raise RenderError(f"--{flag}: {key!r} is not a valid environment variable name")
    if key in reserved:
      raise RenderError(f"--{flag}: {key} is set by the renderer or the cluster; do not set it")
    if key in seen:
      raise RenderError(f"--{flag}: {key} is given twice")
    seen.add(key)
    out.append({"name": key, "value": str(value)})
  return out


def _mount_specs(values: Sequence[str] | None, flag: str) -> list[tuple[str, str]]:
  """``["SOURCE:/mount/path", ...]`` -> ``[(source, path)]``."""
  out = []
  for v in values or ():
    source, sep, path = str(v).rpartition(":")
    if not sep or not source or not path.startswith("/"):
      raise RenderError(f"--{flag}={v!r}: expected SOURCE:/absolute/mount/path")
    if path.rstrip("/") in ("/dev/shm", ""):
      raise RenderError(f"--{flag}={v!r}: {path} cannot be a mount path here")
    out.append((source, path))
  return out


def config_overrides(overrides: Sequence[str] | None) -> list[str]:
  """``["optimizer.lr=1e-3", "config.mesh.fsdp=8", "--config.x=y"]`` -> ``--config.FIELD=VALUE``."""
  out = []
  for o in overrides or ():
    s = str(o)
    body = s[2:] if s.startswith("--") else s
    if not body.startswith("config."):
      body = "config." + body
    field, sep, _ = body.partition("=")
    if not sep or not re.match(r"^config(\.[A-Za-z_][A-Za-z0-9_]*)+$", field):
      raise RenderError(f"--override={s!r}: expected config.FIELD.SUBFIELD=VALUE "
                        "(e.g. config.optimizer.lr=1e-3)")
    out.append("--" + body)
  return out


# ------------------------------------------------------------------------------------------------
# Shared pieces.
# ------------------------------------------------------------------------------------------------


def train_command(config: str, workdir: str, overrides: Sequence[str] | None = None,
                  distributed_timeout: int = DEFAULT_DISTRIBUTED_TIMEOUT,
                  extra_args: Sequence[str] | None = None) -> list[str]:
  """The ``python -m lcm_jax.main`` command every training process runs."""
  _check_nonempty("config", config)
  _check_nonempty("workdir", workdir)
  _check_positive("distributed_timeout", distributed_timeout)
  return ["python", "-m", "lcm_jax.main", f"--config={config}", f"--workdir={workdir}",
          *config_overrides(overrides), f"--distributed_timeout={distributed_timeout}",
          *[str(a) for a in extra_args or ()]]


def embed_command(inputs: Sequence[str], out: str, num_workers: int,
                  extra_args: Sequence[str] | None = None) -> list[str]:
  """The ``python -m data_prep.embed`` command of every worker (the index comes from the Job)."""
  if isinstance(inputs, str):
    inputs = [inputs]
  if not inputs:
    raise RenderError("--input: at least one path, glob or tfds:NAME:SPLIT is required")
  for i in inputs:
    _check_nonempty("input", i)
  _check_nonempty("out", out)
  _check_positive("num_workers", num_workers)
  extra = [str(a) for a in extra_args or ()]
  for a in extra:
    flag = a.partition("=")[0]
    if flag in _EMBED_OWNED_FLAGS:
      raise RenderError(f"embed argument {a!r}: {flag} is set by the renderer (--input, --out, "
                        "--num_workers) or by the Job (the worker index is $JOB_COMPLETION_INDEX)")
  return ["python", "-m", "data_prep.embed", *[f"--input={i}" for i in inputs], f"--out={out}",
          f"--num_workers={num_workers}", *extra]


def _volumes(shm_size: str | None, pvcs: Sequence[str] | None,
             gcs_buckets: Sequence[str] | None) -> tuple[list, list, dict[str, str]]:
  """``(volumes, volumeMounts, pod annotations)``: /dev/shm in memory plus the shared storage."""
  shm: dict[str, Any] = {"medium": "Memory"}
  if _check_quantity("shm_size", shm_size):
    shm["sizeLimit"] = str(shm_size)
  volumes = [{"name": SHM_VOLUME, "emptyDir": shm}]
  mounts = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
  annotations: dict[str, str] = {}
  for k, (claim, path) in enumerate(_mount_specs(pvcs, "pvc")):
    volumes.append({"name": f"pvc-{k}", "persistentVolumeClaim": {"claimName": claim}})
    mounts.append({"name": f"pvc-{k}", "mountPath": path})
  for k, (bucket, path) in enumerate(_mount_specs(gcs_buckets, "gcs_bucket")):
    if bucket.startswith("gs://"):
      bucket = bucket[len("gs://"):]
    volumes.append({"name": f"gcs-{k}", "csi": {
        "driver": GCSFUSE_DRIVER,
        "volumeAttributes": {"bucketName": bucket, "mountOptions": "implicit-dirs"}}})
    mounts.append({"name": f"gcs-{k}", "mountPath": path})
    annotations[GCSFUSE_ANNOTATION] = "true"
  paths = [m["mountPath"].rstrip("/") for m in mounts]
  for p in paths:
    if paths.count(p) > 1:
      raise RenderError(f"--pvc/--gcs_bucket: mount path {p} is used twice")
  return volumes, mounts, annotations


def _resources(extended: Mapping[str, int], cpu: str | None, memory: str | None) -> dict:
  res: dict[str, Any] = {}
  if extended:
    res["limits"] = dict(extended)
  requests = {}
  if _check_quantity("cpu", cpu):
    requests["cpu"] = str(cpu)
  if _check_quantity("memory", memory):
    requests["memory"] = str(memory)
  if requests:
    res["requests"] = requests
  return res


def _pod_template(*, image: str, command: list[str], env: list[dict], resources: dict,
                  node_selector: dict[str, str], shm_size: str | None, pvcs, gcs_buckets,
                  grace_s: int | None, host_network: bool, service_account: str | None,
                  ports: Sequence[int] = ()) -> dict:
  _check_nonempty("image", image)
  volumes, mounts, annotations = _volumes(shm_size, pvcs, gcs_buckets)
  container: dict[str, Any] = {"name": CONTAINER_NAME, "image": image, "command": command}
  if env:
    container["env"] = env
  if ports:
    container["ports"] = [{"containerPort": p} for p in ports]
  container["resources"] = resources
  container["volumeMounts"] = mounts
  spec: dict[str, Any] = {"restartPolicy": "Never"}
  if grace_s is not None:
    spec["terminationGracePeriodSeconds"] = _check_positive("termination_grace_period", grace_s, 0)
  if host_network:
    spec["hostNetwork"] = True
    spec["dnsPolicy"] = "ClusterFirstWithHostNet"  # still resolve the JobSet's pod DNS names
  if service_account is not None:
    if not _DNS1123_SUBDOMAIN.match(str(service_account)) or len(service_account) > 253:
      raise RenderError(f"--service_account={service_account!r}: not a Kubernetes object name")
    spec["serviceAccountName"] = service_account
  if node_selector:
    spec["nodeSelector"] = node_selector
  spec["containers"] = [container]
  spec["volumes"] = volumes
  template: dict[str, Any] = {}
  if annotations:
    template["metadata"] = {"annotations": annotations}
  template["spec"] = spec
  return template


def _metadata(name: str, namespace: str | None, queue: str | None,
              annotations: dict[str, str] | None = None, app: str = "lcm-jax") -> dict:
  md: dict[str, Any] = {"name": name}
  if namespace is not None:
    if not _DNS1123_LABEL.match(str(namespace)) or len(namespace) > 63:
      raise RenderError(f"--namespace={namespace!r}: must be a DNS-1123 label")
    md["namespace"] = namespace
  labels = {"app.kubernetes.io/name": app}
  if queue is not None:
    labels[KUEUE_QUEUE_LABEL] = _check_label_value("queue", queue)
  md["labels"] = labels
  if annotations:
    md["annotations"] = annotations
  return md


def _jobset(*, name: str, namespace, queue, annotations, job_name: str, replicas: int, pods: int,
            max_restarts: int, pod_template: dict) -> dict:
  return {
      "apiVersion": JOBSET_API_VERSION,
      "kind": "JobSet",
      "metadata": _metadata(name, namespace, queue, annotations),
      "spec": {
          "failurePolicy": {"maxRestarts": _check_positive("max_restarts", max_restarts, 0)},
          # Pod hostnames <name>-<job>-<jobIndex>-<podIndex>.<name>, resolvable before readiness.
          "network": {"enableDNSHostnames": True, "subdomain": name,
                      "publishNotReadyAddresses": True},
          "replicatedJobs": [{
              "name": job_name,
              "replicas": replicas,
              "template": {"spec": {
                  "parallelism": pods,
                  "completions": pods,
                  "completionMode": "Indexed",
                  "backoffLimit": 0,  # a failed pod fails the Job; the JobSet restarts every pod
                  "template": pod_template,
              }},
          }],
      },
  }


def pod_hostname(jobset: Mapping[str, Any], job_index: int = 0, pod_index: int = 0,
                 replicated_job: int = 0) -> str:
  """JobSet's DNS name of a pod: ``<jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>``."""
  rj = jobset["spec"]["replicatedJobs"][replicated_job]
  subdomain = jobset["spec"].get("network", {}).get("subdomain") or jobset["metadata"]["name"]
  return f"{jobset['metadata']['name']}-{rj['name']}-{job_index}-{pod_index}.{subdomain}"


# ------------------------------------------------------------------------------------------------
# The three manifests.
# ------------------------------------------------------------------------------------------------


def render_tpu_jobset(*, name: str, image: str, config: str, workdir: str, topology: str,
                      accelerator: str = DEFAULT_TPU_ACCELERATOR,
                      chips_per_host: int = DEFAULT_CHIPS_PER_HOST, num_slices: int = 1,
                      overrides: Sequence[str] | None = None,
                      env: Mapping[str, str] | Sequence[str] | None = None,
                      max_restarts: int = DEFAULT_MAX_RESTARTS,
                      termination_grace_period: int = DEFAULT_GRACE_S,
                      distributed_timeout: int = DEFAULT_DISTRIBUTED_TIMEOUT,
                      shm_size: str | None = None, pvcs: Sequence[str] | None = None,
                      gcs_buckets: Sequence[str] | None = None, host_network: bool = True,
                      namespace: str | None = None, service_account: str | None = None,
                      queue: str | None = None, cpu: str | None = None, memory: str | None = None,
                      extra_args: Sequence[str] | None = None) -> dict:
  """A JobSet training on ``num_slices`` TPU slices of ``topology`` (one pod per TPU host)."""
  _check_label_value("accelerator", accelerator)
  _, hosts = parse_topology(topology, chips_per_host, accelerator)
  _check_positive("num_slices", num_slices)
  _check_name(name, f"{name}-{TPU_JOB_NAME}-{num_slices - 1}-{hosts - 1}")
  command = train_command(config, workdir, overrides, distributed_timeout, extra_args)
  template = _pod_template(
      image=image, command=command,
      env=_env_list(env, reserved=_JAX_DISTRIBUTED_ENV),  # TPU: JAX's cluster detection
      resources=_resources({"google.com/tpu": chips_per_host}, cpu, memory),
      node_selector={TPU_ACCELERATOR_KEY: accelerator, TPU_TOPOLOGY_KEY: topology},
      shm_size=shm_size, pvcs=pvcs, gcs_buckets=gcs_buckets, grace_s=termination_grace_period,
      host_network=host_network, service_account=service_account)
  return _jobset(name=name, namespace=namespace, queue=queue,
                 annotations={EXCLUSIVE_TOPOLOGY: NODEPOOL_KEY}, job_name=TPU_JOB_NAME,
                 replicas=num_slices, pods=hosts, max_restarts=max_restarts,
                 pod_template=template)


def render_gpu_jobset(*, name: str, image: str, config: str, workdir: str, nodes: int,
                      gpus_per_node: int = DEFAULT_GPUS_PER_NODE,
                      accelerator: str | None = DEFAULT_GPU_ACCELERATOR,
                      machine_type: str | None = None,
                      coordinator_port: int = DEFAULT_COORDINATOR_PORT,
                      overrides: Sequence[str] | None = None,
                      env: Mapping[str, str] | Sequence[str] | None = None,
                      max_restarts: int = DEFAULT_MAX_RESTARTS,
                      termination_grace_period: int = DEFAULT_GRACE_S,
                      distributed_timeout: int = DEFAULT_DISTRIBUTED_TIMEOUT,
                      shm_size: str | None = None, pvcs: Sequence[str] | None = None,
                      gcs_buckets: Sequence[str] | None = None, host_network: bool = False,
                      namespace: str | None = None, service_account: str | None = None,
                      queue: str | None = None, cpu: str | None = None, memory: str | None = None,
                      extra_args: Sequence[str] | None = None) -> dict:
  """A JobSet training on ``nodes`` GPU nodes, one process (pod) per node, explicit JAX_* env."""
  _check_positive("nodes", nodes)
  _check_positive("gpus_per_node", gpus_per_node)
  if isinstance(coordinator_port, bool) or not isinstance(coordinator_port, int) or \
      not 0 < coordinator_port < 65536:
    raise RenderError(f"--coordinator_port={coordinator_port!r}: must be in 1..65535")
  _check_name(name, f"{name}-{GPU_JOB_NAME}-0-{nodes - 1}")
  selector = {}
  if accelerator:
    selector[GPU_ACCELERATOR_KEY] = _check_label_value("accelerator", accelerator)
  if machine_type:
    selector[INSTANCE_TYPE_KEY] = _check_label_value("machine_type", machine_type)
  command = train_command(config, workdir, overrides, distributed_timeout, extra_args)
  coordinator = f"{name}-{GPU_JOB_NAME}-0-0.{name}:{coordinator_port}"
  jax_env = [
      {"name": "JAX_COORDINATOR_ADDRESS", "value": coordinator},
      {"name": "JAX_NUM_PROCESSES", "value": str(nodes)},
      {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}},
  ]
  template = _pod_template(
      image=image, command=command,
      env=jax_env + _env_list(env, reserved=_JAX_DISTRIBUTED_ENV),
      resources=_resources({"nvidia.com/gpu": gpus_per_node}, cpu, memory),
      node_selector=selector, shm_size=shm_size, pvcs=pvcs, gcs_buckets=gcs_buckets,
      grace_s=termination_grace_period, host_network=host_network,
      service_account=service_account, ports=(coordinator_port,))
  return _jobset(name=name, namespace=namespace, queue=queue, annotations=None,
                 job_name=GPU_JOB_NAME, replicas=1, pods=nodes, max_restarts=max_restarts,
                 pod_template=template)


def render_embed_job(*, name: str, image: str, inputs: Sequence[str], out: str, num_workers: int,
                     parallelism: int | None = None, gpus_per_worker: int = 1,
                     accelerator: str | None = DEFAULT_EMBED_ACCELERATOR,
                     machine_type: str | None = None,
                     backoff_limit_per_index: int | None = DEFAULT_BACKOFF_PER_INDEX,
                     env: Mapping[str, str] | Sequence[str] | None = None,
                     shm_size: str | None = None, pvcs: Sequence[str] | None = None,
                     gcs_buckets: Sequence[str] | None = None, namespace: str | None = None,
                     service_account: str | None = None, queue: str | None = None,
                     cpu: str | None = None, memory: str | None = None,
                     extra_args: Sequence[str] | None = None) -> dict:
  """An Indexed Job of ``num_workers`` embedding workers (``data_prep.embed``), index = worker."""
  _check_positive("num_workers", num_workers)
  _check_name(name, f"{name}-{num_workers - 1}")
  if parallelism is None:
    parallelism = num_workers
  _check_positive("parallelism", parallelism)
  if parallelism > num_workers:
    raise RenderError(f"--parallelism={parallelism}: more than --num_workers={num_workers}")
  _check_positive("gpus_per_worker", gpus_per_worker, 0)
  selector = {}
  if gpus_per_worker and accelerator:
    selector[GPU_ACCELERATOR_KEY] = _check_label_value("accelerator", accelerator)
  if machine_type:
    selector[INSTANCE_TYPE_KEY] = _check_label_value("machine_type", machine_type)
  command = embed_command(inputs, out, num_workers, extra_args)
  # Kubernetes sets JOB_COMPLETION_INDEX in Indexed Jobs itself; spelled out here so the manifest
  # shows where data_prep.embed's --worker_index comes from.
  index_env = [{"name": "JOB_COMPLETION_INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}}]
  template = _pod_template(
      image=image, command=command,
      env=index_env + _env_list(env, reserved=("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")),
      resources=_resources({"nvidia.com/gpu": gpus_per_worker} if gpus_per_worker else {},
                           cpu, memory),
      node_selector=selector, shm_size=shm_size, pvcs=pvcs, gcs_buckets=gcs_buckets,
      grace_s=None, host_network=False, service_account=service_account)
  spec: dict[str, Any] = {
      "completionMode": "Indexed",
      "completions": num_workers,
      "parallelism": parallelism,
  }
  if backoff_limit_per_index is not None:
    spec["backoffLimitPerIndex"] = _check_positive("backoff_limit_per_index",
                                                   backoff_limit_per_index, 0)
  spec["template"] = template
  return {"apiVersion": "batch/v1", "kind": "Job",
          "metadata": _metadata(name, namespace, queue, app="lcm-jax-embed"), "spec": spec}


def to_yaml(obj: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
  """YAML text of one manifest, or of several as a multi-document stream."""
  if isinstance(obj, Mapping):
    return yaml.safe_dump(dict(obj), sort_keys=False, default_flow_style=False, width=1000)
  return yaml.safe_dump_all([dict(o) for o in obj], sort_keys=False, default_flow_style=False,
                            width=1000)
