"""launch.gke: the rendered JobSets / Indexed Job parse as YAML, carry the fields JobSet and Job
require with the values asked for, agree with their consumers (lcm_jax.distributed reads the GPU
env, data_prep.embed's own parser and planner split the work over the Job's indices), and the
CLI exits 2 with a line naming the flag on bad input."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from launch import gke
from launch.gke import __main__ as gke_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _round_trip(obj):
  """The manifest as kubectl would read it: YAML text, parsed back with safe_load."""
  text = gke.to_yaml(obj)
  assert isinstance(text, str) and text.startswith("apiVersion:")
  return yaml.safe_load(text)


def _check_pod_template(t):
  """Hand-written checks of the core/v1 PodTemplateSpec fields a Job needs."""
  spec = t["spec"]
  assert spec["restartPolicy"] in ("Never", "OnFailure")  # Jobs refuse Always
  volume_names = [v["name"] for v in spec["volumes"]]
  assert len(set(volume_names)) == len(volume_names)
  assert spec["containers"], "no containers"
  for c in spec["containers"]:
    assert DNS1123_LABEL.match(c["name"]) and c["image"]
    assert isinstance(c["command"], list) and all(isinstance(a, str) for a in c["command"])
    for e in c.get("env", []):
      assert re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", e["name"])
      assert ("value" in e) != ("valueFrom" in e), e
      if "value" in e:
        assert isinstance(e["value"], str), f"env {e['name']}: value must be a string"
    for m in c["volumeMounts"]:
      assert m["name"] in volume_names and m["mountPath"].startswith("/")
    for k, v in c["resources"].get("limits", {}).items():
      assert isinstance(v, int) and v >= 1, (k, v)
  shm = [m for c in spec["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
  assert len(shm) == 1
  shm_volume = next(v for v in spec["volumes"] if v["name"] == shm[0]["name"])
  assert shm_volume["emptyDir"]["medium"] == "Memory"
  return spec


def _check_jobset(js):
  assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and js["kind"] == "JobSet"
  assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", js["metadata"]["name"])
  rjs = js["spec"]["replicatedJobs"]
  assert len(rjs) == 1
  rj = rjs[0]
  assert DNS1123_LABEL.match(rj["name"]) and rj["replicas"] >= 1
  job = rj["template"]["spec"]
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
  assert job["backoffLimit"] == 0
  assert js["spec"]["network"]["enableDNSHostnames"] is True
  return rj, job, _check_pod_template(job["template"])


def _env(container, completion_index):
  """The container's environment in the pod with this completion index (downward API resolved)."""
  out = {}
  for e in container.get("env", []):
    if "value" in e:
      out[e["name"]] = e["value"]
    else:
      assert e["valueFrom"] == {"fieldRef": {"fieldPath": INDEX_FIELD}}, e
      out[e["name"]] = str(completion_index)  # what the Job controller writes in the annotation
  return out


# ------------------------------------------------------------------------------------------------
# TPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topology,chips_per_host,accelerator,chips,hosts", [
    ("4x4x4", 4, "tpu-v5p-slice", 64, 16),
    ("2x2x1", 4, "tpu-v5p-slice", 4, 1),
    ("2x4", 4, "tpu-v5-lite-podslice", 8, 2),
    ("16x16", 4, "tpu-v6e-slice", 256, 64),
    ("4x8", 8, "tpu-v6e-slice", 32, 4),
    ("1x1", 1, "tpu-v6e-slice", 1, 1),
])
def test_parse_topology(topology, chips_per_host, accelerator, chips, hosts):
  assert gke.parse_topology(topology, chips_per_host, accelerator) == (chips, hosts)


def test_tpu_multislice_jobset_fields_and_values():
  js = _round_trip(gke.render_tpu_jobset(
      name="lcm-1b6", image="reg/lcm-jax-train-tpu:v1", config="configs/mse_1b6.py",
      workdir="gs://bucket/runs/lcm-1b6", accelerator="tpu-v5p-slice", topology="4x8x8",
      chips_per_host=4, num_slices=3, overrides=["optimizer.lr=1e-3", "config.mesh.fsdp=64"],
      env=["LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true"], max_restarts=7,
      termination_grace_period=900, distributed_timeout=1200, shm_size="32Gi",
      gcs_buckets=["gs://data-bucket:/data"], service_account="trainer", queue="tpu-queue",
      namespace="ml"))
  rj, job, pod = _check_jobset(js)
  assert js["metadata"]["annotations"] == {
      "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
  assert js["metadata"]["namespace"] == "ml"
  assert js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tpu-queue"
  assert js["spec"]["failurePolicy"]["maxRestarts"] == 7
  assert rj["name"] == "slice" and rj["replicas"] == 3  # one Job per slice
  assert job["parallelism"] == job["completions"] == 4 * 8 * 8 // 4  # hosts per slice
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "4x8x8"}
  assert pod["terminationGracePeriodSeconds"] == 900
  assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
  assert pod["serviceAccountName"] == "trainer"
  (c,) = pod["containers"]
  assert c["image"] == "reg/lcm-jax-train-tpu:v1"
  assert c["resources"]["limits"] == {"google.com/tpu": 4}
  assert c["command"] == [
      "python", "-m", "lcm_jax.main", "--config=configs/mse_1b6.py",
      "--workdir=gs://bucket/runs/lcm-1b6", "--config.optimizer.lr=1e-3",
      "--config.mesh.fsdp=64", "--distributed_timeout=1200"]
  env = _env(c, 0)
  assert env == {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_async_collective_fusion=true"}
  assert not [k for k in env if k.startswith("JAX_")]  # TPU: JAX's cluster detection
  volumes = {v["name"]: v for v in pod["volumes"]}
  assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
  gcs = [v for v in pod["volumes"] if "csi" in v]
  assert gcs[0]["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
  assert gcs[0]["csi"]["volumeAttributes"]["bucketName"] == "data-bucket"
  assert {"name": gcs[0]["name"], "mountPath": "/data"} in c["volumeMounts"]
  assert job["template"]["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"


def test_tpu_rejects_inconsistent_inputs():
  kw = dict(name="run", image="img", config="configs/mse_1b6.py", workdir="gs://b/w")
  cases = [
      (dict(topology="2x2x3", chips_per_host=8), "--topology"),      # 12 chips, 8 per host
      (dict(topology="4x4", accelerator="tpu-v5p-slice"), "--topology"),  # v5p is 3-D
      (dict(topology="4x4x4", accelerator="tpu-v6e-slice"), "--topology"),  # v6e is 2-D
      (dict(topology="4x0x4"), "--topology"),
      (dict(topology="4x4x4", num_slices=0), "--num_slices"),
      (dict(topology="4x4x4", chips_per_host=0), "--chips_per_host"),
      (dict(topology="4x4x4", name="Run"), "--name"),
      (dict(topology="4x4x4", env=["JAX_PROCESS_ID=0"]), "--env"),
      (dict(topology="4x4x4", overrides=["lr"]), "--override"),
      (dict(topology="4x4x4", shm_size="lots"), "--shm_size"),
      (dict(topology="4x4x4", pvcs=["claim-without-path"]), "--pvc"),
  ]
  for extra, flag in cases:
    args = dict(kw, **extra)
    with pytest.raises(gke.RenderError, match=re.escape(flag)):
      gke.render_tpu_jobset(**args)


def test_name_length_limit_follows_the_longest_pod_hostname():
  # GPU: longest hostname <name>-worker-0-<nodes-1>; with 16 nodes the suffix is "-worker-0-15".
  kw = dict(image="img", config="c.py", workdir="/w", nodes=16)
  ok = "a" * (63 - len("-worker-0-15"))
  js = gke.render_gpu_jobset(name=ok, **kw)
  assert len(gke.pod_hostname(js, 0, 15).split(".")[0]) == 63
  with pytest.raises(gke.RenderError, match="--name"):
    gke.render_gpu_jobset(name=ok + "a", **kw)
  # TPU: 2 slices of 16 hosts: <name>-slice-1-15.
  ok = "b" * (63 - len("-slice-1-15"))
  gke.render_tpu_jobset(name=ok, image="img", config="c.py", workdir="/w", topology="4x4x4",
                        num_slices=2)
  with pytest.raises(gke.RenderError, match="--name"):
    gke.render_tpu_jobset(name=ok + "b", image="img", config="c.py", workdir="/w",
                          topology="4x4x4", num_slices=2)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


def test_gpu_jobset_env_is_what_lcm_jax_distributed_expects():
  from lcm_jax import distributed  # pylint: disable=g-import-not-at-top
  nodes = 4
  js = _round_trip(gke.render_gpu_jobset(
      name="lcm-7b", image="reg/lcm-jax-train-gpu:v2", config="configs/two_tower_7b.py",
      workdir="/ckpt/lcm-7b", nodes=nodes, gpus_per_node=8, machine_type="a3-highgpu-8g",
      coordinator_port=2345, max_restarts=5, termination_grace_period=300,
      pvcs=["filestore:/ckpt"], cpu="200", memory="1000Gi"))
  rj, job, pod = _check_jobset(js)
  assert rj["replicas"] == 1 and job["parallelism"] == job["completions"] == nodes
  assert js["spec"]["failurePolicy"]["maxRestarts"] == 5
  assert pod["terminationGracePeriodSeconds"] == 300
  assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
                                 "node.kubernetes.io/instance-type": "a3-highgpu-8g"}
  assert "hostNetwork" not in pod
  (c,) = pod["containers"]
  assert c["resources"] == {"limits": {"nvidia.com/gpu": 8},
                            "requests": {"cpu": "200", "memory": "1000Gi"}}
  assert c["ports"] == [{"containerPort": 2345}]
  claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
  assert claim["persistentVolumeClaim"] == {"claimName": "filestore"}
  assert {"name": claim["name"], "mountPath": "/ckpt"} in c["volumeMounts"]
  # JobSet names pod (job 0, pod 0) <jobset>-<replicatedJob>-0-0 in subdomain <jobset>.
  first_pod = f"{js['metadata']['name']}-{rj['name']}-0-0.{js['metadata']['name']}"
  assert first_pod == "lcm-7b-worker-0-0.lcm-7b" == gke.pod_hostname(js)
  ids = []
  for i in range(nodes):
    env = _env(c, i)
    assert env["JAX_COORDINATOR_ADDRESS"] == f"{first_pod}:2345"
    assert env["JAX_NUM_PROCESSES"] == str(nodes)
    spec = distributed.resolve("auto", env)
    assert (spec.kind, spec.coordinator, spec.num_processes) == ("explicit", f"{first_pod}:2345",
                                                                 nodes)
    ids.append(spec.process_id)
  assert ids == list(range(nodes))


def test_gpu_rejects_bad_inputs():
  kw = dict(name="g", image="img", config="c.py", workdir="/w", nodes=2)
  for extra, flag in [(dict(nodes=0), "--nodes"), (dict(gpus_per_node=0), "--gpus_per_node"),
                      (dict(coordinator_port=70000), "--coordinator_port"),
                      (dict(env={"JAX_NUM_PROCESSES": "3"}), "--env"),
                      (dict(image=""), "--image"), (dict(workdir=" "), "--workdir"),
                      (dict(max_restarts=-1), "--max_restarts"),
                      (dict(name="g_1"), "--name"), (dict(name="1g"), "--name")]:
    with pytest.raises(gke.RenderError, match=re.escape(flag)):
      gke.render_gpu_jobset(**dict(kw, **extra))


# ------------------------------------------------------------------------------------------------
# Embedding workers
# ------------------------------------------------------------------------------------------------


def _check_embed_job(job, n, parallelism=None):
  assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
  spec = job["spec"]
  assert spec["completionMode"] == "Indexed"
  assert spec["completions"] == n and spec["parallelism"] == (parallelism or n)
  pod = _check_pod_template(spec["template"])
  (c,) = pod["containers"]
  assert c["command"][:3] == ["python", "-m", "data_prep.embed"]
  return spec, pod, c


def test_embed_job_fields_and_worker_indices_cover_the_plan(monkeypatch):
  from data_prep import embed  # pylint: disable=g-import-not-at-top
  n = 5
  job = _round_trip(gke.render_embed_job(
      name="embed-wiki", image="reg/lcm-jax-data-prep:v1",
      inputs=["/data/raw/a/*.jsonl", "/data/raw/b.parquet"], out="/data/wiki", num_workers=n,
      parallelism=2, gpus_per_worker=1, accelerator="nvidia-l4", backoff_limit_per_index=2,
      gcs_buckets=["data-bucket:/data"], extra_args=["--shard_docs=7", "--dtype=float16"]))
  spec, pod, c = _check_embed_job(job, n, parallelism=2)
  assert spec["backoffLimitPerIndex"] == 2
  assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
  assert c["resources"]["limits"] == {"nvidia.com/gpu": 1}
  # The command is valid for data_prep.embed's own parser, with the values asked for.
  a = embed._parser().parse_args(c["command"][3:])  # pylint: disable=protected-access
  assert a.input == ["/data/raw/a/*.jsonl", "/data/raw/b.parquet"] and a.out == "/data/wiki"
  assert (a.num_workers, a.worker_index, a.shard_docs, a.dtype) == (n, None, 7, "float16")
  assert not a.merge
  # Pod i (completion index i) is worker i: embed reads $JOB_COMPLETION_INDEX. Over a plan of
  # 23 shards, indices 0..n-1 own every shard exactly once (shard s -> worker s % num_workers).
  sizes = [np.arange(1, 100), np.arange(1, 63)]  # 161 documents, 7 per shard -> 23 shards
  plan = embed.plan_shards(sizes, a.shard_docs)
  assert len(plan) == 23
  owners = {}
  for i in range(spec["completions"]):
    env = _env(c, i)
    assert set(env) == {"JOB_COMPLETION_INDEX"}
    monkeypatch.setenv("JOB_COMPLETION_INDEX", env["JOB_COMPLETION_INDEX"])
    worker = embed._env_worker_index()  # pylint: disable=protected-access
    assert worker == i
    for s in plan:
      if s.index % a.num_workers == worker:
        assert s.index not in owners
        owners[s.index] = worker
  assert sorted(owners) == list(range(len(plan)))
  assert sorted(set(owners.values())) == list(range(n))


def test_embed_rejects_flags_the_job_sets():
  kw = dict(name="e", image="img", inputs=["/in/*.txt"], out="/out", num_workers=4)
  for extra, flag in [(dict(extra_args=["--worker_index=0"]), "--worker_index"),
                      (dict(extra_args=["--num_workers=2"]), "--num_workers"),
                      (dict(extra_args=["--merge"]), "--merge"),
                      (dict(parallelism=5), "--parallelism"),
                      (dict(num_workers=0), "--num_workers"),
                      (dict(inputs=[]), "--input"), (dict(gpus_per_worker=-1), "--gpus_per_worker"),
                      (dict(name="e" * 62), "--name")]:  # "e"*62 + "-3" is 64 characters
    with pytest.raises(gke.RenderError, match=re.escape(flag)):
      gke.render_embed_job(**dict(kw, **extra))
  # CPU-only workers: no GPU limit, no accelerator selector; no per-index backoff on request.
  job = _round_trip(gke.render_embed_job(**dict(kw, gpus_per_worker=0,
                                                 backoff_limit_per_index=None)))
  spec, pod, c = _check_embed_job(job, 4)
  assert "limits" not in c["resources"] and "nodeSelector" not in pod
  assert "backoffLimitPerIndex" not in spec


@pytest.mark.slow
def test_embed_job_command_run_per_index_writes_the_dataset(tmp_path, monkeypatch):
  """The rendered command, run once per completion index with the Job's environment, writes
  every planned shard once (worker i: shards s with s % N == i) and the last worker merges."""
  pytest.importorskip("sonar")
  pytest.importorskip("wtpsplit")
  from data_prep import embed, text_corpus, tiny_models  # pylint: disable=g-import-not-at-top
  from lcm_jax import schema  # pylint: disable=g-import-not-at-top
  models = tiny_models.build(str(tmp_path / "models"))
  inp = tmp_path / "docs.jsonl"
  docs = text_corpus.documents(7, seed=3, max_sentences=3)
  inp.write_text("".join(json.dumps({"id": f"d{i}", "text": d}) + "\n"
                         for i, d in enumerate(docs)))
  out = str(tmp_path / "dataset")
  n = 3
  job = _round_trip(gke.render_embed_job(
      name="embed-tiny", image="img", inputs=[str(inp)], out=out, num_workers=n,
      extra_args=["--shard_docs=2", f"--sat_model={models['sat_model']}",
                  f"--encoder={models['encoder']}"]))
  _, _, c = _check_embed_job(job, n)
  shards_of = {}
  before = set()
  for i in range(job["spec"]["completions"]):
    for k, v in _env(c, i).items():
      monkeypatch.setenv(k, v)
    assert embed.main(c["command"][3:]) == 0
    now = {f for f in os.listdir(out) if f.endswith(schema.SHARD_SUFFIX)}
    shards_of[i] = sorted(int(f.split("-")[1]) for f in now - before)
    before = now
    merged = os.path.exists(os.path.join(out, schema.MANIFEST_NAME))
    assert merged == (i == n - 1), f"manifest after worker {i}: {merged}"
  # 7 documents, 2 per shard -> 4 shards: worker 0 writes 0 and 3, worker 1 shard 1, worker 2 2.
  assert shards_of == {0: [0, 3], 1: [1], 2: [2]}
  m = schema.read_manifest(out)
  assert m["num_documents"] == 7 and len(m["shards"]) == 4


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def test_cli_subprocess_renders_gpu_and_rejects_bad_flags(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = tmp_path / "gpu.yaml"
  args = ["gpu", "--name=lcm-gpu", "--image=reg/lcm-jax-train-gpu:v3",
          "--config=configs/mse_1b6.py", "--workdir=gs://b/runs/x", "--nodes=2",
          "--override=optimizer.lr=3e-4", "--env=NCCL_DEBUG=WARN", "--shm_size=16Gi"]
  # The module imports without jax (it only builds dicts).
  p = subprocess.run([sys.executable, "-c", "import sys, launch.gke.__main__; "
                      "assert 'jax' not in sys.modules, 'launch.gke imported jax'"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  p = subprocess.run([sys.executable, "-m", "launch.gke", *args, f"--output={out}"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  js = yaml.safe_load(out.read_text())
  assert js == yaml.safe_load(gke.to_yaml(gke.render_gpu_jobset(
      name="lcm-gpu", image="reg/lcm-jax-train-gpu:v3", config="configs/mse_1b6.py",
      workdir="gs://b/runs/x", nodes=2, overrides=["optimizer.lr=3e-4"],
      env={"NCCL_DEBUG": "WARN"}, shm_size="16Gi")))
  _, job, pod = _check_jobset(js)
  assert job["completions"] == 2
  assert {"name": "NCCL_DEBUG", "value": "WARN"} in pod["containers"][0]["env"]
  # Bad input: exit status 2 and one error line naming the flag.
  for bad, flag in [(["--name=LCM-gpu"], "--name"), (["--nodes=0"], "--nodes")]:
    p = subprocess.run([sys.executable, "-m", "launch.gke", *args, *bad], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout)
    assert p.stderr.startswith("error: " + flag), p.stderr


def test_cli_in_process_tpu_embed_and_errors(tmp_path, capsys):
  out = tmp_path / "tpu.yaml"
  assert gke_cli.main(["tpu", "--name=t", "--image=i", "--config=configs/mse_1b6.py",
                       "--workdir=gs://b/w", "--accelerator=tpu-v6e-slice", "--topology=4x4",
                       "--num_slices=2", "--max_restarts=9", "--termination_grace_period=120",
                       "--no-host_network", f"--output={out}"]) == 0
  js = yaml.safe_load(out.read_text())
  rj, job, pod = _check_jobset(js)
  assert rj["replicas"] == 2 and job["completions"] == 4  # 4x4 v6e: 16 chips, 4 hosts
  assert js["spec"]["failurePolicy"]["maxRestarts"] == 9
  assert pod["terminationGracePeriodSeconds"] == 120 and "hostNetwork" not in pod
  assert gke_cli.main(["embed", "--name=e", "--image=i", "--input=/in/a.txt", "--input=/in/b.txt",
                       "--out=/o", "--num_workers=6", "--backoff_limit_per_index=none", "--",
                       "--shard_docs=50", "--encoder=/m/enc.yaml"]) == 0
  job = yaml.safe_load(capsys.readouterr().out)
  spec, _, c = _check_embed_job(job, 6)
  assert "backoffLimitPerIndex" not in spec
  assert c["command"][3:] == ["--input=/in/a.txt", "--input=/in/b.txt", "--out=/o",
                              "--num_workers=6", "--shard_docs=50", "--encoder=/m/enc.yaml"]
  # Topology that does not match chips per host; an argparse error (missing flag) is also 2.
  assert gke_cli.main(["tpu", "--name=t", "--image=i", "--config=c", "--workdir=w",
                       "--topology=2x2x3", "--chips_per_host=8"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --topology='2x2x3' has 12 chips") and "--chips_per_host=8" in err
  with pytest.raises(SystemExit) as e:
    gke_cli.main(["gpu", "--name=g", "--image=i", "--config=c", "--workdir=w"])
  assert e.value.code == 2 and "--nodes" in capsys.readouterr().err
