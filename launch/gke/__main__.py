r"""Render GKE manifests for lcm_jax: ``python -m launch.gke tpu|gpu|embed ...`` (YAML on stdout).

  # 2 slices of TPU v5p 4x4x4 (16 hosts of 4 chips each per slice):
  python -m launch.gke tpu --name=lcm-1b6 --image=REGISTRY/lcm-jax-train-tpu:TAG \
      --config=configs/mse_1b6.py --workdir=gs://BUCKET/runs/lcm-1b6 \
      --accelerator=tpu-v5p-slice --topology=4x4x4 --num_slices=2 \
      --override=config.data.train=/data/wiki --gcs_bucket=BUCKET-data:/data > lcm-1b6.yaml
  # 4 A3 nodes with 8 H100 each (one process per node):
  python -m launch.gke gpu --name=lcm-7b --image=REGISTRY/lcm-jax-train-gpu:TAG \
      --config=configs/two_tower_7b.py --workdir=gs://BUCKET/runs/lcm-7b --nodes=4
  # 16 embedding workers (arguments after -- go to data_prep.embed unchanged):
  python -m launch.gke embed --name=embed-wiki --image=REGISTRY/lcm-jax-data-prep:TAG \
      --input='/data/raw/wiki/*.jsonl' --out=/data/wiki --num_workers=16 \
      --gcs_bucket=BUCKET-data:/data -- --shard_docs=2000
  kubectl apply -f lcm-1b6.yaml       # needs the JobSet controller in the cluster

Bad flags exit with status 2 and one ``error:`` line naming the flag. See launch/gke/render.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from launch.gke import render
from lcm_jax import fileio


def _nonneg_or_none(text: str) -> int | None:
  if text.lower() == "none":
    return None
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("job")
  g.add_argument("--name", required=True,
                 help="JobSet/Job name: a DNS-1035 label (lower case, digits, '-'); pod hostnames "
                      "built from it must fit in 63 characters")
  g.add_argument("--image", required=True, help="container image (the repository is at /app)")
  g.add_argument("--namespace", default=None, help="Kubernetes namespace (default: kubectl's)")
  g.add_argument("--queue", default=None, help="Kueue LocalQueue (label kueue.x-k8s.io/queue-name)")
  g.add_argument("--service_account", default=None,
                 help="Kubernetes service account of the pods (e.g. one bound to a Google service "
                      "account through Workload Identity, for gs:// access)")
  g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="extra environment variable of the container; repeat for several")
  g.add_argument("--shm_size", default=None,
                 help="size limit of the memory-backed /dev/shm (e.g. 64Gi; default: none)")
  g.add_argument("--pvc", action="append", default=[], metavar="CLAIM:/PATH",
                 help="mount a PersistentVolumeClaim (e.g. Filestore) at PATH; repeat for several")
  g.add_argument("--gcs_bucket", action="append", default=[], metavar="BUCKET:/PATH",
                 help="mount a Cloud Storage bucket at PATH with the GKE Cloud Storage FUSE CSI "
                      "driver (needs --service_account with access); repeat for several")
  g.add_argument("--cpu", default=None, help="CPU request of each pod (e.g. 200)")
  g.add_argument("--memory", default=None, help="memory request of each pod (e.g. 800Gi)")
  g.add_argument("-o", "--output", default=None,
                 help="write the manifest to this file instead of stdout")


def _train(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("training (python -m lcm_jax.main)")
  g.add_argument("--config", required=True,
                 help="config file inside the image, optionally :variant (configs/mse_1b6.py)")
  g.add_argument("--workdir", required=True,
                 help="shared workdir (gs://... or a mounted volume): checkpoints, metrics; a "
                      "restarted JobSet resumes from its latest checkpoint")
  g.add_argument("--override", action="append", default=[], metavar="config.FIELD=VALUE",
                 help="config override, passed as --config.FIELD=VALUE; repeat for several")
  g.add_argument("--max_restarts", type=int, default=render.DEFAULT_MAX_RESTARTS,
                 help="JobSet failurePolicy.maxRestarts: times every pod is recreated after a "
                      "failure (each restart resumes from the latest checkpoint)")
  g.add_argument("--termination_grace_period", type=int, default=render.DEFAULT_GRACE_S,
                 help="seconds between SIGTERM and SIGKILL (lcm_jax.main checkpoints at the next "
                      "step on SIGTERM and exits 143)")
  g.add_argument("--distributed_timeout", type=int, default=render.DEFAULT_DISTRIBUTED_TIMEOUT,
                 help="lcm_jax.main --distributed_timeout: seconds to wait for every process")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m launch.gke", description=__doc__.split("\n\n", 1)[0],
      epilog="Examples:\n" + __doc__.split("\n\n", 1)[1].split("\nBad flags")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="kind", required=True, metavar="{tpu,gpu,embed}")
  fmt = argparse.ArgumentDefaultsHelpFormatter

  tpu = sub.add_parser("tpu", formatter_class=fmt,
                       help="JobSet training on one or more TPU slices",
                       description="JobSet: one replicated Job per TPU slice, one pod per TPU "
                                   "host; JAX finds its peers through GKE's TPU environment.")
  _common(tpu)
  _train(tpu)
  g = tpu.add_argument_group("TPU slices")
  g.add_argument("--accelerator", default=render.DEFAULT_TPU_ACCELERATOR,
                 help="cloud.google.com/gke-tpu-accelerator (tpu-v5p-slice, tpu-v5-lite-podslice, "
                      "tpu-v6e-slice, tpu-v4-podslice, tpu7x)")
  g.add_argument("--topology", required=True,
                 help="cloud.google.com/gke-tpu-topology of one slice (e.g. 4x4x4, 2x4)")
  g.add_argument("--chips_per_host", type=int, default=render.DEFAULT_CHIPS_PER_HOST,
                 help="TPU chips per host (google.com/tpu per pod); hosts = chips / this")
  g.add_argument("--num_slices", type=int, default=1, help="number of slices (multislice > 1)")
  g.add_argument("--host_network", action=argparse.BooleanOptionalAction, default=True,
                 help="pods use the host network (recommended for TPU multislice)")

  gpu = sub.add_parser("gpu", formatter_class=fmt, help="JobSet training on GPU nodes",
                       description="JobSet: one pod (one JAX process) per GPU node; coordinator "
                                   "at the first pod's DNS name, process id = completion index.")
  _common(gpu)
  _train(gpu)
  g = gpu.add_argument_group("GPU nodes")
  g.add_argument("--nodes", type=int, required=True, help="number of nodes (= JAX processes)")
  g.add_argument("--gpus_per_node", type=int, default=render.DEFAULT_GPUS_PER_NODE,
                 help="nvidia.com/gpu per pod")
  g.add_argument("--accelerator", default=render.DEFAULT_GPU_ACCELERATOR,
                 help="cloud.google.com/gke-accelerator node selector ('' for none)")
  g.add_argument("--machine_type", default=None,
                 help="node.kubernetes.io/instance-type node selector (e.g. a3-highgpu-8g)")
  g.add_argument("--coordinator_port", type=int, default=render.DEFAULT_COORDINATOR_PORT,
                 help="port of the JAX coordinator on the first pod")
  g.add_argument("--host_network", action=argparse.BooleanOptionalAction, default=False,
                 help="pods use the host network")

  emb = sub.add_parser("embed", formatter_class=fmt,
                       help="Indexed Job of data_prep.embed workers",
                       description="Indexed Job: N pods run python -m data_prep.embed with "
                                   "--num_workers=N; pod i is worker i ($JOB_COMPLETION_INDEX). "
                                   "Arguments after -- go to data_prep.embed unchanged (model "
                                   "flags, --shard_docs, ...). The worker that finds every shard "
                                   "finished writes manifest.json; by hand: python -m "
                                   "data_prep.embed --out=OUT --merge.")
  _common(emb)
  g = emb.add_argument_group("embedding workers (python -m data_prep.embed)")
  g.add_argument("--input", action="append", default=[], required=True,
                 help="data_prep.embed --input (path, glob or tfds:...; repeat for several)")
  g.add_argument("--out", required=True,
                 help="data_prep.embed --out: the dataset directory (shared by all workers)")
  g.add_argument("--num_workers", type=int, required=True,
                 help="workers = Job completions; data_prep.embed --num_workers")
  g.add_argument("--parallelism", type=int, default=None,
                 help="pods running at once (default: --num_workers)")
  g.add_argument("--gpus_per_worker", type=int, default=1, help="nvidia.com/gpu per pod (0: CPU)")
  g.add_argument("--accelerator", default=render.DEFAULT_EMBED_ACCELERATOR,
                 help="cloud.google.com/gke-accelerator node selector ('' for none)")
  g.add_argument("--machine_type", default=None,
                 help="node.kubernetes.io/instance-type node selector")
  g.add_argument("--backoff_limit_per_index", type=_nonneg_or_none,
                 default=render.DEFAULT_BACKOFF_PER_INDEX,
                 help="retries of each worker index ('none': Kubernetes' Job-wide backoffLimit)")
  g.add_argument("embed_args", nargs="*", metavar="-- EMBED_ARGS",
                 help="further data_prep.embed flags, after --")
  return p


def render_from_args(a: argparse.Namespace) -> dict:
  """The manifest the parsed command line asks for (RenderError on bad values)."""
  common = dict(name=a.name, image=a.image, namespace=a.namespace, queue=a.queue,
                service_account=a.service_account, env=a.env, shm_size=a.shm_size, pvcs=a.pvc,
                gcs_buckets=a.gcs_bucket, cpu=a.cpu, memory=a.memory)
  if a.kind == "embed":
    return render.render_embed_job(
        **common, inputs=a.input, out=a.out, num_workers=a.num_workers,
        parallelism=a.parallelism, gpus_per_worker=a.gpus_per_worker,
        accelerator=a.accelerator or None, machine_type=a.machine_type,
        backoff_limit_per_index=a.backoff_limit_per_index, extra_args=a.embed_args)
  train = dict(config=a.config, workdir=a.workdir, overrides=a.override,
               max_restarts=a.max_restarts, termination_grace_period=a.termination_grace_period,
               distributed_timeout=a.distributed_timeout, host_network=a.host_network)
  if a.kind == "tpu":
    return render.render_tpu_jobset(**common, **train, accelerator=a.accelerator,
                                    topology=a.topology, chips_per_host=a.chips_per_host,
                                    num_slices=a.num_slices)
  return render.render_gpu_jobset(**common, **train, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                                  accelerator=a.accelerator or None, machine_type=a.machine_type,
                                  coordinator_port=a.coordinator_port)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (2 for bad flags)."""
  a = _parser().parse_args(argv)
  try:
    text = render.to_yaml(render_from_args(a))
  except render.RenderError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if a.output:
    fileio.write_file_atomic(a.output, lambda f: f.write(text), suffix=".yaml")
  else:
    sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
