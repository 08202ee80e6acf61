"""GKE manifests for lcm_jax: JobSets for TPU slices and GPU nodes, an Indexed Job for embedding.

Python API (plain dicts; PyYAML only, no jax)::

  from launch import gke
  js = gke.render_tpu_jobset(name="lcm-1b6", image="REGISTRY/lcm-jax-train-tpu:TAG",
                             config="configs/mse_1b6.py", workdir="gs://BUCKET/runs/lcm-1b6",
                             accelerator="tpu-v5p-slice", topology="4x4x4", num_slices=2)
  open("lcm-1b6.yaml", "w").write(gke.to_yaml(js))

Command line: ``python -m launch.gke tpu|gpu|embed --help``.
"""

from launch.gke.render import (  # noqa: F401
    RenderError, config_overrides, embed_command, parse_topology, pod_hostname, render_embed_job,
    render_gpu_jobset, render_tpu_jobset, to_yaml, train_command)
